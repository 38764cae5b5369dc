"""The reference attention backend (`TorchAttentionBackend`) against float64 attention over the paged
cache (`tensorjet.kernels.reference.paged_attention_ref`).

Decode rows attend in one padded batch (keys gathered per key head, values summed from the cache),
sequences with a cached prefix in another; both are checked here over ragged contexts, every GQA
grouping, contexts that end on and just past a block boundary, caches in another dtype, and caches
whose unused slots hold NaN (a padded read of an unwritten slot would show).
"""

import pytest
import torch
from numerics import cdiv, rel_err

from tensorjet.kernels.reference import paged_attention_ref
from tensorjet.layers.attention import AttentionMetadata, TorchAttentionBackend

BLOCK = 8
D = 32
SCALE = D**-0.5
# fp32 rounding in a sum of ~100 terms, against float64
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}


def paged_cache(contexts: list[int], num_kv_heads: int, cache_dtype: torch.dtype):
    """Caches holding each context at randomly scattered blocks, NaN in every other slot, and the
    padded block tables."""
    need = [cdiv(c, BLOCK) for c in contexts]
    num_blocks = sum(need) + 3
    k_cache = torch.full((num_blocks, BLOCK, num_kv_heads, D), float("nan"), dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_blocks).tolist()
    tables = []
    for c, n in zip(contexts, need):
        table, perm = perm[:n], perm[n:]
        tables.append(table)
        pos = torch.arange(c)
        slots = torch.tensor(table)[pos // BLOCK] * BLOCK + pos % BLOCK
        k_cache.view(-1, num_kv_heads, D)[slots] = torch.randn(c, num_kv_heads, D).to(cache_dtype)
        v_cache.view(-1, num_kv_heads, D)[slots] = torch.randn(c, num_kv_heads, D).to(cache_dtype)
    width = max(need)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k_cache, v_cache, block_tables


def metadata(query_lens: list[int], contexts: list[int], block_tables: torch.Tensor) -> AttentionMetadata:
    slots = []
    for i, (n, c) in enumerate(zip(query_lens, contexts)):
        pos = torch.arange(c - n, c)
        slots.append(block_tables[i].long()[pos // BLOCK] * BLOCK + pos % BLOCK)
    return AttentionMetadata(
        query_lens=query_lens,
        context_lens=contexts,
        slot_mapping=torch.cat(slots),
        block_tables=block_tables,
        block_size=BLOCK,
    )


def attend(query_lens, contexts, num_kv_heads, group, dtype=torch.float32, cache_dtype=None):
    """The backend's output and the float64 reference for one step."""
    k_cache, v_cache, tables = paged_cache(contexts, num_kv_heads, cache_dtype or dtype)
    meta = metadata(query_lens, contexts, tables)
    q = torch.randn(sum(query_lens), num_kv_heads * group, D).to(dtype)
    backend = TorchAttentionBackend()
    state = backend.prepare(meta)
    k_new = k_cache.view(-1, num_kv_heads, D)[meta.slot_mapping].to(dtype)
    v_new = v_cache.view(-1, num_kv_heads, D)[meta.slot_mapping].to(dtype)
    out = backend.forward(q, k_cache, v_cache, state, SCALE, k_new=k_new, v_new=v_new)
    starts = torch.tensor([0] + query_lens[:-1]).cumsum(0)
    ref = paged_attention_ref(
        q, k_cache.double(), v_cache.double(), tables, starts, query_lens, contexts, SCALE
    )
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_kv_heads, group", [(1, 1), (2, 1), (2, 3), (3, 4), (1, 8)])
def test_decode_batch_matches_float64(dtype, num_kv_heads, group, seed):
    # Ragged contexts: one token, a block exactly, a block and one, several blocks, the longest.
    contexts = [1, BLOCK, BLOCK + 1, 3 * BLOCK - 1, 5 * BLOCK, 37]
    out, ref = attend([1] * len(contexts), contexts, num_kv_heads, group, dtype)
    assert out.dtype == dtype and not out.isnan().any(), f"NaN: an unwritten slot was read, seed={seed}"
    for i, c in enumerate(contexts):
        err = rel_err(out[i], ref[i])
        assert err < TOL[dtype], f"context {c}: error {err}, seed={seed}"


def test_one_decode_sequence(seed):
    """One sequence needs no mask: every key it reads is its own."""
    out, ref = attend([1], [2 * BLOCK + 3], num_kv_heads=2, group=2)
    assert rel_err(out, ref) < TOL[torch.float32], f"seed={seed}"


@pytest.mark.parametrize("num_kv_heads, group", [(2, 1), (2, 3)])
def test_cached_prefix_rows_batched_with_decodes_and_fresh_prompts(num_kv_heads, group, seed):
    """Sequences with several rows over a cached prefix (different row counts, prefixes ending inside
    and on a block boundary) attend in one padded call, beside decodes and fresh prompts."""
    query_lens = [1, 5, 1, 3, 9, 2, 6, 1]
    contexts = [20, 5 + BLOCK, 7, 3, 9 + 2 * BLOCK + 3, 2 + BLOCK, 6, 33]
    out, ref = attend(query_lens, contexts, num_kv_heads, group)
    assert not out.isnan().any(), f"NaN: an unwritten slot read or a row left unwritten, seed={seed}"
    row = 0
    for n, c in zip(query_lens, contexts):
        err = rel_err(out[row : row + n], ref[row : row + n])
        assert err < TOL[torch.float32], f"(rows, context) ({n}, {c}): error {err}, seed={seed}"
        row += n


def test_decodes_after_prompt_rows(seed):
    """Decode rows that do not start the step land in their own rows."""
    query_lens = [4, 1, 1, 3, 1]
    contexts = [4, 12, 1, 10, 17]
    out, ref = attend(query_lens, contexts, num_kv_heads=2, group=2)
    assert rel_err(out, ref) < TOL[torch.float32], f"seed={seed}"


@pytest.mark.parametrize(
    "query_lens, contexts",
    [([1, 4, 4, 4, 2], [9, 4, 4, 4, 2]), ([3, 1, 3, 3, 5, 3], [3, 10, 3, 3, 5, 3])],
    ids=["one_after_another", "apart"],
)
def test_fresh_prompts_of_one_length_attend_together(query_lens, contexts, seed):
    """Fresh prompts of one length attend in one call, read as a slice of the step's rows where they
    lie one after another and gathered where other rows lie between them."""
    out, ref = attend(query_lens, contexts, num_kv_heads=2, group=2)
    assert not out.isnan().any(), f"a row left unwritten, seed={seed}"
    assert rel_err(out, ref) < TOL[torch.float32], f"seed={seed}"


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_cache_in_another_dtype(cache_dtype, seed):
    """fp32 queries over a bf16 or FP8 cache: the cached values as they are stored, converted."""
    query_lens = [1, 1, 1, 4, 2]
    contexts = [3, BLOCK + 1, 30, 4, 12]
    out, ref = attend(query_lens, contexts, num_kv_heads=2, group=2, cache_dtype=cache_dtype)
    assert out.dtype == torch.float32 and not out.isnan().any(), f"seed={seed}"
    assert rel_err(out, ref) < TOL[torch.float32], f"seed={seed}"


def test_bf16_queries(seed):
    query_lens = [1, 1, 3, 1]
    contexts = [9, 25, 11, 2]
    out, ref = attend(query_lens, contexts, num_kv_heads=2, group=3, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < TOL[torch.bfloat16], f"seed={seed}"


def test_state_is_built_once_per_step():
    """Every layer of a step reads the same indices: the decode rows' cache rows are made once."""
    contexts = [5, 12, 30]
    k_cache, v_cache, tables = paged_cache(contexts, 2, torch.float32)
    meta = metadata([1, 1, 1], contexts, tables)
    backend = TorchAttentionBackend()
    state = backend.prepare(meta)
    q = torch.randn(3, 4, D)
    first = backend.forward(q, k_cache, v_cache, state, SCALE)
    rows = state.decode.cache_rows(2, 2)
    second = backend.forward(q, k_cache, v_cache, state, SCALE)
    assert state.decode.cache_rows(2, 2) is rows
    assert torch.equal(first, second)
