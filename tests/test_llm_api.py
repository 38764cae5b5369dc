"""The public API end to end on the bundled model: outputs, streaming, chat, stats, sampling
options through the engine, prefix caching, and bad input."""

import asyncio
import sys

import pytest
from greedy import TOP_LOGPROBS, GreedyRun, assert_all_agree

from tensorjet import LLM, SamplingParams
from tensorjet.config import FeatureNotAvailableError

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_output_shape_and_metrics(llm):
    (out,) = llm.generate("The capital of France is", GREEDY, use_tqdm=False)
    assert out.prompt == "The capital of France is"
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt)
    assert out.finished and len(out.outputs) == 1
    c = out.outputs[0]
    assert c.finish_reason in ("stop", "length") and 1 <= len(c.token_ids) <= 12
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time


def test_generate_schedules_all_its_prompts_in_the_first_step(llm):
    """The engine thread must not start on the first prompt while the rest are still being queued:
    an offline batch has to be scheduled the same way every run."""
    prompts = [f"Item {i}: the sky is" for i in range(24)]
    budget = llm.config.scheduler.max_num_tokens  # as many as one step holds (128 tokens on a CPU)
    while sum(len(llm.tokenizer.encode(p)) for p in prompts) > budget:
        prompts.pop()
    assert len(prompts) >= 12
    steps_before = llm.stats()["num_steps"]
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL to the engine thread as often as possible
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    finally:
        sys.setswitchinterval(switch_interval)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1] * len(prompts)
    assert llm.stats()["num_steps"] - steps_before == 1, "the prompts were split across prefill steps"


def test_prompt_as_token_ids_equals_prompt_as_text(llm):
    text = "Water boils at a temperature of"
    by_text = llm.generate(text, GREEDY, use_tqdm=False)[0].outputs[0]
    by_ids = llm.generate(llm.tokenizer.encode(text), GREEDY, use_tqdm=False)[0].outputs[0]
    assert by_text.token_ids == by_ids.token_ids and by_text.text == by_ids.text


def test_streaming_diffs_add_up_to_the_final_output(llm):
    async def collect():
        text, ids, updates = "", [], []
        async for out in llm.generate_async("Once upon a time", SamplingParams(temperature=0, max_tokens=20)):
            text += out.outputs[0].text_diff
            ids += out.outputs[0].token_ids_diff
            updates.append(out)
        return text, ids, updates

    text, ids, updates = asyncio.run(collect())
    final = updates[-1].outputs[0]
    assert len(updates) > 1 and updates[-1].finished
    assert text == final.text and ids == final.token_ids
    expected = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    assert expected[0].outputs[0].token_ids == final.token_ids


def test_a_request_that_does_not_stream_gets_one_output_when_finished(llm):
    """generate() and non-streaming requests ask the engine for the finished output only: building and
    handing over an output for every running request at every step is host time the GPU waits on."""
    import threading

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    received: dict[str, list] = {"stream": [], "final": []}
    finished = threading.Semaphore(0)

    def collect(kind):
        def on_output(out):
            received[kind].append(out)
            if out.finished:
                finished.release()

        return on_output

    llm.loop.submit("s-stream", "Once upon a time", params, collect("stream"), stream=True)
    llm.loop.submit("s-final", "Once upon a time", params, collect("final"), stream=False)
    assert finished.acquire(timeout=60) and finished.acquire(timeout=60)
    (final,) = received["final"]
    assert final.finished and len(received["stream"]) == 16
    streamed = received["stream"][-1].outputs[0]
    assert final.outputs[0].token_ids == final.outputs[0].token_ids_diff == streamed.token_ids
    assert final.outputs[0].text == final.outputs[0].text_diff == streamed.text

    async def not_streaming():
        return [out async for out in llm.generate_async("Once upon a time", params, streaming=False)]

    (only,) = asyncio.run(not_streaming())
    assert only.finished and only.outputs[0].token_ids == streamed.token_ids


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    (out,) = llm.chat(messages, GREEDY, use_tqdm=False)
    expected_ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected_ids = list(expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids)
    assert out.prompt_token_ids == expected_ids
    assert "<|im_start|>assistant" in llm.tokenizer.decode(out.prompt_token_ids)


