"""`tensorjet tune`: the guide's tuning workflow, automated. Raise max_batch_size (doubling) until
the engine runs out of memory or a latency target is missed, back off 20% from the largest size
that passed, then try chunked context on and off and keep the faster passing setting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tensorjet.bench.offline import is_oom
from tensorjet.config import ENGINE_OPTIONS

BACKOFF = 0.2  # headroom below the largest passing max_batch_size, for traffic unlike the benchmark's

RunPoint = Callable[[dict], dict]  # engine options -> report; raises on out-of-memory


@dataclass
class Targets:
    """P99 latency limits in ms; None: no limit."""

    p99_ttft_ms: float | None = None
    p99_tpot_ms: float | None = None
    p99_e2e_ms: float | None = None

    def misses(self, report: dict) -> list[str]:
        missed = []
        for key, target in (
            ("ttft_ms", self.p99_ttft_ms),
            ("tpot_ms", self.p99_tpot_ms),
            ("e2e_ms", self.p99_e2e_ms),
        ):
            got = report[key]["p99"]
            if target is not None and (got is None or got > target):
                label = key.removesuffix("_ms").upper()
                shown = "n/a" if got is None else f"{got:.1f}"
                missed.append(f"p99 {label} {shown} ms > {target:g} ms")
        return missed


@dataclass
class Trial:
    options: dict
    report: dict | None  # None after an out-of-memory
    outcome: str  # "ok", "out of memory", or the targets missed

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def tune(
    run_point: RunPoint, base_options: dict, targets: Targets, start: int, limit: int
) -> tuple[dict, list[Trial]]:
    """Returns (recommended engine options, every trial in order). Raises ValueError when even
    max_batch_size=start fails."""
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= --start_batch_size ({start}) <= --batch_size_limit ({limit})")
    base = {"enable_chunked_context": ENGINE_OPTIONS["enable_chunked_context"].default, **base_options}
    trials: list[Trial] = []
    done: dict[tuple, Trial] = {}

    def attempt(**changes) -> Trial:
        options = {**base, **changes}
        key = tuple(sorted(options.items()))
        if key not in done:
            done[key] = _trial(run_point, options, targets)
            trials.append(done[key])
        return done[key]

    best: Trial | None = None
    size = start
    while size <= limit:
        trial = attempt(max_batch_size=size)
        if not trial.ok:
            break
        best, size = trial, size * 2
    if best is None:
        raise ValueError(
            f"max_batch_size={start} already fails ({trials[0].outcome}); "
            "lower --start_batch_size or relax the targets"
        )
    chosen = best.options["max_batch_size"]
    if size <= limit:  # stopped by a failure, not by the limit
        chosen = max(1, int(chosen * (1 - BACKOFF)))
    candidates = [attempt(max_batch_size=chosen, enable_chunked_context=flag) for flag in (True, False)]
    passing = [t for t in candidates if t.ok] or [best]
    return max(passing, key=lambda t: t.report["output_throughput"]).options, trials


def _trial(run_point: RunPoint, options: dict, targets: Targets) -> Trial:
    try:
        report = run_point(options)
    except Exception as error:
        if not is_oom(error):
            raise
        return Trial(options, None, "out of memory")
    missed = targets.misses(report)
    return Trial(options, report, "missed " + "; ".join(missed) if missed else "ok")


def format_trials(trials: list[Trial]) -> str:
    header = f"{'max_batch_size':>14} {'chunked':>8} {'out tok/s':>11} {'TPOT p99':>9} {'TTFT p99':>9}"
    lines = [header + "  outcome", "-" * (len(header) + 9)]
    for t in trials:
        numbers = [f"{'-':>11}", f"{'-':>9}", f"{'-':>9}"]
        if t.report is not None:
            r = t.report
            numbers = [f"{r['output_throughput']:>11.1f}", _ms(r["tpot_ms"]["p99"]), _ms(r["ttft_ms"]["p99"])]
        chunked = str(t.options["enable_chunked_context"])
        lines.append(f"{t.options['max_batch_size']:>14} {chunked:>8} {' '.join(numbers)}  {t.outcome}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{'n/a':>9}" if value is None else f"{value:>9.1f}"


def write_config(options: dict, path: Path, note: str) -> None:
    """A flat YAML mapping of engine option names, as `tensorjet serve --config` reads it."""
    import yaml

    unknown = set(options) - set(ENGINE_OPTIONS)
    if unknown:
        raise ValueError(f"not engine options: {sorted(unknown)}")
    kept = {k: options[k] for k in ENGINE_OPTIONS if options.get(k) is not None}
    header = "".join(f"# {line}\n" for line in note.splitlines())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(kept, sort_keys=False))
