"""A CPU start imports only what it runs: `import tensorjet` nothing heavy, and `tensorjet generate` on a
GGUF whose cache entry exists neither transformers nor the server's or the benchmarks' libraries
(jinja2 only to render a chat template). The engine runs torch on the cores the process may use."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tensorjet.models import gguf_cache
from tensorjet.runtime import cpu_threads

# What a CPU start of the command must not import: transformers (~2.5 s with its config classes), the
# HTTP server's and the benchmarks' libraries, and the Triton compiler.
NOT_IMPORTED = {"transformers", "fastapi", "uvicorn", "pydantic", "xgrammar", "matplotlib", "triton"}
PRINT_MODULES = "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"


def _imported(code: str) -> list[set[str]]:
    """The top-level modules loaded each time `code` (in a fresh interpreter) prints them, and at its end."""
    result = subprocess.run(
        [sys.executable, "-c", f"import json, sys\n{code}\n{PRINT_MODULES}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return [set(json.loads(line)) for line in result.stdout.splitlines() if line.startswith("[")]


def test_import_tensorjet_imports_nothing_heavy():
    (loaded,) = _imported("import tensorjet")
    assert not loaded & (NOT_IMPORTED | {"torch", "numpy", "tokenizers"})


def test_generate_on_a_warm_cache_imports_no_transformers(tiny_gguf):
    """The tiny GGUF goes through the same path as the bundled one: its cache entry, converted here."""
    assert gguf_cache.converted(tiny_gguf) is not None  # into the session's cache (TENSORJET_CACHE)
    generate = ["generate", "The capital of France is", "--model", str(tiny_gguf), "--max_tokens", "3"]
    code = f"""
from tensorjet.cli import main
assert main({generate!r}) == 0
{PRINT_MODULES}
assert main({[*generate, "--chat_template"]!r}) == 0"""
    plain, with_template = _imported(code)
    assert {"torch", "tokenizers"} <= plain
    assert not plain & (NOT_IMPORTED | {"jinja2", "gguf"})
    assert not with_template & NOT_IMPORTED and "jinja2" in with_template


@pytest.mark.parametrize("omp", [None, "1"])
def test_torch_runs_on_the_cores_this_process_may_use(monkeypatch, omp):
    """Set in every case: a thread's OpenMP count starts at the process's default, not another's."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    cpu_threads.use_available_cores()
    cpu_threads.use_available_cores(processes=2)
    assert calls == ([1, 1] if omp else [3, 1])


def test_a_cpu_engine_sets_its_threads(tiny_gguf, monkeypatch):
    from tensorjet import LLM
    from tensorjet.runtime import parallel

    calls = []
    monkeypatch.setattr(parallel, "use_available_cores", lambda: calls.append("cpu"))
    llm = LLM(str(tiny_gguf), device="cpu")
    llm.shutdown()
    assert calls == ["cpu"]
