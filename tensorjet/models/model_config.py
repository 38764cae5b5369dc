"""A config.json read as attributes, without transformers' config classes (importing those costs a CPU
start ~2.5 s: they pull in torch.distributed's tensor package). For config files that state every
field the model reads, as a GGUF's converted config does (`gguf_convert.hf_config`); an HF
directory's config.json may leave fields to the config class's defaults and goes through
`transformers.AutoConfig`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ModelConfig:
    """Read-only: `config.hidden_size`, `getattr(config, "head_dim", None)`, `config.to_dict()`, as on a
    transformers config."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__["_values"] = dict(values)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        return cls(json.loads(Path(path).read_text()))

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"config has no {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ModelConfig is read-only")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"ModelConfig({self._values!r})"
