"""Triton kernels vs float64 references.

On a machine without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here
before triton is imported) at small sizes; on a GPU the same tests run compiled, and
TJ_KERNEL_TEST_SCALE=N multiplies context lengths and batch sizes. Inputs are fresh random data each
run (TJ_KERNEL_TEST_SEED=S replays one; the seed is in every failure message), outputs are filled with
NaN before each kernel runs, and unused KV-cache slots hold NaN, so a row left unwritten or a key read
from a wrong slot shows up as an error.
"""

import ast
import importlib
import inspect
import itertools
import os
import pkgutil
import textwrap

import pytest
import torch
from numerics import cdiv, rel_err

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import tensorjet.kernels.decode_attention as decode_mod  # noqa: E402
from tensorjet.kernels.activation import silu_and_mul  # noqa: E402
from tensorjet.kernels.decode_attention import choose_num_splits, decode_attention  # noqa: E402
from tensorjet.kernels.extend_attention import extend_attention  # noqa: E402
from tensorjet.kernels.norm import rms_norm  # noqa: E402
from tensorjet.kernels.reference import (  # noqa: E402
    decode_attention_ref,
    extend_attention_ref,
    paged_attention_ref,
    rms_norm_ref,
    silu_and_mul_ref,
    store_kv_ref,
)
from tensorjet.kernels.store_kv import store_kv  # noqa: E402
from tensorjet.layers.activation import silu_and_mul as torch_silu_and_mul  # noqa: E402
from tensorjet.layers.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402
from tensorjet.layers.norm import RMSNorm  # noqa: E402
from tensorjet.layers.triton_attention import TritonAttentionBackend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALE = max(1, int(os.environ.get("TJ_KERNEL_TEST_SCALE", "1")))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NAN = float("nan")
FP8 = torch.float8_e4m3fn


def cross(*axes: list) -> list:
    """Every combination of one value per axis, as pytest params (a tuple value fills several
    arguments). Case i of the first max(len(axis)) takes value i % len(axis) of every axis, so these
    cases run each value of each axis at least once: they are the fast tier. The rest are `slow`."""
    fast = {tuple(i % len(axis) for axis in axes) for i in range(max(map(len, axes)))}
    params = []
    for index in itertools.product(*(range(len(axis)) for axis in axes)):
        chosen = [axis[i] for axis, i in zip(axes, index)]
        values = [v for c in chosen for v in (c if isinstance(c, tuple) else (c,))]
        name = "-".join(str(v).removeprefix("torch.") for v in values)
        params.append(pytest.param(*values, id=name, marks=() if index in fast else pytest.mark.slow))
    return params


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, NAN)


def make_paged_kv(context_lens, block_size, num_kv_heads, head_dim, dtype, extra_blocks=3):
    """Caches full of NaN except each sequence's first context_len slots, which hold random values;
    physical blocks are a random permutation (so tables are non-contiguous), tables are -1 padded."""
    need = [cdiv(c, block_size) for c in context_lens]
    num_blocks = sum(need) + extra_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, NAN, dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, NAN, dtype=dtype, device=DEVICE)
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.full((len(context_lens), max(need, default=0) + 2), -1, dtype=torch.int32)
    used = 0
    for i, (c, n) in enumerate(zip(context_lens, need)):
        tables[i, :n] = torch.tensor(perm[used : used + n], dtype=torch.int32)
        used += n
        pos = torch.arange(c)
        blocks, offs = tables[i, pos // block_size].long(), pos % block_size
        k_cache[blocks, offs] = torch.randn(c, num_kv_heads, head_dim, device=DEVICE).to(dtype)
        v_cache[blocks, offs] = torch.randn(c, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    return k_cache, v_cache, tables.to(DEVICE)


def assert_close(out, ref, dtype, seed, what):
    assert not out.isnan().any(), f"{what}: NaN in output (unwritten row or wrong slot read), seed={seed}"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]}, seed={seed}"


# ---- store_kv -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,block_size,num_kv_heads,head_dim", cross(DTYPES, [(16, 2, 64), (8, 3, 128), (32, 1, 80)])
)
def test_store_kv(dtype, block_size, num_kv_heads, head_dim, seed):
    num_blocks, num_tokens = 6, 11 * SCALE
    num_tokens = min(num_tokens, num_blocks * block_size - 4)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEVICE).to(dtype)
    k_cache[0, 0] = NAN  # existing NaN must survive (skipped rows never touch the cache)
    v_cache = torch.randn(shape, device=DEVICE).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[torch.randperm(num_tokens)[:3]] = -1  # padded rows
    slots[-1] = -1
    # k, v as strided views of a fused projection output, as the model produces them.
    qkv = torch.randn(num_tokens, 4 * num_kv_heads, head_dim, device=DEVICE).to(dtype)
    k, v = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 3 * num_kv_heads :]
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    # Bitwise: written slots hold k/v exactly, every other slot (NaN included) is unchanged.
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8)), f"seed={seed}"
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8)), f"seed={seed}"


def test_store_kv_all_padded():
    k_cache = torch.randn(2, 16, 2, 64, device=DEVICE)
    before = k_cache.clone()
    k = torch.randn(4, 2, 64, device=DEVICE)
    store_kv(k, k, k_cache, k_cache, torch.full((4,), -1, dtype=torch.long, device=DEVICE))
    assert torch.equal(k_cache, before)


