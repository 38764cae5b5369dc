"""FP8 (E4M3) W8A8 linear layers: E4M3 weights with a float32 scale per output channel, activations
quantized per token (dynamic) or with a checkpoint's per-tensor `input_scale` (static).

Weights arrive either as the checkpoint's floats, quantized shard by shard as they load (so peak memory
is the FP8 model plus one tensor), or already E4M3 with their `weight_scale` (an FP8 checkpoint). A
per-tensor checkpoint scale is expanded to its shard's rows, so every kernel sees per-channel scales and
a merged q|k|v or gate|up layer keeps each shard's own scale exactly. Static input scales of a merged
layer's shards (they see the same input) are merged by taking the largest, so no shard saturates. Under
tensor parallelism each loader takes the rank's part first (`Linear.narrow_to_rank`): a float weight is
quantized per channel over that part, and a row-parallel layer keeps its rows' whole scales.

Numerics, shared by every kernel (`tensorjet.kernels.fp8_linear`):
    y = (E4M3(x / x_scale) @ E4M3 weight^T) * x_scale * weight_scale (+ bias), accumulated in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tensorjet.kernels.fp8_reference import E4M3, fp8_linear_reference, quantize_weight_per_channel
from tensorjet.layers.linear import Linear, LinearMethod, fused_options
from tensorjet.layers.norm import RMSNorm
from tensorjet.layers.weight_loader import copy_checked, set_weight_loader

# y [M, N] = kernel(x [M, K], weight [N, K] E4M3, weight_scale [N] f32, bias [N] | None,
#                   input_scale [] f32 | None (None: per-token dynamic))
Fp8Kernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor
]


@dataclass(frozen=True)
class Fp8Scheme:
    """How an FP8 model's linear layers arrive and quantize their inputs."""

    checkpoint_weights: bool = False  # E4M3 `weight` + `weight_scale` tensors; else floats quantized at load
    static_input_scale: bool = False  # an `input_scale` per layer; else per-token dynamic scales


@dataclass(frozen=True)
class Fp8Kernels:
    """The kernels an FP8 layer's products run, chosen at start-up (`tensorjet.runtime.kernel_selection`)."""

    dense: Fp8Kernel = fp8_linear_reference  # every batch the other kernels do not take
    # A decode GEMV reading the E4M3 weight, for up to `small_batch_max_rows` rows.
    small_batch: Fp8Kernel | None = None
    small_batch_max_rows: int = 0
    # The Triton GEMM on the FP8 tensor cores for up to `mid_batch_max_rows` rows (past the GEMV's),
    # where it times faster than `dense`.
    mid_batch: Fp8Kernel | None = None
    mid_batch_max_rows: int = 0
    # The batch-1 GEMV with the neighbouring ops fused in (`tensorjet.kernels.fp8_fused_gemv`).
    fused: Callable[..., torch.Tensor] | None = None


