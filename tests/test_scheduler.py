"""Scheduler invariants with a simulated model: budgets, chunking, policies, no leaked blocks."""

import random

import pytest

from tensorjet.config import SchedulerConfig
from tensorjet.engine.block_manager import BlockManager
from tensorjet.engine.scheduler import Scheduler
from tensorjet.engine.sequence import Sequence, SequenceStatus
from tensorjet.sampling_params import SamplingParams

BLOCK = 4


def run_workload(
    policy, num_blocks=40, max_batch_size=6, max_num_tokens=24, chunk=None, seed=0, n=30, chunked=True
):
    rng = random.Random(seed)
    config = SchedulerConfig(
        max_batch_size=max_batch_size,
        max_num_tokens=max_num_tokens,
        enable_chunked_context=chunked,
        max_chunked_prefill_length=chunk,
        scheduler_policy=policy,
    )
    bm = BlockManager(num_blocks, BLOCK)
    sched = Scheduler(config, bm, max_seq_len=1000)
    seqs = []
    for i in range(n):
        prompt = [rng.randrange(100) for _ in range(rng.randrange(1, 40 if chunked else 24))]
        seqs.append(Sequence(f"r{i}", 0, prompt, SamplingParams(max_tokens=rng.randrange(1, 12))))
    for s in seqs[: n // 2]:
        sched.add(s)
    steps, log = 0, []
    while sched.has_work() or steps < 5:
        if steps == 5:  # later arrivals join a running batch
            for s in seqs[n // 2 :]:
                sched.add(s)
        batch = sched.schedule()
        assert batch.seqs or not sched.has_work(), "no progress"
        assert len(batch) <= max_batch_size
        assert batch.num_tokens <= max_num_tokens
        assert len({s.seq_id for s in batch.seqs}) == len(batch)
        limit = config.chunk_size
        running_ids = {s.seq_id for s in sched.running}
        log.append((set(running_ids), [s.seq_id for s in batch.seqs]))
        for s, k in zip(batch.seqs, batch.num_new_tokens):
            assert 1 <= k <= limit
            assert s.status is SequenceStatus.RUNNING
            assert len(s.block_table) * BLOCK >= s.num_computed_tokens + k
            s.num_computed_tokens += k
            bm.commit_computed_blocks(s)
            if s.num_computed_tokens == len(s):
                s.token_ids.append(rng.randrange(100))
                if s.num_output_tokens >= s.params.max_tokens:
                    s.finish("length")
                    sched.finish(s)
        bm.check_integrity(sched.running)
        steps += 1
        assert steps < 2000
    assert all(s.is_finished and s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert bm.num_free_blocks == bm.num_blocks
    return sched, log


@pytest.mark.parametrize("seed", range(4))
def test_max_utilization_preempts_under_pressure_and_finishes_all(seed):
    sched, _ = run_workload("max_utilization", num_blocks=14, seed=seed)
    assert sched.num_preemptions > 0


@pytest.mark.parametrize("seed", range(4))
def test_guaranteed_no_evict_never_preempts(seed):
    sched, _ = run_workload("guaranteed_no_evict", num_blocks=14, seed=seed)
    assert sched.num_preemptions == 0


def test_chunked_prefill_respects_chunk_length():
    run_workload("max_utilization", chunk=5, seed=1)


def test_without_chunking_prompts_are_never_split():
    config = SchedulerConfig(max_batch_size=4, max_num_tokens=10, enable_chunked_context=False)
    sched = Scheduler(config, BlockManager(40, BLOCK), max_seq_len=100)
    long, short = (Sequence(f"r{i}", 0, list(range(n)), SamplingParams()) for i, n in enumerate((8, 6)))
    sched.add(long)
    sched.add(short)
    batch = sched.schedule()
    assert batch.seqs == [long] and batch.num_new_tokens == [8]  # short waits: 8 + 6 > 10


def test_static_batch_refills_nothing_until_the_whole_batch_finishes():
    """Between two moments with nothing running, at most max_batch_size requests ever run: finished
    members' slots are not refilled (in-flight batching would refill them)."""
    _, log = run_workload("static_batch", num_blocks=200, max_batch_size=6, seed=2)
    members: set[int] = set()
    num_batches = 0
    for running, _ in log:
        if not members & running:  # the previous batch has fully finished
            members = set()
            num_batches += bool(running)
        members |= running
        assert len(members) <= 6, "a finished member's slot was refilled"
    assert num_batches >= 30 // 6
