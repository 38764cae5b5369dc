"""GGUF 4-bit blocks on the CPU (`quantization="gguf"`): the blocks unpack to exactly the GGUF's own
dequantization, the kernel's packing keeps them up to bf16 rounding of the scales, every product of the
layer equals the product with its dequantized weight, the option's rules name their field, and the
bundled model runs its blocks by default within the perplexity of its fp32 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from prompts import PLAIN

from tensorjet import LLM, SamplingParams
from tensorjet.config import EngineConfig
from tensorjet.layers.activation import silu_and_mul
from tensorjet.layers.attention import AttentionMetadata
from tensorjet.layers.linear import Linear, UnquantizedLinearMethod
from tensorjet.layers.norm import RMSNorm
from tensorjet.layers.weight_loader import weight_loader_of
from tensorjet.models.gguf_blocks import unpack_block_rows
from tensorjet.models.gguf_decode import GgufDecodeStep
from tensorjet.quant import gguf
from tensorjet.quant.formats import UnsupportedCheckpointError, quantization_spec
from tensorjet.runtime.kernel_selection import check_gguf_device

BF16_STEP = 2.0**-8  # bf16 keeps 8 significant bits: rounding moves a value by at most this share of it


def random_blocks(rows: int, columns: int, type_name: str, seed: int = 0) -> np.ndarray:
    """GGUF block rows [rows, blocks * bytes] with random fp16 scales (and minimums) and codes."""
    rng = np.random.default_rng(seed)
    groups = columns // gguf.GROUP
    scales = (rng.random((rows, groups, 1)) * 0.02 + 1e-3).astype(np.float16)
    parts = [scales.view(np.uint8)]
    if type_name == "Q4_1":
        parts.append((-rng.random((rows, groups, 1)) * 0.1).astype(np.float16).view(np.uint8))
    parts.append(rng.integers(0, 256, (rows, groups, 16), dtype=np.uint8))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def blocks_of(rows: int, columns: int, type_name: str = "Q4_1", seed: int = 0) -> tuple[dict, torch.Tensor]:
    """The parts of random blocks and the GGUF reader's own fp32 dequantization of them."""
    data = random_blocks(rows, columns, type_name, seed)
    reference = gguf_dequantize(data, GGMLQuantizationType[type_name]).reshape(rows, columns)
    return unpack_block_rows(data, type_name, columns), torch.from_numpy(np.array(reference, np.float32))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_blocks_unpack_to_exactly_the_gguf_dequantization(type_name):
    parts, reference = blocks_of(48, 96, type_name)
    assert parts["qweight"].dtype == torch.uint8 and int(parts["qweight"].max()) <= 15
    scales = parts["scales"].float().repeat_interleave(gguf.GROUP, 1)
    mins = parts["mins"].float().repeat_interleave(gguf.GROUP, 1)
    assert torch.equal(scales * parts["qweight"].float() + mins, reference)


def test_packing_keeps_the_weights_up_to_bf16_rounding_of_scales():
    parts, reference = blocks_of(64, 128, "Q4_1", seed=1)
    qweight, scales_and_zeros, dense = gguf.pack_blocks(parts["qweight"], parts["scales"], parts["mins"])
    packed = kernel_dequantize(qweight, scales_and_zeros, 128).float()  # rounded to bf16 on the way out
    assert torch.equal(packed, kernel_weight(parts).bfloat16().float())
    assert torch.equal(dense.float(), packed), "the bf16 weight of larger batches is the same weight"
    scales = parts["scales"].float().repeat_interleave(gguf.GROUP, 1)
    zeros = (parts["mins"].float() + 8 * parts["scales"].float()).repeat_interleave(gguf.GROUP, 1)
    # Each bf16 rounding moves a value by at most 2^-8 of it.
    bound = BF16_STEP * (8 * scales + zeros.abs() + reference.abs())
    assert bool(((packed - reference).abs() <= bound).all())
    assert (packed != reference).any(), "the bound is about rounding: some weights do round"


