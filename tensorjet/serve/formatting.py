"""Engine outputs -> OpenAI choices. A choice state remembers what it has sent, so the same code gives
each stream chunk (fed every update's diff) and a whole response (fed the final output once)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from pydantic import BaseModel

from tensorjet.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from tensorjet.serve.protocol import (
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    DeltaMessage,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from tensorjet.serve.tools import ToolCallState


def sse(event: BaseModel | dict) -> str:
    """One server-sent event."""
    data = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event)
    return f"data: {data}\n\n"


def usage(outputs: Iterable[RequestOutput], count_generated: bool = True) -> Usage:
    outputs = list(outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs) if count_generated else 0
    cached = sum(o.metrics.num_cached_prompt_tokens for o in outputs)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE vocabularies spell each byte as one printable character (GPT-2's table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return {c: b for b, c in chars.items()}


class TokenText:
    """Each token's text and exact bytes for logprobs, cached (the same ids recur across requests)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_decoder = _gpt2_byte_decoder() if type(decoder).__name__ == "ByteLevel" else None
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self._text:
            self._text[token_id] = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        return self._text[token_id]

    def bytes(self, token_id: int) -> list[int]:
        """The token's own bytes: for a piece of a multi-byte character its text is only U+FFFD."""
        if token_id not in self._bytes:
            self._bytes[token_id] = self._raw_bytes(token_id)
        return self._bytes[token_id]

    def _raw_bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_decoder is not None and piece and all(c in self._byte_decoder for c in piece):
            return [self._byte_decoder[c] for c in piece]
        if piece and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return [int(piece[3:5], 16)]  # SentencePiece byte fallback
        return list(self.text(token_id).encode("utf-8"))


def _ranked(entry: TokenLogprobs) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: -item[1])


class CompletionChoiceState:
    """One /v1/completions choice. With echo the prompt (and its logprobs) comes first; with
    `keep_generated=False` (echo and max_tokens=0) the one token the engine had to generate is dropped."""

    def __init__(
        self,
        index: int,
        tokens: TokenText,
        logprobs: bool,
        echo_text: str | None = None,
        keep_generated: bool = True,
    ) -> None:
        self.index = index
        self.tokens = tokens
        self.logprobs = logprobs
        self.echo_text = echo_text
        self.keep_generated = keep_generated
        self.sent_tokens = 0
        self.text_offset = 0
        self.started = False

    def advance(
        self, out: RequestOutput, completion: CompletionOutput, new_text: str
    ) -> CompletionChoice | None:
        """What is new since the last call (None if nothing); `new_text` is the text diff, or all of it."""
        text, ids, entries = "", [], []
        if not self.started and self.echo_text is not None:
            text = self.echo_text
            ids = list(out.prompt_token_ids)
            entries = list(out.prompt_logprobs or [None] * len(ids))
        self.started = True
        if self.keep_generated:
            end = len(completion.token_ids)
            text += new_text
            ids += completion.token_ids[self.sent_tokens : end]
            entries += (completion.logprobs or [])[self.sent_tokens : end]
            self.sent_tokens = end
        finish = completion.finish_reason if self.keep_generated or not completion.finished else "length"
        if not text and not ids and finish is None:
            return None
        logprobs = self._logprobs(ids, entries) if self.logprobs else None
        return CompletionChoice(index=self.index, text=text, logprobs=logprobs, finish_reason=finish)

    def _logprobs(self, ids: list[int], entries: list[TokenLogprobs | None]) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for token_id, entry in zip(ids, entries):
            token = self.tokens.text(token_id)
            result.tokens.append(token)
            result.text_offset.append(self.text_offset)
            self.text_offset += len(token)
            result.token_logprobs.append(None if entry is None else entry.get(token_id))
            result.top_logprobs.append(None if entry is None else self._top(entry))
        return result

    def _top(self, entry: TokenLogprobs) -> dict[str, float]:
        """The top-k and the chosen token by text (on a clash of texts the likelier one stays)."""
        top: dict[str, float] = {}
        for token_id, logprob in _ranked(entry):
            top.setdefault(self.tokens.text(token_id), logprob)
        return top


class ChatChoiceState:
    """One /v1/chat/completions choice; its first chunk carries the assistant role. With tools, its text
    goes through a `ToolCallState`, which makes it content and tool calls."""

    def __init__(
        self, index: int, tokens: TokenText, top_logprobs: int | None, tools: ToolCallState | None = None
    ) -> None:
        self.index = index
        self.tokens = tokens
        self.top_logprobs = top_logprobs  # None: no logprobs
        self.tools = tools
        self.sent_tokens = 0
        self.started = False

    def advance(self, completion: CompletionOutput, new_text: str) -> ChatStreamChoice | None:
        end = len(completion.token_ids)
        ids = completion.token_ids[self.sent_tokens : end]
        entries = (completion.logprobs or [])[self.sent_tokens : end]
        self.sent_tokens = end
        first = not self.started
        self.started = True
        content, tool_calls = new_text, None
        finish = completion.finish_reason
        if self.tools is not None:
            piece = self.tools.advance(new_text, completion.finished)
            content, tool_calls = piece.content, piece.tool_calls
            if finish == "stop" and self.tools.num_calls and self.tools.mode != "named":
                finish = "tool_calls"
        if not first and not content and not tool_calls and not ids and finish is None:
            return None
        return ChatStreamChoice(
            index=self.index,
            delta=DeltaMessage(role="assistant" if first else None, content=content, tool_calls=tool_calls),
            logprobs=self._logprobs(ids, entries),
            finish_reason=finish,
        )

    def _logprobs(self, ids: list[int], entries: list[TokenLogprobs]) -> ChatLogprobs | None:
        if self.top_logprobs is None:
            return None
        content = []
        for token_id, entry in zip(ids, entries):
            top = [self._top_logprob(t, lp) for t, lp in _ranked(entry)[: self.top_logprobs]]
            chosen = self._top_logprob(token_id, entry[token_id])
            content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=content)

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(
            token=self.tokens.text(token_id), logprob=logprob, bytes=self.tokens.bytes(token_id)
        )
