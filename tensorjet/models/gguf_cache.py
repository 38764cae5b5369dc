"""A GGUF file in HF form, converted once (`gguf_convert`): its config, its tokenizer, its weights as
HF-named fp32 tensors (dequantized, renamed, rope un-permuted) and its 4-bit tensors' blocks.

Dequantizing every tensor takes a second or so, so the first use of a file converts it once into a
cache entry, an HF model directory (config.json, the tokenizer files, model.safetensors, the blocks),
keyed by the file's content (its SHA-256, remembered for its path, size, modification time and
inode); later starts read the entry and memory-map the weights. An entry is whole or absent (`cache`).
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from tensorjet.models.cache import cache_root, is_complete, remembered_sha256, write_entry
from tensorjet.models.gguf_convert import convert
from tensorjet.models.threads import one_thread

logger = logging.getLogger(__name__)

MANIFEST_FILE = "conversion.json"  # written last: what the entry holds and what made it
# Bump when the conversion's output changes, so older entries are rebuilt.
# 3: the 4-bit blocks too (`gguf_blocks.BLOCKS_FILE`); 4: the fp32 data 64-byte aligned
CONVERSION_FORMAT = 4
# The libraries whose versions decide an entry's contents (transformers: a tokenizer that is not
# byte-level BPE is converted through it).
_CONVERTERS = ("gguf", "tokenizers", "transformers")


def converted(gguf_path: Path) -> Path | None:
    """The cache entry of `gguf_path`, converted now if it has none (or a broken one). None where the
    cache cannot be written: the caller then reads the GGUF itself."""
    digest = remembered_sha256(gguf_path)
    entry = cache_root() / "gguf" / digest[:16]
    manifest = _manifest(digest)
    if is_complete(entry, MANIFEST_FILE, manifest):
        return entry

    def write(staging: Path) -> None:
        logger.info("converting %s into %s (once per file)", gguf_path.name, entry)
        with one_thread():
            convert(gguf_path, staging)

    try:
        write_entry(entry, MANIFEST_FILE, manifest, write)
    except OSError as error:  # a read-only cache, a full disk
        logger.warning("cannot write the GGUF cache (%s); reading %s directly", error, gguf_path.name)
        return None
    return entry


def _manifest(digest: str) -> dict:
    """What an entry of this file must record: the converters' versions decide its contents too."""
    return {
        "format": CONVERSION_FORMAT,
        "gguf_sha256": digest,
        **{name: importlib.metadata.version(name) for name in _CONVERTERS},
    }
