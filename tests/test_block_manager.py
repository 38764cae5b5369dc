"""Acceptance 4: block manager invariants under random workloads.

A shadow "KV content" array records which token each physical slot really holds, written only when a
sequence computes tokens. Whenever the prefix cache serves blocks, their shadow content must equal
the requesting sequence's tokens: an evicted or reused block can never be served.
"""

import random

import pytest

from tensorjet.engine.block_manager import BlockManager
from tensorjet.engine.sequence import Sequence
from tensorjet.sampling_params import SamplingParams

BLOCK = 4


def make_seq(tokens):
    return Sequence("r", 0, tokens, SamplingParams(max_tokens=8))


class ShadowPool:
    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.content = [[None] * BLOCK for _ in range(bm.num_blocks)]

    def compute(self, seq: Sequence, n: int) -> None:
        """Pretend the model wrote KV for the next n tokens of seq, then commit full blocks."""
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            self.content[seq.block_table[p // BLOCK]][p % BLOCK] = seq.token_ids[p]
        seq.num_computed_tokens += n
        self.bm.commit_computed_blocks(seq)

    def check_served(self, seq: Sequence) -> None:
        for p in range(seq.num_computed_tokens):
            assert self.content[seq.block_table[p // BLOCK]][p % BLOCK] == seq.token_ids[p], "served stale KV"


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_keeps_invariants(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=BLOCK, enable_prefix_caching=True)
    shadow = ShadowPool(bm)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    live: list[Sequence] = []
    hits_seen = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.35:  # a new request, often sharing a prefix
            tokens = list(rng.choice(prefixes)) if rng.random() < 0.7 else []
            tokens += [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            seq = make_seq(tokens)
            hits = bm.cached_prefix_blocks(seq)
            n = len(seq) - len(hits) * BLOCK
            if bm.allocate(seq, n, hits):
                hits_seen += len(hits)
                shadow.check_served(seq)
                shadow.compute(seq, n)
                live.append(seq)
            else:
                assert seq.block_table == [] and seq.num_computed_tokens == 0
        elif op < 0.75 and live:  # a decode step: one more token
            seq = rng.choice(live)
            seq.token_ids.append(rng.randrange(50))
            if bm.allocate(seq, 1):
                shadow.compute(seq, 1)
            else:  # out of blocks: preempt it, as the scheduler would
                bm.free(seq)
                live.remove(seq)
        elif live:  # a request finishes
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
            assert seq.block_table == []
        bm.check_integrity(live)
    for seq in live:
        bm.free(seq)
    bm.check_integrity([])
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    assert hits_seen > 0, "the workload never exercised the prefix cache"


def test_prefix_hit_skips_computed_tokens_and_counts_them():
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    shadow = ShadowPool(bm)
    first = make_seq(list(range(10)))
    assert bm.allocate(first, 10)
    shadow.compute(first, 10)
    bm.free(first)  # blocks become evictable, not forgotten
    second = make_seq(list(range(10)) + [99])
    hits = bm.cached_prefix_blocks(second)
    assert len(hits) == 2  # two full blocks of 4; the partial third block is never cached
    assert bm.allocate(second, len(second) - 8, hits)
    assert second.num_computed_tokens == 8
    shadow.check_served(second)
    assert bm.prefix_hits_tokens == 8 and bm.prefix_queries_tokens == 21


def test_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    shadow = ShadowPool(bm)
    seq = make_seq(list(range(8)))
    assert bm.allocate(seq, 8)
    shadow.compute(seq, 8)
    again = make_seq(list(range(8)))
    hits = bm.cached_prefix_blocks(again)
    assert len(hits) == 1  # the block holding the last token is recomputed, so logits exist


def test_same_hash_different_tokens_is_not_served():
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    seq = make_seq([1, 2, 3, 4, 5])
    assert bm.allocate(seq, 5)
    seq.num_computed_tokens = 5
    bm.commit_computed_blocks(seq)
    block = bm.blocks[seq.block_table[0]]
    block.token_ids = (9, 9, 9, 9)  # simulate a colliding hash holding other tokens
    assert bm.cached_prefix_blocks(make_seq([1, 2, 3, 4, 5])) == []


def test_eviction_is_lru_and_evicted_blocks_lose_their_hash():
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    old, new = make_seq([1] * 5), make_seq([2] * 5)
    for s in (old, new):
        assert bm.allocate(s, 5)
        s.num_computed_tokens = 5
        bm.commit_computed_blocks(s)
    bm.free(old)
    bm.free(new)
    filler = make_seq([3] * 9)
    assert bm.allocate(filler, 9)  # needs 3 blocks: 2 uncached + the least recently freed cached one
    assert bm.cached_prefix_blocks(make_seq([1] * 5)) == []  # old's block was evicted
    assert len(bm.cached_prefix_blocks(make_seq([2] * 5))) == 1  # new's survives
    bm.check_integrity([filler])
