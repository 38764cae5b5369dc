"""A float model in, a calibrated INT4 checkpoint out: what `tensorjet quantize` and calibrate-at-load
both run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tensorjet.calibration.checkpoint import check_packable, write_checkpoint
from tensorjet.calibration.pipeline import CalibrationOptions, calibrate
from tensorjet.calibration.quantizer import QuantizedWeight
from tensorjet.models.llama import LlamaForCausalLM
from tensorjet.models.loader import ModelSource, iter_weights

logger = logging.getLogger(__name__)

# The format each method writes unless told otherwise: AWQ's own (asymmetric), GPTQ's own (symmetric);
# round-to-nearest, GPTQ's (the baseline GPTQ improves on, on the same grid).
DEFAULT_FORMATS = {"awq": "awq", "gptq": "gptq", "rtn": "gptq"}


@dataclass
class Calibrated:
    model: LlamaForCausalLM  # in host memory, computing with the quantized weights
    quantized: dict[str, QuantizedWeight]
    seconds: float  # the calibration alone (not loading or writing)


def require_float(source: ModelSource) -> None:
    if source.quantization_config is not None:
        raise ValueError(
            f"model {source.name!r} is already quantized ({source.quantization_config.get('quant_method')}); "
            "calibration starts from float weights"
        )


def load_float_model(source: ModelSource, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """The engine's model of `source` in host memory, float weights (random ones for a dummy source)."""
    require_float(source)
    with torch.device("cpu"):
        model = LlamaForCausalLM(source.hf_config, dtype)
    if source.kind == "dummy":
        model.init_dummy_weights(seed)
    else:
        model.load_weights(iter_weights(source))
    return model.eval()


@dataclass(frozen=True)
class CalibrationJob:
    """One calibration: the float checkpoint, the method and grid, the checkpoint format it is for, the
    sample tokens [samples, seq_len], and the device and dtype it runs in."""

    source: ModelSource
    options: CalibrationOptions
    checkpoint_format: str
    token_ids: torch.Tensor
    device: torch.device
    dtype: torch.dtype


def calibrate_source(job: CalibrationJob, progress: bool = True) -> Calibrated:
    device = job.device
    model = load_float_model(job.source, job.dtype)
    check_packable(model, job.checkpoint_format)
    start = time.perf_counter()
    quantized = calibrate(model, job.token_ids, job.options, device, progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":  # the samples' activations: the engine loading next needs the memory
        torch.cuda.empty_cache()
    return Calibrated(model, quantized, seconds)


def quantize_to_checkpoint(job: CalibrationJob, out_dir: Path, progress: bool = True) -> Calibrated:
    """Calibrate `job.source` and write the checkpoint into `out_dir`."""
    calibrated = calibrate_source(job, progress)
    write_checkpoint(
        out_dir, job.source, calibrated.model, calibrated.quantized, job.checkpoint_format, job.options
    )
    logger.info(
        "%s: %s calibration on %d x %d tokens took %.1f s; wrote %s",
        job.source.name,
        job.options.method,
        *job.token_ids.shape,
        calibrated.seconds,
        out_dir,
    )
    return calibrated
