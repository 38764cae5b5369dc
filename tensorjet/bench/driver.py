"""Sends a workload the way a benchmark needs: Poisson arrivals at a request rate, at most a fixed
number in flight, or everything at once. Offline and serving mode differ only in `send`."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from tqdm import tqdm

from tensorjet.bench.datasets import BenchRequest
from tensorjet.bench.metrics import RequestRecord

Send = Callable[[BenchRequest], Awaitable[RequestRecord]]


def arrival_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives: all at 0 for an infinite rate,
    else a Poisson process (exponential gaps) with `request_rate` requests per second."""
    if request_rate <= 0:
        raise ValueError(f"--request_rate must be > 0, got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(request_rate)
    return offsets


async def drive(
    requests: Sequence[BenchRequest],
    send: Send,
    max_concurrency: int | None,
    request_rate: float,
    seed: int,
    progress: bool,
) -> tuple[list[RequestRecord], float, float]:
    """Run every request; returns (records in workload order, start time, duration in seconds).

    A request's clock starts when it is sent, after waiting for a concurrency slot, so that
    queueing in the benchmark itself never counts as engine latency.
    """
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--batch_size/--max_concurrency must be >= 1, got {max_concurrency}")
    slots = asyncio.Semaphore(max_concurrency or len(requests) or 1)
    bar = tqdm(total=len(requests), desc="benchmark", unit="req", disable=not progress)

    async def one(request: BenchRequest) -> RequestRecord:
        async with slots:
            record = await send(request)
        bar.update(1)
        return record

    start = time.perf_counter()
    tasks = []
    try:
        for request, offset in zip(requests, arrival_offsets(len(requests), request_rate, seed)):
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(one(request)))
        records = await asyncio.gather(*tasks)
    finally:
        bar.close()
    return list(records), start, time.perf_counter() - start
