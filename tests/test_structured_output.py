"""Structured output and logit bias in the engine, on a tiny random-weight model (its text is noise, so
any text that matches was made to match by the grammar): JSON schemas, choices and regexes hold with n,
sampling, overlap scheduling and speculation; unconstrained batch-mates get the tokens they get alone;
the bitmask and the bias act on the device rows they name and no other."""

import json
import re

import jsonschema
import pytest
import torch
from serving import make_tiny_chat_model

from tensorjet import LLM, SamplingParams
from tensorjet.engine.structured_output import StructuredOutputError, choice_grammar
from tensorjet.runtime.sampler import NEG_INF, apply_token_bitmask
from tensorjet.sampling_params import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "enum": [1, 2, 3]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["ok", "size", "tags"],
}


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> str:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-structured"), 256)


def make_llm(model: str, **options) -> LLM:
    return LLM(model, load_format="dummy", device="cpu", kv_cache_max_tokens=4096, **options)


def generate(llm: LLM, prompt, params: SamplingParams):
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_json_schema_holds_for_every_sample_and_leaves_batch_mates_alone(tiny_chat_model, overlap):
    llm = make_llm(tiny_chat_model, disable_overlap_scheduler=not overlap)
    try:
        free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        alone = [generate(llm, p, free)[0].token_ids for p in ("the quick", "a server")]
        constraint = StructuredOutput("json", json.dumps(SCHEMA))
        constrained = SamplingParams(max_tokens=60, temperature=1, n=3, seed=7, structured_output=constraint)
        outs = llm.generate(["the quick", "tokens in", "a server"], [free, constrained, free], use_tqdm=False)
        assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
        for completion in outs[1].outputs:
            assert completion.finish_reason == "stop", completion
            jsonschema.validate(json.loads(completion.text), SCHEMA)
        assert len({c.text for c in outs[1].outputs}) > 1  # sampled, not one forced string
        assert llm.stats()["kv_blocks_used"] == 0
    finally:
        llm.shutdown()


def test_choice_regex_and_grammar_hold(tiny_chat_model):
    llm = make_llm(tiny_chat_model)
    try:
        choices = ("yes", 'no "way"', "ünïcode\n")
        params = SamplingParams(
            max_tokens=20, temperature=1.0, n=6, seed=3, structured_output=StructuredOutput("choice", choices)
        )
        assert {c.text for c in generate(llm, "x", params)} <= set(choices)
        regex = r"[0-9]{3}-[a-c]{2}"
        params = SamplingParams(max_tokens=20, n=4, structured_output=StructuredOutput("regex", regex))
        for c in generate(llm, "x", params):
            assert re.fullmatch(regex, c.text) and c.finish_reason == "stop", c.text
        for grammar in ('root ::= "A" [0-9] [0-9]?', 'start: "A" DIGIT\n%import common.DIGIT'):  # EBNF, Lark
            params = SamplingParams(max_tokens=20, structured_output=StructuredOutput("grammar", grammar))
            assert re.fullmatch(r"A[0-9]{1,2}", generate(llm, "x", params)[0].text)
    finally:
        llm.shutdown()


def test_bad_constraints_are_refused_before_anything_is_queued(tiny_chat_model):
    llm = make_llm(tiny_chat_model)
    try:
        for kind, spec in (("json", '{"type": 5}'), ("regex", "a("), ("grammar", "root ::= ")):
            with pytest.raises(StructuredOutputError, match="cannot compile"):
                llm.generate(["x"], SamplingParams(structured_output=StructuredOutput(kind, spec)))
        with pytest.raises(ValueError, match="logit_bias token ids must be below"):
            llm.generate(["x"], SamplingParams(logit_bias={10**6: 1.0}))
        assert not llm.engine.has_unfinished_requests()
    finally:
        llm.shutdown()


def test_constrained_sequences_do_not_speculate_and_still_hold(tiny_chat_model):
    llm = make_llm(tiny_chat_model, speculative_model="[ngram]", num_speculative_tokens=3)
    try:
        constraint = StructuredOutput("json", json.dumps(SCHEMA))
        repetitive = "a b a b a b a b a b a b"
        free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        outs = llm.generate(
            [repetitive, repetitive],
            [free, SamplingParams(max_tokens=60, structured_output=constraint)],
            use_tqdm=False,
        )
        jsonschema.validate(json.loads(outs[1].outputs[0].text), SCHEMA)
        assert outs[0].outputs[0].token_ids == generate(llm, repetitive, free)[0].token_ids
        llm.engine.add_request("probe", "x", SamplingParams(max_tokens=8, structured_output=constraint))
        seq = llm.engine.requests["probe"].seqs[0]
        assert llm.engine.speculator.lookahead(seq) == 0
        llm.engine.abort_request("probe")
    finally:
        llm.shutdown()


def test_logit_bias_forces_and_bans_tokens(tiny_chat_model):
    llm = make_llm(tiny_chat_model)
    try:
        free = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        greedy = generate(llm, "the lazy", free)[0].token_ids
        forced = generate(llm, "the lazy", SamplingParams(**{**vars(free), "logit_bias": {42: 100.0}}))
        assert forced[0].token_ids == [42] * 6
        banned = {t: -100.0 for t in set(greedy)}
        others = generate(llm, "the lazy", SamplingParams(**{**vars(free), "logit_bias": banned}))
        assert not set(others[0].token_ids) & set(greedy)
    finally:
        llm.shutdown()


def test_token_bitmask_masks_exactly_its_rows_and_bits():
    torch.manual_seed(0)
    logits = torch.randn(3, 70)
    allowed = torch.zeros(1, 70, dtype=torch.bool)
    allowed[0, [0, 31, 32, 63, 69]] = True  # bit 31 is the sign bit of an int32 word
    bits = torch.zeros(1, 96, dtype=torch.int64)
    bits[:, :70] = allowed.long()
    weights = 2 ** torch.arange(32, dtype=torch.int64)
    words = (bits.view(1, 3, 32) * weights).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    masked = apply_token_bitmask(logits, [1], words)
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    assert torch.equal(masked[1][allowed[0]], logits[1][allowed[0]])
    assert (masked[1][~allowed[0]] == NEG_INF).all()


def test_choice_grammar_escapes_its_literals():
    assert choice_grammar(("a", 'b"c', "d\\e")) == 'root ::= "a" | "b\\"c" | "d\\\\e"'
