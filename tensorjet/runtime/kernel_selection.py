"""Start-up choices of how the model's products run, all in one place.

- The weight format of the decoder layers' projections (`linear_method_for`), and for FP8 layers their
  kernels: on the CPU the reference product over the weights' exact float copy; on an FP8 GPU (sm89+)
  `torch._scaled_mm` with row-wise scales, and for decode-sized batches the FP8 GEMV where it times faster.
- For GGUF blocks (CPU only): the LM head as int8 rows (`head_method_for`, a format chosen before the
  model is built), and the fused batch-1 layer (each projection's neighbouring ops beside PyTorch's
  int4 kernel: fewer ops a step).
- For INT4 layers: on the CPU a float matmul over the dequantized weight (the reference's numerics); on
  a GPU the Triton W4A16 GEMV (its tile timed per weight shape) for decode batches, the Triton GEMM past
  it, and from the batch size where it times faster, the weight dequantized whole and cuBLAS.
- For each unquantized linear layer, the kernels its method runs, kept on the method (`LinearKernels`):
  oneDNN's matmul on CPU fp32, else `F.linear`; on the Triton path on a GPU, a small-batch GEMV per
  weight shape where it times faster than cuBLAS.
- On the Triton path: fused norm, rotary and SiLU kernels, and the fused batch-1 decode layer (each
  projection's GEMV with its neighbouring ops fused in), on where it times faster than the unfused
  layer on a GPU, and with its first candidate tile under the CPU interpreter.
- In batch-invariant mode: every product in fixed-shape row tiles, no GEMV and no fused layer.

A model declares only which projections its one-token path fuses with which neighbour
(`fused_projections()` of each decoder layer); nothing here is specific to one model family.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tensorjet.config import EngineConfig
from tensorjet.kernels.fp8_reference import fp8_linear_reference
from tensorjet.layers.activation import SiluAndMul
from tensorjet.layers.batch_invariant import row_tile_for, row_tiled
from tensorjet.layers.linear import (
    HeadMethodFactory,
    Linear,
    LinearKernel,
    LinearKernels,
    LinearMethodFactory,
    UnquantizedLinearMethod,
    onednn_linear,
)
from tensorjet.layers.norm import RMSNorm
from tensorjet.layers.rotary import RotaryEmbedding
from tensorjet.models.gguf_decode import GgufDecodeStep
from tensorjet.quant.formats import QuantizationSpec
from tensorjet.quant.fp8 import Fp8Kernels, Fp8LinearMethod
from tensorjet.quant.gguf import GgufHeadMethod, GgufLinearMethod, blocks_product
from tensorjet.quant.int4 import Int4Kernels, Int4LinearMethod

logger = logging.getLogger(__name__)

# What one kernel fused away at batch 1 saves: its run time plus its launch gap in a CUDA graph
# (~1.5-2 + ~1 us for a norm or SiLU on the H200; `benchmarks/profile_kernels.py`).
FUSED_LAUNCH_US = 2.5
# Row counts at which the multi-row fused layer is timed against the unfused one: it runs at the step
# sizes the longest run of wins covers (`winning_rows`).
FUSED_ROWS_LADDER = (2, 4, 8, 16)
FP8_MIN_CAPABILITY = (8, 9)


class FusedDecoderLayer(Protocol):
    def fused_projections(self) -> dict[str, tuple[Linear, dict[str, bool]]]:
        """The projections the layer's one-token path runs, each with what it fuses in (`fused_gemv`
        options: norm, residual, silu_mul)."""
        ...


class DecoderModel(Protocol):
    """What kernel selection needs of a model: its modules, its decoder layers, and the switches that
    send one-token steps through the fused layer or a whole-model step (`decode_step`)."""

    layers: Sequence[FusedDecoderLayer]
    fused_decode: bool
    fused_rows: range
    decode_step: Callable | None

    def modules(self) -> Iterator[nn.Module]: ...


def linear_method_for(config: EngineConfig, spec: QuantizationSpec | None) -> LinearMethodFactory:
    """The weight format of the decoder layers' projections: unquantized, or the one `spec` names.
    Raises where this device cannot run it."""
    if spec is None:
        return UnquantizedLinearMethod
    if spec.int4 is not None:
        return partial(Int4LinearMethod, spec.int4)
    if spec.method == "gguf":
        check_gguf_device(config.torch_device)
        return GgufLinearMethod
    check_fp8_device(config.torch_device)
    return partial(Fp8LinearMethod, spec.fp8)


def head_method_for(config: EngineConfig, spec: QuantizationSpec | None) -> HeadMethodFactory | None:
    """The LM head's format: int8 rows (`GgufHeadMethod`) beside projections that run GGUF blocks,
    but in batch-invariant mode (its float product in row tiles, `select_linear_kernels`); else None:
    the head's float weight as it is."""
    if spec is None or spec.method != "gguf" or config.runtime.batch_invariant:
        return None
    return GgufHeadMethod


