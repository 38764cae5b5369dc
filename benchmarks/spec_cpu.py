"""N-gram speculative decoding on the CPU with the bundled model (SmolLM2-135M-Instruct; fp32 unless
`--dtype`): batch-1 output tokens/s with and without speculation, in one run, on copy-heavy prompts from
tinyshakespeare.

Two kinds of prompt, each over passages of the text taken at evenly spaced lines:
- repeat: the passage, then "The same passage again:" and its first line, to be continued (in-context
  copying, what n-gram lookups predict);
- edit: a chat request to rewrite the passage with one word changed throughout (a light edit: most of the
  answer is the passage).

Both engines are built once and warmed up; each prompt then runs alone (batch 1) on each, the order
alternating from prompt to prompt so that a slow spell of a shared machine does not fall on one side.
Greedy decoding; tokens/s is a request's output tokens over its wall time (prefill included, the same on
both sides). Speculation must not change the output: the script counts prompts whose tokens are identical.

    python benchmarks/spec_cpu.py --text ../shared/data/tinyshakespeare.txt --json spec_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tensorjet import LLM, SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def passages(text: str, count: int, lines: int) -> list[str]:
    """`count` passages of `lines` lines, starting at evenly spaced lines of the text."""
    all_lines = text.splitlines()
    step = (len(all_lines) - lines) // count
    return ["\n".join(all_lines[i * step : i * step + lines]).strip() for i in range(count)]


def prompts_for(llm: LLM, text: str, count: int, lines: int) -> list[tuple[str, list[int]]]:
    """(kind, prompt token ids), half of each kind."""
    out = []
    for i, passage in enumerate(passages(text, count, lines)):
        if i % 2 == 0:
            first = passage.splitlines()[0]
            prompt = f"{passage}\n\nThe same passage again:\n\n{first}\n"
            out.append(("repeat", llm.tokenizer.encode(prompt)))
        else:
            instruction = "Rewrite this passage, writing 'you' for every 'thou' and changing nothing else"
            request = f"{instruction}:\n\n{passage}"
            out.append(("edit", llm.apply_chat_template([{"role": "user", "content": request}])))
    return out


def timed(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[list[int], float, dict]:
    before = llm.stats()
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    elapsed = time.perf_counter() - start
    after = llm.stats()
    counters = {k: after[k] - before[k] for k in ("speculative_draft_tokens", "speculative_accepted_tokens")}
    counters["verify_steps"] = after["speculative_verify_steps"] - before["speculative_verify_steps"]
    return list(out.token_ids), elapsed, counters


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--num_prompts", type=int, default=6)
    parser.add_argument("--passage_lines", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--num_speculative_tokens", type=int, default=5)
    parser.add_argument("--prompt_lookup_min", type=int, default=2)
    parser.add_argument("--prompt_lookup_max", type=int, default=4)
    parser.add_argument(
        "--dtype",
        default="float32",
        help="the engines' dtype: float32 (as HF runs the model; the same tokens with speculation), or "
        "auto (the CPU default: the GGUF's 4-bit blocks, whose verify steps' bf16 products may round a "
        "near-tie the other way)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    common = dict(device="cpu", dtype=args.dtype, kv_cache_max_tokens=8192)
    plain = LLM(**common)
    spec = LLM(
        **common,
        speculative_model="[ngram]",
        num_speculative_tokens=args.num_speculative_tokens,
        prompt_lookup_min=args.prompt_lookup_min,
        prompt_lookup_max=args.prompt_lookup_max,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    prompts = prompts_for(plain, args.text.read_text(), args.num_prompts, args.passage_lines)
    for llm in (plain, spec):  # warm-up: first-use costs of kernels and shapes
        llm.generate([prompts[0][1]], SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)

    rows = []
    for i, (kind, prompt) in enumerate(prompts):
        order = (plain, spec) if i % 2 == 0 else (spec, plain)
        results = {id(llm): timed(llm, prompt, params) for llm in order}
        (base_tokens, base_s, _), (spec_tokens, spec_s, counters) = results[id(plain)], results[id(spec)]
        drafted, accepted = counters["speculative_draft_tokens"], counters["speculative_accepted_tokens"]
        rows.append(
            {
                "kind": kind,
                "prompt_tokens": len(prompt),
                "output_tokens": len(spec_tokens),
                "plain_output_tokens": len(base_tokens),
                "identical": spec_tokens == base_tokens,
                "plain_s": base_s,
                "speculative_s": spec_s,
                "plain_tok_s": len(base_tokens) / base_s,
                "speculative_tok_s": len(spec_tokens) / spec_s,
                "acceptance_rate": accepted / drafted if drafted else None,
                "mean_accepted_tokens": accepted / counters["verify_steps"]
                if counters["verify_steps"]
                else None,
                "draft_tokens": drafted,
                "accepted_tokens": accepted,
            }
        )
    plain.shutdown()
    spec.shutdown()

    total = {
        "plain_tok_s": sum(r["plain_output_tokens"] for r in rows) / sum(r["plain_s"] for r in rows),
        "speculative_tok_s": sum(r["output_tokens"] for r in rows) / sum(r["speculative_s"] for r in rows),
        "acceptance_rate": sum(r["accepted_tokens"] for r in rows)
        / max(sum(r["draft_tokens"] for r in rows), 1),
        "identical_outputs": sum(r["identical"] for r in rows),
    }
    total["speedup"] = total["speculative_tok_s"] / total["plain_tok_s"]
    print(f"{'kind':<7} {'prompt':>6} {'output':>6} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} "
          f"{'accept':>7} {'acc/step':>8} same")  # fmt: skip
    for r in rows:
        rate = "n/a" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.1%}"
        per_step = "n/a" if r["mean_accepted_tokens"] is None else f"{r['mean_accepted_tokens']:.2f}"
        print(
            f"{r['kind']:<7} {r['prompt_tokens']:>6} {r['output_tokens']:>6} {r['plain_tok_s']:>11.2f} "
            f"{r['speculative_tok_s']:>10.2f} {r['speculative_tok_s'] / r['plain_tok_s']:>7.2f}x {rate:>7} "
            f"{per_step:>8} {'yes' if r['identical'] else 'NO'}"
        )
    print(
        f"all     batch-1 output tokens/s: {total['plain_tok_s']:.2f} without, "
        f"{total['speculative_tok_s']:.2f} with n-gram speculation (k={args.num_speculative_tokens}): "
        f"{total['speedup']:.2f}x; acceptance {total['acceptance_rate']:.1%}; "
        f"identical outputs {total['identical_outputs']}/{len(rows)}"
    )
    if args.json:
        report = {"config": vars(args), "prompts": rows, "total": total}
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
