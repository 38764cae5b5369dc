"""Tensor parallelism over one host's GPUs, each size against one GPU in the same run (dummy weights of a
preset's shapes). Parts, each written to JSON as it ends, the table last:

- all-reduce: what one decode step's collectives cost (every layer all-reduces its hidden state twice:
  after the attention output and after the MLP): NCCL's time for that message at batch 1 and 64 (bf16,
  replayed from a CUDA graph as the engine's decode graphs do), and its bus bandwidth on 256 MB
  (bytes x 2(N-1)/N per second), one process per GPU;
- agreement: greedy tokens of a small preset's shapes (Llama-3.2-1B's, 4 layers, random fp32 weights
  saved as a checkpoint) at each size against size 1;
- per size: batch-1 decode (128-token prompt, 256 new tokens), ms per token against its bound, (the
  decode-step bytes of one rank's share / the copy rate) + 2 x layers all-reduces at the measured batch-1
  latency; `requests` requests of `in_out` in / out: output tok/s, in all and per GPU, beside
  TensorRT-LLM's published per-GPU figure where there is one; rank 0's peak memory;
- --kill_worker: `tensorjet serve --tensor_parallel_size N` under `tensorjet bench --url` at 64 streams,
  then one worker killed with SIGKILL: how long until /health answers 503 and the client has its answers
  (a hang shows as the timeout). The server needs fastapi, uvicorn and pydantic where it runs.

    python benchmarks/tp_gpu.py --sizes 1,2 --out benchmarks/results/tp_gpu.json
    python benchmarks/tp_gpu.py --model meta-llama/Meta-Llama-3-70B --dtype fp8 --sizes 2 --skip_agreement
    python benchmarks/tp_gpu.py --sizes 1,2 --kill_worker            # the serving part too
    python benchmarks/tp_gpu.py --device cpu --model DIR --sizes 1,2 --requests 8 --in_out 16 \\
        --agreement_model DIR --agreement_layers 2 --kill_worker     # every path, on the CPU (gloo)
    (DIR: a small Llama's config.json with a tokenizer, which the server needs)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cpu_vs_peers import free_port
from gpu_suite import decode_latency, release_gpu_memory, set_model, throughput, warm_up
from weight_formats import bytes_per_decode_step, copy_rate_tbps, engine

# TensorRT-LLM's published output tok/s per GPU, 1000 in / 1000 out (Llama-3.3-70B FP8).
PUBLISHED_PER_GPU = {
    ("H200", "llama-3-70b", "fp8", 1): 2909,
    ("H200", "llama-3-70b", "fp8", 2): 2587,
    ("H100", "llama-3-70b", "fp8", 2): 2209,
}
LARGE_MESSAGE = 256 * 2**20


# ---- all-reduce ------------------------------------------------------------------------------------
def _allreduce_rank(rank: int, size: int, port: int, messages: list[int], cuda: bool, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    dtype = torch.bfloat16 if cuda else torch.float32  # gloo sums float32
    seconds = {}
    for nbytes in messages:
        x = torch.ones(nbytes // dtype.itemsize, dtype=dtype, device=device)
        repeats = 20 if nbytes >= LARGE_MESSAGE else 200
        seconds[nbytes] = _time_allreduce(x, repeats, cuda and nbytes < LARGE_MESSAGE)
    if rank == 0:
        results.put(seconds)
    dist.barrier()
    dist.destroy_process_group()


def _time_allreduce(x: torch.Tensor, repeats: int, graphed: bool) -> float:
    """Seconds per all-reduce of x: `repeats` of them, replayed from one CUDA graph when `graphed`."""
    for _ in range(5):
        dist.all_reduce(x)

    def run() -> None:
        for _ in range(repeats):
            dist.all_reduce(x)

    if graphed:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        run = graph.replay

    run()
    if x.is_cuda:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    run()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def allreduce_times(size: int, hidden: int, cuda: bool) -> dict:
    messages = {"batch 1": hidden * 2, "batch 64": 64 * hidden * 2, "256 MB": LARGE_MESSAGE}
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port()
    mp.start_processes(
        _allreduce_rank,
        args=(size, port, sorted(messages.values()), cuda, results),
        nprocs=size,
        join=True,
        start_method="spawn",
    )
    seconds = results.get()
    out = {name: {"bytes": n, "us": seconds[n] * 1e6} for name, n in messages.items()}
    out["bus_gb_s"] = LARGE_MESSAGE * 2 * (size - 1) / size / seconds[LARGE_MESSAGE] / 1e9
    return out


# ---- engines ---------------------------------------------------------------------------------------
def random_checkpoint(preset: str, directory: Path, layers: int) -> str:
    """A checkpoint of `preset`'s shapes with `layers` layers and random fp32 weights, saved like a
    downloaded one: dummy weights are drawn per rank, so only loaded weights are the same model at every
    size. The LM head is spread wide (std 1) so that greedy choices are not near-ties that summation
    order could flip."""
    import transformers

    from tensorjet.models.loader import resolve_model

    config = resolve_model(preset, load_format="dummy").hf_config
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(directory)
    return str(directory)


def agreement(model: str, device: str, sizes: list[int], prompts: int, tokens: int) -> dict:
    """Greedy tokens at each size above 1, fp32, against size 1's."""
    from tensorjet import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    ids = [[(97 * p + 13 * i) % 1000 + 10 for i in range(24 + 8 * p)] for p in range(prompts)]
    tokens_by_size = {}
    for size in sorted({1, *sizes}):
        llm = LLM(
            model=model, dtype="float32", device=device, tensor_parallel_size=size, max_batch_size=prompts
        )
        try:
            outs = llm.generate(ids, params, use_tqdm=False)
            tokens_by_size[size] = [o.outputs[0].token_ids for o in outs]
        finally:
            llm.shutdown()
        release_gpu_memory()
    reference = tokens_by_size.pop(1)
    return {
        str(size): {
            "identical_prompts": sum(a == b for a, b in zip(got, reference)),
            "prompts": prompts,
            "first_difference": [_first_difference(a, b) for a, b in zip(got, reference)],
        }
        for size, got in tokens_by_size.items()
    }


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def engine_parts(args, size: int, copy: float, allreduce: dict | None, part: dict) -> None:
    on_gpu = args.device.startswith("cuda")
    small = not on_gpu
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    kv_cache_dtype = "fp8" if args.dtype == "fp8" else "auto"
    llm = engine(args.model, args.dtype, args.device, kv_cache_dtype, tensor_parallel_size=size)
    try:
        part["load_and_capture_s"] = time.perf_counter() - begin
        part["weight_gb_rank0"] = llm.stats()["weight_bytes"] / 1e9
        config = llm.engine.runner.model.config
        step_bytes = bytes_per_decode_step(llm)  # rank 0's share
        allreduce_us = 0.0 if allreduce is None else allreduce["batch 1"]["us"]
        collectives_ms = 2 * config.num_hidden_layers * allreduce_us / 1e3
        part["decode_bound_ms"] = step_bytes / (copy * 1e12) * 1e3 + collectives_ms
        part["decode_collectives_ms"] = collectives_ms
        if on_gpu:
            warm_up(llm, seed=98)
        lengths = (16, 8) if small else ()
        part["decode_b1"] = decode_latency(llm, 1, *lengths)
        b1 = part["decode_b1"]["ms_per_step"]
        print(f"TP={size}: b1 {b1:.3f} ms/token (bound {part['decode_bound_ms']:.3f})", flush=True)
        part["throughput"] = throughput(llm, [(args.in_out, args.in_out)] * args.requests)
        part["throughput"]["output_tok_s_per_gpu"] = part["throughput"]["output_tok_s"] / size
        if on_gpu:
            part["peak_memory_gb_rank0"] = torch.cuda.max_memory_allocated() / 1e9
        print(
            f"TP={size}: {args.in_out}x{args.in_out} {part['throughput']['output_tok_s']:.0f} tok/s",
            flush=True,
        )
    finally:
        llm.shutdown()
        release_gpu_memory()


