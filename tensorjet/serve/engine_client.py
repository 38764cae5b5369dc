"""Runs the engine requests behind HTTP requests: the queue limit, submission, one merged stream of
updates per HTTP request, aborting what a departed client left unfinished, and per-request logging and
latency metrics.

Everything that takes the engine lock (submit, abort) runs in a worker thread: the engine holds the
lock for a whole step, and the event loop must keep streaming other clients' tokens meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from tensorjet.engine.engine_loop import EngineDeadError
from tensorjet.outputs import RequestOutput
from tensorjet.sampling_params import SamplingParams
from tensorjet.serve.metrics import ServerMetrics
from tensorjet.serve.options import ServerOptions
from tensorjet.serve.protocol import APIError

logger = logging.getLogger("tensorjet.serve")


class EngineFailure(RuntimeError):
    """The engine failed while running this request (not the client's fault): a 500, or a 503 once the
    engine can run no request at all (a tensor-parallel worker is gone)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Update:
    index: int  # which prompt of the HTTP request
    output: RequestOutput


class EngineClient:
    def __init__(self, llm, metrics: ServerMetrics, options: ServerOptions) -> None:
        self.llm = llm
        self.metrics = metrics
        self.max_queue_size = options.max_queue_size
        self.max_sequences = options.max_sequences
        # Only touched on the event loop thread, so they need no lock: engine requests admitted that have
        # not produced a token yet (waiting or prefilling), and sequences (n per request) not finished.
        self.num_queued = 0
        self.num_sequences = 0

    async def start(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> Generation:
        """Admit and submit every prompt, or none, before anything is sent to the client: raises APIError
        (429) when the queue or the server is full, ValueError for a prompt the engine rejects."""
        self._admit(sum(p.n for p in params))
        generation = Generation(self, request_id, prompts, params)
        try:
            await asyncio.get_running_loop().run_in_executor(None, generation.submit_all, prompts, params)
        except ValueError:
            generation.release()  # submit_all already aborted what got in
            raise
        except EngineDeadError as error:
            generation.close()
            raise EngineFailure(str(error), 503) from error
        except BaseException:
            generation.close()  # cancelled mid-submission: abort what got in
            raise
        return generation

    def _admit(self, sequences: int) -> None:
        if sequences > self.max_sequences:
            raise APIError(
                400,
                f"the request asks for {sequences} sequences (prompts x n), more than this server holds "
                f"at once (max_sequences={self.max_sequences})",
                param="n",
            )
        if self.max_queue_size is not None and self.num_queued >= self.max_queue_size:
            full = f"the request queue is full ({self.num_queued} requests waiting, max_queue_size="
            full += f"{self.max_queue_size})"
        elif self.num_sequences + sequences > self.max_sequences:
            full = f"the server is full ({self.num_sequences} sequences in progress, max_sequences="
            full += f"{self.max_sequences})"
        else:
            return
        self.metrics.requests.labels("rejected").inc()
        raise APIError(429, f"{full}; retry later", type="rate_limit_error", code="queue_full")


class Generation:
    """One HTTP request's engine requests (one per prompt) as one stream of updates."""

    def __init__(
        self, client: EngineClient, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> None:
        self.client = client
        self.request_id = request_id
        self.engine_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self.num_prompt_tokens = sum(map(len, prompts))
        self.latest: dict[int, RequestOutput] = {}
        self._loop = asyncio.get_running_loop()
        self._updates: asyncio.Queue = asyncio.Queue()
        self._queued = set(range(len(prompts)))
        client.num_queued += len(prompts)
        self._params = params
        self._sequences = {i: p.n for i, p in enumerate(params)}  # of prompts not finished
        client.num_sequences += sum(self._sequences.values())
        self._finished: set[int] = set()
        self._start = time.monotonic()
        self._first_token: float | None = None
        self._last_token: dict[tuple[int, int], float] = {}
        self._closed = False

    # ---- engine side (worker and engine threads) -----------------------------------------------
    def submit_all(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        loop = self.client.llm.loop
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                loop.submit(self.engine_ids[i], prompt, p, partial(self._on_output, i))
            except ValueError as error:
                for submitted in self.engine_ids[:i]:
                    loop.abort(submitted)
                raise ValueError(f"prompt {i}: {error}" if len(prompts) > 1 else str(error)) from error

    def _on_output(self, index: int, out: RequestOutput | BaseException) -> None:
        """Engine thread: stamp the arrival time and hand the output to the event loop. Must not raise:
        an exception here would end the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._updates.put_nowait, (index, out, time.monotonic()))
        except RuntimeError:  # the server's event loop is closed (shut down): nobody is listening
            pass

    # ---- event loop side -----------------------------------------------------------------------
    async def updates(self) -> AsyncIterator[Update]:
        """Every update of every prompt, in arrival order, until all are finished."""
        while len(self._finished) < len(self.engine_ids):
            index, out, at = await self._updates.get()
            if isinstance(out, EngineDeadError):
                raise EngineFailure(str(out), 503) from out
            if isinstance(out, BaseException):
                raise EngineFailure(f"the engine failed while running this request: {out}") from out
            self._record(index, out, at)
            yield Update(index, out)

    async def final_outputs(self) -> list[RequestOutput]:
        """Run to the end (non-streaming); the finished outputs in prompt order."""
        try:
            async for _ in self.updates():
                pass
        finally:
            self.close()
        return [self.latest[i] for i in range(len(self.engine_ids))]

    def close(self) -> None:
        """Abort whatever is unfinished (client gone, error) and free its queue slots. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.release()
        unfinished = [rid for i, rid in enumerate(self.engine_ids) if i not in self._finished]
        if unfinished:
            # Fire and forget: never wait for the engine lock here (this may run during cancellation).
            self._loop.run_in_executor(None, self._abort, unfinished)
            self._log_end(time.monotonic(), "aborted")

    def release(self) -> None:
        """Give back the queue slots and sequences of every prompt not finished."""
        self.client.num_queued -= len(self._queued)
        self._queued.clear()
        self.client.num_sequences -= sum(self._sequences.values())
        self._sequences.clear()

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.client.llm.loop.abort(request_id)

    def _record(self, index: int, out: RequestOutput, at: float) -> None:
        metrics = self.client.metrics
        self.latest[index] = out
        if index in self._queued:
            self._queued.discard(index)
            self.client.num_queued -= 1
        if self._first_token is None:
            self._first_token = at
            metrics.first_token(at - self._start)
        for completion in out.outputs:
            if completion.token_ids_diff:
                key = (index, completion.index)
                if key in self._last_token:
                    gap = (at - self._last_token[key]) / len(completion.token_ids_diff)
                    metrics.token_gap(gap)
                self._last_token[key] = at
        if out.finished:
            self._finished.add(index)
            self.client.num_sequences -= self._sequences.pop(index, 0)
            metrics.engine_request_finished(out, self._params[index])
            if len(self._finished) == len(self.engine_ids):
                metrics.request_done(at - self._start)
                self._log_end(at, "finished")

    def _log_end(self, at: float, outcome: str) -> None:
        self.client.metrics.requests.labels(outcome).inc()
        output_tokens = sum(len(c.token_ids) for o in self.latest.values() for c in o.outputs)
        ttft = "-" if self._first_token is None else f"{self._first_token - self._start:.3f}s"
        logger.info(
            "%s %s: tokens in=%d out=%d ttft=%s total=%.3fs",
            self.request_id,
            outcome,
            self.num_prompt_tokens,
            output_tokens,
            ttft,
            at - self._start,
        )