def test_prefix_cache_hit_skips_prompt_tokens(llm):
    shared = "You are a careful assistant. " * 12
    llm.generate(shared + "First question: what is a river?", GREEDY, use_tqdm=False)
    before = llm.stats()
    (out,) = llm.generate(shared + "Second question: what is a forest?", GREEDY, use_tqdm=False)
    after = llm.stats()
    prompt_len = len(out.prompt_token_ids)
    hits = after["prefix_cache_hits_tokens"] - before["prefix_cache_hits_tokens"]
    computed = after["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    assert hits >= 64 and out.metrics.num_cached_prompt_tokens == hits
    assert computed == prompt_len - hits
    for key in (
        "kv_blocks_total",
        "kv_blocks_used",
        "kv_blocks_free",
        "kv_block_size",
        "prefix_cache_queries_tokens",
        "num_preemptions",
    ):
        assert key in after


def test_stop_strings_and_stop_tokens(llm):
    prompt = "Count: one, two, three, four, five, six,"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0]
    assert len(base.text) > 8
    stop = base.text[3:7]  # a stop string somewhere inside what greedy decoding produces
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == base.text[: base.text.index(stop)]
    stop_token = base.token_ids[4]
    out = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_token]), use_tqdm=False
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_token) + 1]


def test_min_tokens_and_ignore_eos(llm):
    questions = ["What is the capital of France?", "How many legs does a spider have?", "Say yes."]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    replies = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    ended = [
        (c, r.outputs[0]) for c, r in zip(conversations, replies) if r.outputs[0].finish_reason == "stop"
    ]
    assert ended, "the model should end at least one short answer with EOS"
    messages, short = ended[0]
    assert short.token_ids[-1] == llm.tokenizer.eos_token_id
    n = len(short.token_ids) + 5
    longer = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64, min_tokens=n), use_tqdm=False)[
        0
    ].outputs[0]
    assert len(longer.token_ids) >= n
    forced = llm.chat(messages, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    assert len(forced.token_ids) == n and forced.finish_reason == "length"


def test_seeded_sampling_reproduces_and_n_completions(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, n=2)
    a = llm.generate("Tell me a story about", params, use_tqdm=False)[0]
    b = llm.generate(["Tell me a story about", "Unrelated"], params, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len(a.outputs) == 2 and a.outputs[0].token_ids != a.outputs[1].token_ids


def test_logprobs_are_returned(llm):
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=5, logprobs=3), use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids)
    for token, lp in zip(c.token_ids, c.logprobs):
        assert token in lp and len(lp) in (3, 4)
        assert max(lp.values()) == lp[token]  # greedy picks the most likely token


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: SamplingParams(temperature=-0.5), "temperature"),
        (lambda: SamplingParams(top_p=0.0), "top_p"),
        (lambda: SamplingParams(top_p=1.5), "top_p"),
        (lambda: SamplingParams(max_tokens=0), "max_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_bad_prompts_fail_before_scheduling_and_leave_others_alone(llm):
    async def scenario():
        params = SamplingParams(temperature=0, max_tokens=16, logprobs=TOP_LOGPROBS)
        good = [llm.generate_async("The ocean is", params, streaming=False) for _ in range(2)]
        tasks = [asyncio.ensure_future(_last(g)) for g in good]
        await asyncio.sleep(0.05)
        errors = []
        for prompt in ("", [], "word " * 9000):
            with pytest.raises(ValueError) as info:
                llm.generate([prompt], params, use_tqdm=False)
            errors.append(str(info.value))
        with pytest.raises(ValueError, match="empty"):  # one bad prompt in a list: nothing is queued
            llm.generate(["A fine prompt", ""], params, use_tqdm=False)
        assert not [r for r in llm.engine.requests if r.startswith("gen-")]
        return errors, await asyncio.gather(*tasks)

    errors, outs = asyncio.run(scenario())
    assert "empty" in errors[0] and "empty" in errors[1]
    assert "maximum sequence length" in errors[2] and "8192" in errors[2]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=TOP_LOGPROBS)
    expected = GreedyRun.of(llm.generate("The ocean is", params, use_tqdm=False)[0].outputs[0])
    beside = [GreedyRun.of(o.outputs[0]) for o in outs]
    assert_all_agree(beside, [expected] * len(outs), what="alone vs beside other requests")
    assert llm.stats()["kv_blocks_used"] == 0


async def _last(agen):
    last = None
    async for out in agen:
        last = out
    return last


def test_unknown_model_path_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does-not-exist"):
        LLM(model=str(tmp_path / "does-not-exist"))


@pytest.mark.parametrize(
    "option",
    [
        {"tensor_parallel_size": 2, "batch_invariant": True},
    ],
)
def test_later_features_raise_a_clear_error(option):
    with pytest.raises(FeatureNotAvailableError, match="not available in tensorjet yet") as info:
        LLM(**option)
    assert any(f"{name}=" in str(info.value) for name in option)  # it names the option


def test_max_seq_len_beyond_the_model_positions_is_an_error(tiny_model_dir):
    with pytest.raises(ValueError, match=r"max_seq_len must be <= the model's 256 positions"):
        LLM(model=tiny_model_dir, device="cpu", max_seq_len=257)
    llm = LLM(model=tiny_model_dir, device="cpu", max_seq_len=256, kv_cache_max_tokens=256)
    assert llm.engine.max_seq_len == 256
    llm.shutdown()


