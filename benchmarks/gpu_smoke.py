"""Checks on the GPU before timing anything: the fast path (Triton kernels, decode and mixed-step CUDA
graphs, overlap scheduling; the CUDA defaults) gives the reference path's greedy tokens (PyTorch attention,
eager, synchronous) on a small random Llama, in fp32 with the fp32 and the FP8 KV cache (must be
identical) and in bf16 (reported); the fast path runs three times: up to 32 sequences at once, up to
256 (the largest decode graph, with more decode-attention programs than the GPU runs at once), and one
at a time (the fused batch-1 layer). Prints 'ok' if fp32 matches, else 'MISMATCH'.

    python benchmarks/gpu_smoke.py [float32]   (only the fp32 checks: about half the time)
"""

import sys
import tempfile

import torch
import transformers

from tensorjet import LLM, SamplingParams


def main() -> None:
    path = tempfile.mkdtemp()
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    lengths = (3, 70, 129, 300, 33, 5, 17, 64, 250, 1, 90, 12, 48, 200, 31, 7, 100, 66, 9, 140) * 12
    prompts = [[(13 * i + 7 * j) % 1000 for j in range(n)] for i, n in enumerate(lengths)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ok = True
    dtypes = sys.argv[1:] or ["float32", "bfloat16"]
    for dtype, kv_cache_dtype in (("float32", "auto"), ("float32", "fp8"), ("bfloat16", "auto")):
        if dtype not in dtypes:
            continue
        tokens = {}
        for path_name, options in (
            (
                "reference",
                dict(attention_backend="torch", enable_cuda_graph=False, disable_overlap_scheduler=True),
            ),
            ("fast", dict(max_batch_size=32)),
            # 240 sequences x 2 KV heads: more decode programs than the GPU runs at once.
            ("fast, 256 at once", dict(max_batch_size=256, max_num_tokens=512)),
            # One sequence at a time: every decode step runs the fused batch-1 layer.
            ("fast, batch 1", dict(max_batch_size=1)),
        ):
            options = dict(max_num_tokens=128) | options
            llm = LLM(model=path, dtype=dtype, kv_cache_dtype=kv_cache_dtype, **options)
            outs = llm.generate(prompts, params, use_tqdm=False)
            tokens[path_name] = [o.outputs[0].token_ids for o in outs]
            if path_name != "reference":
                stats = llm.stats()
                assert stats["num_graph_steps"] > 0 and stats["num_mixed_graph_steps"] > 0, stats
                assert llm.engine.overlap
                fused = llm.engine.runner.model.fused_decode
                print(
                    f"{dtype}, KV {kv_cache_dtype}, {path_name}: fused batch-1 layer {fused}; "
                    f"{stats['num_mixed_graph_steps']} of {stats['num_steps']} steps from mixed-step graphs",
                    file=sys.stderr,
                )
            llm.shutdown()
        for path_name in ("fast", "fast, 256 at once", "fast, batch 1"):
            same = sum(a == b for a, b in zip(tokens["reference"], tokens[path_name]))
            print(
                f"{dtype}, KV {kv_cache_dtype}: {path_name} == reference for {same}/{len(prompts)} prompts",
                file=sys.stderr,
            )
            ok &= dtype != "float32" or same == len(prompts)
    print("ok" if ok else "MISMATCH")


if __name__ == "__main__":
    main()
