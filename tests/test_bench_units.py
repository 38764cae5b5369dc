"""`tensorjet bench` building blocks without an engine: statistics, workloads, arrivals and
concurrency, server metrics, the tuning search, sweep values and NVML's absence."""

import asyncio
import json
import math
import time

import pytest
import torch
import yaml

from tensorjet.bench import datasets, driver, metrics, offline, serving, tune
from tensorjet.bench.cli import add_bench_arguments
from tensorjet.bench.gpu_monitor import Sampler, nvml_probes, peak_and_mean
from tensorjet.bench.offline import is_oom
from tensorjet.bench.sweep import parse_sweep, typed_values
from tensorjet.config import ENGINE_OPTIONS


def record(start, chunks, end=None, prompt=4, output=None):
    return metrics.RequestRecord(
        start=start,
        end=chunks[-1] if end is None else end,
        chunk_times=list(chunks),
        prompt_tokens=prompt,
        output_tokens=len(chunks) if output is None else output,
    )


# ---- metrics -------------------------------------------------------------------------------------
def test_distribution_matches_numpy_linear_percentiles():
    values = list(range(1, 101))
    d = metrics.distribution(values)
    assert d == {"mean": 50.5, "p50": 50.5, "p90": pytest.approx(90.1), "p99": pytest.approx(99.01)}
    assert metrics.distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert metrics.distribution([3.0]) == {"mean": 3.0, "p50": 3.0, "p90": 3.0, "p99": 3.0}


def test_record_latencies_add_up():
    r = record(10.0, [10.5, 10.6, 10.8, 11.1])
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.1)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert sum(r.itls) == pytest.approx(r.e2e - r.ttft)
    assert r.tpot == pytest.approx(0.6 / 3)
    assert record(0.0, [1.0]).tpot is None


