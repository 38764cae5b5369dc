"""In-flight batching: which sequences run this step, and how many tokens each computes.

Every step has a budget of `max_batch_size` sequences and `max_num_tokens` tokens. Running sequences
go first (decodes, then unfinished prompt chunks), then waiting ones in arrival order. A prompt
longer than the chunk size, or than what is left of the budget, is prefilled over several steps
alongside other requests' decodes (chunked context).

Fair prefill: a running prompt's chunk leaves room for the prompts behind it (running ones later in the
order, then waiting ones), up to half the token budget: a short request that arrives behind a long
prompt is prefilled in the next step beside the long one's chunk, instead of after all of them. The
budget a step uses is unchanged when prompts are waiting (they take the room left), so large batches
keep their throughput.

Policies:
- max_utilization: admit greedily; when blocks run out, preempt the newest running sequence
  (its blocks are freed and it is recomputed later, from the prefix cache where possible).
- guaranteed_no_evict: admit only when the request's whole KV (prompt + max_tokens) fits beside
  what running sequences may still grow into; never preempts.
- static_batch: a batch runs until all its sequences finish before any new one starts (the
  baseline the guide's in-flight batching claim is measured against).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

from tensorjet.config import SchedulerConfig
from tensorjet.engine.block_manager import BlockManager
from tensorjet.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_seq_len: int) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.static_members: set[int] = set()  # static_batch: the current batch's unfinished sequences

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self, lookahead: Callable[[Sequence], int] | None = None) -> ScheduledBatch:
        """lookahead(seq): draft tokens a decoding sequence may verify this step; each gets that many more
        slots where the token budget and free blocks allow (never by preempting), after every running
        sequence has its own tokens and before waiting ones are admitted."""
        batch = ScheduledBatch()
        budget = self.config.max_num_tokens
        scheduled: set[int] = set()
        wanted_after = self._prompt_tokens_wanted_after()
        for seq in list(self.running):
            if seq.seq_id in scheduled or seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if len(batch) >= self.config.max_batch_size or budget <= 0:
                break
            room = budget
            if seq.num_uncomputed_tokens > 1:  # a prompt chunk: leave the prompts behind it their share
                room -= min(wanted_after[seq.seq_id], self.config.max_num_tokens // 2)
                if room <= 0:
                    continue
            num = min(seq.num_uncomputed_tokens, room, self.config.chunk_size)
            if not self._allocate_or_preempt(seq, num, scheduled):
                continue
            batch.add(seq, num)
            scheduled.add(seq.seq_id)
            budget -= num
        if lookahead is not None:
            budget = self._add_lookahead(batch, budget, lookahead)
        self._admit(batch, budget)
        return batch

    def _prompt_tokens_wanted_after(self) -> dict[int, int]:
        """Per running sequence: prompt tokens still to compute by the prompts after it (running ones later
        in the order, then as many waiting ones as the batch has seats for)."""
        seats = max(self.config.max_batch_size - len(self.running), 0)
        if self.config.scheduler_policy == "static_batch":
            seats = 0  # waiting sequences join only with the next batch
        behind = sum(len(s) - s.num_computed_tokens for s in islice(self.waiting, seats))
        wanted: dict[int, int] = {}
        for seq in reversed(self.running):
            wanted[seq.seq_id] = behind
            if seq.num_uncomputed_tokens > 1:
                behind += seq.num_uncomputed_tokens
        return wanted

    def _add_lookahead(self, batch: ScheduledBatch, budget: int, lookahead: Callable[[Sequence], int]) -> int:
        for i, seq in enumerate(batch.seqs):
            if budget <= 0:
                break
            if seq.num_uncomputed_tokens != 1 or batch.num_new_tokens[i] != 1:
                continue  # only a decode: its last token is known and the step samples after it
            extra = min(lookahead(seq), budget)
            if extra > 0 and self.block_manager.allocate(seq, 1 + extra):
                batch.num_new_tokens[i] += extra
                budget -= extra
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num: int, scheduled: set[int]) -> bool:
        while not self.block_manager.allocate(seq, num):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
            assert victim.seq_id not in scheduled, "preempted a sequence already in this step's batch"
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        static = self.config.scheduler_policy == "static_batch"
        if static and not self.static_members:
            # A static batch is the next max_batch_size requests, fixed until every one finishes.
            self.static_members = {s.seq_id for s in list(self.waiting)[: self.config.max_batch_size]}
        while self.waiting and budget > 0 and len(batch) < self.config.max_batch_size:
            seq = self.waiting[0]
            if static and seq.seq_id not in self.static_members:
                break
            # Prompt logprobs need logits at every prompt position, so such requests skip the cache.
            hits = [] if seq.wants_prompt_logprobs else self.block_manager.cached_prefix_blocks(seq)
            start = len(hits) * self.block_manager.block_size if hits else seq.num_computed_tokens
            remaining = len(seq) - start
            num = min(remaining, budget, self.config.chunk_size)
            if num < remaining and not self.config.enable_chunked_context:
                break  # the whole prompt must fit one step
            if self.config.scheduler_policy == "guaranteed_no_evict" and not self._fits_whole_request(
                seq, hits
            ):
                break
            if not self.block_manager.allocate(seq, num, hits):
                if static and self.running:
                    # Memory-bound: members not yet started wait for the next batch.
                    self.static_members &= {s.seq_id for s in self.running}
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num)
            budget -= num

    def _fits_whole_request(self, seq: Sequence, hits: list[int]) -> bool:
        """Reserve for the request's final length and for every running sequence's final length."""
        bm = self.block_manager

        def final_blocks(s: Sequence) -> int:
            return bm.blocks_needed(min(s.num_prompt_tokens + s.params.max_tokens, self.max_seq_len))

        still_to_grow = sum(max(final_blocks(s) - len(s.block_table), 0) for s in self.running)
        revived = sum(1 for b in hits if bm.blocks[b].ref_count == 0)
        return final_blocks(seq) - len(hits) <= bm.num_free_blocks - revived - still_to_grow

    # ---- after the step ----------------------------------------------------------------------
    def finish(self, seq: Sequence) -> None:
        """Release a finished (or aborted) sequence's blocks."""
        self.static_members.discard(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
