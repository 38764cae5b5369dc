"""tensorjet's on-disk cache: where it lives, and entries that are whole or absent.

The root is $TENSORJET_CACHE, else $XDG_CACHE_HOME/tensorjet, else ~/.cache/tensorjet. An entry is a
directory written beside its final place and renamed into it, its manifest last; the manifest records
what the entry was made from and every file's size, so an entry cut short (a crash, a full disk) or
made by other code is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("TENSORJET_CACHE"):
        return Path(os.environ["TENSORJET_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tensorjet"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remembered_sha256(path: Path) -> str:
    """The file's SHA-256, remembered in the cache for its path, size, modification time and inode
    (hashing the bundled model's 98 MB takes 0.2 s of a start; a large model's weights, minutes);
    hashed again once any of them changed."""
    stat = path.stat()
    stamp = [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino]
    record = cache_root() / "digests" / f"{hashlib.sha256(stamp[0].encode()).hexdigest()[:16]}.json"
    try:
        remembered = json.loads(record.read_text())
        if remembered["stamp"] == stamp:
            return remembered["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_of(path)
    try:  # written aside and renamed: a reader never sees half a record
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_name(f".{record.name}.{os.getpid()}")
        partial.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
        partial.replace(record)
    except OSError:  # an unwritable cache: the caller finds out when it writes an entry
        pass
    return digest


def is_complete(entry: Path, manifest_file: str, manifest: dict) -> bool:
    """Whether `entry` was written whole from what `manifest` describes: its manifest holds every field
    of `manifest` with the same value, and every file it lists is present at its recorded size."""
    try:
        recorded = json.loads((entry / manifest_file).read_text())
        files = recorded["files"]
        same = all(recorded.get(name) == value for name, value in manifest.items())
        return same and all((entry / n).stat().st_size == s for n, s in files.items())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def write_entry(
    entry: Path, manifest_file: str, manifest: dict, write: Callable[[Path], dict | None]
) -> None:
    """Make `entry`: `write(staging)` fills a fresh directory beside it (and may return more fields for
    the manifest), then the manifest goes in last and the directory is renamed into place. Where another
    process published a complete entry first, that one stays. Raises OSError where the cache cannot be
    written."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        recorded = manifest | (write(staging) or {})
        recorded["files"] = {f.name: f.stat().st_size for f in staging.iterdir()}
        (staging / manifest_file).write_text(json.dumps(recorded, indent=1))
        if entry.exists() and not is_complete(entry, manifest_file, manifest):
            shutil.rmtree(entry, ignore_errors=True)
        try:
            staging.rename(entry)
        except OSError:
            if not is_complete(entry, manifest_file, manifest):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
