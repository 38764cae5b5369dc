"""Structured output: the grammar each constrained sequence follows, and the step's token bitmask.

Grammars come from xgrammar (docs/architecture.md says why it and not llguidance). A request's
`StructuredOutput` is compiled once (the compiler caches by spec, so the check on the caller's thread
and the engine's admission share the work); each of its sequences then owns a `GrammarMatcher`, which
advances by every token the sequence keeps. Before a step samples, `StepBitmask.fill` asks every
constrained sequence's matcher, in one batched call that runs on xgrammar's threads, which tokens may
come next; the runtime applies those bits to the logits on the device. The engine calls it once the
step's forward pass is queued, so on a GPU the masks are computed while the device runs the model.
"""

from __future__ import annotations

import json
import re
import threading

import torch

from tensorjet.runtime.sampler import TokenBitmask
from tensorjet.sampling_params import StructuredOutput

# xgrammar's errors start with a timestamp and the C++ source line: not the client's business.
_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class StructuredOutputError(ValueError):
    """A schema, regex, choice list or grammar that cannot be compiled."""


def _error_text(error: Exception) -> str:
    return _ERROR_PREFIX.sub("", str(error).strip().splitlines()[0] if str(error).strip() else repr(error))


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar matching exactly one of `choices` (EBNF string literals escape as JSON's do)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class GrammarCompiler:
    """Compiles constraints for one tokenizer; the vocabulary's index is built on first use (~0.3 s for
    a 49k vocabulary), so engines that never see a constraint never pay for it."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._compiler = None
        self._lock = threading.Lock()

    def _xgrammar(self):
        if self._compiler is None:
            with self._lock:
                if self._compiler is None:
                    import xgrammar

                    if self.tokenizer is None:
                        raise StructuredOutputError("structured output needs the model's tokenizer")
                    # xgrammar reads a transformers tokenizer; tensorjet's own loads one of the same files
                    hf_tokenizer = getattr(self.tokenizer, "transformers_tokenizer", self.tokenizer)
                    info = xgrammar.TokenizerInfo.from_huggingface(
                        hf_tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                    )
                    self._compiler = xgrammar.GrammarCompiler(info)
        return self._compiler

    def compile(self, constraint: StructuredOutput):
        """The compiled grammar (cached by spec); StructuredOutputError says what is wrong with it."""
        compiler = self._xgrammar()
        try:
            if constraint.kind == "json":
                # Compact separators: a model may not pad JSON with whitespace until max_tokens runs out.
                return compiler.compile_json_schema(constraint.spec, any_whitespace=False)
            if constraint.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if constraint.kind == "regex":
                return compiler.compile_regex(constraint.spec)
            if constraint.kind == "choice":
                return compiler.compile_grammar(choice_grammar(constraint.spec))
            return self._compile_grammar(compiler, constraint.spec)
        except StructuredOutputError:
            raise
        except Exception as error:  # xgrammar raises RuntimeError (and subclasses) for bad input
            raise StructuredOutputError(
                f"cannot compile the {_KIND_NAMES[constraint.kind]}: {_error_text(error)}"
            ) from None

    @staticmethod
    def _compile_grammar(compiler, text: str):
        """GBNF/EBNF (vLLM's default grammar syntax) or, failing that, Lark; the EBNF error is the one
        reported when both fail."""
        try:
            return compiler.compile_grammar(text)
        except Exception as ebnf_error:
            try:
                return compiler.compile_lark(text)
            except Exception:
                raise ebnf_error from None

    def matcher(self, constraint: StructuredOutput) -> GrammarState:
        import xgrammar

        return GrammarState(xgrammar.GrammarMatcher(self.compile(constraint)))


_KIND_NAMES = {
    "json": "JSON schema",
    "json_object": "JSON object grammar",
    "regex": "regular expression",
    "choice": "choices",
    "grammar": "grammar",
}


class GrammarState:
    """One sequence's place in its grammar."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it (then nothing changes)."""
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The match is complete and a stop token was accepted: nothing may follow."""
        return self.matcher.is_terminated()


class StepBitmask:
    """Fills one step's token bitmask for its constrained rows, into a host buffer reused every step (page-
    locked on a GPU machine, so the runtime's copy to the device does not wait): the previous step's copy
    is done by then, since its tokens were read back before this fill."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.num_words = -(-vocab_size // 32)
        self.pin = device.type == "cuda"
        self._buffer = torch.empty(0, self.num_words, dtype=torch.int32)
        self._batch = None

    def fill(self, rows: list[int], states: list[GrammarState]) -> TokenBitmask:
        """The bits of `states`' next tokens, for the sampler rows `rows` (one each, same order)."""
        import xgrammar

        if self._batch is None:
            self._batch = xgrammar.BatchGrammarMatcher()
        if self._buffer.shape[0] < len(rows):
            self._buffer = torch.empty(len(rows), self.num_words, dtype=torch.int32, pin_memory=self.pin)
        words = self._buffer[: len(rows)]
        self._batch.batch_fill_next_token_bitmask([s.matcher for s in states], words)
        return TokenBitmask(rows, words)
