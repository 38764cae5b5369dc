"""INT4 checkpoints of the tiny Llama (tests/data/quantized, made by benchmarks/int4_checkpoints.py):
llmcompressor's GPTQ, AWQ and round-to-nearest W4A16 (compressed-tensors), the AWQ one in AutoAWQ's GEMM
format, the GPTQ one in GPTQ's v1 format, and a GPTQ act-order checkpoint. Each loads into tensorjet and
computes what transformers computes from the same weights (`reference_logits/<name>.safetensors`), the
greedy next token included; a malformed one stops at load naming the tensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tensorjet import LLM, SamplingParams
from tensorjet.quant import int4_packing as packing
from tensorjet.quant.int4 import Int4LinearMethod

DATA = Path(__file__).parent / "data" / "quantized"
# name -> (the weight format tensorjet reports, the reference logits it must reproduce, zero points,
# act order). The converted checkpoints hold their source's weights, so they share its reference.
CHECKPOINTS = {
    "llama-tiny-w4a16-gptq": ("int4 (compressed-tensors)", "llama-tiny-w4a16-gptq", False, False),
    "llama-tiny-w4a16-awq": ("int4 (compressed-tensors)", "llama-tiny-w4a16-awq", True, False),
    "llama-tiny-w4a16-rtn": ("int4 (compressed-tensors)", "llama-tiny-w4a16-rtn", False, False),
    "llama-tiny-awq-gemm": ("int4 (awq)", "llama-tiny-w4a16-awq", True, False),
    "llama-tiny-gptq": ("int4 (gptq)", "llama-tiny-w4a16-gptq", False, False),
    "llama-tiny-gptq-act-order": ("int4 (gptq)", "llama-tiny-gptq-act-order", False, True),
}


def _engine(path: Path, **options) -> LLM:
    return LLM(model=str(path), device="cpu", dtype="float32", kv_cache_max_tokens=256, **options)


def _prompt_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    return out.prompt_logprobs[1:]


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_checkpoint_loads_and_matches_transformers(name):
    weight_format, reference_name, zero_points, act_order = CHECKPOINTS[name]
    reference = load_file(DATA / "reference_logits" / f"{reference_name}.safetensors")
    ids = reference["input_ids"].tolist()
    expected = reference["logits"].float().log_softmax(-1)
    llm = _engine(DATA / name)
    try:
        runner = llm.engine.runner
        assert runner.weight_format == weight_format
        proj = runner.model.layers[1].mlp.down_proj
        assert isinstance(proj.method, Int4LinearMethod) and proj.qweight.dtype == torch.int32
        assert (proj.qzeros is not None) == zero_points
        assert (runner.model.layers[0].self_attn.qkv_proj.perm is not None) == act_order
        prompt_logprobs = _prompt_logprobs(llm, ids)
    finally:
        llm.shutdown()
    ours = torch.tensor([entry[t] for entry, t in zip(prompt_logprobs, ids[1:])])
    theirs = expected[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)  # fp32 both; sums in another order
    greedy_ours = [max(entry, key=entry.get) for entry in prompt_logprobs]
    assert greedy_ours == expected[:-1].argmax(-1).tolist()


def test_merged_shards_load_into_their_rows():
    """q, k and v of an AutoAWQ checkpoint (packed along N in AWQ's order) land in the merged layer's
    rows as codes in tensorjet's layout, with their scales and zero points."""
    tensors = load_file(DATA / "llama-tiny-awq-gemm" / "model.safetensors")
    llm = _engine(DATA / "llama-tiny-awq-gemm")
    try:
        qkv = llm.engine.runner.model.layers[1].self_attn.qkv_proj
        starts = [0, *torch.tensor(qkv.output_sizes).cumsum(0).tolist()]
        codes = packing.unpack_int32(qkv.qweight, 1, qkv.input_size)
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(starts[i], starts[i + 1])
            prefix = f"model.layers.1.self_attn.{part}"
            assert torch.equal(codes[rows], packing.unpack_awq(tensors[f"{prefix}.qweight"]).T)
            assert torch.equal(qkv.scales[rows], tensors[f"{prefix}.scales"].T.float())
            assert torch.equal(qkv.qzeros[rows], packing.unpack_awq(tensors[f"{prefix}.qzeros"]).T)
    finally:
        llm.shutdown()


def test_act_order_columns_are_stored_by_group_with_their_permutation():
    tensors = load_file(DATA / "llama-tiny-gptq-act-order" / "model.safetensors")
    llm = _engine(DATA / "llama-tiny-gptq-act-order")
    try:
        gate_up = llm.engine.runner.model.layers[0].mlp.gate_up_proj
        g_idx = tensors["model.layers.0.mlp.gate_proj.g_idx"].long()
        assert not torch.equal(g_idx, torch.arange(64) // 32)  # a real act order
        perm = gate_up.perm.long()
        assert torch.equal(g_idx[perm], torch.arange(64) // 32)  # stored columns grouped
        codes = packing.unpack_int32(gate_up.qweight, 1, 64)
        gate = packing.unpack_gptq_weight(tensors["model.layers.0.mlp.gate_proj.qweight"])
        assert torch.equal(codes[:128], gate[:, perm])
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_the_triton_int4_kernels_in_the_engine_match_the_reference_path():
    """The act-order GPTQ checkpoint on the Triton path (interpreted here: the fused batch-1 INT4 layer
    for decode steps, the GEMM for the prompt) generates what the CPU's float path generates."""
    prompt = list(b"ROMEO:\nBut, soft!")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    runs = {}
    for backend in ("torch", "triton"):
        llm = _engine(DATA / "llama-tiny-gptq-act-order", attention_backend=backend)
        try:
            method = llm.engine.runner.model.layers[0].self_attn.qkv_proj.method
            assert (method.float_weight is None) == (backend == "triton")
            assert llm.engine.runner.model.fused_decode == (backend == "triton")
            runs[backend] = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        finally:
            llm.shutdown()
    assert runs["triton"].token_ids == runs["torch"].token_ids
    ours = [lp[t] for lp, t in zip(runs["triton"].logprobs, runs["triton"].token_ids)]
    ref = [lp[t] for lp, t in zip(runs["torch"].logprobs, runs["torch"].token_ids)]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=0, atol=1e-4)


def _broken_copy(tmp_path: Path, name: str, edit) -> Path:
    target = tmp_path / name
    shutil.copytree(DATA / name, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _set(name: str, value):
    def edit(tensors):
        tensors[name] = value(tensors[name])

    return edit


@pytest.mark.parametrize(
    "name, edit, message",
    [
        (
            "llama-tiny-awq-gemm",
            lambda t: t.pop("model.layers.1.mlp.up_proj.qzeros"),
            r"missing 1 tensors.*layers\.1\.mlp\.up_proj\.qzeros",
        ),
        (
            "llama-tiny-gptq",
            _set("model.layers.0.self_attn.o_proj.qweight", lambda q: q.to(torch.int64)),
            r"o_proj\.qweight' is torch\.int64, expected torch\.int32",
        ),
        (
            "llama-tiny-gptq",
            _set("model.layers.0.self_attn.k_proj.qweight", lambda q: q[:, :16].contiguous()),
            r"k_proj\.qweight' has shape \(8, 16\), expected \(8, 32\) \(\[K / 8, N\]\)",
        ),
        (
            "llama-tiny-w4a16-rtn",
            _set("model.layers.0.mlp.down_proj.weight_shape", lambda s: s.flip(0)),
            r"down_proj\.weight_shape' is \[128, 64\], expected \[64, 128\]",
        ),
        (
            "llama-tiny-gptq-act-order",
            _set("model.layers.1.self_attn.v_proj.g_idx", lambda g: g.flip(0)),
            r"v_proj\.g_idx' differs from the g_idx of the other modules merged with it",
        ),
    ],
    ids=["missing", "dtype", "shape", "weight_shape", "g_idx"],
)
def test_a_malformed_checkpoint_names_the_tensor(tmp_path, name, edit, message):
    with pytest.raises(ValueError, match=message):
        _engine(_broken_copy(tmp_path, name, edit))


@pytest.mark.parametrize(
    "name, options",
    [
        ("llama-tiny-awq-gemm", {"dtype": "int4_awq", "quantization": "awq"}),
        ("llama-tiny-gptq-act-order", {"dtype": "int4_gptq", "quantization": "gptq"}),
        ("llama-tiny-w4a16-awq", {"quantization": "awq"}),  # llmcompressor's: either algorithm's name
    ],
)
def test_the_guides_snippets_run_as_written(name, options):
    """`LLM(model=..., dtype="int4_awq", quantization="awq")` and the GPTQ one, on the CPU."""
    llm = LLM(model=str(DATA / name), device="cpu", kv_cache_max_tokens=256, **options)
    try:
        prompt = list(b"ROMEO:")  # the fixtures ship no tokenizer: token ids are bytes
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
        assert llm.engine.runner.weight_format.startswith("int4 (")
        assert len(out.outputs[0].token_ids) >= 1
    finally:
        llm.shutdown()