def kernel_weight(parts: dict) -> torch.Tensor:
    """The fp32 weight the int4 kernel multiplies by: (q - 8) * s + z, s = d and z = m + 8 d in bf16."""
    scales, mins = parts["scales"].float(), parts["mins"].float()
    s = scales.bfloat16().float().repeat_interleave(gguf.GROUP, 1)
    z = (mins + 8 * scales).bfloat16().float().repeat_interleave(gguf.GROUP, 1)
    return (parts["qweight"].float() - 8) * s + z


def kernel_dequantize(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, k: int) -> torch.Tensor:
    """A packed weight [N, K] read back through the kernel itself (the identity times it), as bf16."""
    identity = torch.eye(k, dtype=torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(identity, qweight, gguf.GROUP, scales_and_zeros).T


def gguf_linear(input_size: int, output_sizes: list[int], bias: bool = False, seed: int = 0):
    """A merged GgufLinearMethod layer loaded shard by shard, and the fp32 weight its kernel multiplies by."""
    layer = Linear(input_size, output_sizes, bias=bias, method=gguf.GgufLinearMethod())
    weights = []
    for shard, rows in enumerate(output_sizes):
        parts, _ = blocks_of(rows, input_size, "Q4_1", seed=seed + shard)
        weights.append(kernel_weight(parts))
        for name, tensor in parts.items():
            param = getattr(layer, name)
            weight_loader_of(param)(param, tensor, shard)
    if bias:
        layer.bias.data.uniform_(-0.5, 0.5)
    layer.method.process_weights_after_loading(layer)
    return layer, torch.cat(weights)


def reference_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.to(torch.bfloat16).float() @ weight.T
    return y if bias is None else y + bias


@pytest.mark.parametrize("rows", [1, gguf.SMALL_BATCH_MAX_ROWS, gguf.SMALL_BATCH_MAX_ROWS + 3])
def test_products_equal_the_dequantized_weights_product(rows):
    """Up to SMALL_BATCH_MAX_ROWS rows the int4 kernel (the fp32 weight it builds), past them the same
    weight rounded to bf16, kept beside the blocks."""
    torch.manual_seed(0)
    layer, weight = gguf_linear(96, [32, 48], bias=True)
    assert not hasattr(layer, "scales") and not hasattr(layer, "mins")  # repacked
    assert torch.equal(layer.dense_weight, weight.bfloat16())
    x = torch.randn(rows, 96)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 80)
    if rows > gguf.SMALL_BATCH_MAX_ROWS:
        weight = weight.bfloat16().float()
    # fp32 sums in another order, then the product rounded to bf16 before the bias is added
    product = reference_product(x, weight, None)
    torch.testing.assert_close(y - layer.bias, product, rtol=BF16_STEP, atol=1e-5)


def test_fused_products_carry_the_norm_residual_and_silu():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    gate_up, gate_up_weight = gguf_linear(64, [64, 64])
    down, down_weight = gguf_linear(64, [64], seed=5)
    x = torch.randn(1, 64)
    act = gate_up.forward_fused(x, norm=norm, act=silu_and_mul)
    assert torch.equal(act, silu_and_mul(gate_up(norm(x)))), "the same numbers as the ops one by one"
    expected = silu_and_mul(reference_product(norm(x), gate_up_weight, None))
    torch.testing.assert_close(act, expected, rtol=4 * BF16_STEP, atol=1e-5)
    residual = torch.randn(1, 64)
    unfused = residual + down(act)
    expected = residual + reference_product(act, down_weight, None)
    out = down.forward_fused(act, residual=residual)
    assert out is residual, "the residual stream is updated in place"
    assert torch.equal(residual, unfused)
    torch.testing.assert_close(residual, expected, rtol=4 * BF16_STEP, atol=1e-5)


