"""The engine loop: accept requests, schedule a step, run it, turn sampled tokens into outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat

import torch

from tensorjet.calibration.at_load import calibrated_source
from tensorjet.config import EngineConfig
from tensorjet.engine.block_manager import BlockManager
from tensorjet.engine.detokenizer import IncrementalDetokenizer
from tensorjet.engine.proposers import Proposals
from tensorjet.engine.scheduler import ScheduledBatch, Scheduler
from tensorjet.engine.sequence import PLACEHOLDER, Sequence
from tensorjet.engine.speculation import build_speculator, speculation_stats
from tensorjet.engine.structured_output import GrammarCompiler, StepBitmask
from tensorjet.models.llama import max_positions_of
from tensorjet.models.loader import ModelSource, load_tokenizer, resolve_model
from tensorjet.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from tensorjet.runtime.model_runner import ModelRunner
from tensorjet.runtime.parallel import start_model_runner
from tensorjet.runtime.sampler import SamplingRow, TokenBitmask
from tensorjet.runtime.step import PromptLogprobsRequest, StepBatch, StepHandle, StepSequence
from tensorjet.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class NoTextDetokenizer:
    """Stands in when the model has no tokenizer: outputs carry token ids only."""

    output_text = ""

    def add_tokens(self, token_ids: list[int]) -> None:
        return None

    def take_delta(self, final: bool = False) -> str:
        return ""


@dataclass
class LaunchedStep:
    """A step handed to the runner, and what the engine must do with its result."""

    handle: StepHandle
    sampling_seqs: list[Sequence]  # the sequences it samples for, in the handle's order
    token_index: list[int]  # where each one's sampled token goes in its token_ids (a PLACEHOLDER now)
    prompt_logprob_seqs: list[Sequence]  # sequences whose prompt logprobs it computes
    num_drafts: list[int]  # per sampling sequence: the drafts it verifies (empty when nobody drafted)

    @property
    def verifies(self) -> bool:
        return any(self.num_drafts)

    @property
    def must_resolve_before_scheduling(self) -> bool:
        """Penalties read past tokens on the host, and the next prompt-logprob request starts where
        this one's entries end."""
        return bool(self.prompt_logprob_seqs) or any(s.params.needs_token_history for s in self.sampling_seqs)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    arrival_time: float
    stream: bool = True  # an output after every step; False: only once finished
    sent_tokens: list[int] = field(default_factory=list)  # per seq: how many output tokens were reported

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        source = resolve_model(config.load.model, config.load.load_format)
        self.source: ModelSource = calibrated_source(config, source)  # AWQ/GPTQ asked of float weights
        self.tokenizer = load_tokenizer(self.source)
        self.eos_token_ids = self._eos_token_ids()
        self.max_seq_len = config.load.resolve_max_seq_len(max_positions_of(self.source.hf_config))
        # Tensor parallelism: the other ranks start here too, and load their shares with this one.
        self.runner = start_model_runner(config, self.source, self.max_seq_len)
        try:
            self.speculator = build_speculator(config, self.source, self.tokenizer, self.max_seq_len)
            # A draft model's cache shares the target's block tables: one pool of blocks sized for both.
            num_blocks = self.runner.kv_cache_blocks(sum(r.kv_bytes_per_block for r in self.runners))
            for runner in self.runners:
                runner.start(num_blocks)
        except BaseException:
            self.runner.shutdown()  # no tensor-parallel worker is left waiting for this engine
            raise
        self.overlap = config.overlap_scheduling
        self._in_flight: LaunchedStep | None = None  # overlap: the launched step whose tokens are pending
        self.block_manager = BlockManager(
            num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_seq_len)
        self.requests: dict[str, Request] = {}
        self.vocab_size: int = self.source.hf_config.vocab_size
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        self.step_bitmask = StepBitmask(self.vocab_size, self.runner.device)
        # Outputs of the step in flight when a constrained step had it resolved early (`_token_bitmask`).
        self._early_outputs: list[RequestOutput] = []
        self.num_prompt_tokens_computed = 0
        self.num_generated_tokens = 0
        self.num_partial_prefills = 0  # steps in which a prompt was computed only in part (chunked context)
        self.num_steps = 0
        logger.info(
            "tensorjet: model=%s dtype=%s device=%s attention=%s kv_blocks=%d (block_size=%d, %d tokens, %s) "
            "max_seq_len=%d",
            self.source.name,
            config.torch_dtype,
            config.torch_device,
            self.runner.attention_backend,
            self.runner.num_blocks,
            config.cache.block_size,
            self.runner.num_blocks * config.cache.block_size,
            config.kv_cache_torch_dtype,
            self.max_seq_len,
        )

    @property
    def runners(self) -> list[ModelRunner]:
        """Every runner whose KV cache shares the block tables: the target's, then a draft model's."""
        return [self.runner, *(self.speculator.runners if self.speculator else [])]

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        eos = getattr(self.source.hf_config, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
        return ids

    # ---- requests ----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        stream: bool = True,
    ) -> None:
        """Validate and queue a request; a bad one raises ValueError and leaves the engine untouched.

        `stream=False` asks for one output, when the request finishes: offline callers (`generate`)
        need no per-step updates, and building and handing over one per running request each step
        is host time the GPU waits on."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_text, prompt_ids = self.check_prompt(prompt, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs, detoks = [], []
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.runner.device).manual_seed(params.seed + i)
            seq = Sequence(request_id, i, prompt_ids, params, arrival, generator)
            if params.structured_output is not None:
                seq.grammar = self.grammars.matcher(params.structured_output)  # compiled: a cache hit
            seqs.append(seq)
            detoks.append(
                NoTextDetokenizer()
                if self.tokenizer is None
                else IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
            )
        self.requests[request_id] = Request(
            request_id, prompt_text, prompt_ids, params, seqs, detoks, arrival, stream, [0] * params.n
        )
        for seq in seqs:
            self.scheduler.add(seq)

    def check_prompt(self, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenize and validate without queueing: (prompt text or None, prompt token ids). Compiles the
        request's grammar, if it has one, on the caller's thread (the engine's admission reuses it)."""
        text, ids = self._tokenize(prompt)
        self._validate_length(ids, params)
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise ValueError(f"logit_bias token ids must be below the vocabulary size {self.vocab_size}")
        if params.structured_output is not None:
            self.grammars.compile(params.structured_output)
        return text, ids

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer installed: give the prompt as token ids")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty (got an empty list of token ids)")
        vocab = self.source.hf_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return None, ids

    def _validate_length(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if params.stop and self.tokenizer is None:
            raise ValueError(
                "stop strings need a tokenizer, and this model has none installed; use stop_token_ids"
            )
        n = len(prompt_ids)
        if n >= self.max_seq_len:
            raise ValueError(
                f"prompt is {n} tokens long, the maximum sequence length is {self.max_seq_len} "
                "(prompt plus at least one generated token)"
            )
        sched = self.config.scheduler
        if not sched.enable_chunked_context and n > sched.max_num_tokens:
            raise ValueError(
                f"prompt is {n} tokens long, more than max_num_tokens={sched.max_num_tokens}; "
                "enable_chunked_context or raise max_num_tokens"
            )
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        need = min(n + params.max_tokens, self.max_seq_len)
        if need > capacity:
            raise ValueError(
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) needs {need} KV slots, "
                f"more than the whole KV cache holds ({capacity} tokens, kv_cache_max_tokens)"
            )

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish("abort")
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._in_flight is not None

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return an update for every request that produced tokens or finished.

        With overlap scheduling the step is launched and, while the device runs it, the previous
        step's tokens are read back and processed: each sampled token enters its sequence as a
        PLACEHOLDER first (the next step takes its value on the device) and is filled in one step
        later. Without overlap a step is launched and resolved at once.

        While speculating there is no overlap: drafts are proposed from known tokens, and how many a
        step accepts decides where the next one starts, so every step resolves before the next is
        scheduled. Once no sequence may draft (each stopped for low acceptance), steps overlap again."""
        outputs: list[RequestOutput] = []
        speculating = self.speculator is not None and self.speculator.active(
            self.scheduler.running, self.scheduler.waiting
        )
        if self._in_flight is not None and (self._in_flight.must_resolve_before_scheduling or speculating):
            outputs += self._resolve(self._in_flight)
            self._in_flight = None
        batch = self.scheduler.schedule(self.speculator.lookahead if speculating else None)
        if not batch.seqs and self._in_flight is None:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress: the KV cache cannot hold any waiting request")
            return outputs
        launched = None
        if batch.seqs:
            proposals = self.speculator.propose(batch, self._sampling_row) if speculating else None
            launched = self._launch(batch, proposals)
            outputs += self._early_outputs
            self._early_outputs = []
        if self._in_flight is not None:
            outputs += self._resolve(self._in_flight)
        self._in_flight = launched
        if launched is not None and (not self.overlap or launched.verifies):
            outputs += self._resolve(launched)
            self._in_flight = None
        for seq in batch.seqs:  # every token they computed is known now
            if not seq.is_finished:
                self.block_manager.commit_computed_blocks(seq)
        return outputs

    def _launch(self, scheduled: ScheduledBatch, proposals: Proposals | None = None) -> LaunchedStep:
        """Describe the step to the runner (a `StepBatch`), launch it, and append a PLACEHOLDER for
        each sequence it samples for. A sequence's slots past its own tokens hold its drafts."""
        now = time.monotonic()
        step_seqs: list[StepSequence] = []
        sampling_seqs: list[Sequence] = []
        prompt_logprob_seqs: list[Sequence] = []
        num_drafts: list[int] = []
        for seq, n in zip(scheduled.seqs, scheduled.num_new_tokens):
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            start = seq.num_computed_tokens
            end = start + n
            if proposals is not None and end > len(seq):  # slots past its own tokens are for drafts
                end = len(seq)
            if start < seq.num_prompt_tokens:
                self.num_prompt_tokens_computed += min(end, seq.num_prompt_tokens) - start
            samples = end == len(seq)  # its slice reaches its last token: the step samples the next
            if samples:
                sampling_seqs.append(seq)
            else:
                self.num_partial_prefills += 1
            prompt_logprobs = None
            if seq.wants_prompt_logprobs:
                prompt_logprobs = self._prompt_logprobs_request(seq, start, end)
                if prompt_logprobs is not None:
                    prompt_logprob_seqs.append(seq)
            tokens = seq.token_ids[start:end]
            pending = tokens[-1] == PLACEHOLDER
            m = 0
            if proposals is not None and samples:
                m = proposals.num_drafts.get(seq.seq_id, 0)
                num_drafts.append(m)
                if m:
                    drafts = proposals.token_ids[seq.seq_id] if proposals.token_ids else [PLACEHOLDER] * m
                    tokens = tokens + drafts
            sampling = self._sampling_row(seq) if samples else None
            step_seqs.append(
                StepSequence(
                    seq.seq_id, tokens, start, seq.block_table, pending, sampling, prompt_logprobs, m
                )
            )
        prev = None if self._in_flight is None else self._in_flight.handle
        drafts = None if proposals is None else proposals.device
        # The sequences' own state moves on before the launch: a constrained step resolves the step in
        # flight from inside it (`_token_bitmask`), which must find this step's placeholders in place.
        if proposals is None:
            for seq, n in zip(scheduled.seqs, scheduled.num_new_tokens):
                seq.num_computed_tokens += n
        else:
            for seq, n, step_seq in zip(scheduled.seqs, scheduled.num_new_tokens, step_seqs):
                seq.num_computed_tokens += len(step_seq.token_ids)
                if len(step_seq.token_ids) < n:  # fewer drafts than slots: give back the blocks unused
                    self.block_manager.trim(seq, seq.num_computed_tokens + 1)
        token_index = []
        for seq in sampling_seqs:
            token_index.append(len(seq.token_ids))
            seq.token_ids.append(PLACEHOLDER)
        bitmask = None
        if any(seq.grammar is not None for seq in sampling_seqs):
            bitmask = partial(self._token_bitmask, sampling_seqs)
        handle = self.runner.launch(StepBatch(step_seqs, drafts, bitmask), prev)
        self.num_steps += 1
        return LaunchedStep(handle, sampling_seqs, token_index, prompt_logprob_seqs, num_drafts)

    def _token_bitmask(self, sampling_seqs: list[Sequence]) -> TokenBitmask | None:
        """Called by the runner once the step's forward pass is queued: the grammars' masks for its
        constrained sequences. Their last token may be the step in flight's sample, so that step is
        resolved first (its outputs go out with this step's); the device is busy with the forward pass
        meanwhile. Finished sequences' rows are discarded and stay unmasked."""
        if self._in_flight is not None:
            self._early_outputs += self._resolve(self._in_flight)
            self._in_flight = None
        rows = [i for i, seq in enumerate(sampling_seqs) if seq.grammar is not None and not seq.is_finished]
        if not rows:
            return None
        return self.step_bitmask.fill(rows, [sampling_seqs[i].grammar for i in rows])

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        if seq.sampling_row is not None:
            return seq.sampling_row
        params = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            banned = list(params.stop_token_ids) + ([] if params.ignore_eos else sorted(self.eos_token_ids))
        history = params.needs_token_history  # copying every context each step is O(context)
        row = SamplingRow(
            params=params,
            generator=seq.generator,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens] if history else [],
            output_token_ids=seq.output_token_ids if history else [],
            banned_token_ids=banned,
        )
        if not banned and not history:  # the same from now on: build it once
            seq.sampling_row = row
        return row

    @staticmethod
    def _prompt_logprobs_request(seq: Sequence, start: int, end: int) -> PromptLogprobsRequest | None:
        # Position p predicts prompt token p + 1; skip positions recorded before a preemption.
        first = max(start, len(seq.prompt_logprobs) - 1)
        last = min(end, seq.num_prompt_tokens - 1)
        if first >= last:
            return None
        return PromptLogprobsRequest(first, seq.token_ids[first + 1 : last + 1], seq.params.prompt_logprobs)

    def _resolve(self, step: LaunchedStep) -> list[RequestOutput]:
        """Fill in a launched step's tokens (waiting for the device), apply stops, build outputs."""
        result = step.handle.result()
        for seq in step.prompt_logprob_seqs:
            seq.prompt_logprobs += result.prompt_logprobs[seq.seq_id]
        now = time.monotonic()
        touched: dict[str, Request] = {}
        num_drafts = step.num_drafts or repeat(0)
        for seq, index, tokens, logprobs, drafts in zip(
            step.sampling_seqs, step.token_index, result.token_ids, result.logprobs, num_drafts
        ):
            request = self.requests.get(seq.request_id)
            if seq.is_finished or request is None:
                continue  # aborted, or finished by the step before (its extra row is discarded)
            if drafts:
                kept = self._take_verified(request, seq, index, tokens, logprobs, drafts, now)
            else:
                (token,) = tokens  # one token per sequence and step
                seq.token_ids[index] = token
                self._accept_token(request, seq, token, None if logprobs is None else logprobs[0], now)
                kept = 1
            touched[request.request_id] = request
            if seq.is_finished:
                del seq.token_ids[index + kept :]  # a placeholder from the step now in flight
                # Tokens past the finishing one (drafts after a stop) were computed but are not kept.
                seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq.token_ids))
                self.block_manager.commit_computed_blocks(seq)
                self.scheduler.finish(seq)
        outputs = []
        for r in touched.values():
            finished = r.finished
            if r.stream or finished:
                outputs.append(self._make_output(r))
            if finished:
                del self.requests[r.request_id]
        return outputs

    def _take_verified(
        self,
        request: Request,
        seq: Sequence,
        index: int,
        tokens: list[int],
        logprobs: list[TokenLogprobs] | None,
        num_drafts: int,
        now: float,
    ) -> int:
        """A verify step's tokens for `seq` (its accepted drafts, then the token sampled after them): roll
        the cache back past the rejected drafts, then take the tokens one by one until one finishes it.
        Returns how many it kept."""
        num_accepted = len(tokens) - 1
        # The rejected drafts' KV is not the sequence's; the blocks that held only them go back.
        seq.num_computed_tokens -= num_drafts - num_accepted
        self.block_manager.trim(seq, seq.num_computed_tokens + 1)  # + the token sampled after them
        self.speculator.record(seq, num_drafts, num_accepted)
        for kept, token in enumerate(tokens):
            if kept:
                seq.token_ids.append(token)
            else:
                seq.token_ids[index] = token  # the step's placeholder
            self._accept_token(request, seq, token, None if logprobs is None else logprobs[kept], now)
            if seq.is_finished:
                break
        return kept + 1

    def _accept_token(
        self, request: Request, seq: Sequence, token: int, logprobs: TokenLogprobs | None, now: float
    ) -> None:
        self.num_generated_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        params = seq.params
        stop_string = request.detokenizers[seq.index].add_tokens([token])
        # A grammar refuses a token only when nothing it allows could be sampled (min_tokens banning the
        # stop token of a complete match): the text cannot go on within it.
        grammar_done = seq.grammar is not None and (not seq.grammar.accept(token) or seq.grammar.terminated)
        # The sampler bans EOS and stop tokens until min_tokens, so reaching these means it is allowed.
        # The length checks count known tokens only (a later placeholder may already be appended).
        num_known = seq.num_known_tokens
        if token in params.stop_token_ids:
            seq.finish("stop", token)
        elif token in self.eos_token_ids and not params.ignore_eos:
            seq.finish("stop", None)
        elif stop_string is not None:
            seq.finish("stop", stop_string)
        elif grammar_done:
            seq.finish("stop", None)
        elif num_known - seq.num_prompt_tokens >= params.max_tokens or num_known >= self.max_seq_len:
            seq.finish("length")

    def _make_output(self, request: Request) -> RequestOutput:
        completions = []
        for i, (seq, detok) in enumerate(zip(request.seqs, request.detokenizers)):
            out_ids = seq.known_output_token_ids
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=detok.output_text,
                    token_ids=out_ids,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                    text_diff=detok.take_delta(final=seq.is_finished),
                    token_ids_diff=out_ids[request.sent_tokens[i] :],
                )
            )
            request.sent_tokens[i] = len(out_ids)
        seqs = request.seqs
        first_tokens = [s.first_token_time for s in seqs if s.first_token_time is not None]
        metrics = RequestMetrics(
            arrival_time=request.arrival_time,
            first_scheduled_time=min(
                (s.first_scheduled_time for s in seqs if s.first_scheduled_time), default=None
            ),
            first_token_time=min(first_tokens) if first_tokens else None,
            finished_time=max(s.finished_time for s in seqs) if request.finished else None,
            num_cached_prompt_tokens=seqs[0].num_cached_prompt_tokens,
        )
        first = seqs[0]
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            completions,
            request.finished,
            metrics,
            prompt_logprobs=list(first.prompt_logprobs) if first.wants_prompt_logprobs else None,
        )

    # ---- tensor parallelism --------------------------------------------------------------------
    def watch_workers(self, on_failure: Callable[[str], None]) -> None:
        """Tensor parallelism: `on_failure(reason)`, once, from a watchdog thread, when another rank's
        process is gone (the engine cannot step any more)."""
        self.runner.watch_workers(on_failure)

    def worker_failure(self) -> str | None:
        """After a failed step: why another tensor-parallel rank's process is gone, or None."""
        return self.runner.worker_failure()

    def make_kv_cache_resident(self) -> None:
        """Have every KV cache (the target's, a draft model's) take all its memory now (CPU; see
        `ModelRunner.make_kv_cache_resident`)."""
        for runner in self.runners:
            runner.make_kv_cache_resident()

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do in one process)."""
        self.runner.shutdown()

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "weight_format": self.runner.weight_format,
            "weight_bytes": self.runner.weight_bytes,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_block_size": bm.block_size,
            "kv_cache_dtype": str(self.runner.kv_dtype).removeprefix("torch."),
            "kv_cache_usage": bm.num_used_blocks / bm.num_blocks,
            "prefix_cache_queries_tokens": bm.prefix_queries_tokens,
            "prefix_cache_hits_tokens": bm.prefix_hits_tokens,
            "prefix_cache_hit_rate": bm.prefix_hits_tokens / max(bm.prefix_queries_tokens, 1),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_partial_prefills": self.num_partial_prefills,
            "prompt_tokens_computed": self.num_prompt_tokens_computed,
            "generated_tokens": self.num_generated_tokens,
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "num_steps": self.num_steps,
            "num_graph_steps": self.runner.num_graph_steps,
            "num_mixed_graph_steps": self.runner.num_mixed_graph_steps,
            "num_verify_graph_steps": self.runner.num_verify_graph_steps,
            **(self.speculator.stats() if self.speculator else speculation_stats()),
        }