def check_fp8_device(device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """FP8 runs on the CPU (the reference product) and on GPUs with FP8 tensor cores (compute capability
    8.9+: Ada, Hopper, Blackwell). Elsewhere it stops, rather than run some other format."""
    if device.type != "cuda":
        return
    major, minor = capability or torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"option quantization='fp8' (or dtype='fp8') needs a GPU with FP8 tensor cores (compute "
            f"capability >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}: Ada, Hopper); "
            f"{torch.cuda.get_device_name(device) if capability is None else 'this GPU'} is "
            f"{major}.{minor}"
        )


def check_gguf_device(device: torch.device) -> None:
    """GGUF blocks run on the CPU's int4 kernel only; on a GPU the file's weights run dequantized."""
    if device.type != "cpu":
        raise ValueError(
            f"option quantization='gguf' runs on the CPU only (PyTorch's CPU int4 kernel); device is "
            f"{device}: leave quantization unset to run the GGUF file's weights dequantized there"
        )


def select_kernels(model: DecoderModel, config: EngineConfig, attention_backend: str) -> None:
    """Every start-up kernel choice for `model` on `config`'s device and dtype, given the attention
    backend in use ("torch" or "triton")."""
    on_gpu = config.torch_device.type == "cuda"
    triton = attention_backend == "triton"
    invariant = config.runtime.batch_invariant
    if triton:
        use_triton_elementwise_kernels(model)
    dense = dense_kernel(config)
    if invariant:
        # The same bits for a row at every batch size: every product in fixed-shape row tiles, and
        # neither the small-batch GEMV nor the fused batch-1 layer (kernels chosen by batch size).
        dense = row_tiled(dense, row_tile_for(config.torch_device))
    select_linear_kernels(model, dense, small_batch_gemv=triton and on_gpu and not invariant)
    select_fp8_kernels(model, config, small_batch_gemv=triton and on_gpu and not invariant)
    select_int4_kernels(model, config, triton=triton, timed=on_gpu and not invariant)
    if triton and not invariant:
        select_fused_decode(model, timed=on_gpu)
    select_gguf_kernels(model, config)


