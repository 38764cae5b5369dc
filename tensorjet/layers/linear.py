"""Linear layers with a pluggable weight format.

A `LinearMethod` owns how a layer's weights are stored and loaded and every product of the layer: the
plain product (`apply`), and the batch-1 product with the layer's neighbouring norm, residual add or
SiLU-and-multiply fused in (`apply_fused`). Models call `layer(x)` and `layer.forward_fused(...)`,
which delegate to it; nothing else reads the weights. Quantized formats (`tensorjet.quant`) are further
methods; the model code does not change with the format.

Which kernels a method runs is chosen once at start-up (`tensorjet.runtime.kernel_selection`) and kept
on the method (`LinearKernels` for the unquantized one). Merged layers (q|k|v, gate|up) keep one weight;
each checkpoint shard loads into its rows through the parameter's `weight_loader`.

Tensor parallelism is a loading rule here too: a `ColumnParallel` layer holds its rank's output rows, a
`RowParallel` one its input columns (and sums the partial products over the ranks). A method creates
parameters of the rank's shape (`output_sizes`, `input_size`) and its loaders cut each checkpoint tensor
to the rank's part (`Linear.narrow_to_rank`), so every format shards the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tensorjet.distributed import SINGLE, Slice, TensorParallel, split
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
    # A decode GEMV for the row counts in `small_batch_rows`, where it measured faster than cuBLAS
    # (`tensorjet.kernels.gemv.gemv`).
    small_batch: LinearKernel | None = None
    small_batch_rows: range = range(0)
    # The decode GEMV with the neighbouring ops fused in (`tensorjet.kernels.fused_gemv.fused_gemv`),
    # set where the fused decode layer pays.
    fused: FusedLinearKernel | None = None

    def product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight^T (+ bias) through the kernel chosen for x's row count."""
        if self.small_batch is not None and x.shape[0] in self.small_batch_rows:
            return self.small_batch(x, weight, bias)
        return self.dense(x, weight, bias)


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
        """Whether `apply_fused` runs this layer's fused decode product. Where not (a format without
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
        """A decode step's rows (one, or as many as the model's `fused_rows` allow where the format's
        fused kernel takes several) through the product with `norm` applied to x first, the result added
        into `residual` in place (and returned), or SiLU-and-multiply applied to a [gate; up] result."""
        raise NotImplementedError(
            f"{type(self).__name__} has no fused batch-1 product (supports_fused is False)"
        )

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Called once every checkpoint tensor is in: a format whose tensors depend on each other (an
        act-order permutation) converts them here. Nothing by default."""
        return None

    # What `process_weights_after_loading` makes from the checkpoint's tensors may be kept in the cache
    # (`tensorjet.models.derived_cache`) and taken back at a later start instead of made again.
    # `derived_from`: the layer's checkpoint parameters it is made from and replaces (a layer that takes
    # it back does not load these).
    derived_from: tuple[str, ...] = ()

    def derived_layout(self, layer: Linear) -> dict[str, torch.Tensor]:
        """The tensors `process_weights_after_loading` makes from the checkpoint's (a kernel's packed
        layout, a copy in another dtype), by name, as meta tensors of their shapes and dtypes. Empty
        (the default): it makes none worth keeping."""
        return {}

    def derived_tensors(self, layer: Linear) -> dict[str, torch.Tensor]:
        """Once the layer is loaded, the tensors `derived_layout` describes."""
        return {}

    def use_derived_tensors(self, layer: Linear, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take `derived_tensors` of an earlier start (of `derived_layout`'s shapes and dtypes, read from
        a cache, possibly memory-mapped: used as they are, never written) instead of the `derived_from`
        parameters; `process_weights_after_loading` is then not called."""
        raise NotImplementedError(f"{type(self).__name__} derives no tensors")

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
# Makes a layer's method over the float one that holds and loads its weight (an LM head's format over
# `TiedLinearMethod` or the unquantized weight).
HeadMethodFactory = Callable[[LinearMethod], LinearMethod]


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
        return self.kernels.product(x, layer.weight, layer.bias)

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


@dataclass(frozen=True)
class ColumnParallel:
    """Output rows split over the ranks (q|k|v, gate|up, the LM head): each rank computes its rows from
    the whole input, and its output stays split (the next layer takes it as it is)."""

    tp: TensorParallel
    unit: int = 1  # rows that stay on one rank: a head's head_dim rows
    replicate: bool = False  # fewer units than ranks: each on size / units ranks (key and value heads)
    pad: bool = False  # rows the ranks do not divide: the last slices zero-padded (a vocabulary)


@dataclass(frozen=True)
class RowParallel:
    """Input columns split over the ranks (o, down): each rank multiplies its slice of the input and the
    partial products are summed over the ranks (one all-reduce); a bias is added once, by rank 0."""

    tp: TensorParallel


class Linear(nn.Module):
    """y = x W^T (+ b), W made of `output_sizes` row blocks that load from separate checkpoint tensors.

    Under tensor parallelism (`parallel`) `output_sizes` and `input_size` are this rank's part of
    `full_output_sizes` and `full_input_size`."""

    def __init__(
        self,
        input_size: int,
        output_sizes: int | list[int],
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        method: LinearMethod | None = None,
        parallel: ColumnParallel | RowParallel | None = None,
    ) -> None:
        super().__init__()
        self.full_input_size = input_size
        self.full_output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.parallel = parallel
        self.tp = SINGLE if parallel is None else parallel.tp
        self.output_slices = [Slice(0, n, n) for n in self.full_output_sizes]
        self.input_slice = Slice(0, input_size, input_size)
        if isinstance(parallel, ColumnParallel):
            self.output_slices = [
                split(n, self.tp, "output rows", parallel.unit, parallel.replicate, parallel.pad)
                for n in self.full_output_sizes
            ]
        elif isinstance(parallel, RowParallel):
            self.input_slice = split(input_size, self.tp, "input columns")
        self.output_sizes = [part.size for part in self.output_slices]
        self.input_size = self.input_slice.size
        # Row-parallel over several ranks: each product is a partial sum, completed by an all-reduce.
        self.reduce_results = isinstance(parallel, RowParallel) and self.tp.size > 1
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

    def full_rows(self, shard_id: int | None) -> int:
        """How many rows the checkpoint tensor of shard `shard_id` (None: the whole layer) has."""
        return sum(self.full_output_sizes) if shard_id is None else self.full_output_sizes[shard_id]

    def narrow_to_rank(
        self,
        tensor: torch.Tensor,
        shard_id: int | None,
        output_dim: int | None = 0,
        input_dim: int | None = 1,
        output_pack: int = 1,
        input_pack: int = 1,
    ) -> torch.Tensor:
        """This rank's part of a checkpoint tensor of shard `shard_id` (None: a whole parameter): its
        output rows along `output_dim` (column-parallel) or its input columns along `input_dim`
        (row-parallel); None: the tensor has no such dimension (it is the same on every rank). `*_pack`
        is how many rows (columns) one entry along that dimension covers: 8 for 4-bit codes packed in
        int32 words, group_size for per-group scales. The tensor as it is without tensor parallelism;
        a ValueError where that dimension is not the layer's full size or the rank's part does not
        fall on whole entries."""
        if self.tp.size == 1 or self.parallel is None:
            return tensor
        if isinstance(self.parallel, ColumnParallel):
            if shard_id is None and len(self.output_slices) > 1:
                raise ValueError("is a whole merged parameter; tensor parallelism loads it shard by shard")
            block = 0 if shard_id is None else shard_id
            dim, pack, part, full = (
                output_dim,
                output_pack,
                self.output_slices[block],
                self.full_output_sizes[block],
            )
        else:
            dim, pack, part, full = input_dim, input_pack, self.input_slice, self.full_input_size
        if dim is None:
            return tensor
        return _narrow(tensor, dim, part, full, pack, self.tp.size)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
        """Load a parameter whose rows are this layer's outputs (and columns, if any, its inputs): shard
        `shard_id` of a merged layer into its row block, or (None) the whole parameter; this rank's part
        of it under tensor parallelism. A row-parallel bias loads on rank 0 only (the all-reduce adds it
        once); the other ranks keep zeros."""
        target = param.data[self.shard_rows(shard_id)]
        if tensor.dim() == 1 and self.reduce_results and not self.tp.is_first:
            if target.shape != tensor.shape:
                raise ValueError(f"has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            target.zero_()
            return
        copy_checked(target, self.narrow_to_rank(tensor, shard_id, input_dim=1 if tensor.dim() > 1 else None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        if self.reduce_results:
            self.tp.all_reduce(y)
        return y

    def forward_fused(
        self,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None = None,
        residual: torch.Tensor | None = None,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """This layer's product for a decode step's few rows with the ops around it: `norm` applied to
        x first, the result added into `residual` in place (and returned), or `act` (SiLU-and-multiply
        of a [gate; up] layer) applied to it. Where the method fuses them (`apply_fused`) they run inside
        its kernel; otherwise as separate ops around `forward` (always for a row-parallel layer over
        several ranks: its partial product is summed over them before the residual add)."""
        if self.method.supports_fused and not self.reduce_results:
            return self.method.apply_fused(self, x, norm=norm, residual=residual, silu_mul=act is not None)
        y = self(x if norm is None else norm(x))
        if act is not None:
            return act(y)
        return y if residual is None else residual.add_(y)


def _narrow(tensor: torch.Tensor, dim: int, part: Slice, full: int, pack: int, ranks: int) -> torch.Tensor:
    """`part` of a dimension of `full` rows (columns) held `pack` to an entry, zero-padded to its size."""
    entries = -(-full // pack)
    if tensor.shape[dim] != entries:
        raise ValueError(
            f"has shape {tuple(tensor.shape)}: its dimension {dim} should hold the full layer's {entries}"
        )
    if part.start % pack or part.size % pack or (part.valid % pack and part.start + part.valid != full):
        raise ValueError(
            f"cannot be split over {ranks} tensor-parallel ranks: a rank's {part.size} rows or columns from "
            f"{part.start} are not whole entries of {pack}"
        )
    piece = tensor.narrow(dim, part.start // pack, -(-part.valid // pack))
    if not part.padded:
        return piece
    shape = list(piece.shape)
    shape[dim] = part.size // pack - shape[dim]
    return torch.cat([piece, piece.new_zeros(shape)], dim=dim)
