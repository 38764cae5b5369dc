"""`tensorjet bench` / `tensorjet tune` end to end on CPU: the guide's command on the bundled model,
the fp8 error, serving mode against the real server, sweeps, plots and the tuned YAML.
Engines other than the guide's run use a tiny random-weight model so the whole file stays fast."""

import json
import math
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import yaml

from tensorjet.bench.cli import main
from tensorjet.config import ENGINE_OPTIONS

TABLE_LABELS = (
    "request throughput",
    "output token throughput",
    "total token throughput",
    "TTFT",
    "TPOT",
    "ITL",
    "E2E latency",
    "peak GPU memory",
    "GPU utilization",
    "KV cache usage",
    "prefix cache hit rate",
    "preemptions",
    "speculative decoding",
)
LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
TINY_VOCAB = 512


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama config and word-level tokenizer; with load_format=dummy it loads in ~0.1 s."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(TINY_VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", bos_token="w1", eos_token="w2")
    fast.save_pretrained(path)
    LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
    ).save_pretrained(path)
    return str(path)


def tiny_args(model_dir):
    return [
        "--model",
        model_dir,
        "--load_format",
        "dummy",
        "--device",
        "cpu",
        "--kv_cache_max_tokens",
        "4096",
    ]


def check_report(report, num_requests, input_len, output_len, served=False):
    """Token counts match the workload, percentiles are ordered, throughputs are tokens / duration."""
    assert report["num_completed"] == num_requests and report["num_failed"] == 0
    assert report["total_input_tokens"] == num_requests * input_len
    assert report["total_output_tokens"] == num_requests * output_len
    duration = report["duration_s"]
    assert duration > 0
    assert report["request_throughput"] == pytest.approx(num_requests / duration)
    assert report["output_throughput"] == pytest.approx(num_requests * output_len / duration)
    assert report["total_token_throughput"] == pytest.approx(
        num_requests * (input_len + output_len) / duration
    )
    for key in LATENCY_KEYS:
        stats = report[key]
        assert set(stats) == {"mean", "p50", "p90", "p99"}
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert report["ttft_ms"]["p99"] <= report["e2e_ms"]["p99"]
    # One update per token here, so the gaps of a request add up to its time after the first token
    # (a server's stream ends a little later, with the usage chunk and [DONE]).
    itl_total = report["itl_ms"]["mean"] * num_requests * (output_len - 1)
    after_first = num_requests * (report["e2e_ms"]["mean"] - report["ttft_ms"]["mean"])
    if served:
        assert 0 < itl_total <= after_first
    else:
        assert itl_total == pytest.approx(after_first)


@pytest.mark.slow  # the bundled model
def test_guide_command_on_cpu(tmp_path, capsys):
    """The guide's command (FP8 weights), shrunk to a CPU-sized workload."""
    out_json = tmp_path / "report.json"
    argv = ["bench", "--batch_size", "4", "--input_len", "16", "--output_len", "8", "--dtype", "fp8"]
    argv += ["--num_requests", "8", "--warmup", "1", "--device", "cpu", "--kv_cache_max_tokens", "2048"]
    assert main([*argv, "--report_json", str(out_json), "--plot", str(tmp_path / "plots")]) == 0
    stdout = capsys.readouterr().out
    for label in TABLE_LABELS:
        assert label in stdout
    report = json.loads(out_json.read_text())
    check_report(report, 8, 16, 8)
    assert report["peak_gpu_memory_gb"] is None and report["gpu_utilization_pct"] is None  # CPU
    # FP8 decoder layers (1 byte per weight) beside the fp32 embedding: well under the 0.54 GB of fp32
    assert report["weight_format"] == "fp8 (online)" and 0.15 < report["weight_memory_gb"] < 0.3
    assert report["gpu_sm_clock_mhz"] is None and report["gpu_power_w"] is None
    assert 0 < report["kv_cache_usage"]["peak"] <= 1
    assert 0 <= report["prefix_cache_hit_rate"] <= 1 and report["num_preemptions"] == 0
    config = report["config"]
    assert config["mode"] == "offline" and config["max_concurrency"] == 4 and config["num_requests"] == 8
    assert config["request_rate"] is None  # unlimited (inf) is not JSON
    assert config["engine_options"]["dtype"] == "fp8"
    env = report["environment"]
    assert env["torch_version"] == torch.__version__ and env["cpu_count"] >= 1
    assert env["device"] == "cpu" and env["device_name"] and env["tensorjet_version"]
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "latency_cdf.png",
        "throughput_over_time.png",
    ]


