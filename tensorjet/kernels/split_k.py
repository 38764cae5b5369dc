"""Split-K in one launch: several programs per output tile each sum a slice of K into fp32 scratch,
and the last of them to arrive (an atomic counter per tile) adds the slices in a fixed order and runs
the epilogue. The result does not depend on which program came last, and no second launch reduces.
Used by the FP8 and INT4 GEMVs, whose decode-sized products have too few output tiles to fill a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["reduce_row_slices", "reduce_slices", "reduce_tile_slices", "split_k_buffers"]


@triton.jit
def arrive_last(counter_ptr, SPLIT_K: tl.constexpr):
    """Split-K: count this program in at its tile's counter once its slice sums are stored; True for
    the tile's last program to arrive, which also resets the counter to zero for the next launch. The
    barrier puts every thread's stores before the increment; the increment is acquire-release, so
    the last program sees every other slice's stores."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    tl.store(counter_ptr, 0, mask=last)
    return last


@triton.jit
def sum_slices(partial_ptr, slice_stride, offs, mask, last, SPLIT_K: tl.constexpr):
    """Split-K: the sum of all SPLIT_K slices at `offs` (slice s at partial_ptr + s * slice_stride),
    added in slice order so the result does not depend on which program arrived last; zeros where
    `mask` is off or this program is not the `last`. Read past L1, which may hold no other SM's stores."""
    # (last broadcast by an add: the interpreter rejects a scalar's comparison in a vector mask)
    mask = mask & ((tl.zeros(offs.shape, dtype=tl.int32) + last.to(tl.int32)) != 0)
    total = tl.zeros(offs.shape, dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(partial_ptr + s * slice_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return total, mask


@triton.jit
def reduce_row_slices(
    partial_ptr, arrivals_ptr, y, y_up, offs_n, n_mask, N, SILU_MUL: tl.constexpr, SPLIT_K: tl.constexpr
):
    """A one-row product split over K (slice program_id(1) of row block program_id(0)): this slice's sums
    `y` (and `y_up`, the up rows with SILU_MUL) to scratch; returns the sums of all slices and the
    mask of what to store, empty but in the block's last program to arrive."""
    rows = 2 * N if SILU_MUL else N
    tl.store(partial_ptr + tl.program_id(1) * rows + offs_n, y, mask=n_mask)
    if SILU_MUL:
        tl.store(partial_ptr + tl.program_id(1) * rows + N + offs_n, y_up, mask=n_mask)
    last = arrive_last(arrivals_ptr + tl.program_id(0), SPLIT_K)
    y_up, _ = sum_slices(partial_ptr + N, rows, offs_n, n_mask & SILU_MUL, last, SPLIT_K)
    y, n_mask = sum_slices(partial_ptr, rows, offs_n, n_mask, last, SPLIT_K)
    return y, y_up, n_mask


@triton.jit
def reduce_slices(partial_ptr, counter_ptr, acc, offs, mask, slice_stride, SPLIT_K: tl.constexpr):
    """This program's slice sums `acc` of a tile split over K (slice program_id(2)) to scratch at
    `offs` (slice s at partial_ptr + s * slice_stride); returns the sums of all slices and the mask of
    what to store, empty but in the tile's last program to arrive at `counter_ptr`."""
    tl.store(partial_ptr + tl.program_id(2) * slice_stride + offs, acc, mask=mask)
    last = arrive_last(counter_ptr, SPLIT_K)
    return sum_slices(partial_ptr, slice_stride, offs, mask, last, SPLIT_K)


@triton.jit
def reduce_tile_slices(
    partial_ptr, arrivals_ptr, acc, offs_m, offs_n, m_mask, n_mask, M, N, SPLIT_K: tl.constexpr
):
    """A [BLOCK_N, BLOCK_M] tile of y^T split over K (slice program_id(2) of tile (program_id(0),
    program_id(1))): this slice's sums to scratch [SPLIT_K, M, N]; returns the sums of all slices and
    the mask of output columns to store, empty but in the tile's last program to arrive."""
    offs_mn = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
    mn_mask = m_mask[None, :] & n_mask[:, None]
    counter_ptr = arrivals_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    acc, mn_mask = reduce_slices(partial_ptr, counter_ptr, acc, offs_mn, mn_mask, M * N, SPLIT_K)
    return acc, tl.max(mn_mask.to(tl.int32), 1) != 0


def split_k_buffers(
    out: torch.Tensor, split_k: int, floats: int, counters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scratch, arrival counters) for a launch split `split_k` ways (`split_k_scratch`); without a split
    the kernel reads neither, and gets `out` for both pointers."""
    if split_k == 1:
        return out, out
    return split_k_scratch(out.device, floats, counters)


_scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_k_scratch(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 scratch for split-K partial sums and the zeroed arrival counters, one pair per device
    shared by every split-K launch: launches on a stream run one after another (a PDL launch touches
    them only after waiting for the one before), and each launch leaves its counters at zero. Grown
    outside CUDA graph capture only: each shape runs eagerly (kernel selection, warm-up) before it."""
    partial, arrivals = _scratch.get(device, (None, None))
    if partial is None or partial.numel() < floats or arrivals.numel() < counters:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the split-K scratch must be sized before CUDA graph capture")
        floats = max(floats, 0 if partial is None else partial.numel())
        counters = max(counters, 0 if arrivals is None else arrivals.numel())
        partial = torch.empty(floats, dtype=torch.float32, device=device)
        arrivals = torch.zeros(counters, dtype=torch.int32, device=device)
        _scratch[device] = (partial, arrivals)
    return partial, arrivals
