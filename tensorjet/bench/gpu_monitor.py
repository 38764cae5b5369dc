"""Background sampling while a run lasts: GPU utilization and memory through NVML, KV-cache usage
through the engine or the server's /metrics. Every probe degrades to "no samples" (reported as
null) where its source is missing: no NVIDIA driver, no nvidia-ml-py, a server without metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

Probe = Callable[[], float | None]


class Sampler:
    """Calls each probe every `interval_s` on a daemon thread between start() and stop()."""

    def __init__(self, probes: dict[str, Probe], interval_s: float = 0.1) -> None:
        self.probes = probes
        self.interval_s = interval_s
        self.samples: dict[str, list[float]] = {name: [] for name in probes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tensorjet-bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if not any(self.samples.values()):
            self._sample()  # a run shorter than the interval still gets one (end-of-run) sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        for name, probe in self.probes.items():
            try:
                value = probe()
            except Exception as error:  # a monitoring hiccup must not end the benchmark
                logger.debug("probe %s failed: %s", name, error)
                continue
            if value is not None:
                self.samples[name].append(value)


def peak_and_mean(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    return {"peak": max(samples), "mean": sum(samples) / len(samples)}


def nvml_probes(device: torch.device | None = None) -> dict[str, Probe]:
    """`gpu_utilization_pct`, `gpu_memory_used_gb`, `gpu_sm_clock_mhz` and `gpu_power_w` probes for
    the GPU behind `device` (offline), or averaged (utilization, clock), maxed (memory) or summed
    (power) over every visible GPU (serving, where the server's GPU is not known). The clock and the
    power say whether a run was held back by its power limit. Empty where NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as error:  # ImportError, or NVMLError such as LibraryNotFound on a CPU machine
        logger.debug("NVML unavailable: %s", error)
        return {}
    if device is not None and device.type == "cuda":
        handles = _handles_of(pynvml, handles, device) or handles
    if not handles:
        return {}

    def utilization() -> float:
        return sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles) / len(handles)

    def memory_used_gb() -> float:
        return max(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles) / 1e9

    def sm_clock_mhz() -> float:
        return sum(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) for h in handles) / len(handles)

    def power_w() -> float:
        return sum(pynvml.nvmlDeviceGetPowerUsage(h) for h in handles) / 1e3  # milliwatts

    return {
        "gpu_utilization_pct": utilization,
        "gpu_memory_used_gb": memory_used_gb,
        "gpu_sm_clock_mhz": sm_clock_mhz,
        "gpu_power_w": power_w,
    }


def _handles_of(pynvml, handles: list, device: torch.device) -> list:
    """The NVML handle of a torch device, matched by UUID because CUDA_VISIBLE_DEVICES renumbers
    torch's devices but not NVML's."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return [h for h in handles if uuid in _text(pynvml.nvmlDeviceGetUUID(h))]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
