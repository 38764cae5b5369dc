"""Rank 0's watch over the other tensor-parallel ranks' processes.

Workers that rank 0 spawned are its child processes: an exit shows at once. Workers that torchrun started
(possibly on other nodes) add to a heartbeat counter in the rendezvous store every `HEARTBEAT_INTERVAL`;
one whose counter stands still for `HEARTBEAT_TIMEOUT` (timed on rank 0's clock) counts as gone. A worker
that fails leaves its error in the store, so rank 0 can say why. `watch` reports the first failure once,
from a thread, so a rank 0 stuck in a collective with a dead peer still learns of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import torch.distributed as dist

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 5.0
POLL_INTERVAL = 0.25  # how often the watchdog looks
STARTED_KEY = "tensorjet/started"  # spawned workers count themselves in once their store is up


def error_key(rank: int) -> str:
    return f"tensorjet/error/{rank}"


def heartbeat_key(rank: int) -> str:
    return f"tensorjet/heartbeat/{rank}"


class WorkerGroup:
    """Ranks 1 .. size - 1, seen from rank 0: `processes` where it spawned them, else their heartbeats."""

    def __init__(self, store: dist.Store, size: int, processes: dict[int, BaseProcess] | None = None) -> None:
        self.store = store
        self.size = size
        self.processes = processes or {}
        self._beats: dict[int, tuple[int, float]] = {}  # rank -> (heartbeat count, when it last changed)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pids(self) -> dict[int, int | None]:
        return {rank: process.pid for rank, process in self.processes.items()}

    def wait_started(self, timeout: float) -> None:
        """Until every spawned worker has reached the store; raises RuntimeError if one exits first."""
        deadline = time.monotonic() + timeout
        while self.store.add(STARTED_KEY, 0) < len(self.processes):
            reason = self.failure()
            if reason is not None:
                raise RuntimeError(reason)
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def failure_after_error(self, grace: float = 2.0) -> str | None:
        """Why a worker is gone, waiting up to `grace` s for a spawned one's exit to be seen: a
        collective fails the moment a killed peer's sockets close, a little before its exit code."""
        deadline = time.monotonic() + grace
        while (reason := self.failure()) is None and self.processes and time.monotonic() < deadline:
            time.sleep(0.02)
        return reason

    def failure(self) -> str | None:
        """Why a worker is gone, or None while every one runs."""
        for rank, process in self.processes.items():
            if process.exitcode is not None:
                return self._describe(rank, f"(pid {process.pid}) exited with code {process.exitcode}")
        if self.processes:  # spawned: the processes' states are exact
            return None
        now = time.monotonic()
        for rank in range(1, self.size):
            count = self.store.add(heartbeat_key(rank), 0)
            seen = self._beats.get(rank)
            if seen is None or seen[0] != count:
                self._beats[rank] = (count, now)
            elif now - seen[1] > HEARTBEAT_TIMEOUT:
                return self._describe(rank, f"sent no heartbeat for {HEARTBEAT_TIMEOUT:.0f} s")
        return None

    def _describe(self, rank: int, what: str) -> str:
        message = f"tensor-parallel worker {rank} {what}"
        key = error_key(rank)
        try:
            if self.store.check([key]):
                return f"{message}: {self.store.get(key).decode()}"
        except RuntimeError:  # the store went with it (torchrun's agent store on a dead node)
            pass
        return message

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Call `on_failure(reason)` once, from a watchdog thread, when a worker is gone."""

        def run() -> None:
            while not self._stopping.wait(POLL_INTERVAL):
                try:
                    reason = self.failure()
                except RuntimeError as error:  # the rendezvous store is unreachable
                    reason = f"tensor-parallel workers cannot be reached: {error}"
                if reason is not None:
                    logger.error("%s; the engine stops", reason)
                    on_failure(reason)
                    return

        self._thread = threading.Thread(target=run, name="tensorjet-worker-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching; wait up to `timeout` for spawned workers to exit, then end the rest."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join()


def send_heartbeats(store: dist.Store, rank: int) -> threading.Event:
    """Start adding to this rank's heartbeat counter every HEARTBEAT_INTERVAL; set the event to stop."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(HEARTBEAT_INTERVAL):
            try:
                store.add(heartbeat_key(rank), 1)
            except RuntimeError:  # rank 0's store is gone: so is the engine
                return

    threading.Thread(target=run, name="tensorjet-heartbeat", daemon=True).start()
    return stop
