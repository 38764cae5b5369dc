"""The engine's own host work per step, with the model's forward taken out: for a step the host waits on
before scheduling the next (every step while speculating), the time the device sits idle; for
overlapped steps, what the device's step must hide.

A tiny random Llama (dummy weights) on the graph path (Triton attention, CUDA graphs; on the CPU the
graphs' static buffers run eagerly), batch 1, one 64-token prompt at a time. Every graph replay is
replaced by nothing (its logits stay zeros), so a step costs only the host: scheduling, proposing,
building and uploading the step's inputs, launching the sampling, reading the tokens back. Two engines:
plain greedy decoding, and prompt lookup (`[ngram]`, 5 drafts) with every draft kept with probability
0.7. Reported per step (best of the rounds): the whole engine step and, within it, `prepare` (the
inputs on the device), the replay call and the sampling launches, with the tokens a step adds and the
share of steps replayed from a graph.

    python benchmarks/step_host_time.py --json step_host_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict

import torch
import transformers

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend's host side; no kernel runs

from profile_step import timed  # noqa: E402

from tensorjet import LLM, SamplingParams  # noqa: E402

PROMPT_TOKENS = 64
ACCEPTANCE = 0.7


def tiny_model(directory: str) -> str:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    config.save_pretrained(directory)
    return directory


def without_forward(llm: LLM) -> None:
    """Every graph replay returns its (zeroed) logits without running the model."""
    runner = llm.engine.runner
    for graphs in (runner.decode_graphs, runner.mixed_graphs, runner.verify_graphs):
        if graphs is not None:
            graphs.logits.zero_()
            graphs.replay = lambda size, num_logits, graphs=graphs: graphs.logits[:num_logits]


def timed_calls(llm: LLM) -> dict[str, float]:
    """Wrap the step's parts; returns the dict their seconds add up in, by method name."""
    seconds: dict[str, float] = defaultdict(float)
    engine, runner = llm.engine, llm.engine.runner
    timed(engine, "step", seconds)
    for name in ("prepare", "_forward", "_sample"):
        timed(runner, name, seconds)
    return seconds


LABELS = {"step": "engine step", "prepare": "prepare", "_forward": "replay", "_sample": "sampling"}


def measure(llm: LLM, rounds: int, tokens: int, prompt: list[int]) -> dict:
    seconds = timed_calls(llm)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    best = None
    for i in range(rounds + 1):  # the first round warms up
        llm.engine.add_request(f"r{i}", prompt, params, stream=False)
        llm.engine.step()  # the prompt
        seconds.clear()
        graphed = graph_steps(llm)
        steps = 0
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
            steps += 1
        per_step = {LABELS[name]: s / steps * 1e3 for name, s in seconds.items()}
        per_step["tokens per step"] = tokens / steps
        per_step["graphed"] = (graph_steps(llm) - graphed) / steps
        if i and (best is None or per_step["engine step"] < best["engine step"]):
            best = per_step
    return best


def graph_steps(llm: LLM) -> int:
    stats = llm.stats()
    return stats["num_graph_steps"] + stats["num_verify_graph_steps"] + stats["num_mixed_graph_steps"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=400, help="output tokens per request")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = [(7 * i) % 120 + 3 for i in range(PROMPT_TOKENS)]
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory() as directory:
        model = tiny_model(directory)
        common = dict(
            model=model,
            load_format="dummy",
            device=device,
            dtype="float32",
            attention_backend="triton",
            enable_cuda_graph=True,
            kv_cache_max_tokens=8192,
            disable_overlap_scheduler=True,  # every step waits for its tokens, as speculating steps do
        )
        for name, options in (
            ("plain decode", {}),
            ("prompt lookup, a = 0.7", dict(speculative_model="[ngram]", num_speculative_tokens=5)),
        ):
            llm = LLM(**common, **options)
            try:
                without_forward(llm)
                if options:
                    llm.engine.runner.verifier.fixed_acceptance = ACCEPTANCE
                    llm.engine.speculator.min_acceptance_rate = 0.0
                results[name] = measure(llm, args.rounds, args.tokens, prompt)
            finally:
                llm.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    labels = ["engine step", "prepare", "replay", "sampling", "tokens per step", "graphed"]
    print(f"host ms per step on {results['device']}, the model's forward skipped (best of {args.rounds})")
    print(f"{'':24}" + "".join(f"{label:>16}" for label in labels))
    for name in ("plain decode", "prompt lookup, a = 0.7"):
        row = results[name]
        print(f"{name:24}" + "".join(f"{row[label]:>16.3f}" for label in labels))


if __name__ == "__main__":
    main()
