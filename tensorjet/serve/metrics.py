"""Prometheus metrics. Engine state (requests, KV cache, prefix cache, token counters) is read from
`llm.stats()` at scrape time, so it can never drift from the engine; latencies are histograms the
server observes per request. Each app has its own registry, so several apps can share a process.

Every figure is exported twice: as `tensorjet_*`, and under vLLM's names (`vllm:` prefix, a `model_name`
label, its buckets), so dashboards made for vLLM work unchanged."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tensorjet.outputs import RequestOutput
from tensorjet.sampling_params import SamplingParams

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

# vLLM's names for the same engine figures: (stats key, name after "vllm:", help).
VLLM = "vllm:"
_VLLM_GAUGES = [
    ("num_requests_running", "num_requests_running", "Number of requests in model execution batches"),
    ("num_requests_waiting", "num_requests_waiting", "Number of requests waiting to be processed"),
    ("kv_cache_usage", "kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent usage"),
    ("kv_cache_usage", "gpu_cache_usage_perc", "KV-cache usage; 1 means 100 percent usage (older name)"),
]
_VLLM_COUNTERS = [
    ("prompt_tokens_computed", "prompt_tokens", "Number of prefill tokens processed"),
    ("generated_tokens", "generation_tokens", "Number of generation tokens processed"),
    ("num_preemptions", "num_preemptions", "Cumulative number of preemptions from the engine"),
    ("prefix_cache_queries_tokens", "prefix_cache_queries", "Prefix cache queries, in terms of tokens"),
    ("prefix_cache_hits_tokens", "prefix_cache_hits", "Prefix cache hits, in terms of tokens"),
    ("speculative_verify_steps", "spec_decode_num_drafts", "Number of spec decoding drafts"),
    ("speculative_draft_tokens", "spec_decode_num_draft_tokens", "Number of draft tokens"),
    ("speculative_accepted_tokens", "spec_decode_num_accepted_tokens", "Number of accepted tokens"),
]
# vLLM's buckets
VLLM_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
VLLM_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
VLLM_PARAM_BUCKETS = (1, 2, 5, 10, 20)


def token_buckets(max_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_len, as vLLM buckets token counts."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_len:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 240, 480, 960)


class EngineStatsCollector(Collector):
    """Turns one `llm.stats()` snapshot per scrape into gauges and counters."""

    def __init__(self, llm, model_name: str) -> None:
        self.llm = llm
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.llm.stats()
        for key, name, doc in _GAUGES:
            yield GaugeMetricFamily(PREFIX + name, doc, value=stats[key])
        for key, name, doc in _COUNTERS:
            yield CounterMetricFamily(PREFIX + name, doc, value=stats[key])
        labels = ["model_name"]
        for key, name, doc in _VLLM_GAUGES:
            family = GaugeMetricFamily(VLLM + name, doc, labels=labels)
            family.add_metric([self.model_name], stats[key])
            yield family
        for key, name, doc in _VLLM_COUNTERS:
            family = CounterMetricFamily(VLLM + name, doc, labels=labels)
            family.add_metric([self.model_name], stats[key])
            yield family


class ServerMetrics:
    def __init__(self, llm, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(llm, model_name))
        self.model_name = model_name
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

        self.vllm = _VLLMHistograms(self.registry, model_name, llm.engine.max_seq_len)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)
        self.vllm.time_to_first_token.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)
        self.vllm.inter_token_latency.observe(seconds)
        self.vllm.time_per_output_token.observe(seconds)

    def request_done(self, seconds: float) -> None:
        self.e2e_latency.observe(seconds)
        self.vllm.e2e_latency.observe(seconds)

    def engine_request_finished(self, out: RequestOutput, params: SamplingParams) -> None:
        """One prompt's engine request, finished: its phases, lengths and parameters, and per completion
        why it ended (vLLM's `request_success_total{finished_reason}`)."""
        vllm, m = self.vllm, out.metrics
        if m.first_scheduled_time is not None:
            vllm.queue_time.observe(m.first_scheduled_time - m.arrival_time)
            if m.first_token_time is not None:
                vllm.prefill_time.observe(m.first_token_time - m.first_scheduled_time)
                if m.finished_time is not None:
                    vllm.decode_time.observe(m.finished_time - m.first_token_time)
            if m.finished_time is not None:
                vllm.inference_time.observe(m.finished_time - m.first_scheduled_time)
        vllm.prompt_tokens.observe(len(out.prompt_token_ids))
        vllm.generation_tokens.observe(sum(len(c.token_ids) for c in out.outputs))
        vllm.params_n.observe(params.n)
        vllm.params_max_tokens.observe(params.max_tokens)
        for completion in out.outputs:
            vllm.success.labels(self.model_name, completion.finish_reason or "abort").inc()

    def render(self) -> bytes:
        """The text exposition; takes the engine lock briefly, so call it off the event loop."""
        return generate_latest(self.registry)


class _VLLMHistograms:
    """The per-request histograms and counters under vLLM's names."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_seq_len: int) -> None:
        def histogram(name: str, doc: str, buckets) -> Histogram:
            made = Histogram(VLLM + name, doc, ["model_name"], buckets=buckets, registry=registry)
            return made.labels(model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds", VLLM_TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds", VLLM_ITL_BUCKETS
        )
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds", "Histogram of time per output token in seconds", VLLM_ITL_BUCKETS
        )
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds",
            VLLM_REQUEST_BUCKETS,
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request",
            VLLM_REQUEST_BUCKETS,
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request",
            VLLM_REQUEST_BUCKETS,
        )
        self.decode_time = histogram(
            "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request",
            VLLM_REQUEST_BUCKETS,
        )
        self.inference_time = histogram(
            "request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request",
            VLLM_REQUEST_BUCKETS,
        )
        lengths = token_buckets(max_seq_len)
        self.prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed", lengths)
        self.generation_tokens = histogram(
            "request_generation_tokens", "Number of generation tokens processed", lengths
        )
        self.params_n = histogram(
            "request_params_n", "Histogram of the n request parameter", VLLM_PARAM_BUCKETS
        )
        self.params_max_tokens = histogram(
            "request_params_max_tokens", "Histogram of the max_tokens request parameter", lengths
        )
        self.success = Counter(
            VLLM + "request_success",
            "Count of successfully processed requests",
            ["model_name", "finished_reason"],
            registry=registry,
        )
