"""Torch's CPU work on one thread while a start makes something once (a GGUF's conversion, the weights
its layers derive): memory-bound ops over tensors of a few MB, which a second thread barely speeds up,
and on a busy CPU every parallel region waits for its slowest thread (the bundled model's first start
on a shared 2-core VM: 15 s on two threads, 4.2 s on one)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
