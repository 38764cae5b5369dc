"""Steps the engine on a background thread so callers (sync, asyncio, the HTTP server) just submit
requests and receive outputs through callbacks. The same thread builds the engine, and any other work
on it runs there too (`call`): torch's CPU kernels parallelize through OpenMP, which gives each thread
that starts parallel work a team of worker threads of its own, and with two teams alive it manages more
threads than there are cores and stops spinning between parallel regions (libgomp's throttling). A
batch-1 step of the bundled model on 2 cores took 36 ms on another thread than the one that had loaded
the model, 18 ms on the same one.

Callers never wait for a step: `submit` validates the request on the caller's thread (raising
ValueError at once for bad input) and hands it over through a queue that the engine thread drains
before every step. Callbacks run on the engine thread and must only hand the output over.

A tensor-parallel engine whose other ranks are gone cannot step again: the loop then fails for good
(`fail`, `failure`): every pending request ends with an `EngineDeadError`, and so does every later
submission. A worker watchdog may call `fail` while the engine thread is stuck in a collective.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

from tensorjet.engine.llm_engine import LLMEngine
from tensorjet.outputs import RequestOutput
from tensorjet.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput | BaseException], None]
T = TypeVar("T")


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic cyclic collection while an engine is built: its ~40k long-lived objects would set off
    a full pass over the whole heap (0.08 s of a CPU start) that frees nothing, and `EngineLoop` freezes
    them at the end anyway."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class EngineDeadError(RuntimeError):
    """The engine cannot run steps any more (a tensor-parallel rank is gone); no request can finish."""


class EngineLoop:
    """Runs one built engine. While it runs, the heap that existed when it started (modules, weight
    wrappers, tokenizer: ~300k objects) is frozen out of the cyclic garbage collector's sight: a full
    collection traverses every tracked object, and with that heap in it one took 154 ms (2-core CPU
    machine), a pause between steps that the GPU spends idle. Requests and sequences created later are
    collected as usual; `shutdown` unfreezes (every frozen object: the freeze is per process), so a
    dropped engine's reference cycles can be freed: the next engine collects them before it freezes.
    The first engine of a process has nothing of the kind to collect (20 unreachable objects at the
    bundled model's start) and skips that full collection, 0.14 s of a CPU start."""

    # Whether an engine's shutdown handed its heap back to the collector since the last freeze.
    _heap_returned = False

    def __init__(self, build: Callable[[], LLMEngine]) -> None:
        """Builds the engine with `build` on the engine thread (its exception is raised here)."""
        # ("add", [(id, prompt, params, callback, stream), ...]), ("abort", id) and ("call", fn, future)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._callbacks: dict[str, OutputCallback] = {}
        self._stopping = False
        self.failure: EngineDeadError | None = None  # set once the engine can no longer step
        self.engine: LLMEngine
        built: Future = Future()
        self._thread = threading.Thread(
            target=self._main, args=(build, built), name="tensorjet-engine", daemon=True
        )
        with collector_paused():  # (for the whole process: the engine thread's allocations too)
            self._thread.start()
            built.result()  # the engine (`self.engine`, set by the engine thread), or its build's exception
            if EngineLoop._heap_returned:
                gc.collect()
                EngineLoop._heap_returned = False
            gc.freeze()
        self.engine.watch_workers(lambda reason: self.fail(EngineDeadError(f"the engine stopped: {reason}")))

    def _main(self, build: Callable[[], LLMEngine], built: Future) -> None:
        try:
            self.engine = build()
        except BaseException as error:  # handed to the constructor, which raises it
            built.set_exception(error)
            return
        built.set_result(None)
        self._run()

    def submit(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        on_output: OutputCallback,
        stream: bool = True,
    ) -> None:
        """Queue a request; raises ValueError for bad input without disturbing other requests.
        `stream=False`: `on_output` gets the finished output only."""
        self.submit_many([(request_id, prompt, params)], on_output, stream)

    def submit_many(
        self,
        requests: list[tuple[str, str | list[int], SamplingParams]],
        on_output: OutputCallback,
        stream: bool = True,
    ) -> None:
        """Queue several requests as one message, so the engine adds them all before its next step:
        an offline batch is scheduled the same way every run, not split by how fast it was submitted.
        Raises ValueError for bad input, with none of them queued."""
        if self.failure is not None:
            raise EngineDeadError(str(self.failure))
        for _, prompt, params in requests:
            self.engine.check_prompt(prompt, params)
        self._inbox.put(("add", [(*request, on_output, stream) for request in requests]))
        if self.failure is not None:  # failed meanwhile: nobody may drain the inbox any more
            self._fail_pending(self.failure)
            return
        self._wake.set()

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` run on the engine thread between steps; its result, or its exception raised here."""
        if self.failure is not None:
            raise EngineDeadError(str(self.failure))
        done: Future = Future()
        self._inbox.put(("call", fn, done))
        if self.failure is not None:
            self._fail_pending(self.failure)
        self._wake.set()
        return done.result()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        gc.unfreeze()
        EngineLoop._heap_returned = True

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "abort":
                self.engine.abort_request(message[1])
                self._callbacks.pop(message[1], None)
                continue
            if message[0] == "call":
                _, fn, done = message
                try:
                    done.set_result(fn())
                except Exception as error:
                    done.set_exception(error)
                continue
            for request_id, prompt, params, callback, stream in message[1]:
                try:
                    self.engine.add_request(request_id, prompt, params, stream=stream)
                except ValueError as error:  # e.g. a duplicate id: only this request fails
                    callback(error)
                    continue
                self._callbacks[request_id] = callback

    def fail(self, error: EngineDeadError) -> None:
        """Stop for good: every pending request and every later submission gets `error`. Any thread may
        call it; it never touches the engine (whose thread may be stuck in a collective)."""
        if self.failure is not None:
            return
        self.failure = error
        self._fail_pending(error)
        self._wake.set()

    def _fail_pending(self, error: EngineDeadError) -> None:
        while True:  # requests submitted but not yet taken in by the engine thread
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if message[0] == "add":
                for *_, callback, _stream in message[1]:
                    callback(error)
            elif message[0] == "call":
                message[2].set_exception(error)
        for request_id in list(self._callbacks):
            callback = self._callbacks.pop(request_id, None)
            if callback is not None:
                callback(error)

    def _run(self) -> None:
        while not self._stopping and self.failure is None:
            self._wake.wait()
            self._wake.clear()
            self._drain_inbox()
            while self.engine.has_unfinished_requests() and not self._stopping and self.failure is None:
                try:
                    outputs = self.engine.step()
                except Exception as error:  # never leave callers waiting on a dead loop
                    logger.exception("engine step failed; failing all in-flight requests")
                    if self.engine.config.parallel.tensor_parallel_size > 1:
                        # The ranks may now disagree on which collectives ran: no step can follow.
                        reason = self.engine.worker_failure() or f"a tensor-parallel step failed: {error}"
                        self.fail(EngineDeadError(f"the engine stopped: {reason}"))
                        break
                    self._fail_all(error)
                    break
                for out in outputs:
                    self._deliver(out)
                self._drain_inbox()
        if self.failure is not None:  # what this thread took in while the failure was reported
            self._fail_pending(self.failure)

    def _deliver(self, out: RequestOutput) -> None:
        callback = self._callbacks.get(out.request_id)
        if out.finished:
            self._callbacks.pop(out.request_id, None)
        if callback is None:
            return
        try:
            callback(out)
        except Exception:  # a caller that went away (closed event loop) must not stop the engine
            logger.exception("output callback for %s failed; aborting that request", out.request_id)
            self.engine.abort_request(out.request_id)
            self._callbacks.pop(out.request_id, None)

    def _fail_all(self, error: Exception) -> None:
        for request_id, callback in list(self._callbacks.items()):
            self.engine.abort_request(request_id)
            callback(error)
        self._callbacks.clear()
