"""Triton GPU kernels: paged-KV attention (decode + extend), KV-cache writes, and their references.

Importing this package needs `triton`; the rest of tensorjet does not. Kernels know tensors only: the
attention backend that drives them per step is `tensorjet.layers.triton_attention`.
"""

from tensorjet.kernels.decode_attention import choose_num_splits, decode_attention
from tensorjet.kernels.extend_attention import extend_attention
from tensorjet.kernels.store_kv import store_kv

__all__ = [
    "choose_num_splits",
    "decode_attention",
    "extend_attention",
    "store_kv",
]
