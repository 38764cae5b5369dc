"""FP8 W8A8 linear layers: the options that ask for them, the formats a checkpoint may declare, the device
check, and the engine on the bundled model against HF transformers running the same FP8 arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch

from tensorjet import LLM, SamplingParams
from tensorjet.config import EngineConfig, FeatureNotAvailableError
from tensorjet.quant.formats import UnsupportedCheckpointError, quantization_spec
from tensorjet.quant.fp8 import Fp8LinearMethod, Fp8Scheme
from tensorjet.runtime.kernel_selection import check_fp8_device

E4M3 = torch.float8_e4m3fn


# ---- options --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options", [{"dtype": "fp8"}, {"quantization": "fp8"}, {"dtype": "fp8", "quantization": "fp8"}]
)
def test_the_guide_spellings_ask_for_fp8_with_default_activations(options):
    config = EngineConfig.from_options(device="cpu", **options)
    assert config.quantization == "fp8"
    assert config.torch_dtype == torch.float32  # the CPU's default activation dtype


def test_fp8_with_an_explicit_activation_dtype():
    config = EngineConfig.from_options(device="cpu", dtype="bfloat16", quantization="fp8")
    assert (config.quantization, config.torch_dtype) == ("fp8", torch.bfloat16)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"quantization": "int3"},
            r"option quantization must be None or one of \('fp8', 'awq', 'gptq', 'gguf'\), got 'int3'",
        ),
        ({"dtype": "fp8", "quantization": "awq"}, "option quantization contradicts dtype='fp8', got 'awq'"),
        ({"dtype": "float8"}, "option dtype must be 'auto' or one of"),
    ],
)
def test_bad_quantization_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_options(**options)


def test_a_quantized_dtype_and_another_quantization_contradict():
    with pytest.raises(ValueError, match="option quantization contradicts dtype='fp8', got 'gptq'"):
        EngineConfig.from_options(dtype="fp8", quantization="gptq")


def test_fp8_on_a_gpu_without_fp8_tensor_cores_stops():
    with pytest.raises(ValueError, match=r"quantization='fp8'.*compute capability >= 8\.9.*8\.0"):
        check_fp8_device(torch.device("cuda"), capability=(8, 0))
    check_fp8_device(torch.device("cuda"), capability=(9, 0))  # Hopper: fine
    check_fp8_device(torch.device("cpu"))  # the reference product


# ---- checkpoint formats ---------------------------------------------------------------------------
def _compressed_tensors(inputs: dict | None, weights_strategy: str = "channel", **extra) -> dict:
    weights = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": weights_strategy}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs}
    return {
        "quant_method": "compressed-tensors",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
    } | extra


DYNAMIC = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": "token", "dynamic": True}
STATIC = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": "tensor", "dynamic": False}


def test_no_checkpoint_format_and_no_request_is_unquantized():
    assert quantization_spec(None, None) is None


def test_a_request_on_a_float_checkpoint_quantizes_at_load():
    spec = quantization_spec("fp8", None)
    assert (spec.method, spec.source, spec.fp8) == ("fp8", "online", Fp8Scheme())


@pytest.mark.parametrize("requested", [None, "fp8"])
def test_compressed_tensors_dynamic_and_static(requested):
    dynamic = quantization_spec(requested, _compressed_tensors(DYNAMIC))
    assert dynamic.source == "compressed-tensors" and not dynamic.kv_cache_scales
    assert dynamic.fp8 == Fp8Scheme(checkpoint_weights=True, static_input_scale=False)
    kv = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": "tensor", "dynamic": False}
    static = quantization_spec(requested, _compressed_tensors(STATIC, "tensor", kv_cache_scheme=kv))
    assert static.fp8 == Fp8Scheme(checkpoint_weights=True, static_input_scale=True)
    assert static.kv_cache_scales


def test_modelopt_fp8():
    spec = quantization_spec(
        None, {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    )
    assert spec.source == "modelopt" and spec.kv_cache_scales
    assert spec.fp8 == Fp8Scheme(checkpoint_weights=True, static_input_scale=True)


@pytest.mark.parametrize(
    "declared, error, message",
    [
        ({"quant_method": "bitsandbytes"}, UnsupportedCheckpointError, "quant_method='bitsandbytes'"),
        ({"quant_method": "awq", "bits": 8}, UnsupportedCheckpointError, "quantization_config.bits=8"),
        (_compressed_tensors(DYNAMIC, "block"), UnsupportedCheckpointError, r"weights.strategy='block'"),
        (_compressed_tensors(None), FeatureNotAvailableError, "input_activations is null"),
        (
            _compressed_tensors(DYNAMIC | {"num_bits": 4}),
            UnsupportedCheckpointError,
            r"input_activations is \{type: 'float', num_bits: 4",
        ),
        (
            _compressed_tensors(DYNAMIC | {"strategy": "tensor"}),
            UnsupportedCheckpointError,
            "input_activations.strategy='tensor' with dynamic=True",
        ),
        (
            _compressed_tensors(DYNAMIC, ignore=["lm_head", "model.layers.0.mlp.down_proj"]),
            UnsupportedCheckpointError,
            "ignore leaves",
        ),
        (
            {"quant_method": "modelopt", "quant_algo": "NVFP4"},
            UnsupportedCheckpointError,
            "quant_algo='NVFP4'",
        ),
    ],
)
def test_a_checkpoint_format_outside_the_supported_ones_stops(declared, error, message):
    with pytest.raises(error, match=message):
        quantization_spec(None, declared)


def test_a_request_that_contradicts_the_checkpoint_stops(monkeypatch):
    monkeypatch.setattr("tensorjet.quant.formats._checkpoint_spec", lambda config: _int8_spec())
    with pytest.raises(ValueError, match="quantization='fp8' contradicts the checkpoint"):
        quantization_spec("fp8", {"quant_method": "whatever"})


def _int8_spec():
    from tensorjet.quant.formats import QuantizationSpec

    return QuantizationSpec("int8", "compressed-tensors", Fp8Scheme())


# ---- the engine on the bundled model --------------------------------------------------------------
def _fake_quantize(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """x rounded to the E4M3 grid scaled so that amax maps to 448, back in x's dtype."""
    scale = amax.float().clamp(min=1e-12) / 448.0
    return ((x.float() / scale).clamp(-448, 448).to(E4M3).float() * scale).to(x.dtype)


