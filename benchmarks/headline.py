"""The GPU suite's headline figures alone, for comparing two trees on one GPU in one call: batch-1 and
batch-64 decode (bf16 KV) and 1000 in / 1000 out offline throughput with the FP8 KV cache. Same
engines, workloads and warm-ups as `gpu_suite.py`; whatever `tensorjet` is importable is measured, so

    python benchmarks/headline.py --out new.json
    PYTHONPATH=/path/to/other/tree python benchmarks/headline.py --out old.json

measures two commits with this one script. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from gpu_suite import (
    FP8_MAX_BATCH,
    MODEL,
    build_engine,
    decode_latency,
    release_gpu_memory,
    set_model,
    throughput,
    warm_up,
)

import tensorjet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/headline.json")
    parser.add_argument("--requests", type=int, default=1000, help="requests of 1000 in / 1000 out")
    parser.add_argument("--model", default=MODEL, help="a dummy preset or local model")
    args = parser.parse_args()
    set_model(args.model)
    begin = time.perf_counter()
    results: dict = {
        "tree": str(Path(tensorjet.__file__).parents[1]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    llm = build_engine()
    warm_up(llm, seed=99)
    for batch in (1, 64):
        results[f"decode_b{batch}_ms"] = decode_latency(llm, batch)["ms_per_step"]
    llm.shutdown()
    del llm
    release_gpu_memory()

    llm = build_engine(max_batch_size=FP8_MAX_BATCH, kv_cache_dtype="fp8")
    warm_up(llm, seed=98)
    r = throughput(llm, [(1000, 1000)] * args.requests)
    results["fp8_1000x1000_out_tok_s"] = r["output_tok_s"]
    llm.shutdown()
    results["wall_s"] = time.perf_counter() - begin
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nheadline figures of {results['tree']} on {results['device']} ({results['wall_s']:.0f} s)")
    print(f"decode batch 1      {results['decode_b1_ms']:.3f} ms/token")
    print(f"decode batch 64     {results['decode_b64_ms']:.3f} ms/step")
    print(f"FP8 KV {args.requests} x 1000/1000  {results['fp8_1000x1000_out_tok_s']:.0f} out tok/s")


if __name__ == "__main__":
    main()
