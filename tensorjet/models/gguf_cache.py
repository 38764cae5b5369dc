"""A GGUF file in HF form, converted once (`gguf_convert`): its config, its tokenizer and its weights as
HF-named fp32 tensors (dequantized, renamed, rope un-permuted).

Dequantizing every tensor takes a second or so, so the first use of a file converts it once into a
cache entry, an HF model directory (config.json, the tokenizer files, model.safetensors), keyed by the
file's content; later starts read the entry and memory-map the weights. The cache root is
$TENSORJET_CACHE, else $XDG_CACHE_HOME/tensorjet, else ~/.cache/tensorjet; an entry is built beside
its final place and renamed into it, and one whose files do not match its manifest is rebuilt, never
trusted. The file's SHA-256 is remembered beside the entries for its path, size, modification time
and inode, so a later start hashes it again only once one of those changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tensorjet.models.gguf_convert import convert

logger = logging.getLogger(__name__)

MANIFEST_FILE = "conversion.json"  # written last: what the entry holds and what made it
# Bump when the conversion's output changes, so older entries are rebuilt.
CONVERSION_FORMAT = 2
# The libraries whose versions decide an entry's contents (transformers: a tokenizer that is not
# byte-level BPE is converted through it).
_CONVERTERS = ("gguf", "tokenizers", "transformers")


def cache_root() -> Path:
    if os.environ.get("TENSORJET_CACHE"):
        return Path(os.environ["TENSORJET_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tensorjet"


def converted(gguf_path: Path) -> Path | None:
    """The cache entry of `gguf_path`, converted now if it has none (or a broken one). None where the
    cache cannot be written: the caller then reads the GGUF itself."""
    digest = _content_digest(gguf_path)
    entry = cache_root() / "gguf" / digest[:16]
    manifest = _manifest(digest)
    if _is_complete(entry, manifest):
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    except OSError as error:
        logger.warning("cannot write the GGUF cache (%s); reading %s directly", error, gguf_path.name)
        return None
    try:
        logger.info("converting %s into %s (once per file)", gguf_path.name, entry)
        convert(gguf_path, staging)
        manifest["files"] = {f.name: f.stat().st_size for f in staging.iterdir()}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        _publish(staging, entry, manifest)
    except OSError as error:  # a full disk, a cache made read-only meanwhile
        logger.warning("cannot write the GGUF cache (%s); reading %s directly", error, gguf_path.name)
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


def _content_digest(path: Path) -> str:
    """The file's SHA-256, remembered for its path, size, modification time and inode (hashing the
    bundled model's 98 MB takes 0.2 s of a start); rehashed once any of them changed."""
    stat = path.stat()
    stamp = [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino]
    record = cache_root() / "gguf-digests" / f"{hashlib.sha256(stamp[0].encode()).hexdigest()[:16]}.json"
    try:
        remembered = json.loads(record.read_text())
        if remembered["stamp"] == stamp:
            return remembered["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = _sha256(path)
    try:  # written aside and renamed: a reader never sees half a record
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_name(f".{record.name}.{os.getpid()}")
        partial.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
        partial.replace(record)
    except OSError:  # an unwritable cache: `converted` says so once
        pass
    return digest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(digest: str) -> dict:
    """What an entry of this file must record: the converters' versions decide its contents too."""
    return {
        "format": CONVERSION_FORMAT,
        "gguf_sha256": digest,
        **{name: importlib.metadata.version(name) for name in _CONVERTERS},
    }


def _is_complete(entry: Path, manifest: dict) -> bool:
    """Whether `entry` was written whole by this conversion: a manifest that matches `manifest`, and
    every file it lists present at its recorded size."""
    try:
        recorded = json.loads((entry / MANIFEST_FILE).read_text())
        files = recorded.pop("files")
        return recorded == manifest and all((entry / n).stat().st_size == s for n, s in files.items())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _publish(staging: Path, entry: Path, manifest: dict) -> None:
    """Rename the finished `staging` into `entry`, replacing a broken entry; where another process
    published a complete one first, keep that."""
    if entry.exists() and not _is_complete(entry, manifest):
        shutil.rmtree(entry, ignore_errors=True)
    try:
        staging.rename(entry)
    except OSError:
        if not _is_complete(entry, manifest):
            raise