class Fp8LinearMethod(LinearMethod):
    """E4M3 weight [N, K] + `weight_scale` [N]; bias (if any) and outputs in the activation dtype."""

    def __init__(self, scheme: Fp8Scheme) -> None:
        self.scheme = scheme
        self.kernels = Fp8Kernels()
        # The E4M3 values held in the activation dtype (exact), set where the reference product runs
        # (the CPU): converting an E4M3 weight costs more than the product it feeds.
        self.grid_weight: torch.Tensor | None = None

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        rows = sum(layer.output_sizes)
        layer.weight = nn.Parameter(torch.empty(rows, layer.input_size, dtype=E4M3), requires_grad=False)
        scale = torch.ones(rows, dtype=torch.float32)
        if self.scheme.checkpoint_weights:
            set_weight_loader(layer.weight, self._load_e4m3_weight(layer))
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)
            set_weight_loader(layer.weight_scale, self._load_weight_scale(layer))
        else:
            set_weight_loader(layer.weight, self._quantize_on_load(layer))
            layer.register_buffer("weight_scale", scale)
        layer.input_scale = None
        if self.scheme.static_input_scale:
            layer.input_scale = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
            set_weight_loader(layer.input_scale, _load_input_scale)
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.zeros(rows, dtype=dtype), requires_grad=False)
            set_weight_loader(layer.bias, layer.weight_loader)

    # ---- loading --------------------------------------------------------------------------------
    @staticmethod
    def _quantize_on_load(layer: Linear):
        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            if not tensor.is_floating_point() or tensor.dtype == E4M3:
                raise ValueError(
                    f"is {tensor.dtype}: online FP8 quantization takes float weights (an FP8 checkpoint "
                    "declares itself in config.json's quantization_config)"
                )
            tensor = layer.narrow_to_rank(tensor, shard_id)
            rows = layer.shard_rows(shard_id)
            expected = (rows.stop - rows.start, layer.input_size)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"has shape {tuple(tensor.shape)}, expected {expected}")
            weight, scale = quantize_weight_per_channel(tensor.to(param.device))
            param.data[rows] = weight
            layer.weight_scale[rows] = scale

        return load

    @staticmethod
    def _load_e4m3_weight(layer: Linear):
        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            if tensor.dtype != E4M3:
                raise ValueError(f"is {tensor.dtype}, expected {E4M3} (the checkpoint's FP8 format)")
            copy_checked(param.data[layer.shard_rows(shard_id)], layer.narrow_to_rank(tensor, shard_id))

        return load

    @staticmethod
    def _load_weight_scale(layer: Linear):
        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            rows = param.data[layer.shard_rows(shard_id)]
            channels = layer.full_rows(shard_id)
            if tensor.numel() == 1:  # per-tensor: every row of the shard
                rows.fill_(tensor.float().item())
            elif tensor.numel() == channels:  # per-channel: [rows] or [rows, 1]
                rows.copy_(layer.narrow_to_rank(tensor.reshape(-1), shard_id, input_dim=None))
            else:
                raise ValueError(
                    f"has shape {tuple(tensor.shape)}: a weight_scale is per tensor (1 value) or per "
                    f"output channel ({channels} values)"
                )

        return load

    # ---- products -------------------------------------------------------------------------------
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        kernels = self.kernels
        weight = layer.weight if self.grid_weight is None else self.grid_weight
        rows = x.shape[0]
        kernel = kernels.dense
        if kernels.small_batch is not None and rows <= kernels.small_batch_max_rows:
            kernel = kernels.small_batch
        elif kernels.mid_batch is not None and rows <= kernels.mid_batch_max_rows:
            kernel = kernels.mid_batch
        return kernel(x, weight, layer.weight_scale, layer.bias, layer.input_scale)

    @property
    def supports_fused(self) -> bool:
        return self.kernels.fused is not None

    def apply_fused(
        self,
        layer: Linear,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None,
        residual: torch.Tensor | None,
        silu_mul: bool,
    ) -> torch.Tensor:
        fused = self.kernels.fused
        if fused is None:
            raise NotImplementedError("no fused FP8 GEMV was chosen for this layer (supports_fused is False)")
        operands = (layer.weight, layer.weight_scale, layer.bias, layer.input_scale)
        return fused(x, *operands, **fused_options(norm, residual, silu_mul))

    def init_dummy_weights(self, layer: Linear, generator: torch.Generator) -> None:
        """Random weights with the real shapes, quantized as float checkpoint weights would be; a static
        input scale covers activations up to +-16 (random-weight activations stay well inside)."""
        weight = _uniform(layer.weight.shape, layer.input_size**-0.5, torch.float32, generator)
        layer.weight.data, scale = quantize_weight_per_channel(weight)
        layer.weight_scale.copy_(scale)
        if layer.input_scale is not None:
            layer.input_scale.data.fill_(16.0 / 448.0)
        if layer.bias is not None:
            layer.bias.data.copy_(
                _uniform(layer.bias.shape, layer.input_size**-0.5, layer.bias.dtype, generator)
            )


def _load_input_scale(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
    if tensor.numel() != 1:
        raise ValueError(f"has shape {tuple(tensor.shape)}: an input_scale is one per-tensor value")
    param.data.copy_(torch.maximum(param.data, tensor.float().reshape(()).to(param.device)))


def _uniform(shape, bound: float, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    device = generator.device
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-bound, bound, generator=generator)
