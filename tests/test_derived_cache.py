"""What the linear layers derive from a checkpoint once it is loaded is kept in the cache
(`tensorjet.models.derived_cache`): a second start takes a GGUF's packed int4 weights, their bf16
copies and the LM head's int8 rows from it, memory-mapped and used in place, without packing, and
computes bit-identical outputs; an entry made under another torch or CPU capability, cut short,
unreadable or not fitting the model is made again, and a cache that cannot be written only costs the
packing."""

import json
import logging
from pathlib import Path

import pytest
import torch

from tensorjet import LLM, SamplingParams
from tensorjet.layers.linear import Linear
from tensorjet.models import derived_cache
from tensorjet.models.llama import LlamaForCausalLM
from tensorjet.models.loader import iter_weights, resolve_model
from tensorjet.quant import gguf

RUNS_AS = {"weights": "gguf (gguf)", "dtype": "torch.float32", "tp": [0, 1]}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TENSORJET_CACHE", str(root))
    return root


@pytest.fixture
def packings(monkeypatch) -> list[str]:
    """Records every packing of blocks and quantization of the head's rows (and still does them)."""
    calls = []
    for name in ("pack_blocks", "quantize_rows"):
        real = getattr(gguf, name)
        monkeypatch.setattr(gguf, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    return calls


def refuse_packing(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the blocks were packed (or the head quantized) again")

    monkeypatch.setattr(gguf, "pack_blocks", refuse)
    monkeypatch.setattr(gguf, "quantize_rows", refuse)


def load_model(path: Path) -> LlamaForCausalLM:
    """The model as the engine loads a 4-bit GGUF on the CPU: blocks, int8 head, the derived cache."""
    source = resolve_model(str(path))
    model = LlamaForCausalLM(
        source.hf_config, linear_method=gguf.GgufLinearMethod, head_method=gguf.GgufHeadMethod
    )
    derived_cache.load_weights(model, iter_weights(source, gguf_blocks=True), source, RUNS_AS)
    return model


def derived_of(model: LlamaForCausalLM) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: m.method.derived_tensors(m)
        for name, m in model.named_modules()
        if isinstance(m, Linear) and m.method.derived_layout(m)
    }


def the_entry(cache: Path) -> Path:
    (entry,) = (cache / "derived").iterdir()
    return entry


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds the tensor's data (None: anonymous memory), from /proc/self/maps."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # range, permissions, offset, device, inode[, path]
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else None
    return None


def test_a_second_start_maps_the_derived_tensors_and_computes_the_same(cache, tiny_gguf_blocks, monkeypatch):
    fresh = load_model(tiny_gguf_blocks)
    entry = the_entry(cache)
    refuse_packing(monkeypatch)
    cached = load_model(tiny_gguf_blocks)

    made, taken = derived_of(fresh), derived_of(cached)
    assert set(made) == set(taken) and "lm_head" in made and len(made) == 1 + 4 * 2  # head, 4 per layer
    for layer, tensors in made.items():
        for name, tensor in tensors.items():
            assert torch.equal(taken[layer][name], tensor), f"{layer}.{name}"
            assert mapped_file(taken[layer][name]) == str(entry / derived_cache.TENSORS_FILE)
            assert taken[layer][name].data_ptr() % derived_cache.DATA_ALIGNMENT == 0
    assert not hasattr(cached.layers[0].self_attn.qkv_proj, "scales"), "the blocks are not loaded"
    assert mapped_file(cached.embed_tokens.weight) is not None, "the embedding is used where it is mapped"
    torch.manual_seed(0)
    for rows in (1, 3, 8):  # the int4 kernel and the int8 head, then the bf16 GEMMs
        x = torch.randn(rows, fresh.config.hidden_size)
        for (name, ours), (_, theirs) in zip(fresh.named_modules(), cached.named_modules()):
            if isinstance(ours, Linear):
                xi = x if ours.input_size == x.shape[1] else torch.randn(rows, ours.input_size)
                assert torch.equal(ours(xi), theirs(xi)), (name, rows)


def test_an_engine_starts_from_the_cache_without_packing(cache, tiny_gguf_blocks, monkeypatch):
    """The engine's own load: the second engine packs nothing and samples the same tokens with the
    same log-probabilities."""
    prompts = ["The capital of France is", "def f(x):"]
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)

    def run() -> list:
        llm = LLM(str(tiny_gguf_blocks), device="cpu", kv_cache_max_tokens=256)
        try:
            assert llm.engine.runner.weight_format == "gguf (gguf)"
            outputs = llm.generate(prompts, params, use_tqdm=False)
            return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]
        finally:
            llm.shutdown()

    first = run()
    refuse_packing(monkeypatch)
    assert run() == first


