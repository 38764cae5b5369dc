"""Speculative decoding through the engine, on tiny random Llamas (CPU, PyTorch attention).

Greedy runs are compared token for token with the same engine options without speculation, in
batch-invariant mode (each row's arithmetic is the same whatever the step holds, so a verify row computes
exactly what a decode row would). A draft model that is the target itself must then have every draft
accepted, which also checks its own KV cache (kept in step, rolled back, recomputed after preemption).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter

import pytest
import torch
import transformers
from greedy import TOP_LOGPROBS, GreedyRun, assert_all_agree

from tensorjet import LLM, SamplingParams
from tensorjet.config import MIN_ACCEPTANCE_STEPS
from tensorjet.engine.proposers import NgramProposer
from tensorjet.engine.sequence import Sequence

VOCAB = 128
# A KV pool of 256 tokens for 8 prompts of up to ~60 tokens and 40 new tokens each: chunked prompts,
# preemption once the pool fills, and drafts that find no free block.
TIGHT = dict(kv_cache_max_tokens=256, block_size=16, max_num_tokens=64, max_chunked_prefill_length=24)


def save_llama(path, seed: int, vocab: int = VOCAB, std: float = 0.02) -> str:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=std,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A target; an independent draft (same vocabulary, other weights); one with another vocabulary; and
    a sharper pair (larger weights, so their distributions are far from uniform and from each other)."""
    root = tmp_path_factory.mktemp("spec-models")
    return {
        "target": save_llama(root / "target", seed=1),
        "other_draft": save_llama(root / "other", seed=2),
        "other_vocab": save_llama(root / "vocab", seed=3, vocab=96),
        "sharp_target": save_llama(root / "sharp-target", seed=4, std=0.1),
        "sharp_draft": save_llama(root / "sharp-draft", seed=5, std=0.1),
    }


def copy_heavy_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Random token prompts that repeat part of themselves, so n-gram lookups find matches."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        head = [rng.randrange(VOCAB) for _ in range(rng.randrange(6, 40))]
        prompts.append(head + head[: rng.randrange(4, 20)])
    return prompts


def greedy(max_tokens: int = 32, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)


