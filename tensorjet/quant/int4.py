"""INT4 weight-only (W4A16) linear layers: 4-bit weight codes with a scale (and, asymmetric, a zero
point) per group of input columns; activations stay in the model dtype.

One method for every checkpoint format (`Int4Scheme.checkpoint_format`): AutoAWQ's GEMM format, GPTQ
(v1 and v2, act order included) and compressed-tensors `pack-quantized` (what llmcompressor writes).
Each tensor is repacked as it loads into tensorjet's layout (`tensorjet.kernels.int4_reference.Int4Weight`:
output rows first, so a merged q|k|v or gate|up layer loads each shard into its rows,
`Linear.shard_rows`). Under tensor parallelism each loader first takes the rank's part of the checkpoint
tensor (`Linear.narrow_to_rank`: output rows and whole packed words for a column-parallel layer, input
columns and whole groups for a row-parallel one, whose g_idx then counts the rank's groups from 0).
While loading, the parameters carry the checkpoint's names (`qweight`, `scales`, `qzeros`, `g_idx`;
compressed-tensors' `weight_packed`, `weight_scale`, `weight_zero_point`, `weight_g_idx`,
`weight_shape`); once every tensor is in, `process_weights_after_loading` gives them the kernels' names
(`qweight`, `scales`, `qzeros`, `perm`):
- act order (a g_idx that is not column // group_size): the stored columns are sorted by group, so
  each group is contiguous, and `perm` says which input column each multiplies; the layers of a merged
  module must share one order (they do: they read the same input, so GPTQ orders them alike);
- zero points that are all 8 (a symmetric format) are dropped: the kernels use 8.

Numerics (`tensorjet.kernels.int4_linear`): w = (code - zero) * scale in fp32, rounded to the
activation dtype, then x @ w^T accumulated in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tensorjet.config import FeatureNotAvailableError
from tensorjet.kernels.int4_reference import Int4Weight, int4_linear_reference
from tensorjet.kernels.int4_tinygemm import TinygemmWeight, pack_tinygemm, tinygemm_linear
from tensorjet.layers.linear import Linear, LinearKernel, LinearMethod, fused_options
from tensorjet.layers.norm import RMSNorm
from tensorjet.layers.weight_loader import copy_checked, set_weight_loader
from tensorjet.quant import int4_packing as packing

# y [M, N] = kernel(x [M, K], the layer's Int4Weight, bias [N] | None)
Int4Kernel = Callable[[torch.Tensor, Int4Weight, torch.Tensor | None], torch.Tensor]

CHECKPOINT_FORMATS = ("awq", "gptq", "compressed-tensors")
WORD = packing.CODES_PER_WORD  # 4-bit codes per int32 word


@dataclass(frozen=True)
class Int4Scheme:
    """How an INT4 model's linear layers arrive."""

    checkpoint_format: str  # one of CHECKPOINT_FORMATS: the names and packing of the tensors
    group_size: int  # input columns per scale; -1: one scale per output channel
    zero_points: bool  # asymmetric: the checkpoint has a zero point per group
    act_order: bool = False  # a g_idx per layer (GPTQ always has one; compressed-tensors with actorder)
    gptq_v1: bool = True  # GPTQ's v1 format stores each zero point minus one

    def __post_init__(self) -> None:
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % packing.CODES_PER_WORD):
            raise ValueError(f"group_size must be -1 or a positive multiple of 8; got {self.group_size}")

    def group_columns(self, in_features: int) -> int:
        """Columns per group in tensorjet's layout: per channel, K rounded up to whole words."""
        if self.group_size == -1:
            return -(-in_features // packing.CODES_PER_WORD) * packing.CODES_PER_WORD
        return self.group_size

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_columns(in_features))


