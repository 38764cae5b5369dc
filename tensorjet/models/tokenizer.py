"""A model's tokenizer without transformers, where its files say transformers would do no more than run
them: `tokenizers.Tokenizer` over tokenizer.json, the special tokens of tokenizer_config.json and the
chat template rendered with jinja2 (`chat_template`). Importing transformers costs a CPU start ~2 s;
the result is the same token ids and text (tests/test_tokenizer.py holds it to transformers).

That is the case for transformers' own generic class, `TokenizersBackend`, which a GGUF's converted
tokenizer is (`gguf_tokenizer`). Other classes may rebuild the pipeline from the vocabulary, and
other tokenizer_config.json settings change what encode and decode do: those load through
`transformers.AutoTokenizer` (`load_tokenizer` decides).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

FAST_TOKENIZER_CLASS = "TokenizersBackend"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# tokenizer_config.json keys whose effect this class reproduces (the BOS/EOS flags: tokenizer.json's
# post-processor decides, for transformers too; the rest are bookkeeping).
_KNOWN_CONFIG = {
    "backend",
    "tokenizer_class",
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "add_bos_token",
    "add_eos_token",
    "chat_template",
    "clean_up_tokenization_spaces",
    "model_max_length",
    "is_local",
    "local_files_only",
}
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
# apply_chat_template options of transformers' that this class leaves to transformers.
_TRANSFORMERS_CHAT_OPTIONS = {
    "chat_template",
    "continue_final_message",
    "return_dict",
    "return_tensors",
    "return_assistant_tokens_mask",
    "padding",
    "truncation",
    "max_length",
    "tokenizer_kwargs",
    "sanitize_control_tokens",
}


def special_tokens_template(
    tokenizer: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """The post-processor that starts every encoded text with `bos` and ends it with `eos` (None: no
    such token), as transformers builds it."""
    single = f"{f'{bos}:0 ' if bos else ''}$A:0{f' {eos}:0' if eos else ''}"
    pair = f"{single}{f' {bos}:1' if bos else ''} $B:1{f' {eos}:1' if eos else ''}"
    special = [(token, tokenizer.token_to_id(token)) for token in (bos, eos) if token]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def runs_without_transformers(directory: Path) -> bool:
    """Whether `directory`'s tokenizer is one `FastTokenizer` reproduces."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        (directory / "tokenizer.json").is_file()
        and not (directory / "additional_chat_templates").exists()
        and config.get("tokenizer_class") == FAST_TOKENIZER_CLASS
        and set(config) <= _KNOWN_CONFIG
        and not config.get("clean_up_tokenization_spaces", False)
        and all(isinstance(config.get(n), (str, type(None))) for n in (*_NAMED_SPECIAL, "chat_template"))
    )


class FastTokenizer:
    """The parts of transformers' tokenizer API that tensorjet uses, run by `tokenizers` and jinja2.
    Anything else (`tokenizer(text)`, `batch_decode`, ...) is the transformers tokenizer's, loaded on
    first use (`transformers_tokenizer`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        config = json.loads((self.directory / "tokenizer_config.json").read_text())
        self.backend_tokenizer = tokenizers.Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        self.special_tokens_map = {name: config[name] for name in _NAMED_SPECIAL if config.get(name)}
        template_file = self.directory / CHAT_TEMPLATE_FILE
        self.chat_template: str | None = (
            template_file.read_text() if template_file.is_file() else config.get("chat_template")
        )

    # ---- special tokens --------------------------------------------------------------------------
    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self._special_id(name) for name in self.special_tokens_map)
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def added_tokens_decoder(self) -> dict[int, tokenizers.AddedToken]:
        return self.backend_tokenizer.get_added_tokens_decoder()

    # ---- vocabulary ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skipped]

    # ---- text ------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, **options: Any) -> list[int]:
        """Other `options` (truncation, padding, ...) go to transformers; `verbose` (its warning about a
        text longer than the model's maximum, which these files do not state) changes nothing here."""
        options.pop("verbose", None)
        if options:
            return self.transformers_tokenizer.encode(text, add_special_tokens=add_special_tokens, **options)
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **options: Any,
    ) -> str:
        """`clean_up_tokenization_spaces`: transformers skips it for BPE models, as here; for others it
        removes spaces before punctuation and contractions. Other `options` go to transformers."""
        if options:
            return self.transformers_tokenizer.decode(
                token_ids,
                skip_special_tokens=skip_special_tokens,
                clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                **options,
            )
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        bpe = isinstance(self.backend_tokenizer.model, tokenizers.models.BPE)
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces and not bpe else text

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """The conversation's prompt: token ids (`tokenize`) or text. Options beyond rendering one
        conversation (batches, `return_dict`, `continue_final_message`, tools given as functions, ...)
        go to transformers."""
        if (
            self.chat_template is None
            or _TRANSFORMERS_CHAT_OPTIONS & set(kwargs)
            or not isinstance(conversation, list)
            or (conversation and not isinstance(conversation[0], dict))
            or any(not isinstance(tool, dict) for tool in tools or ())
        ):
            return self.transformers_tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                tokenize=tokenize,
                **kwargs,
            )
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation: give at least one message")
        from tensorjet.models.chat_template import render_chat  # jinja2: 0.15 s a start needs only here

        text = render_chat(
            self.chat_template,
            conversation,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- the rest of transformers' API -----------------------------------------------------------
    @cached_property
    def transformers_tokenizer(self):
        """transformers' tokenizer of the same files (xgrammar and the API beyond this class need it)."""
        import transformers

        return transformers.AutoTokenizer.from_pretrained(self.directory)

    def __call__(self, *args, **kwargs):
        return self.transformers_tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("directory", "transformers_tokenizer"):
            raise AttributeError(name)
        return getattr(self.transformers_tokenizer, name)


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`."""
    for spaced, joined in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(spaced, joined)
    return text