# ---- a worker killed under load -------------------------------------------------------------------
def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def _workers(server_pid: int) -> list[int]:
    """The server's tensor-parallel worker processes (its children started by multiprocessing's spawn;
    not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == server_pid and b"spawn_main" in command:
            found.append(int(entry.name))
    return sorted(found)


def kill_worker_under_load(args, size: int) -> dict:
    """Serve at `size`, load it with 64 streams from `tensorjet bench --url`, kill one worker."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "tensorjet.cli", "serve", args.model, "--load_format", "dummy"]
    serve += ["--dtype", args.dtype, "--device", args.device, "--tensor_parallel_size", str(size)]
    serve += ["--port", str(port), "--max_batch_size", "64"]
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would stall the server once full
    server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, text=True)
    result: dict = {"size": size}
    try:
        deadline = time.monotonic() + args.start_timeout
        while _get(f"{base}/health") != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"the server did not start: {log.read()[-2000:]}")
            time.sleep(1)
        bench = [sys.executable, "-m", "tensorjet.cli", "bench", "--url", base, "--batch_size", "64"]
        bench += ["--num_requests", "256", "--input_len", "128", "--output_len", "2048", "--warmup", "0"]
        bench += ["--vocab_size", "1000"]
        client_log = tempfile.TemporaryFile(mode="w+")
        client = subprocess.Popen(bench, stdout=client_log, stderr=subprocess.STDOUT, text=True)
        time.sleep(args.load_seconds)  # the streams are generating
        workers = _workers(server.pid)
        result["workers_seen"] = len(workers)
        result["client_running_at_kill"] = client.poll() is None
        os.kill(workers[-1], signal.SIGKILL)
        killed = time.monotonic()
        while _get(f"{base}/health") != 503 and time.monotonic() - killed < args.hang_timeout:
            time.sleep(0.1)
        result["health_503_after_s"] = time.monotonic() - killed
        try:
            client.wait(timeout=args.hang_timeout)
            result["client_done_after_s"] = time.monotonic() - killed
            result["client_exit"] = client.returncode
        except subprocess.TimeoutExpired:
            client.kill()
            result["client_done_after_s"] = None  # hung
        client_log.seek(0)
        output = client_log.read()
        client_log.close()
        failed = re.search(r"warning: (\d+) requests failed", output)
        result["requests_failed"] = int(failed.group(1)) if failed else 0
        result["client_tail"] = output[-1500:]
        result["health_after"] = _get(f"{base}/health")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        result["server_exit"] = server.returncode
        log.seek(0)
        result["server_log_tail"] = log.read()[-1500:]
        log.close()
    return result


