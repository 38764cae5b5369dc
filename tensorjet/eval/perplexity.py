"""Perplexity of a text through the engine, measured as llama.cpp's `llama-perplexity` measures it.

The text is tokenized once, with no special tokens, and cut into non-overlapping windows of
`context_len` tokens (the tail that does not fill a window is left out). A model whose tokenizer
starts every text with BOS (llama.cpp's `add_bos`) gets it in every window, in place of the window's
first token, as llama.cpp does; the window still holds `context_len` positions and its first token is
never scored. Each window is scored only after position `first = int(score_from * context_len)`, so
every scored token sees more than `first` tokens of context; the default 0.5 is llama.cpp's choice
(255 scored tokens per 512-token window).

All windows go to `LLM.generate` as one batch of token-id prompts asking for one generated token and
the log-probability of every prompt token, so the numbers are those of the engine as configured
(weight dtype, KV-cache dtype, kernels) and in-flight batching does the work.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from tensorjet.sampling_params import SamplingParams

if TYPE_CHECKING:  # the engine loads only when a command runs, not for `tensorjet --help`
    from tensorjet.llm import LLM

DEFAULT_CONTEXT_LEN = 512
DEFAULT_SCORE_FROM = 0.5


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float  # exp(nll)
    perplexity_stderr: float  # estimated standard error of the perplexity (as llama.cpp estimates it)
    nll: float  # mean negative log-likelihood of a scored token, in nats
    num_scored_tokens: int
    num_windows: int
    context_len: int
    first_scored_position: int  # positions after this one are scored in every window
    add_bos: bool
    num_text_tokens: int  # tokens of the (possibly cut) text, including the tail left out of any window
    seconds: float  # wall time of the engine run (tokenization not included)
    tokens_per_second: float  # window tokens the engine processed per second
    # -log p of each scored token, in window order: two runs over the same text compare token by token.
    token_nlls: tuple[float, ...] = field(repr=False)

    def to_dict(self) -> dict:
        """The summary numbers (token_nlls left out)."""
        numbers = asdict(self)
        del numbers["token_nlls"]
        return numbers

    def summary(self) -> str:
        return (
            f"perplexity: {self.perplexity:.4f} +/- {self.perplexity_stderr:.4f} "
            f"(nll {self.nll:.6f} nats/token) over {self.num_scored_tokens} scored tokens: "
            f"{self.num_windows} windows of {self.context_len} tokens, scored after position "
            f"{self.first_scored_position}, {'with' if self.add_bos else 'no'} BOS; "
            f"{self.tokens_per_second:.1f} tokens/s ({self.seconds:.1f} s)"
        )


def first_scored_position(context_len: int, score_from: float) -> int:
    """The position after which each window is scored; raises ValueError naming the bad parameter."""
    if context_len < 2:
        raise ValueError(
            f"context_len must be >= 2 (a window scores tokens after its first), got {context_len}"
        )
    if not 0.0 <= score_from < 1.0:
        raise ValueError(f"score_from must be in [0, 1), got {score_from}")
    first = int(score_from * context_len)
    if first >= context_len - 1:
        raise ValueError(
            f"score_from={score_from} leaves no token to score in a window of context_len={context_len} "
            f"(it must be below {(context_len - 1) / context_len:.4f})"
        )
    return first


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every encoded text with BOS: the model was trained to see it first."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer.encode("a", add_special_tokens=True)
    return with_special[:1] == [bos] and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos]


def windows_of(token_ids: list[int], context_len: int, bos_token_id: int | None) -> list[list[int]]:
    """Non-overlapping windows of `context_len` tokens; with a BOS, it replaces each window's first token."""
    windows = []
    for start in range(0, len(token_ids) - context_len + 1, context_len):
        window = token_ids[start : start + context_len]
        if bos_token_id is not None:
            window[0] = bos_token_id
        windows.append(window)
    return windows


def perplexity(
    llm: LLM,
    text: str,
    context_len: int = DEFAULT_CONTEXT_LEN,
    score_from: float = DEFAULT_SCORE_FROM,
    max_chars: int | None = None,
    add_bos: bool | None = None,
    use_tqdm: bool = True,
) -> PerplexityResult:
    """The engine's perplexity on `text` (its first `max_chars` characters when given).

    `add_bos` None follows the tokenizer (BOS per window when it adds one to every text). Raises
    ValueError, naming the parameter and its limit, for an empty text, a text shorter than one window,
    or a window the engine cannot hold (`context_len` must leave room in max_seq_len for the one
    generated token).
    """
    first = first_scored_position(context_len, score_from)
    if max_chars is not None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        text = text[:max_chars]
    if not text.strip():
        raise ValueError("the text is empty: nothing to score")
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer installed: perplexity needs one to read the text")
    max_seq_len = llm.engine.max_seq_len
    if context_len >= max_seq_len:
        raise ValueError(
            f"context_len must be at most {max_seq_len - 1} (the engine's max_seq_len {max_seq_len}, less "
            f"the one generated token each window asks for), got {context_len}"
        )
    use_bos = tokenizer_adds_bos(tokenizer) if add_bos is None else add_bos
    if use_bos and tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True, but this model's tokenizer has no BOS token")
    token_ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    windows = windows_of(token_ids, context_len, tokenizer.bos_token_id if use_bos else None)
    if not windows:
        raise ValueError(
            f"the text is {len(token_ids)} tokens long, shorter than one window of context_len={context_len} "
            "tokens: give more text (max_chars) or a smaller context_len"
        )

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    start = time.perf_counter()
    outputs = llm.generate(windows, params, use_tqdm=use_tqdm)
    seconds = time.perf_counter() - start

    # Sums in float64 over every scored token, as llama.cpp accumulates nll and nll^2.
    nlls = []
    for window, out in zip(windows, outputs):
        entries = out.prompt_logprobs
        nlls.extend(-entries[pos][window[pos]] for pos in range(first + 1, context_len))
    count = len(nlls)
    mean_nll = math.fsum(nlls) / count
    variance = math.fsum(x * x for x in nlls) / count - mean_nll * mean_nll
    ppl = math.exp(mean_nll)
    # The delta method on exp(mean nll), treating the scored tokens as independent (llama.cpp's estimate).
    stderr = ppl * math.sqrt(variance / (count - 1)) if count > 1 and variance > 0 else 0.0
    return PerplexityResult(
        perplexity=ppl,
        perplexity_stderr=stderr,
        nll=mean_nll,
        num_scored_tokens=count,
        num_windows=len(windows),
        context_len=context_len,
        first_scored_position=first,
        add_bos=use_bos,
        num_text_tokens=len(token_ids),
        seconds=seconds,
        tokens_per_second=len(windows) * context_len / seconds,
        token_nlls=tuple(nlls),
    )
