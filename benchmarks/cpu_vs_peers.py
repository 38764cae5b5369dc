"""tensorjet on the CPU against its peers, on the bundled SmolLM2-135M-Instruct GGUF (Q4_1), same run:

  tensorjet, GGUF blocks (the CPU default, `quantization=gguf`) and fp32 (`dtype=float32`, the reference)
  HF transformers `generate` (fp32, its own load of the same GGUF)
  llama.cpp on the very same file: `llama-bench` and `llama-server`

Workloads (EOS ignored, so every side produces the requested tokens):
  prefill    128-token prompt: prompt tokens/s (llama-bench pp128; tensorjet: 128 / time to first token)
  decode     batch 1, 128 new tokens after that prompt: tokens/s (llama-bench tg128; tensorjet and HF:
             the tokens after the first over the time after it)
  32 x 64    32 concurrent requests of 128 random tokens, 64 out each: output tokens/s, through
             `tensorjet bench` for both engines: tensorjet offline (in-process), llama.cpp served by
             `llama-server -np 32` (`tensorjet bench --url`); HF: one padded batch of 32 `generate`
  perplexity the first --ppl_chars characters of --data, 512-token windows (`tensorjet eval ppl`'s
             numbers): GGUF blocks against fp32, also with every row through the decode kernels, and
             with every scored token through the one-token decode step (teacher-forced)

Build llama.cpp's two tools (llama-bench, llama-server) and pass their directory:

    python benchmarks/cpu_vs_peers.py --llama_bin /path/to/llama.cpp/build/bin \\
        --data tinyshakespeare.txt [--out benchmarks/results/cpu_vs_peers.json]

`--sides` and `--workloads` run a part of it (e.g. `--sides tensorjet_gguf,hf_transformers
--workloads batch32` while iterating). The results JSON is written under benchmarks/results/; the table
prints last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT_LEN, DECODE_TOKENS, BATCH, BATCH_OUT = 128, 128, 32, 64
LLAMA_TOOLS = ("llama-bench", "llama-server")
# Results keys -> table columns
SIDES = {
    "tensorjet_gguf": "tensorjet gguf",
    "tensorjet_fp32": "tensorjet fp32",
    "hf_transformers": "HF fp32",
    "llama_cpp": "llama.cpp",
}
WORKLOADS = ("batch1", "batch32")  # prefill and decode of one prompt; 32 x 64


def random_prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 49000, (n,), generator=g).tolist()


def llama_tools(directory: Path | None) -> dict[str, Path]:
    """The llama.cpp binaries in `directory`; exits saying which are missing."""
    if directory is None:
        sys.exit("--llama_bin is needed to run llama.cpp (or leave llama_cpp out of --sides)")
    tools = {name: directory / name for name in LLAMA_TOOLS}
    missing = [str(path) for path in tools.values() if not os.access(path, os.X_OK)]
    if missing:
        sys.exit(
            f"llama.cpp binaries missing: {', '.join(missing)}. Build them (cmake, then "
            "`cmake --build . --target llama-bench llama-server`) and pass their directory as --llama_bin"
        )
    return tools


# ---- tensorjet ------------------------------------------------------------------------------------


def bench_tensorjet(dtype: str, runs: int) -> dict:
    """Prefill and batch-1 decode of one engine; the best of `runs` (each on a fresh prompt)."""
    from tensorjet import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(device="cpu", dtype=dtype)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    llm.generate([random_prompt(16, 99)], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    prefill, decode, first_tokens = 0.0, 0.0, None
    for run in range(runs):
        begin = time.perf_counter()
        out = llm.generate([random_prompt(PROMPT_LEN, run)], params, use_tqdm=False)[0]
        total = time.perf_counter() - begin
        ttft = out.metrics.first_token_time - out.metrics.arrival_time
        prefill = max(prefill, PROMPT_LEN / ttft)
        decode = max(decode, (DECODE_TOKENS - 1) / (total - ttft))
        first_tokens = first_tokens or out.outputs[0].token_ids[:8]  # HF's prompt: seed 0
    result = {
        "weight_format": llm.engine.runner.weight_format,
        "weight_bytes": llm.engine.runner.weight_bytes,
        "startup_s": startup,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "first_tokens": first_tokens,
    }
    llm.shutdown()
    return result


def bench_tool(args: list[str], report: Path) -> dict:
    """`tensorjet bench` in a subprocess (its own engine or a --url), returning its JSON report."""
    command = [sys.executable, "-m", "tensorjet.cli", "bench", *args, "--report_json", str(report)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # this run's thread count
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return json.loads(report.read_text())


def batch_workload() -> list[str]:
    return [
        "--dataset", "random", "--num_requests", str(BATCH), "--batch_size", str(BATCH),
        "--input_len", str(PROMPT_LEN), "--output_len", str(BATCH_OUT), "--warmup", "2",
    ]  # fmt: skip


def perplexities(data: Path, chars: int) -> dict:
    """fp32, GGUF blocks as the engine runs them (a prompt's rows through the bf16 weights), and GGUF
    blocks through the decode kernels for every row (int4 projections, int8 head): what a generated
    token is computed with."""
    from tensorjet import LLM
    from tensorjet.eval.perplexity import perplexity
    from tensorjet.quant import gguf

    text = data.read_text(encoding="utf-8")
    result = {}
    for key, dtype, decode_kernels in (
        ("float32", "float32", False),
        ("gguf", "auto", False),
        ("gguf_decode_kernels", "auto", True),
    ):
        limits = gguf.SMALL_BATCH_MAX_ROWS, gguf.HEAD_INT8_MAX_ROWS
        if decode_kernels:
            gguf.SMALL_BATCH_MAX_ROWS = gguf.HEAD_INT8_MAX_ROWS = 1 << 30
        try:
            llm = LLM(device="cpu", dtype=dtype)
            result[key] = perplexity(llm, text, max_chars=chars).to_dict()
            llm.shutdown()
        finally:
            gguf.SMALL_BATCH_MAX_ROWS, gguf.HEAD_INT8_MAX_ROWS = limits
    llm = LLM(device="cpu")
    result["gguf_decode_step"] = {"perplexity": decode_step_perplexity(llm, text[:chars])}
    llm.shutdown()
    return result


def decode_step_perplexity(llm, text: str) -> float:
    """The perplexity `tensorjet eval ppl` reports (same windows, same scored positions), with each scored
    token's logits from a one-token step, as in decoding: each window's unscored head is prefilled, then
    its tokens are fed one at a time (teacher-forced) into the idle engine's cache."""
    import math

    from tensorjet.eval.perplexity import (
        DEFAULT_CONTEXT_LEN,
        DEFAULT_SCORE_FROM,
        first_scored_position,
        tokenizer_adds_bos,
        windows_of,
    )
    from tensorjet.layers.attention import AttentionMetadata

    tokenizer, runner = llm.tokenizer, llm.engine.runner
    model, block = runner.model, runner.block_size
    n, first = DEFAULT_CONTEXT_LEN, first_scored_position(DEFAULT_CONTEXT_LEN, DEFAULT_SCORE_FROM)
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    windows = windows_of(tokenizer.encode(text, add_special_tokens=False), n, bos)
    table = torch.arange(-(-n // block), dtype=torch.int32)[None]  # the cache's first blocks, in order

    def meta(rows: int, length: int) -> AttentionMetadata:
        return AttentionMetadata([rows], [length], torch.arange(length - rows, length), table, block)

    def score() -> list[float]:
        nlls = []
        with torch.inference_mode():
            for window in windows:
                ids = torch.tensor(window)
                hidden = model(ids[: first + 1], torch.arange(first + 1), meta(first + 1, first + 1))
                for pos in range(first + 1, n):
                    logits = model.compute_logits(hidden[-1:])[0]
                    nlls.append(-torch.log_softmax(logits.double(), -1)[window[pos]].item())
                    hidden = model(ids[pos : pos + 1], torch.tensor([pos]), meta(1, pos + 1))
        return nlls

    nlls = llm.loop.call(score)  # on the engine's thread, which owns the model
    return math.exp(math.fsum(nlls) / len(nlls))


# ---- HF transformers ----------------------------------------------------------------------------


def bench_hf(workloads: set[str]) -> dict:
    from transformers import AutoModelForCausalLM

    from tensorjet.models.loader import default_gguf

    path = default_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    greedy = dict(do_sample=False, pad_token_id=0)
    prompt = torch.tensor([random_prompt(PROMPT_LEN, 0)])
    batch = torch.tensor([random_prompt(PROMPT_LEN, 100 + i) for i in range(BATCH)])
    result = {}
    with torch.no_grad():
        model.generate(prompt[:, :16], max_new_tokens=4, **greedy)  # warm-up
        if "batch1" in workloads:
            begin = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, **greedy)
            ttft = time.perf_counter() - begin
            begin = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, **greedy)
            decode_s = time.perf_counter() - begin - ttft
            result["prefill_tok_s"] = PROMPT_LEN / ttft
            result["decode_tok_s"] = (DECODE_TOKENS - 1) / decode_s
            result["first_tokens"] = out[0, PROMPT_LEN : PROMPT_LEN + 8].tolist()
        if "batch32" in workloads:
            begin = time.perf_counter()
            model.generate(batch, max_new_tokens=BATCH_OUT, min_new_tokens=BATCH_OUT, **greedy)
            result["batch32_output_tok_s"] = BATCH * BATCH_OUT / (time.perf_counter() - begin)
    return result


# ---- llama.cpp ----------------------------------------------------------------------------------


def bench_llama_cpp(
    tools: dict[str, Path], gguf: Path, threads: int, scratch: Path, workloads: set[str]
) -> dict:
    """pp128 and tg128 from llama-bench; 32 x 64 from llama-server -np 32 driven by `tensorjet bench`."""
    result = {}
    if "batch1" in workloads:
        command = [
            str(tools["llama-bench"]),
            "-m",
            str(gguf),
            "-p",
            str(PROMPT_LEN),
            "-n",
            str(DECODE_TOKENS),
        ]
        command += ["-t", str(threads), "-o", "json"]
        rows = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        speed = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}
        result["build_commit"] = rows[0].get("build_commit", "?")
        result["prefill_tok_s"], result["decode_tok_s"] = speed["prefill"], speed["decode"]
    if "batch32" in workloads:
        port = free_port()
        context = BATCH * (PROMPT_LEN + BATCH_OUT + 64)
        server = subprocess.Popen(
            [str(tools["llama-server"]), "-m", str(gguf), "-np", str(BATCH), "-c", str(context)]
            + ["-t", str(threads), "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", server)
            url = f"http://127.0.0.1:{port}"
            report = bench_tool(["--url", url, *batch_workload()], scratch / "llama.json")
        finally:
            server.terminate()
            server.wait(timeout=30)
        result["batch32_output_tok_s"] = report["output_throughput"]
    return result


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    from urllib.request import urlopen

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"llama-server exited with code {server.returncode} before answering {url}")
        try:
            with urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"llama-server did not answer {url} within {timeout:.0f} s")


