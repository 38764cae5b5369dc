"""Calibration samples: `num_samples` consecutive windows of `seq_len` tokens of a text.

The default text ships in the package, so calibrating needs no network: the last 280 KB of the Tiny
Shakespeare corpus (Shakespeare's plays, public domain; characters 835,696 to the end of
tinyshakespeare.txt), which leaves its first 835 KB as held-out text to measure perplexity on.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).parent / "data" / "shakespeare.txt"
DEFAULT_NUM_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
# Characters read per token wanted: more than any English text needs, so a large file is not read whole.
CHARS_PER_TOKEN = 8


def calibration_samples(
    tokenizer,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    path: Path | None = None,
    max_positions: int | None = None,
) -> torch.Tensor:
    """Token ids [num_samples, seq_len]: the first num_samples windows of seq_len tokens of the text at
    `path` (default: the text shipped in the package), tokenized without special tokens. A text too
    short, or a window longer than the model's positions, is an error that names the option."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"seq_len={seq_len} is longer than the model's {max_positions} positions")
    if tokenizer is None:
        raise ValueError("calibration needs the model's tokenizer, and this model directory has none")
    path = DEFAULT_TEXT if path is None else Path(path)
    needed = num_samples * seq_len
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(needed * CHARS_PER_TOKEN)
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"calibration_data {str(path)!r} cannot be read as UTF-8 text: {error}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        raise ValueError(
            f"calibration_data {str(path)!r} is too short: {len(ids)} tokens, and num_samples={num_samples} "
            f"x seq_len={seq_len} needs {needed}; give a longer text, fewer samples or a shorter seq_len"
        )
    return torch.tensor(ids[:needed], dtype=torch.int64).view(num_samples, seq_len)
