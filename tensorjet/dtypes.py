"""How KV-cache dtypes store values: shared by the attention layers and the kernels that write the cache.

A leaf module: it imports nothing from tensorjet, so every layer of the package may use it.
"""

from __future__ import annotations

import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == torch.float8_e4m3fn


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """Keys/values as the cache stores them: an FP8 cache saturates at +-448 (no scale) and rounds to
    nearest even; any other cache dtype is a plain cast."""
    if is_fp8(cache_dtype):
        return x.clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)
    return x.to(cache_dtype)