def test_the_head_is_int8_rows_within_half_a_step_for_one_row_and_bf16_past_it():
    torch.manual_seed(0)
    method = gguf.GgufHeadMethod(UnquantizedLinearMethod())
    head = Linear(64, 48, method=method)
    head.weight.data.normal_()
    method.process_weights_after_loading(head)
    scales = method.scales.float()[:, None]
    assert method.codes.dtype == torch.int8 and int(method.codes.abs().max()) == 127
    rebuilt = method.codes.float() * scales
    assert bool(((rebuilt - head.weight).abs() <= scales / 2 * (1 + 1e-6)).all())
    x = torch.randn(1, 64)
    expected = x.bfloat16().float() @ rebuilt.T
    torch.testing.assert_close(method.apply(head, x), expected, rtol=BF16_STEP, atol=1e-4)
    x = torch.randn(3, 64)  # more rows than the int8 kernel pays for: the bf16 weight
    expected = x.bfloat16().float() @ head.weight.bfloat16().float().T
    torch.testing.assert_close(method.apply(head, x), expected, rtol=BF16_STEP, atol=1e-4)
    assert method.packed is not None, "the bf16 weight in oneDNN's layout, made by the first such call"


@pytest.mark.parametrize("rows", [5, 32, 300])
def test_the_packed_bf16_weight_gives_the_plain_weights_products(rows):
    """`pack_dense`'s layout multiplies like `F.linear` over the plain bf16 weight, up to the rounding
    of the bf16 result."""
    torch.manual_seed(0)
    weight = torch.randn(80, 96).bfloat16()
    packed = gguf.pack_dense(weight)
    assert packed is not None
    x = torch.randn(rows, 96).bfloat16()
    y = gguf.dense_product(x, weight, packed)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 80)
    torch.testing.assert_close(y.float(), x.float() @ weight.float().T, rtol=BF16_STEP, atol=1e-3)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=BF16_STEP, atol=0)


def test_a_shape_the_kernel_cannot_take_names_the_option():
    with pytest.raises(ValueError, match=r"quantization='gguf'.*\[24, 64\]"):
        Linear(64, 24, method=gguf.GgufLinearMethod())


# ---- options ------------------------------------------------------------------------------------

