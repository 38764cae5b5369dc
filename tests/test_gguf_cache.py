"""The GGUF conversion cache: the first start converts the bundled GGUF into a cache entry and later
starts read only the entry, with the config, tokenizer and bit-identical weights of reading the GGUF
directly through transformers. An entry belongs to the file's content (hashed again only when the
file changed), is rebuilt when broken, and is skipped (with one warning) where the cache cannot be
written."""

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import tiny_gguf as tiny
import torch
import transformers
from safetensors import safe_open

from tensorjet.layers.rotary import rope_parameters
from tensorjet.models import cache as on_disk
from tensorjet.models import gguf_cache, gguf_convert, gguf_names
from tensorjet.models.gguf_reader import GGUFFile
from tensorjet.models.llama import head_dim_of, kv_heads_of, max_positions_of
from tensorjet.models.loader import iter_weights, load_tokenizer, resolve_model
from tensorjet.models.model_config import ModelConfig
from tensorjet.models.tokenizer import FastTokenizer

# The config fields the model is built from.
MODEL_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
)
TEXTS = ["The capital of France is", "  héllo\twörld 123 <|im_start|>user\n", "def f(x):\n    return x"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TENSORJET_CACHE", str(root))
    return root


@pytest.fixture
def unwritable_cache(tmp_path, monkeypatch) -> Path:
    """A cache root below a plain file: no directory can be made there (not even by root)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("TENSORJET_CACHE", str(blocker / "cache"))
    return blocker / "cache"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Stand in for the conversion (small files, no GGUF parse) and record each call."""
    calls = []

    def convert(gguf_path: Path, out: Path) -> None:
        calls.append(gguf_path)
        (out / "config.json").write_text("{}")
        (out / gguf_convert.WEIGHTS_FILE).write_bytes(b"stand-in weights")

    monkeypatch.setattr(gguf_cache, "convert", convert)
    return calls


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORJET_CACHE", str(tmp_path / "tj"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert on_disk.cache_root() == tmp_path / "tj"
    monkeypatch.delenv("TENSORJET_CACHE")
    assert on_disk.cache_root() == tmp_path / "xdg" / "tensorjet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert on_disk.cache_root() == tmp_path / "home" / ".cache" / "tensorjet"


def test_an_entry_belongs_to_the_files_content(cache, conversions, gguf_path, tmp_path):
    entry = gguf_cache.converted(gguf_path)
    assert entry is not None and entry.parent == cache / "gguf" and conversions == [gguf_path]
    assert sorted(p.name for p in entry.iterdir()) == ["config.json", "conversion.json", "model.safetensors"]
    assert [p.name for p in entry.parent.iterdir()] == [entry.name], "no staging directory is left"
    assert gguf_cache.converted(gguf_path) == entry and len(conversions) == 1

    copy = tmp_path / "copy.gguf"
    shutil.copyfile(gguf_path, copy)
    assert gguf_cache.converted(copy) == entry and len(conversions) == 1, "same bytes, same entry"
    with open(copy, "ab") as f:
        f.write(b"\0")
    changed = gguf_cache.converted(copy)
    assert changed not in (None, entry) and conversions == [gguf_path, copy]
    assert gguf_cache.converted(gguf_path) == entry and len(conversions) == 2


def test_a_file_is_hashed_again_only_once_it_changed(cache, conversions, gguf_path, tmp_path, monkeypatch):
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(gguf_path, copy)
    hashed = []
    sha256 = on_disk.sha256_of
    monkeypatch.setattr(on_disk, "sha256_of", lambda path: hashed.append(path) or sha256(path))
    entry = gguf_cache.converted(copy)
    assert gguf_cache.converted(copy) == entry and hashed == [copy], "the digest is remembered"

    before = copy.stat()
    with open(copy, "r+b") as f:  # the same size, another byte
        f.seek(100)
        f.write(bytes([f.read(1)[0] ^ 1]))
    # a file system with a coarse clock could give the edit the same time
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    changed = gguf_cache.converted(copy)
    assert hashed == [copy, copy] and changed not in (None, entry)

    records = list((cache / "digests").iterdir())
    assert len(records) == 1
    records[0].write_text('{"stamp": ')  # a torn record is hashed past, then rewritten
    assert gguf_cache.converted(copy) == changed and len(hashed) == 3
    assert gguf_cache.converted(copy) == changed and len(hashed) == 3


def _set_manifest(entry: Path, **changes) -> None:
    manifest = json.loads((entry / gguf_cache.MANIFEST_FILE).read_text())
    (entry / gguf_cache.MANIFEST_FILE).write_text(json.dumps(manifest | changes))


BREAKAGES = {
    "weights deleted": lambda entry: (entry / gguf_convert.WEIGHTS_FILE).unlink(),
    "weights truncated": lambda entry: (entry / gguf_convert.WEIGHTS_FILE).write_bytes(b"stand-in"),
    "manifest missing": lambda entry: (entry / gguf_cache.MANIFEST_FILE).unlink(),
    "manifest corrupt": lambda entry: (entry / gguf_cache.MANIFEST_FILE).write_text('{"format": 1, "fi'),
    "older transformers": lambda entry: _set_manifest(entry, transformers="4.46.0"),
    "older conversion": lambda entry: _set_manifest(entry, format=gguf_cache.CONVERSION_FORMAT - 1),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_entry_is_rebuilt(cache, conversions, gguf_path, breakage):
    entry = gguf_cache.converted(gguf_path)
    BREAKAGES[breakage](entry)
    assert gguf_cache.converted(gguf_path) == entry and len(conversions) == 2
    assert (entry / gguf_convert.WEIGHTS_FILE).read_bytes() == b"stand-in weights"
    assert gguf_cache.converted(gguf_path) == entry and len(conversions) == 2


def test_an_unwritable_cache_is_skipped_with_one_warning(unwritable_cache, conversions, gguf_path, caplog):
    with caplog.at_level(logging.INFO, logger=gguf_cache.__name__):
        assert gguf_cache.converted(gguf_path) is None
    assert conversions == [] and not unwritable_cache.exists()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "cannot write the GGUF cache" in caplog.text and gguf_path.name in caplog.text


def test_a_start_without_a_writable_cache_reads_the_file_and_warns_once(
    unwritable_cache, tiny_gguf, monkeypatch, caplog
):
    """Config and tokenizer come from transformers' reading of the file (stood in for here)."""
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: ("config", a, k))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: ("tokenizer", a, k))
    with caplog.at_level(logging.INFO, logger=gguf_cache.__name__):
        source = resolve_model(str(tiny_gguf))
        tokenizer = load_tokenizer(source)
    assert source.converted is None and source.hf_config[0] == "config"
    assert tokenizer == ("tokenizer", (tiny_gguf.parent,), {"gguf_file": tiny_gguf.name})
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_a_conversion_that_cannot_be_written_leaves_nothing(cache, gguf_path, monkeypatch, caplog):
    def disk_full(gguf_path: Path, out: Path) -> None:
        (out / gguf_convert.WEIGHTS_FILE).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_cache, "convert", disk_full)
    with caplog.at_level(logging.WARNING, logger=gguf_cache.__name__):
        assert gguf_cache.converted(gguf_path) is None
    assert "No space left on device" in caplog.text
    assert list((cache / "gguf").iterdir()) == [], "the half-written staging directory is removed"


