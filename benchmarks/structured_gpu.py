"""Structured output's cost to a busy server: generation throughput with half of the requests constrained
by a JSON schema against none constrained, through the OpenAI server (streaming /v1/completions, as
`tensorjet bench --url` sends them). Llama-3-8B shapes with dummy weights on the GPU by default.

Every request generates exactly `--max_tokens` tokens either way: unconstrained ones ignore EOS, and the
schema (an object holding an array of at least `--max_tokens` integers) cannot close before then, so the
grammar keeps the text valid JSON until max_tokens cuts it. (Without the minimum, a model free to close
the array ends its constrained requests early, and the run with half of them constrained would count
fewer tokens from a batch that shrinks, whatever the masks cost.) The grammar masks are filled while the
device runs each step's forward pass (docs/architecture.md), so the goal is throughput with 50%
constrained >= 95% of none constrained. Rounds alternate between the two loads; the medians are
compared. The table comes last; --json writes every number.

    python benchmarks/structured_gpu.py --json benchmarks/results/structured_gpu.json
    python benchmarks/structured_gpu.py --model /path/tiny-with-tokenizer --load_format dummy \\
        --device cpu --dtype float32 --concurrency 8 --max_tokens 16 --rounds 1   # the path, on the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import statistics
import threading
import time

import uvicorn

from tensorjet import LLM
from tensorjet.bench.serving import stream_events
from tensorjet.serve.app import build_app
from tensorjet.serve.options import ServerOptions


def schema(min_items: int) -> dict:
    return {
        "type": "object",
        "properties": {"values": {"type": "array", "items": {"type": "integer"}, "minItems": min_items}},
        "required": ["values"],
    }


GOAL = 0.95


def start_server(app) -> tuple[uvicorn.Server, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def one_request(url: str, payload: dict) -> int:
    """Stream one completion; the number of tokens it generated (from its usage)."""
    tokens = 0
    async for event in stream_events(f"{url}/v1/completions", payload):
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    return tokens


async def run_load(url: str, args: argparse.Namespace, constrained_share: float, seed: int) -> dict:
    rng = random.Random(seed)
    payloads = []
    for i in range(args.concurrency):
        prompt = [rng.randrange(100, args.vocab_bound) for _ in range(args.prompt_len)]
        payload = {
            "prompt": prompt,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if i < round(constrained_share * args.concurrency):
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "v", "schema": schema(args.max_tokens)},
            }
        else:
            payload["ignore_eos"] = True
        payloads.append(payload)
    start = time.perf_counter()
    tokens = await asyncio.gather(*(one_request(url, p) for p in payloads))
    elapsed = time.perf_counter() - start
    short = sum(n < args.max_tokens for n in tokens)
    if short:  # the comparison holds only between loads of the same tokens
        raise SystemExit(f"{short} of {len(tokens)} requests ended before max_tokens={args.max_tokens}")
    return {"tokens": sum(tokens), "seconds": elapsed, "tokens_per_s": sum(tokens) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--load_format", default="dummy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    llm = LLM(
        args.model,
        load_format=args.load_format,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=max(args.concurrency, 1),
        max_seq_len=args.prompt_len + args.max_tokens + 16,
    )
    if llm.tokenizer is None:  # a dummy preset takes the bundled model's tokenizer, where it is installed
        raise SystemExit(
            f"{args.model} comes with no tokenizer, which grammars need: pass a directory holding the "
            "model's config.json and tokenizer files (with --load_format dummy for random weights)"
        )
    args.vocab_bound = min(llm.engine.vocab_size, len(llm.tokenizer))
    options = ServerOptions(max_sequences=max(args.concurrency, 1))
    server, url = start_server(build_app(llm, options))
    try:
        asyncio.run(run_load(url, args, 0.5, seed=-1))  # warm-up: graphs, the grammar compiler, caches
        results: dict[str, list[dict]] = {"none": [], "half": []}
        for r in range(args.rounds):
            for name, share in (("none", 0.0), ("half", 0.5)):
                results[name].append(asyncio.run(run_load(url, args, share, seed=r)))
    finally:
        server.should_exit = True
        llm.shutdown()

    median = {name: statistics.median(x["tokens_per_s"] for x in runs) for name, runs in results.items()}
    ratio = median["half"] / median["none"]
    report = {
        "model": args.model,
        "device": str(llm.config.torch_device),
        "platform": platform.platform(),
        "concurrency": args.concurrency,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "rounds": results,
        "median_tokens_per_s": median,
        "ratio_half_constrained": ratio,
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(
        f"\n{args.model} on {report['device']}: {args.concurrency} concurrent streams, "
        f"{args.prompt_len} prompt + {args.max_tokens} generated tokens each, {args.rounds} rounds"
    )
    print(f"{'load':<28}{'tokens/s (median)':>20}{'vs none':>10}")
    print(f"{'none constrained':<28}{median['none']:>20.1f}{1.0:>10.3f}")
    print(f"{'50% JSON-schema constrained':<28}{median['half']:>20.1f}{ratio:>10.3f}")
    print(f"goal >= {GOAL:.2f}: {'met' if ratio >= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