# ---- decode -----------------------------------------------------------------------------------------

# (block_size, num_kv_heads, group, head_dim)
DECODE_CONFIGS = [(16, 2, 1, 64), (16, 2, 4, 128), (8, 2, 3, 64), (32, 1, 8, 128)]


@pytest.mark.parametrize(
    "dtype,block_size,num_kv_heads,group,head_dim,cache",
    cross(DTYPES, DECODE_CONFIGS, ["model dtype", "fp8"]),
)
def test_decode_attention(dtype, block_size, num_kv_heads, group, head_dim, cache, seed):
    """Against float64 attention over the stored values. An FP8 cache takes its own stage 1, which reads
    int16 words (head dimensions 2w and 2w + 1 per word): unused slots hold NaN, so a word read from
    the wrong slot or half shows up."""
    bs = block_size
    lens = [1, bs - 1, bs, 3 * bs + 5, 300 * SCALE] + [int(x) for x in torch.randint(1, 200, (SCALE - 1,))]
    lens = [max(1, n) for n in lens]
    cache_dtype = FP8 if cache == "fp8" else dtype
    k_cache, v_cache, tables = make_paged_kv(lens, bs, num_kv_heads, head_dim, cache_dtype)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    ref = decode_attention_ref(q, k_cache, v_cache, tables, context_lens, scale)
    for num_splits in (1, 5):
        out = nan_like(q)
        res = decode_attention(q, k_cache, v_cache, tables, context_lens, scale, out, num_splits=num_splits)
        assert res is out
        assert_close(out, ref, dtype, seed, f"{cache} cache, num_splits={num_splits}")


