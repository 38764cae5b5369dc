"""How long the README's first command takes to answer on the CPU: the time from starting
`tensorjet generate "..." --max_tokens 16` (the bundled model) to its first token on stdout, with a
cold GGUF cache (an empty TENSORJET_CACHE: the GGUF is converted first) and a warm one, and the time
of `import tensorjet`; with `import torch` and an empty interpreter as the floors they stand on.
`--prefill` adds what a prompt token costs on this CPU (one step per prompt, 64 to 1024 tokens): the
measurement behind the CPU's default step budget (`max_num_tokens`).

Every run is a fresh process (`python -m tensorjet.cli`, what the `tensorjet` script runs), timed from
its start to the first byte it streams; the median of `--repeats` runs is reported (the runs alternate
cold and warm so that a slow spell of a shared machine falls on both). The OS's page cache stays warm.

    python benchmarks/cpu_start.py --repeats 3 --prefill --json cpu_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"
PREFILL_LENGTHS = (64, 128, 256, 512, 1024)
GENERATE = [sys.executable, "-m", "tensorjet.cli", "generate", PROMPT, "--max_tokens", "16"]


def first_output(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds to the first byte on stdout, seconds to exit, stdout) of a fresh process."""
    start = time.perf_counter()
    # unbuffered: the first byte is read from the pipe itself, and `communicate` gets the rest
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)
    first = process.stdout.read(1)
    first_at = time.perf_counter() - start
    rest, errors = process.communicate()
    total = time.perf_counter() - start
    if process.returncode != 0 or not first:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {errors.decode()[-2000:]}")
    return first_at, total, (first + rest).decode()


def prefill_ms_per_token(repeats: int) -> dict[int, float]:
    """The fastest of `repeats` one-step prefills of random-token prompts, per prompt token (ms)."""
    import random

    from tensorjet import LLM, SamplingParams

    llm = LLM(device="cpu", max_num_tokens=max(PREFILL_LENGTHS), enable_prefix_caching=False)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=1)
    prompt = lambda n: [rng.randrange(1000, 40000) for _ in range(n)]  # noqa: E731
    try:
        llm.generate([prompt(32)], params, use_tqdm=False)  # the first step's one-time costs
        costs = {}
        for n in PREFILL_LENGTHS:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                llm.generate([prompt(n)], params, use_tqdm=False)
                times.append(time.perf_counter() - start)
            costs[n] = min(times) / n * 1000
        return costs
    finally:
        llm.shutdown()


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", action="store_true", help="also measure ms per prompt token")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    env = dict(os.environ)
    runs: dict[str, list[tuple[float, float]]] = {}
    outputs = set()
    with tempfile.TemporaryDirectory(prefix="tensorjet-start-") as scratch:
        warm_cache = Path(scratch) / "warm"
        env["TENSORJET_CACHE"] = str(warm_cache)
        first_output(GENERATE, env)  # fills the warm cache
        for i in range(args.repeats):
            cold_env = dict(env, TENSORJET_CACHE=str(Path(scratch) / f"cold-{i}"))
            for name, run_env in (("first token, cold cache", cold_env), ("first token, warm cache", env)):
                first, total, text = first_output(GENERATE, run_env)
                runs.setdefault(name, []).append((first, total))
                outputs.add(text)
            for name, code in (
                ("import tensorjet", "import tensorjet"),
                ("import torch (floor)", "import torch"),
                ("python -c pass (floor)", "pass"),
            ):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True, env=env)
                elapsed = time.perf_counter() - start
                runs.setdefault(name, []).append((elapsed, elapsed))
    if len(outputs) != 1:
        raise RuntimeError(f"the runs printed different completions: {sorted(outputs)}")

    results = {
        name: {
            "first_s": statistics.median(f for f, _ in times),
            "exit_s": statistics.median(t for _, t in times),
            "runs": times,
        }
        for name, times in runs.items()
    }
    prefill = prefill_ms_per_token(args.repeats) if args.prefill else {}
    if args.json:
        machine = {
            "cpu": _cpu_name(),
            "cores": len(os.sched_getaffinity(0)),
            "load_average_before_and_after": [load_before, os.getloadavg()],
        }
        report = {"command": " ".join(GENERATE[1:]), "machine": machine, "results": results}
        report["prefill_ms_per_token"] = prefill
        args.json.write_text(json.dumps(report, indent=1))
    if prefill:
        costs = ", ".join(f"{n}: {ms:.2f}" for n, ms in prefill.items())
        print(f"ms per prompt token, by prompt length (one step each): {costs}")
    print(f"completion: {outputs.pop().strip()!r}")
    print(f"{'measure':<26} {'median s':>9} {'exit s':>8}  runs (first output s)")
    for name, result in results.items():
        each = ", ".join(f"{f:.2f}" for f, _ in result["runs"])
        print(f"{name:<26} {result['first_s']:>9.2f} {result['exit_s']:>8.2f}  {each}")


if __name__ == "__main__":
    main()
