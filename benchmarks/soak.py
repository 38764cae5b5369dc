"""Soak test of `tensorjet serve`: a fixed number of clients send streamed completions for a given time,
`tensorjet bench --url`-style (random token prompts, ignore_eos, usage in the last chunk), while some leave
mid-request and some send bad requests. Reports what a server that loses nothing must show: no good request
failed, no 5xx, no KV block still in use at the end, and resident memory flat after warm-up.

    python benchmarks/soak.py --duration 600                       # starts the bundled model's server
    python benchmarks/soak.py --duration 600 -- --max_batch_size 16 # serve flags after --
    python benchmarks/soak.py --url http://127.0.0.1:8000 --server_pid 1234 --duration 1800

Each request a client sends is, at random: with probability --leave_fraction one that disconnects at a
random point (before its first token, or after a random number of chunks); with --bad_fraction a bad one
(a 4xx is expected: an unbounded `n`, NaN, a lone surrogate, a string for an integer, a prompt past the
context, a seed past 64 bits, malformed JSON, an unknown model, a body over the size limit); otherwise a
good one, which must stream exactly its max_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from tensorjet.bench.datasets import random_ids
from tensorjet.bench.serving import KV_USAGE_NAMES, find_metric, server_metrics, stream_events

LONG_PROMPT = [100] * 9000
BAD_BODIES: list[bytes] = [
    json.dumps({"prompt": "x", "max_tokens": 1, "n": 2147483648}).encode(),
    b'{"prompt": "x", "max_tokens": 4, "temperature": NaN}',
    b'{"prompt": "a\\ud800b", "max_tokens": 4}',
    b'{"prompt": "x", "max_tokens": "4", "stream": "yes"}',
    json.dumps({"prompt": LONG_PROMPT, "max_tokens": 4}).encode(),
    json.dumps({"prompt": "x", "max_tokens": 4, "seed": 2**64}).encode(),
    b'{"prompt": "x", "max_tokens": 4,',
    json.dumps({"prompt": "x", "max_tokens": 4, "model": "no-such-model"}).encode(),
    json.dumps({"prompt": "x" * (5 * 2**20)}).encode(),  # over the default 4 MiB body limit
]


@dataclass
class Tally:
    good: int = 0
    good_failed: int = 0
    left: int = 0
    bad: int = 0
    bad_not_4xx: int = 0
    server_errors: int = 0  # 5xx statuses, and error events in streams
    failures: list[str] = field(default_factory=list)  # the first few, for the report

    def fail(self, what: str) -> None:
        if len(self.failures) < 10:
            self.failures.append(what)


# ---- one request of each kind ---------------------------------------------------------------------
async def good_request(url: str, prompt: list[int], max_tokens: int, tally: Tally) -> None:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tally.good += 1
    usage = None
    try:
        async for event in stream_events(f"{url}/v1/completions", body):
            if "error" in event:
                tally.server_errors += event["error"].get("type") == "internal_error"
                raise ValueError(f"error event: {event['error']}")
            usage = event.get("usage") or usage
    except Exception as error:  # any way a good request can fail counts
        tally.good_failed += 1
        tally.server_errors += str(error).startswith("HTTP 5")
        tally.fail(f"good: {type(error).__name__}: {str(error)[:200]}")
        return
    if usage is None or usage["completion_tokens"] != max_tokens:
        tally.good_failed += 1
        tally.fail(f"good: usage {usage}, expected {max_tokens} tokens")


async def leaving_request(
    url: str, prompt: list[int], max_tokens: int, rng: random.Random, tally: Tally
) -> None:
    """Streams, then disconnects: before the first token (after a random delay) or after some chunks."""
    body = json.dumps(
        {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    ).encode()
    tally.left += 1
    reader, writer = await open_request(url, "/v1/completions", body)
    try:
        if rng.random() < 0.3:
            await asyncio.sleep(rng.uniform(0.0, 1.0))
        else:
            for _ in range(rng.randint(1, max_tokens)):
                if not await reader.readline():
                    break
    finally:
        writer.close()


async def bad_request(url: str, body: bytes, tally: Tally) -> None:
    tally.bad += 1
    try:
        status = await status_of(url, "/v1/completions", body)
    except (ConnectionError, asyncio.IncompleteReadError):
        return  # a body the server refused to read in full: it may close the connection before we finish
    if status >= 500:
        tally.server_errors += 1
    if not 400 <= status < 500:
        tally.bad_not_4xx += 1
        tally.fail(f"bad request got {status}: {body[:80]!r}")


# ---- raw HTTP/1.1 (one connection per request, as `tensorjet bench --url` does) ---------------------------
async def open_request(url: str, path: str, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80, limit=2**20)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def status_of(url: str, path: str, body: bytes) -> int:
    reader, writer = await open_request(url, path, body)
    try:
        return int((await reader.readline()).split()[1])
    finally:
        writer.close()


# ---- the run ---------------------------------------------------------------------------------------
async def client(url: str, args: argparse.Namespace, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        prompt = random_ids(rng, rng.randint(args.input_len // 2, args.input_len * 3 // 2), args.vocab_size)
        max_tokens = rng.randint(max(1, args.output_len // 2), args.output_len * 3 // 2)
        kind = rng.random()
        if kind < args.leave_fraction:
            await leaving_request(url, prompt, max_tokens, rng, tally)
        elif kind < args.leave_fraction + args.bad_fraction:
            await bad_request(url, rng.choice(BAD_BODIES), tally)
        else:
            await good_request(url, prompt, max_tokens, tally)


def resident_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def soak(url: str, args: argparse.Namespace, pid: int | None) -> dict:
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.duration
    clients = [
        asyncio.create_task(client(url, args, args.seed + i, deadline, tally))
        for i in range(args.concurrency)
    ]
    memory: list[tuple[float, float]] = []  # (seconds since start, MiB)
    while not all(c.done() for c in clients):
        if pid is not None and (mb := resident_mb(pid)) is not None:
            memory.append((round(time.monotonic() - start, 1), round(mb, 1)))
        await asyncio.wait(clients, timeout=args.sample_every)
    for c in clients:
        c.result()  # a bug in the soak client itself should not pass silently
    await asyncio.sleep(1.0)  # aborts of the last leavers reach the engine
    metrics = server_metrics(url)
    blocks = find_metric(metrics, ("kv_cache_blocks_used",))
    return {
        "duration_s": round(time.monotonic() - start, 1),
        **{k: v for k, v in asdict(tally).items() if k != "failures"},
        "failures": tally.failures,
        "kv_blocks_used_at_end": blocks,
        "kv_cache_usage_at_end": find_metric(metrics, KV_USAGE_NAMES),
        "memory": memory_report(memory, args.warmup),
    }


def memory_report(samples: list[tuple[float, float]], warmup: float) -> dict | None:
    """Resident memory after warm-up: first, last, peak, and the spread (max - min) / min."""
    after = [mb for t, mb in samples if t >= warmup]
    if not after:
        return None
    return {
        "samples": samples,
        "after_warmup_first_mb": after[0],
        "last_mb": after[-1],
        "peak_mb": max(after),
        "spread_after_warmup": round((max(after) - min(after)) / min(after), 4),
    }


# ---- a server of our own ----------------------------------------------------------------------------
def start_server(serve_args: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "tensorjet.serve.cli", "serve", "--port", str(port), *serve_args]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while find_metric(server_metrics(url), ("kv_cache_blocks_used",)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start: {' '.join(argv)}")
        time.sleep(0.5)
    return proc, url


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", help="a running server (default: start `tensorjet serve` with the flags after --)"
    )
    parser.add_argument(
        "--server_pid", type=int, help="the running server's process, for its resident memory"
    )
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients, each one request at a time")
    parser.add_argument("--input_len", type=int, default=64, help="mean prompt tokens (+-50%%)")
    parser.add_argument("--output_len", type=int, default=32, help="mean max_tokens (+-50%%)")
    parser.add_argument("--vocab_size", type=int, default=49152, help="prompt ids are drawn below this")
    parser.add_argument("--leave_fraction", type=float, default=0.10)
    parser.add_argument("--bad_fraction", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=60, help="seconds before memory must stay flat")
    parser.add_argument("--sample_every", type=float, default=5, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report_json", help="write the report here too")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    proc = None
    url, pid = args.url, args.server_pid
    if url is None:
        proc, url = start_server(serve_args)
        pid = proc.pid
    try:
        report = asyncio.run(soak(url.rstrip("/"), args, pid))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    report["config"] = {**vars(args), "serve_args": serve_args, "cpu_count": os.cpu_count()}
    memory = report["memory"] or {}
    print(
        f"{report['duration_s']:.0f} s, {args.concurrency} clients: good requests {report['good']} "
        f"(failed {report['good_failed']}), left {report['left']}, bad {report['bad']} "
        f"(not 4xx {report['bad_not_4xx']}), 5xx {report['server_errors']}, KV blocks in use at the end "
        f"{report['kv_blocks_used_at_end']:.0f}; resident memory after warm-up "
        f"{memory.get('after_warmup_first_mb')} -> {memory.get('last_mb')} MiB "
        f"(peak {memory.get('peak_mb')}, spread {memory.get('spread_after_warmup')})"
    )
    for failure in report["failures"]:
        print("  ", failure)
    if args.report_json:
        with open(args.report_json, "w") as out:
            json.dump(report, out, indent=2)
    clean = report["good_failed"] == 0 and report["server_errors"] == 0 and report["bad_not_4xx"] == 0
    clean = clean and report["kv_blocks_used_at_end"] == 0
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
