"""Starting the ranks of a tensor-parallel engine, and the loop the ranks other than 0 run.

Two ways to get N ranks, one process each:
- spawned (the default): the process that builds the engine is rank 0 and starts ranks 1 .. N-1 as child
  processes (multiprocessing's `spawn`, one per device), which meet it through a TCPStore on 127.0.0.1;
- torchrun: every rank is a process torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT in its environment), on one node or several; rank 0 builds the engine, the others run
  `run_torchrun_worker`.

Every rank joins one process group for the model's collectives (NCCL on GPUs, gloo on CPUs), whose
operations time out after COLLECTIVE_TIMEOUT, and a gloo group for rank 0's step messages
(`StepChannel`). Rank 0 holds the scheduler, the sampler and the HTTP server; a worker holds only its
`ModelRunner`. Rank r runs on GPU r of its node (its LOCAL_RANK under torchrun).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tensorjet.config import EngineConfig
from tensorjet.distributed import TensorParallel
from tensorjet.models.llama import check_tensor_parallel, max_positions_of
from tensorjet.models.loader import ModelSource, resolve_model
from tensorjet.runtime.cpu_threads import use_available_cores
from tensorjet.runtime.model_runner import ModelRunner
from tensorjet.runtime.step_channel import CONTROL_TIMEOUT, MAKE_KV_CACHE_RESIDENT, StepChannel
from tensorjet.runtime.worker_group import STARTED_KEY, WorkerGroup, error_key, send_heartbeats

logger = logging.getLogger(__name__)

# A collective that waits longer than this for another rank fails instead of hanging (a rank that died
# fails them at once; this bounds one that hangs).
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
# How long the ranks may take to meet: processes starting, torchrun's nodes coming up.
STARTUP_TIMEOUT = timedelta(minutes=10)


@dataclass
class ParallelGroup:
    """This process's part in a tensor-parallel engine."""

    tp: TensorParallel
    channel: StepChannel
    store: dist.Store
    workers: WorkerGroup | None = None  # rank 0's watch over the other ranks; None on those ranks
    # Rank 0 told the workers to size and start their KV caches, and its own start has not finished: the
    # ranks are in start-up collectives, which a stop message would not meet.
    starting: bool = False
    closed: bool = False

    def begin_start(self) -> None:
        """Rank 0: the workers size their KV caches and start them with rank 0 (`ModelRunner`'s
        `kv_cache_blocks` then `start`, on every rank)."""
        self.starting = True
        self.channel.send_start()

    def shutdown(self) -> None:
        """Rank 0: stop the workers (they leave their loop), then leave the process group. Once. Midway
        through the start the spawned workers are ended at once instead."""
        if self.closed:
            return
        self.closed = True
        if self.workers is not None:
            if not self.starting:
                try:
                    self.channel.send_stop()
                except RuntimeError:  # a worker is gone: stop() ends the spawned ones left
                    logger.warning("could not tell every tensor-parallel worker to stop")
            self.workers.stop(timeout=0.0 if self.starting else 10.0)
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class TorchrunRank:
    """This process's place in a world that torchrun (or another env:// launcher) started."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_rank() -> TorchrunRank | None:
    """Where this process sits when its environment names a torch.distributed world of several processes
    (RANK and WORLD_SIZE, as torchrun sets them); None otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return TorchrunRank(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)))


def start_model_runner(config: EngineConfig, source: ModelSource, max_seq_len: int) -> ModelRunner:
    """Rank 0's runner, loaded: the whole model in this process, or (tensor_parallel_size > 1) its share,
    with the other ranks started (spawned) or found (torchrun) and joined. The engine then sizes and
    starts it (`kv_cache_blocks`, `start`), and the other ranks follow."""
    size = config.parallel.tensor_parallel_size
    launched = torchrun_rank()
    if launched is None and size == 1:
        if config.torch_device.type == "cpu":
            use_available_cores()
        return ModelRunner(config, source, max_seq_len)
    if launched is not None and launched.world_size != size:
        raise ValueError(
            f"option tensor_parallel_size={size} must equal the {launched.world_size} processes torchrun "
            "started (WORLD_SIZE): one rank per process"
        )
    check_tensor_parallel(source.hf_config, size)
    _check_devices(config, size, launched)
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a torch.distributed process group (another tensor-parallel "
            "engine?): shut that one down first (LLM.shutdown())"
        )
    if launched is not None:
        store, _, _ = next(dist.rendezvous("env://", timeout=STARTUP_TIMEOUT))
        workers = WorkerGroup(store, size)
    else:
        store = dist.TCPStore(
            "127.0.0.1", 0, size, is_master=True, wait_for_workers=False, timeout=STARTUP_TIMEOUT
        )
        workers = _spawn_workers(config, store, size)
    try:
        if workers.processes:
            workers.wait_started(STARTUP_TIMEOUT.total_seconds())
        group = _join(config, store, 0, size, 0 if launched is None else launched.local_rank)
        group.workers = workers
        runner = ModelRunner(config, source, max_seq_len, group)
    except BaseException as error:
        reason = workers.failure()
        workers.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
        if reason is not None and not isinstance(error, ValueError):  # a collective that lost its peer
            raise RuntimeError(f"tensor parallelism could not start: {reason}") from error
        raise
    logger.info("tensor parallelism: %d ranks (%s)", size, "torchrun" if launched else "spawned workers")
    return runner