def select_gguf_kernels(model: DecoderModel, config: EngineConfig) -> None:
    """For a model whose projections run GGUF blocks: every step through `GgufDecodeStep` where it runs
    the model (one token, batched decode, prompt chunks: a layer in few ops over all rows), else through
    the decoder layers' fused path (each projection with its norm, residual add or SiLU beside it: fewer
    ops a step, the same sums). Batch-invariant mode runs the projections in fixed-shape row tiles."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and isinstance(m.method, GgufLinearMethod)]
    if not layers:
        return
    if config.runtime.batch_invariant:
        tiled = row_tiled(blocks_product, row_tile_for(config.torch_device))
        for layer in layers:
            layer.method.product = tiled
        model.fused_decode = False
        return
    model.fused_decode = True
    model.fused_rows = range(2, sys.maxsize)
    if GgufDecodeStep.runs(model, config.kv_cache_torch_dtype):
        model.decode_step = GgufDecodeStep(model)


def dense_kernel(config: EngineConfig) -> LinearKernel:
    """oneDNN's matmul on CPU fp32 (`onednn_linear`: faster than MKL's there), else `F.linear`."""
    cpu_fp32 = config.torch_device.type == "cpu" and config.torch_dtype == torch.float32
    return onednn_linear if cpu_fp32 and torch.backends.mkldnn.is_available() else F.linear


def use_triton_elementwise_kernels(model: DecoderModel) -> None:
    """Swap the PyTorch norm, rotary and SiLU-and-multiply ops for fused Triton kernels (same numerics)."""
    from tensorjet.kernels.activation import silu_and_mul
    from tensorjet.kernels.norm import rms_norm
    from tensorjet.kernels.rotary import apply_rotary

    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.kernel = rms_norm
        elif isinstance(module, RotaryEmbedding):
            module.kernel = apply_rotary
        elif isinstance(module, SiluAndMul):
            module.kernel = silu_and_mul


def select_linear_kernels(model: DecoderModel, dense: LinearKernel, small_batch_gemv: bool) -> None:
    """Give every unquantized linear layer's method its kernels, chosen once per weight shape:
    `dense` for every batch, and with `small_batch_gemv` the decode GEMV where it times faster than
    cuBLAS on this GPU (`tensorjet.kernels.gemv.select_gemv`)."""
    chosen: dict[tuple, LinearKernels] = {}
    for layer in model.modules():
        if not isinstance(layer, Linear) or not isinstance(layer.method, UnquantizedLinearMethod):
            continue
        key = (tuple(layer.weight.shape), layer.bias is not None)
        if key not in chosen:
            chosen[key] = LinearKernels(dense=dense)
            if small_batch_gemv:
                chosen[key] = _with_timed_gemv(chosen[key], layer.weight, layer.bias)
        layer.method.kernels = chosen[key]


def select_fp8_kernels(model: DecoderModel, config: EngineConfig, small_batch_gemv: bool) -> None:
    """Give every FP8 layer's method its kernels. CPU: the reference product over an exact float copy of
    the E4M3 weights. GPU: `torch._scaled_mm` (row-wise scales) for every batch, and with
    `small_batch_gemv` the FP8 GEMV for the batch sizes from one row up where it times faster
    (`select_fp8_gemv`). Batch-invariant mode cuts every product into fixed-shape row tiles."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and isinstance(m.method, Fp8LinearMethod)]
    if not layers:
        return
    on_gpu = config.torch_device.type == "cuda"
    row_tile = row_tile_for(config.torch_device) if config.runtime.batch_invariant else None
    chosen: dict[tuple, Fp8Kernels] = {}
    for layer in layers:
        method: Fp8LinearMethod = layer.method
        if not on_gpu:
            method.grid_weight = layer.weight.to(config.torch_dtype)
            dense: Callable = fp8_linear_reference
        else:
            from tensorjet.kernels.fp8_linear import scaled_mm_linear

            _check_scaled_mm_shape(layer)
            dense = scaled_mm_linear
        if row_tile is not None:
            dense = row_tiled(dense, row_tile)
        key = (tuple(layer.weight.shape), layer.bias is not None, layer.input_scale is not None)
        if key not in chosen:
            chosen[key] = Fp8Kernels(dense=dense)
            if small_batch_gemv:
                chosen[key] = _with_timed_fp8_gemv(chosen[key], layer)
                chosen[key] = _with_timed_fp8_gemm(chosen[key], layer)
        method.kernels = chosen[key]


def _check_scaled_mm_shape(layer: Linear) -> None:
    rows, cols = layer.weight.shape
    if rows % 16 or cols % 16:
        raise ValueError(
            f"option quantization='fp8': a linear layer of shape [{rows}, {cols}] cannot run FP8 on the GPU "
            "(torch._scaled_mm needs both dimensions to be multiples of 16)"
        )


