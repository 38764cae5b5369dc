"""A server's memory stays flat under load: `tensorjet serve` makes its CPU KV pool resident at start (an
`LLM` alone leaves the pool's pages to first use)."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest
import torch
from serving import make_tiny_chat_model

from tensorjet import LLM, SamplingParams

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="reads glibc's and Linux's own accounting",
)


def resident_fraction(tensor: torch.Tensor) -> float:
    """The share of `tensor`'s pages that are in this process's memory (mincore)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr() // page * page
    length = tensor.data_ptr() + tensor.nbytes - start
    pages = -(-length // page)
    flags = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), flags) == 0, ctypes.get_errno()
    return sum(f & 1 for f in flags) / pages


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> str:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), 256)


@linux_glibc
def test_the_kv_pool_is_resident_once_made_so_and_not_before(tiny_chat_model):
    # 131072 tokens x 2 layers x (k, v) x 2 heads x 16 x 4 bytes: a 64 MiB pool
    llm = LLM(tiny_chat_model, load_format="dummy", device="cpu", kv_cache_max_tokens=131072)
    try:
        pool = llm.engine.runner.kv_cache
        assert pool.nbytes == 64 * 2**20
        assert resident_fraction(pool) < 0.05  # an LLM's start pays for no page it has not used
        llm.make_kv_cache_resident()
        assert resident_fraction(pool) == 1.0
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        llm.shutdown()