def test_summarize_throughputs_and_failures():
    ok = [record(0.0, [0.1, 0.2, 0.3], prompt=10), record(0.5, [0.7, 0.9], prompt=6)]
    failed = metrics.RequestRecord(start=0.0, end=0.2, error="HTTP 500")
    s = metrics.summarize([*ok, failed], duration_s=2.0)
    assert (s["num_requests"], s["num_completed"], s["num_failed"]) == (3, 2, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (16, 5)
    assert s["request_throughput"] == 1.0
    assert s["output_throughput"] == 2.5
    assert s["total_token_throughput"] == 10.5
    assert s["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(350.0)
    assert s["itl_ms"]["mean"] == pytest.approx(400 / 3)  # gaps 100, 100, 200 ms
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]


def test_output_throughput_over_time_integrates_to_the_token_count():
    records = [record(0.0, [i * 0.1 for i in range(1, 21)]) for _ in range(3)]  # 60 tokens over 2 s
    times, rates = metrics.output_throughput_over_time(records, 0.0, window_s=0.5, num_points=41)
    assert times[0] == 0.0 and times[-1] == pytest.approx(2.0)
    assert rates[0] == 0.0
    assert rates[20] == pytest.approx(30.0)  # steady state: 3 requests x 10 tokens/s
    assert metrics.output_throughput_over_time([], 0.0, 1.0) == ([], [])


# ---- workloads -----------------------------------------------------------------------------------
def test_random_requests_lengths_seed_and_id_range():
    reqs = datasets.random_requests(50, 100, 20, 0.5, vocab_size=1000, seed=3)
    assert reqs == datasets.random_requests(50, 100, 20, 0.5, vocab_size=1000, seed=3)
    assert all(50 <= len(r.prompt) <= 150 and 10 <= r.output_len <= 30 for r in reqs)
    assert len({len(r.prompt) for r in reqs}) > 1
    assert all(datasets.FIRST_RANDOM_ID <= t < 1000 for r in reqs for t in r.prompt)
    exact = datasets.random_requests(4, 16, 8, 0.0, vocab_size=1000, seed=0)
    assert [(len(r.prompt), r.output_len) for r in exact] == [(16, 8)] * 4


def test_shared_prefix_requests_share_exactly_the_prefix():
    reqs = datasets.load_dataset("shared_prefix", 6, 8, 4, 0.0, 32, vocab_size=5000, seed=1)
    prefix = reqs[0].prompt[:32]
    assert all(len(r.prompt) == 40 and r.prompt[:32] == prefix for r in reqs)
    assert len({tuple(r.prompt[32:]) for r in reqs}) == 6
    with pytest.raises(ValueError, match="prefix_len"):
        datasets.load_dataset("shared_prefix", 6, 8, 4, 0.0, 0, vocab_size=5000, seed=1)


def test_default_request_count():
    assert len(datasets.load_dataset("random", None, 4, 2, 0.0, 0, 1000, 0)) == datasets.DEFAULT_NUM_REQUESTS


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "w.jsonl"
    rows = [{"prompt": "hello there", "output_tokens": 5}, {"input_ids": [5, 6, 7]}, {"prompt": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    reqs = datasets.load_dataset(str(path), None, 16, 9, 0.0, 0, 1000, 0)
    assert reqs == [
        datasets.BenchRequest("hello there", 5),
        datasets.BenchRequest([5, 6, 7], 9),
        datasets.BenchRequest("x", 9),
    ]
    assert len(datasets.load_dataset(str(path), 2, 16, 9, 0.0, 0, 1000, 0)) == 2
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"w.jsonl:1"):
        datasets.load_dataset(str(path), None, 16, 9, 0.0, 0, 1000, 0)
    with pytest.raises(ValueError, match="no such file"):
        datasets.load_dataset(str(tmp_path / "missing.jsonl"), None, 16, 9, 0.0, 0, 1000, 0)


# ---- arrivals and concurrency --------------------------------------------------------------------
def test_poisson_arrivals():
    assert driver.arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    offsets = driver.arrival_offsets(4000, 20.0, seed=0)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.05)
    with pytest.raises(ValueError, match="request_rate"):
        driver.arrival_offsets(3, 0.0, 0)


UNIT_S = 0.02  # the fake request lasts output_len of these


def _fake_send(in_flight, peak, sent_at):
    async def send(request):
        sent_at.append(time.perf_counter())
        in_flight.append(1)
        peak[0] = max(peak[0], len(in_flight))
        start = time.perf_counter()
        await asyncio.sleep(UNIT_S * request.output_len)
        in_flight.pop()
        return record(start, [time.perf_counter()], output=request.output_len)

    return send


def test_fixed_concurrency_keeps_at_most_n_in_flight_and_refills():
    requests = [datasets.BenchRequest([1], n) for n in (1, 5, 1, 1, 1, 1)]
    in_flight, peak, sent_at = [], [0], []
    records, _, duration = asyncio.run(
        driver.drive(requests, _fake_send(in_flight, peak, sent_at), 2, math.inf, 0, progress=False)
    )
    assert peak[0] == 2 and len(records) == 6
    assert [r.output_tokens for r in records] == [1, 5, 1, 1, 1, 1]  # workload order
    # The long request holds one slot while the short ones cycle through the other: the third is
    # sent when the first finishes, and the run lasts as long as the long one (not the serial sum).
    assert UNIT_S * 0.9 <= sent_at[2] - sent_at[0] < UNIT_S * 4
    assert 5 * UNIT_S <= duration < 7.5 * UNIT_S


def test_without_a_limit_everything_is_sent_at_once():
    requests = [datasets.BenchRequest([1], 2) for _ in range(8)]
    in_flight, peak, sent_at = [], [0], []
    asyncio.run(
        driver.drive(requests, _fake_send(in_flight, peak, sent_at), None, math.inf, 0, progress=False)
    )
    assert peak[0] == 8 and max(sent_at) - min(sent_at) < UNIT_S


# ---- monitoring ----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_nvml_degrades_to_nothing_without_an_nvidia_gpu():
    assert nvml_probes() == {}
    assert nvml_probes(torch.device("cpu")) == {}


def test_sampler_keeps_samples_and_survives_failing_probes():
    values = iter(range(1000))

    def broken():
        raise RuntimeError("scrape failed")

    with Sampler({"n": lambda: next(values), "broken": broken, "none": lambda: None}, 0.005) as s:
        time.sleep(0.05)
    assert len(s.samples["n"]) >= 3 and s.samples["broken"] == [] == s.samples["none"]
    assert peak_and_mean([1.0, 3.0]) == {"peak": 3.0, "mean": 2.0}
    assert peak_and_mean([]) is None


PROMETHEUS = """# HELP tensorjet_kv_cache_usage_ratio Fraction of KV-cache blocks in use
# TYPE tensorjet_kv_cache_usage_ratio gauge
tensorjet_kv_cache_usage_ratio 0.25
tensorjet_prefix_cache_queries_total 1000.0
tensorjet_prefix_cache_hits_total 300.0
tensorjet_num_preemptions_total 2.0
tensorjet_requests_total{outcome="finished"} 7.0
tensorjet_requests_total{outcome="aborted"} 1.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
"""


def test_server_metrics_parsing():
    parsed = serving.parse_prometheus(PROMETHEUS)
    assert parsed["tensorjet_requests_total"] == 8.0
    assert serving.find_metric(parsed, serving.KV_USAGE_NAMES) == 0.25
    assert serving.find_metric({"vllm:gpu_cache_usage_perc": 0.5}, serving.KV_USAGE_NAMES) == 0.5
    assert serving.find_metric(parsed, ("nothing_like_this",)) is None
    after = dict(parsed, tensorjet_prefix_cache_queries_total=1400.0, tensorjet_prefix_cache_hits_total=400.0)
    after["tensorjet_num_preemptions_total"] = 5.0
    no_speculation = {"speculative_acceptance_rate": None, "speculative_mean_accepted_tokens": None}
    expected = {"prefix_cache_hit_rate": 0.25, "num_preemptions": 3, **no_speculation}
    assert serving.server_counters(parsed, after) == expected
    assert serving.server_counters({}, {}) == {
        "prefix_cache_hit_rate": None,
        "num_preemptions": None,
        **no_speculation,
    }


def test_speculation_counters_of_a_server_and_of_the_engine():
    """vLLM's counter names serve both; acceptance = accepted / drafted, per step = accepted / drafts."""
    before = {
        "vllm:spec_decode_num_draft_tokens_total": 100.0,
        "vllm:spec_decode_num_accepted_tokens_total": 40.0,
    }
    before["vllm:spec_decode_num_drafts_total"] = 20.0
    after = {
        "vllm:spec_decode_num_draft_tokens_total": 300.0,
        "vllm:spec_decode_num_accepted_tokens_total": 190.0,
    }
    after["vllm:spec_decode_num_drafts_total"] = 60.0
    counters = serving.server_counters(before, after)
    assert (
        counters["speculative_acceptance_rate"] == 0.75
        and counters["speculative_mean_accepted_tokens"] == 3.75
    )
    stats = {"prefix_cache_hits_tokens": 0, "prefix_cache_queries_tokens": 0, "num_preemptions": 0}
    idle = dict(stats, speculative_draft_tokens=8, speculative_accepted_tokens=4, speculative_verify_steps=2)
    busy = dict(idle, speculative_draft_tokens=28, speculative_accepted_tokens=19, speculative_verify_steps=6)
    assert offline.engine_counters(idle, busy)["speculative_acceptance_rate"] == 0.75
    assert offline.engine_counters(idle, busy)["speculative_mean_accepted_tokens"] == 3.75
    assert offline.engine_counters(idle, idle)["speculative_acceptance_rate"] is None


# ---- tuning --------------------------------------------------------------------------------------
def fake_report(tpot_p99, throughput):
    stats = {"mean": tpot_p99, "p50": tpot_p99, "p90": tpot_p99, "p99": tpot_p99}
    return {"output_throughput": throughput, "tpot_ms": stats, "ttft_ms": stats, "e2e_ms": stats}


def fake_engine(oom_at=None, tpot_per_seq=1.0, chunked_gain=1.1):
    calls = []

    def run_point(options):
        calls.append(dict(options))
        size = options["max_batch_size"]
        if oom_at is not None and size >= oom_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        gain = chunked_gain if options["enable_chunked_context"] else 1.0
        return fake_report(tpot_per_seq * size, 100.0 * size * gain)

    return run_point, calls


def test_tune_stops_at_oom_and_backs_off_20_percent():
    run_point, calls = fake_engine(oom_at=64)
    options, trials = tune.tune(run_point, {"dtype": "bfloat16"}, tune.Targets(), start=8, limit=1024)
    assert [t.options["max_batch_size"] for t in trials[:4]] == [8, 16, 32, 64]
    assert trials[3].outcome == "out of memory" and trials[3].report is None
    assert options == {"enable_chunked_context": True, "dtype": "bfloat16", "max_batch_size": 25}
    assert [(t.options["max_batch_size"], t.options["enable_chunked_context"]) for t in trials[4:]] == [
        (25, True),
        (25, False),
    ]
    assert len(calls) == len(trials) == 6


def test_tune_stops_at_a_missed_latency_target_and_keeps_the_faster_chunking():
    run_point, _ = fake_engine(tpot_per_seq=1.0, chunked_gain=0.9)
    options, trials = tune.tune(run_point, {}, tune.Targets(p99_tpot_ms=40.0), start=4, limit=1024)
    assert trials[-3].options["max_batch_size"] == 64 and "p99 TPOT 64.0 ms > 40 ms" in trials[-3].outcome
    assert options == {"enable_chunked_context": False, "max_batch_size": 25}


def test_tune_without_a_ceiling_keeps_the_limit_and_reuses_its_run():
    run_point, calls = fake_engine()
    options, trials = tune.tune(run_point, {}, tune.Targets(), start=2, limit=8)
    assert options["max_batch_size"] == 8
    assert [t.options["max_batch_size"] for t in trials] == [2, 4, 8, 8]  # (8, chunked) ran once
    assert len(calls) == 4


def test_tune_fails_clearly_when_the_start_already_fails():
    run_point, _ = fake_engine(oom_at=1)
    with pytest.raises(ValueError, match="max_batch_size=8 already fails"):
        tune.tune(run_point, {}, tune.Targets(), start=8, limit=64)


def test_other_errors_are_not_mistaken_for_oom():
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))

    def broken(options):
        raise ValueError("bad option")

    with pytest.raises(ValueError, match="bad option"):
        tune.tune(broken, {}, tune.Targets(), start=1, limit=4)