def test_decode_attention_heuristic_splits(seed, monkeypatch):
    """num_splits=None (heuristic), with a minimum split length small enough to really split here."""
    monkeypatch.setattr(decode_mod, "MIN_TOKENS_PER_SPLIT", 64)
    dtype, bs, num_kv_heads, group, head_dim = torch.float32, 16, 2, 4, 64
    lens = [200 * SCALE, 7, 130]
    k_cache, v_cache, tables = make_paged_kv(lens, bs, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    assert choose_num_splits(len(lens), num_kv_heads, max(lens), DEVICE) > 1
    out = decode_attention(q, k_cache, v_cache, tables, context_lens, head_dim**-0.5)
    ref = decode_attention_ref(q, k_cache, v_cache, tables, context_lens, head_dim**-0.5)
    assert_close(out, ref, dtype, seed, "heuristic splits")


@pytest.mark.parametrize(
    "dtype,block_size,num_kv_heads,group,head_dim,cache",
    cross(DTYPES, DECODE_CONFIGS, ["model dtype", "fp8"]),
)
def test_decode_attention_several_query_rows(dtype, block_size, num_kv_heads, group, head_dim, cache, seed):
    """Sequences with a few query rows each (drafts to verify: 1 to 6 rows, one with none), against the
    causal float64 reference over the same rows: each row sees the keys up to its own position. The rows
    sit apart from each other with a gap row between sequences, which must stay NaN."""
    bs = block_size
    pairs = [(6, 6), (1, bs - 1), (4, bs), (3, 3 * bs + 5), (5, 300 * SCALE), (0, 9)]  # (rows, context)
    pairs += [
        (int(n), int(n) + int(c))
        for n, c in zip(torch.randint(1, 7, (SCALE,)), torch.randint(0, 99, (SCALE,)))
    ]
    qlens = [n for n, _ in pairs]
    clens = [c for _, c in pairs]
    cache_dtype = FP8 if cache == "fp8" else dtype
    k_cache, v_cache, tables = make_paged_kv(clens, bs, num_kv_heads, head_dim, cache_dtype)
    first_rows = [sum(qlens[:i]) + i for i in range(len(qlens))]  # a gap row after each sequence
    num_rows = first_rows[-1] + qlens[-1] + 1
    q = torch.randn(num_rows, num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int32, device=DEVICE)  # noqa: E731
    rows, query_lens, context_lens = as_tensor(first_rows), as_tensor(qlens), as_tensor(clens)
    scale = head_dim**-0.5
    ref = extend_attention_ref(q, k_cache, v_cache, tables, first_rows, qlens, clens, scale)
    owned = torch.tensor([any(r <= t < r + n for r, n in zip(first_rows, qlens)) for t in range(num_rows)])
    for num_splits in (1, 5):
        out = nan_like(q)
        decode_attention(
            q, k_cache, v_cache, tables, context_lens, scale, out, num_splits=num_splits, rows=rows,
            query_lens=query_lens, max_query_len=max(qlens),
        )  # fmt: skip
        what = f"{cache} cache, num_splits={num_splits}"
        assert out[~owned.to(out.device)].isnan().all(), f"{what}: a row no sequence owns was written"
        assert_close(out[owned], ref[owned], dtype, seed, what)


def test_choose_num_splits():
    cpu = torch.device("cpu")  # 132 SMs assumed
    assert choose_num_splits(256, 8, 4096, cpu) == 1  # big batch fills the GPU alone
    assert choose_num_splits(4, 8, 100, cpu) == 1  # short contexts: not worth a reduction
    one_long = choose_num_splits(1, 8, 32768, cpu)
    assert 1 < one_long <= decode_mod.MAX_SPLITS
    assert choose_num_splits(1, 8, 1024, cpu) == 1024 // decode_mod.MIN_TOKENS_PER_SPLIT
    assert choose_num_splits(8, 8, 32768, cpu) <= one_long


# ---- extend -----------------------------------------------------------------------------------------

# (block_size, num_kv_heads, group, head_dim)
EXTEND_CONFIGS = [(16, 2, 1, 64), (16, 1, 4, 128), (8, 1, 3, 64), (32, 1, 8, 64)]


@pytest.mark.parametrize("dtype,block_size,num_kv_heads,group,head_dim", cross(DTYPES, EXTEND_CONFIGS))
def test_extend_attention(dtype, block_size, num_kv_heads, group, head_dim, seed):
    # (query_len, context_len): cached prefix, fresh prompt, single token with/without prefix, a
    # query spanning several tiles behind a prefix that ends mid-block.
    pairs = [(20, 75), (37, 37), (1, 21), (1, 1), (45 * SCALE, 45 * SCALE + 3 * block_size + 5)]
    pairs += [(int(n), int(n) + int(p)) for n, p in torch.randint(1, 40, (SCALE - 1, 2))]
    qlens = [n for n, _ in pairs]
    clens = [c for _, c in pairs]
    k_cache, v_cache, tables = make_paged_kv(clens, block_size, num_kv_heads, head_dim, dtype)
    num_tokens = sum(qlens)
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    query_lens = torch.tensor(qlens, dtype=torch.int32, device=DEVICE)
    context_lens = torch.tensor(clens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = nan_like(q)
    res = extend_attention(q, k_cache, v_cache, tables, qsl, query_lens, context_lens, scale, out)
    assert res is out
    ref = extend_attention_ref(q, k_cache, v_cache, tables, qsl, qlens, clens, scale)
    assert_close(out, ref, dtype, seed, "extend")


# ---- backend ----------------------------------------------------------------------------------------

BATCHES = {
    # (query_len, context_len) per sequence
    "mixed": [(1, 40), (17, 17), (1, 1), (9, 50), (1, 16), (30, 30)],
    "decode": [(1, 33), (1, 1), (1, 16), (1, 70)],
    "prefill": [(12, 12), (5, 29)],
}


@pytest.mark.parametrize("dtype,kind", cross(DTYPES, list(BATCHES)))
def test_backend_matches_torch(dtype, kind, seed):
    """store_kv + forward through TritonAttentionBackend == TorchAttentionBackend, on batches built as
    the runner builds them, with q a strided view and one CUDA-graph padding row (slot -1)."""
    pairs = [(n * (SCALE if n > 1 else 1), c + (n * (SCALE if n > 1 else 1) - n)) for n, c in BATCHES[kind]]
    block_size, num_kv_heads, group, head_dim = 16, 2, 4, 64
    qlens = [n for n, _ in pairs]
    clens = [c for _, c in pairs]
    k_cache, v_cache, tables = make_paged_kv(clens, block_size, num_kv_heads, head_dim, dtype)
    # The step's new tokens are written by the Triton store_kv, as Attention.forward does through its
    # backend: clear their slots first, then store k/v for every row plus a padded row.
    slots = []
    for i, (n, c) in enumerate(pairs):
        for p in range(c - n, c):
            slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
    slots.append(-1)
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=DEVICE)
    num_tokens = len(slots)
    hk = num_kv_heads
    kv_new = torch.randn(num_tokens, 2 * hk, head_dim, device=DEVICE).to(dtype)
    k_cache.view(-1, hk, head_dim)[slot_mapping[:-1]] = NAN
    v_cache.view(-1, hk, head_dim)[slot_mapping[:-1]] = NAN
    backend = TritonAttentionBackend()
    store_kv(kv_new[:, :hk], kv_new[:, hk:], k_cache, v_cache, slot_mapping)

    # q: a strided view of a fused projection; the padded row is not part of any sequence.
    qkv = torch.randn(num_tokens, num_kv_heads * group + 2 * hk, head_dim, device=DEVICE).to(dtype)
    q = qkv[:, : num_kv_heads * group]
    meta = AttentionMetadata(
        query_lens=qlens,
        context_lens=clens,
        slot_mapping=slot_mapping,
        block_tables=tables,
        block_size=block_size,
    )
    scale = head_dim**-0.5
    state = backend.prepare(meta)
    out = backend.forward(q, k_cache, v_cache, state, scale, k_new=kv_new[:, :hk], v_new=kv_new[:, hk:])[:-1]
    out_again = backend.forward(q, k_cache, v_cache, state, scale)[:-1]  # the same state, as a 2nd layer
    assert torch.equal(out, out_again)

    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, starts, qlens, clens, scale)[:-1]
    assert_close(out, ref, dtype, seed, f"{kind} vs float64")

    # TorchAttentionBackend multiplies masked-out values by 0, so it needs finite unused slots.
    k_clean, v_clean = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    k_new, v_new = kv_new[:, :hk], kv_new[:, hk:]
    reference = TorchAttentionBackend()
    state = reference.prepare(meta)
    torch_out = reference.forward(q, k_clean, v_clean, state, scale, k_new=k_new, v_new=v_new)[:-1]
    torch_out64 = reference.forward(
        q.double(), k_clean.double(), v_clean.double(), state, scale, k_new.double(), v_new.double()
    )[:-1]
    assert_close(out, torch_out64, dtype, seed, f"{kind} vs TorchAttentionBackend(float64)")
    assert rel_err(out, torch_out) < 2 * TOL[dtype], f"{kind} vs TorchAttentionBackend, seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_fp8_saturates_and_rounds_like_torch(dtype, seed):
    """An FP8 cache holds exactly `to_cache_dtype(k)`: saturated at +-448, rounded to nearest even."""
    num_blocks, block_size, hk, d = 4, 16, 2, 64
    k_cache = torch.full((num_blocks, block_size, hk, d), NAN, dtype=FP8, device=DEVICE)
    v_cache = k_cache.clone()
    n = 20
    k = (torch.randn(n, hk, d, device=DEVICE) * torch.tensor([1.0, 300.0], device=DEVICE)[:, None]).to(dtype)
    v = torch.randn(n, hk, d, device=DEVICE).to(dtype) * 1e-3  # E4M3 subnormals
    k[0, 0, :4] = torch.tensor([448.0, -449.0, 1e4, -1e6])
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:n]
    slots[3] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8)), f"seed={seed}"
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8)), f"seed={seed}"
    assert k_cache.float().abs().nan_to_num(0).max() == 448.0  # saturated, never NaN


