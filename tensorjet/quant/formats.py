"""Which weight format a model runs in: what the user asked for (`quantization`, or a quantized `dtype`)
checked against what the checkpoint declares (config.json's `quantization_config`, or ModelOpt's
`hf_quant_config.json`).

Recognised checkpoint formats:
- FP8 E4M3 linear layers: compressed-tensors (`quant_method: compressed-tensors`, written by
  llmcompressor): `weight` E4M3 + `weight_scale` per tensor or per output channel; activations dynamic
  per token, or static with an `input_scale` per layer; with a `kv_cache_scheme`, per-layer
  `k_scale`/`v_scale`; NVIDIA ModelOpt (`quant_method: modelopt` / `quant_algo: FP8`): per-tensor
  `weight_scale` and static `input_scale`; with `kv_cache_quant_algo: FP8`, `k_scale`/`v_scale`;
- INT4 weight-only linear layers (`tensorjet.quant.int4`), 4 bits in groups of a multiple of 8 columns
  or per output channel: AutoAWQ (`quant_method: awq`, `version: gemm`), GPTQ (`quant_method: gptq`,
  `checkpoint_format` `gptq` (v1) or `gptq_v2`, act order included) and compressed-tensors W4A16
  (`format: pack-quantized`, int weights, no input quantization), as llmcompressor's GPTQ, AWQ and
  round-to-nearest recipes write it;
- a GGUF file's Q4_0/Q4_1 blocks (`tensorjet.quant.gguf`, CPU only): asked for as `quantization="gguf"`,
  and the default on the CPU (`EngineConfig.gguf_blocks_by_default`) for a file whose decoder
  projections are all 4-bit blocks.
A format or scheme outside these stops at load with the field that is not supported; nothing falls
back to unquantized weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tensorjet.config import FeatureNotAvailableError
from tensorjet.quant.fp8 import Fp8Scheme
from tensorjet.quant.gguf import FOUR_BIT_TYPES
from tensorjet.quant.int4 import Int4Scheme

# Modules a checkpoint may leave unquantized: tensorjet keeps the LM head and embeddings in the model
# dtype anyway.
UNQUANTIZED_MODULES = {"lm_head", "embed_tokens"}


# INT4 layers of `load_format="dummy"` (random weights), by the `quantization` option: AWQ's asymmetric
# and GPTQ's symmetric layout, in the group size their tools default to.
DUMMY_INT4 = {
    "awq": Int4Scheme("awq", 128, zero_points=True),
    "gptq": Int4Scheme("gptq", 128, zero_points=False),
}


@dataclass(frozen=True)
class QuantizationSpec:
    """The decoder layers' linear format and where its weights and scales come from."""

    method: str  # "fp8", "int4" or "gguf"
    # fp8: "online" (quantized at load), "compressed-tensors" or "modelopt";
    # int4: "awq", "gptq", "compressed-tensors", or "dummy" (random weights); gguf: "gguf" or "dummy"
    source: str
    fp8: Fp8Scheme | None = None
    kv_cache_scales: bool = False  # per-layer k_scale/v_scale tensors in the checkpoint
    int4: Int4Scheme | None = None

    @property
    def quantization_options(self) -> tuple[str, ...]:
        """The values of the `quantization` option that name this format: an AWQ or a GPTQ checkpoint
        is that algorithm's; compressed-tensors INT4 does not say which algorithm made it."""
        if self.method in ("fp8", "gguf"):
            return (self.method,)
        if self.source in ("awq", "gptq"):
            return (self.source,)
        return ("awq", "gptq")


class UnsupportedCheckpointError(ValueError):
    """A checkpoint's quantization_config names a format or scheme tensorjet cannot run."""


