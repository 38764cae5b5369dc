"""Incremental detokenization with stop-string handling.

Re-decoding a whole output every step costs O(n) per token (O(n^2) per request), so instead -- like vLLM --
only a small window of recent tokens is decoded each step:

    ids:  ... | prefix_offset ........ read_offset ........ len(ids)
                 \\__ already-committed __/ \\__ new tokens __/
                      context tokens

``prefix_text = decode(ids[prefix_offset:read_offset])`` and ``new_text = decode(ids[prefix_offset:])``; the
text contributed by the new tokens is ``new_text[len(prefix_text):]``.  Decoding with some left context makes
tokenizers that render a token differently at the start of a string (e.g. SentencePiece dropping a leading
space) render it as it appears mid-text.  The window is seeded with the last few prompt tokens so the first
output token gets the same treatment.

A byte-level BPE token may hold only part of a multi-byte UTF-8 character; the decode then ends in U+FFFD.
Text up to that trailing replacement run is committed right away, the run itself only once a later token
completes the character (then the window slides forward).  ``output_text`` still shows the not-yet-committed
run, so at every step it equals the full decode of the output so far.

Stop strings are searched in the committed text (only around the newly added part).  The text is cut at the
first point where any stop string is complete (earliest end; on a tie, the longest stop string), which makes
the result independent of how the tokens were batched into ``add_tokens`` calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_REPLACEMENT = "\ufffd"
# How many prompt tokens seed the decode window (vLLM uses 5 as well).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, one step at a time."""

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        if isinstance(stop, str):
            stop = [stop]
        self.stop = [s for s in (stop or ()) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        self._vocab_size = len(tokenizer)
        skipped: set[int] = set()
        if skip_special_tokens:
            # Ids that decode(..., skip_special_tokens=True) drops anyway; filtering them up front keeps the
            # window from growing over runs of tokens that render as nothing.
            skipped.update(getattr(tokenizer, "all_special_ids", None) or ())
            decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
            skipped.update(i for i, t in decoder.items() if getattr(t, "special", False))
        self._skipped_ids = skipped

        # Seed the window with the last few prompt tokens -- unless they end inside a multi-byte character,
        # in which case the output's first bytes could not be rendered as decode(output_ids) renders them.
        seed = self._filter(prompt_token_ids)[-_PROMPT_CONTEXT_TOKENS:]
        if seed and self._decode(seed).endswith(_REPLACEMENT):
            seed = []
        self._ids: list[int] = seed  # window context + every renderable output id (grows; ints are cheap)
        self._prefix_offset = 0
        self._read_offset = len(seed)
        self._prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset]), computed lazily
        self._tail_committed = 0  # chars of the current window's tail already committed
        self._pending = ""  # uncommitted tail: a trailing run of U+FFFD that a later token may complete

        self._text = ""  # committed text (cut at the stop string once one matched)
        self._sent = 0  # chars of output_text handed out by take_delta
        self._stop_matched: str | None = None

    # ---- public API ------------------------------------------------------------------------------
    def add_tokens(self, token_ids: Sequence[int]) -> str | None:
        """Append newly generated ids; return the stop string matched (generation must end) or None.

        Once a stop string has matched, further ids are ignored and the same stop string is returned.
        Ids outside the tokenizer's vocabulary render as the empty string.
        """
        if self._stop_matched is not None:
            return self._stop_matched
        new_ids = self._filter(token_ids)
        if not new_ids:
            return None
        self._ids.extend(new_ids)
        old_len = len(self._text)
        self._decode_step()
        if self.stop and len(self._text) > old_len:
            self._check_stop(old_len)
        return self._stop_matched

    @property
    def output_text(self) -> str:
        """Full text so far (stop string cut off unless include_stop_str_in_output)."""
        return self._text + self._pending

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended generation, or None."""
        return self._stop_matched

    @property
    def finished(self) -> bool:
        """True once a stop string matched."""
        return self._stop_matched is not None

    def take_delta(self, final: bool = False) -> str:
        """Text not yet returned by a previous take_delta (for streaming).

        Text that could still change is held back: the tail that may be the start of a stop string, and an
        incomplete multi-byte character.  Pass ``final=True`` once the sequence has finished (for any reason:
        EOS, length, abort) to release everything; after a stop string matched that happens automatically.
        """
        if final or self._stop_matched is not None:
            text = self.output_text
            end = len(text)
        else:
            text = self._text
            end = len(text) - self._stop_holdback()
        if end <= self._sent:
            return ""
        delta = text[self._sent : end]
        self._sent = end
        return delta

    # ---- internals -------------------------------------------------------------------------------
    def _filter(self, token_ids: Iterable[int]) -> list[int]:
        vocab, skipped = self._vocab_size, self._skipped_ids
        return [t for t in map(int, token_ids) if 0 <= t < vocab and t not in skipped]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_step(self) -> None:
        ids = self._ids
        if self._prefix_text is None:
            self._prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(ids[self._prefix_offset :])
        tail = new_text[len(self._prefix_text) :]
        if tail and not tail.endswith(_REPLACEMENT):
            # Complete: commit and slide the window (the newly read tokens become the next context).
            self._text += tail[self._tail_committed :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(ids)
            self._prefix_text = None
            self._tail_committed = 0
            self._pending = ""
        else:
            # Ends inside a multi-byte character (or renders nothing yet): everything before the trailing
            # replacement run is stable -- commit it; keep the run pending until the character completes.
            stable = len(tail.rstrip(_REPLACEMENT))
            if stable > self._tail_committed:
                self._text += tail[self._tail_committed : stable]
                self._tail_committed = stable
            self._pending = tail[self._tail_committed :]

    def _check_stop(self, old_len: int) -> None:
        text = self._text
        # Nothing matched in text[:old_len], so a match must end after old_len.
        start = max(0, old_len - self._max_stop_len + 1)
        best = None  # (end, -len, stop, index)
        for s in self.stop:
            i = text.find(s, start)
            if i >= 0:
                key = (i + len(s), -len(s))
                if best is None or key < best[0]:
                    best = (key, s, i)
        if best is None:
            return
        _, s, i = best
        self._text = text[: i + len(s)] if self.include_stop_str_in_output else text[:i]
        self._pending = ""
        self._stop_matched = s

    def _stop_holdback(self) -> int:
        """Length of the longest suffix of the committed text that is a proper prefix of a stop string."""
        if not self.stop or self.include_stop_str_in_output:
            # With the stop string included the cut is never before the current end: nothing to hold back.
            return 0
        text = self._text
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
