"""Split-K in one launch: several programs per output tile each sum a slice of K into fp32 scratch,
and the last of them to arrive (an atomic counter per tile) adds the slices in a fixed order and runs
the epilogue. The result does not depend on which program came last, and no second launch reduces.
Used by the FP8 and INT4 GEMVs, whose decode-sized products have too few output tiles to fill a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["arrive_last", "split_k_scratch", "sum_slices"]


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
