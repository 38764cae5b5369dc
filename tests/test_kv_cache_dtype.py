"""kv_cache_dtype="fp8": an E4M3 KV cache (a quarter of fp32's bytes, half of bf16's), read back as the
model dtype. Kernel-level checks are in test_kernels.py; these run the whole engine on the CPU."""

import pytest
from greedy import TOP_LOGPROBS, GreedyRun, assert_all_agree
from prompts import CHAT, PLAIN

from tensorjet import LLM, SamplingParams


@pytest.mark.slow  # two engines, each allocating the whole CPU KV budget
def test_fp8_cache_holds_four_times_the_fp32_tokens_in_the_same_bytes(tiny_model_dir):
    totals = {}
    for kv in ("auto", "fp8"):
        llm = LLM(model=tiny_model_dir, device="cpu", kv_cache_dtype=kv)
        totals[kv] = llm.stats()["kv_blocks_total"]
        assert llm.stats()["kv_cache_dtype"] == ("float32" if kv == "auto" else "float8_e4m3fn")
        llm.shutdown()
    assert totals["fp8"] == 4 * totals["auto"]


@pytest.mark.slow  # the engine end to end, converting every K/V to FP8 and back
def test_fp8_prefix_cache_hits_give_the_tokens_of_a_fresh_prompt(tiny_model_dir):
    """A fresh prompt attends to its keys as the cache stores them, so reading them back later (a
    prefix-cache hit) changes nothing."""
    prompts = [[(5 * i + j) % 128 for j in range(n)] for i, n in enumerate((40, 37, 70))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=TOP_LOGPROBS)
    llm = LLM(model=tiny_model_dir, device="cpu", kv_cache_dtype="fp8")
    first = [GreedyRun.of(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]
    again = [GreedyRun.of(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.stats()["prefix_cache_hits_tokens"] >= 3 * 32
    assert_all_agree(again, first, what="prefix-cache hits vs fresh")
    llm.shutdown()


def test_fp8_greedy_tokens_stay_close_to_full_precision(llm):
    """SmolLM2 with an FP8 cache starts the same greedy answer as with the fp32 cache on most prompts
    (E4M3 keeps 3 mantissa bits, so long continuations may drift; broken quantization would not
    agree at all)."""
    ids = [llm.tokenizer.encode(p) for p in PLAIN]
    ids += [llm.apply_chat_template([{"role": "user", "content": c}]) for c in CHAT]
    params = SamplingParams(temperature=0, max_tokens=4)
    full = [o.outputs[0].token_ids for o in llm.generate(ids, params, use_tqdm=False)]
    fp8_llm = LLM(device="cpu", dtype="float32", kv_cache_dtype="fp8")
    fp8 = [o.outputs[0].token_ids for o in fp8_llm.generate(ids, params, use_tqdm=False)]
    fp8_llm.shutdown()
    agree = sum(a == b for a, b in zip(full, fp8))
    assert agree >= 8, f"only {agree}/12 prompts start alike: {full} vs {fp8}"


@pytest.mark.parametrize("value", ["int8", "fp16", "e5m2"])
def test_unknown_kv_cache_dtype_names_the_field(value):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(device="cpu", kv_cache_dtype=value)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_kv_scales_store_scaled_values_and_attend_over_their_dequantized_form(backend):
    """With k_scale/v_scale, the cache holds E4M3(k / k_scale) and E4M3(v / v_scale), and attention (a
    prompt, then a decode over the cached prompt) equals attention over the cache times the scales."""
    import torch
    import torch.nn.functional as F
    import transformers

    from tensorjet.layers.attention import Attention, AttentionMetadata
    from tensorjet.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    heads, kv_heads, dim, n, block = 4, 2, 16, 6, 8
    config = transformers.LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads)
    attn = Attention(heads, kv_heads, dim, RotaryEmbedding(config, dim, 64))
    if backend == "triton":
        from tensorjet.layers.triton_attention import TritonAttentionBackend

        attn.backend = TritonAttentionBackend()
    attn.k_cache = torch.zeros(2, block, kv_heads, dim, dtype=torch.float8_e4m3fn)
    attn.v_cache = torch.zeros_like(attn.k_cache)
    k_scale, v_scale = 0.05, 0.02  # values of a few units are stored around +-60 and +-150
    attn.use_kv_scales(k_scale, v_scale)
    q, k, v = (3 * torch.randn(n + 1, h, dim) for h in (heads, kv_heads, kv_heads))
    positions = torch.arange(n + 1)
    table = torch.tensor([[0, 1]], dtype=torch.int32)

    def step(rows: slice, context: int) -> torch.Tensor:
        count = rows.stop - rows.start
        meta = AttentionMetadata([count], [context], positions[rows].clone(), table, block)
        # clones: a backend may rotate its q and k in place
        return attn(positions[rows], q[rows].clone(), k[rows].clone(), v[rows].clone(), meta)

    outs = torch.cat([step(slice(0, n), n), step(slice(n, n + 1), n + 1)])
    q_rot, k_rot = attn.rotary(positions, q.clone(), k.clone())
    stored_k = attn.k_cache.view(-1, kv_heads, dim)[: n + 1].float()
    stored_v = attn.v_cache.view(-1, kv_heads, dim)[: n + 1].float()
    torch.testing.assert_close(stored_k, (k_rot / k_scale).to(torch.float8_e4m3fn).float(), rtol=0, atol=0)
    torch.testing.assert_close(stored_v, (v / v_scale).to(torch.float8_e4m3fn).float(), rtol=0, atol=0)
    expected = F.scaled_dot_product_attention(
        q_rot.transpose(0, 1)[None],
        (stored_k * k_scale).transpose(0, 1)[None],
        (stored_v * v_scale).transpose(0, 1)[None],
        is_causal=True,
        enable_gqa=True,
    )[0].transpose(0, 1)
    torch.testing.assert_close(outs, expected, rtol=1e-4, atol=1e-4)
