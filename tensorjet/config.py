"""Engine options: one dataclass per concern, composed into `EngineConfig`.

Each option is declared once, as a field of its part (name, type, default, help). `ENGINE_OPTIONS`
lists them all, flat, with the guide's names; `LLM(...)`'s keyword arguments, the command-line flags
and the README's options table come from it. Every check of an option's value lives here, and each
error names the option and its limit.

The parts hold the values as given; `EngineConfig` resolves the "auto"s (device, dtype, overlap) and
fills in the defaults that depend on the device (the step's token budget).
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, get_type_hints

import torch

SCHEDULER_POLICIES = ("max_utilization", "guaranteed_no_evict", "static_batch")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Quantized weight formats, by the `quantization` option's value. `dtype` may name one too (the guide's
# `dtype="fp8"`, `dtype="int4_awq"`): the model's activations then stay in the default dtype and its
# linear layers run that format.
QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "gguf")
QUANTIZED_DTYPES = {"fp8": "fp8", "int4_awq": "awq", "int4_gptq": "gptq"}  # dtype -> quantization
# Quantized dtypes the guide names whose capability is not built yet.
UNAVAILABLE_QUANTIZED_DTYPES = ("int8",)
UNAVAILABLE_QUANTIZATION_METHODS = ("int8",)
# dtypes whose activations `quantization="gguf"` runs with.
GGUF_ACTIVATION_DTYPES = ("float32", "fp32", "bfloat16", "bf16")
LOAD_FORMATS = ("auto", "dummy", "safetensors", "gguf", "pt")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
BLOCK_SIZES = (8, 16, 32, 64, 128)
# KV-cache element types besides "auto" (the model dtype). FP8 E4M3 halves the bytes every decode
# step reads; values are stored unscaled (scale 1.0, as vLLM does without calibrated scales) and
# saturate at +-448.
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
# Speculative decoding: `speculative_model` names a draft model or this method (vLLM's spelling).
NGRAM = "[ngram]"
DEFAULT_SPECULATIVE_TOKENS = 5
MAX_SPECULATIVE_TOKENS = 16
# A sequence's acceptance rate is judged over its last ACCEPTANCE_WINDOW verify steps, from the
# MIN_ACCEPTANCE_STEPS-th on.
ACCEPTANCE_WINDOW = 8
MIN_ACCEPTANCE_STEPS = 4
# Documented default KV budget on CPU, where there is no "free GPU memory" to take a fraction of.
CPU_KV_CACHE_BYTES = 2 * 1024**3
# Default step token budgets (max_num_tokens). A CPU computes a few hundred prompt tokens a second
# (the bundled model on 2 cores: 1 to 2 ms a token; docs/performance.md), so a 4096-token step of prompt
# chunks would hold every streaming request for seconds; 512 keeps a step near half a second there,
# where 128 cost a prompt token about 1.5x as much (smaller products, each step's fixed costs). (llama.cpp
# computes prompts in micro-batches of 512 by default, and its server takes up to 2048 tokens a step.)
# Without chunked context a step must hold whole prompts, and keeps the larger budget.
DEFAULT_MAX_NUM_TOKENS = 4096
CPU_MAX_NUM_TOKENS = 512


class FeatureNotAvailableError(NotImplementedError, ValueError):
    """An option that belongs to a capability tensorjet has not built yet."""


def not_available(feature: str, option: str) -> FeatureNotAvailableError:
    return FeatureNotAvailableError(
        f"{feature} is not available in tensorjet yet (option {option}); "
        "remove the option to run unquantized bf16/fp32 on one device"
    )


def _fail(name: str, value: object, rule: str) -> ValueError:
    return ValueError(f"option {name} {rule}, got {value!r}")


def check_quantization_method(name: str, method: str | None) -> None:
    """A weight-format option (`quantization` or the draft's): None, or a method that is built."""
    if method in UNAVAILABLE_QUANTIZATION_METHODS:
        raise not_available(f"{method} quantization", f"{name}={method!r}")
    if method is not None and method not in QUANTIZATION_METHODS:
        raise _fail(name, method, f"must be None or one of {QUANTIZATION_METHODS}")


def option(default: Any, help: str) -> Any:
    """A field that is an engine option; `help` is its line in `--help` and in the README."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class OptionSpec:
    name: str
    part: str  # the EngineConfig attribute (a part) that owns it
    type: type  # int, float, str or bool
    optional: bool  # whether None is allowed
    default: Any
    help: str


class _Part:
    """Base of the parts: checks every field's type, then the part's own rules (`validate`)."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), *_base_type(hints[f.name]))
        self.validate()

    def validate(self) -> None:
        pass


def _base_type(hint: Any) -> tuple[type, bool]:
    """(int | float | str | bool, whether None is allowed) of a field's annotation."""
    if isinstance(hint, types.UnionType):
        args = [a for a in hint.__args__ if a is not type(None)]
        return args[0], len(args) < len(hint.__args__)
    return hint, False


def _check_type(name: str, value: object, kind: type, optional: bool) -> None:
    if value is None:
        if not optional:
            raise _fail(name, value, f"must be of type {kind.__name__}")
        return
    allowed = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, allowed):
        raise _fail(name, value, f"must be of type {kind.__name__}")