def test_an_unbuilt_weight_format_exits_2_with_the_not_available_message(capsys):
    argv = ["bench", "--batch_size", "64", "--input_len", "128", "--output_len", "256", "--dtype", "int8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "int8" in err and "not available" in err
    assert "Traceback" not in err


def test_shared_prefix_workload_hits_the_prefix_cache(tiny_model, tmp_path):
    out_json = tmp_path / "r.json"
    argv = ["bench", *tiny_args(tiny_model), "--dataset", "shared_prefix", "--prefix_len", "32"]
    argv += ["--input_len", "16", "--output_len", "4", "--num_requests", "8", "--batch_size", "1"]
    assert main([*argv, "--warmup", "0", "--report_json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    check_report(report, 8, 48, 4)
    # One at a time: 2 full blocks (32 tokens) of each later prompt come from the cache.
    assert report["prefix_cache_hit_rate"] == pytest.approx(7 * 32 / (8 * 48))


def test_speculative_bench_reports_acceptance_and_the_speed_up_without_speculation(
    tiny_model, tmp_path, capsys
):
    """--speculative_model runs the workload twice (a fresh engine without speculation second)."""
    out_json = tmp_path / "r.json"
    argv = ["bench", *tiny_args(tiny_model), "--input_len", "24", "--output_len", "24", "--num_requests", "2"]
    argv += ["--speculative_model", "[ngram]", "--prompt_lookup_min", "1", "--warmup", "0"]
    assert main([*argv, "--report_json", str(out_json)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    # Several tokens per update: the gaps between updates are fewer than the tokens after the first.
    assert report["num_completed"] == 2 and report["total_output_tokens"] == 2 * 24
    assert 0 < report["speculative_acceptance_rate"] <= 1 and report["speculative_mean_accepted_tokens"] > 0
    base = report["without_speculation"]
    assert report["speculative_speedup"] == pytest.approx(
        report["output_throughput"] / base["output_throughput"]
    )
    assert set(base) >= {"output_throughput", "tpot_ms", "itl_ms"}
    assert "accepted tokens per verify step" in table and "vs no speculation" in table
    assert report["config"]["engine_options"]["speculative_model"] == "[ngram]"


def test_jsonl_dataset_and_poisson_arrivals(tiny_model, tmp_path):
    data = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "w5 w6 w7 w8", "output_tokens": 3},
        {"input_ids": [9, 10, 11, 12, 13], "output_tokens": 5},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out_json = tmp_path / "r.json"
    argv = ["bench", *tiny_args(tiny_model), "--dataset", str(data), "--request_rate", "50", "--warmup", "0"]
    assert main([*argv, "--report_json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert report["num_completed"] == 2
    assert (report["total_input_tokens"], report["total_output_tokens"]) == (9, 8)
    assert report["config"]["request_rate"] == 50


@pytest.mark.slow  # a benchmark per point, and a plot
def test_sweep_writes_the_table_and_plot(tiny_model, tmp_path, capsys):
    out_json = tmp_path / "sweep.json"
    argv = ["bench", *tiny_args(tiny_model), "--input_len", "16", "--output_len", "4", "--num_requests", "8"]
    argv += [
        "--warmup",
        "0",
        "--sweep",
        "max_batch_size=2,8",
        "--plot",
        str(tmp_path),
        "--report_json",
        str(out_json),
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "max_batch_size" in stdout and "out tok/s" in stdout
    assert (tmp_path / "sweep.png").stat().st_size > 0
    sweep = json.loads(out_json.read_text())
    assert sweep["sweep"] == "max_batch_size" and [p["value"] for p in sweep["points"]] == [2, 8]
    for point in sweep["points"]:
        check_report(point["report"], 8, 16, 4)
        assert point["report"]["config"]["engine_options"]["max_batch_size"] == point["value"]


@pytest.mark.slow  # a benchmark per step of the search
def test_tune_writes_a_config_that_serve_accepts(tiny_model, tmp_path, capsys):
    out_yaml = tmp_path / "tuned.yaml"
    argv = ["tune", *tiny_args(tiny_model), "--input_len", "16", "--output_len", "4", "--num_requests", "8"]
    argv += ["--warmup", "0", "--start_batch_size", "2", "--batch_size_limit", "4", "--output", str(out_yaml)]
    assert main([*argv, "--target_p99_tpot_ms", "10000"]) == 0
    assert "recommended" in capsys.readouterr().out
    config = yaml.safe_load(out_yaml.read_text())
    assert set(config) <= set(ENGINE_OPTIONS)
    assert config["max_batch_size"] == 4 and isinstance(config["enable_chunked_context"], bool)
    assert config["model"] == tiny_model and config["load_format"] == "dummy"
    serve_cli = pytest.importorskip("tensorjet.serve.cli")
    parsed = serve_cli.load_config(str(out_yaml))
    for key, value in config.items():
        assert getattr(parsed, key) == value


# ---- serving mode --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The real `tensorjet serve` on the tiny model, in a subprocess (its log goes to a file, which
    unlike a pipe never fills up and blocks it)."""
    pytest.importorskip("tensorjet.serve.cli")
    port = free_port()
    serve_argv = ["serve", tiny_model, "--load_format", "dummy", "--device", "cpu", "--port", str(port)]
    code = f"from tensorjet.serve.cli import main; main({serve_argv!r})"
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.mark.slow  # starts a server
def test_serving_mode_times_streamed_chunks(server, tmp_path):
    out_json = tmp_path / "serving.json"
    argv = [
        "bench",
        "--url",
        server,
        "--vocab_size",
        str(TINY_VOCAB),
        "--input_len",
        "16",
        "--output_len",
        "6",
    ]
    argv += ["--num_requests", "12", "--max_concurrency", "4", "--request_rate", "100", "--warmup", "1"]
    assert (
        main([*argv, "--dataset", "shared_prefix", "--prefix_len", "16", "--report_json", str(out_json)]) == 0
    )
    report = json.loads(out_json.read_text())
    check_report(report, 12, 32, 6, served=True)  # token counts from the server's usage chunk
    assert report["config"]["mode"] == "serving" and report["environment"]["device"] is None
    # Engine counters come from the server's /metrics.
    assert 0 < report["prefix_cache_hit_rate"] <= 11 * 16 / (12 * 32)
    assert report["num_preemptions"] == 0 and report["kv_cache_usage"] is not None
    assert not math.isnan(report["itl_ms"]["p99"])


def test_serving_mode_rejects_engine_options_and_unreachable_servers(capsys):
    assert main(["bench", "--url", "http://127.0.0.1:9", "--max_batch_size", "8"]) == 2
    assert "configure the server" in capsys.readouterr().err
    assert main(["bench", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err
