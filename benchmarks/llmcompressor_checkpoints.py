"""FP8 checkpoints made by llmcompressor (compressed-tensors format), with the recipes users run.

Schemes (all leave `lm_head` unquantized, as llmcompressor's examples do):
  fp8-dynamic    scheme FP8_DYNAMIC: per-channel weight scales, dynamic per-token activations; no calibration
  fp8-static     scheme FP8: per-tensor weight scales, static per-tensor input scales from calibration
  fp8-static-kv  fp8-static plus an FP8 per-tensor static KV-cache scheme (k_scale / v_scale per layer)

Calibration text: consecutive chunks of tinyshakespeare (no network), tokenized with the model's tokenizer.

llmcompressor pins its own transformers, so this runs in a separate virtualenv, made with one line:
    python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install llmcompressor==0.14.0.1 torch==2.13.0 \
        transformers==5.17.0

Quantize a Hugging Face model directory (writes OUT/<prefix>-<scheme>/ with config.json, safetensors and
the tokenizer files):
    /tmp/lcvenv/bin/python benchmarks/llmcompressor_checkpoints.py --source HF_DIR --output-dir OUT \
        --prefix smollm2 [--schemes fp8-dynamic fp8-static fp8-static-kv] [--num-samples 64 --seq-len 512]

Regenerate the test fixtures in tests/data/quantized/ (a seeded tiny random Llama, bf16, and its three
quantized forms: config.json + model.safetensors each, plus reference_logits/<name>.safetensors, HF's
fp32 logits for a fixed prompt):
    /tmp/lcvenv/bin/python benchmarks/llmcompressor_checkpoints.py --tiny
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

SCHEMES = ("fp8-dynamic", "fp8-static", "fp8-static-kv")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
FIXTURE_DIR = REPO_ROOT / "tests" / "data" / "quantized"
SEED = 0

# The tiny Llama the fixtures are made from: kv width (32), hidden (64), mlp (128) and vocab (256) all
# differ, so a misplaced or transposed k/v, MLP or head tensor cannot load silently; untied lm_head.
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    rms_norm_eps=1e-5,
)
TINY_NUM_SAMPLES, TINY_SEQ_LEN = 16, 64
REFERENCE_PROMPT = "ROMEO:\nBut, soft! what light through yonder window breaks?"


def build_recipe(scheme: str):
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if scheme == "fp8-dynamic":
        return QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
    if scheme == "fp8-static":
        return QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"])
    if scheme == "fp8-static-kv":
        kv_scheme = QuantizationArgs(
            num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True
        )
        return QuantizationModifier(
            targets="Linear", scheme="FP8", ignore=["lm_head"], kv_cache_scheme=kv_scheme
        )
    raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def needs_calibration(scheme: str) -> bool:
    return scheme != "fp8-dynamic"


def calibration_token_ids(tokenizer, text_path: Path, num_samples: int, seq_len: int) -> list[list[int]]:
    """`num_samples` consecutive text chunks, each tokenized and cut to exactly `seq_len` tokens."""
    text = text_path.read_text()
    chars_per_chunk = seq_len * 8  # comfortably more than seq_len tokens for any tokenizer of English
    if len(text) < num_samples * chars_per_chunk:
        raise ValueError(f"{text_path} is too short for {num_samples} chunks of {seq_len} tokens")
    samples = []
    for i in range(num_samples):
        chunk = text[i * chars_per_chunk : (i + 1) * chars_per_chunk]
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"][:seq_len]
        if len(ids) < seq_len:
            raise ValueError(f"chunk {i} has only {len(ids)} tokens, fewer than {seq_len}")
        samples.append(ids)
    return samples


def calibration_dataset(tokenizer, text_path: Path, num_samples: int, seq_len: int):
    from datasets import Dataset

    input_ids = calibration_token_ids(tokenizer, text_path, num_samples, seq_len)
    return Dataset.from_dict({"input_ids": input_ids, "attention_mask": [[1] * seq_len] * num_samples})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def quantize(
    source: Path, out_dir: Path, scheme: str, text_path: Path, num_samples: int, seq_len: int
) -> float:
    """Quantizes `source` with `scheme` into `out_dir`; returns the seconds oneshot took."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed_everything(SEED)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(source)
    dataset_args = {}
    if needs_calibration(scheme):
        dataset_args = dict(
            dataset=calibration_dataset(tokenizer, text_path, num_samples, seq_len),
            num_calibration_samples=num_samples,
            max_seq_length=seq_len,
            shuffle_calibration_samples=False,  # deterministic order
        )
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, recipe=build_recipe(scheme), **dataset_args)
    seconds = time.perf_counter() - start
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    return seconds