def quantization_spec(
    requested: str | None,
    checkpoint: Mapping[str, Any] | None,
    *,
    dummy: bool = False,
    gguf_types: Mapping[str, str] | None = None,
    gguf_by_default: bool = False,
) -> QuantizationSpec | None:
    """The format to run: the checkpoint's own where it declares one (`requested` must agree), else
    `requested` applied at load (FP8 quantizes float weights; INT4 makes random weights where `dummy`;
    INT4 of float weights is calibrated into a checkpoint before loading, `tensorjet.calibration`;
    `gguf` runs the blocks of a GGUF file, whose tensor types are `gguf_types`), else with
    `gguf_by_default` a GGUF file's blocks where it has them, else None (unquantized)."""
    if requested == "gguf":
        return _gguf(gguf_types, dummy)
    if requested is None and checkpoint is None and gguf_by_default and gguf_types is not None:
        return (
            _gguf(gguf_types, dummy) if _gguf_projection_types(gguf_types) <= FOUR_BIT_TYPES.keys() else None
        )
    if checkpoint is None:
        if requested is None:
            return None
        if requested == "fp8":
            return QuantizationSpec("fp8", "online", Fp8Scheme())
        if dummy:
            return QuantizationSpec("int4", "dummy", int4=DUMMY_INT4[requested])
        raise ValueError(
            f"option quantization={requested!r} (or dtype='int4_{requested}') on an unquantized checkpoint "
            "needs the checkpoint calibrated first: the engine does it as the model loads "
            "(tensorjet.calibration.at_load), `tensorjet quantize` writes one"
        )
    spec = _checkpoint_spec(checkpoint)
    if requested is not None and requested not in spec.quantization_options:
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
    if method == "awq":
        return _awq(config)
    if method == "gptq":
        return _gptq(config)
    raise UnsupportedCheckpointError(
        f"checkpoint quantization_config.quant_method={method or None!r} is not a format tensorjet "
        "reads; supported: 'compressed-tensors' (FP8, or INT4 W4A16 as llmcompressor writes them), "
        "'modelopt' (FP8), 'awq' (AutoAWQ GEMM) and 'gptq'"
    )


WHERE = "checkpoint quantization_config"

# The decoder projections of a GGUF file, as HF modules name them (`tensorjet.models.gguf_cache`).
GGUF_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _gguf_projection_types(types: Mapping[str, str]) -> set[str]:
    return {kind for name, kind in types.items() if name.endswith(GGUF_PROJECTIONS)}


def _gguf(types: Mapping[str, str] | None, dummy: bool) -> QuantizationSpec:
    if dummy:
        return QuantizationSpec("gguf", "dummy")
    if types is None:
        raise ValueError(
            "option quantization='gguf' runs a GGUF file's 4-bit blocks; this model is not a .gguf file"
        )
    other = sorted(
        (name, kind)
        for name, kind in types.items()
        if name.endswith(GGUF_PROJECTIONS) and kind not in FOUR_BIT_TYPES
    )
    if other or not _gguf_projection_types(types):
        found = f"tensor {other[0][0]} is {other[0][1]}" if other else "it has no decoder projections"
        raise UnsupportedCheckpointError(
            f"option quantization='gguf' runs GGUF files whose decoder projections are all "
            f"{' or '.join(FOUR_BIT_TYPES)} blocks; {found} ({len(other)} such tensors). Use "
            "dtype='float32' to run its fp32 dequantization"
        )
    return QuantizationSpec("gguf", "gguf")


def _awq(config: Mapping[str, Any]) -> QuantizationSpec:
    _require_4_bits(config.get("bits", config.get("w_bit")), f"{WHERE}.bits")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedCheckpointError(
            f"{WHERE}.version={config.get('version')!r} is not supported; tensorjet reads AutoAWQ's 'gemm' "
            "packing (its GEMV, Marlin and exllama layouts are not)"
        )
    group_size = _group_size(config.get("group_size", config.get("q_group_size")), f"{WHERE}.group_size")
    _check_ignored(config.get("modules_to_not_convert") or [], f"{WHERE}.modules_to_not_convert")
    zero_points = bool(config.get("zero_point", True))
    return QuantizationSpec("int4", "awq", int4=Int4Scheme("awq", group_size, zero_points=zero_points))


GPTQ_FORMATS = {"gptq": True, "gptq_v2": False}  # checkpoint_format -> v1 zero points


def _gptq(config: Mapping[str, Any]) -> QuantizationSpec:
    _require_4_bits(config.get("bits"), f"{WHERE}.bits")
    if config.get("is_marlin_format"):
        raise UnsupportedCheckpointError(
            f"{WHERE}.is_marlin_format=true: Marlin-packed GPTQ is not supported"
        )
    field = "checkpoint_format" if "checkpoint_format" in config else "format"
    checkpoint_format = str(config.get(field, "gptq")).lower()
    if checkpoint_format not in GPTQ_FORMATS:
        raise UnsupportedCheckpointError(
            f"{WHERE}.{field}={config.get(field)!r} is not supported; tensorjet reads {sorted(GPTQ_FORMATS)}"
        )
    group_size = _group_size(config.get("group_size"), f"{WHERE}.group_size")
    scheme = Int4Scheme(
        "gptq",
        group_size,
        zero_points=not config.get("sym", True),
        act_order=bool(config.get("desc_act")),
        gptq_v1=GPTQ_FORMATS[checkpoint_format],
    )
    return QuantizationSpec("int4", "gptq", int4=scheme)


