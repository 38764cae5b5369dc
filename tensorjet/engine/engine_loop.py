"""Steps the engine on a background thread so callers (sync, asyncio, the HTTP server) just submit
requests and receive outputs through callbacks. One lock guards the engine; callbacks run on the
engine thread and must only hand the output over (put it on a queue)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tensorjet.engine.llm_engine import LLMEngine
from tensorjet.outputs import RequestOutput
from tensorjet.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput | BaseException], None]


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._callbacks: dict[str, OutputCallback] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, on_output: OutputCallback
    ) -> None:
        """Queue a request; raises ValueError for bad input without disturbing other requests."""
        with self.lock:
            self.engine.add_request(request_id, prompt, params)
            self._callbacks[request_id] = on_output
        self._start()
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.engine.abort_request(request_id)
            self._callbacks.pop(request_id, None)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tensorjet-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            with self.lock:
                if not self.engine.has_unfinished_requests():
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as error:  # never leave callers waiting on a dead loop
                    logger.exception("engine step failed; failing all in-flight requests")
                    self._fail_all(error)
                    continue
                for out in outputs:
                    callback = self._callbacks.get(out.request_id)
                    if callback is not None:
                        callback(out)
                    if out.finished:
                        self._callbacks.pop(out.request_id, None)

    def _fail_all(self, error: Exception) -> None:
        for request_id, callback in list(self._callbacks.items()):
            self.engine.abort_request(request_id)
            callback(error)
        self._callbacks.clear()
