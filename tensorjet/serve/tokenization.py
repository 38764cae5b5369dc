"""The tokenizer, run on worker threads: encoding a long text, decoding many ids or applying a chat
template takes from milliseconds to seconds, and on the event loop that would stall every other stream
and /health meanwhile (HF's fast tokenizers release the GIL while they work).

A prompt whose UTF-8 length alone shows it cannot fit the context is refused before it is tokenized."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from jinja2 import TemplateError

from tensorjet.serve.protocol import APIError, ChatMessage

T = TypeVar("T")

# NFC and NFKC normalization compose at most three input characters into one (Hangul jamo).
NORMALIZATION_SLACK = 4
# Fill in the middle as StarCoder-family tokenizers spell it, in prefix-suffix-middle order.
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"


def fim_prompt(tokenizer, prefix: str, suffix: str) -> str | None:
    """The prompt that asks for the text between `prefix` and `suffix`; None when the tokenizer has no
    fill-in-the-middle tokens."""
    vocab = tokenizer.get_vocab()
    if not all(token in vocab for token in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)):
        return None
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"


def max_bytes_per_token(tokenizer) -> int | None:
    """The most input bytes one token can stand for, or None where that is unbounded or unknown.

    A BPE or Unigram vocabulary entry spells what it covers: byte-level BPE one character per byte,
    SentencePiece a space as one 3-byte "▁", a byte fallback as "<0x41>", so the longest entry bounds it
    (times the slack when a normalizer may shorten the input first). WordLevel and WordPiece map any
    unknown word, however long, to one token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ not in ("BPE", "Unigram"):
        return None
    byte_level = type(backend.decoder).__name__ == "ByteLevel"
    longest = max(len(t) if byte_level else len(t.encode()) for t in backend.get_vocab())
    return longest * (1 if backend.normalizer is None else NORMALIZATION_SLACK)


class Tokenization:
    def __init__(self, llm, max_seq_len: int, workers: int = 2) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_seq_len = max_seq_len
        per_token = max_bytes_per_token(self.tokenizer)
        self.max_prompt_bytes = None if per_token is None else per_token * max_seq_len
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tensorjet-tokenize")

    async def prompt(self, text: str, param: str) -> list[int]:
        """A prompt's ids (400 naming `param` when it cannot fit the context whatever its tokens)."""
        self._check_bytes(len(text.encode("utf-8")), param)
        return await self._run(self.tokenizer.encode, text)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._run(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def chat_prompt(
        self, messages: list[ChatMessage], add_generation_prompt: bool, tools: list[dict] | None = None
    ) -> list[int]:
        """A conversation's prompt ids (400 when its text alone cannot fit the context)."""
        self._check_bytes(sum(len(m.text.encode("utf-8")) for m in messages), "messages")
        return await self.chat(messages, add_generation_prompt, tools)

    async def chat(
        self, messages: list[ChatMessage], add_generation_prompt: bool, tools: list[dict] | None = None
    ) -> list[int]:
        """The template renders the tools (OpenAI's function definitions) where it has a place for them."""
        conversation = [m.as_template_message() for m in messages]
        try:
            return await self._run(self.llm.apply_chat_template, conversation, add_generation_prompt, tools)
        except (ValueError, TemplateError, TypeError) as error:
            raise APIError(400, f"cannot apply the chat template: {error}", param="messages") from error

    async def decode(self, ids: list[int]) -> str:
        return await self._run(self.tokenizer.decode, ids)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _check_bytes(self, num_bytes: int, param: str) -> None:
        if self.max_prompt_bytes is not None and num_bytes > self.max_prompt_bytes:
            raise APIError(
                400,
                f"the prompt is {num_bytes} bytes long: more than {self.max_seq_len} tokens whatever they "
                f"are, and the maximum sequence length is {self.max_seq_len}",
                param=param,
            )

    async def _run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))