def _with_timed_fp8_gemv(kernels: Fp8Kernels, layer: Linear) -> Fp8Kernels:
    from tensorjet.kernels.fp8_linear import fp8_gemv, select_fp8_gemv
    from tensorjet.kernels.gemv import SELECTION_ROWS

    config, timings = select_fp8_gemv(layer.weight, layer.weight_scale, layer.bias, layer.input_scale)
    rows = rows_from_one(SELECTION_ROWS, [gemv_ms < mm_ms for gemv_ms, mm_ms in timings.values()])
    logger.info(
        "FP8 linear %s: GEMV %s (%.0f GB/s at M=1) vs scaled_mm by rows: %s -> GEMV for %s",
        tuple(layer.weight.shape),
        config,
        layer.weight.numel() / timings[1][0] / 1e6,
        ", ".join(f"{m}: {g * 1e3:.1f} vs {s * 1e3:.1f} us" for m, (g, s) in timings.items()),
        f"1-{rows.stop - 1} rows" if rows else "no rows",
    )
    if not rows:
        return kernels
    return replace(kernels, small_batch=partial(fp8_gemv, config=config), small_batch_max_rows=rows.stop - 1)


def _with_timed_fp8_gemm(kernels: Fp8Kernels, layer: Linear) -> Fp8Kernels:
    """The Triton FP8 GEMM for batches past the GEMV's, with the fastest tile per batch size, up to the
    largest size at which it times faster than `torch._scaled_mm`."""
    from tensorjet.kernels.fp8_linear import fp8_gemm, select_fp8_gemm_tiles
    from tensorjet.kernels.gemv import cold_copies, time_in_graph_ms

    operands = (layer.weight_scale, layer.bias, layer.input_scale)
    sizes = (32, 64, 128, 256)
    tiles, gemm_ms = select_fp8_gemm_tiles(layer.weight, *operands, sizes)
    weights = cold_copies(layer.weight)
    max_rows = 0
    for rows, tile in tiles:
        x = torch.randn(rows, layer.input_size, dtype=torch.bfloat16, device=layer.weight.device)
        dense_ms = time_in_graph_ms(lambda w, x=x: kernels.dense(x, w, *operands), weights)
        logger.info(
            "FP8 linear %s at M=%d: GEMM %.1f us (%s) vs scaled_mm %.1f us",
            tuple(layer.weight.shape), rows, gemm_ms[rows] * 1e3, tile, dense_ms * 1e3,
        )  # fmt: skip
        if gemm_ms[rows] >= dense_ms:
            break
        max_rows = rows
    if max_rows == 0:
        return kernels
    mid_batch = partial(fp8_gemm, tiles=tiles)
    return replace(kernels, mid_batch=mid_batch, mid_batch_max_rows=max_rows)