def tokens_of(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def assert_no_blocks_in_use(llm: LLM) -> None:
    assert llm.stats()["kv_blocks_used"] == 0, "KV blocks leaked"
    llm.engine.block_manager.check_integrity([])


@pytest.fixture(scope="module")
def plain(models):
    """The target without speculation: the reference every greedy run is compared with."""
    llm = LLM(models["target"], device="cpu", batch_invariant=True)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def self_draft(models):
    """The target speculating with itself as the draft model."""
    llm = LLM(models["target"], device="cpu", batch_invariant=True, **spec_options("draft_is_target", models))
    yield llm
    llm.shutdown()


SPECULATION = {
    "ngram": dict(speculative_model="[ngram]", prompt_lookup_min=1, num_speculative_tokens=4),
    "draft_is_target": dict(num_speculative_tokens=3),  # speculative_model: the target itself
}


def plain_tokens(model: str, prompts: list, max_tokens: int, **options) -> list:
    """Greedy tokens of `model` without speculation, from an engine of its own with `options`."""
    llm = LLM(model, device="cpu", batch_invariant=True, **options)
    try:
        return tokens_of(llm.generate(prompts, greedy(max_tokens), use_tqdm=False))
    finally:
        llm.shutdown()


def spec_options(method: str, models: dict) -> dict:
    options = dict(SPECULATION[method])
    options.setdefault("speculative_model", models["target"])
    return options


@pytest.mark.parametrize("method", list(SPECULATION))
def test_greedy_speculation_is_token_exact_alone_batched_and_under_preemption(method, models, plain):
    """Under a KV pool that forces chunked prompts, preemption and drafts without free blocks."""
    prompts = copy_heavy_prompts(6)
    reference = tokens_of(plain.generate(prompts, greedy(), use_tqdm=False))
    llm = LLM(models["target"], device="cpu", batch_invariant=True, **spec_options(method, models), **TIGHT)
    try:
        assert [tokens_of(llm.generate([p], greedy(), use_tqdm=False))[0] for p in prompts[:2]] == reference[
            :2
        ]
        assert tokens_of(llm.generate(prompts, greedy(), use_tqdm=False)) == reference
        stats = llm.stats()
        assert_no_blocks_in_use(llm)
    finally:
        llm.shutdown()
    assert stats["num_preemptions"] > 0 and stats["num_partial_prefills"] > 0
    assert stats["speculative_verify_steps"] > 0 and stats["speculative_accepted_tokens"] > 0
    if method == "draft_is_target":
        # Every draft equals the target's choice only if the draft's cache holds the right KV throughout.
        assert stats["speculative_acceptance_rate"] == 1.0
        assert stats["speculative_mean_accepted_tokens"] > 2.0


def test_an_fp8_target_gets_an_fp8_draft(models):
    """dtype="fp8" applies to the draft model too; its drafts are still the target's own choices."""
    prompts = copy_heavy_prompts(3, seed=10)
    reference = plain_tokens(models["target"], prompts, 16, dtype="fp8")
    llm = LLM(
        models["target"],
        device="cpu",
        dtype="fp8",
        batch_invariant=True,
        **spec_options("draft_is_target", models),
    )
    try:
        assert tokens_of(llm.generate(prompts, greedy(16), use_tqdm=False)) == reference
        assert llm.engine.speculator.runners[0].weight_format == "fp8 (online)"
        assert llm.stats()["speculative_acceptance_rate"] == 1.0
    finally:
        llm.shutdown()


def test_a_draft_of_its_own_weight_format_beside_a_float_target(models, plain):
    """speculative_model_quantization="fp8" quantizes the draft alone: the target keeps its float weights
    and its greedy output, and the FP8 copy of the target still proposes mostly the target's tokens."""
    prompts = copy_heavy_prompts(3, seed=10)
    reference = tokens_of(plain.generate(prompts, greedy(16), use_tqdm=False))
    llm = LLM(
        models["target"],
        device="cpu",
        batch_invariant=True,
        speculative_model_quantization="fp8",
        **spec_options("draft_is_target", models),
    )
    try:
        assert tokens_of(llm.generate(prompts, greedy(16), use_tqdm=False)) == reference
        assert llm.engine.speculator.runners[0].weight_format == "fp8 (online)"
        assert llm.engine.runner.weight_format == plain.engine.runner.weight_format != "fp8 (online)"
        assert llm.stats()["speculative_acceptance_rate"] > 0.5
    finally:
        llm.shutdown()


def test_a_dummy_draft_in_four_bits_keeps_the_targets_tokens(models):
    """speculative_model_quantization="awq" on dummy weights makes the draft's 4-bit codes directly (as
    the GPU benchmark's INT4 draft does): the draft runs its INT4 products, the target its own."""
    prompts = copy_heavy_prompts(2, seed=11)
    dummy = dict(load_format="dummy", dtype="bfloat16")
    reference = plain_tokens(models["target"], prompts, 12, **dummy)
    llm = LLM(
        models["target"],
        device="cpu",
        batch_invariant=True,
        speculative_model=models["other_draft"],
        speculative_model_quantization="awq",
        speculative_disable_by_acceptance_rate=0.0,
        **dummy,
    )
    try:
        assert tokens_of(llm.generate(prompts, greedy(12), use_tqdm=False)) == reference
        assert llm.engine.speculator.runners[0].weight_format == "int4 (dummy)"
        assert llm.engine.runner.weight_format == "bfloat16"
        assert llm.stats()["speculative_verify_steps"] > 0
    finally:
        llm.shutdown()


def test_prefix_cache_hits_and_shared_prefixes_stay_exact(models, plain, self_draft):
    """Prompts sharing two blocks, run twice: the second run's prompts come from the prefix cache (the
    target's KV) while the draft recomputes its own; only verified blocks are ever cached."""
    shared = copy_heavy_prompts(1, seed=5)[0][:32]
    prompts = [shared + p for p in copy_heavy_prompts(4, seed=6)]
    reference = tokens_of(plain.generate(prompts, greedy(24), use_tqdm=False))
    before = self_draft.stats()["prefix_cache_hits_tokens"]
    for _ in range(2):
        assert tokens_of(self_draft.generate(prompts, greedy(24), use_tqdm=False)) == reference
    stats = self_draft.stats()
    assert (
        stats["prefix_cache_hits_tokens"] - before >= 4 * 32 and stats["speculative_acceptance_rate"] == 1.0
    )
    for block in self_draft.engine.block_manager.blocks:  # a cached block holds a prompt + output's tokens
        if block.hash is not None:
            assert any(_contains(p + r, block.token_ids) for p, r in zip(prompts, reference))
    assert_no_blocks_in_use(self_draft)


def _contains(tokens: list[int], block: tuple[int, ...]) -> bool:
    n = len(block)
    return any(tuple(tokens[i : i + n]) == block for i in range(0, len(tokens) - n + 1, n))


def test_stop_tokens_and_length_inside_an_accepted_run(plain, self_draft):
    """A stop token met among accepted drafts ends the output there (the rest are dropped), and max_tokens
    ends it at exactly that many tokens, as without speculation."""
    prompts = copy_heavy_prompts(4, seed=2)
    reference = tokens_of(plain.generate(prompts, greedy(30), use_tqdm=False))
    stop = reference[0][11]  # the first output's 12th token
    expected = [r[: r.index(stop) + 1] if stop in r else r for r in reference]
    outs = self_draft.generate(prompts, greedy(30, stop_token_ids=[stop]), use_tqdm=False)
    assert tokens_of(outs) == expected
    assert outs[0].outputs[0].finish_reason == "stop" and outs[0].outputs[0].stop_reason == stop
    for max_tokens in (1, 2, 7):
        out = self_draft.generate(prompts[1], greedy(max_tokens), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == reference[1][:max_tokens] and out.finish_reason == "length"
    assert_no_blocks_in_use(self_draft)


def test_streaming_and_logprobs_of_several_tokens_per_step(plain, self_draft):
    """Updates carry several tokens at once, in order; each token's logprobs are the target's own."""
    prompt = copy_heavy_prompts(1, seed=3)[0]
    params = greedy(24, logprobs=2)
    expected = plain.generate(prompt, params, use_tqdm=False)[0].outputs[0]

    async def stream():
        return [out async for out in self_draft.generate_async(prompt, params)]

    updates = asyncio.run(stream())
    diffs = [u.outputs[0].token_ids_diff for u in updates]
    assert max(len(d) for d in diffs) > 1, "no step delivered several tokens"
    assert [t for d in diffs for t in d] == expected.token_ids == updates[-1].outputs[0].token_ids
    final = updates[-1].outputs[0]
    assert len(final.logprobs) == len(expected.logprobs)
    for got, want in zip(final.logprobs, expected.logprobs):
        assert got.keys() == want.keys()
        assert all(got[t] == pytest.approx(want[t], abs=1e-5) for t in want)


def test_speculation_pauses_above_the_batch_size_limit_with_overlap_between(models, plain):
    """With a limit of 2, four running requests decode plainly (with overlap scheduling, forced on here)
    and speculation starts once two have finished; outputs stay exact through both switches."""
    prompts = copy_heavy_prompts(4, seed=4)
    params = [greedy(8), greedy(8), greedy(32), greedy(32)]
    reference = tokens_of(plain.generate(prompts, params, use_tqdm=False))
    options = dict(spec_options("draft_is_target", models), speculative_disable_by_batch_size=2)
    llm = LLM(
        models["target"], device="cpu", batch_invariant=True, disable_overlap_scheduler=False, **options
    )
    engine = llm.engine
    running_when_drafting, kept_in_flight = [], []
    propose, step = engine.speculator.propose, engine.step

    def recording_propose(batch, sampling_row):
        running_when_drafting.append(len(engine.scheduler.running))
        return propose(batch, sampling_row)

    def recording_step():
        outputs = step()
        kept_in_flight.append(engine._in_flight is not None)
        return outputs

    engine.speculator.propose, engine.step = recording_propose, recording_step
    try:
        assert tokens_of(llm.generate(prompts, params, use_tqdm=False)) == reference
        stats = llm.stats()
        assert_no_blocks_in_use(llm)
    finally:
        llm.shutdown()
    assert running_when_drafting and max(running_when_drafting) <= 2
    assert any(kept_in_flight), "overlap never kept a step in flight"
    assert stats["speculative_acceptance_rate"] == 1.0


def test_a_sequence_whose_drafts_keep_failing_stops_speculating(models, plain):
    """An unrelated draft model is almost never right: each sequence stops after MIN_ACCEPTANCE_STEPS
    verify steps, and the output is still the target's."""
    prompts = copy_heavy_prompts(3, seed=7)
    reference = tokens_of(plain.generate(prompts, greedy(), use_tqdm=False))
    options = dict(speculative_model=models["other_draft"], num_speculative_tokens=4)
    llm = LLM(models["target"], device="cpu", batch_invariant=True, **options)
    try:
        assert tokens_of(llm.generate(prompts, greedy(), use_tqdm=False)) == reference
        stats = llm.stats()
    finally:
        llm.shutdown()
    assert stats["speculative_acceptance_rate"] < 0.1
    assert stats["speculative_stopped_sequences"] == 3
    assert stats["speculative_verify_steps"] == 3 * MIN_ACCEPTANCE_STEPS


def test_steps_overlap_again_once_no_sequence_speculates(models, plain):
    """Speculating steps resolve before the next is scheduled (drafts need the last token); once every
    sequence has stopped for low acceptance, steps are kept in flight as without a draft (overlap forced
    on here), and the output is still the target's."""
    prompts = copy_heavy_prompts(2, seed=8)
    reference = tokens_of(plain.generate(prompts, greedy(), use_tqdm=False))
    options = dict(speculative_model=models["other_draft"], num_speculative_tokens=4)
    llm = LLM(
        models["target"], device="cpu", batch_invariant=True, disable_overlap_scheduler=False, **options
    )
    engine = llm.engine
    overlapped_after_stop = []  # per launch once no sequence speculates: was a step still in flight?
    launch = engine._launch

    def recording_launch(batch, proposals=None):
        if not any(seq.speculates for seq in batch.seqs):
            overlapped_after_stop.append(engine._in_flight is not None)
        return launch(batch, proposals)

    engine._launch = recording_launch
    try:
        assert tokens_of(llm.generate(prompts, greedy(), use_tqdm=False)) == reference
        stats = llm.stats()
        assert_no_blocks_in_use(llm)
    finally:
        llm.shutdown()
    assert stats["speculative_stopped_sequences"] == 2
    # (the first launch after the stop follows the verify step that stopped the last sequence, resolved
    # at once)
    assert len(overlapped_after_stop) > 2 and all(overlapped_after_stop[1:]), "no overlap after the stop"


def test_seeded_sampling_reproduces_alone_and_batched(models):
    prompts = copy_heavy_prompts(4, seed=8)
    params = [
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=10 + i, ignore_eos=True)
        for i in range(4)
    ]
    options = dict(speculative_model=models["sharp_draft"], num_speculative_tokens=3)
    llm = LLM(models["sharp_target"], device="cpu", **options)
    try:
        batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        alone = [
            llm.generate([p], q, use_tqdm=False)[0].outputs[0].token_ids for p, q in zip(prompts, params)
        ]
        assert batched == again == alone
        assert 0 < llm.stats()["speculative_acceptance_rate"] < 1
    finally:
        llm.shutdown()


@pytest.mark.slow  # the engine with every Triton kernel interpreted
def test_verify_and_draft_steps_through_graph_buffers_match_eager(models):
    """With the Triton backend the target's verify steps replay `VerifyGraphs` and the draft model's
    steps its decode and two-row graphs (on the CPU the same padded static buffers run eagerly: five
    sequences pad to a bucket of eight). Both KV caches are poisoned with NaN, so a padded row that wrote
    or read KV would show; the draft is the target, so a wrong draft cache would show as rejections."""
    prompts = [p[:12] for p in copy_heavy_prompts(5, seed=9)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=TOP_LOGPROBS)
    options = dict(speculative_model=models["sharp_target"], num_speculative_tokens=3, max_batch_size=16)
    results, stats = {}, {}
    for graphs in (False, True):
        llm = LLM(
            models["sharp_target"],
            device="cpu",
            attention_backend="triton",
            enable_cuda_graph=graphs,
            **options,
        )
        runners = [llm.engine.runner, *llm.engine.speculator.runners]
        assert all((r.verify_graphs is not None) == graphs for r in runners)
        for runner in runners:
            runner.kv_cache.fill_(float("nan"))
        try:
            results[graphs] = [
                GreedyRun.of(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)
            ]
            stats[graphs] = llm.stats()
            draft = runners[1]
            assert (draft.num_graph_steps > 0 and draft.num_verify_graph_steps > 0) == graphs
        finally:
            llm.shutdown()
    assert_all_agree(results[True], results[False], what="verify graphs vs eager")
    assert stats[True]["num_verify_graph_steps"] > 0 and stats[False]["num_verify_graph_steps"] == 0
    assert stats[True]["speculative_acceptance_rate"] > 0.9


# ---- the sampled distribution through the engine ----------------------------------------------------
def _exact_second_token_distribution(model_dir: str, prompt: list[int]) -> list[float]:
    """P(second generated token) at temperature 1, summed over the first: from HF transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        contexts = torch.tensor([prompt + [t] for t in range(VOCAB)])
        second = model(contexts).logits[:, -1].softmax(-1)
    return (first[:, None] * second).sum(0).tolist()


@pytest.mark.slow  # 1,500 seeded requests through the engine (~15 s)
def test_sampled_tokens_verified_against_a_different_draft_follow_the_target(models):
    """The second token of each request (the first a verify step produces: a kept draft or a token from
    the residual) over thousands of seeds has the target's distribution, by a chi-square test; the draft
    is an unrelated model, so drafts are both kept and rejected."""
    prompt = [3, 17, 42, 99, 5]
    trials = 1500
    options = dict(
        speculative_model=models["sharp_draft"],
        num_speculative_tokens=2,
        speculative_disable_by_batch_size=None,
        speculative_disable_by_acceptance_rate=0.0,
        max_num_tokens=4096,  # steps never cut a sequence's drafts short: one verify step each
    )
    llm = LLM(models["sharp_target"], device="cpu", **options)
    try:
        params = [
            SamplingParams(max_tokens=3, temperature=1.0, seed=i, ignore_eos=True) for i in range(trials)
        ]
        outs = llm.generate([prompt] * trials, params, use_tqdm=False)
        stats = llm.stats()
    finally:
        llm.shutdown()
    assert stats["speculative_verify_steps"] == trials
    assert 0.2 < stats["speculative_acceptance_rate"] < 0.9, stats["speculative_acceptance_rate"]
    expected = _exact_second_token_distribution(models["sharp_target"], prompt)
    counts = Counter(o.outputs[0].token_ids[1] for o in outs)
    # Cells expected below 5 draws are pooled into one.
    big = [t for t in range(VOCAB) if expected[t] * trials >= 5]
    observed = [counts[t] for t in big] + [trials - sum(counts[t] for t in big)]
    wanted = [expected[t] * trials for t in big] + [trials * (1 - sum(expected[t] for t in big))]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, wanted))
    df = len(observed) - 1
    critical = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3  # p = 1e-4
    assert statistic < critical, f"chi-square {statistic:.1f} >= {critical:.1f} over {df} degrees of freedom"


# ---- n-gram lookups ------------------------------------------------------------------------------------
def sequence(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, SamplingParams())


def test_ngram_lookup_takes_the_longest_match_at_its_first_occurrence():
    proposer = NgramProposer(min_n=1, max_n=3)
    # [7, 8] occurs twice before the end; [6, 7, 8] once (followed by 1, 2, 3): the longest wins.
    assert proposer.lookup(sequence([9, 7, 8, 4, 6, 7, 8, 1, 2, 3, 5, 6, 7, 8]), 4) == [1, 2, 3, 5]
    # Only [7, 8] matches: its first occurrence is followed by 4.
    assert proposer.lookup(sequence([9, 7, 8, 4, 5, 7, 8, 1, 2, 7, 8]), 2) == [4, 5]
    # Fewer tokens than asked for after the match: it overlaps the suffix, a run that repeats every
    # 3 tokens, and goes on repeating.
    assert proposer.lookup(sequence([1, 2, 3, 1, 2]), 5) == [3, 1, 2, 3, 1]
    assert proposer.lookup(sequence([4, 5, 5]), 4) == [5, 5, 5, 5]
    assert proposer.lookup(sequence([6, 1, 2, 1, 2, 1]), 6) == [2, 1, 2, 1, 2, 1]
    assert proposer.lookup(sequence([1, 2, 3, 4]), 3) == []
    assert (
        NgramProposer(min_n=2, max_n=3).lookup(sequence([5, 1, 6, 2, 1]), 3) == []
    )  # [1] alone is too short


def test_ngram_index_grows_with_the_sequence():
    proposer = NgramProposer(min_n=2, max_n=2)
    seq = sequence([1, 2, 3, 4])
    assert proposer.lookup(seq, 2) == []
    seq.token_ids += [1, 2]
    assert proposer.lookup(seq, 2) == [3, 4]
    seq.token_ids += [9, 9, 3, 4]
    assert proposer.lookup(seq, 3) == [1, 2, 9]  # [3, 4] first ends at position 3


# ---- bad input -----------------------------------------------------------------------------------------
def test_a_draft_with_another_vocabulary_is_refused_by_name(models):
    with pytest.raises(ValueError, match=r"speculative_model=.*vocabulary has 96 tokens, the target's 128"):
        LLM(models["target"], device="cpu", speculative_model=models["other_vocab"])


def test_a_draft_format_its_checkpoint_cannot_take_is_refused_by_name(models):
    named = r"speculative_model_quantization='gguf' \(draft model .*not a \.gguf file"
    with pytest.raises(ValueError, match=named):
        LLM(
            models["target"],
            device="cpu",
            speculative_model=models["other_draft"],
            speculative_model_quantization="gguf",
        )


def test_a_missing_draft_model_is_refused_by_name(models, tmp_path):
    with pytest.raises(ValueError, match=r"speculative_model=.*does not exist"):
        LLM(models["target"], device="cpu", speculative_model=str(tmp_path / "no-such-model"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"speculative_model": "[medusa]"}, r"speculative_model must be a draft model or '\[ngram\]'"),
        ({"speculative_model": "[ngram]", "num_speculative_tokens": 0}, r"num_speculative_tokens must be in"),
        (
            {"speculative_model": "[ngram]", "num_speculative_tokens": 17},
            r"num_speculative_tokens must be in",
        ),
    ],
)
def test_bad_speculative_options_are_refused_by_name(options, message, models):
    with pytest.raises(ValueError, match=message):
        LLM(models["target"], device="cpu", **options)