def byte_tokenizer():
    """A byte-level tokenizer whose 256 token ids are the bytes themselves (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte-to-unicode table: printable bytes stand for themselves, the rest for chr(256 + i).
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    unprintable = [b for b in range(256) if b not in printable]
    symbol = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(unprintable)}
    tokenizer = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def write_tiny_source(out_dir: Path) -> None:
    """A seeded random tiny Llama in bf16 (the dtype real checkpoints ship in), with a byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(SEED)
    config = LlamaConfig(**TINY_LLAMA)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    byte_tokenizer().save_pretrained(out_dir)


def keep_fixture_files(src: Path, dst: Path) -> None:
    """Copies only what the loader tests read: config.json and model.safetensors."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)


def write_reference_logits(checkpoint: Path, dst: Path) -> None:
    """HF transformers' fp32 logits of the checkpoint for a fixed byte prompt: what a loader must reproduce.

    transformers runs compressed-tensors' own forward: FP8 weights dequantized, activations fake-quantized
    (per token or with `input_scale`) and, where the checkpoint has a KV scheme, post-RoPE keys and values
    fake-quantized with k_scale / v_scale."""
    import compressed_tensors
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if json.loads((checkpoint / "config.json").read_text())["quantization_config"].get("kv_cache_scheme"):
        # transformers releases whose attention takes `cache` instead of `past_key_values` silently skip the
        # KV hooks (k_scale / v_scale load as unexpected keys); such a reference would be wrong.
        if not all(hasattr(layer.self_attn, "kv_cache") for layer in model.model.layers):
            raise RuntimeError("this transformers/compressed-tensors pair does not apply the KV-cache scales")
    input_ids = torch.tensor([list(REFERENCE_PROMPT.encode())])
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()
    producer = (
        f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}, fp32"
    )
    save_file(
        {"input_ids": input_ids[0], "logits": logits.contiguous()}, dst, metadata={"producer": producer}
    )


def make_tiny_fixtures(text_path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "llama-tiny"
        write_tiny_source(source)
        keep_fixture_files(source, FIXTURE_DIR / "llama-tiny")
        for scheme in SCHEMES:
            out = Path(tmp) / scheme
            seconds = quantize(source, out, scheme, text_path, TINY_NUM_SAMPLES, TINY_SEQ_LEN)
            fixture = FIXTURE_DIR / f"llama-tiny-{scheme}"
            keep_fixture_files(out, fixture)
            # Beside the checkpoint directories, not in them: a loader reads every *.safetensors there.
            write_reference_logits(out, FIXTURE_DIR / "reference_logits" / f"llama-tiny-{scheme}.safetensors")
            print(f"llama-tiny-{scheme}: oneshot {seconds:.1f} s")
    for path in sorted(FIXTURE_DIR.glob("*/*")):
        print(f"{path.relative_to(REPO_ROOT)}: {path.stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="regenerate the fixtures in tests/data/quantized/"
    )
    parser.add_argument("--source", type=Path, help="Hugging Face model directory to quantize")
    parser.add_argument("--output-dir", type=Path, help="parent directory of the checkpoints written")
    parser.add_argument("--prefix", help="checkpoint directory prefix (default: the source directory name)")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="calibration text file")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    args = parser.parse_args()

    if args.tiny:
        make_tiny_fixtures(args.text)
        return
    if args.source is None or args.output_dir is None:
        parser.error("--source and --output-dir are required unless --tiny is given")
    prefix = args.prefix or args.source.name
    timings = {}
    for scheme in args.schemes:
        out = args.output_dir / f"{prefix}-{scheme}"
        start = time.perf_counter()
        oneshot_s = quantize(args.source, out, scheme, args.text, args.num_samples, args.seq_len)
        timings[scheme] = {"oneshot_s": round(oneshot_s, 1), "total_s": round(time.perf_counter() - start, 1)}
        print(f"{out}: {json.dumps(timings[scheme])}")
    print(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
