"""Overlap scheduling, the CUDA-graph paths and host-to-device copies, run on the CPU.

Overlap (forced on with `disable_overlap_scheduler=False`) must not change a single output: in
batch-invariant mode tokens, text, finish reasons and logprobs equal the synchronous engine's, under
stops, EOS, n > 1, seeds, penalties and aborts, and no block leaks; under chunking and preemption the
greedy tokens agree (tie-aware, tests/greedy.py). The decode-graph and mixed-step-graph paths (static
buffers, steps padded to a bucket, padded rows with slot -1 and no context) run eagerly on the CPU with
the Triton backend under the interpreter and must agree with the eager path's tokens.
"""

import asyncio

import pytest
import torch
from batching import alone_and_together
from greedy import TOP_LOGPROBS, GreedyRun, assert_all_agree
from prompts import PLAIN, varied_prompts

from tensorjet import LLM, SamplingParams
from tensorjet.runtime.cuda_graph import (
    MIXED_MAX_MULTI_ROW_SEQS,
    MIXED_TOKEN_BUCKETS,
    graph_batch_sizes,
    mixed_token_buckets,
)
from tensorjet.runtime.device_io import to_device
from tensorjet.runtime.model_runner import ModelRunner


@pytest.fixture(scope="module")
def overlap_llm():
    engine = LLM(device="cpu", dtype="float32", disable_overlap_scheduler=False)
    assert engine.engine.overlap
    yield engine
    engine.shutdown()


def _summary(outputs):
    return [[(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in out.outputs] for out in outputs]


@pytest.mark.slow  # two engines on the bundled model
def test_overlap_gives_the_synchronous_engines_outputs():
    """The two engines' steps hold different rows (an overlapped step still carries a sequence that the
    step before finished), so they run in batch-invariant mode, where that changes no row's bits."""
    llm = LLM(device="cpu", dtype="float32", batch_invariant=True)
    overlap_llm = LLM(device="cpu", dtype="float32", batch_invariant=True, disable_overlap_scheduler=False)
    assert not llm.engine.overlap and overlap_llm.engine.overlap  # the CPU default, and forced on
    prompts = PLAIN + varied_prompts(10, seed=5, max_words=60)
    params = [
        SamplingParams(temperature=0, max_tokens=24),  # may stop at EOS
        SamplingParams(temperature=0, max_tokens=30, stop=[".", "\n"]),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, n=2, seed=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=10, logprobs=2, min_tokens=6),
        SamplingParams(temperature=0, max_tokens=1),
    ]
    params = [params[i % len(params)] for i in range(len(prompts))]
    sync = llm.generate(prompts, params, use_tqdm=False)
    overlapped = overlap_llm.generate(prompts, params, use_tqdm=False)
    assert _summary(overlapped) == _summary(sync)
    stats = overlap_llm.stats()
    assert stats["kv_blocks_used"] == 0, "blocks leaked"
    overlap_llm.engine.block_manager.check_integrity([])
    llm.shutdown()
    overlap_llm.shutdown()


@pytest.mark.slow  # two engines on the bundled model
def test_overlap_under_chunking_and_preemption():
    prompts = varied_prompts(24, seed=11, max_words=90)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone, together, stats = alone_and_together(
        prompts,
        params,
        disable_overlap_scheduler=False,
        kv_cache_max_tokens=512,
        max_num_tokens=192,
        max_chunked_prefill_length=64,
        max_batch_size=16,
    )
    assert_all_agree(together, alone, what="together vs alone")
    assert stats["num_preemptions"] > 0 and stats["num_partial_prefills"] > 0, stats
    assert stats["kv_blocks_used"] == 0, "blocks leaked"


