"""Engine options for people: command-line flags for every command that builds an engine, and the
README's options table. Both come from `ENGINE_OPTIONS`; the values are checked by `EngineConfig`.

`python -m tensorjet.engine_args` prints the README's table.
"""

from __future__ import annotations

import argparse

from tensorjet.config import ENGINE_OPTIONS, OptionSpec

# Options that are not `add_engine_args` flags: each command places the model itself (a positional
# argument of `serve`, `--model` elsewhere).
_NOT_FLAGS = {"model"}


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def flag_names(name: str) -> list[str]:
    """The guide's spelling (`--max_batch_size`) and the dashed one (`--max-batch-size`)."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per engine option; booleans work bare (`--enable_chunked_context`) or with a value.
    Every default is None, so an unset flag leaves the option to EngineConfig."""
    group = parser.add_argument_group("engine options")
    for spec in ENGINE_OPTIONS.values():
        if spec.name in _NOT_FLAGS:
            continue
        help_text = f"{spec.help} (default: {default_text(spec)})".replace("%", "%%")
        if spec.type is bool:
            group.add_argument(
                *flag_names(spec.name),
                dest=spec.name,
                type=parse_bool,
                nargs="?",
                const=True,
                default=None,
                help=help_text,
            )
        else:
            group.add_argument(*flag_names(spec.name), dest=spec.name, type=spec.type, help=help_text)


def engine_options(args: argparse.Namespace) -> dict:
    """The engine options the user set (unset flags keep the LLM defaults)."""
    options = {k: v for k, v in vars(args).items() if k in ENGINE_OPTIONS and k != "model" and v is not None}
    options["model"] = getattr(args, "model", None)
    return options


def default_text(spec: OptionSpec) -> str:
    return f'"{spec.default}"' if isinstance(spec.default, str) else str(spec.default)


def options_table() -> str:
    """The README's options table, in Markdown."""
    lines = ["| option | default | meaning |", "| --- | --- | --- |"]
    for spec in ENGINE_OPTIONS.values():
        lines.append(f"| `{spec.name}` | `{default_text(spec)}` | {spec.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(options_table(), end="")