def _check_devices(config: EngineConfig, size: int, launched: TorchrunRank | None) -> None:
    if config.torch_device.type != "cuda":
        return
    visible = torch.cuda.device_count()
    needed = size if launched is None else launched.local_rank + 1
    if needed > visible:
        where = "on this node " if launched is not None else ""
        raise ValueError(
            f"option tensor_parallel_size={size} needs {needed} GPUs {where}(one per rank); {visible} are "
            "visible (CUDA_VISIBLE_DEVICES)"
        )


def _spawn_workers(config: EngineConfig, store: dist.TCPStore, size: int) -> WorkerGroup:
    context = multiprocessing.get_context("spawn")
    processes = {}
    for rank in range(1, size):
        process = context.Process(
            target=_spawned_worker,
            args=(config, store.port, rank, size),
            name=f"tensorjet-tp-worker-{rank}",
            daemon=True,
        )
        process.start()
        processes[rank] = process
    return WorkerGroup(store, size, processes)


def _join(config: EngineConfig, store: dist.Store, rank: int, size: int, local_rank: int) -> ParallelGroup:
    """Join the model's process group and the step channel's as `rank` of `size`."""
    cuda = config.torch_device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)  # "cuda" means this rank's GPU from here on
    else:  # the ranks on this machine share its cores
        use_available_cores(int(os.environ.get("LOCAL_WORLD_SIZE", size)))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.PrefixStore("tensorjet/model", store),
        rank=rank,
        world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return ParallelGroup(TensorParallel(rank, size), StepChannel(control), store)


def _spawned_worker(config: EngineConfig, port: int, rank: int, size: int) -> None:
    """A spawned worker process's entry point."""
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=STARTUP_TIMEOUT)
    store.add(STARTED_KEY, 1)
    raise SystemExit(_run_worker(config, store, rank, size, local_rank=rank))


def run_torchrun_worker(config: EngineConfig, launched: TorchrunRank) -> int:
    """A torchrun-started rank other than 0: run rank 0's steps until it stops; the exit status."""
    if launched.world_size != config.parallel.tensor_parallel_size:
        raise ValueError(
            f"option tensor_parallel_size={config.parallel.tensor_parallel_size} must equal the "
            f"{launched.world_size} processes torchrun started (WORLD_SIZE): one rank per process"
        )
    store, _, _ = next(dist.rendezvous("env://", timeout=STARTUP_TIMEOUT))
    stop_heartbeats = send_heartbeats(store, launched.rank)
    try:
        return _run_worker(config, store, launched.rank, launched.world_size, launched.local_rank)
    finally:
        stop_heartbeats.set()


def _run_worker(config: EngineConfig, store: dist.Store, rank: int, size: int, local_rank: int) -> int:
    """Load this rank's share of the model, size and start its KV cache when rank 0 does, then run each
    step rank 0 sends until it stops the engine.
    A failure is left in the store for rank 0 to report; returns the exit status."""
    try:
        source = resolve_model(config.load.model, config.load.load_format)
        max_seq_len = config.load.resolve_max_seq_len(max_positions_of(source.hf_config))
        group = _join(config, store, rank, size, local_rank)
        runner = ModelRunner(config, source, max_seq_len, group)
        if group.channel.wait_for_start():  # False: rank 0 stopped before its KV cache was sized
            runner.start(runner.kv_cache_blocks())  # its blocks: the fewest any rank holds
            while (message := group.channel.receive()) is not None:
                if message == MAKE_KV_CACHE_RESIDENT:
                    runner.make_kv_cache_resident()
                else:
                    runner.run_worker_step(message)
    except BaseException as error:
        logger.exception("tensor-parallel worker %d failed", rank)
        try:
            store.set(error_key(rank), f"{type(error).__name__}: {error}")
        except RuntimeError:  # rank 0 (the store) is gone too
            pass
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
