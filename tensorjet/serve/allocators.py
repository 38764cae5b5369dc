"""Allocator settings for a server process, so that its resident memory levels off once it has warmed up
instead of creeping with the variety of its load. `tensorjet serve` applies them before it builds the
engine: both take effect only where nothing has used the allocator in question yet. A value the user set
in the environment is kept."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

logger = logging.getLogger("tensorjet.serve")

# oneDNN runs the CPU fp32 weight products (`onednn_linear`) and keeps what it builds for each product
# shape in two caches, oneDNN's own and ideep's (torch's wrapper), each of 1024 entries by default, about
# 0.6 MB a shape in all. A step's shapes follow its row count, so a server's caches grew for as long as new
# row counts came (the bundled model: its 5 products at up to 128 rows, ~0.4 GB). 64 entries hold the
# products of a dozen row counts: on batches of 1-8 mixed prompts the bundled model's steps built ~0.4
# shapes each instead of ~0.15, at ~0.3 ms a shape, 0.1% of their time.
ONEDNN_CACHE_CAPACITY = 64
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")

# glibc gives each thread that allocates an arena of its own, up to 8 per core, and memory freed in one
# stays there for that arena's reuse: a server's event loop, engine and worker threads each keep some.
# With 2, a 5-minute soak's server kept ~38 MB of free heap instead of ~58 MB.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def configure_server_allocators() -> None:
    """Both settings, before anything allocates through them (the start of `tensorjet serve`)."""
    bound_onednn_caches()
    limit_malloc_arenas()


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Bound oneDNN's caches (read from the environment when oneDNN first runs; torch has no setter).
    Processes this one starts (tensor-parallel workers) inherit the setting."""
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """At most `arenas` glibc malloc arenas in this process (arenas made before stay) and in the processes
    it starts. Nothing on another C library."""
    if "MALLOC_ARENA_MAX" in os.environ:  # glibc read the user's own value when this process started
        return
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)
    try:
        applied = ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):
        applied = False
    if not applied:
        logger.warning("could not limit glibc's malloc arenas (mallopt M_ARENA_MAX)")