def _refuse(*args, **kwargs):
    raise AssertionError("the GGUF was parsed or converted again")


def test_a_conversion_holds_the_files_tensors_config_and_tokenizer(cache, tiny_gguf, bundled_tokenizer_dir):
    """Every block format tensorjet dequantizes itself, against gguf's own dequantization."""
    entry = gguf_cache.converted(tiny_gguf)
    file = GGUFFile.open(tiny_gguf)
    heads = {"q_proj": tiny.HEADS, "k_proj": tiny.KV_HEADS}
    with safe_open(str(entry / gguf_convert.WEIGHTS_FILE), framework="pt") as weights:
        assert sorted(weights.keys()) == sorted(gguf_names.hf_name(t.name) for t in file.tensors)
        for tensor in file.tensors:
            name = gguf_names.hf_name(tensor.name)
            values = np.array(gguf.quants.dequantize(file.raw(tensor), tensor.ggml_type), dtype=np.float32)
            theirs = torch.from_numpy(values.reshape(tensor.shape))
            projection = name.split(".")[-2]
            if projection in heads:  # llama.cpp's rotary layout, back to HF's
                d = theirs.shape[1]
                theirs = theirs.reshape(heads[projection], -1, 2, d).transpose(1, 2).reshape(-1, d)
            ours = weights.get_tensor(name)
            assert ours.dtype == torch.float32 and torch.equal(ours, theirs), name
    assert {t.ggml_type for t in file.tensors} == {int(f) for f in tiny.FORMATS.values()}

    config = json.loads((entry / "config.json").read_text())
    assert config | {"_model_name_or_path": None} == {
        "model_type": "llama",
        "_model_name_or_path": None,
        "max_position_embeddings": 256,
        "num_hidden_layers": tiny.LAYERS,
        "intermediate_size": tiny.FFN,
        "hidden_size": tiny.HIDDEN,
        "head_dim": tiny.HIDDEN // tiny.HEADS,
        "rope_theta": 10000.0,
        "num_attention_heads": tiny.HEADS,
        "num_key_value_heads": tiny.KV_HEADS,
        "rms_norm_eps": pytest.approx(1e-5),
        "vocab_size": 49152,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unk_token_id": 0,
        "pad_token_id": 2,
        "tie_word_embeddings": True,
    }
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (entry / name).read_text() == (bundled_tokenizer_dir / name).read_text(), name