@pytest.mark.slow  # the bundled model
def test_overlap_abort_mid_stream_frees_blocks(overlap_llm):
    async def take_three():
        seen = 0
        async for out in overlap_llm.generate_async(
            "Once upon a time", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        ):
            seen = len(out.outputs[0].token_ids)
            if seen >= 3:
                break
        return seen

    assert asyncio.run(take_three()) >= 3
    other = overlap_llm.generate("The ocean is", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert len(other[0].outputs[0].token_ids) == 5
    assert overlap_llm.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize(
    "dtype, values",
    [
        (torch.long, [3, -1, 2**40, 0]),
        (torch.int32, [7, -2, 2**31 - 1]),
        (torch.float32, [0.5, -1.25, 3.0]),
        (torch.long, []),
    ],
)
def test_to_device_keeps_values_and_dtype(dtype, values):
    out = to_device(values, dtype, torch.device("cpu"))
    assert out.dtype == dtype and out.shape == (len(values),) and out.tolist() == values


DECODE_PAD_LIMIT = 16  # most rows a decode step may pad by: padded rows cost as much as real ones


def padding(buckets: list[int], size: int) -> int:
    """Rows a step of `size` pads by: it replays the smallest bucket that holds it."""
    return min(b for b in buckets if b >= size) - size


@pytest.mark.parametrize("max_batch_size", [1, 2, 5, 16, 17, 40, 256, 1000])
def test_decode_graph_buckets_cover_every_batch_with_bounded_padding(max_batch_size):
    buckets = graph_batch_sizes(max_batch_size)
    assert buckets == sorted(set(buckets)) and buckets[0] >= 1
    assert buckets[-1] == max_batch_size, "the largest batch must replay a graph"
    for size in range(1, max_batch_size + 1):
        pad = padding(buckets, size)
        assert pad < size and pad < DECODE_PAD_LIMIT, f"batch {size} pads by {pad} rows: {buckets}"


@pytest.mark.parametrize("max_batch_size", [5, 40, 256])
def test_cuda_graph_cache_size_keeps_that_many_buckets_picked_evenly(max_batch_size):
    ladder = graph_batch_sizes(max_batch_size)
    assert graph_batch_sizes(max_batch_size, cache_size=len(ladder) + 10) == ladder
    assert graph_batch_sizes(max_batch_size, cache_size=1) == [max_batch_size]
    for cache_size in range(2, len(ladder) + 1):
        few = graph_batch_sizes(max_batch_size, cache_size=cache_size)
        assert len(few) == cache_size and set(few) <= set(ladder) and few == sorted(few)
        assert few[0] == ladder[0] and few[-1] == max_batch_size, "a lone sequence must not pad to the max"
        # Evenly: the kept buckets' positions in the ladder are spaced alike (gaps differ by at most one).
        positions = [ladder.index(s) for s in few]
        gaps = [b - a for a, b in zip(positions, positions[1:])]
        assert max(gaps) - min(gaps) <= 1, f"cache_size={cache_size}: {few} from {ladder}"


def triton_cpu_llm(model_dir, graphs: bool, **options) -> LLM:
    """The Triton backend on the CPU (kernels interpreted), with or without the CUDA-graph path (which
    runs its padded static buffers eagerly here)."""
    return LLM(model=model_dir, device="cpu", attention_backend="triton", enable_cuda_graph=graphs, **options)


@pytest.mark.slow  # the engine with every kernel interpreted
def test_padded_decode_graph_path_matches_eager(tiny_model_dir):
    prompts = [[(5 * i + j) % 128 for j in range(n)] for i, n in enumerate((3, 20, 9, 31, 14))]
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=TOP_LOGPROBS)
    results = {}
    for graphs in (False, True):
        llm = triton_cpu_llm(
            tiny_model_dir,
            graphs,
            max_batch_size=16,
            cuda_graph_cache_size=2,  # few buckets: the five sequences pad
            disable_overlap_scheduler=False,
        )
        runner = llm.engine.runner
        assert (runner.decode_graphs is not None) == graphs
        if graphs:
            assert padding(runner.decode_graphs.sizes, len(prompts)) > 0, "no padded rows to check"
            # Poison what the padded rows could touch: a slot -1 must write nothing.
            runner.kv_cache.fill_(float("nan"))
        results[graphs] = [GreedyRun.of(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]
        assert (llm.stats()["num_graph_steps"] > 0) == graphs
        llm.shutdown()
    assert_all_agree(results[True], results[False], what="decode graphs vs eager")


@pytest.mark.parametrize("max_num_tokens", [1, 24, 32, 48, 100, 512, 513, 8192])
def test_mixed_step_buckets_cover_every_step_up_to_the_largest_graph(max_num_tokens):
    buckets = mixed_token_buckets(max_num_tokens)
    assert buckets == sorted(set(buckets)) and buckets[0] >= 1
    # Steps never exceed max_num_tokens, so no graph is larger; steps past the largest graph run eagerly.
    assert buckets[-1] == min(max_num_tokens, MIXED_TOKEN_BUCKETS[-1])
    for size in range(1, buckets[-1] + 1):
        pad = padding(buckets, size)
        assert pad < size or size < buckets[0], f"a step of {size} tokens pads by {pad}: {buckets}"


@pytest.mark.slow  # the engine with every kernel interpreted
def test_padded_mixed_step_graph_path_matches_eager(tiny_model_dir):
    """Steps with prompt tokens replay a mixed-step graph (on the CPU the same padded static buffers
    run eagerly): new prompts join running decodes, chunked prompts finish alongside them, and a step
    with more prompt chunks than a graph holds runs eagerly. The KV cache is poisoned with NaN, so a
    padded row that wrote or read KV would show."""
    lengths = [3, 5, 4, 6, 2, 7, 3, 5, 4, 40, 17, 33, 9, 21, 12, 28]  # 10 prompt chunks in the first step
    prompts = [[(7 * i + j) % 128 for j in range(n)] for i, n in enumerate(lengths)]
    params = [
        SamplingParams(temperature=0, max_tokens=2 + (5 * i) % 9, ignore_eos=True, logprobs=TOP_LOGPROBS)
        for i in range(16)
    ]
    results, stats, prompt_chunks = {}, {}, []
    for graphs in (False, True):
        llm = triton_cpu_llm(
            tiny_model_dir,
            graphs,
            max_batch_size=10,
            max_num_tokens=64,
            max_chunked_prefill_length=32,
            enable_prefix_caching=False,
        )
        runner = llm.engine.runner
        if graphs:
            runner.kv_cache.fill_(float("nan"))

            def counting_launch(batch, prev=None, launch=runner.launch):
                prompt_chunks.append(sum(1 for n in batch.query_lens if n > 1))
                return launch(batch, prev)

            runner.launch = counting_launch
        results[graphs] = [GreedyRun.of(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]
        stats[graphs] = llm.stats()
        llm.shutdown()
    assert_all_agree(results[True], results[False], what="mixed-step graphs vs eager")
    assert stats[False]["num_mixed_graph_steps"] == 0
    assert stats[True]["num_mixed_graph_steps"] > 0
    assert max(prompt_chunks) > MIXED_MAX_MULTI_ROW_SEQS, (
        "the eager fallback for a crowded step went untested"
    )


def test_startup_out_of_memory_says_what_to_lower(monkeypatch, tiny_model_dir):
    def out_of_memory(self, num_blocks):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(ModelRunner, "_allocate_kv_cache", out_of_memory)
    with pytest.raises(
        RuntimeError, match="out of GPU memory while sizing and allocating the KV cache"
    ) as info:
        LLM(model=tiny_model_dir, device="cpu")
    for option in ("max_num_tokens", "kv_cache_free_gpu_mem_fraction", "kv_cache_max_tokens"):
        assert option in str(info.value)