# The checkpoint's name of each tensor, by format: (codes, scales, zero points, g_idx).
_NAMES = {
    "awq": ("qweight", "scales", "qzeros", None),
    "gptq": ("qweight", "scales", "qzeros", "g_idx"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"),
}


@dataclass(frozen=True)
class Int4Kernels:
    """The kernels an INT4 layer's products run, chosen at start-up (`tensorjet.runtime.kernel_selection`)."""

    dense: Int4Kernel = int4_linear_reference  # every batch the other kernels do not take
    # The decode GEMV for up to `small_batch_max_rows` rows (`tensorjet.kernels.int4_linear.int4_gemv`).
    small_batch: Int4Kernel | None = None
    small_batch_max_rows: int = 0
    # From `large_batch_min_rows` rows on: the weight dequantized whole, then cuBLAS.
    large_batch: Int4Kernel | None = None
    large_batch_min_rows: int = 0
    # The batch-1 GEMV with the neighbouring ops fused in (`tensorjet.kernels.int4_fused_gemv`).
    fused: Callable[..., torch.Tensor] | None = None

    def for_rows(self, rows: int) -> Int4Kernel:
        """The kernel for a batch of `rows` rows of x."""
        if self.small_batch is not None and rows <= self.small_batch_max_rows:
            return self.small_batch
        if self.large_batch is not None and rows >= self.large_batch_min_rows:
            return self.large_batch
        return self.dense


class Int4LinearMethod(LinearMethod):
    """4-bit codes [N, ceil(K / 8)] int32, scales [N, groups], zero points [N, groups] uint8 (or none),
    act-order `perm` [K] (or none); bias (if any) and outputs in the activation dtype."""

    def __init__(self, scheme: Int4Scheme) -> None:
        self.scheme = scheme
        self.kernels = Int4Kernels()
        self.weight: Int4Weight | None = None  # set once loaded (`process_weights_after_loading`)
        # Where products run as a float matmul (the CPU): the dequantized weight, input-column order,
        # in the activation dtype, and the kernel that multiplies it.
        self.float_weight: torch.Tensor | None = None
        self.float_kernel: LinearKernel | None = None
        # Batches of up to `tinygemm_max_rows` rows run PyTorch's tinygemm (`use_tinygemm`) over this copy.
        self.tinygemm: TinygemmWeight | None = None
        self.tinygemm_max_rows = 0

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        scheme = self.scheme
        rows, k = sum(layer.output_sizes), layer.input_size
        groups = scheme.num_groups(k)
        codes_name, scales_name, zeros_name, g_idx_name = _NAMES[scheme.checkpoint_format]
        words = -(-k // packing.CODES_PER_WORD)
        self._register(layer, codes_name, torch.zeros(rows, words, dtype=torch.int32), self._load_codes)
        self._register(layer, scales_name, torch.zeros(rows, groups, dtype=dtype), self._load_scales)
        if scheme.zero_points or scheme.checkpoint_format != "compressed-tensors":  # AWQ, GPTQ: always
            zeros = torch.full((rows, groups), 8, dtype=torch.uint8)
            self._register(layer, zeros_name, zeros, self._load_zeros)
        if scheme.act_order or scheme.checkpoint_format == "gptq":
            g_idx = torch.full((k,), -1, dtype=torch.int32)
            self._register(layer, g_idx_name, g_idx, self._load_g_idx)
        if scheme.checkpoint_format == "compressed-tensors":
            shape = torch.zeros(len(layer.output_sizes), dtype=torch.int64)  # rows loaded, per shard
            self._register(layer, "weight_shape", shape, self._check_weight_shape)
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.zeros(rows, dtype=dtype), requires_grad=False)
            set_weight_loader(layer.bias, layer.weight_loader)

    @staticmethod
    def _register(layer: Linear, name: str, data: torch.Tensor, make_loader) -> None:
        param = nn.Parameter(data, requires_grad=False)
        layer.register_parameter(name, param)
        set_weight_loader(param, make_loader(layer))

    # ---- loading: each checkpoint tensor into tensorjet's layout, its shard's rows -------------

    def _load_codes(self, layer: Linear):
        fmt = self.scheme.checkpoint_format

        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            _require_int32(tensor)
            rows = layer.shard_rows(shard_id)
            n, k = rows.stop - rows.start, layer.input_size
            if fmt == "compressed-tensors":  # [N, K / 8]
                copy_checked(param.data[rows], layer.narrow_to_rank(tensor, shard_id, input_pack=WORD))
                return
            if fmt == "awq":  # [K, N / 8]
                tensor = layer.narrow_to_rank(tensor, shard_id, output_dim=1, input_dim=0, output_pack=WORD)
                _require_shape(tensor, (k, n // packing.CODES_PER_WORD), "[K, N / 8]")
                codes = packing.unpack_awq(tensor).T
            else:  # GPTQ: [K / 8, N]
                tensor = layer.narrow_to_rank(tensor, shard_id, output_dim=1, input_dim=0, input_pack=WORD)
                _require_shape(tensor, (k // packing.CODES_PER_WORD, n), "[K / 8, N]")
                codes = packing.unpack_gptq_weight(tensor)
            param.data[rows] = packing.pack_int32(codes, 1).to(param.device)

        return load

    def _load_scales(self, layer: Linear):
        transposed = self.scheme.checkpoint_format != "compressed-tensors"  # AWQ, GPTQ: [groups, N]
        groups_dim = self._groups_dim(0 if transposed else 1)

        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            if not tensor.is_floating_point():
                raise ValueError(f"is {tensor.dtype}: scales are floats")
            tensor = layer.narrow_to_rank(
                tensor, shard_id, int(transposed), groups_dim, input_pack=self.scheme.group_size
            )
            target = param.data[layer.shard_rows(shard_id)]
            copy_checked(target, tensor.T if transposed else tensor)

        return load

    def _load_zeros(self, layer: Linear):
        scheme = self.scheme
        transposed = scheme.checkpoint_format != "compressed-tensors"  # AWQ, GPTQ: [groups, N / 8]
        groups_dim = self._groups_dim(0 if transposed else 1)

        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            _require_int32(tensor)
            tensor = layer.narrow_to_rank(
                tensor, shard_id, int(transposed), groups_dim, output_pack=WORD, input_pack=scheme.group_size
            )
            target = param.data[layer.shard_rows(shard_id)]
            n, groups = target.shape
            if scheme.checkpoint_format == "compressed-tensors":
                _require_shape(tensor, (-(-n // packing.CODES_PER_WORD), groups), "[ceil(N / 8), groups]")
                zeros = packing.unpack_compressed_tensors_zeros(tensor, n)
            else:
                _require_shape(tensor, (groups, n // packing.CODES_PER_WORD), "[groups, N / 8]")
                if scheme.checkpoint_format == "awq":
                    zeros = packing.unpack_awq(tensor).T
                else:
                    zeros = packing.unpack_gptq_zeros(tensor, n, v1=scheme.gptq_v1)
            target.copy_(zeros)

        return load

    def _load_g_idx(self, layer: Linear):
        group = self.scheme.group_columns(layer.full_input_size)

        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            if tensor.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"is {tensor.dtype}: a g_idx holds integer group indices")
            tensor = layer.narrow_to_rank(tensor, shard_id, output_dim=None, input_dim=0)
            _require_shape(tensor, tuple(param.shape), "[K]")
            tensor = _rank_group_indices(tensor.to(param.device, torch.int32), layer, group)
            if bool((param.data < 0).all()):  # the first shard
                param.data.copy_(tensor)
            elif not torch.equal(param.data, tensor):
                raise ValueError(
                    "differs from the g_idx of the other modules merged with it: tensorjet runs q|k|v and "
                    "gate|up as one layer, so they must share one column order (act order)"
                )

        return load

    def _check_weight_shape(self, layer: Linear):
        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            rows = layer.shard_rows(shard_id)
            expected = [layer.full_rows(shard_id), layer.full_input_size]
            if tensor.tolist() != expected:
                raise ValueError(f"is {tensor.tolist()}, expected {expected} (the layer's [N, K])")
            param.data[0 if shard_id is None else shard_id] = rows.stop - rows.start

        return load

    def _groups_dim(self, dim: int) -> int | None:
        """The dimension of per-group tensors that a row-parallel layer splits; None per channel (one
        group of every input column: each rank keeps it whole)."""
        return None if self.scheme.group_size == -1 else dim

    # ---- after loading ------------------------------------------------------------------------

    def process_weights_after_loading(self, layer: Linear) -> None:
        """The kernels' names and layout: act order made contiguous (`perm`), symmetric zero points
        dropped, and the layer's `Int4Weight` built."""
        codes_name, scales_name, zeros_name, g_idx_name = _NAMES[self.scheme.checkpoint_format]
        k = layer.input_size
        group = self.scheme.group_columns(k)
        qweight, scales = _pop(layer, codes_name), _pop(layer, scales_name)
        zeros = _pop(layer, zeros_name) if hasattr(layer, zeros_name) else None
        if zeros is not None and bool((zeros == 8).all()):
            zeros = None
        perm = None
        if g_idx_name is not None and hasattr(layer, g_idx_name):
            g_idx = _pop(layer, g_idx_name).long()
            contiguous = torch.arange(k, device=g_idx.device) // group
            if not torch.equal(g_idx, contiguous):
                order = torch.argsort(g_idx, stable=True)
                if not torch.equal(g_idx[order], contiguous):
                    raise ValueError(
                        f"a g_idx of {layer.input_size} columns does not put {group} columns in each group "
                        "(the last may have fewer); tensorjet cannot run it"
                    )
                codes = packing.unpack_int32(qweight, 1, k)[:, order]
                qweight = packing.pack_int32(codes, 1).to(qweight.device)
                perm = order.to(torch.int32)
        if hasattr(layer, "weight_shape"):
            del layer.weight_shape
        layer.qweight = nn.Parameter(qweight, requires_grad=False)
        layer.scales = nn.Parameter(scales, requires_grad=False)
        layer.qzeros = None if zeros is None else nn.Parameter(zeros, requires_grad=False)
        layer.perm = None if perm is None else nn.Parameter(perm, requires_grad=False)
        self.weight = Int4Weight(layer.qweight, layer.scales, layer.qzeros, layer.perm, group, k)

    # ---- products -----------------------------------------------------------------------------

    def use_tinygemm(self, layer: Linear, max_rows: int) -> None:
        """Run batches of up to `max_rows` rows through PyTorch's tinygemm
        (`tensorjet.kernels.int4_tinygemm`): the codes are repacked into its layout, a second copy kept
        beside tensorjet's, which larger batches run."""
        tiny = pack_tinygemm(self.weight)
        layer.tinygemm_packed = nn.Parameter(tiny.packed, requires_grad=False)
        layer.tinygemm_scales_and_zeros = nn.Parameter(tiny.scales_and_zeros, requires_grad=False)
        self.tinygemm, self.tinygemm_max_rows = tiny, max_rows

    @property
    def fusable(self) -> bool:
        """Its one-row products may run the fused Triton GEMV: they run neither a float copy of the
        weight nor tinygemm."""
        return self.float_weight is None and self.tinygemm is None

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.float_weight is not None:
            return self.float_kernel(x, self.float_weight, layer.bias)
        if self.tinygemm is not None and x.shape[0] <= self.tinygemm_max_rows:
            return tinygemm_linear(x, self.tinygemm, layer.bias)
        weight = self.weight
        if weight is None:
            raise RuntimeError(
                "an INT4 layer runs once its weights are loaded (process_weights_after_loading)"
            )
        return self.kernels.for_rows(x.shape[0])(x, weight, layer.bias)

    @property
    def supports_fused(self) -> bool:
        return self.kernels.fused is not None and self.fusable

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
            raise NotImplementedError(
                "no fused INT4 GEMV was chosen for this layer (supports_fused is False)"
            )
        return fused(x, self.weight, layer.bias, **fused_options(norm, residual, silu_mul))

    def init_dummy_weights(self, layer: Linear, generator: torch.Generator) -> None:
        """Random codes with the real shapes (zero points around 8 where the format has them) and scales
        that keep the weights within +-K^-0.5, then the kernels' layout, as after a checkpoint."""
        codes_name, scales_name, zeros_name, g_idx_name = _NAMES[self.scheme.checkpoint_format]
        device = generator.device
        qweight = getattr(layer, codes_name)
        qweight.data.copy_(
            torch.randint(
                -(2**31), 2**31, qweight.shape, dtype=torch.int64, device=device, generator=generator
            )
        )
        getattr(layer, scales_name).data.fill_(layer.input_size**-0.5 / 8)
        if hasattr(layer, zeros_name) and self.scheme.zero_points:
            zeros = getattr(layer, zeros_name)
            zeros.data.copy_(torch.randint(7, 10, zeros.shape, device=device, generator=generator))
        if g_idx_name is not None and hasattr(layer, g_idx_name):
            g_idx = getattr(layer, g_idx_name)
            columns = torch.arange(layer.input_size, device=g_idx.device)
            g_idx.data.copy_(columns // self.scheme.group_columns(layer.input_size))
        if layer.bias is not None:
            bound = layer.input_size**-0.5
            layer.bias.data.uniform_(-bound, bound, generator=generator)
        self.process_weights_after_loading(layer)


def _rank_group_indices(g_idx: torch.Tensor, layer: Linear, group: int) -> torch.Tensor:
    """A row-parallel rank's g_idx (its input columns' groups) counted from its own first group. Act order
    that sends a column to another rank's group cannot run split: that rank holds the group's scales."""
    first = layer.input_slice.start // group
    if first == 0 and layer.input_slice.size == layer.full_input_size:
        return g_idx
    groups = -(-layer.input_slice.size // group)
    if bool(((g_idx < first) | (g_idx >= first + groups)).any()):
        raise FeatureNotAvailableError(
            f"INT4 act order (a g_idx that moves input columns across groups) in a row-parallel layer is "
            f"not available in tensorjet yet with tensor_parallel_size={layer.tp.size}; use "
            "tensor_parallel_size=1 or a checkpoint quantized without act order (desc_act=False)"
        )
    return g_idx - first


def _pop(layer: Linear, name: str) -> torch.Tensor:
    data = getattr(layer, name).data
    delattr(layer, name)
    return data


def _require_int32(tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.int32:
        raise ValueError(f"is {tensor.dtype}, expected torch.int32 (4-bit codes packed eight to a word)")


def _require_shape(tensor: torch.Tensor, shape: tuple[int, ...], layout: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"has shape {tuple(tensor.shape)}, expected {shape} ({layout})")