def test_a_second_start_reads_only_the_cache(cache, tiny_gguf, monkeypatch):
    first = resolve_model(str(tiny_gguf))
    assert first.converted is not None
    monkeypatch.setattr(gguf.GGUFReader, "__init__", _refuse)
    monkeypatch.setattr(GGUFFile, "open", _refuse)
    monkeypatch.setattr(gguf_cache, "convert", _refuse)
    monkeypatch.setattr(on_disk, "sha256_of", _refuse)
    second = resolve_model(str(tiny_gguf))
    assert second.converted == first.converted and isinstance(second.hf_config, ModelConfig)
    assert isinstance(load_tokenizer(second), FastTokenizer)
    assert len(list(iter_weights(second))) == 2 + 9 * tiny.LAYERS
    assert set(second.gguf_tensor_types) == {n.removesuffix(".weight") for n, _ in iter_weights(second)}


# Slow: converts the bundled GGUF and reads it directly for the comparison (~30 s on 2 CPU cores).
@pytest.mark.slow
def test_later_starts_read_only_the_cache_and_equal_the_direct_load(cache, unwritable_cache, monkeypatch):
    monkeypatch.setenv("TENSORJET_CACHE", str(cache))
    first = resolve_model(None)
    assert first.converted is not None and first.converted.parent == cache / "gguf"

    with monkeypatch.context() as no_parsing:
        no_parsing.setattr(gguf.GGUFReader, "__init__", _refuse)
        no_parsing.setattr(GGUFFile, "open", _refuse)
        no_parsing.setattr(gguf_cache, "convert", _refuse)
        no_parsing.setattr(on_disk, "sha256_of", _refuse)
        cached = resolve_model(None)
        cached_tokenizer = load_tokenizer(cached)
        cached_weights = list(iter_weights(cached))
    assert cached.converted == first.converted and isinstance(cached_tokenizer, FastTokenizer)

    monkeypatch.setenv("TENSORJET_CACHE", str(unwritable_cache))
    direct = resolve_model(None)
    assert direct.kind == "gguf" and direct.converted is None
    direct_tokenizer = load_tokenizer(direct)
    direct_weights = list(iter_weights(direct))

    assert [n for n, _ in cached_weights] == [n for n, _ in direct_weights]
    for (name, ours), (_, theirs) in zip(cached_weights, direct_weights):
        assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs), name

    # The entry's config.json is the config transformers reads from the GGUF, and tensorjet reads the
    # same model from it.
    config = transformers.AutoConfig.from_pretrained(cached.converted).to_dict()
    direct_config = direct.hf_config.to_dict()
    assert config.pop("_name_or_path") != direct_config.pop("_name_or_path")
    assert config == direct_config
    ours, theirs = cached.hf_config, direct.hf_config
    for read in (head_dim_of, max_positions_of, kv_heads_of, rope_parameters):
        assert read(ours) == read(theirs), read.__name__
    for name in MODEL_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name

    assert cached_tokenizer.backend_tokenizer.to_str() == direct_tokenizer.backend_tokenizer.to_str()
    assert cached_tokenizer.special_tokens_map == direct_tokenizer.special_tokens_map
    assert cached_tokenizer.chat_template == direct_tokenizer.chat_template is not None
    for text in TEXTS:
        assert cached_tokenizer.encode(text) == direct_tokenizer.encode(text), text
    chat = [{"role": "user", "content": TEXTS[0]}]
    assert cached_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        direct_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )


def test_weights_that_do_not_fit_on_the_disk_are_not_written(gguf_path, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_convert.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**6))
    gguf = GGUFFile.open(gguf_path)
    with pytest.raises(OSError, match=r"the fp32 weights need 0\.5 GB, 0\.0 GB free"):
        gguf_convert.write_safetensors(tmp_path / "model.safetensors", gguf, gguf_convert.hf_config(gguf))
    assert not (tmp_path / "model.safetensors").exists()