def test_cuda_graphs_need_the_triton_backend(tiny_model_dir):
    """With the torch attention backend enable_cuda_graph has no effect: every step runs eagerly."""
    llm = LLM(model=tiny_model_dir, device="cpu", attention_backend="torch", enable_cuda_graph=True)
    assert llm.engine.runner.decode_graphs is None and llm.engine.runner.mixed_graphs is None
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and llm.stats()["num_graph_steps"] == 0
    llm.shutdown()


def test_bad_engine_options_name_the_field():
    with pytest.raises(ValueError, match="scheduler_policy"):
        LLM(scheduler_policy="fastest")
    with pytest.raises(ValueError, match="kv_cache_free_gpu_mem_fraction"):
        LLM(kv_cache_free_gpu_mem_fraction=1.5)


def test_prompt_logprobs_match_a_full_forward(llm, hf_model):
    import torch

    text = "The quick brown fox jumps over the lazy dog"
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    out = llm.generate(text, params, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[ids[pos]] - ref[pos - 1, ids[pos]].item()) < 1e-3
        assert len(entry) in (2, 3)


def test_engine_freezes_its_startup_heap_and_a_shut_down_engine_is_freed(tiny_model_dir):
    """While an engine runs, the objects it started with are out of the cyclic collector's sight (a
    full collection would traverse them all: a pause between steps); shutdown gives them back, so
    dropping the engine frees it."""
    import gc
    import weakref

    llm = LLM(model=tiny_model_dir, device="cpu", dtype="float32")
    model = llm.engine.runner.model
    assert not any(obj is model for obj in gc.get_objects()), "the model is still tracked by the collector"
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    runner = weakref.ref(llm.engine.runner)
    del model
    llm.shutdown()
    assert any(obj is runner() for obj in gc.get_objects()), "shutdown left the engine frozen"
    del llm
    gc.collect()
    assert runner() is None, "a shut-down engine stayed alive"


def test_an_engine_started_after_a_shutdown_collects_the_dropped_engine(tiny_model_dir):
    """The first engine of a process freezes its start-up heap without a full collection; an engine
    started after another's shutdown collects first, so the dropped engine is freed, not frozen."""
    import gc
    import weakref

    first = LLM(model=tiny_model_dir, device="cpu", dtype="float32")
    runner = weakref.ref(first.engine.runner)
    first.shutdown()
    holder = {"llm": first}  # the caller's objects hold the engine in a reference cycle
    holder["self"] = holder
    gc.disable()  # no automatic collection: only the next engine's start may free the first
    try:
        del first, holder
        assert runner() is not None, "only a collection frees the engine"
        second = LLM(model=tiny_model_dir, device="cpu", dtype="float32")
        assert runner() is None, "the dropped engine was frozen with the new engine's heap"
    finally:
        gc.enable()
    second.shutdown()


def test_building_an_engine_runs_no_automatic_collection(tiny_model_dir, monkeypatch):
    """Its objects are long-lived (frozen once it is built): a collection meanwhile frees nothing."""
    import gc

    from tensorjet.engine.engine_loop import EngineLoop

    monkeypatch.setattr(EngineLoop, "_heap_returned", False)  # no shut-down engine's heap to collect
    collections = []
    record = lambda phase, info: phase == "start" and collections.append(info["generation"])  # noqa: E731
    gc.callbacks.append(record)
    try:
        llm = LLM(model=tiny_model_dir, device="cpu", dtype="float32")
    finally:
        gc.callbacks.remove(record)
    assert gc.isenabled() and collections == []
    llm.shutdown()


def test_the_engine_is_built_stepped_and_made_resident_on_its_own_thread(tiny_model_dir, monkeypatch):
    """All of an engine's torch work runs on one thread, not the caller's: OpenMP gives each thread that
    starts parallel work a team of its own, and two teams on a machine's cores throttle each other."""
    import threading

    from tensorjet.engine.llm_engine import LLMEngine

    threads: dict[str, set] = {"build": set(), "step": set(), "resident": set()}

    def recorded(name, method):
        def run(self, *args, **kwargs):
            threads[name].add(threading.get_ident())
            return method(self, *args, **kwargs)

        return run

    monkeypatch.setattr(LLMEngine, "__init__", recorded("build", LLMEngine.__init__))
    monkeypatch.setattr(LLMEngine, "step", recorded("step", LLMEngine.step))
    monkeypatch.setattr(
        LLMEngine, "make_kv_cache_resident", recorded("resident", LLMEngine.make_kv_cache_resident)
    )
    llm = LLM(model=tiny_model_dir, device="cpu", dtype="float32")
    try:
        llm.make_kv_cache_resident()
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)
    finally:
        llm.shutdown()
    (engine_thread,) = threads["build"]
    assert engine_thread != threading.get_ident()
    assert threads["step"] == {engine_thread} and threads["resident"] == {engine_thread}
