"""The readable table, the JSON report, and the PNG plots (matplotlib's Agg backend, no display)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from tensorjet.bench.metrics import RequestRecord, output_throughput_over_time

LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency"))
STAT_KEYS = ("mean", "p50", "p90", "p99")


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _with_unit(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:,.2f} {unit}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _peak_mean(stats: dict | None, fmt) -> str:
    return "n/a" if stats is None else f"peak {fmt(stats['peak'])}, mean {fmt(stats['mean'])}"


def format_table(report: dict) -> str:
    """Every metric of one run, aligned for a terminal."""
    config = report["config"]
    env = report["environment"]
    where = config["url"] if config["mode"] == "serving" else f"{env['device']} ({env['device_name']})"
    rows = [
        ("mode", f"{config['mode']} on {where}"),
        ("workload", _workload(config)),
        ("requests", f"{report['num_completed']} completed, {report['num_failed']} failed"),
        ("duration", _with_unit(report["duration_s"], "s")),
        ("input / output tokens", f"{report['total_input_tokens']:,} / {report['total_output_tokens']:,}"),
        ("request throughput", _with_unit(report["request_throughput"], "req/s")),
        ("output token throughput", _with_unit(report["output_throughput"], "tok/s")),
        ("total token throughput", _with_unit(report["total_token_throughput"], "tok/s")),
        ("weights", _weights(report)),
        ("peak GPU memory", _with_unit(report["peak_gpu_memory_gb"], "GB")),
        ("GPU utilization", _peak_mean(report["gpu_utilization_pct"], lambda v: f"{v:.0f}%")),
        ("GPU SM clock", _peak_mean(report["gpu_sm_clock_mhz"], lambda v: f"{v:.0f} MHz")),
        ("GPU power", _peak_mean(report["gpu_power_w"], lambda v: f"{v:.0f} W")),
        ("KV cache usage", _peak_mean(report["kv_cache_usage"], _pct)),
        ("prefix cache hit rate", _pct(report["prefix_cache_hit_rate"])),
        ("preemptions", "n/a" if report["num_preemptions"] is None else str(report["num_preemptions"])),
        ("speculative decoding", _speculation(report)),
    ]
    if "without_speculation" in report:
        rows.append(("vs no speculation", _speedup(report)))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += ["", f"{'latency (ms)':<{width}}" + "".join(f"{k:>11}" for k in STAT_KEYS)]
    for key, label in LATENCIES:
        lines.append(f"{label:<{width}}" + "".join(f"{_num(report[key][k]):>11}" for k in STAT_KEYS))
    rule = "=" * len(max(lines, key=len))
    return "\n".join([rule, "tensorjet bench", rule, *lines, rule])


def _speculation(report: dict) -> str:
    rate = report.get("speculative_acceptance_rate")
    if rate is None:
        return "n/a (no drafts verified)"
    mean = report["speculative_mean_accepted_tokens"]
    return f"acceptance {_pct(rate)}, {mean:.2f} accepted tokens per verify step"


def _speedup(report: dict) -> str:
    base = report["without_speculation"]
    return (
        f"{report['speculative_speedup']:.2f}x output tok/s ({base['output_throughput']:,.2f} tok/s and "
        f"TPOT p50 {_num(base['tpot_ms']['p50'])} ms without)"
    )


def _weights(report: dict) -> str:
    if report["weight_memory_gb"] is None:
        return "n/a"
    return f"{report['weight_memory_gb']:.3f} GB, {report['weight_format']}"


def _workload(config: dict) -> str:
    concurrency = config["max_concurrency"] or "unlimited"
    rate = config["request_rate"]
    arrivals = "all at once" if math.isinf(rate) else f"Poisson {rate:g} req/s"
    return f"{config['dataset']}, {arrivals}, max concurrency {concurrency}"


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict(report), indent=2, allow_nan=False) + "\n")


def _strict(value):
    """JSON has no infinity: an unlimited request_rate (inf) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(records: Sequence[RequestRecord], start: float, directory: Path) -> list[Path]:
    """latency_cdf.png (TTFT, TPOT, ITL, E2E) and throughput_over_time.png."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    done = [r for r in records if r.ok]
    series = {
        "TTFT": [r.ttft for r in done],
        "TPOT": [t for r in done if (t := r.tpot) is not None],
        "ITL": [gap for r in done for gap in r.itls],
        "E2E latency": [r.e2e for r in done],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (label, values) in zip(axes.flat, series.items()):
        xs = sorted(v * 1e3 for v in values)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post")
        ax.set(title=f"{label} CDF", xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    cdf_path = directory / "latency_cdf.png"
    fig.savefig(cdf_path, dpi=100)
    plt.close(fig)

    duration = max((r.end for r in done), default=start) - start
    window = max(duration / 10, 1e-3)
    times, rates = output_throughput_over_time(done, start, window)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(times, rates)
    ax.set(
        title=f"output token throughput ({window:.2g} s sliding window)", xlabel="seconds", ylabel="tokens/s"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    throughput_path = directory / "throughput_over_time.png"
    fig.savefig(throughput_path, dpi=100)
    plt.close(fig)
    return [cdf_path, throughput_path]


def format_sweep_table(name: str, points: Sequence[dict]) -> str:
    """One row per swept value: throughputs and the latencies a capacity decision needs."""
    header = (
        f"{name:>22} {'req/s':>9} {'out tok/s':>11} {'TTFT p50':>10} {'TTFT p99':>10} "
        f"{'TPOT p50':>10} {'TPOT p99':>10} {'E2E p99':>10}"
    )
    lines = [header, "-" * len(header)]
    for point in points:
        value = str(point["value"])
        if point.get("error"):
            lines.append(f"{value:>22} {point['error']}")
            continue
        r = point["report"]
        lines.append(
            f"{value:>22} {_num(r['request_throughput'], 3):>9} {_num(r['output_throughput']):>11} "
            f"{_num(r['ttft_ms']['p50']):>10} {_num(r['ttft_ms']['p99']):>10} "
            f"{_num(r['tpot_ms']['p50']):>10} {_num(r['tpot_ms']['p99']):>10} {_num(r['e2e_ms']['p99']):>10}"
        )
    return "\n".join(lines)


def plot_sweep(name: str, points: Sequence[dict], directory: Path) -> Path:
    """sweep.png: output throughput against median TPOT (and E2E), each point labelled by its value."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    ok = [p for p in points if not p.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "tpot_ms", "median TPOT (ms)"), (axes[1], "e2e_ms", "median E2E (ms)")):
        xs = [p["report"][key]["p50"] or 0.0 for p in ok]
        ys = [p["report"]["output_throughput"] for p in ok]
        ax.plot(xs, ys, marker="o")
        for x, y, p in zip(xs, ys, ok):
            ax.annotate(f"{name}={p['value']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel=label, ylabel="output tokens/s", title=f"throughput vs latency over {name}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = directory / "sweep.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
