"""Workloads: random token ids, a shared-prefix synthetic set, or a JSONL file of prompts."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

SYNTHETIC = ("random", "shared_prefix")
# Random ids start here to stay clear of the special tokens most vocabularies put first.
FIRST_RANDOM_ID = 100
DEFAULT_NUM_REQUESTS = 64


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]
    output_len: int


def length_range(mean: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive bounds of lengths drawn uniformly around `mean` (+-range_ratio), at least 1."""
    if mean < 1:
        raise ValueError(f"lengths must be >= 1, got {mean}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--range_ratio must be in [0, 1), got {range_ratio}")
    return max(1, math.floor(mean * (1 - range_ratio))), math.ceil(mean * (1 + range_ratio))


def random_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    low = min(FIRST_RANDOM_ID, vocab_size - 1)
    return [rng.randrange(low, vocab_size) for _ in range(n)]


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int,
    prefix_len: int = 0,
) -> list[BenchRequest]:
    """Prompts of random token ids; with prefix_len every prompt starts with the same prefix_len ids
    (a system prompt), followed by its own input_len-ish random ids."""
    rng = random.Random(seed)
    in_range = length_range(input_len, range_ratio)
    out_range = length_range(output_len, range_ratio)
    prefix = random_ids(rng, prefix_len, vocab_size)
    return [
        BenchRequest(prefix + random_ids(rng, rng.randint(*in_range), vocab_size), rng.randint(*out_range))
        for _ in range(num)
    ]


def jsonl_requests(path: Path, num: int | None, default_output_len: int) -> list[BenchRequest]:
    """One request per line: {"prompt": text} or {"input_ids": [...]}, and optionally "output_tokens"."""
    if not path.is_file():
        raise ValueError(f"--dataset {path}: no such file (expected 'random', 'shared_prefix' or a .jsonl)")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"] if "prompt" in row else list(row["input_ids"])
            requests.append(BenchRequest(prompt, int(row.get("output_tokens", default_output_len))))
        except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
            raise ValueError(
                f"{path}:{number}: expected a JSON object with 'prompt' or 'input_ids' ({error})"
            ) from error
        if num is not None and len(requests) == num:
            break
    if not requests:
        raise ValueError(f"{path} holds no requests")
    return requests


def load_dataset(
    name: str,
    num: int | None,
    input_len: int,
    output_len: int,
    range_ratio: float,
    prefix_len: int,
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    """`num` None: every line of a JSONL file, or DEFAULT_NUM_REQUESTS synthetic requests."""
    if num is not None and num < 1:
        raise ValueError(f"--num_requests must be >= 1, got {num}")
    if name in SYNTHETIC and num is None:
        num = DEFAULT_NUM_REQUESTS
    if name == "random":
        return random_requests(num, input_len, output_len, range_ratio, vocab_size, seed)
    if name == "shared_prefix":
        if prefix_len < 1:
            raise ValueError("--dataset shared_prefix needs --prefix_len >= 1")
        return random_requests(num, input_len, output_len, range_ratio, vocab_size, seed, prefix_len)
    return jsonl_requests(Path(name), num, output_len)