def test_loading_and_deriving_run_on_one_thread(cache, tiny_gguf_blocks, monkeypatch):
    """Memory-bound work made once: on a busy CPU a second thread only waits (`models.threads`)."""
    seen = []
    real = gguf.pack_blocks
    monkeypatch.setattr(
        gguf, "pack_blocks", lambda *args: seen.append(torch.get_num_threads()) or real(*args)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        load_model(tiny_gguf_blocks)
        assert torch.get_num_threads() == 2, "the engine's threads are back for its steps"
    finally:
        torch.set_num_threads(threads)
    assert seen == [1] * 4 * 2


def _set_manifest(entry: Path, **fields) -> None:
    manifest = entry / derived_cache.MANIFEST_FILE
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | fields))


def _garble_header(entry: Path) -> None:
    file = entry / derived_cache.TENSORS_FILE
    data = bytearray(file.read_bytes())
    data[8:16] = b"not json"
    file.write_bytes(bytes(data))


def _rename_a_tensor(entry: Path) -> None:
    """Same size, valid, but a tensor the model does not have (and lacks one it has)."""
    file = entry / derived_cache.TENSORS_FILE
    data = file.read_bytes()
    file.write_bytes(data.replace(b'"lm_head.codes"', b'"lm_head.kodes"', 1))


BREAKAGES = {
    "another torch": lambda entry: _set_manifest(entry, torch="2.0.0"),
    "another CPU capability": lambda entry: _set_manifest(entry, cpu_capability="AVX2"),
    "an older cache format": lambda entry: _set_manifest(entry, format=derived_cache.CACHE_FORMAT - 1),
    "cut short": lambda entry: (entry / derived_cache.TENSORS_FILE).write_bytes(b"half"),
    "an unreadable header": _garble_header,
    "tensors the model does not have": _rename_a_tensor,
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_stale_or_broken_entry_is_made_again(cache, tiny_gguf_blocks, packings, breakage):
    expected = derived_of(load_model(tiny_gguf_blocks))
    entry = the_entry(cache)
    made = len(packings)
    assert made == 1 + 4 * 2
    BREAKAGES[breakage](entry)

    rebuilt = derived_of(load_model(tiny_gguf_blocks))
    assert len(packings) == 2 * made, "packed again"
    assert the_entry(cache) == entry, "in its place"
    manifest = json.loads((entry / derived_cache.MANIFEST_FILE).read_text())
    assert manifest["torch"] == torch.__version__
    assert manifest["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for layer, tensors in expected.items():
        assert all(torch.equal(rebuilt[layer][n], t) for n, t in tensors.items()), layer

    derived_of(load_model(tiny_gguf_blocks))
    assert len(packings) == 2 * made, "the entry made again serves the next start"


def test_an_unwritable_cache_costs_only_the_packing(cache, tiny_gguf_blocks, packings, monkeypatch, caplog):
    blocker = cache.parent / "not-a-directory"  # no directory can be made below a plain file
    blocker.write_text("")
    monkeypatch.setattr(derived_cache, "cache_root", lambda: blocker / "cache")
    with caplog.at_level(logging.WARNING, logger=derived_cache.__name__):
        first, second = derived_of(load_model(tiny_gguf_blocks)), derived_of(load_model(tiny_gguf_blocks))
    assert "cannot write the derived weights" in caplog.text and len(packings) == 2 * (1 + 4 * 2)
    for layer, tensors in first.items():
        assert all(torch.equal(second[layer][n], t) for n, t in tensors.items()), layer