class _Fp8Linear(torch.nn.Module):
    """An HF Linear with the W8A8 arithmetic written directly: weight per output channel, input per token."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.data
        self.weight = _fake_quantize(w, w.abs().amax(dim=1, keepdim=True))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = _fake_quantize(x, x.abs().amax(dim=-1, keepdim=True))
        return torch.nn.functional.linear(xq, self.weight, self.bias)


def _with_fp8_linears(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of an HF Llama whose decoder-layer Linears run the W8A8 arithmetic (the LM head stays)."""
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, _Fp8Linear(child))
    return model


def _engine_prompt_logprobs(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [
        torch.tensor([e[t] for e, t in zip(o.prompt_logprobs[1:], ids[1:])]) for o, ids in zip(outs, prompts)
    ]


def _hf_prompt_logprobs(model: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    result = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            result.append(logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0])
    return result


def test_fp8_engine_matches_hf_with_the_same_w8a8_arithmetic(tiny_model_dir):
    """A tiny random Llama (no outlier activations, so last-bit differences rarely move a value to the
    next E4M3 step): the engine's FP8 log-probabilities equal HF's with every decoder Linear running the
    W8A8 arithmetic written out in this test, and differ from the unquantized model's."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (7, 33, 64)]
    engine = LLM(model=tiny_model_dir, device="cpu", dtype="fp8")
    try:
        ours = _engine_prompt_logprobs(engine, prompts)
    finally:
        engine.shutdown()
    theirs = _hf_prompt_logprobs(_with_fp8_linears(hf), prompts)
    full = _hf_prompt_logprobs(hf, prompts)
    for a, b, c in zip(ours, theirs, full):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4)
        assert (a - c).abs().max() > 1e-3, "FP8 and full precision must differ"


def test_fp8_on_the_bundled_model_costs_little_next_token_likelihood(llm):
    """The bundled model: FP8 changes each prompt token's log-probability by a little on average and its
    mean by less (the measured perplexity is in docs/performance.md); a wrong scale or a mis-loaded
    shard would cost several nats."""
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings"
    ids = llm.tokenizer(text).input_ids
    engine = LLM(device="cpu", dtype="fp8")
    try:
        (fp8,) = _engine_prompt_logprobs(engine, [ids])
    finally:
        engine.shutdown()
    (full,) = _engine_prompt_logprobs(llm, [ids])
    assert (fp8 - full).abs().mean() < 0.5
    assert abs(fp8.mean() - full.mean()) < 0.1


def test_dummy_fp8_weights_are_e4m3_in_every_projection_and_the_head_stays_full_precision(tiny_model_dir):
    engine = LLM(model=tiny_model_dir, device="cpu", dtype="fp8", load_format="dummy", max_seq_len=64)
    try:
        model = engine.engine.runner.model
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                assert isinstance(proj.method, Fp8LinearMethod)
                assert proj.weight.dtype == E4M3 and proj.weight_scale.shape == (proj.weight.shape[0],)
                assert bool((proj.weight_scale > 0).all())
        assert model.lm_head.weight.dtype == model.embed_tokens.weight.dtype == torch.float32
        out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        engine.shutdown()


@pytest.mark.slow  # interpreted Triton kernels through the whole engine
def test_fp8_triton_path_with_the_fused_batch1_layer_matches_the_reference_path(tiny_model_dir):
    """The tiny Llama on the Triton path (interpreted here): its one-prompt decode steps run the fused FP8
    batch-1 layer and give the log-probabilities of the reference path."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128, (12,), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    runs = {}
    for backend in ("torch", "triton"):
        engine = LLM(model=tiny_model_dir, device="cpu", dtype="fp8", attention_backend=backend)
        try:
            assert engine.engine.runner.model.fused_decode == (backend == "triton")
            runs[backend] = engine.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        finally:
            engine.shutdown()
    assert runs["triton"].token_ids == runs["torch"].token_ids
    ours = [lp[t] for lp, t in zip(runs["triton"].logprobs, runs["triton"].token_ids)]
    ref = [lp[t] for lp, t in zip(runs["torch"].logprobs, runs["torch"].token_ids)]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=0, atol=1e-3)