def select_int4_kernels(model: DecoderModel, config: EngineConfig, triton: bool, timed: bool) -> None:
    """Give every INT4 layer's method its kernels. On the CPU's torch path: the float product
    (`dense_kernel`) over the dequantized weight, made once here. On the Triton path: the Triton GEMM
    for every batch and the GEMV (its first tile untimed, under the CPU interpreter) for decode
    batches; with `timed` (a GPU), the GEMV tile and the GEMM tile per batch size that time fastest
    per weight shape, from the batch size at which it times faster, the weight dequantized whole and
    cuBLAS, and PyTorch's tinygemm for the smallest batches where it times faster (`_use_tinygemm`).
    Batch-invariant mode runs one kernel for every batch size, in fixed-shape row tiles."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and isinstance(m.method, Int4LinearMethod)]
    if not layers:
        return
    row_tile = row_tile_for(config.torch_device) if config.runtime.batch_invariant else None
    if config.torch_device.type != "cuda" and not triton:
        from tensorjet.kernels.int4_reference import dequantize

        float_kernel = dense_kernel(config)
        if row_tile is not None:
            float_kernel = row_tiled(float_kernel, row_tile)
        for layer in layers:
            layer.method.float_weight = dequantize(layer.method.weight, config.torch_dtype)
            layer.method.float_kernel = float_kernel
        return
    from tensorjet.kernels.int4_linear import GEMV_MAX_M, int4_gemm, int4_gemv

    if row_tile is not None:
        for layer in layers:
            layer.method.kernels = Int4Kernels(dense=row_tiled(int4_gemm, row_tile))
        return
    # per weight shape and layout: its kernels, and the most rows tinygemm takes (timed on a GPU)
    chosen: dict[tuple, tuple[Int4Kernels, int]] = {}
    tinygemm_rows = []
    for layer in layers:
        weight = layer.method.weight
        layout = (
            weight.group_size,
            weight.zeros is not None,
            weight.perm is not None,
            layer.bias is not None,
        )
        key = (tuple(weight.qweight.shape), *layout)
        if key not in chosen:
            kernels = Int4Kernels(dense=int4_gemm, small_batch=int4_gemv, small_batch_max_rows=GEMV_MAX_M)
            rows = 0
            if timed:
                kernels = _with_timed_int4_kernels(kernels, layer)
                rows = _rows_tinygemm_wins(kernels, layer, config.torch_dtype)
            chosen[key] = kernels, rows
        layer.method.kernels, rows = chosen[key]
        tinygemm_rows.append(rows)
    if timed:
        _use_tinygemm(layers, tinygemm_rows, config.torch_device)


# The batch sizes at which tinygemm is timed against the Triton kernels: it reads the codes once per
# 16 rows of x, so it can win only at decode sizes (on an H100: 2.3-3x faster at one row, about even at
# 16, slower from 64 rows and 10x slower at 2048).
TINYGEMM_ROWS = (1, 4, 8, 16)
# The most of the GPU's memory the tinygemm copies of the codes may take: a second copy is worth its
# memory where it is small next to the KV cache it takes it from (an 8B model's 4.7 GB on an 80 GB GPU,
# not a 70B model's 35 GB).
TINYGEMM_MEMORY_SHARE = 0.1


def _rows_tinygemm_wins(kernels: Int4Kernels, layer: Linear, dtype: torch.dtype) -> int:
    """The largest of TINYGEMM_ROWS up to which PyTorch's tinygemm times faster than the chosen Triton
    kernels on this layer's weight at every size (0: not even at one row, or it cannot run it)."""
    from tensorjet.kernels.gemv import time_in_graph_ms
    from tensorjet.kernels.int4_linear import cold_weights
    from tensorjet.kernels.int4_tinygemm import pack_tinygemm, tinygemm_linear, tinygemm_unsupported

    weight = layer.method.weight
    reason = tinygemm_unsupported(weight, dtype)
    if reason is not None:
        logger.info("INT4 linear [%d, %d]: no tinygemm (%s)", weight.out_features, weight.in_features, reason)
        return 0
    ours = cold_weights(weight)
    theirs = [pack_tinygemm(w) for w in ours]
    wins = 0
    for rows in TINYGEMM_ROWS:
        x = torch.randn(rows, weight.in_features, dtype=dtype, device=weight.qweight.device)
        kernel = kernels.for_rows(rows)
        ours_ms = time_in_graph_ms(lambda w, x=x, k=kernel: k(x, w, layer.bias), ours)
        theirs_ms = time_in_graph_ms(lambda w, x=x: tinygemm_linear(x, w, layer.bias), theirs)
        logger.info(
            "INT4 linear [%d, %d] at M=%d: Triton %.1f us, tinygemm %.1f us",
            weight.out_features, weight.in_features, rows, ours_ms * 1e3, theirs_ms * 1e3,
        )  # fmt: skip
        if theirs_ms >= ours_ms:
            break
        wins = rows
    return wins


