"""A server's memory stays flat under load: `tensorjet serve` makes its CPU KV pool resident at start (an
`LLM` alone leaves the pool's pages to first use), and the allocator settings it applies before building
the engine take effect: oneDNN builds again a product shape that more than its cache capacity of others
pushed out, and glibc makes no more malloc arenas than allowed however many threads allocate."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from serving import make_tiny_chat_model

from tensorjet import LLM
from tensorjet.serve import allocators
from tensorjet.serve import cli as serve_cli

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


def run_python(code: str, *args: str, env: dict[str, str]) -> str:
    """What `code` prints, run in a fresh interpreter."""
    argv = [sys.executable, "-c", textwrap.dedent(code), *args]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> str:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), 256)


@linux_glibc
def test_the_kv_pool_is_resident_once_made_so_and_not_before(tiny_chat_model):
    """In a fresh interpreter: memory that earlier tests freed may come back from the heap already
    resident, so only a process that has freed nothing shows what a start itself touches."""
    code = f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_server_memory import resident_fraction
        from tensorjet import LLM, SamplingParams

        # 131072 tokens x 2 layers x (k, v) x 2 heads x 16 x 4 bytes: a 64 MiB pool
        llm = LLM(sys.argv[1], load_format="dummy", device="cpu", kv_cache_max_tokens=131072)
        pool = llm.engine.runner.kv_cache
        before = resident_fraction(pool)
        llm.make_kv_cache_resident()
        after = resident_fraction(pool)
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        llm.shutdown()
        print(pool.nbytes, before, after, len(out[0].outputs[0].token_ids))
    """
    nbytes, before, after, tokens = run_python(code, tiny_chat_model, env=dict(os.environ)).split()
    assert int(nbytes) == 64 * 2**20
    assert float(before) < 0.05  # an LLM's start pays for no page it has not used
    assert float(after) == 1.0
    assert int(tokens) == 4


def test_serve_sets_the_allocators_before_the_engine_and_owns_its_kv_pool_before_serving(
    tiny_chat_model, monkeypatch
):
    events: list[str] = []
    monkeypatch.setattr(allocators, "configure_server_allocators", lambda: events.append("allocators"))
    built = LLM.__init__

    def build(self, *args, **kwargs):
        events.append("engine")
        built(self, *args, **kwargs)

    monkeypatch.setattr(LLM, "__init__", build)
    monkeypatch.setattr(LLM, "make_kv_cache_resident", lambda self: events.append("resident"))
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: events.append("serving"))
    argv = ["serve", tiny_chat_model, "--load_format", "dummy", "--device", "cpu"]
    assert serve_cli.main(argv) == 0
    assert events == ["allocators", "engine", "resident", "serving"]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_onednn_builds_a_shape_again_once_its_cache_capacity_of_others_came_after_it():
    """In a fresh process (oneDNN reads its capacity once): the 1-row product, 9 other row counts, then 1
    row again: built anew at capacity 8 (torch's default, 1024, keeps it)."""
    code = """
        import torch
        from tensorjet.layers.linear import onednn_linear
        from tensorjet.serve.allocators import bound_onednn_caches

        bound_onednn_caches(8)
        weight = torch.randn(64, 32)
        with torch.inference_mode():
            for rows in [1, *range(2, 11), 1]:
                onednn_linear(torch.randn(rows, 32), weight)
    """
    env = {k: v for k, v in os.environ.items() if k not in allocators.ONEDNN_CACHE_VARIABLES}
    verbose = run_python(code, env={**env, "ONEDNN_VERBOSE": "2"})
    creations = [line for line in verbose.splitlines() if ",primitive,create" in line]
    one_row = [line.split(",")[3] for line in creations if ",mb1ic32oc64," in line]
    assert one_row == ["create:cache_miss", "create:cache_miss"], verbose


@linux_glibc
def test_at_most_the_allowed_malloc_arenas_however_many_threads_allocate():
    """Six threads alive at once each allocate: glibc gives each its own arena unless limited."""
    code = """
        import ctypes, sys, tempfile, threading
        from tensorjet.serve.allocators import limit_malloc_arenas

        if sys.argv[1] == "limited":
            limit_malloc_arenas(2)
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.fopen.restype = ctypes.c_void_p
        all_allocated = threading.Barrier(6)

        def allocate():
            libc.malloc(1000)
            all_allocated.wait()

        threads = [threading.Thread(target=allocate) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with tempfile.NamedTemporaryFile(suffix=".xml") as report:
            out = libc.fopen(report.name.encode(), b"w")
            libc.malloc_info(0, ctypes.c_void_p(out))
            libc.fclose(ctypes.c_void_p(out))
            print(open(report.name).read().count("<heap nr="))
    """
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    counts = {mode: int(run_python(code, mode, env=env)) for mode in ("limited", "default")}
    assert counts == {"limited": 2, "default": 7}  # the main thread's arena and one per thread
