"""The GGUF conversion cache: the first start converts the bundled GGUF into a cache entry and later
starts read only the entry, with the config, tokenizer and bit-identical weights of reading the GGUF
directly. An entry belongs to the file's content, is rebuilt when broken, and is skipped (with one
warning) where the cache cannot be written."""

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import torch
import transformers

from tensorjet.models import gguf_cache
from tensorjet.models.loader import iter_weights, load_tokenizer, resolve_model

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
        (out / gguf_cache.WEIGHTS_FILE).write_bytes(b"stand-in weights")

    monkeypatch.setattr(gguf_cache, "_convert", convert)
    return calls


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORJET_CACHE", str(tmp_path / "tj"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_cache.cache_root() == tmp_path / "tj"
    monkeypatch.delenv("TENSORJET_CACHE")
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "tensorjet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert gguf_cache.cache_root() == tmp_path / "home" / ".cache" / "tensorjet"


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


def _set_manifest(entry: Path, **changes) -> None:
    manifest = json.loads((entry / gguf_cache.MANIFEST_FILE).read_text())
    (entry / gguf_cache.MANIFEST_FILE).write_text(json.dumps(manifest | changes))


BREAKAGES = {
    "weights deleted": lambda entry: (entry / gguf_cache.WEIGHTS_FILE).unlink(),
    "weights truncated": lambda entry: (entry / gguf_cache.WEIGHTS_FILE).write_bytes(b"stand-in"),
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
    assert (entry / gguf_cache.WEIGHTS_FILE).read_bytes() == b"stand-in weights"
    assert gguf_cache.converted(gguf_path) == entry and len(conversions) == 2


def test_an_unwritable_cache_is_skipped_with_one_warning(unwritable_cache, conversions, gguf_path, caplog):
    with caplog.at_level(logging.INFO, logger=gguf_cache.__name__):
        assert gguf_cache.converted(gguf_path) is None
    assert conversions == [] and not unwritable_cache.exists()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "cannot write the GGUF cache" in caplog.text and gguf_path.name in caplog.text


def test_a_conversion_that_cannot_be_written_leaves_nothing(cache, gguf_path, monkeypatch, caplog):
    def disk_full(gguf_path: Path, out: Path) -> None:
        (out / gguf_cache.WEIGHTS_FILE).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_cache, "_convert", disk_full)
    with caplog.at_level(logging.WARNING, logger=gguf_cache.__name__):
        assert gguf_cache.converted(gguf_path) is None
    assert "No space left on device" in caplog.text
    assert list((cache / "gguf").iterdir()) == [], "the half-written staging directory is removed"


def _refuse(*args, **kwargs):
    raise AssertionError("the GGUF was parsed or converted again")


# Slow: converts the bundled GGUF and reads it directly for the comparison (~30 s on 2 CPU cores).
@pytest.mark.slow
def test_later_starts_read_only_the_cache_and_equal_the_direct_load(cache, unwritable_cache, monkeypatch):
    monkeypatch.setenv("TENSORJET_CACHE", str(cache))
    first = resolve_model(None)
    assert first.converted is not None and first.converted.parent == cache / "gguf"

    with monkeypatch.context() as no_parsing:
        no_parsing.setattr(gguf.GGUFReader, "__init__", _refuse)
        no_parsing.setattr(gguf_cache, "_convert", _refuse)
        cached = resolve_model(None)
        cached_tokenizer = load_tokenizer(cached)
        cached_weights = list(iter_weights(cached))
    assert cached.converted == first.converted

    monkeypatch.setenv("TENSORJET_CACHE", str(unwritable_cache))
    direct = resolve_model(None)
    assert direct.kind == "gguf" and direct.converted is None
    direct_tokenizer = load_tokenizer(direct)
    direct_weights = list(iter_weights(direct))

    assert [n for n, _ in cached_weights] == [n for n, _ in direct_weights]
    for (name, ours), (_, theirs) in zip(cached_weights, direct_weights):
        assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs), name

    config, direct_config = cached.hf_config.to_dict(), direct.hf_config.to_dict()
    assert config.pop("_name_or_path") != direct_config.pop("_name_or_path")
    assert config == direct_config

    assert type(cached_tokenizer) is type(direct_tokenizer)
    assert cached_tokenizer.backend_tokenizer.to_str() == direct_tokenizer.backend_tokenizer.to_str()
    assert cached_tokenizer.special_tokens_map == direct_tokenizer.special_tokens_map
    assert cached_tokenizer.chat_template == direct_tokenizer.chat_template is not None
    for text in TEXTS:
        assert cached_tokenizer(text).input_ids == direct_tokenizer(text).input_ids, text
    chat = [{"role": "user", "content": TEXTS[0]}]
    assert cached_tokenizer.apply_chat_template(chat, add_generation_prompt=True) == (
        direct_tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    )


# Slow: parses the bundled GGUF's tensor table (~4 s on 2 CPU cores).
@pytest.mark.slow
def test_weights_that_do_not_fit_on_the_disk_are_not_written(gguf_path, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_cache.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**6))
    with pytest.raises(OSError, match=r"the fp32 weights need 0\.5 GB, 0\.0 GB free"):
        reader = gguf.GGUFReader(str(gguf_path))
        gguf_cache._write_safetensors(tmp_path / "model.safetensors", reader, transformers.LlamaConfig())
    assert not (tmp_path / "model.safetensors").exists()
