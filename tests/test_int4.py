"""INT4 options and formats: the guide's spellings, what each checkpoint's `quantization_config` is read
as, and the errors that name the field or option that cannot run."""

from __future__ import annotations

import pytest
import torch

from tensorjet import LLM, SamplingParams
from tensorjet.config import EngineConfig, FeatureNotAvailableError
from tensorjet.quant.formats import UnsupportedCheckpointError, quantization_spec
from tensorjet.quant.int4 import Int4LinearMethod, Int4Scheme

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}


def _w4a16(**weights) -> dict:
    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    group = {"format": "pack-quantized", "targets": ["Linear"], "weights": args | weights}
    group["input_activations"] = None
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": group}}


@pytest.mark.parametrize(
    "options, method",
    [
        ({"dtype": "int4_awq"}, "awq"),
        ({"quantization": "awq"}, "awq"),
        ({"dtype": "int4_awq", "quantization": "awq"}, "awq"),
        ({"dtype": "int4_gptq"}, "gptq"),
        ({"quantization": "gptq"}, "gptq"),
        ({"dtype": "int4_gptq", "quantization": "gptq"}, "gptq"),
    ],
)
def test_the_guides_spellings_each_alone_or_together(options, method):
    config = EngineConfig.from_options(device="cpu", **options)
    assert config.quantization == method
    assert config.torch_dtype == torch.float32  # activations keep the CPU's default dtype


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "int4_awq", "quantization": "gptq"}, "option quantization contradicts dtype='int4_awq'"),
        ({"dtype": "int4_gptq", "quantization": "fp8"}, "option quantization contradicts dtype='int4_gptq'"),
        ({"dtype": "int4_awq", "quantization": "int4_awq"}, "option quantization must be None or one of"),
    ],
)
def test_contradicting_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_options(**options)


def test_int8_is_still_refused_as_not_built():
    with pytest.raises(FeatureNotAvailableError, match=r"option dtype='int8'"):
        EngineConfig.from_options(dtype="int8")


def test_an_unquantized_checkpoint_reaches_the_runner_only_calibrated():
    """The engine calibrates a float checkpoint before its runner loads it (tensorjet.calibration);
    the runner itself never quantizes INT4 on the fly."""
    with pytest.raises(
        ValueError, match=r"quantization='awq' \(or dtype='int4_awq'\).*calibrated first"
    ) as info:
        quantization_spec("awq", None)
    assert not isinstance(info.value, FeatureNotAvailableError)


def test_each_format_is_read_from_its_quantization_config():
    awq = quantization_spec(None, AWQ)
    assert (awq.method, awq.source) == ("int4", "awq")
    assert awq.int4 == Int4Scheme("awq", 128, zero_points=True)
    gptq = quantization_spec("gptq", GPTQ)
    assert gptq.int4 == Int4Scheme("gptq", 128, zero_points=False, act_order=True, gptq_v1=True)
    v2 = quantization_spec(None, GPTQ | {"sym": False, "checkpoint_format": "gptq_v2", "group_size": -1})
    assert v2.int4 == Int4Scheme("gptq", -1, zero_points=True, act_order=True, gptq_v1=False)
    ct = quantization_spec("awq", _w4a16(symmetric=False, group_size=32))
    assert (ct.source, ct.int4) == (
        "compressed-tensors",
        Int4Scheme("compressed-tensors", 32, zero_points=True),
    )
    channel = quantization_spec("gptq", _w4a16(strategy="channel", group_size=None, actorder="group"))
    assert channel.int4 == Int4Scheme("compressed-tensors", -1, zero_points=False, act_order=True)


def test_a_w4a16_checkpoint_with_an_fp8_kv_cache_scheme_has_kv_scales():
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    assert quantization_spec(None, _w4a16() | {"kv_cache_scheme": kv}).kv_cache_scales
    assert not quantization_spec(None, _w4a16()).kv_cache_scales
    with pytest.raises(UnsupportedCheckpointError, match="kv_cache_scheme"):
        quantization_spec(None, _w4a16() | {"kv_cache_scheme": kv | {"num_bits": 4}})


def test_a_request_for_the_other_algorithm_contradicts_an_awq_or_gptq_checkpoint():
    with pytest.raises(
        ValueError, match=r"quantization='gptq' contradicts the checkpoint, which is int4 \(awq\)"
    ):
        quantization_spec("gptq", AWQ)
    with pytest.raises(ValueError, match=r"quantization='fp8' contradicts the checkpoint"):
        quantization_spec("fp8", _w4a16())


@pytest.mark.parametrize(
    "declared, message",
    [
        (AWQ | {"bits": 8}, r"quantization_config\.bits=8 is not supported"),
        (GPTQ | {"bits": 3}, r"quantization_config\.bits=3 is not supported"),
        (_w4a16(num_bits=8), r"weights\.num_bits=8 is not supported"),
        (AWQ | {"group_size": 100}, r"quantization_config\.group_size=100 is not supported"),
        (GPTQ | {"group_size": 0}, r"quantization_config\.group_size=0 is not supported"),
        (_w4a16(group_size=12), r"weights\.group_size=12 is not supported"),
        (AWQ | {"version": "gemv"}, r"quantization_config\.version='gemv' is not supported"),
        (GPTQ | {"checkpoint_format": "marlin"}, r"quantization_config\.checkpoint_format='marlin'"),
        (GPTQ | {"is_marlin_format": True}, r"is_marlin_format=true"),
        (_w4a16(strategy="tensor"), r"weights\.strategy='tensor' is not supported"),
        (_w4a16() | {"config_groups": {"g": _w4a16()["config_groups"]["g"] | {"format": "int-quantized"}}},
         r"format='int-quantized' is not supported"),
        (_w4a16() | {"ignore": ["lm_head", "model.layers.0.mlp.down_proj"]}, "ignore leaves"),
        (AWQ | {"modules_to_not_convert": ["q_proj"]}, "modules_to_not_convert leaves"),
    ],
)  # fmt: skip
def test_what_cannot_run_stops_naming_the_field(declared, message):
    with pytest.raises(UnsupportedCheckpointError, match=message):
        quantization_spec(None, declared)


def test_an_input_quantized_int_scheme_is_not_weight_only():
    declared = _w4a16()
    declared["config_groups"]["g"]["input_activations"] = {"num_bits": 8, "type": "int"}
    with pytest.raises(UnsupportedCheckpointError, match="input_activations is set"):
        quantization_spec(None, declared)


@pytest.mark.parametrize("dtype", ["int4_awq", "int4_gptq"])
def test_dummy_weights_make_int4_layers_directly(tiny_model_dir, dtype):
    llm = LLM(model=tiny_model_dir, load_format="dummy", dtype=dtype, device="cpu", kv_cache_max_tokens=128)
    try:
        runner = llm.engine.runner
        assert runner.weight_format == "int4 (dummy)"
        proj = runner.model.layers[0].self_attn.qkv_proj
        assert isinstance(proj.method, Int4LinearMethod)
        assert proj.qweight.dtype == torch.int32 and proj.qweight.shape[1] == proj.input_size // 8
        assert (proj.qzeros is not None) == (dtype == "int4_awq")  # GPTQ's dummy layout is symmetric
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 4
    finally:
        llm.shutdown()
