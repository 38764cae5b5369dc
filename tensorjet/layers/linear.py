"""Linear layers with a pluggable weight format.

A `LinearMethod` owns how a layer's weights are stored and loaded and every product of the layer: the
plain product (`apply`), and the batch-1 product with the layer's neighbouring norm, residual add or
SiLU-and-multiply fused in (`apply_fused`). Models call `layer(x)` and `layer.forward_fused(...)`,
which delegate to it; nothing else reads the weights. Quantized formats (`tensorjet.quant`) are further
methods; the model code does not change with the format.

Which kernels a method runs is chosen once at start-up (`tensorjet.runtime.kernel_selection`) and kept
on the method (`LinearKernels` for the unquantized one). Merged layers (q|k|v, gate|up) keep one weight;
each checkpoint shard loads into its rows through the parameter's `weight_loader`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tensorjet.layers.norm import RMSNorm
from tensorjet.layers.weight_loader import copy_checked, set_weight_loader

# y [M, N] = kernel(x [M, K], weight [N, K], bias [N] or None)
LinearKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# `tensorjet.kernels.fused_gemv.fused_gemv` with its tile configuration bound
FusedLinearKernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class LinearKernels:
    """The kernels an unquantized layer's products run, chosen at start-up for its weight shape."""

    dense: LinearKernel = F.linear  # every batch the GEMV does not take; `onednn_linear` on CPU fp32
    # A decode GEMV for up to `small_batch_max_rows` rows, where it measured faster than cuBLAS
    # (`tensorjet.kernels.gemv.gemv`).
    small_batch: LinearKernel | None = None
    small_batch_max_rows: int = 0
    # The batch-1 GEMV with the neighbouring ops fused in (`tensorjet.kernels.fused_gemv.fused_gemv`),
    # set where the fused decode layer pays.
    fused: FusedLinearKernel | None = None


class LinearMethod(ABC):
    """How a `Linear` layer's weights are stored, loaded and multiplied."""

    @abstractmethod
    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        """Register the layer's parameters, each with the `weight_loader` its layout needs."""

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x W^T (+ b) [M, N], for any M."""

    @property
    def supports_fused(self) -> bool:
        """Whether `apply_fused` runs this layer's fused batch-1 product. Where not (a format without
        a fused kernel), `Linear.forward_fused` runs the neighbouring ops around `apply` instead."""
        return False

    def apply_fused(
        self,
        layer: Linear,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None,
        residual: torch.Tensor | None,
        silu_mul: bool,
    ) -> torch.Tensor:
        """One row through the product with `norm` applied to x first, the result added into `residual`
        in place (and returned), or SiLU-and-multiply applied to a [gate; up] result."""
        raise NotImplementedError(
            f"{type(self).__name__} has no fused batch-1 product (supports_fused is False)"
        )

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Called once every checkpoint tensor is in: a format whose tensors depend on each other (an
        act-order permutation) converts them here. Nothing by default."""
        return None

    @abstractmethod
    def init_dummy_weights(self, layer: Linear, generator: torch.Generator) -> None:
        """Random weights with the real shapes, scaled so activations stay finite (benchmarks only)."""


def fused_options(norm: RMSNorm | None, residual: torch.Tensor | None, silu_mul: bool) -> dict:
    """A fused GEMV's keyword arguments for the ops `apply_fused` folds in (every fused kernel's)."""
    return dict(
        norm_weight=None if norm is None else norm.weight,
        eps=0.0 if norm is None else norm.eps,
        residual=residual,
        silu_mul=silu_mul,
    )


# Makes a layer's method: one instance per layer, as each keeps the kernels chosen for its layer.
LinearMethodFactory = Callable[[], LinearMethod]


class UnquantizedLinearMethod(LinearMethod):
    """The checkpoint's bf16/fp32 weight [N, K] as it is, multiplied by the kernels in `kernels`."""

    def __init__(self) -> None:
        self.kernels = LinearKernels()

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        out_features = sum(layer.output_sizes)
        layer.weight = nn.Parameter(
            torch.empty(out_features, layer.input_size, dtype=dtype), requires_grad=False
        )
        set_weight_loader(layer.weight, layer.weight_loader)
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
            set_weight_loader(layer.bias, layer.weight_loader)

    def init_dummy_weights(self, layer: Linear, generator: torch.Generator) -> None:
        for param in (layer.weight, layer.bias):
            if param is not None:
                bound = param.shape[-1] ** -0.5
                param.data.uniform_(-bound, bound, generator=generator)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        kernels = self.kernels
        if kernels.small_batch is not None and x.shape[0] <= kernels.small_batch_max_rows:
            return kernels.small_batch(x, layer.weight, layer.bias)
        return kernels.dense(x, layer.weight, layer.bias)

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
            raise NotImplementedError("no fused GEMV was chosen for this layer (supports_fused is False)")
        return fused(x, layer.weight, layer.bias, **fused_options(norm, residual, silu_mul))


class TiedLinearMethod(UnquantizedLinearMethod):
    """The unquantized products over a weight another module owns: a tied LM head multiplies by the
    token embedding's own Parameter (one tensor in memory, loaded once, as the embedding)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.tied_weight = weight

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        shape = (sum(layer.output_sizes), layer.input_size)
        if tuple(self.tied_weight.shape) != shape or layer.has_bias:
            raise ValueError(f"a tied weight must be [{shape[0]}, {shape[1]}] with no bias")
        layer.weight = self.tied_weight

    def init_dummy_weights(self, layer: Linear, generator: torch.Generator) -> None:
        """Nothing: the module that owns the weight fills it."""


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` through oneDNN's matmul instead of MKL's sgemm; CPU only, same weight layout.

    Measured on the 2-core AMD EPYC VM, fp32 SmolLM2-135M: a batch-1 decode step 57 -> 38 ms, a
    32-row one 164 -> 122 ms, prefill products equal or a little faster. The sums round differently
    from MKL's (a few ulps), so logits are close to, not bit-identical with, HF's `F.linear`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Linear(nn.Module):
    """y = x W^T (+ b), W made of `output_sizes` row blocks that load from separate checkpoint tensors."""

    def __init__(
        self,
        input_size: int,
        output_sizes: int | list[int],
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.has_bias = bias
        self.bias = None
        self.method = method if method is not None else UnquantizedLinearMethod()
        self.method.create_weights(self, dtype)

    def shard_rows(self, shard_id: int | None) -> slice:
        """The output rows of shard `shard_id` of a merged layer, or (None) all of them."""
        if shard_id is None:
            return slice(0, sum(self.output_sizes))
        start = sum(self.output_sizes[:shard_id])
        return slice(start, start + self.output_sizes[shard_id])

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
        """Load a parameter whose rows are this layer's outputs: shard `shard_id` of a merged layer into
        its row block, or (None) the whole parameter."""
        copy_checked(param.data[self.shard_rows(shard_id)], tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def forward_fused(
        self,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None = None,
        residual: torch.Tensor | None = None,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """This layer's product for one row with the ops around it: `norm` applied to x first, the
        result added into `residual` in place (and returned), or `act` (SiLU-and-multiply of a
        [gate; up] layer) applied to it. Where the method fuses them (`apply_fused`) they run inside
        its kernel; otherwise as separate ops around `forward`."""
        if self.method.supports_fused:
            return self.method.apply_fused(self, x, norm=norm, residual=residual, silu_mul=act is not None)
        y = self(x if norm is None else norm(x))
        if act is not None:
            return act(y)
        return y if residual is None else residual.add_(y)
