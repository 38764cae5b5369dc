"""Fair prefill: a long prompt's chunks leave room for the prompts behind it, so a short request that
arrives behind one gets its first token within two steps, while every step still uses the whole token
budget; aborting the long prompt frees its blocks at once and computes none of its remaining chunks."""

from tensorjet import LLM, SamplingParams

BUDGET = 32
LONG = [1 + i % 100 for i in range(5 * BUDGET)]  # >= 4x the step budget


def make_engine(model: str, **options):
    llm = LLM(model, device="cpu", max_num_tokens=BUDGET, kv_cache_max_tokens=1024, **options)
    return llm, llm.engine


def test_a_short_request_behind_a_long_prompt_gets_its_first_token_within_two_steps(tiny_model_dir):
    llm, engine = make_engine(tiny_model_dir)
    try:
        engine.add_request("long", LONG, SamplingParams(max_tokens=4))
        engine.step()  # the long prompt's first chunk
        engine.add_request("short", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4))
        computed = engine.stats()["prompt_tokens_computed"]
        first_token_step = None
        for step in (1, 2):
            outputs = engine.step()
            now = engine.stats()["prompt_tokens_computed"]
            assert now - computed == BUDGET  # the step's whole budget, shared: nothing left idle
            computed = now
            if any(o.request_id == "short" and o.outputs[0].token_ids for o in outputs):
                first_token_step = step
                break
        assert first_token_step == 1
        assert engine.requests["long"].seqs[0].num_computed_tokens < len(LONG)  # still prefilling

        blocks_of_short = len(engine.requests["short"].seqs[0].block_table)
        engine.abort_request("long")
        assert engine.stats()["kv_blocks_used"] == blocks_of_short
        engine.step()
        assert engine.stats()["prompt_tokens_computed"] == computed  # no chunk of the aborted prompt
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.stats()["kv_blocks_used"] == 0
    finally:
        llm.shutdown()


def test_two_long_prompts_share_the_budget_and_finish_together(tiny_model_dir):
    llm, engine = make_engine(tiny_model_dir)
    try:
        engine.add_request("a", LONG, SamplingParams(max_tokens=1))
        engine.add_request("b", LONG[::-1], SamplingParams(max_tokens=1))
        finished: dict[str, int] = {}
        step = 0
        while engine.has_unfinished_requests():
            step += 1
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = step
        # Neither waits for the other to finish: their prefills end within one step of each other, and
        # the two prompts take no more steps than their tokens need at a full budget (plus the sample).
        assert abs(finished["a"] - finished["b"]) <= 1
        assert max(finished.values()) <= 2 * len(LONG) // BUDGET + 1
    finally:
        llm.shutdown()
