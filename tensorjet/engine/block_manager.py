"""The KV block pool: per-sequence block tables, reference counts, and the prefix cache.

A full block is keyed by a chained hash of (previous block's hash, its tokens), so equal keys mean
equal whole prefixes; its tokens are kept and compared on every hit, so a hash collision can never
serve wrong KV. Blocks whose reference count drops to zero keep their contents and stay findable
(`evictable`, least recently used first) until an allocation needs them back.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tensorjet.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # uncached, popped from the end
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------
    def _block_key(self, seq: Sequence, index: int) -> tuple[int, tuple[int, ...]]:
        """(chained hash, tokens) of `seq`'s full block `index`, cached on the sequence.

        A block's tokens never change once they are all known, so each key is computed once per
        sequence rather than once per step (which made every step O(context))."""
        keys = seq.block_keys
        while len(keys) <= index:
            b = len(keys)
            tokens = tuple(seq.token_ids[b * self.block_size : (b + 1) * self.block_size])
            keys.append((hash((keys[-1][0] if keys else 0, tokens)), tokens))
        return keys[index]

    def _lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks covering the longest prefix of `seq`, leaving at least one token to compute."""
        max_blocks = (len(seq) - 1) // self.block_size
        hits = []
        for index in range(max_blocks):
            key, tokens = self._block_key(seq, index)
            block_id = self.hash_to_block.get(key)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def cached_prefix_blocks(self, seq: Sequence) -> list[int]:
        """Blocks a fresh allocation for `seq` would take from the cache (no side effects)."""
        if not self.enable_prefix_caching or seq.block_table:
            return []
        return self._lookup(seq)

    # ---- allocation -------------------------------------------------------------------------
    def _take_block(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.pop()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        self.blocks[block_id].ref_count = 1
        return block_id

    def _reuse_block(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] | None = None) -> bool:
        """Grow `seq`'s block table to hold `num_new_tokens` more tokens, False if blocks run out.

        On a first allocation `hits` (from `cached_prefix_blocks`) are reused and
        `num_computed_tokens` advances past them; `num_new_tokens` counts from there.
        """
        hits = hits or []
        start = len(hits) * self.block_size if hits else seq.num_computed_tokens
        fresh = self.blocks_needed(start + num_new_tokens) - len(seq.block_table) - len(hits)
        # Unreferenced hit blocks are counted as free but get reused, not taken.
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if fresh > self.num_free_blocks - revived:
            return False
        if hits:
            for block_id in hits:
                self._reuse_block(block_id)
            seq.block_table = list(hits)
            seq.num_computed_tokens = start
            seq.num_committed_blocks = len(hits)
        if not seq.prefix_looked_up:  # count each prompt once, not again after preemption
            seq.prefix_looked_up = True
            seq.num_cached_prompt_tokens = seq.num_computed_tokens
            self.prefix_queries_tokens += seq.num_prompt_tokens
            self.prefix_hits_tokens += seq.num_computed_tokens
        for _ in range(max(fresh, 0)):
            seq.block_table.append(self._take_block())
        return True

    def commit_computed_blocks(self, seq: Sequence) -> None:
        """Make the blocks that `seq` has completely filled findable by later requests."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for index in range(seq.num_committed_blocks, num_full):
            block = self.blocks[seq.block_table[index]]
            key, tokens = self._block_key(seq, index)
            if block.hash is None and key not in self.hash_to_block:  # else already cached
                block.hash, block.token_ids = key, tokens
                self.hash_to_block[key] = block.block_id
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its cached blocks stay findable, tail blocks evicted first. What every
        cache held for it (the target's and a draft model's) is gone with them."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_draft_computed_tokens = 0
        seq.num_committed_blocks = 0

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release `seq`'s blocks past the first `num_tokens` tokens (slots of rejected drafts). They hold
        no committed block: only verified tokens are ever offered to the prefix cache."""
        keep = self.blocks_needed(num_tokens)
        assert keep >= seq.num_committed_blocks, "trimming a block the prefix cache holds"
        for block_id in reversed(seq.block_table[keep:]):
            self._release(block_id)
        del seq.block_table[keep:]

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            if block.hash is not None:
                self.evictable[block_id] = None
            else:
                self.free_ids.append(block_id)

    # ---- invariants (used by tests) -----------------------------------------------------------
    def check_integrity(self, live_seqs: list[Sequence]) -> None:
        refs = [0] * self.num_blocks
        for seq in live_seqs:
            for block_id in seq.block_table:
                refs[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id} ref count wrong"
        free, evictable = set(self.free_ids), set(self.evictable)
        assert len(free) == len(self.free_ids), "a block is on the free list twice"
        assert not free & evictable, "a block is both free and evictable"
        for block in self.blocks:
            in_pool = block.block_id in free or block.block_id in evictable
            assert in_pool == (block.ref_count == 0), f"block {block.block_id} leaked or double-freed"
            if block.block_id in free:
                assert block.hash is None
            if block.block_id in evictable:
                assert block.hash is not None
        for key, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == key, "hash index points at a block that lost its hash"