Q4 = {f"model.layers.0.{p}": "Q4_1" for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")}
Q4["model.embed_tokens"] = "Q8_0"


def test_a_4_bit_gguf_runs_its_blocks_by_default_on_the_cpu_only_with_dtype_auto():
    assert quantization_spec(None, None, gguf_types=Q4, gguf_by_default=True).method == "gguf"
    assert quantization_spec(None, None, gguf_types=Q4, gguf_by_default=False) is None
    mixed = Q4 | {"model.layers.0.mlp.down_proj": "Q6_K"}
    assert quantization_spec(None, None, gguf_types=mixed, gguf_by_default=True) is None
    assert EngineConfig.from_options(device="cpu").gguf_blocks_by_default
    assert not EngineConfig.from_options(device="cpu", dtype="float32").gguf_blocks_by_default


def test_gguf_blocks_of_another_type_or_model_name_the_cause():
    mixed = Q4 | {"model.layers.0.mlp.down_proj": "Q6_K"}
    with pytest.raises(UnsupportedCheckpointError, match=r"model\.layers\.0\.mlp\.down_proj is Q6_K"):
        quantization_spec("gguf", None, gguf_types=mixed)
    with pytest.raises(ValueError, match=r"quantization='gguf'.*not a \.gguf file"):
        quantization_spec("gguf", None)
    with pytest.raises(ValueError, match=r"quantization='gguf' runs on the CPU only"):
        check_gguf_device(torch.device("cuda"))


@pytest.mark.parametrize("dtype", ["float16", "fp16", "int4_awq"])
def test_a_dtype_the_cpu_kernel_cannot_run_names_the_field(dtype):
    with pytest.raises(ValueError, match="option (dtype|quantization)"):
        LLM(device="cpu", quantization="gguf", dtype=dtype)


# ---- engines ------------------------------------------------------------------------------------


def test_an_engine_runs_random_gguf_blocks(tiny_model_dir):
    """A tiny model with random 4-bit blocks: the head runs as int8 rows, one-token steps run the fused
    layer, and greedy tokens do not depend on batching in batch-invariant mode."""
    options = dict(model=tiny_model_dir, load_format="dummy", quantization="gguf", kv_cache_max_tokens=256)
    prompts = [[(7 * i + j) % 128 for j in range(5 + 3 * i)] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(device="cpu", **options)
    try:
        model = llm.engine.runner.model
        assert llm.engine.runner.weight_format == "gguf (dummy)" and model.fused_decode
        assert isinstance(model.lm_head.method, gguf.GgufHeadMethod)
        assert all(len(o.outputs[0].token_ids) == 6 for o in llm.generate(prompts, params, use_tqdm=False))
    finally:
        llm.shutdown()
    llm = LLM(device="cpu", batch_invariant=True, **options)
    try:
        assert not llm.engine.runner.model.fused_decode
        alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert alone == together


@pytest.fixture
def tiny_gguf_llm(tiny_model_dir):
    """The tiny model's engine on GGUF blocks (dummy weights) on the CPU, shut down after the test."""
    llm = LLM(
        device="cpu", model=tiny_model_dir, load_format="dummy", quantization="gguf", kv_cache_max_tokens=256
    )
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("blocks", [[0, 1, 2], [2, 0, 1]], ids=["in_order", "scattered"])
def test_the_decode_step_matches_the_fused_layers(tiny_gguf_llm, blocks):
    """One-token steps run `GgufDecodeStep`: its hidden state and the keys and values it caches are the
    fused decoder layers' up to bf16 rounding, whether the sequence's blocks lie in order in the cache
    (read as a slice) or not (gathered)."""
    model, block = tiny_gguf_llm.engine.runner.model, tiny_gguf_llm.engine.runner.block_size
    step = model.decode_step
    assert isinstance(step, GgufDecodeStep)
    n = 2 * block + 3  # the prompt; the step's token is the next
    slots = [blocks[p // block] * block + p % block for p in range(n + 1)]
    table = torch.tensor([blocks], dtype=torch.int32)
    ids = torch.randint(0, 128, (n + 1,), generator=torch.Generator().manual_seed(0))
    caches = [c.flatten(0, 1) for a in model.attention_layers for c in (a.k_cache, a.v_cache)]

    def decode() -> tuple[torch.Tensor, list[torch.Tensor]]:
        meta = AttentionMetadata([1], [n + 1], torch.tensor(slots[n:]), table, block)
        hidden = model(ids[n:], torch.tensor([n]), meta)
        return hidden, [cache[slots[n]].clone() for cache in caches]

    with torch.inference_mode():
        model(ids[:n], torch.arange(n), AttentionMetadata([n], [n], torch.tensor(slots[:n]), table, block))
        ours, our_rows = decode()
        model.decode_step = None
        fused, fused_rows = decode()
    torch.testing.assert_close(ours, fused, rtol=0.05, atol=0.05)
    for row, expected in zip(our_rows, fused_rows):
        torch.testing.assert_close(row, expected, rtol=0.05, atol=0.05)


def test_steps_of_several_tokens_run_the_fused_layers_with_the_same_sums(tiny_gguf_llm):
    """Without `GgufDecodeStep`, prompt chunks and batched decodes run the decoder layers' fused path
    (norms, residual adds and SiLU beside the products): the same hidden states as the unfused layers,
    bit for bit."""
    model, block = tiny_gguf_llm.engine.runner.model, tiny_gguf_llm.engine.runner.block_size
    model.decode_step = None
    n = block + 5
    assert model.fused_decode and n in model.fused_rows and 2 in model.fused_rows
    ids = torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(0))
    table = torch.tensor([[0, 1]], dtype=torch.int32)

    def prompt() -> torch.Tensor:
        meta = AttentionMetadata([n], [n], torch.arange(n), table, block)
        return model(ids, torch.arange(n), meta)

    with torch.inference_mode():
        fused = prompt()
        model.fused_rows = range(0)
        unfused = prompt()
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("rows", [3, 12], ids=["int4_products", "packed_bf16_products"])
def test_steps_of_several_tokens_through_the_decode_step_match_the_fused_layers(tiny_gguf_llm, rows):
    """`GgufDecodeStep` runs steps of several tokens too: a step holding a decode row, a prompt chunk
    over a cached prefix and a fresh prompt gives the fused decoder layers' hidden states and cached
    keys and values up to bf16 rounding (the int4 kernel's products up to `SMALL_BATCH_MAX_ROWS` rows,
    past them the bf16 weights, packed for oneDNN by a step of several sequences past them)."""
    model, block = tiny_gguf_llm.engine.runner.model, tiny_gguf_llm.engine.runner.block_size
    step = model.decode_step
    assert isinstance(step, GgufDecodeStep)
    gen = torch.Generator().manual_seed(0)
    # Sequence 0: 9 tokens cached, one decode row; 1: a prefix of `block + 2` cached (its blocks out
    # of order), a chunk of 2; 2 (12 rows): a fresh prompt of the rest.
    tables = torch.tensor([[0, -1], [2, 1], [5, 4]], dtype=torch.int32)
    cached, chunk = [9, block + 2], [1, 2]
    fresh = rows - sum(chunk) if rows > 3 else 0
    query_lens = chunk + ([fresh] if fresh else [])
    context_lens = [cached[0] + 1, cached[1] + 2] + ([fresh] if fresh else [])

    def slot(seq: int, pos: int) -> int:
        return int(tables[seq, pos // block]) * block + pos % block

    ids = {s: torch.randint(0, 128, (n,), generator=gen) for s, n in enumerate(context_lens)}
    step_slots = [slot(s, p) for s, n in enumerate(context_lens) for p in range(n - query_lens[s], n)]
    step_ids = torch.cat([ids[s][n - query_lens[s] :] for s, n in enumerate(context_lens)])
    positions = torch.cat([torch.arange(n - query_lens[s], n) for s, n in enumerate(context_lens)])
    caches = [c.flatten(0, 1) for a in model.attention_layers for c in (a.k_cache, a.v_cache)]

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        meta = AttentionMetadata(query_lens, context_lens, torch.tensor(step_slots), tables, block)
        hidden = model(step_ids, positions, meta)
        return hidden, [cache[step_slots].clone() for cache in caches]

    def packed() -> bool:
        return all(p.packed is not None for p in (step.layers[0].qkv, step.layers[0].down))

    with torch.inference_mode():
        for s in range(2):  # the prefixes, each a step of its own: 0's through `step`, 1's fused
            model.decode_step = step if s == 0 else None
            pos = torch.arange(cached[s])
            slots = torch.tensor([slot(s, p) for p in range(cached[s])])
            meta = AttentionMetadata([cached[s]], [cached[s]], slots, tables[s:], block)
            model(ids[s][: cached[s]], pos, meta)
        lone_prompt_packed = packed()
        model.decode_step = None
        fused, fused_rows = run()
        model.decode_step = step
        ours, our_rows = run()
        step_packed = packed()
    assert ours.shape == (rows, model.config.hidden_size)
    assert not lone_prompt_packed, "a first prompt of one sequence does not wait for the packing"
    assert step_packed == (rows > gguf.SMALL_BATCH_MAX_ROWS)
    torch.testing.assert_close(ours, fused, rtol=0.05, atol=0.05)
    for row, expected in zip(our_rows, fused_rows):
        torch.testing.assert_close(row, expected, rtol=0.05, atol=0.05)


def test_the_bundled_model_runs_its_blocks_within_the_fp32_perplexity(llm, default_llm):
    """The default engine on the CPU runs the bundled GGUF's Q4_1 blocks; its perplexity on a text is
    within 1% of the fp32 weights' (`llm`), and its greedy tokens start as theirs do."""
    from tensorjet.eval.perplexity import perplexity

    assert default_llm.engine.runner.weight_format == "gguf (gguf)"
    text = " ".join(PLAIN) * 16
    fp32 = perplexity(llm, text, context_len=256).perplexity
    ours = perplexity(default_llm, text, context_len=256).perplexity
    params = SamplingParams(temperature=0, max_tokens=4)
    expected = [o.outputs[0].token_ids for o in llm.generate(PLAIN, params, use_tqdm=False)]
    tokens = [o.outputs[0].token_ids for o in default_llm.generate(PLAIN, params, use_tqdm=False)]
    assert abs(ours / fp32 - 1) < 0.01, f"perplexity {ours:.4f} vs fp32 {fp32:.4f}"
    assert sum(a[0] == b[0] for a, b in zip(tokens, expected)) >= len(PLAIN) - 1, (tokens, expected)
