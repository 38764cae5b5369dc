"""`LLM`: the public entry point, with the TensorRT-LLM guide's option names."""

from __future__ import annotations

import asyncio
import itertools
import queue
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tqdm import tqdm

from tensorjet.config import EngineConfig
from tensorjet.engine.engine_loop import EngineDeadError, EngineLoop
from tensorjet.engine.llm_engine import LLMEngine
from tensorjet.outputs import RequestOutput
from tensorjet.runtime.parallel import run_torchrun_worker, torchrun_rank
from tensorjet.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        load_format: str = "auto",
        dtype: str = "auto",
        quantization: str | None = None,
        max_seq_len: int | None = None,
        max_batch_size: int = 256,
        max_num_tokens: int | None = None,
        enable_chunked_context: bool = True,
        max_chunked_prefill_length: int | None = None,
        scheduler_policy: str = "max_utilization",
        kv_cache_free_gpu_mem_fraction: float = 0.9,
        kv_cache_max_tokens: int | None = None,
        kv_cache_dtype: str = "auto",
        enable_prefix_caching: bool = True,
        block_size: int = 16,
        device: str = "auto",
        attention_backend: str = "auto",
        enable_cuda_graph: bool = True,
        cuda_graph_cache_size: int | None = None,
        disable_overlap_scheduler: bool | None = None,
        seed: int = 0,
        batch_invariant: bool = False,
        tensor_parallel_size: int = 1,
        speculative_model: str | None = None,
        speculative_model_quantization: str | None = None,
        num_speculative_tokens: int | None = None,
        prompt_lookup_min: int = 2,
        prompt_lookup_max: int = 4,
        speculative_disable_by_batch_size: int | None = 32,
        speculative_disable_by_acceptance_rate: float = 0.1,
    ) -> None:
        """One keyword argument per engine option, as tensorjet.config declares them (names, order and
        defaults are tested to match); each is described in the README's options table.

        In a process that torchrun started as a rank other than 0 (RANK > 0), the engine lives in rank 0:
        this process runs its share of the model for rank 0's steps, and exits (SystemExit) when rank 0
        shuts down, so one script or command serves on every rank."""
        options = {name: value for name, value in locals().items() if name != "self"}  # the arguments
        self.config = EngineConfig.from_options(**options)
        launched = torchrun_rank()
        if launched is not None and launched.rank > 0:
            raise SystemExit(run_torchrun_worker(self.config, launched))
        self.loop = EngineLoop(lambda: LLMEngine(self.config))
        self.engine = self.loop.engine
        self._request_ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def failure(self) -> EngineDeadError | None:
        """Why the engine can run no more requests (a tensor-parallel rank is gone); None while it can."""
        return self.loop.failure

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        All prompts are validated before any is queued, so a bad one raises ValueError with nothing
        scheduled, and they reach the engine as one batch: the first step sees all of them.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        results: queue.Queue = queue.Queue()
        ids = [f"gen-{next(self._request_ids)}" for _ in prompt_list]
        self.loop.submit_many(list(zip(ids, prompt_list, params_list)), results.put, stream=False)
        finals: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            try:
                while len(finals) < len(ids):
                    out = results.get()
                    if isinstance(out, BaseException):
                        raise out
                    if out.finished:
                        finals[out.request_id] = out
                        bar.update(1)
            except BaseException:
                for request_id in ids:
                    if request_id not in finals:
                        self.loop.abort(request_id)
                raise
        return [finals[i] for i in ids]

    async def generate_async(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, streaming: bool = True
    ) -> AsyncIterator[RequestOutput]:
        """Yield incremental outputs (`text_diff`/`token_ids_diff` plus totals) as tokens arrive.

        Leaving the iteration early (a closed client) aborts the request and frees its blocks.
        """
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        request_id = f"async-{next(self._request_ids)}"
        self.loop.submit(
            request_id,
            prompt,
            sampling_params or SamplingParams(),
            lambda out: loop.call_soon_threadsafe(updates.put_nowait, out),
            stream=streaming,
        )
        finished = False
        try:
            while not finished:
                out = await updates.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.loop.abort(request_id)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        """The conversation's prompt ids; `tools` (OpenAI function definitions) are rendered where the
        template has a place for them."""
        if not messages:
            raise ValueError("messages must not be empty")
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise ValueError(
                "this model's tokenizer has no chat template; use generate() with a plain prompt"
            )
        ids = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def make_kv_cache_resident(self) -> None:
        """Take the KV cache's whole memory now, as a long-running server does at start: on a CPU the pool
        is otherwise only reserved, and the process's resident memory grows as blocks are first used."""
        self.loop.call(self.engine.make_kv_cache_resident)

    def stats(self) -> dict:
        return self.engine.stats()  # plain counters: a read racing a step is at most one step stale

    def shutdown(self) -> None:
        self.loop.shutdown()
        self.engine.shutdown()


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
    return params