def _use_tinygemm(layers: list[Linear], max_rows: list[int], device: torch.device) -> None:
    """Give each layer whose small batches tinygemm wins (`max_rows` > 0) a tinygemm copy of its codes
    for them, if all those copies together fit TINYGEMM_MEMORY_SHARE of the GPU's memory."""
    from tensorjet.kernels.int4_tinygemm import tinygemm_bytes

    takers = [(layer, rows) for layer, rows in zip(layers, max_rows) if rows > 0]
    extra = sum(tinygemm_bytes(layer.method.weight) for layer, _ in takers)
    total = torch.cuda.get_device_properties(device).total_memory
    if extra > TINYGEMM_MEMORY_SHARE * total:
        logger.info(
            "INT4: tinygemm for small batches of %d layers would copy %.2f GB of codes, over %.0f%% of "
            "the GPU's %.1f GB: the Triton kernels run every batch",
            len(takers), extra / 1e9, 100 * TINYGEMM_MEMORY_SHARE, total / 1e9,
        )  # fmt: skip
        return
    for layer, rows in takers:
        layer.method.use_tinygemm(layer, rows)
    if takers:
        logger.info(
            "INT4: tinygemm runs batches of up to %d rows in %d of %d layers (%.2f GB more codes)",
            max(rows for _, rows in takers), len(takers), len(layers), extra / 1e9,
        )  # fmt: skip


def _with_timed_int4_kernels(kernels: Int4Kernels, layer: Linear) -> Int4Kernels:
    from tensorjet.kernels.int4_linear import (
        dequantized_linear,
        int4_gemm,
        int4_gemv,
        select_int4_gemm,
        select_int4_gemm_tiles,
        select_int4_gemv,
    )

    weight = layer.method.weight
    config, timings = select_int4_gemv(weight, layer.bias)
    packed_bytes = weight.qweight.numel() * 4 + weight.scales.numel() * weight.scales.element_size()
    logger.info(
        "INT4 linear [%d, %d]: GEMV %.1f us (%.0f GB/s) vs bf16 cuBLAS %.1f us at M=1 -> %s",
        weight.out_features,
        weight.in_features,
        timings["gemv_m1"] * 1e3,
        packed_bytes / timings["gemv_m1"] / 1e6,
        timings["bf16_m1"] * 1e3,
        config,
    )
    tiles, gemm_ms = select_int4_gemm_tiles(weight, layer.bias, (32, 64, 128, 256, 512))
    for rows, tile in tiles:
        logger.info(
            "INT4 linear [%d, %d] at M=%d: GEMM %.1f us (%s)",
            weight.out_features, weight.in_features, rows, gemm_ms[rows] * 1e3, tile,
        )  # fmt: skip
    kernels = replace(
        kernels, small_batch=partial(int4_gemv, config=config), dense=partial(int4_gemm, tiles=tiles)
    )
    min_rows, timings = select_int4_gemm(weight, layer.bias, tiles=tiles)
    logger.info(
        "INT4 linear [%d, %d]: dequantize + cuBLAS from %s rows (%s)",
        weight.out_features,
        weight.in_features,
        min_rows,
        ", ".join(f"{name} {ms * 1e3:.0f} us" for name, ms in timings.items()),
    )
    if min_rows is None:
        return kernels
    return replace(kernels, large_batch=dequantized_linear, large_batch_min_rows=min_rows)


def _with_timed_gemv(
    kernels: LinearKernels, weight: torch.Tensor, bias: torch.Tensor | None
) -> LinearKernels:
    from tensorjet.kernels.gemv import SELECTION_ROWS, gemv, select_gemv

    config, timings = select_gemv(weight, bias)
    rows = winning_rows(SELECTION_ROWS, [g < c for g, c in timings.values()], smallest=1)
    logger.info(
        "linear %s: GEMV %s vs cuBLAS by rows: %s -> GEMV for %s",
        tuple(weight.shape),
        config,
        ", ".join(f"{m}: {g * 1e3:.1f} vs {c * 1e3:.1f} us" for m, (g, c) in timings.items()),
        f"{rows.start}-{rows.stop - 1} rows" if rows else "no rows",
    )
    if not rows:
        return kernels
    return replace(kernels, small_batch=partial(gemv, config=config), small_batch_rows=rows)


