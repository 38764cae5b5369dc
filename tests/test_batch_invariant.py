"""Batch-invariant mode: a row's result never depends on the rest of its step, bit for bit.

The pieces (row-tiled products, per-row attention, the extend kernel's fixed key tiles) are checked
directly: the same row computed alone, inside a batch, at another offset, in another chunk split and as a
one-row decode must give identical bits (and the reference's values).
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tensorjet.kernels.extend_attention import extend_attention, extend_attention_ref  # noqa: E402
from tensorjet.layers.batch_invariant import attend_rows, row_tiled  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rows_alone(product, x, w):
    return torch.cat([product(x[i : i + 1], w) for i in range(x.shape[0])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_tiled_product_gives_each_row_the_same_bits_in_any_batch(dtype):
    torch.manual_seed(0)
    w = torch.randn(384, 576, device=DEVICE).to(dtype)
    x = torch.randn(45, 576, device=DEVICE).to(dtype)
    tiled = row_tiled(lambda a, b, bias=None: F.linear(a, b, bias), 16)
    together = tiled(x, w)
    assert torch.equal(together, _rows_alone(tiled, x, w))
    assert torch.equal(together[7:], tiled(x[7:], w))  # rows at other offsets within their tiles
    torch.testing.assert_close(together.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)


def _paged(context_len, block_size, num_kv_heads, head_dim, dtype, seed=0):
    """One sequence's keys/values in a shuffled paged cache."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-context_len // block_size) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    table = torch.randperm(num_blocks, generator=gen).to(torch.int32)[None].to(DEVICE)
    return k_cache, v_cache, table


def _splits(context_len):
    """The ways one sequence's rows reach attention: one prompt, chunks, and one-row decodes."""
    whole = [(0, context_len)]
    chunked = [(0, 21), (21, 37), (37, context_len)]
    decodes = [(0, 40)] + [(p, p + 1) for p in range(40, context_len)]
    return {"whole": whole, "chunked": chunked, "decodes": decodes}


def _run_split(attend, q, pieces, companions):
    """Rows of `q` computed piece by piece, each piece in a batch after `companions` other rows."""
    out = torch.empty_like(q)
    for start, end in pieces:
        out[start:end] = attend(start, end, companions)
    return out


def _torch_rows(q, other_q, k_cache, v_cache, table, scale):
    def attend(start, end, companions):
        # The sequence's rows start:end after `companions` one-row decodes at position 30.
        qs = torch.cat((other_q[:companions], q[start:end]))
        tables = table.expand(companions + 1, -1)
        qlens, clens = [1] * companions + [end - start], [31] * companions + [end]
        return attend_rows(qs, k_cache, v_cache, tables, qlens, clens, scale)[companions:]

    return attend


def _triton_rows(q, other_q, k_cache, v_cache, table, scale):
    def attend(start, end, companions):
        qs = torch.cat((other_q[:companions], q[start:end]))
        tables = table.expand(companions + 1, -1).contiguous()
        qlens, clens = [1] * companions + [end - start], [31] * companions + [end]
        starts = torch.tensor([0, *range(1, companions + 1)], dtype=torch.int32, device=DEVICE)
        out = extend_attention(
            qs, k_cache, v_cache, tables, starts, qlens, clens, scale, fixed_key_tiles=True
        )
        return out[companions:]

    return attend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows",
    [_torch_rows, pytest.param(_triton_rows, marks=pytest.mark.slow)],  # slow: the interpreted kernel
    ids=["torch", "triton"],
)
def test_attention_rows_are_the_same_bits_whatever_the_split_and_batch(rows, dtype):
    block_size, num_kv_heads, group, head_dim, context_len = 16, 2, 3, 64, 50
    k_cache, v_cache, table = _paged(context_len, block_size, num_kv_heads, head_dim, dtype)
    torch.manual_seed(1)
    q = torch.randn(context_len, num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    other_q = torch.randn(9, num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    scale = head_dim**-0.5
    attend = rows(q, other_q, k_cache, v_cache, table, scale)
    runs = {
        (name, companions): _run_split(attend, q, pieces, companions)
        for name, pieces in _splits(context_len).items()
        for companions in (0, 4)
    }
    first = runs[("whole", 0)]
    for key, out in runs.items():
        assert torch.equal(out, first), f"{key}: rows differ from the whole prompt"
    whole = [context_len]
    expected = extend_attention_ref(q, k_cache, v_cache, table, torch.tensor([0]), whole, whole, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(first.float(), expected.float(), rtol=tol, atol=tol)
