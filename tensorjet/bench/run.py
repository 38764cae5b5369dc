"""One benchmark end to end: build the workload, warm up, drive it while sampling the GPU and the
KV cache, and assemble the report with its configuration and environment."""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

import tensorjet
from tensorjet.bench import offline, serving
from tensorjet.bench.datasets import BenchRequest, load_dataset, random_requests
from tensorjet.bench.driver import Send, drive
from tensorjet.bench.gpu_monitor import Sampler, nvml_probes, peak_and_mean
from tensorjet.bench.metrics import RequestRecord, ratio, summarize
from tensorjet.config import ENGINE_OPTIONS
from tensorjet.engine_args import engine_options

WORKLOAD_KEYS = (
    "dataset",
    "num_requests",
    "input_len",
    "output_len",
    "range_ratio",
    "prefix_len",
    "max_concurrency",
    "request_rate",
    "warmup",
)


@dataclass
class BenchResult:
    report: dict  # what --report_json writes
    records: list[RequestRecord]
    start: float  # perf_counter time the measured run began


def run_benchmark(args: argparse.Namespace, llm=None) -> BenchResult:
    """Serving mode when --url is given, else offline with `llm` or a fresh engine."""
    if args.url:
        return _run_serving(args)
    if llm is not None:
        return _run_offline(args, llm)
    with offline.open_llm(engine_options(args)) as fresh:
        return _run_offline(args, fresh)


def compare_without_speculation(args: argparse.Namespace, report: dict) -> None:
    """Run the same workload on a fresh engine without speculation; add its throughput and latencies to
    `report` (`without_speculation`) with the speed-up of output tokens/s (`speculative_speedup`)."""
    plain = copy.copy(args)
    for name, spec in ENGINE_OPTIONS.items():
        if spec.part == "speculative":
            setattr(plain, name, None)
    base = run_benchmark(plain).report
    report["without_speculation"] = {
        key: base[key]
        for key in ("output_throughput", "request_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
    }
    report["speculative_speedup"] = ratio(report["output_throughput"], base["output_throughput"])


def bench_config(args: argparse.Namespace) -> dict:
    config = {key: getattr(args, key) for key in WORKLOAD_KEYS}
    config["mode"] = "serving" if args.url else "offline"
    config["url"] = args.url
    config["engine_options"] = engine_options(args)
    return config


def _requests(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    return load_dataset(
        args.dataset,
        args.num_requests or args.max_concurrency,
        args.input_len,
        args.output_len,
        args.range_ratio,
        args.prefix_len,
        vocab_size,
        args.seed or 0,
    )


def _warm_up(args: argparse.Namespace, send: Send, vocab_size: int) -> None:
    """Random requests of the workload's shape (not its prompts, which would pre-fill the prefix cache)."""
    if args.warmup:
        seed = (args.seed or 0) + 1
        warmup = random_requests(args.warmup, args.input_len, args.output_len, 0.0, vocab_size, seed)
        asyncio.run(drive(warmup, send, args.max_concurrency, float("inf"), seed, progress=False))


def _measure(args: argparse.Namespace, send: Send, vocab_size: int, probes: dict) -> tuple[BenchResult, dict]:
    """Drive the workload under the sampler; returns the result and the samples."""
    requests = _requests(args, vocab_size)
    with Sampler(probes) as sampler:
        records, start, duration = asyncio.run(
            drive(requests, send, args.max_concurrency, args.request_rate, args.seed or 0, progress=True)
        )
    report = summarize(records, duration)
    report["kv_cache_usage"] = peak_and_mean(sampler.samples.get("kv_cache_usage", []))
    for key in ("gpu_utilization_pct", "gpu_sm_clock_mhz", "gpu_power_w"):
        report[key] = peak_and_mean(sampler.samples.get(key, []))
    return BenchResult(report, records, start), sampler.samples


def _run_offline(args: argparse.Namespace, llm) -> BenchResult:
    device = offline.device_of(llm)
    probes = {"kv_cache_usage": offline.kv_usage_probe(llm), **nvml_probes(device)}
    send = offline.sender(llm)
    vocab_size = offline.vocab_size_of(llm)
    _warm_up(args, send, vocab_size)
    offline.reset_peak_memory(device)
    before = llm.stats()
    result, _ = _measure(args, send, vocab_size, probes)
    result.report["peak_gpu_memory_gb"] = offline.peak_memory_gb(device)
    result.report.update(offline.engine_counters(before, llm.stats()))
    result.report["weight_format"] = before["weight_format"]
    result.report["weight_memory_gb"] = before["weight_bytes"] / 1e9
    _finish(result.report, args, device)
    return result


def _run_serving(args: argparse.Namespace) -> BenchResult:
    """Engine options belong to the server; only the workload is set here."""
    chosen = set(engine_options(args)) - {"model", "seed"}
    if chosen:
        raise ValueError(f"engine options {sorted(chosen)} configure the server, not the --url benchmark")
    send = serving.sender(args.url, args.model or serving.served_model(args.url))
    probes = {"kv_cache_usage": serving.kv_usage_probe(args.url), **nvml_probes()}
    _warm_up(args, send, args.vocab_size)
    before = serving.server_metrics(args.url)
    result, samples = _measure(args, send, args.vocab_size, probes)
    # The server's GPU as NVML sees it (the whole process, KV pool included), if it is local.
    memory = samples.get("gpu_memory_used_gb")
    result.report["peak_gpu_memory_gb"] = max(memory) if memory else None
    result.report["weight_format"] = result.report["weight_memory_gb"] = None  # the server's own
    result.report.update(serving.server_counters(before, serving.server_metrics(args.url)))
    _finish(result.report, args, None)
    return result


def _finish(report: dict, args: argparse.Namespace, device: torch.device | None) -> None:
    report["config"] = bench_config(args)
    report["environment"] = environment(device)


def environment(device: torch.device | None) -> dict:
    return {
        "tensorjet_version": tensorjet.__version__,
        "git_commit": _git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device) if device is not None else None,
        "device_name": _device_name(device),
        "cpu_count": os.cpu_count(),
    }


def _device_name(device: torch.device | None) -> str | None:
    if device is None:
        return None
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or platform.machine()


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    """The commit of the tensorjet checkout, when it is one (editable installs)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(tensorjet.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None
