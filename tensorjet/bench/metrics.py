"""Pure statistics over per-request records, so every number in a report can be unit-tested."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request did, in seconds of one clock (time.perf_counter)."""

    start: float  # when the request was sent
    end: float  # when its last update arrived
    chunk_times: list[float] = field(default_factory=list)  # arrival of each update carrying tokens
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for a one-token output."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive streamed updates (one per update, as vLLM's benchmark counts)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and P50/P90/P99 (linear interpolation); all None for no values."""
    keys = ["mean"] + [f"p{p}" for p in PERCENTILES]
    if len(values) == 0:
        return dict.fromkeys(keys)
    array = np.asarray(values, dtype=float)
    stats = [array.mean(), *np.percentile(array, PERCENTILES)]
    return {k: float(v) for k, v in zip(keys, stats)}


def _ms(values: list[float]) -> dict[str, float | None]:
    return distribution([v * 1e3 for v in values])


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict:
    """Throughputs over the run's wall time and latency distributions (ms) over successful requests."""
    done = [r for r in records if r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_failed": len(records) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": _ms([r.ttft for r in done]),
        "tpot_ms": _ms([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": _ms([gap for r in done for gap in r.itls]),
        "e2e_ms": _ms([r.e2e for r in done]),
    }


def output_throughput_over_time(
    records: Sequence[RequestRecord], t0: float, window_s: float, num_points: int = 100
) -> tuple[list[float], list[float]]:
    """(seconds after t0, output tokens/s over the preceding window_s) at evenly spaced times.

    A sliding window rather than fixed bins, which alias with the engine's step period. A request's
    tokens are spread evenly over its updates (exact when each update carries one token).
    """
    done = [r for r in records if r.ok]
    if not done:
        return [], []
    pairs = sorted((t - t0, r.output_tokens / len(r.chunk_times)) for r in done for t in r.chunk_times)
    times = np.array([t for t, _ in pairs])
    tokens_before = np.concatenate([[0.0], np.cumsum([n for _, n in pairs])])
    xs = np.linspace(0.0, max(r.end for r in done) - t0, num_points)
    in_window = (
        tokens_before[np.searchsorted(times, xs, "right")]
        - tokens_before[np.searchsorted(times, xs - window_s, "right")]
    )
    # Near the start the window reaches back before the run; divide by the part inside it.
    rates = in_window / np.clip(np.minimum(xs, window_s), 1e-9, None)
    return xs.tolist(), rates.tolist()


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def speculation_numbers(drafted: float | None, accepted: float | None, verify_steps: float | None) -> dict:
    """Acceptance rate (accepted / drafted tokens) and accepted tokens per verify step; None where the
    run verified no drafts (or the counters are missing)."""
    verified = drafted is not None and accepted is not None and verify_steps
    return {
        "speculative_acceptance_rate": ratio(accepted, drafted) if verified else None,
        "speculative_mean_accepted_tokens": ratio(accepted, verify_steps) if verified else None,
    }