def select_fused_decode(model: DecoderModel, timed: bool = True) -> None:
    """Run one-token steps through the decoder layers' fused path: each projection's GEMV carries the
    norm, residual add or SiLU next to it (`tensorjet.kernels.fused_gemv` for unquantized weights,
    `tensorjet.kernels.fp8_fused_gemv` for FP8 ones, `tensorjet.kernels.int4_fused_gemv` for INT4 ones).

    timed: time each projection's best fused GEMV on this GPU and sum them over a layer, against its
    plain product (cuBLAS, `torch._scaled_mm` for FP8, the layer's own GEMV for INT4) plus the three
    kernels the fusion removes (two norms with their residual adds, SiLU; `FUSED_LAUNCH_US` each); the
    path is on only if the fused layer wins. Untimed (the CPU interpreter), it is on with the first
    candidate. It stays off where a projection's weight format has no fused GEMV (or, INT4, runs as a
    float product on the CPU's torch path or through tinygemm). Unquantized weights also get the
    2-16-row variant, for the step sizes where it wins (`_select_fused_rows`)."""
    layers = [layer.fused_projections() for layer in model.layers]
    methods = [proj.method for projections in layers for proj, _ in projections.values()]
    families = (Fp8LinearMethod, Int4LinearMethod, UnquantizedLinearMethod)
    family = next((f for f in families if all(isinstance(m, f) for m in methods)), None)
    if family is None or any(isinstance(m, Int4LinearMethod) and not m.fusable for m in methods):
        names = ", ".join(sorted({type(m).__name__ for m in methods}))
        logger.info("fused batch-1 decode layer: off (no fused GEMV for %s on this path)", names)
        model.fused_decode = False
        return
    fp8 = family is Fp8LinearMethod
    if family is Int4LinearMethod:
        select, candidates, fused_kernel = _int4_fused_gemv_family()
    else:
        select, candidates, fused_kernel = _fused_gemv_family(fp8)
    configs = {name: candidates[0] for name in layers[0]}
    use = True
    if timed:
        start = time.perf_counter()
        fused_us = 0.0
        unfused_us = 3 * FUSED_LAUNCH_US
        for name, (proj, fusion) in layers[0].items():
            configs[name], timings = select(proj, fusion)
            plain = timings["plain" if family is Int4LinearMethod else "scaled_mm" if fp8 else "cublas"]
            fused_us += timings["fused"] * 1e3
            unfused_us += plain * 1e3
            logger.info(
                "fused decode %s: %.1f us (%s) vs %.1f us plain", name, timings["fused"] * 1e3, configs[name],
                plain * 1e3,
            )  # fmt: skip
        use = fused_us < unfused_us
        logger.info(
            "fused batch-1 decode layer: %.1f us vs %.1f us unfused -> %s (chosen in %.1fs)",
            fused_us,
            unfused_us,
            "on" if use else "off",
            time.perf_counter() - start,
        )
    rows_configs, model.fused_rows = {}, range(0)
    if family is UnquantizedLinearMethod:  # the one format whose fused kernel takes several rows
        rows_configs, model.fused_rows = _select_fused_rows(layers[0], timed)
    # The GEMVs are bound either way, so a benchmark can flip `fused_decode` to compare.
    kernels = {
        name: partial(
            fused_kernel, config=config, **({"rows_config": rows_configs[name]} if rows_configs else {})
        )
        for name, config in configs.items()
    }
    for projections in layers:
        for name, (proj, _) in projections.items():
            proj.method.kernels = replace(proj.method.kernels, fused=kernels[name])
    model.fused_decode = use