@dataclass
class LoadConfig(_Part):
    """What to load and how: the checkpoint, its weight format and dtype, and its longest sequence."""

    model: str | None = option(
        None, "local HF dir, `.gguf` file, cached hub id, or a dummy preset; default: the bundled model"
    )
    load_format: str = option(
        "auto", "`auto`, `safetensors`, `gguf`, `pt`, or `dummy`: random weights with the real shapes"
    )
    dtype: str = option(
        "auto",
        "`auto` (bf16 on GPU; fp32 on CPU, where a GGUF file with Q4_0/Q4_1 linear layers runs them as "
        "`quantization=gguf`), `float32` (on a GGUF file: its fp32 dequantization), `bfloat16`, `float16`, "
        "or a weight format with the default activation dtype: `fp8` (the same as `quantization=fp8`), "
        "`int4_awq` (`quantization=awq`), `int4_gptq` (`quantization=gptq`); `int8` is not available yet "
        "(error)",
    )
    quantization: str | None = option(
        None,
        "`fp8`: FP8 (E4M3) W8A8 linear layers, quantized at load (per-channel weights, dynamic per-token "
        "activations) unless the checkpoint is already FP8; `awq` / `gptq`: INT4 weight-only (W4A16) "
        "linear layers from a pre-quantized checkpoint (AutoAWQ GEMM, GPTQ, or compressed-tensors W4A16 as "
        "llmcompressor writes it), or calibrated with that method as a float checkpoint loads (the "
        "shipped calibration text, group 128; cached on disk for the next load); random INT4 weights "
        "with `load_format=dummy`; `gguf` (CPU only): a GGUF "
        "file's Q4_0/Q4_1 linear layers run as their blocks, PyTorch's CPU int4 kernel (groups of 32, bf16 "
        "activations into the product), and its LM head as int8 rows; default: the checkpoint's own format "
        "(`quantization_config` in config.json), `gguf` for such a GGUF file on the CPU with `dtype=auto`, "
        "else unquantized. Embeddings and (but for `gguf`) the LM head stay in the model dtype",
    )
    max_seq_len: int | None = option(
        None,
        "cap on prompt + output length; default: the model's positions (`max_position_embeddings`); "
        "a larger value is an error",
    )

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):  # a pathlib.Path names a local model as well as a str
            self.model = os.fspath(self.model)
        super().__post_init__()

    def validate(self) -> None:
        check_quantization_method("quantization", self.quantization)
        if self.dtype in UNAVAILABLE_QUANTIZED_DTYPES:
            raise not_available(f"{self.dtype} weights", f"dtype={self.dtype!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES and self.dtype not in QUANTIZED_DTYPES:
            raise _fail(
                "dtype", self.dtype, f"must be 'auto' or one of {sorted(DTYPES) + list(QUANTIZED_DTYPES)}"
            )
        if self.dtype in QUANTIZED_DTYPES and self.quantization not in (None, QUANTIZED_DTYPES[self.dtype]):
            raise _fail("quantization", self.quantization, f"contradicts dtype={self.dtype!r}")
        if self.quantization == "gguf" and self.dtype not in ("auto", *GGUF_ACTIVATION_DTYPES):
            raise _fail(
                "dtype",
                self.dtype,
                "cannot run with quantization='gguf': the CPU int4 kernel takes float32 or bfloat16 "
                f"activations ({', '.join(GGUF_ACTIVATION_DTYPES)})",
            )
        if self.load_format not in LOAD_FORMATS:
            raise _fail("load_format", self.load_format, f"must be one of {LOAD_FORMATS}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise _fail("max_seq_len", self.max_seq_len, "must be >= 2")

    def resolve_max_seq_len(self, model_positions: int) -> int:
        """The longest sequence served: max_seq_len, which may not exceed the model's positions
        (past them rotary embeddings leave the range the model was trained on)."""
        if self.max_seq_len is None:
            return model_positions
        if self.max_seq_len > model_positions:
            raise _fail(
                "max_seq_len",
                self.max_seq_len,
                f"must be <= the model's {model_positions} positions (max_position_embeddings)",
            )
        return self.max_seq_len


@dataclass
class SchedulerConfig(_Part):
    """What one step may hold and in which order requests are admitted."""

    max_batch_size: int = option(256, "most sequences in one step")
    max_num_tokens: int | None = option(
        None,
        f"most tokens (prefill + decode) in one step; default: {DEFAULT_MAX_NUM_TOKENS}, or "
        f"{CPU_MAX_NUM_TOKENS} on a CPU with chunked context, where a prompt's tokens cost milliseconds "
        "each: a larger step would hold the streams beside a long prompt for seconds",
    )
    enable_chunked_context: bool = option(
        True, "split prompts longer than the chunk over several steps, beside decodes"
    )
    max_chunked_prefill_length: int | None = option(
        None, "chunk size; default: the step's remaining token budget"
    )
    scheduler_policy: str = option(
        "max_utilization",
        "`max_utilization` (admit greedily, preempt newest on memory pressure), `guaranteed_no_evict` "
        "(reserve prompt + max_tokens, never preempt), `static_batch` (baseline: a batch runs to "
        "completion before the next starts)",
    )

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise _fail("max_batch_size", self.max_batch_size, "must be >= 1")
        if self.max_num_tokens is not None and self.max_num_tokens < 1:
            raise _fail("max_num_tokens", self.max_num_tokens, "must be >= 1")
        if self.max_chunked_prefill_length is not None and self.max_chunked_prefill_length < 1:
            raise _fail("max_chunked_prefill_length", self.max_chunked_prefill_length, "must be >= 1")
        if self.scheduler_policy not in SCHEDULER_POLICIES:
            raise _fail("scheduler_policy", self.scheduler_policy, f"must be one of {SCHEDULER_POLICIES}")

    @property
    def chunk_size(self) -> int:
        """Most prompt tokens one request may prefill in one step."""
        if self.max_chunked_prefill_length is None:
            return self.max_num_tokens
        return min(self.max_chunked_prefill_length, self.max_num_tokens)


@dataclass
class CacheConfig(_Part):
    """The paged KV cache: its size, block size, element type and prefix reuse."""

    kv_cache_free_gpu_mem_fraction: float = option(
        0.9, "GPU: share of free memory (after a profiling forward at `max_num_tokens`) for KV"
    )
    kv_cache_max_tokens: int | None = option(
        None, "cap on KV cache tokens; default: no cap (on CPU the budget is 2 GiB of KV)"
    )
    kv_cache_dtype: str = option(
        "auto",
        "`auto` (the model dtype) or `fp8`: E4M3 keys/values, saturated at +-448 with no scale, read "
        "back as the model dtype; half of bf16's bytes, so twice the tokens in the same memory; outputs "
        "drift from full precision within a few dozen tokens on small models",
    )
    enable_prefix_caching: bool = option(True, "reuse the KV of shared prompt prefixes")
    block_size: int = option(16, f"tokens per KV block: one of {', '.join(map(str, BLOCK_SIZES))}")
    cpu_kv_cache_bytes: ClassVar[int] = CPU_KV_CACHE_BYTES

    def validate(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise _fail("block_size", self.block_size, f"must be one of {BLOCK_SIZES}")
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            raise _fail(
                "kv_cache_free_gpu_mem_fraction", self.kv_cache_free_gpu_mem_fraction, "must be in (0, 1]"
            )
        if self.kv_cache_max_tokens is not None and self.kv_cache_max_tokens < self.block_size:
            raise _fail(
                "kv_cache_max_tokens",
                self.kv_cache_max_tokens,
                f"must be at least one block ({self.block_size} tokens)",
            )
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise _fail(
                "kv_cache_dtype", self.kv_cache_dtype, f"must be 'auto' or one of {sorted(KV_CACHE_DTYPES)}"
            )


@dataclass
class RuntimeConfig(_Part):
    """How steps run: the device, the attention kernels, CUDA graphs, overlap and the sampling seed.
    Options that change how a step computes (its kernels or their numerics) belong here."""

    device: str = option("auto", "`auto` (CUDA when visible, else CPU), `cpu`, `cuda` or `cuda:N`")
    attention_backend: str = option(
        "auto", "`auto` (Triton kernels on CUDA, PyTorch reference on CPU), `torch`, `triton`"
    )
    enable_cuda_graph: bool = option(
        True,
        "capture steps as CUDA graphs: decode steps over batch sizes 1, 2, 4, 8, 16, 32, ... "
        "`max_batch_size`, steps with prompt tokens over token counts 32, 64, ... 512 (capped at "
        "`max_num_tokens`; at most 8 prompt chunks), and with speculation verify steps over batch sizes "
        "up to `speculative_disable_by_batch_size`; a step pads to the next captured size; larger or "
        "more crowded steps, and those asking for prompt logprobs, run eagerly. Applies with the triton "
        "attention backend only: with `torch` (the CPU default) every step runs eagerly",
    )
    cuda_graph_cache_size: int | None = option(
        None,
        "how many decode graphs to keep: that many batch sizes picked evenly from the decode ladder (the "
        "largest always); default: all. Fewer graphs capture faster and use less memory but pad more. "
        "The mixed-step ladder (at most 5 graphs) is not counted",
    )
    # None (auto): overlap on CUDA, where the CPU can work while the GPU runs; off on CPU, where the
    # same cores do both and overlap would only report each token one step later.
    disable_overlap_scheduler: bool | None = option(
        None,
        "default: overlap on GPU (the CPU schedules and prepares step n+1 while the GPU runs step n; "
        "sampled tokens stay on the GPU), off on CPU; `True` turns it off, `False` forces it on",
    )
    seed: int = option(0, "seed of the engine's sampler (and of dummy weights)")
    batch_invariant: bool = option(
        False,
        "compute every row independently of the rest of its step (products in fixed-shape row tiles, no "
        "batch-1 or small-batch kernels, attention one row at a time over fixed key tiles): greedy tokens "
        "are then identical alone, batched, chunked and after preemption; costs speed",
    )

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise _fail("device", self.device, "must be 'auto', 'cpu' or 'cuda[:N]'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise _fail("device", self.device, "needs a CUDA GPU, and none is visible")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise _fail("attention_backend", self.attention_backend, f"must be one of {ATTENTION_BACKENDS}")
        if self.cuda_graph_cache_size is not None and self.cuda_graph_cache_size < 1:
            raise _fail("cuda_graph_cache_size", self.cuda_graph_cache_size, "must be >= 1")


@dataclass
class ParallelConfig(_Part):
    """How many devices share the model."""

    tensor_parallel_size: int = option(
        1,
        "devices the weights are split over (Megatron-style: attention heads, MLP rows, vocabulary), one "
        "process each: rank 0 runs the engine and starts the others (NCCL on GPUs, gloo on CPUs), or "
        "`torchrun` starts all of them (`WORLD_SIZE` must equal it); must divide the attention heads",
    )

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise _fail("tensor_parallel_size", self.tensor_parallel_size, "must be >= 1")


@dataclass
class SpeculativeConfig(_Part):
    """Speculative decoding: a proposer drafts tokens that the target model verifies in one step, with
    rejection sampling, so the output follows the target's distribution exactly."""

    speculative_model: str | None = option(
        None,
        f"draft model (a local HF dir, `.gguf` file, cached hub id or dummy preset with the target's "
        f"vocabulary), or `{NGRAM}`: drafts copied from earlier tokens of the same sequence (prompt "
        "lookup); default: no speculation",
    )
    speculative_model_quantization: str | None = option(
        None,
        "the draft model's weight format, as `quantization` takes it (`fp8`: the draft's linear layers in "
        "FP8, half the bytes each draft step reads; `awq` or `gptq`: in 4 bits, a quarter); default: the "
        "target's",
    )
    num_speculative_tokens: int | None = option(
        None,
        f"draft tokens proposed per step, 1 to {MAX_SPECULATIVE_TOKENS}; default "
        f"{DEFAULT_SPECULATIVE_TOKENS} with `speculative_model`",
    )
    prompt_lookup_min: int = option(2, f"`{NGRAM}`: the shortest n-gram matched against earlier tokens")
    prompt_lookup_max: int = option(4, f"`{NGRAM}`: the longest n-gram tried (the longest match wins)")
    speculative_disable_by_batch_size: int | None = option(
        32,
        "a step speculates only while at most this many sequences are running or waiting (larger "
        "batches gain little from drafts); None: at any batch size",
    )
    speculative_disable_by_acceptance_rate: float = option(
        0.1,
        f"a sequence stops speculating once the share of its drafts accepted over its last "
        f"{ACCEPTANCE_WINDOW} verify steps falls below this (checked from the {MIN_ACCEPTANCE_STEPS}th); "
        "0: never",
    )

    def validate(self) -> None:
        model, k = self.speculative_model, self.num_speculative_tokens
        if model is not None and (not model or (model.startswith("[") and model != NGRAM)):
            raise _fail("speculative_model", model, f"must be a draft model or {NGRAM!r}")
        draft_format = self.speculative_model_quantization
        if draft_format is not None and (model is None or model == NGRAM):
            raise _fail(
                "speculative_model_quantization", draft_format, "needs a draft model as speculative_model"
            )
        check_quantization_method("speculative_model_quantization", draft_format)
        if k is not None and model is None:
            raise _fail("num_speculative_tokens", k, "needs speculative_model (a draft model or '[ngram]')")
        if k is not None and not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise _fail("num_speculative_tokens", k, f"must be in [1, {MAX_SPECULATIVE_TOKENS}]")
        if self.prompt_lookup_min < 1:
            raise _fail("prompt_lookup_min", self.prompt_lookup_min, "must be >= 1")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise _fail(
                "prompt_lookup_max",
                self.prompt_lookup_max,
                f"must be >= prompt_lookup_min={self.prompt_lookup_min}",
            )
        if self.speculative_disable_by_batch_size is not None and self.speculative_disable_by_batch_size < 1:
            raise _fail(
                "speculative_disable_by_batch_size", self.speculative_disable_by_batch_size, "must be >= 1"
            )
        if not 0.0 <= self.speculative_disable_by_acceptance_rate <= 1.0:
            raise _fail(
                "speculative_disable_by_acceptance_rate",
                self.speculative_disable_by_acceptance_rate,
                "must be in [0, 1]",
            )

    @property
    def enabled(self) -> bool:
        return self.speculative_model is not None

    @property
    def uses_ngram(self) -> bool:
        return self.speculative_model == NGRAM

    @property
    def num_tokens(self) -> int:
        """Draft tokens per step: 0 without speculation."""
        if self.speculative_model is None:
            return 0
        return self.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS


@dataclass
class EngineConfig:
    """Everything `LLM(...)` accepts, one part per concern. Build it from the flat option names with
    `EngineConfig.from_options(...)`; each part checks its own options as it is built."""

    load: LoadConfig = field(default_factory=LoadConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.scheduler.max_num_tokens is None:
            chunked_on_cpu = self.torch_device.type == "cpu" and self.scheduler.enable_chunked_context
            self.scheduler.max_num_tokens = CPU_MAX_NUM_TOKENS if chunked_on_cpu else DEFAULT_MAX_NUM_TOKENS
        size = self.parallel.tensor_parallel_size
        if size > 1 and self.runtime.batch_invariant:
            # The all-reduce's summation order follows the tensor's size, so rows would depend on the batch.
            raise not_available(
                "batch-invariant mode with tensor parallelism",
                f"batch_invariant=True, tensor_parallel_size={size}",
            )
        if size > 1 and self.runtime.device.startswith("cuda:"):
            raise _fail(
                "device",
                self.runtime.device,
                f"names one GPU; with tensor_parallel_size={size} use 'cuda' or 'auto' (rank r takes GPU r "
                "of CUDA_VISIBLE_DEVICES)",
            )

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """An EngineConfig from flat option names (`max_batch_size=64`); omitted ones keep their default."""
        unknown = sorted(set(options) - set(ENGINE_OPTIONS))
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; known: {sorted(ENGINE_OPTIONS)}")
        parts: dict[str, dict[str, Any]] = {f.name: {} for f in fields(cls)}
        for name, value in options.items():
            parts[ENGINE_OPTIONS[name].part][name] = value
        hints = get_type_hints(cls)
        return cls(**{part: hints[part](**values) for part, values in parts.items()})

    @property
    def torch_device(self) -> torch.device:
        if self.runtime.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.runtime.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The model's activation dtype (a quantized `dtype` names the weights' format instead)."""
        if self.load.dtype not in DTYPES:
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.load.dtype]

    @property
    def quantization(self) -> str | None:
        """The weight format asked for (`quantization`, or a quantized `dtype`); None: the checkpoint's."""
        if self.load.quantization is not None:
            return self.load.quantization
        return QUANTIZED_DTYPES.get(self.load.dtype)

    @property
    def gguf_blocks_by_default(self) -> bool:
        """Whether a 4-bit GGUF file runs its own blocks (`quantization="gguf"`) with no format asked for:
        on the CPU with dtype="auto"; dtype="float32" keeps the fp32 reference."""
        unset = self.load.quantization is None and self.load.dtype == "auto"
        return unset and self.torch_device.type == "cpu"

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        return KV_CACHE_DTYPES.get(self.cache.kv_cache_dtype, self.torch_dtype)

    @property
    def overlap_scheduling(self) -> bool:
        if self.runtime.disable_overlap_scheduler is None:
            return self.torch_device.type == "cuda"
        return not self.runtime.disable_overlap_scheduler

    @property
    def speculative_batch_size(self) -> int:
        """The most sequences a step that speculates holds."""
        limit = self.speculative.speculative_disable_by_batch_size
        return min(self.scheduler.max_batch_size, limit or self.scheduler.max_batch_size)

    def uses_step_graphs(self, attention_backend: str) -> bool:
        """Whether steps go through the CUDA-graph path (captured on CUDA, the same static buffers run
        eagerly on CPU). It is built on the triton attention kernels; with the torch backend
        enable_cuda_graph has no effect and every step runs eagerly, as the option's help says."""
        return self.runtime.enable_cuda_graph and attention_backend == "triton"


def _collect_options() -> dict[str, OptionSpec]:
    specs: dict[str, OptionSpec] = {}
    for part_name, part_type in get_type_hints(EngineConfig).items():
        hints = get_type_hints(part_type)
        for f in fields(part_type):
            kind, optional = _base_type(hints[f.name])
            specs[f.name] = OptionSpec(f.name, part_name, kind, optional, f.default, f.metadata["help"])
    return specs


ENGINE_OPTIONS: dict[str, OptionSpec] = _collect_options()
