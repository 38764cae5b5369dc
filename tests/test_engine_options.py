"""Engine options have one source, tensorjet.config: `LLM`'s keyword arguments, every command's flags
and the README's table agree with it, and every bad value is refused there, naming the option."""

import argparse
import inspect
import re
import typing
from pathlib import Path

import pytest
import torch

from tensorjet.cli import build_parser
from tensorjet.config import (
    CPU_MAX_NUM_TOKENS,
    DEFAULT_MAX_NUM_TOKENS,
    ENGINE_OPTIONS,
    EngineConfig,
    FeatureNotAvailableError,
    LoadConfig,
)
from tensorjet.engine_args import engine_options, flag_names, options_table
from tensorjet.llm import LLM

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = ("generate", "chat", "serve", "bench", "tune")
# A value of each option type as typed on the command line, and as the engine receives it.
SAMPLE = {int: ("3", 3), float: ("0.5", 0.5), str: ("x", "x"), bool: ("off", False)}


# ---- one source --------------------------------------------------------------------------------------
def test_llm_keyword_arguments_are_exactly_the_engine_options():
    params = list(inspect.signature(LLM).parameters.values())
    assert [p.name for p in params] == list(ENGINE_OPTIONS)
    assert {p.name: p.default for p in params} == {s.name: s.default for s in ENGINE_OPTIONS.values()}
    hints = typing.get_type_hints(LLM.__init__)
    for spec in ENGINE_OPTIONS.values():
        expected = spec.type | None if spec.optional else spec.type
        assert hints[spec.name] == expected, spec.name


def test_llm_hands_every_argument_to_the_config(monkeypatch):
    """Each keyword reaches EngineConfig under its own name (the engine itself is not built)."""
    seen = {}

    def capture(**options):
        seen.update(options)
        raise RuntimeError("stop before loading a model")

    monkeypatch.setattr(EngineConfig, "from_options", staticmethod(capture))
    given = {name: f"value of {name}" for name in ENGINE_OPTIONS}
    with pytest.raises(RuntimeError, match="stop before"):
        LLM(**given)
    assert seen == given


def test_engine_config_is_composed_of_its_parts():
    config = EngineConfig.from_options(max_batch_size=8, block_size=32, device="cpu", seed=7)
    parts = {name: getattr(config, name) for name in ("load", "scheduler", "cache", "runtime")}
    assert parts["scheduler"].max_batch_size == 8 and parts["cache"].block_size == 32
    assert parts["runtime"].device == "cpu" and parts["runtime"].seed == 7
    for spec in ENGINE_OPTIONS.values():  # each option lives in its part, and only there
        owners = [name for name in vars(config) if hasattr(getattr(config, name), spec.name)]
        assert owners == [spec.part], spec.name
    flat = {name: getattr(getattr(config, spec.part), name) for name, spec in ENGINE_OPTIONS.items()}
    assert EngineConfig.from_options(**flat) == config
    assert EngineConfig() == EngineConfig.from_options()


def test_unknown_options_are_refused():
    with pytest.raises(TypeError, match="max_batch"):
        EngineConfig.from_options(max_batch=8)
    with pytest.raises(TypeError):
        LLM(max_batch=8)


def test_readme_table_lists_every_option_with_its_default():
    text = README.read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", text, flags=re.M))
    assert set(rows) == set(ENGINE_OPTIONS)
    for spec in ENGINE_OPTIONS.values():
        default = f'"{spec.default}"' if isinstance(spec.default, str) else str(spec.default)
        assert rows[spec.name] == default, spec.name
    assert options_table() in text, "regenerate the README's table: python -m tensorjet.engine_args"


# ---- command-line flags ------------------------------------------------------------------------------
def command_parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def required_args(command: str) -> list[str]:
    return ["a prompt"] if command == "generate" else []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_every_engine_option_in_both_spellings(command):
    parser = command_parser(command)
    assert engine_options(parser.parse_args(required_args(command))) == {"model": None}
    for spec in ENGINE_OPTIONS.values():
        if spec.name == "model":
            continue
        text, value = SAMPLE[spec.type]
        for flag in flag_names(spec.name):
            args = parser.parse_args([*required_args(command), flag, text])
            assert engine_options(args)[spec.name] == value, (command, flag)
        if spec.type is bool:
            args = parser.parse_args([*required_args(command), f"--{spec.name}"])
            assert engine_options(args)[spec.name] is True