def _require_4_bits(bits: object, where: str) -> None:
    if bits != 4:
        raise UnsupportedCheckpointError(f"{where}={bits!r} is not supported; tensorjet reads 4-bit weights")


def _group_size(value: object, where: str) -> int:
    """-1 (per output channel) or a positive multiple of 8 (whole int32 words of codes per group)."""
    if value is None:
        return -1
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not (value == -1 or (value > 0 and value % 8 == 0))
    ):
        raise UnsupportedCheckpointError(
            f"{where}={value!r} is not supported; tensorjet reads groups of a multiple of 8 columns "
            "(32, 64, 128, ...) or -1 (one scale per output channel)"
        )
    return value


def _compressed_tensors(config: Mapping[str, Any]) -> QuantizationSpec:
    where = "checkpoint quantization_config"
    groups = list((config.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise UnsupportedCheckpointError(
            f"{where}.config_groups has {len(groups)} groups; tensorjet reads one group for every Linear"
        )
    group = groups[0]
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    if weights.get("type") == "int":
        return _compressed_tensors_int4(config, group)
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
    scheme = Fp8Scheme(checkpoint_weights=True, static_input_scale=not dynamic)
    return QuantizationSpec("fp8", "compressed-tensors", scheme, kv_cache_scales=_kv_cache_scales(config))


def _kv_cache_scales(config: Mapping[str, Any]) -> bool:
    """Whether a compressed-tensors checkpoint has per-layer k_scale/v_scale (its `kv_cache_scheme`)."""
    kv = config.get("kv_cache_scheme")
    if kv is not None:
        _require_fp8(kv, f"{WHERE}.kv_cache_scheme")
        if kv.get("strategy", "tensor") != "tensor" or kv.get("dynamic"):
            raise UnsupportedCheckpointError(
                f"{WHERE}.kv_cache_scheme must be static per-tensor FP8 (one k_scale and v_scale per layer)"
            )
    return kv is not None


def _compressed_tensors_int4(config: Mapping[str, Any], group: Mapping[str, Any]) -> QuantizationSpec:
    where = f"{WHERE}.config_groups.*"
    weights = group["weights"]
    packing = group.get("format") or config.get("format")
    if packing != "pack-quantized":
        raise UnsupportedCheckpointError(
            f"{where}.format={packing!r} is not supported; tensorjet reads int weights 'pack-quantized'"
        )
    _require_4_bits(weights.get("num_bits"), f"{where}.weights.num_bits")
    if group.get("input_activations") is not None:
        raise UnsupportedCheckpointError(
            f"{where}.input_activations is set: tensorjet reads INT4 weight-only checkpoints (W4A16), "
            "activations unquantized"
        )
    strategy = weights.get("strategy")
    if strategy == "group":
        group_size = _group_size(weights.get("group_size"), f"{where}.weights.group_size")
    elif strategy == "channel":
        group_size = -1
    else:
        raise UnsupportedCheckpointError(
            f"{where}.weights.strategy={strategy!r} is not supported; INT4 weights are read per group or "
            "per channel"
        )
    if weights.get("dynamic"):
        raise UnsupportedCheckpointError(f"{where}.weights.dynamic=true is not supported")
    actorder = weights.get("actorder")
    if actorder not in (None, False, "static", "weight", "group"):
        raise UnsupportedCheckpointError(f"{where}.weights.actorder={actorder!r} is not supported")
    _check_ignored(config.get("ignore") or [], f"{WHERE}.ignore")
    scheme = Int4Scheme(
        "compressed-tensors",
        group_size,
        zero_points=not weights.get("symmetric", True),
        act_order=actorder == "group",  # "group" stores a weight_g_idx; the others leave groups contiguous
    )
    return QuantizationSpec(
        "int4", "compressed-tensors", int4=scheme, kv_cache_scales=_kv_cache_scales(config)
    )


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
