"""Prometheus metrics. Engine state (requests, KV cache, prefix cache, token counters) is read from
`llm.stats()` at scrape time, so it can never drift from the engine; latencies are histograms the
server observes per request. Each app has its own registry, so several apps can share a process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "tensorjet_"

# (stats key, metric name, help); gauges are instantaneous, counters only grow.
_GAUGES = [
    ("num_requests_running", "num_requests_running", "Sequences in the running batch"),
    ("num_requests_waiting", "num_requests_waiting", "Sequences waiting to be scheduled"),
    ("kv_cache_usage", "kv_cache_usage_ratio", "Fraction of KV-cache blocks in use"),
    ("kv_blocks_total", "kv_cache_blocks_total", "KV-cache blocks in the pool"),
    ("kv_blocks_used", "kv_cache_blocks_used", "KV-cache blocks in use"),
    ("kv_blocks_free", "kv_cache_blocks_free", "KV-cache blocks free"),
    (
        "prefix_cache_hit_rate",
        "prefix_cache_hit_rate",
        "Prompt tokens served by the prefix cache / looked up",
    ),
    (
        "speculative_acceptance_rate",
        "spec_decode_acceptance_rate",
        "Draft tokens accepted / proposed (speculative decoding)",
    ),
    (
        "speculative_mean_accepted_tokens",
        "spec_decode_mean_accepted_tokens",
        "Draft tokens accepted per sequence per verify step (speculative decoding)",
    ),
]
_COUNTERS = [
    ("prompt_tokens_computed", "prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)"),
    ("generated_tokens", "generation_tokens", "Tokens generated"),
    ("num_preemptions", "num_preemptions", "Sequences preempted for lack of KV-cache blocks"),
    ("prefix_cache_queries_tokens", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
    ("prefix_cache_hits_tokens", "prefix_cache_hits", "Prompt tokens found in the prefix cache"),
    ("speculative_draft_tokens", "spec_decode_num_draft_tokens", "Draft tokens proposed"),
    ("speculative_accepted_tokens", "spec_decode_num_accepted_tokens", "Draft tokens accepted"),
    ("speculative_verify_steps", "spec_decode_num_drafts", "Sequence steps that verified drafts"),
]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 240, 480, 960)


class EngineStatsCollector(Collector):
    """Turns one `llm.stats()` snapshot per scrape into gauges and counters."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def collect(self) -> Iterator[Metric]:
        stats = self.llm.stats()
        for key, name, doc in _GAUGES:
            yield GaugeMetricFamily(PREFIX + name, doc, value=stats[key])
        for key, name, doc in _COUNTERS:
            yield CounterMetricFamily(PREFIX + name, doc, value=stats[key])


class ServerMetrics:
    def __init__(self, llm) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(llm))
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Request received to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive tokens of one sequence",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Request received to its last token",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            PREFIX + "requests",
            "Generation requests by outcome: finished, aborted (client left or error), rejected (queue full)",
            ["outcome"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The text exposition; takes the engine lock briefly, so call it off the event loop."""
        return generate_latest(self.registry)