def _select_fused_rows(projections: dict[str, tuple[Linear, dict]], timed: bool) -> tuple[dict, range]:
    """The tensor-core fused kernel's tiles for each projection, and the step sizes (2-16 rows) that
    run the fused layer: timed, those up to the sizes of the longest run of `FUSED_ROWS_LADDER` at
    which the fused layer beats each projection's own product plus the three kernels the fusion
    removes (its x tile is padded to 16 rows, so it wins at the larger sizes if anywhere); untimed
    (the CPU interpreter), the first candidate at every size."""
    from tensorjet.kernels.fused_gemv import MAX_FUSED_ROWS, ROWS_CANDIDATES, select_fused_rows

    if not timed:
        return dict.fromkeys(projections, ROWS_CANDIDATES[0]), range(2, MAX_FUSED_ROWS + 1)
    configs = {}
    fused_us = dict.fromkeys(FUSED_ROWS_LADDER, 0.0)
    unfused_us = dict.fromkeys(FUSED_ROWS_LADDER, 3 * FUSED_LAUNCH_US)
    for name, (proj, fusion) in projections.items():
        configs[name], timings = select_fused_rows(
            proj.weight, proj.bias, proj.method.kernels.product, FUSED_ROWS_LADDER, **fusion
        )
        for rows, (fused_ms, plain_ms) in timings.items():
            fused_us[rows] += fused_ms * 1e3
            unfused_us[rows] += plain_ms * 1e3
    wins = [fused_us[rows] < unfused_us[rows] for rows in FUSED_ROWS_LADDER]
    chosen = winning_rows(FUSED_ROWS_LADDER, wins, smallest=2)
    logger.info(
        "fused decode layer by rows: %s -> %s",
        ", ".join(f"{rows}: {fused_us[rows]:.1f} vs {unfused_us[rows]:.1f} us" for rows in FUSED_ROWS_LADDER),
        f"{chosen.start}-{chosen.stop - 1} rows" if chosen else "one row only",
    )
    return configs, chosen


def rows_from_one(ladder: Sequence[int], wins: Sequence[bool]) -> range:
    """The step sizes from one row up to the last `ladder` size of the run of wins that starts at the
    first (a kernel that serves every batch up to its largest size: the FP8 GEMV); empty where the first
    size loses."""
    leading = next((i for i, won in enumerate(wins) if not won), len(wins))
    return range(1, ladder[leading - 1] + 1) if leading else range(0)


def winning_rows(ladder: Sequence[int], wins: Sequence[bool], smallest: int) -> range:
    """The step sizes the longest run of winning `ladder` sizes covers (of equally long runs, the one
    at the larger sizes): from just past the size before the run (`smallest` at the start) to the run's
    last size; empty where nothing wins."""
    best, start = (0, 0), None
    for i, won in enumerate([*wins, False]):
        if won and start is None:
            start = i
        elif not won and start is not None:
            best = max(best, (i - start, start))
            start = None
    length, first = best
    if not length:
        return range(0)
    low = ladder[first - 1] + 1 if first else smallest
    return range(low, ladder[first + length - 1] + 1)


def _int4_fused_gemv_family() -> tuple[Callable, Sequence, Callable]:
    """As `_fused_gemv_family`, for INT4 layers: timed against each layer's own unfused INT4 GEMV."""
    from tensorjet.kernels import int4_fused_gemv as family

    def select(proj: Linear, fusion: dict) -> tuple:
        kernels = proj.method.kernels
        plain = kernels.small_batch or kernels.dense
        return family.select_int4_fused_gemv(proj.method.weight, proj.bias, plain, **fusion)

    return select, family.CANDIDATES, family.int4_fused_gemv


def _fused_gemv_family(fp8: bool) -> tuple[Callable, Sequence, Callable]:
    """(select(projection, fusion) -> (config, timings), the candidate configs, the fused kernel)."""
    if fp8:
        from tensorjet.kernels import fp8_fused_gemv as family

        def select(proj: Linear, fusion: dict) -> tuple:
            return family.select_fp8_fused_gemv(
                proj.weight, proj.weight_scale, proj.bias, proj.input_scale, **fusion
            )

        return select, family.CANDIDATES, family.fp8_fused_gemv
    from tensorjet.kernels import fused_gemv as family

    def select(proj: Linear, fusion: dict) -> tuple:
        return family.select_fused_gemv(proj.weight, proj.bias, **fusion)

    return select, family.CANDIDATES, family.fused_gemv
