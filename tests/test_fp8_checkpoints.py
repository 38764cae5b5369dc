"""FP8 checkpoints made by the real tools (tests/data/quantized: llmcompressor's compressed-tensors format
and NVIDIA ModelOpt's export, from one tiny random Llama) load into tensorjet, which computes what the
tool's own fake-quantized model computes (`reference_logits/<name>.safetensors`), and a checkpoint
with a tensor missing or malformed stops at load naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tensorjet import LLM, SamplingParams
from tensorjet.quant.fp8 import Fp8LinearMethod

DATA = Path(__file__).parent / "data" / "quantized"
# name -> (static input scales, KV-cache scales)
CHECKPOINTS = {
    "llama-tiny-fp8-dynamic": (False, False),
    "llama-tiny-fp8-static": (True, False),
    "llama-tiny-fp8-static-kv": (True, True),
    "llama-tiny-modelopt-fp8": (True, False),
    "llama-tiny-modelopt-fp8-kv": (True, True),
}


def _engine(path: Path, **options) -> LLM:
    return LLM(model=str(path), device="cpu", dtype="float32", kv_cache_max_tokens=256, **options)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_checkpoint_loads_and_matches_the_tools_own_model(name):
    static, kv_scales = CHECKPOINTS[name]
    reference = load_file(DATA / "reference_logits" / f"{name}.safetensors")
    ids = reference["input_ids"].tolist()
    expected = reference["logits"].float().log_softmax(-1)
    # The tools fake-quantize keys and values with the checkpoint's scales: the FP8 cache does the same.
    llm = _engine(DATA / name, kv_cache_dtype="fp8" if kv_scales else "auto")
    try:
        runner = llm.engine.runner
        assert runner.weight_format.startswith("fp8 (")
        proj = runner.model.layers[0].mlp.down_proj
        assert isinstance(proj.method, Fp8LinearMethod) and proj.weight.dtype == torch.float8_e4m3fn
        assert (proj.input_scale is not None) == static
        attn = runner.model.attention_layers[0]
        assert (attn.k_scale != 1.0) == kv_scales
        out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    finally:
        llm.shutdown()
    ours = torch.tensor([entry[t] for entry, t in zip(out.prompt_logprobs[1:], ids[1:])])
    theirs = expected[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    # fp32 on both sides; a last-bit difference may move one activation to the next E4M3 step.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)
    greedy_ours = [max(entry, key=entry.get) for entry in out.prompt_logprobs[1:]]
    greedy_theirs = expected[:-1].argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(greedy_ours, greedy_theirs))
    assert agree >= len(greedy_theirs) - 1, f"greedy next tokens agree at {agree}/{len(greedy_theirs)}"


def test_per_tensor_scales_of_merged_shards_are_kept_per_shard():
    """q, k and v each carry their own per-tensor weight scale: the merged layer keeps each on its rows,
    and the merged static input scale is the largest of the three."""
    name = "llama-tiny-fp8-static"
    tensors = load_file(DATA / name / "model.safetensors")
    llm = _engine(DATA / name)
    try:
        qkv = llm.engine.runner.model.layers[1].self_attn.qkv_proj
        prefix = "model.layers.1.self_attn"
        starts = [0, *torch.tensor(qkv.output_sizes).cumsum(0).tolist()]
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = qkv.weight_scale[starts[i] : starts[i + 1]]
            assert bool((rows == tensors[f"{prefix}.{part}.weight_scale"].float()).all())
            assert torch.equal(qkv.weight[starts[i] : starts[i + 1]], tensors[f"{prefix}.{part}.weight"])
        input_scales = [tensors[f"{prefix}.{p}.input_scale"].float() for p in ("q_proj", "k_proj", "v_proj")]
        assert qkv.input_scale == torch.stack(input_scales).max()
    finally:
        llm.shutdown()


def _broken_copy(tmp_path: Path, name: str, edit) -> Path:
    target = tmp_path / name
    shutil.copytree(DATA / name, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_a_missing_weight_scale_names_the_tensor(tmp_path):
    path = _broken_copy(
        tmp_path, "llama-tiny-fp8-dynamic", lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale")
    )
    with pytest.raises(ValueError, match=r"missing 1 tensors.*layers\.1\.mlp\.up_proj\.weight_scale"):
        _engine(path)


def test_a_missing_input_scale_names_the_tensor(tmp_path):
    path = _broken_copy(
        tmp_path, "llama-tiny-fp8-static", lambda t: t.pop("model.layers.0.self_attn.o_proj.input_scale")
    )
    with pytest.raises(ValueError, match=r"missing 1 tensors.*layers\.0\.self_attn\.o_proj\.input_scale"):
        _engine(path)


def test_a_float_weight_in_an_fp8_checkpoint_names_the_tensor(tmp_path):
    def to_float(tensors):
        name = "model.layers.0.mlp.down_proj.weight"
        tensors[name] = tensors[name].to(torch.bfloat16)

    path = _broken_copy(tmp_path, "llama-tiny-fp8-dynamic", to_float)
    with pytest.raises(
        ValueError, match=r"down_proj\.weight' is torch\.bfloat16, expected torch\.float8_e4m3fn"
    ):
        _engine(path)


def test_a_weight_scale_of_the_wrong_size_names_the_tensor(tmp_path):
    def truncate(tensors):
        name = "model.layers.0.self_attn.k_proj.weight_scale"
        tensors[name] = tensors[name][:5].clone()

    path = _broken_copy(tmp_path, "llama-tiny-fp8-dynamic", truncate)
    with pytest.raises(
        ValueError, match=r"k_proj\.weight_scale' has shape \(5, 1\): a weight_scale is per tensor"
    ):
        _engine(path)


def test_an_unrecognised_quantization_config_stops_at_load(tmp_path):
    target = tmp_path / "odd"
    shutil.copytree(DATA / "llama-tiny-fp8-dynamic", target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method='bitsandbytes' is not a format tensorjet reads"):
        _engine(target)