def test_write_config_is_a_flat_mapping_of_engine_options(tmp_path):
    path = tmp_path / "tuned.yaml"
    tune.write_config({"max_batch_size": 48, "model": None, "enable_chunked_context": True}, path, "a\nb")
    assert path.read_text().startswith("# a\n# b\n")
    assert yaml.safe_load(path.read_text()) == {"max_batch_size": 48, "enable_chunked_context": True}
    with pytest.raises(ValueError, match="batch_size"):
        tune.write_config({"batch_size": 4}, path, "")


def test_tune_config_keys_are_engine_config_fields():
    run_point, _ = fake_engine(oom_at=32)
    options, _ = tune.tune(run_point, {"scheduler_policy": "max_utilization"}, tune.Targets(), 4, 64)
    assert set(options) <= set(ENGINE_OPTIONS)


# ---- sweep values --------------------------------------------------------------------------------
def test_sweep_values_are_typed_like_the_flags():
    import argparse

    parser = add_bench_arguments(argparse.ArgumentParser())
    assert parse_sweep("max_batch_size=8, 16,32") == ("max_batch_size", ["8", "16", "32"])
    assert typed_values(parser, "max_batch_size", ["8", "16"]) == ("max_batch_size", [8, 16])
    assert typed_values(parser, "enable-chunked-context", ["true", "off"]) == (
        "enable_chunked_context",
        [True, False],
    )
    assert typed_values(parser, "batch_size", ["2"]) == ("max_concurrency", [2])
    assert typed_values(parser, "request_rate", ["inf", "2.5"]) == ("request_rate", [math.inf, 2.5])
    for bad in ("max_batch_size", "=1,2", "max_batch_size="):
        with pytest.raises(ValueError, match="NAME=V1,V2"):
            parse_sweep(bad)
    with pytest.raises(ValueError, match="not an option"):
        typed_values(parser, "nonsense", ["1"])