def test_flags_show_the_option_help_and_default():
    help_text = " ".join(command_parser("serve").format_help().split())
    for spec in ENGINE_OPTIONS.values():
        if spec.name != "model":
            assert " ".join(spec.help.split()) in help_text, spec.name
    assert "(default: 256)" in help_text


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_an_unbuilt_feature_on_the_command_line_is_a_clean_error(command, capsys):
    from tensorjet.cli import main

    assert main([command, *required_args(command), "--dtype", "int8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "dtype='int8'" in err and "not available" in err and "Traceback" not in err


# ---- validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, limit",
    [
        ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"max_num_tokens": 0}, "max_num_tokens must be >= 1"),
        ({"max_chunked_prefill_length": 0}, "max_chunked_prefill_length must be >= 1"),
        ({"scheduler_policy": "fastest"}, "scheduler_policy must be one of"),
        ({"block_size": 7}, "block_size must be one of"),
        ({"kv_cache_free_gpu_mem_fraction": 1.5}, r"kv_cache_free_gpu_mem_fraction must be in \(0, 1\]"),
        ({"kv_cache_free_gpu_mem_fraction": 0.0}, r"kv_cache_free_gpu_mem_fraction must be in \(0, 1\]"),
        ({"kv_cache_max_tokens": 8}, r"kv_cache_max_tokens must be at least one block \(16 tokens\)"),
        ({"kv_cache_dtype": "int8"}, "kv_cache_dtype must be 'auto' or one of"),
        ({"max_seq_len": 1}, "max_seq_len must be >= 2"),
        ({"dtype": "float64"}, "dtype must be 'auto' or one of"),
        ({"load_format": "onnx"}, "load_format must be one of"),
        ({"device": "tpu"}, "device must be 'auto', 'cpu' or 'cuda"),
        ({"attention_backend": "flash"}, "attention_backend must be one of"),
        ({"cuda_graph_cache_size": 0}, "cuda_graph_cache_size must be >= 1"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be >= 1"),
        ({"max_batch_size": "8"}, "max_batch_size must be of type int"),
        ({"max_batch_size": True}, "max_batch_size must be of type int"),
        ({"enable_prefix_caching": 1}, "enable_prefix_caching must be of type bool"),
        ({"speculative_model": "[eagle]"}, r"speculative_model must be a draft model or '\[ngram\]'"),
        ({"speculative_model": ""}, r"speculative_model must be a draft model or '\[ngram\]'"),
        ({"num_speculative_tokens": 3}, "num_speculative_tokens needs speculative_model"),
        (
            {"speculative_model": "[ngram]", "num_speculative_tokens": 0},
            r"num_speculative_tokens must be in \[1, 16\]",
        ),
        (
            {"speculative_model": "[ngram]", "num_speculative_tokens": 17},
            r"num_speculative_tokens must be in \[1, 16\]",
        ),
        (
            {"speculative_model": "draft", "speculative_model_quantization": "fp4"},
            r"speculative_model_quantization must be None or one of \('fp8'",
        ),
        (
            {"speculative_model": "[ngram]", "speculative_model_quantization": "fp8"},
            "speculative_model_quantization needs a draft model as speculative_model",
        ),
        ({"speculative_model_quantization": "fp8"}, "speculative_model_quantization needs a draft model"),
        ({"prompt_lookup_min": 0}, "prompt_lookup_min must be >= 1"),
        (
            {"prompt_lookup_min": 3, "prompt_lookup_max": 2},
            "prompt_lookup_max must be >= prompt_lookup_min=3",
        ),
        ({"speculative_disable_by_batch_size": 0}, "speculative_disable_by_batch_size must be >= 1"),
        (
            {"speculative_disable_by_acceptance_rate": 1.5},
            r"speculative_disable_by_acceptance_rate must be in \[0, 1\]",
        ),
        ({"kv_cache_free_gpu_mem_fraction": None}, "kv_cache_free_gpu_mem_fraction must be of type float"),
    ],
)
def test_a_bad_value_names_the_option_and_its_limit(option, limit):
    with pytest.raises(ValueError, match=limit) as info:
        EngineConfig.from_options(**option)
    assert not isinstance(info.value, FeatureNotAvailableError)


def test_a_path_names_the_model_as_a_string_does(tmp_path):
    assert EngineConfig.from_options(model=tmp_path).load.model == str(tmp_path)


def test_an_int_is_a_valid_float():
    config = EngineConfig.from_options(kv_cache_free_gpu_mem_fraction=1)
    assert config.cache.kv_cache_free_gpu_mem_fraction == 1


@pytest.mark.parametrize(
    "option, named",
    [
        ({"dtype": "int8"}, "dtype='int8'"),
        (
            {"speculative_model": "draft", "speculative_model_quantization": "int8"},
            "speculative_model_quantization='int8'",
        ),
        (
            {"batch_invariant": True, "tensor_parallel_size": 2},
            "batch_invariant=True, tensor_parallel_size=2",
        ),
    ],
)
def test_options_of_unbuilt_features_are_refused_by_name(option, named):
    message = f"not available in tensorjet yet \\(option {named}\\)"
    with pytest.raises(FeatureNotAvailableError, match=message):
        EngineConfig.from_options(**option)


def test_max_seq_len_may_not_exceed_the_model_positions():
    assert LoadConfig().resolve_max_seq_len(2048) == 2048
    assert LoadConfig(max_seq_len=512).resolve_max_seq_len(2048) == 512
    assert LoadConfig(max_seq_len=2048).resolve_max_seq_len(2048) == 2048
    with pytest.raises(ValueError, match=r"max_seq_len must be <= the model's 2048 positions.*got 4096"):
        LoadConfig(max_seq_len=4096).resolve_max_seq_len(2048)


def test_cuda_graphs_apply_with_the_triton_backend_only():
    assert EngineConfig().uses_step_graphs("triton")
    assert not EngineConfig().uses_step_graphs("torch")
    assert not EngineConfig.from_options(enable_cuda_graph=False).uses_step_graphs("triton")


def test_the_step_token_budget_defaults_to_the_device_s(monkeypatch):
    """A CPU computes prompt tokens at milliseconds each: its default step keeps streams flowing beside a
    long prompt; a GPU's, and a CPU's without chunked context (whole prompts per step), stay large."""
    cpu = EngineConfig.from_options(device="cpu")
    assert cpu.scheduler.max_num_tokens == CPU_MAX_NUM_TOKENS < DEFAULT_MAX_NUM_TOKENS
    assert cpu.scheduler.chunk_size == CPU_MAX_NUM_TOKENS
    whole_prompts = EngineConfig.from_options(device="cpu", enable_chunked_context=False)
    assert whole_prompts.scheduler.max_num_tokens == DEFAULT_MAX_NUM_TOKENS
    assert EngineConfig.from_options(device="cpu", max_num_tokens=1000).scheduler.max_num_tokens == 1000
    monkeypatch.setattr(EngineConfig, "torch_device", property(lambda self: torch.device("cuda")))
    assert EngineConfig.from_options().scheduler.max_num_tokens == DEFAULT_MAX_NUM_TOKENS