# ---- the run ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="meta-llama/Meta-Llama-3-8B")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 or fp8 (with an FP8 KV cache)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="1,2", help="tensor_parallel_size values, comma-separated")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--in_out", type=int, default=1000)
    parser.add_argument("--agreement_model", default="llama-3.2-1b", help="a preset (or a model directory)")
    parser.add_argument("--agreement_layers", type=int, default=4)
    parser.add_argument("--skip_agreement", action="store_true")
    parser.add_argument("--skip_engines", action="store_true")
    parser.add_argument("--kill_worker", action="store_true", help="the serving part, at the largest size")
    parser.add_argument("--start_timeout", type=float, default=600)
    parser.add_argument("--load_seconds", type=float, default=20)
    parser.add_argument("--hang_timeout", type=float, default=60)
    parser.add_argument("--out", default="benchmarks/results/tp_gpu.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cuda = args.device.startswith("cuda")
    set_model(args.model)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    results: dict = {"model": args.model, "dtype": args.dtype, "device": device_name, "sizes": sizes}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2))

    results["copy_tbps"] = copy_rate_tbps(args.device, gib=2 if cuda else 0.25)
    print(f"{device_name}: copy rate {results['copy_tbps']:.2f} TB/s", flush=True)
    from tensorjet.models.loader import resolve_model

    hidden = resolve_model(args.model, load_format="dummy").hf_config.hidden_size
    results["allreduce"] = {str(n): allreduce_times(n, hidden, cuda) for n in sizes if n > 1}
    save()
    if not args.skip_agreement:
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = random_checkpoint(args.agreement_model, Path(directory), args.agreement_layers)
            results["agreement"] = agreement(checkpoint, args.device, sizes, 4, 32)
        save()
    if not args.skip_engines:
        results["engines"] = {}
        for size in sizes:
            part = results["engines"].setdefault(str(size), {})
            engine_parts(args, size, results["copy_tbps"], results["allreduce"].get(str(size)), part)
            save()
    if args.kill_worker:
        results["kill_worker"] = kill_worker_under_load(args, max(sizes))
        save()
    print_table(results, args)


def print_table(results: dict, args) -> None:
    gpu = next((kind for kind in ("H200", "H100") if kind in results["device"]), results["device"])
    preset = Path(args.model).name.lower().replace("meta-llama-", "llama-")
    print(f"\n{results['model']} ({results['dtype']}, dummy) on {results['device']}", end="")
    print(f", copy {results['copy_tbps']:.2f} TB/s")
    for size, times in results["allreduce"].items():
        latency = ", ".join(f"{name} {times[name]['us']:.1f} us" for name in ("batch 1", "batch 64"))
        print(f"all-reduce over {size}: {latency}; bus {times['bus_gb_s']:.0f} GB/s")
    for size, check in results.get("agreement", {}).items():
        same = f"{check['identical_prompts']}/{check['prompts']}"
        print(f"greedy at TP={size} vs TP=1: {same} prompts identical")
    engines = results.get("engines", {})
    if engines:
        header = [
            "TP",
            "b1 ms/token",
            "bound ms",
            "x bound",
            "out tok/s",
            "per GPU",
            "published/GPU",
            "peak GB r0",
        ]
        print("".join(f"{h:>14}" for h in header))
        for size, part in engines.items():
            b1, bound = part["decode_b1"]["ms_per_step"], part["decode_bound_ms"]
            tok = part["throughput"]["output_tok_s"]
            published = PUBLISHED_PER_GPU.get((gpu, preset, results["dtype"], int(size)), "-")
            peak = part.get("peak_memory_gb_rank0")
            cells = [size, f"{b1:.3f}", f"{bound:.3f}", f"{b1 / bound:.2f}", f"{tok:.0f}"]
            cells += [f"{tok / int(size):.0f}", published, "-" if peak is None else f"{peak:.1f}"]
            print("".join(f"{c:>14}" for c in cells))
    kill = results.get("kill_worker")
    if kill:
        done = kill["client_done_after_s"]
        client = "HUNG" if done is None else f"done after {done:.1f} s (exit {kill['client_exit']})"
        client += f", {kill.get('requests_failed', '-')} of its 256 requests failed"
        print(
            f"worker killed at TP={kill['size']}: /health 503 after {kill['health_503_after_s']:.1f} s, "
            f"client {client}, server exit {kill['server_exit']}"
        )


if __name__ == "__main__":
    main()
