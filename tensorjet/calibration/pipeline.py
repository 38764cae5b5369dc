"""Calibrate a model's decoder-layer projections, layer by layer: each layer sees the outputs of the
layers before it as already quantized (so it can make up for their error), runs its method on its
four projections (q|k|v, o, gate|up, down: the engine's merged layers, so the modules that read one
input share one Hessian, one AWQ scale, and one act order), then takes its quantized weights and
passes its outputs on.

The result is each projection's weights on the INT4 grid (`QuantizedWeight`), keyed by the engine's
module name; the model is left computing exactly those weights (dequantized), with AWQ's scales folded
into the norms and projections before them, so a checkpoint is the model's own tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from tensorjet.calibration import awq, gptq
from tensorjet.calibration.layerwise import LayerwiseRunner
from tensorjet.calibration.quantizer import QuantizedWeight, QuantScheme, grouped, quantize_rtn
from tensorjet.layers.linear import Linear
from tensorjet.models.llama import LlamaDecoderLayer, LlamaForCausalLM

logger = logging.getLogger(__name__)

METHODS = ("awq", "gptq", "rtn")


@dataclass(frozen=True)
class CalibrationOptions:
    method: str  # one of METHODS
    scheme: QuantScheme
    act_order: bool = True  # GPTQ: columns by decreasing Hessian diagonal (static groups)
    damp: float = gptq.DEFAULT_DAMP  # GPTQ: damping, a share of the mean Hessian diagonal
    clip: bool = True  # AWQ: search each group's clipping range after the scales
    n_grid: int = awq.DEFAULT_GRID  # AWQ: points of the scale (and clipping) search

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; choose one of {METHODS}")


def projections(layer: LlamaDecoderLayer) -> dict[str, Linear]:
    """The layer's quantized projections by their name under the layer, in forward order."""
    return {
        "self_attn.qkv_proj": layer.self_attn.qkv_proj,
        "self_attn.o_proj": layer.self_attn.o_proj,
        "mlp.gate_up_proj": layer.mlp.gate_up_proj,
        "mlp.down_proj": layer.mlp.down_proj,
    }


def calibrate(
    model: LlamaForCausalLM,
    token_ids: torch.Tensor,
    options: CalibrationOptions,
    device: torch.device,
    progress: bool = True,
) -> dict[str, QuantizedWeight]:
    """Quantize every decoder-layer projection of `model` (in host memory) with `options.method` on the
    calibration samples `token_ids` [samples, seq_len], running each layer on `device`."""
    runner = None if options.method == "rtn" else LayerwiseRunner(model, token_ids, device)
    results: dict[str, QuantizedWeight] = {}
    layers = tqdm(
        range(len(model.layers)), desc=f"{options.method} calibration", unit="layer", disable=not progress
    )
    for index in layers:
        if runner is None:
            quantized = {
                name: quantize_rtn(linear.weight, options.scheme)
                for name, linear in projections(model.layers[index]).items()
            }
            _use_quantized(model.layers[index], quantized)
        else:
            with runner.on_device(index) as layer:
                calibrate_layer = _awq_layer if options.method == "awq" else _gptq_layer
                quantized = calibrate_layer(layer, runner, options)
                _use_quantized(layer, quantized)
                runner.advance(runner.forward(layer))
        results |= {f"layers.{index}.{name}": q.to_host() for name, q in quantized.items()}
    return results


def _use_quantized(layer: LlamaDecoderLayer, quantized: dict[str, QuantizedWeight]) -> None:
    """The layer computes with its quantized weights from now on."""
    for name, linear in projections(layer).items():
        linear.weight.data.copy_(quantized[name].dequantize(linear.weight.dtype))


# ---- GPTQ -----------------------------------------------------------------------------------------


def _gptq_layer(
    layer: LlamaDecoderLayer, runner: LayerwiseRunner, options: CalibrationOptions
) -> dict[str, QuantizedWeight]:
    linears = projections(layer)
    hessians = {name: gptq.Hessian(linear.input_size, runner.device) for name, linear in linears.items()}
    runner.forward(
        layer,
        inputs_of={linear: (lambda i, x, h=hessians[name]: h.add(x)) for name, linear in linears.items()},
    )
    return {
        name: gptq.gptq_quantize(
            linear.weight,
            hessians[name].matrix,
            options.scheme,
            act_order=options.act_order,
            damp=options.damp,
        )
        for name, linear in linears.items()
    }


# ---- AWQ ------------------------------------------------------------------------------------------


