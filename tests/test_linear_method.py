"""Every product of a linear layer goes through its `LinearMethod`: the plain product of prefill and
decode, and the fused batch-1 layer. A custom method installed in the engine changes how weights are
stored; a product that bypassed it would give other tokens."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from tensorjet import LLM, SamplingParams
from tensorjet.layers.linear import Linear, LinearMethod, UnquantizedLinearMethod
from tensorjet.layers.norm import RMSNorm
from tensorjet.layers.weight_loader import set_weight_loader
from tensorjet.runtime import model_runner

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


class DoubledWeightMethod(UnquantizedLinearMethod):
    """Keeps each weight doubled and halves what it multiplies (both exact in binary floating point):
    the same products with the same kernels, but one that read `layer.weight` itself would come out
    twice too large. Records (product kind, rows) of every product it runs."""

    def __init__(self, calls: list[tuple[str, int]]) -> None:
        super().__init__()
        self.calls = calls

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        super().create_weights(layer, dtype)

        def doubled(param, tensor, shard_id):
            layer.weight_loader(param, 2 * tensor, shard_id)

        set_weight_loader(layer.weight, doubled)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(("plain", x.shape[0]))
        return super().apply(layer, 0.5 * x)

    def apply_fused(self, layer, x, *, norm, residual, silu_mul):
        self.calls.append(("fused", x.shape[0]))
        return self.kernels.fused(
            0.5 * x if norm is None else x,
            layer.weight,
            layer.bias,
            norm_weight=None if norm is None else 0.5 * norm.weight,  # halves the normed row
            eps=0.0 if norm is None else norm.eps,
            residual=residual,
            silu_mul=silu_mul,
        )


class TransposedWeightMethod(LinearMethod):
    """A weight format with its own layout (W^T [K, N], loaded shard by shard into columns) and no
    fused batch-1 product, as a quantized format without a fused kernel would be. Its parameter keeps
    the checkpoint tensor's name, as any method's do."""

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        layer.weight = torch.nn.Parameter(
            torch.empty(layer.input_size, sum(layer.output_sizes), dtype=dtype), requires_grad=False
        )
        # The rows of W are the columns here.
        set_weight_loader(
            layer.weight, lambda param, tensor, shard_id: layer.weight_loader(param.data.T, tensor, shard_id)
        )
        if layer.has_bias:
            layer.bias = torch.nn.Parameter(
                torch.zeros(sum(layer.output_sizes), dtype=dtype), requires_grad=False
            )
            set_weight_loader(layer.bias, layer.weight_loader)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        y = x @ layer.weight
        return y if layer.bias is None else y + layer.bias

    def init_dummy_weights(self, layer: Linear, generator: torch.Generator) -> None:
        layer.weight.data.uniform_(-0.1, 0.1, generator=generator)


def engine_with(monkeypatch, method_factory, **options) -> LLM:
    monkeypatch.setattr(model_runner, "linear_method_for", lambda config, spec: method_factory)
    return LLM(device="cpu", **{"dtype": "float32", **options})


def generate(llm: LLM, prompts, max_tokens: int) -> tuple[list[list[int]], torch.Tensor, list[int]]:
    """Greedy tokens, their log-probabilities, and the prompt lengths."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    results = llm.generate(prompts, params, use_tqdm=False)
    outputs = [r.outputs[0] for r in results]
    logprobs = [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outputs]
    return [o.token_ids for o in outputs], torch.tensor(logprobs), [len(r.prompt_token_ids) for r in results]


def test_prefill_and_decode_products_go_through_the_method(llm, monkeypatch):
    """Bundled model, reference attention: the doubled-weight method gives the default engine's tokens
    and log-probabilities, and runs every projection of every step."""
    expected_tokens, expected_logprobs, _ = generate(llm, PROMPTS, 8)
    calls = []
    custom = engine_with(monkeypatch, partial(DoubledWeightMethod, calls))
    try:
        tokens, logprobs, _ = generate(custom, PROMPTS, 8)
        steps = custom.stats()["num_steps"]
        num_layers = custom.engine.runner.model.config.num_hidden_layers
    finally:
        custom.shutdown()
    assert tokens == expected_tokens
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-4)
    assert len(calls) == 4 * num_layers * steps, "every projection of every step runs through the method"
    rows = [r for _, r in calls]
    assert {kind for kind, _ in calls} == {"plain"}
    assert max(rows) > len(PROMPTS) and min(rows) <= len(PROMPTS), "prefill and decode products"


