"""Engine options, one dataclass per concern. Each validates its fields and names the bad one."""

from __future__ import annotations

from dataclasses import dataclass, fields

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
# Quantized dtypes the guide names; they belong to the quantization capability.
QUANTIZED_DTYPES = ("fp8", "int4_awq", "int4_gptq", "int8")
# KV-cache element types besides "auto" (the model dtype). FP8 E4M3 halves the bytes every decode
# step reads; values are stored unscaled (scale 1.0, as vLLM does without calibrated scales) and
# saturate at +-448.
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}
# Documented default KV budget on CPU, where there is no "free GPU memory" to take a fraction of.
CPU_KV_CACHE_BYTES = 2 * 1024**3


class FeatureNotAvailableError(NotImplementedError, ValueError):
    """An option that belongs to a capability tensorjet has not built yet."""


def not_available(feature: str, option: str) -> FeatureNotAvailableError:
    return FeatureNotAvailableError(
        f"{feature} is not available in tensorjet yet (option {option}); "
        "remove the option to run unquantized bf16/fp32 on one device"
    )


def _fail(owner: str, name: str, value: object, rule: str) -> ValueError:
    return ValueError(f"{owner}.{name} {rule}, got {value!r}")


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_free_gpu_mem_fraction: float = 0.9
    kv_cache_max_tokens: int | None = None
    enable_prefix_caching: bool = True
    cpu_kv_cache_bytes: int = CPU_KV_CACHE_BYTES

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise _fail("LLM", "block_size", self.block_size, "must be one of 8, 16, 32, 64, 128")
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            raise _fail(
                "LLM",
                "kv_cache_free_gpu_mem_fraction",
                self.kv_cache_free_gpu_mem_fraction,
                "must be in (0, 1]",
            )
        if self.kv_cache_max_tokens is not None and self.kv_cache_max_tokens < self.block_size:
            raise _fail(
                "LLM",
                "kv_cache_max_tokens",
                self.kv_cache_max_tokens,
                f"must be at least one block ({self.block_size} tokens)",
            )


@dataclass
class SchedulerConfig:
    max_batch_size: int = 256
    max_num_tokens: int = 4096
    enable_chunked_context: bool = True
    max_chunked_prefill_length: int | None = None
    scheduler_policy: str = "max_utilization"

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise _fail("LLM", "max_batch_size", self.max_batch_size, "must be >= 1")
        if self.max_num_tokens < 1:
            raise _fail("LLM", "max_num_tokens", self.max_num_tokens, "must be >= 1")
        if self.max_chunked_prefill_length is not None and self.max_chunked_prefill_length < 1:
            raise _fail("LLM", "max_chunked_prefill_length", self.max_chunked_prefill_length, "must be >= 1")
        if self.scheduler_policy not in SCHEDULER_POLICIES:
            raise _fail(
                "LLM", "scheduler_policy", self.scheduler_policy, f"must be one of {SCHEDULER_POLICIES}"
            )

    @property
    def chunk_size(self) -> int:
        """Most prompt tokens one request may prefill in one step."""
        if self.max_chunked_prefill_length is None:
            return self.max_num_tokens
        return min(self.max_chunked_prefill_length, self.max_num_tokens)


@dataclass
class EngineConfig:
    """Everything `LLM(...)` accepts, with the guide's names."""

    model: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    max_batch_size: int = 256
    max_num_tokens: int = 4096
    max_seq_len: int | None = None
    kv_cache_free_gpu_mem_fraction: float = 0.9
    kv_cache_max_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_context: bool = True
    max_chunked_prefill_length: int | None = None
    scheduler_policy: str = "max_utilization"
    enable_cuda_graph: bool = True
    cuda_graph_cache_size: int | None = None
    speculative_model: str | None = None
    num_speculative_tokens: int = 5
    tensor_parallel_size: int = 1
    load_format: str = "auto"
    device: str = "auto"
    seed: int = 0
    block_size: int = 16
    # None (auto): overlap on CUDA, where the CPU can work while the GPU runs; off on CPU, where the
    # same cores do both and overlap would only report each token one step later. False forces it on.
    disable_overlap_scheduler: bool | None = None
    attention_backend: str = "auto"  # "torch" (reference), "triton", or "auto" (triton on CUDA)
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) or "fp8" (E4M3, half the KV bytes)
    # Every row's result independent of the rest of its step (fixed-shape products, per-row attention):
    # greedy tokens alone == batched == after preemption, exactly, at some cost in speed.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise _fail(
                "LLM", "attention_backend", self.attention_backend, "must be 'auto', 'torch' or 'triton'"
            )
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise _fail(
                "LLM",
                "kv_cache_dtype",
                self.kv_cache_dtype,
                f"must be 'auto' or one of {sorted(KV_CACHE_DTYPES)}",
            )
        if self.quantization is not None:
            raise not_available(f"{self.quantization} quantization", f"quantization={self.quantization!r}")
        if self.dtype in QUANTIZED_DTYPES:
            raise not_available(f"{self.dtype} weights", f"dtype={self.dtype!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise _fail("LLM", "dtype", self.dtype, f"must be 'auto' or one of {sorted(DTYPES)}")
        if self.speculative_model is not None:
            raise not_available("speculative decoding", f"speculative_model={self.speculative_model!r}")
        if self.tensor_parallel_size != 1:
            raise not_available("tensor parallelism", f"tensor_parallel_size={self.tensor_parallel_size}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise _fail("LLM", "max_seq_len", self.max_seq_len, "must be >= 2")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise _fail("LLM", "device", self.device, "must be 'auto', 'cpu' or 'cuda[:N]'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise _fail("LLM", "device", self.device, "needs a CUDA GPU, and none is visible")
        if self.cuda_graph_cache_size is not None and self.cuda_graph_cache_size < 1:
            raise _fail("LLM", "cuda_graph_cache_size", self.cuda_graph_cache_size, "must be >= 1")
        self.cache = CacheConfig(
            block_size=self.block_size,
            kv_cache_free_gpu_mem_fraction=self.kv_cache_free_gpu_mem_fraction,
            kv_cache_max_tokens=self.kv_cache_max_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
        )
        self.scheduler = SchedulerConfig(
            max_batch_size=self.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            enable_chunked_context=self.enable_chunked_context,
            max_chunked_prefill_length=self.max_chunked_prefill_length,
            scheduler_policy=self.scheduler_policy,
        )

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def overlap_scheduling(self) -> bool:
        if self.disable_overlap_scheduler is None:
            return self.torch_device.type == "cuda"
        return not self.disable_overlap_scheduler

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        return KV_CACHE_DTYPES.get(self.kv_cache_dtype, self.torch_dtype)