def _awq_layer(
    layer: LlamaDecoderLayer, runner: LayerwiseRunner, options: CalibrationOptions
) -> dict[str, QuantizedWeight]:
    attn, mlp = layer.self_attn, layer.mlp
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in ("qkv", "o", "gate_up", "down")}
    outputs: dict[str, list[torch.Tensor]] = {"attn": [], "mlp": []}
    runner.forward(
        layer,
        inputs_of={
            attn.qkv_proj: lambda i, x: inputs["qkv"].append(x),
            attn.o_proj: lambda i, x: inputs["o"].append(x),
            mlp.gate_up_proj: lambda i, x: inputs["gate_up"].append(x),
            mlp.down_proj: lambda i, x: inputs["down"].append(x),
        },
        outputs_of={
            attn.o_proj: lambda i, y: outputs["attn"].append(y),
            mlp.down_proj: lambda i, y: outputs["mlp"].append(y),
        },
    )
    chunks = runner.chunks

    def attention_block(i: int, x: torch.Tensor) -> torch.Tensor:
        return attn(chunks[i].positions, x, chunks[i].meta)

    inter = mlp.down_proj.input_size
    q_size, kv_size = attn.q_size, attn.kv_size
    v_rows = slice(q_size + kv_size, q_size + 2 * kv_size)
    # (the projections scaled, what produces their input, the block scored, its float output)
    groups: list[tuple[str, list[Linear], Callable[[torch.Tensor], None], Callable, list[torch.Tensor]]] = [
        ("qkv", [attn.qkv_proj], _divide_weight(layer.input_layernorm), attention_block, outputs["attn"]),
    ]
    if kv_size == q_size:  # o's input channels are v's output rows one to one (no grouped-query sharing)
        groups.append(
            (
                "o",
                [attn.o_proj],
                _divide_rows(attn.qkv_proj, v_rows),
                _module_block(attn.o_proj),
                outputs["attn"],
            )
        )
    groups += [
        (
            "gate_up",
            [mlp.gate_up_proj],
            _divide_weight(layer.post_attention_layernorm),
            _module_block(mlp),
            outputs["mlp"],
        ),
        (
            "down",
            [mlp.down_proj],
            _divide_rows(mlp.gate_up_proj, slice(inter, 2 * inter)),
            _module_block(mlp.down_proj),
            outputs["mlp"],
        ),
    ]
    for name, linears, divide_producer, block, reference in groups:
        x = inputs[name]
        x_mean = _mean_abs(x)
        loss_of = _block_loss(linears, block, x, reference)
        scales, _ = awq.search_scales(
            x_mean, [lin.weight for lin in linears], loss_of, options.scheme, options.n_grid
        )
        scales = scales.to(linears[0].weight.dtype)
        divide_producer(scales)
        for linear in linears:
            linear.weight.data.mul_(scales[None, :])
        inputs[name] = [chunk / scales for chunk in x]  # what the scaled projections now read
    quantized = {}
    for name, linear in projections(layer).items():
        max_value = None
        if options.clip:
            x = _token_sample(inputs[name.split(".")[-1].removesuffix("_proj")], awq.CLIP_TOKENS)
            # q and k rows keep their full range: attention scores their errors through the softmax.
            rows = v_rows if name.endswith("qkv_proj") else slice(0, linear.weight.shape[0])
            max_value = _full_extents(linear.weight, options.scheme)
            max_value[rows] = awq.search_clipping(linear.weight[rows], x, options.scheme, options.n_grid)
        quantized[name] = quantize_rtn(linear.weight, options.scheme, max_value)
    return quantized


def _mean_abs(chunks: list[torch.Tensor]) -> torch.Tensor:
    total = sum(c.float().abs().sum(0) for c in chunks)
    return total / sum(c.shape[0] for c in chunks)


def _token_sample(chunks: list[torch.Tensor], count: int) -> torch.Tensor:
    """About `count` tokens spread evenly over the chunks."""
    step = max(1, -(-sum(c.shape[0] for c in chunks) // count))
    return torch.cat([c[::step] for c in chunks])


def _full_extents(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    return grouped(weight.float(), scheme).abs().amax(-1)


def _block_loss(
    linears: list[Linear],
    block: Callable[[int, torch.Tensor], torch.Tensor],
    inputs: list[torch.Tensor],
    reference: list[torch.Tensor],
) -> Callable[[list[torch.Tensor]], float]:
    """Mean squared error of the block's output over every chunk with `trial` weights in the linears."""

    @torch.no_grad()
    def loss_of(trial: list[torch.Tensor]) -> float:
        originals = [lin.weight.data for lin in linears]
        for lin, w in zip(linears, trial):
            lin.weight.data = w
        try:
            total, count = 0.0, 0
            for i, (x, y) in enumerate(zip(inputs, reference)):
                out = block(i, x)
                total += float((out.float() - y.float()).pow(2).sum())
                count += y.numel()
            return total / count
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data = w

    return loss_of


def _module_block(module: nn.Module) -> Callable[[int, torch.Tensor], torch.Tensor]:
    return lambda i, x: module(x)


def _divide_weight(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    def divide(scales: torch.Tensor) -> None:
        norm.weight.data.div_(scales)

    return divide


def _divide_rows(linear: Linear, rows: slice) -> Callable[[torch.Tensor], None]:
    def divide(scales: torch.Tensor) -> None:
        linear.weight.data[rows] /= scales[:, None]
        if linear.bias is not None:
            linear.bias.data[rows] /= scales

    return divide
