"""How many threads torch's CPU kernels run on: the cores this process may use (its affinity mask, which
`taskset` and container cpusets narrow; torch's own default counts every core of the machine), shared
among the processes of one engine on this machine. OMP_NUM_THREADS, where set, decides instead."""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_available_cores(processes: int = 1) -> None:
    """Run the calling thread's torch CPU work on this process's share of the available cores (more
    threads than cores spin against each other: the bundled model's steps at tensor_parallel_size=3 on 2
    cores ran 7x slower), or on OMP_NUM_THREADS threads where it is set. Set on the thread that runs the
    engine: OpenMP's thread count belongs to each thread, and a new one starts from the process's default
    whatever another thread set."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(
        int(threads) if threads.isdigit() and int(threads) > 0 else max(1, available_cores() // processes)
    )
