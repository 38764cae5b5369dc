"""Pure-PyTorch references for the Triton kernels (slow, simple, float64 where it matters).

Tests compare every kernel against these; they also document the exact semantics.
"""

from __future__ import annotations

import torch

from tensorjet.dtypes import to_cache_dtype


def _ints(x) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write `k, v: [T, Hk, D]` into `[num_blocks, block_size, Hk, D]` caches at their slots; -1 skips."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = to_cache_dtype(
        k[: len(slot_mapping)][valid], k_cache.dtype
    )
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = to_cache_dtype(
        v[: len(slot_mapping)][valid], v_cache.dtype
    )


def _gather_seq(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence: [length, Hk, D]."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = table_row.long()[pos // block_size]
    return cache[blocks, pos % block_size]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc,
    query_lens,
    context_lens,
    scale: float,
) -> torch.Tensor:
    """Float64 attention over the paged cache for a ragged batch; returns float64 [T, Hq, D].

    Sequence i owns query rows `query_start_loc[i] : query_start_loc[i] + query_lens[i]`, the last
    query_lens[i] of its context_lens[i] tokens; query j sits at position context_len - query_len + j
    and sees keys at positions <= its own. Rows owned by no sequence stay 0.
    """
    num_q_heads = q.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    starts, qlens, clens = _ints(query_start_loc), _ints(query_lens), _ints(context_lens)
    for i, (start, n, total) in enumerate(zip(starts, qlens, clens)):
        if n == 0:
            continue
        k = _gather_seq(k_cache, block_tables[i], total).double().repeat_interleave(group, dim=1)
        v = _gather_seq(v_cache, block_tables[i], total).double().repeat_interleave(group, dim=1)
        qi = q[start : start + n].double()
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        q_pos = torch.arange(total - n, total, device=q.device)
        k_pos = torch.arange(total, device=q.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start : start + n] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """One query per sequence (q: [B, Hq, D]) over its whole context; float64 [B, Hq, D]."""
    num_seqs = q.shape[0]
    return paged_attention_ref(
        q, k_cache, v_cache, block_tables, list(range(num_seqs)), [1] * num_seqs, context_lens, scale
    )


def extend_attention_ref(
    q, k_cache, v_cache, block_tables, query_start_loc, query_lens, context_lens, scale: float
) -> torch.Tensor:
    """Causal prefill/extend over a ragged batch with cached prefixes; float64 [T, Hq, D]."""
    return paged_attention_ref(
        q, k_cache, v_cache, block_tables, query_start_loc, query_lens, context_lens, scale
    )


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Float64 RMSNorm; with `residual`, returns (norm(x + residual), x + residual)."""
    xd = x.double()
    if residual is not None:
        xd = xd + residual.double()
    out = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return out if residual is None else (out, xd)


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Float64 SwiGLU: silu(gate) * up over the last dim [gate | up]."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary_ref(
    positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Float64 rotate-half rotary embedding of x [T, H, D] at `positions`; cos/sin: [max_pos, D/2]."""
    c = cos.double()[positions.long()][:, None, :]
    s = sin.double()[positions.long()][:, None, :]
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 x @ weight^T (+ bias)."""
    y = x.double() @ weight.double().T
    return y if bias is None else y + bias.double()
