"""A GGUF file's byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2": Llama 3, Qwen2, SmolLM, ...)
written as the HF tokenizer files that transformers makes of it (`AutoTokenizer.from_pretrained(...,
gguf_file=...)` then `save_pretrained`): the same tokenizer.json, special tokens and chat template,
built with the `tokenizers` library alone. Other tokenizer models (sentencepiece "llama", ...) raise
`UnsupportedTokenizer`; the caller converts those through transformers.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from tensorjet.models.tokenizer import CHAT_TEMPLATE_FILE, FAST_TOKENIZER_CLASS, special_tokens_template

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4
# GPT-2's own special token, which transformers' GPT2Tokenizer adds to every byte-level vocabulary.
_GPT2_SPECIAL = "<|endoftext|>"
_NAMED_SPECIAL = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
# How llama.cpp's pre-tokenizer names split text, as regexes (transformers' GGUF_PRE_TOKENIZER_SPLITS).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


class UnsupportedTokenizer(ValueError):
    """The file's tokenizer is not byte-level BPE."""


def write_tokenizer(metadata: dict[str, Any], out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and (if the file has one) chat_template.jinja."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedTokenizer(f"GGUF tokenizer model {model!r} is not byte-level BPE")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or []
    named = {
        name: tokens[metadata[f"tokenizer.ggml.{key}"]]
        for name, key in _NAMED_SPECIAL.items()
        if f"tokenizer.ggml.{key}" in metadata
    }
    tokenizer = _byte_level_bpe(tokens, metadata.get("tokenizer.ggml.merges") or [])
    # The order transformers adds them in: GPT-2's own, the file's control and user-defined tokens, then
    # the named special tokens the file marks as neither.
    tokenizer.add_tokens([AddedToken(_GPT2_SPECIAL, special=True)])
    spelled = set(_bytes_to_unicode().values())
    control = [t for t, kind in zip(tokens, token_types) if kind == _CONTROL and set(t) <= spelled]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tokenizer.get_vocab()
    user_defined = [t for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    split = _PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(named.values()) if t not in added]
    tokenizer.add_tokens([AddedToken(t, special=True) for t in missing])
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and "bos_token" in named
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in named
    tokenizer.post_processor = special_tokens_template(
        tokenizer, named["bos_token"] if add_bos else None, named["eos_token"] if add_eos else None
    )
    tokenizer.save(str(out / "tokenizer.json"))

    config = {"backend": "tokenizers", "tokenizer_class": FAST_TOKENIZER_CLASS, **named}
    if "tokenizer.ggml.add_bos_token" in metadata:
        config["add_bos_token"] = add_bos
    if "tokenizer.ggml.add_eos_token" in metadata:
        config["add_eos_token"] = add_eos
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    if metadata.get("tokenizer.chat_template"):
        (out / CHAT_TEMPLATE_FILE).write_text(metadata["tokenizer.chat_template"])


def _byte_level_bpe(tokens: list[str], merges: list[str]) -> Tokenizer:
    """GPT-2's pipeline over the file's vocabulary, each token in the byte alphabet (GGUF files spell
    some, like spaces in a merged token, as plain text)."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    model = BPE(
        vocab=vocab,
        merges=[tuple(merge.split(" ")) for merge in merges],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters (each byte-level token is spelled in these)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))
