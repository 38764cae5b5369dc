"""Products of 1-16 rows on the GPU, per Llama-3-8B and Llama-3.2-1B projection: a speculative verify
step multiplies k+1 rows, a draft step one or two. Each kernel family at its fastest tile, timed as
the engine times them (inside a CUDA graph, weights cycled so every read comes from HBM), as TB/s of
weights read against the copy rate measured in the same run:

- cuBLAS (`F.linear`), with the separate RMSNorm / SiLU-and-multiply kernel the fused layer removes;
- the plain GEMV (`tensorjet.kernels.gemv`, tensor cores, x padded to 16 rows);
- the fused GEMV with the projection's fusion: one row through the FMA kernel, several through the
  tensor-core kernel (W_tile @ x^T).

    python benchmarks/gemv_rows_sweep.py [--rows 1,2,4,6,8,16] [--json $OUT/gemv_rows.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from weight_formats import copy_rate_tbps

from tensorjet.kernels import gemv as plain_gemv
from tensorjet.kernels.activation import silu_and_mul
from tensorjet.kernels.fused_gemv import CANDIDATES, ROWS_CANDIDATES, fused_gemv
from tensorjet.kernels.gemv import cold_copies, fastest_in_graph, time_in_graph_ms
from tensorjet.kernels.norm import rms_norm

MODELS = {  # hidden, intermediate, q heads x head_dim, kv heads x head_dim, vocab
    "8b": (4096, 14336, 4096, 1024, 128256),
    "1b": (2048, 8192, 2048, 512, 128256),
}


def projections(hidden: int, intermediate: int, q: int, kv: int, vocab: int) -> dict:
    """name: (output rows, input size, fusion), as `LlamaDecoderLayer.forward_fused` runs them."""
    return {
        "qkv_proj": (q + 2 * kv, hidden, dict(norm=True)),
        "o_proj": (hidden, q, dict(residual=True)),
        "gate_up_proj": (2 * intermediate, hidden, dict(norm=True, silu_mul=True)),
        "down_proj": (hidden, intermediate, dict(residual=True)),
        "lm_head": (vocab, hidden, {}),
    }


def fusion_inputs(m: int, n: int, k: int, fusion: dict) -> dict:
    like = dict(dtype=torch.bfloat16, device="cuda")
    return dict(
        norm_weight=torch.ones(k, **like) if fusion.get("norm") else None,
        eps=1e-5,
        residual=torch.zeros(m, n, **like) if fusion.get("residual") else None,
        silu_mul=fusion.get("silu_mul", False),
    )


def sweep_projection(n: int, k: int, fusion: dict, rows: list[int]) -> dict:
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    weights = cold_copies(weight)
    norm_w = torch.ones(k, dtype=torch.bfloat16, device="cuda")
    out = {}
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        unfused = fusion.get("norm") or fusion.get("silu_mul")

        def cublas(w, x=x):
            y = torch.nn.functional.linear(rms_norm(x, norm_w, 1e-5) if fusion.get("norm") else x, w)
            return silu_and_mul(y) if fusion.get("silu_mul") else y

        timings = {"cublas" + ("+ops" if unfused else ""): (time_in_graph_ms(cublas, weights), "")}
        if m <= plain_gemv.MAX_M:
            config, ms = fastest_in_graph(
                plain_gemv.CANDIDATES, lambda c, w, x=x: plain_gemv.gemv(x, w, None, c), weights
            )
            timings["gemv"] = (ms, str(config))
        if fusion and m <= 16:
            options = fusion_inputs(m, n // 2 if fusion.get("silu_mul") else n, k, fusion)
            if m == 1:  # the FMA kernel; the tensor-core one only runs 2+ rows
                config, ms = fastest_in_graph(
                    CANDIDATES, lambda c, w, x=x, o=options: fused_gemv(x, w, None, c, **o), weights
                )
                timings["fused"] = (ms, str(config))
            else:
                config, ms = fastest_in_graph(
                    ROWS_CANDIDATES,
                    lambda c, w, x=x, o=options: fused_gemv(x, w, None, rows_config=c, **o),
                    weights,
                )
                timings["fused"] = (ms, str(config))
        out[m] = timings
    del weights, weight
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,2,4,6,8,16")
    parser.add_argument("--models", default="8b,1b")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemv_rows_sweep.py times GPU kernels inside CUDA graphs: it needs a CUDA GPU")
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    copy = copy_rate_tbps("cuda")
    results = {"gpu": torch.cuda.get_device_name(), "copy_tbps": copy, "models": {}}
    print(f"{results['gpu']}: copy rate {copy:.2f} TB/s; per projection and rows, us and TB/s of weights")
    for model in args.models.split(","):
        for name, (n, k, fusion) in projections(*MODELS[model]).items():
            timed = sweep_projection(n, k, fusion, rows)
            results["models"].setdefault(model, {})[name] = {
                str(m): {kind: {"us": ms * 1e3, "config": c} for kind, (ms, c) in t.items()}
                for m, t in timed.items()
            }
            gb = n * k * 2 / 1e9
            for m, t in timed.items():
                cells = "  ".join(f"{kind} {ms * 1e3:7.1f} us {gb / ms:4.2f}" for kind, (ms, _) in t.items())
                print(f"{model:3} {name:13} {m:3}  {cells}", flush=True)
            if args.json:  # after every projection: a cut-short run keeps what it measured
                args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
