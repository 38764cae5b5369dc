"""Which weight format a model runs in: what the user asked for (`quantization`, or `dtype="fp8"`) checked
against what the checkpoint declares (config.json's `quantization_config`, or ModelOpt's
`hf_quant_config.json`).

Recognised checkpoint formats, all FP8 E4M3 linear layers:
- compressed-tensors (`quant_method: compressed-tensors`, written by llmcompressor): `weight` E4M3 +
  `weight_scale` per tensor or per output channel; activations dynamic per token, or static with an
  `input_scale` per layer; with a `kv_cache_scheme`, per-layer `k_scale`/`v_scale`;
- NVIDIA ModelOpt (`quant_method: modelopt` / `quant_algo: FP8`): per-tensor `weight_scale` and static
  `input_scale`; with `kv_cache_quant_algo: FP8`, `k_scale`/`v_scale`.
A format or scheme outside these stops at load with the field that is not supported; nothing falls
back to unquantized weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tensorjet.config import FeatureNotAvailableError
from tensorjet.quant.fp8 import Fp8Scheme

# Modules a checkpoint may leave unquantized: tensorjet keeps the LM head and embeddings in the model
# dtype anyway.
UNQUANTIZED_MODULES = {"lm_head", "embed_tokens"}


@dataclass(frozen=True)
class QuantizationSpec:
    """The decoder layers' linear format and where its scales come from."""

    method: str  # "fp8"
    source: str  # "online" (quantized at load), "compressed-tensors" or "modelopt"
    fp8: Fp8Scheme
    kv_cache_scales: bool = False  # per-layer k_scale/v_scale tensors in the checkpoint


class UnsupportedCheckpointError(ValueError):
    """A checkpoint's quantization_config names a format or scheme tensorjet cannot run."""


def quantization_spec(requested: str | None, checkpoint: Mapping[str, Any] | None) -> QuantizationSpec | None:
    """The format to run: the checkpoint's own where it declares one (`requested` must agree), else
    `requested` applied at load, else None (unquantized)."""
    if checkpoint is None:
        if requested is None:
            return None
        return QuantizationSpec(requested, "online", Fp8Scheme())
    spec = _checkpoint_spec(checkpoint)
    if requested is not None and requested != spec.method:
        raise ValueError(
            f"option quantization={requested!r} contradicts the checkpoint, which is {spec.method} "
            f"({spec.source}); leave quantization unset to run the checkpoint's format"
        )
    return spec


def _checkpoint_spec(config: Mapping[str, Any]) -> QuantizationSpec:
    method = str(config.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(config)
    if method == "modelopt" or "quant_algo" in config:
        return _modelopt(config)
    if method in ("awq", "gptq", "marlin", "gptq_marlin", "awq_marlin"):
        raise FeatureNotAvailableError(
            f"checkpoint quantization_config.quant_method={method!r}: {method} checkpoints are not "
            "available in tensorjet yet; FP8 ones (compressed-tensors, modelopt) are"
        )
    raise UnsupportedCheckpointError(
        f"checkpoint quantization_config.quant_method={method or None!r} is not a format tensorjet "
        "reads; supported: 'compressed-tensors' (FP8, as llmcompressor writes) and 'modelopt' (FP8)"
    )


def _compressed_tensors(config: Mapping[str, Any]) -> QuantizationSpec:
    where = "checkpoint quantization_config"
    groups = list((config.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise UnsupportedCheckpointError(
            f"{where}.config_groups has {len(groups)} groups; tensorjet reads one FP8 group for every Linear"
        )
    group = groups[0]
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    _require_fp8(weights, f"{where}.config_groups.*.weights")
    if weights.get("strategy") not in ("tensor", "channel"):
        raise UnsupportedCheckpointError(
            f"{where}.config_groups.*.weights.strategy={weights.get('strategy')!r} is not supported; "
            "FP8 weights are read per tensor or per channel (block-wise scales are not)"
        )
    if inputs is None:
        raise FeatureNotAvailableError(
            f"{where}.config_groups.*.input_activations is null: FP8 weight-only checkpoints (W8A16) "
            "are not available in tensorjet yet; FP8 W8A8 ones are"
        )
    _require_fp8(inputs, f"{where}.config_groups.*.input_activations")
    dynamic = bool(inputs.get("dynamic"))
    expected = "token" if dynamic else "tensor"
    if inputs.get("strategy") != expected:
        raise UnsupportedCheckpointError(
            f"{where}.config_groups.*.input_activations.strategy={inputs.get('strategy')!r} with "
            f"dynamic={dynamic} is not supported; tensorjet reads dynamic per-token or static per-tensor"
        )
    _check_ignored(config.get("ignore") or [], f"{where}.ignore")
    kv = config.get("kv_cache_scheme")
    if kv is not None:
        _require_fp8(kv, f"{where}.kv_cache_scheme")
        if kv.get("strategy", "tensor") != "tensor" or kv.get("dynamic"):
            raise UnsupportedCheckpointError(
                f"{where}.kv_cache_scheme must be static per-tensor FP8 (one k_scale and v_scale per layer)"
            )
    scheme = Fp8Scheme(checkpoint_weights=True, static_input_scale=not dynamic)
    return QuantizationSpec("fp8", "compressed-tensors", scheme, kv_cache_scales=kv is not None)


def _modelopt(config: Mapping[str, Any]) -> QuantizationSpec:
    where = "checkpoint quantization_config"
    algo = str(config.get("quant_algo", "")).upper()
    if algo != "FP8":
        raise UnsupportedCheckpointError(
            f"{where}.quant_algo={config.get('quant_algo')!r} (modelopt) is not supported; tensorjet "
            "reads ModelOpt FP8 checkpoints"
        )
    # hf_quant_config.json says `kv_cache_quant_algo: FP8`; the export's config.json, a `kv_cache_scheme`
    kv_algo = config.get("kv_cache_quant_algo")
    if kv_algo is not None and str(kv_algo).upper() != "FP8":
        raise UnsupportedCheckpointError(f"{where}.kv_cache_quant_algo={kv_algo!r} is not supported (FP8 is)")
    kv_scheme = config.get("kv_cache_scheme")
    if kv_scheme is not None:
        _require_fp8(kv_scheme | {"symmetric": kv_scheme.get("symmetric", True)}, f"{where}.kv_cache_scheme")
    # hf_quant_config.json names them `exclude_modules`; the export's config.json, `ignore`
    for field in ("exclude_modules", "ignore"):
        _check_ignored(config.get(field) or [], f"{where}.{field}")
    scheme = Fp8Scheme(checkpoint_weights=True, static_input_scale=True)
    kv_cache_scales = kv_algo is not None or kv_scheme is not None
    return QuantizationSpec("fp8", "modelopt", scheme, kv_cache_scales=kv_cache_scales)


def _require_fp8(args: Mapping[str, Any], where: str) -> None:
    if args.get("type") != "float" or args.get("num_bits") != 8 or args.get("symmetric") is False:
        raise UnsupportedCheckpointError(
            f"{where} is {{type: {args.get('type')!r}, num_bits: {args.get('num_bits')!r}, symmetric: "
            f"{args.get('symmetric')!r}}}; tensorjet reads symmetric 8-bit float (FP8 E4M3)"
        )


def _check_ignored(modules: list[str], where: str) -> None:
    extra = sorted(m for m in modules if m.split(".")[-1] not in UNQUANTIZED_MODULES)
    if extra:
        raise UnsupportedCheckpointError(
            f"{where} leaves {extra[:3]} unquantized; tensorjet runs every decoder-layer projection in "
            "one format (only the LM head and embeddings may be left out)"
        )
