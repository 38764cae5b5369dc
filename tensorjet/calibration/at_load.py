"""Calibrate-at-load: `LLM(model=<float checkpoint>, quantization="awq" | "gptq")` calibrates the model
with the shipped calibration text (the defaults of `tensorjet quantize`) before it loads, writes the
checkpoint into tensorjet's cache, and loads that; a later load with the same model, method, bits,
group size and calibration tokens reads the cached checkpoint.

An entry in tensorjet's cache (`models.cache`, shared with the GGUF conversions) is
`calibrated/<key>`, keyed by a hash of the model's files, the method and its options, the calibration
dtype and the calibration tokens (the files' hashes are remembered, so a load that hits the cache does
not read the weights to hash them). An entry is whole or absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from tensorjet.calibration.checkpoint import symmetric
from tensorjet.calibration.data import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, calibration_samples
from tensorjet.calibration.pipeline import CalibrationOptions
from tensorjet.calibration.quantize import DEFAULT_FORMATS, CalibrationJob, quantize_to_checkpoint
from tensorjet.calibration.quantizer import QuantScheme
from tensorjet.config import EngineConfig
from tensorjet.models.cache import cache_root, is_complete, write_entry
from tensorjet.models.llama import max_positions_of
from tensorjet.models.loader import ModelSource, load_tokenizer, resolve_model

logger = logging.getLogger(__name__)

CALIBRATED_METHODS = ("awq", "gptq")  # the `quantization` values that calibrate a float checkpoint
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 128
MANIFEST_FILE = "calibration.json"  # written last: the key and the files the entry holds
# Bump when what calibration writes changes, so older entries are made again.
CACHE_FORMAT = 1


def calibrated_source(config: EngineConfig, source: ModelSource) -> ModelSource:
    """The checkpoint to load: `source` itself, unless `config` asks for AWQ or GPTQ on a float
    checkpoint; then its calibrated checkpoint, from the cache or made now."""
    method = config.quantization
    dummy = source.kind == "dummy" or config.load.load_format == "dummy"
    if method not in CALIBRATED_METHODS or dummy or source.quantization_config is not None:
        return source
    checkpoint_format = DEFAULT_FORMATS[method]
    options = CalibrationOptions(
        method, QuantScheme(DEFAULT_BITS, DEFAULT_GROUP_SIZE, symmetric=symmetric(checkpoint_format))
    )
    seq_len = min(DEFAULT_SEQ_LEN, max_positions_of(source.hf_config))
    token_ids = calibration_samples(load_tokenizer(source), DEFAULT_NUM_SAMPLES, seq_len)
    job = CalibrationJob(
        source, options, checkpoint_format, token_ids, config.torch_device, config.torch_dtype
    )
    key = cache_key(job)
    entry = cache_root() / "calibrated" / key[:24]
    manifest = {"format": CACHE_FORMAT, "key": key, "method": method, "model": source.name}
    if not is_complete(entry, MANIFEST_FILE, manifest):
        logger.warning(
            "calibrating %s with %s (%d x %d tokens of the shipped text) into %s; later loads read it",
            source.name,
            method,
            *token_ids.shape,
            entry,
        )
        _make_entry(entry, manifest, job)
    else:
        logger.info("reading %s's %s calibration from %s", source.name, method, entry)
    calibrated = resolve_model(str(entry))
    return dataclasses.replace(calibrated, name=f"{source.name} ({method}, calibrated)")


def cache_key(job: CalibrationJob) -> str:
    """What decides a calibrated checkpoint (not the device it was calibrated on)."""
    what = {
        "format": CACHE_FORMAT,
        "model": job.source.content_digest(),
        "options": dataclasses.asdict(job.options),
        "checkpoint_format": job.checkpoint_format,
        "dtype": str(job.dtype),
        "data": hashlib.sha256(job.token_ids.numpy().tobytes()).hexdigest(),
        "data_shape": list(job.token_ids.shape),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _make_entry(entry: Path, manifest: dict, job: CalibrationJob) -> None:
    def write(staging: Path) -> dict:
        calibrated = quantize_to_checkpoint(job, staging)
        return {"seconds": round(calibrated.seconds, 1)}

    try:
        write_entry(entry, MANIFEST_FILE, manifest, write)
    except OSError as error:
        raise ValueError(
            f"cannot write the calibration cache under {entry.parent} ({error}); set TENSORJET_CACHE to a "
            "writable directory, or write the checkpoint with `tensorjet quantize` and load that"
        ) from None
