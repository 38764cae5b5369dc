"""GGUF 4-bit blocks on the CPU (`quantization="gguf"`): a GGUF file's Q4_0/Q4_1 linear layers run as
they are stored, 4 bits a weight, instead of as the fp32 weights they dequantize to (8x the bytes
every decode step reads).

A block of 32 weights is w = d * q + m (q in 0..15; `tensorjet.models.gguf_blocks`). PyTorch's CPU
weight-only kernel (`aten._weight_int4pack_mm_for_cpu`, group size 32) computes w = (q - 8) * s + z
with bf16 s and z per group, so each block becomes s = d, z = m + 8 d: exact up to rounding d and
m + 8 d to bf16. It reads 4 bits a weight, so it wins where reading weights is the cost: up to
`SMALL_BATCH_MAX_ROWS` rows (decode). Past that the product is compute-bound and a bf16 GEMM
(AVX512-BF16 where the CPU has it) runs about twice as fast, so the layer also keeps that weight as
bf16 (the same values, rounded to bf16): prefill and batched decode. Activations enter either product
as bf16, products accumulate in fp32 and come back as bf16, converted to the model dtype.

While loading, a layer holds the blocks' codes (uint8, one per byte), scales and minimums (fp16), each
shard in its rows (`Linear.shard_rows`), each rank's part under tensor parallelism (whole blocks);
`process_weights_after_loading` packs them into the kernel's layout (`qweight`, `scales_and_zeros`)
and makes the bf16 weight (`dense_weight`).

The LM head of a GGUF file is tied to its token embedding (Q8_0 in llama.cpp's 4-bit files), which is
not a 4-bit type: `GgufHeadMethod` multiplies one row by it as int8 with a scale per row (quantized
once it is loaded), more rows by its bf16 copy.

What both methods make at load they describe as derived tensors (`LinearMethod.derived_layout`): the
cache keeps them, and later starts memory-map them instead of packing again
(`tensorjet.models.derived_cache`; the packing follows torch's version and the CPU's vector width,
which the entry records).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tensorjet.layers.activation import silu_and_mul
from tensorjet.layers.linear import Linear, LinearMethod
from tensorjet.layers.norm import RMSNorm
from tensorjet.layers.weight_loader import copy_checked, set_weight_loader

GROUP = 32  # weights per block and per kernel group
# The GGUF block types this format runs -> bytes per block of 32 weights
FOUR_BIT_TYPES = {"Q4_0": 18, "Q4_1": 20}
ROWS_MULTIPLE = 16  # the kernel's packing takes output rows in multiples of 16
# The tensors a loaded layer multiplies by (`pack_blocks`'s, in its order), and the LM head's
PACKED = ("qweight", "scales_and_zeros", "dense_weight")
HEAD_TENSORS = ("codes", "scales", "dense_weight")

# Rows up to which the int4 kernel beats a bf16 GEMM (the 135M model's shapes on an AVX-512 CPU, one
# thread: 121 vs 142 us at 2 rows, 170 vs 172 at 4, 338 vs 238 at 8).
SMALL_BATCH_MAX_ROWS = 4
# The int8 head's kernel costs rows x its one-row time (3.9 ms at 1 row, 12.3 at 8 on [49152, 576]);
# a bf16 GEMM costs 7.0 ms at 1 row, 8.5 at 8.
HEAD_INT8_MAX_ROWS = 1
# y [M, N] = product(x [M, K], the layer)
Product = Callable[[torch.Tensor, Linear], torch.Tensor]


def pack_blocks(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K] (0..15) with per-32 scales and minimums [N, K / 32] (w = scale * code + min) ->
    the int4 kernel's (packed codes, bf16 scales_and_zeros [K / 32, N, 2]), and the weight it
    multiplies by as bf16 [N, K]."""
    qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    scales, mins = scales.float(), mins.float()
    scales_and_zeros = torch.stack((scales.T, (mins + 8 * scales).T), dim=-1).to(torch.bfloat16)
    rows, k = codes.shape
    s, z = (t.T.float()[..., None] for t in scales_and_zeros.unbind(-1))  # [N, K / 32, 1]
    dense = ((codes.view(rows, k // GROUP, GROUP).float() - 8) * s + z).view(rows, k).to(torch.bfloat16)
    return qweight, scales_and_zeros.contiguous(), dense


def pack_dense(weight: torch.Tensor) -> torch.Tensor | None:
    """A bf16 weight [N, K] in oneDNN's blocked layout for its matmul (`dense_product`), made once: the
    same products as `F.linear` over the plain weight, which reorders it on every call (a 32-row
    product of the head 9.1 -> 6.2 ms on two threads). None where oneDNN has no bf16 matmul here."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def dense_product(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 times a bf16 weight [N, K], through its `pack_dense` layout where there is one."""
    if packed is None:
        return F.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def blocks_product(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    """x W^T (+ b) in x's dtype: the int4 kernel up to `SMALL_BATCH_MAX_ROWS` rows, else the bf16 GEMM."""
    return kernel_product(x, layer).to(x.dtype)


def kernel_product(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    """`blocks_product` as the kernels return it: bf16 (fp32 where a bias is added)."""
    return blocks_matmul(
        x.to(torch.bfloat16), layer.qweight, layer.scales_and_zeros, layer.dense_weight, None, layer.bias
    )


def blocks_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    dense_weight: torch.Tensor,
    packed: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] bf16 times a projection's weights -> [M, N] bf16 (fp32 with a bias): the int4 kernel up
    to `SMALL_BATCH_MAX_ROWS` rows, else the bf16 GEMM (through `packed`, `pack_dense`'s, where made)."""
    if x.shape[0] <= SMALL_BATCH_MAX_ROWS:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, GROUP, scales_and_zeros)
    else:
        y = dense_product(x, dense_weight, packed)
    return y if bias is None else y + bias


class GgufLinearMethod(LinearMethod):
    """A linear layer over a GGUF file's Q4_0/Q4_1 blocks, multiplied by the CPU int4 kernel; bias (if
    any) and outputs in the activation dtype."""

    def __init__(self) -> None:
        # The product, chosen at start-up (`tensorjet.runtime.kernel_selection`): row tiles of fixed
        # shape in batch-invariant mode.
        self.product: Product = blocks_product

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        rows, k = sum(layer.output_sizes), layer.input_size
        if k % GROUP or rows % ROWS_MULTIPLE:
            raise ValueError(
                f"option quantization='gguf': a linear layer of shape [{rows}, {k}] cannot run GGUF "
                f"blocks (the CPU kernel takes inputs in blocks of {GROUP} and outputs in multiples of "
                f"{ROWS_MULTIPLE})"
            )
        # Left uninitialized: loading fills every row (a shard left out stops it), and a layer that
        # takes its derived tensors from the cache drops them unread.
        self._register(layer, "qweight", torch.empty(rows, k, dtype=torch.uint8), 1)
        self._register(layer, "scales", torch.empty(rows, k // GROUP, dtype=torch.float16), GROUP)
        self._register(layer, "mins", torch.empty(rows, k // GROUP, dtype=torch.float16), GROUP)
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.zeros(rows, dtype=dtype), requires_grad=False)
            set_weight_loader(layer.bias, layer.weight_loader)

    @staticmethod
    def _register(layer: Linear, name: str, data: torch.Tensor, columns_per_entry: int) -> None:
        param = nn.Parameter(data, requires_grad=False)
        layer.register_parameter(name, param)

        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: int | None) -> None:
            if tensor.dtype != param.dtype:
                raise ValueError(f"is {tensor.dtype}, expected {param.dtype} (GGUF blocks, unpacked)")
            tensor = layer.narrow_to_rank(tensor, shard_id, input_pack=columns_per_entry)
            copy_checked(param.data[layer.shard_rows(shard_id)], tensor)

        set_weight_loader(param, load)

    def process_weights_after_loading(self, layer: Linear) -> None:
        """The int4 kernel's layout (codes packed two to a byte in its tile order, bf16 scales and
        zeros) and the bf16 weight of larger batches."""
        packed = pack_blocks(layer.qweight.data, layer.scales.data, layer.mins.data)
        self.use_derived_tensors(layer, dict(zip(PACKED, packed)))

    derived_from = ("qweight", "scales", "mins")

    def derived_layout(self, layer: Linear) -> dict[str, torch.Tensor]:
        rows, k = sum(layer.output_sizes), layer.input_size
        return {
            "qweight": torch.empty(rows, k // 2, dtype=torch.uint8, device="meta"),  # two codes a byte
            "scales_and_zeros": torch.empty(k // GROUP, rows, 2, dtype=torch.bfloat16, device="meta"),
            "dense_weight": torch.empty(rows, k, dtype=torch.bfloat16, device="meta"),
        }

    def derived_tensors(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {name: getattr(layer, name).data for name in PACKED}

    def use_derived_tensors(self, layer: Linear, tensors: Mapping[str, torch.Tensor]) -> None:
        del layer.scales, layer.mins
        for name in PACKED:
            setattr(layer, name, nn.Parameter(tensors[name], requires_grad=False))

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, layer)

    @property
    def supports_fused(self) -> bool:
        return True

    def apply_fused(
        self,
        layer: Linear,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None,
        residual: torch.Tensor | None,
        silu_mul: bool,
    ) -> torch.Tensor:
        """The norm, the product and the residual add or SiLU as plain ops called from here, not
        through the layer's modules: less Python in each of a decode step's projections. The
        product's bf16 output is added into the residual as it is (the same sum as converted first)."""
        y = kernel_product(x if norm is None else norm(x), layer)
        if residual is not None:
            return residual.add_(y)
        y = y.to(x.dtype)
        return silu_and_mul(y) if silu_mul else y

    def init_dummy_weights(self, layer: Linear, generator: torch.Generator) -> None:
        """Random codes and scales that keep the weights within +-K^-0.5, then the kernels' layouts."""
        layer.qweight.data.copy_(torch.randint(0, 16, layer.qweight.shape, generator=generator))
        scale = layer.input_size**-0.5 / 8
        layer.scales.data.fill_(scale)
        layer.mins.data.fill_(-8 * scale)
        if layer.bias is not None:
            bound = layer.input_size**-0.5
            layer.bias.data.uniform_(-bound, bound, generator=generator)
        self.process_weights_after_loading(layer)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] as int8 codes [N, K] and a bf16 scale per row (symmetric, rounded to
    nearest): w ~ scale * code, off by at most half a step. The scale is the row's largest magnitude
    over 127, rounded to bf16 upwards so that every code fits in +-127."""
    weight = weight.float()
    exact = weight.abs().amax(dim=1) / 127
    scales = exact.to(torch.bfloat16)
    scales = torch.where(
        scales.float() < exact, torch.nextafter(scales, scales.new_tensor(torch.inf)), scales
    )
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(exact))
    codes = torch.round(weight / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


class GgufHeadMethod(LinearMethod):
    """The LM head of a model that runs GGUF blocks, made from its float weight (the tied embedding's,
    or the head's own) once it is loaded: up to `HEAD_INT8_MAX_ROWS` rows as int8 with a scale per row,
    PyTorch's CPU weight-only int8 kernel (`torch._weight_int8pack_mm`), which reads a byte a weight;
    more rows (prompt logprobs, batched decode), where that kernel is slower than a GEMM, as bf16.
    Activations enter as bf16. The embedding keeps its float rows for the lookup. (4-bit groups of 32
    here cost the bundled model 4% of perplexity, int8 rows 0.1%; `docs/performance.md`.)

    `float_method` holds and loads the float weight (`TiedLinearMethod` over the embedding where the
    two are tied)."""

    def __init__(self, float_method: LinearMethod) -> None:
        self.float_method = float_method
        self.codes: torch.Tensor | None = None  # set once loaded
        self.scales: torch.Tensor | None = None
        self.dense_weight: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None  # `dense_weight` for oneDNN, made by the first call past int8
        self._packing = True

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        self.float_method.create_weights(layer, dtype)

    def process_weights_after_loading(self, layer: Linear) -> None:
        codes, scales = quantize_rows(layer.weight.data)
        dense = layer.weight.data.to(torch.bfloat16)
        self.use_derived_tensors(layer, dict(zip(HEAD_TENSORS, (codes, scales, dense))))

    def derived_layout(self, layer: Linear) -> dict[str, torch.Tensor]:
        rows, k = layer.weight.shape
        return {
            "codes": torch.empty(rows, k, dtype=torch.int8, device="meta"),
            "scales": torch.empty(rows, dtype=torch.bfloat16, device="meta"),
            "dense_weight": torch.empty(rows, k, dtype=torch.bfloat16, device="meta"),
        }

    def derived_tensors(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in HEAD_TENSORS}

    def use_derived_tensors(self, layer: Linear, tensors: Mapping[str, torch.Tensor]) -> None:
        for name in HEAD_TENSORS:
            setattr(self, name, tensors[name])
        self.packed = None

    def init_dummy_weights(self, layer: Linear, generator: torch.Generator) -> None:
        """The float method's random weight (the embedding fills a tied one first), then its int8 rows."""
        self.float_method.init_dummy_weights(layer, generator)
        self.process_weights_after_loading(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if x.shape[0] <= HEAD_INT8_MAX_ROWS:
            y = torch._weight_int8pack_mm(xb, self.codes, self.scales)
        else:
            if self._packing and self.packed is None:
                self.packed = pack_dense(self.dense_weight)
                self._packing = self.packed is not None
            y = dense_product(xb, self.dense_weight, self.packed)
        if layer.bias is not None:
            y = y + layer.bias
        return y.to(x.dtype)