# ---- report -------------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    sides = [(SIDES[key], result.get(key, {})) for key in SIDES]
    print(f"\n{'':<22}" + "".join(f"{name:>16}" for name, _ in sides))
    for key, label in (
        ("prefill_tok_s", "prefill 128 (tok/s)"),
        ("decode_tok_s", "decode bs1 (tok/s)"),
        ("batch32_output_tok_s", "32 x 64 (out tok/s)"),
    ):
        print(f"{label:<22}" + "".join(f"{side.get(key, float('nan')):>16.1f}" for _, side in sides))
    ppl = result.get("perplexity")
    if ppl:
        ref = ppl["float32"]["perplexity"]
        for key, label in (
            ("gguf", "perplexity"),
            ("gguf_decode_kernels", "  decode kernels"),
            ("gguf_decode_step", "  decode step"),
        ):
            ours = ppl[key]["perplexity"]
            print(f"{label:<22}{ours:>16.4f}{ref:>16.4f}   ({(ours / ref - 1) * 100:+.2f}% vs fp32)")
    gguf = result.get("tensorjet_gguf", {})
    for key, label in (("llama_cpp", "llama.cpp"), ("hf_transformers", "HF")):
        ratios = [
            f"{name} {gguf[metric] / result[key][metric]:.2f}x"
            for metric, name in (("decode_tok_s", "decode"), ("batch32_output_tok_s", "32 x 64"))
            if metric in gguf and metric in result.get(key, {})
        ]
        if ratios:
            print(f"tensorjet gguf / {label}: {', '.join(ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--llama_bin", type=Path, help="directory with llama-bench, llama-server (needed for llama_cpp)"
    )
    parser.add_argument("--data", type=Path, default=None, help="text for perplexity; omitted: not measured")
    parser.add_argument("--ppl_chars", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="batch-1 runs per engine (the best is kept)")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="CPU threads of every engine (llama.cpp's -t); default: PyTorch's, one per core",
    )
    parser.add_argument(
        "--sides",
        default=",".join(SIDES),
        help=f"comma-separated subset of {', '.join(SIDES)} (a quicker partial run)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated subset of batch1 (prefill and decode of one prompt), batch32 (32 x 64)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_vs_peers.json"))
    args = parser.parse_args()
    sides, workloads = set(args.sides.split(",")), set(args.workloads.split(","))
    if not sides <= set(SIDES) or not workloads <= set(WORKLOADS):
        parser.error(f"--sides takes {', '.join(SIDES)}; --workloads takes {', '.join(WORKLOADS)}")
    tools = llama_tools(args.llama_bin) if "llama_cpp" in sides else {}
    from tensorjet.models.loader import default_gguf

    threads = args.threads
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # what tensorjet's engine thread runs on
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}",
        "torch": torch.__version__,
        "threads": threads,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "model": default_gguf().name,
    }
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if "llama_cpp" in sides:
            result["llama_cpp"] = bench_llama_cpp(tools, default_gguf(), threads, scratch, workloads)
        for dtype, key in (("auto", "tensorjet_gguf"), ("float32", "tensorjet_fp32")):
            if key not in sides:
                continue
            result[key] = bench_tensorjet(dtype, args.runs) if "batch1" in workloads else {}
            if "batch32" in workloads:
                report = bench_tool(
                    [*batch_workload(), "--device", "cpu", "--dtype", dtype], scratch / f"{key}.json"
                )
                result[key]["batch32_output_tok_s"] = report["output_throughput"]
        if "hf_transformers" in sides:
            result["hf_transformers"] = bench_hf(workloads)
    if args.data is not None:
        result["perplexity"] = perplexities(args.data, args.ppl_chars)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    print_table(result)


if __name__ == "__main__":
    main()