@pytest.mark.parametrize("dtype,kind", cross([torch.float32, torch.bfloat16], list(BATCHES)))
def test_fp8_kv_cache_backends(dtype, kind, seed):
    """With an FP8 cache, the Triton backend's store + attention equals float64 attention over the
    stored FP8 values, and equals TorchAttentionBackend on the same cache."""
    from tensorjet.dtypes import to_cache_dtype

    block_size, hk, group, d = 16, 2, 4, 64
    qlens = [n for n, _ in BATCHES[kind]]
    clens = [c for _, c in BATCHES[kind]]
    k_cache, v_cache, tables = make_paged_kv(clens, block_size, hk, d, FP8)
    slots = []
    for i, (n, c) in enumerate(BATCHES[kind]):
        slots += [int(tables[i, p // block_size]) * block_size + p % block_size for p in range(c - n, c)]
    slot_mapping = torch.tensor(slots + [-1], dtype=torch.long, device=DEVICE)
    num_tokens = len(slot_mapping)
    kv_new = (torch.randn(num_tokens, 2 * hk, d, device=DEVICE) * 4).to(dtype)
    k_new, v_new = kv_new[:, :hk], kv_new[:, hk:]
    backend = TritonAttentionBackend()
    store_kv(k_new, v_new, k_cache, v_cache, slot_mapping)
    q = torch.randn(num_tokens, hk * group, d, device=DEVICE).to(dtype)
    meta = AttentionMetadata(qlens, clens, slot_mapping, tables, block_size)
    scale = d**-0.5
    out = backend.forward(q, k_cache, v_cache, backend.prepare(meta), scale, k_new=k_new, v_new=v_new)[:-1]
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, starts, qlens, clens, scale)[:-1]
    assert_close(out, ref, dtype, seed, f"{kind} FP8 cache vs float64")

    # The reference backend multiplies masked-out values by 0, so it needs finite unused slots; it
    # attends a fresh prompt to its new keys as the cache would hold them.
    k_clean = k_cache.float().nan_to_num(0.0).to(FP8)
    v_clean = v_cache.float().nan_to_num(0.0).to(FP8)
    reference = TorchAttentionBackend()
    state = reference.prepare(meta)
    torch_out = reference.forward(q, k_clean, v_clean, state, scale, k_new, v_new)[:-1]
    assert rel_err(out, torch_out) < 2 * TOL[dtype], f"{kind} vs TorchAttentionBackend, seed={seed}"
    # The reference backend in float64 over the same FP8 values.
    exact = reference.forward(
        q.double(),
        k_clean.double(),
        v_clean.double(),
        state,
        scale,
        to_cache_dtype(k_new, FP8).double(),
        to_cache_dtype(v_new, FP8).double(),
    )[:-1]
    assert_close(out, exact, dtype, seed, f"{kind} FP8 vs the float64 reference backend")


# ---- norm / activation ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,hidden", cross(DTYPES, [64, 576, 4096]))
def test_rms_norm(dtype, hidden, seed):
    rows, eps = 7 * SCALE, 1e-5
    x = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    residual = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    layer = RMSNorm(hidden, eps, dtype=dtype).to(DEVICE)
    layer.weight.data = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    w = layer.weight.data

    out = rms_norm(x, w, eps, out=nan_like(x))
    assert_close(out, rms_norm_ref(x, w, eps), dtype, seed, "rms_norm")
    assert rel_err(out, layer(x)) < TOL[dtype]

    out, res = rms_norm(x, w, eps, residual, out=nan_like(x), residual_out=nan_like(x))
    ref_out, ref_res = rms_norm_ref(x, w, eps, residual)
    assert_close(out, ref_out, dtype, seed, "rms_norm(+residual) out")
    assert_close(res, ref_res, dtype, seed, "rms_norm(+residual) residual")
    layer_out, layer_res = layer(x, residual)
    if DEVICE.type == "cuda" or dtype != torch.bfloat16:
        assert torch.equal(res, layer_res)  # the residual sum is rounded exactly like the layer does
    else:  # the interpreter casts fp32 -> bf16 by truncation, not round-to-nearest-even
        assert rel_err(res, layer_res) < TOL[dtype]
    assert rel_err(out, layer_out) < TOL[dtype]

    # In place, as a fused pre-norm uses it: x <- norm(x + residual), residual <- x + residual.
    xi, ri = x.clone(), residual.clone()
    rms_norm(xi, w, eps, ri, out=xi, residual_out=ri)
    assert torch.equal(xi, out) and torch.equal(ri, res)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype, seed):
    gate_up = (2 * torch.randn(5 * SCALE, 3, 2 * 1500, device=DEVICE)).to(dtype)
    out = silu_and_mul(gate_up, out=torch.full((5 * SCALE, 3, 1500), NAN, dtype=dtype, device=DEVICE))
    assert_close(out, silu_and_mul_ref(gate_up), dtype, seed, "silu_and_mul")
    assert rel_err(out, torch_silu_and_mul(gate_up)) < TOL[dtype]


def rotary_inputs(tokens, num_q, num_k, head_dim, dtype, max_pos=300):
    """cos/sin tables, random positions and q, k, v as [T, H, D] views of one fused qkv projection
    output, like the model's split (so they are strided)."""
    freqs = torch.outer(
        torch.arange(max_pos, device=DEVICE).float(), torch.rand(head_dim // 2, device=DEVICE)
    )
    positions = torch.randint(0, max_pos, (tokens,), device=DEVICE)
    qkv = torch.randn(tokens, (num_q + 2 * num_k) * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([num_q * head_dim, num_k * head_dim, num_k * head_dim], dim=1)
    views = [x.view(tokens, -1, head_dim) for x in (q, k, v)]
    return freqs.cos(), freqs.sin(), positions, qkv, *views


@pytest.mark.parametrize(
    "dtype,num_q,num_k,head_dim",
    cross(DTYPES, [(4, 2, 16), (6, 6, 8), (5, 1, 64)]),  # odd head counts too
)
def test_rotary_in_place_on_qkv_views(dtype, num_q, num_k, head_dim, seed):
    from tensorjet.kernels.reference import rotary_ref
    from tensorjet.kernels.rotary import apply_rotary

    cos, sin, positions, qkv, q, k, v = rotary_inputs(9 * SCALE, num_q, num_k, head_dim, dtype)
    v_before = v.clone()
    q_ref, k_ref = rotary_ref(positions, q, cos, sin), rotary_ref(positions, k, cos, sin)
    apply_rotary(positions, q, k, cos, sin)
    assert_close(q, q_ref, dtype, seed, "rotary q")
    assert_close(k, k_ref, dtype, seed, "rotary k")
    assert torch.equal(v, v_before), "rotary wrote outside q and k"


def guarded_nan_caches(num_blocks, block_size, num_kv_heads, head_dim, dtype):
    """NaN k/v caches inside NaN buffers with one guard block on each side, so a write at slot -1
    (a missed skip lands just before the cache) or past the end shows up in the buffer."""
    shape = (num_blocks + 2, block_size, num_kv_heads, head_dim)
    k_buf = torch.full(shape, NAN, dtype=dtype, device=DEVICE)
    v_buf = torch.full(shape, NAN, dtype=dtype, device=DEVICE)
    return k_buf, v_buf, k_buf[1:-1], v_buf[1:-1]


def written_rows(buf, block_size, slots):
    """Guarded buffer -> [slots, Hk, D] rows at the valid slots, and every other row."""
    rows = buf.view(-1, *buf.shape[2:])
    index = slots[slots >= 0].long() + block_size  # the guard block comes first
    untouched = torch.ones(rows.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[index] = False
    return rows[index], rows[untouched]


@pytest.mark.parametrize(
    "dtype,num_q,num_k,head_dim,slot_dtype",
    cross(DTYPES, [(8, 2, 64), (4, 4, 128)], [torch.int32, torch.int64]),  # GQA and MHA
)
def test_rotary_and_store_kv(dtype, num_q, num_k, head_dim, slot_dtype, seed):
    """Fused rotary + KV write: q, k rotated in place, rotated k and v in the cache at their slots,
    padded (-1) rows and every other slot left untouched."""
    from tensorjet.kernels.reference import rotary_ref
    from tensorjet.kernels.rotary import rotary_and_store_kv

    tokens, block_size = 13 * SCALE, 16
    cos, sin, positions, qkv, q, k, v = rotary_inputs(tokens, num_q, num_k, head_dim, dtype)
    k_buf, v_buf, k_cache, v_cache = guarded_nan_caches(
        cdiv(tokens, block_size) + 2, block_size, num_k, head_dim, dtype
    )
    slots = torch.randperm(k_cache.shape[0] * block_size, device=DEVICE)[:tokens]
    slots[torch.randperm(tokens)[:3]] = -1
    slots[-1] = -1
    slots = slots.to(slot_dtype)
    valid = slots >= 0
    q_ref, k_ref = rotary_ref(positions, q, cos, sin), rotary_ref(positions, k, cos, sin)
    v_before = v.clone()

    rotary_and_store_kv(positions, q, k, v, cos, sin, k_cache, v_cache, slots)

    assert_close(q, q_ref, dtype, seed, "rotary q")
    assert_close(k, k_ref, dtype, seed, "rotary k")
    assert torch.equal(v, v_before), f"v changed, seed={seed}"
    k_rows, k_rest = written_rows(k_buf, block_size, slots)
    v_rows, v_rest = written_rows(v_buf, block_size, slots)
    # The cache holds exactly the rotated k left in place, and v.
    assert torch.equal(k_rows, k[valid]), f"cached k != rotated k, seed={seed}"
    assert torch.equal(v_rows, v[valid]), f"cached v != v, seed={seed}"
    assert k_rest.isnan().all() and v_rest.isnan().all(), f"wrote outside the valid slots, seed={seed}"


def test_rotary_and_store_kv_fp8_cache(seed):
    """bf16 q/k/v, FP8 cache: the cache holds to_cache_dtype(k rotated and rounded to bf16), saturated
    at +-448, byte for byte, and q, k are exactly what apply_rotary gives."""
    from tensorjet.dtypes import to_cache_dtype
    from tensorjet.kernels.rotary import apply_rotary, rotary_and_store_kv

    tokens, num_q, num_k, head_dim, block_size = 11, 8, 2, 64, 16
    cos, sin, positions, qkv, q, k, v = rotary_inputs(tokens, num_q, num_k, head_dim, torch.bfloat16)
    k.mul_(torch.tensor([1.0, 400.0], device=DEVICE)[:, None])  # head 1 rotates past +-448
    v[:, 0].mul_(1e-3)  # E4M3 subnormals
    v[:, 1].mul_(500.0)  # saturates
    k_buf, v_buf, k_cache, v_cache = guarded_nan_caches(2, block_size, num_k, head_dim, FP8)
    slots = torch.randperm(2 * block_size, device=DEVICE)[:tokens]
    slots[[2, 7]] = -1
    valid = slots >= 0
    q_rot, k_rot = apply_rotary(positions, q.clone(), k.clone(), cos, sin)
    v_before = v.clone()

    rotary_and_store_kv(positions, q, k, v, cos, sin, k_cache, v_cache, slots)

    assert torch.equal(q, q_rot) and torch.equal(k, k_rot), f"not apply_rotary's result, seed={seed}"
    k_rows, k_rest = written_rows(k_buf, block_size, slots)
    v_rows, v_rest = written_rows(v_buf, block_size, slots)
    k_want, v_want = to_cache_dtype(k_rot[valid], FP8), to_cache_dtype(v_before[valid], FP8)
    assert torch.equal(k_rows.view(torch.uint8), k_want.view(torch.uint8)), f"seed={seed}"
    assert torch.equal(v_rows.view(torch.uint8), v_want.view(torch.uint8)), f"seed={seed}"
    assert k_rows.float().abs().max() == 448.0 and v_rows.float().abs().max() == 448.0, "not saturated"
    assert k_rest.float().isnan().all() and v_rest.float().isnan().all(), f"wrote elsewhere, seed={seed}"


@pytest.mark.parametrize(
    "bad", ["short_slots", "float_slots", "cache_heads", "v_shape", "cache_dtype", "positions"]
)
def test_rotary_and_store_kv_rejects_bad_shapes(bad):
    from tensorjet.kernels.rotary import rotary_and_store_kv

    tokens, num_k, head_dim = 5, 2, 16
    cos, sin, positions, _, q, k, v = rotary_inputs(tokens, 4, num_k, head_dim, torch.float32)
    k_cache = torch.zeros(2, 16, num_k, head_dim, device=DEVICE)
    v_cache = k_cache.clone()
    slots = torch.arange(tokens, device=DEVICE)
    if bad == "short_slots":
        slots = slots[:-1]
    elif bad == "float_slots":
        slots = slots.float()
    elif bad == "cache_heads":
        k_cache = v_cache = torch.zeros(2, 16, num_k + 1, head_dim, device=DEVICE)
    elif bad == "v_shape":
        v = v[:, :1]
    elif bad == "cache_dtype":
        k_cache, v_cache = k_cache.half(), v_cache.half()
    else:
        positions = positions[:-1]
    q_before = q.clone()
    with pytest.raises(ValueError):
        rotary_and_store_kv(positions, q, k, v, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(q, q_before), "validation must run before anything is written"


@pytest.mark.parametrize("dtype,m,bias", cross(DTYPES, [1, 3, 16], [False, True]))
def test_gemv_small_batch(dtype, m, bias, seed):
    from tensorjet.kernels.gemv import CANDIDATES, gemv
    from tensorjet.kernels.reference import gemv_ref

    n, k = 48 * SCALE + 5, 300 * SCALE + 7  # neither a multiple of any block size
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    for config in CANDIDATES[:2] if DEVICE.type == "cpu" else CANDIDATES:
        out = gemv(x, w, b, config)
        assert out.shape == (m, n) and out.dtype == dtype
        assert_close(out, gemv_ref(x, w, b), dtype, seed, f"gemv {config}")


@pytest.mark.parametrize("dtype,m,bias", cross(DTYPES, [1, 5], [False, True]))
def test_fused_gemv(dtype, m, bias, seed):
    """RMSNorm before, residual add after, SiLU-and-multiply of [gate; up]: each against float64, for
    one row (the FMA kernel) and several (the tensor-core one, each row normed by its own rms).

    A fused chain rounds to bf16 between its ops as the unfused layers do (three roundings for
    norm + product + SiLU-and-multiply: ~1.6% in bf16, against ~2% for the unfused kernels in a row),
    so bf16 chains get a looser bound than one op."""
    from tensorjet.kernels.fused_gemv import CANDIDATES, ROWS_CANDIDATES, fused_gemv
    from tensorjet.kernels.reference import gemv_ref

    n, k, eps = 40 * SCALE + 3, 2100 * SCALE + 9, 1e-5  # K spans several 1,024-wide tiles
    # Not unit scale, and a different scale per row: the norm must matter, row by row.
    x = (torch.randn(m, k, device=DEVICE) * torch.arange(1, m + 1, device=DEVICE)[:, None]).to(dtype)
    norm_w = (1 + 0.5 * torch.randn(k, device=DEVICE)).to(dtype)
    w = (torch.randn(2 * n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(2 * n, device=DEVICE).to(dtype) if bias else None

    chain_tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]

    def assert_chain_close(out, ref, what):
        assert not out.isnan().any(), f"{what}: NaN in output, seed={seed}"
        assert rel_err(out, ref) < chain_tol, f"{what}: relative error {rel_err(out, ref):.3g}, seed={seed}"

    tiles = [dict(config=c) for c in CANDIDATES] if m == 1 else [dict(rows_config=c) for c in ROWS_CANDIDATES]
    for config in tiles[:2] if DEVICE.type == "cpu" else tiles:
        out = fused_gemv(x, w, b, **config)
        assert_close(out, gemv_ref(x, w, b), dtype, seed, f"fused_gemv {config}")

        out = fused_gemv(x, w, b, **config, norm_weight=norm_w, eps=eps)
        assert_chain_close(out, gemv_ref(rms_norm_ref(x, norm_w, eps), w, b), f"+ norm {config}")

        residual_before = torch.randn(m, 2 * n, device=DEVICE).to(dtype)
        residual = residual_before.clone()
        out = fused_gemv(x, w, b, **config, residual=residual)
        assert out is residual, "the residual is updated in place"
        ref = residual_before.double() + gemv_ref(x, w, b)
        assert_close(residual, ref, dtype, seed, f"+ residual {config}")

        out = fused_gemv(x, w, b, **config, norm_weight=norm_w, eps=eps, silu_mul=True)
        assert out.shape == (m, n)
        ref = silu_and_mul_ref(gemv_ref(rms_norm_ref(x, norm_w, eps), w, b))
        assert_chain_close(out, ref, f"+ norm + silu_mul {config}")


def test_fused_decode_layers_match_the_unfused_model(seed):
    """Decode steps through the fused GEMVs (all, or some with the separate-op fallback) give the
    unfused model's hidden states: one token (the FMA kernel), and a step of several sequences and
    tokens (a decode row beside a three-token verify run: the tensor-core kernel)."""
    from dataclasses import replace

    from transformers import LlamaConfig

    from tensorjet.kernels.fused_gemv import MAX_FUSED_ROWS
    from tensorjet.models.llama import LlamaForCausalLM
    from tensorjet.runtime.kernel_selection import select_fused_decode

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=50,
        max_position_embeddings=64,
    )
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config, torch.float32)
    model.init_dummy_weights(seed % 1000)
    for module in model.modules():  # non-trivial norm weights
        if module.__class__.__name__ == "RMSNorm":
            module.weight.data.uniform_(0.5, 1.5)
    block_size, max_blocks = 4, 3
    for attn in model.attention_layers:
        attn.k_cache = torch.zeros(2 * max_blocks, block_size, 2, 16, device=DEVICE)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    shapes = {"one token": ([9], [1]), "two sequences": ([9, 6], [1, 3])}

    def step(context, query_lens):
        tables, slots, positions = [], [], []
        for i, (c, q) in enumerate(zip(context, query_lens)):
            first = i * max_blocks
            tables.append(list(range(first, first + max_blocks)))
            positions += range(c - q, c)
            slots += [(first + p // block_size) * block_size + p % block_size for p in range(c - q, c)]
        meta = AttentionMetadata(
            query_lens=query_lens,
            context_lens=context,
            slot_mapping=torch.tensor(slots, device=DEVICE),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
            block_size=block_size,
        )
        ids = torch.arange(7, 7 + len(positions), device=DEVICE)
        return model(ids, torch.tensor(positions, device=DEVICE), meta)

    unfused = {name: step(*shape) for name, shape in shapes.items()}
    select_fused_decode(model, timed=False)
    assert model.fused_decode and model.fused_rows == range(2, MAX_FUSED_ROWS + 1)
    for name, shape in shapes.items():
        assert rel_err(step(*shape), unfused[name]) < 1e-5, (
            f"fused vs unfused hidden states, {name}, seed={seed}"
        )
    for layer in model.layers:  # a method without a fused GEMV: separate ops around its product
        for proj in (layer.self_attn.o_proj, layer.mlp.gate_up_proj):
            proj.method.kernels = replace(proj.method.kernels, fused=None)
            assert not proj.method.supports_fused
    for name, shape in shapes.items():
        mixed = step(*shape)
        assert rel_err(mixed, unfused[name]) < 1e-5, (
            f"partly fused vs unfused hidden states, {name}, seed={seed}"
        )


@pytest.mark.parametrize(
    "wins,expected",
    [
        ((True, True, True, True), range(2, 17)),
        ((False, False, True, True), range(5, 17)),  # loses where the plain product reads few rows
        ((False, True, False, True), range(9, 17)),  # the larger of equally long runs
        ((True, False, True, True), range(5, 17)),  # the longer run
        ((False, False, False, False), range(0)),
    ],
)
def test_fused_rows_cover_the_longest_run_of_wins(wins, expected):
    from tensorjet.runtime.kernel_selection import FUSED_ROWS_LADDER, winning_rows

    assert FUSED_ROWS_LADDER == (2, 4, 8, 16)
    assert winning_rows(FUSED_ROWS_LADDER, wins, smallest=2) == expected


@pytest.mark.parametrize(
    "wins,expected",
    [
        ((True, True, True, True, True), range(1, 17)),
        ((True, True, True, True, False), range(1, 9)),  # cuBLAS takes 9-16 rows
        ((False, True, True, True, False), range(2, 9)),  # cuBLAS's one-row kernel wins, not its 2-8
        ((False, False, False, False, False), range(0)),
    ],
)
def test_gemv_rows_cover_the_longest_run_of_wins(wins, expected):
    from tensorjet.kernels.gemv import SELECTION_ROWS
    from tensorjet.runtime.kernel_selection import winning_rows

    assert SELECTION_ROWS == (1, 2, 4, 8, 16)
    assert winning_rows(SELECTION_ROWS, wins, smallest=1) == expected


@pytest.mark.parametrize(
    "wins,expected",
    [
        ((True, True, True, True, True), range(1, 17)),
        ((True, True, False, True, True), range(1, 3)),  # up to the first loss, not the longer run after
        ((False, True, True, True, True), range(0)),  # loses at one row: never used
    ],
)
def test_fp8_gemv_rows_run_from_one_row_to_the_first_loss(wins, expected):
    from tensorjet.kernels.gemv import SELECTION_ROWS
    from tensorjet.runtime.kernel_selection import rows_from_one

    assert rows_from_one(SELECTION_ROWS, wins) == expected


def test_linear_dispatches_small_batches_to_its_gemv(seed):
    from tensorjet.kernels.gemv import gemv
    from tensorjet.layers.linear import Linear, LinearKernels

    layer = Linear(40, [24, 8], bias=True, dtype=torch.float32).to(DEVICE)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return gemv(*args, **kwargs)

    for rows_range, expected in ((range(1, 5), [1, 4]), (range(2, 9), [4])):
        calls.clear()
        layer.method.kernels = LinearKernels(small_batch=counted, small_batch_rows=rows_range)
        for rows in (1, 4, 9):
            x = torch.randn(rows, 40, device=DEVICE)
            assert rel_err(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)) < 1e-5
        assert calls == expected, f"rows outside {rows_range} must go to F.linear"


# ---- programmatic dependent launch ------------------------------------------------------------------


def _pdl_kernels() -> dict:
    """Every Triton kernel in tensorjet.kernels that can be launched with PDL (takes a PDL constexpr),
    as its Python function (a JITFunction compiled, an InterpretedFunction under the interpreter)."""
    import tensorjet.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "_common":  # the PDL helpers themselves
            continue
        module = importlib.import_module(f"tensorjet.kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if "PDL" in (getattr(obj, "arg_names", None) or ()) and fn.__module__ == module.__name__:
                found[f"{info.name}.{name}"] = fn
    return found


def test_pdl_kernels_always_wait_for_the_previous_kernel():
    """A kernel launched with PDL may start before the previous kernel has finished. Each program must
    therefore wait for it unconditionally: a top-level `wait_for_previous_kernel(PDL)` with no return
    before it. A program that skipped the wait could read stale inputs, and a kernel all of whose
    programs skipped it could complete before its predecessor, so the kernel after it would not
    wait for that predecessor either. This can only go wrong on a GPU, so it is checked here in
    the source."""
    kernels = _pdl_kernels()
    expected = {"fused_gemv._fused_gemv_kernel", "rotary._rotary_store_kv_kernel"}
    expected |= {f"decode_attention._decode_{stage}_kernel" for stage in ("stage1", "fp8_stage1", "stage2")}
    assert expected <= set(kernels)
    for name, fn in kernels.items():
        body = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].body
        waits = [
            i
            for i, stmt in enumerate(body)
            if isinstance(stmt, ast.Expr)
            and isinstance(stmt.value, ast.Call)
            and getattr(stmt.value.func, "id", None) == "wait_for_previous_kernel"
        ]
        assert len(waits) == 1, f"{name}: needs exactly one top-level wait_for_previous_kernel(PDL)"
        before = ast.Module(body=body[: waits[0]], type_ignores=[])
        returns = [node for node in ast.walk(before) if isinstance(node, ast.Return)]
        assert not returns, f"{name} returns before waiting for the previous kernel"