def test_fused_batch1_layer_goes_through_the_method(tiny_model_dir, monkeypatch):
    """Tiny model, Triton attention (interpreted): one prompt longer than the fused layer takes, so its
    prefill runs the plain products and its decode steps the fused layer, every projection of it
    through the doubled-weight method's fused product, with the unmodified engine's tokens and
    log-probabilities."""
    from tensorjet.kernels.fused_gemv import MAX_FUSED_ROWS

    options = dict(
        model=tiny_model_dir, attention_backend="triton", enable_cuda_graph=False, max_num_tokens=32,
        max_batch_size=1,
    )  # fmt: skip
    prompt = [[(5 * j + 3) % 128 for j in range(MAX_FUSED_ROWS + 4)]]
    reference = LLM(device="cpu", **options)
    try:
        expected_tokens, expected_logprobs, _ = generate(reference, prompt, 3)
    finally:
        reference.shutdown()
    calls = []
    custom = engine_with(monkeypatch, partial(DoubledWeightMethod, calls), **options)
    try:
        assert custom.engine.runner.model.fused_decode
        tokens, logprobs, _ = generate(custom, prompt, 3)
        num_layers = custom.engine.runner.model.config.num_hidden_layers
    finally:
        custom.shutdown()
    assert tokens == expected_tokens
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-4)
    assert calls == [("plain", len(prompt[0]))] * 4 * num_layers + [("fused", 1)] * 4 * num_layers * 2


@pytest.mark.slow  # two engines with every kernel interpreted
def test_a_method_without_a_fused_product_runs_the_unfused_layer(tiny_model_dir, monkeypatch):
    """A weight format with no fused GEMV keeps the fused decode layer off and still gives the
    unmodified Triton engine's tokens (which runs the fused layer)."""
    # One sequence at a time, so that every decode step of the reference runs the fused layer.
    options = dict(model=tiny_model_dir, attention_backend="triton", max_num_tokens=32, max_batch_size=1)
    prompts = [[(5 * i + j) % 128 for j in range(n)] for i, n in enumerate((6, 11))]
    reference = LLM(device="cpu", **options)
    try:
        assert reference.engine.runner.model.fused_decode
        expected_tokens, expected_logprobs, _ = generate(reference, prompts, 6)
    finally:
        reference.shutdown()
    custom = engine_with(monkeypatch, TransposedWeightMethod, **options)
    try:
        model = custom.engine.runner.model
        assert not model.fused_decode
        qkv = model.layers[0].self_attn.qkv_proj
        assert qkv.weight.shape == (qkv.input_size, sum(qkv.output_sizes))
        tokens, logprobs, _ = generate(custom, prompts, 6)
    finally:
        custom.shutdown()
    assert tokens == expected_tokens
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-4)


def test_forward_fused_without_a_fused_product_runs_separate_ops():
    torch.manual_seed(0)
    norm = RMSNorm(24, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    weight, x = torch.randn(2 * 16, 24), torch.randn(1, 24)
    layer = Linear(24, [16, 16], method=TransposedWeightMethod())
    for shard, rows in enumerate(weight.split(16)):
        layer.weight.weight_loader(layer.weight, rows, shard)
    assert not layer.method.supports_fused
    with pytest.raises(NotImplementedError, match="no fused batch-1 product"):
        layer.method.apply_fused(layer, x, norm=None, residual=None, silu_mul=False)

    def silu_mul(y):
        return F.silu(y[:, :16]) * y[:, 16:]

    ref = F.linear(norm(x), weight)
    torch.testing.assert_close(layer.forward_fused(x, norm=norm), ref)
    torch.testing.assert_close(layer.forward_fused(x, norm=norm, act=silu_mul), silu_mul(ref))
    residual = torch.randn(1, 32)
    expected = residual + F.linear(x, weight)
    assert layer.forward_fused(x, residual=residual) is residual
    torch.testing.assert_close(residual, expected)
