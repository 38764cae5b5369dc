"""Offline mode: the engine in this process, every token update timed where it is produced."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tensorjet.bench.datasets import BenchRequest
from tensorjet.bench.driver import Send
from tensorjet.bench.gpu_monitor import Probe
from tensorjet.bench.metrics import RequestRecord, ratio, speculation_numbers
from tensorjet.sampling_params import SamplingParams


@contextmanager
def open_llm(options: dict) -> Iterator:
    """A fresh engine, shut down afterwards. The previous sweep or tune point's engine (possibly
    left after an OOM, in reference cycles) is collected and its cached GPU memory released first,
    so that the new engine sizes its KV cache from an empty device."""
    from tensorjet.llm import LLM

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm = LLM(**options)
    try:
        yield llm
    finally:
        llm.shutdown()


def device_of(llm) -> torch.device:
    return llm.engine.runner.device


def vocab_size_of(llm) -> int:
    return llm.engine.source.hf_config.vocab_size


def sender(llm) -> Send:
    """Greedy decoding with ignore_eos, so each request produces exactly its output_len tokens.

    Requests go through the engine loop the way the HTTP server sends them: submitted from a worker
    thread (submit waits for the engine lock, held for a whole step, which must not stall the event
    loop) and timestamped in the output callback on the engine thread, where each token is produced,
    so that event-loop delays never show up as inter-token latency.
    """

    async def send(request: BenchRequest) -> RequestRecord:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        request_id = f"bench-{uuid.uuid4().hex}"
        params = SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)

        def on_output(out) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, (time.perf_counter(), out))

        record = RequestRecord(start=time.perf_counter(), end=0.0)
        await loop.run_in_executor(None, llm.loop.submit, request_id, request.prompt, params, on_output)
        finished = False
        try:
            while not finished:
                now, out = await updates.get()
                if isinstance(out, BaseException):
                    raise out
                if out.outputs[0].token_ids_diff:
                    record.chunk_times.append(now)
                finished = out.finished
            record.end = now
            record.prompt_tokens = len(out.prompt_token_ids)
            record.output_tokens = len(out.outputs[0].token_ids)
        finally:
            if not finished:
                llm.loop.abort(request_id)
        return record

    return send


def kv_usage_probe(llm) -> Probe:
    """KV-cache usage read without the engine lock: `llm.stats()` would wait for the step in flight
    (and compete with request submission for the lock); a sample a step stale is good enough."""
    return lambda: llm.engine.stats()["kv_cache_usage"]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory the torch allocator handed out on the engine's GPU (weights, KV cache,
    activations); None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def engine_counters(before: dict, after: dict) -> dict:
    """Prefix-cache hit rate, preemptions and speculation of the measured run alone (warmup excluded)."""
    hits = after["prefix_cache_hits_tokens"] - before["prefix_cache_hits_tokens"]
    queries = after["prefix_cache_queries_tokens"] - before["prefix_cache_queries_tokens"]
    drafted, accepted, verify_steps = (
        after[key] - before[key]
        for key in ("speculative_draft_tokens", "speculative_accepted_tokens", "speculative_verify_steps")
    )
    return {
        "prefix_cache_hit_rate": ratio(hits, queries),
        "num_preemptions": after["num_preemptions"] - before["num_preemptions"],
        **speculation_numbers(drafted, accepted, verify_steps),
    }


def is_oom(error: BaseException) -> bool:
    """A GPU out-of-memory, whether torch raised its own type or a plain RuntimeError."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
