"""INT4 calibration (tensorjet.calibration): the algorithms on tensors (GPTQ beats round-to-nearest,
AWQ's searches never do worse than not searching), `tensorjet quantize` on the tiny test Llama (its
checkpoint loads with the logits of the in-memory calibration, and in the formats' published
dequantization computes in transformers what tensorjet computes), calibrate-at-load and its cache, and
the errors bad inputs give."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorjet import LLM, SamplingParams
from tensorjet.calibration import at_load, awq, gptq
from tensorjet.calibration.data import calibration_samples
from tensorjet.calibration.layerwise import LayerwiseRunner
from tensorjet.calibration.pipeline import CalibrationOptions
from tensorjet.calibration.quantize import CalibrationJob, calibrate_source
from tensorjet.calibration.quantizer import QuantScheme, fake_quantize, quantize_rtn
from tensorjet.cli import main
from tensorjet.models.loader import load_tokenizer, resolve_model

DATA = Path(__file__).parent / "data" / "quantized"
PROMPT = list(b"ROMEO:\nBut, soft! what light through yonder window breaks?")
# Small calibration runs: the tiny model's inputs are 64 (q|k|v, gate|up, o) and 128 (down) wide.
SAMPLES, SEQ_LEN, GROUP = ["--num_samples", "4", "--seq_len", "64"], (4, 64), 32


def byte_tokenizer():
    """A byte-level tokenizer whose 256 token ids are the bytes themselves (the tiny Llama's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    symbol = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    tokenizer = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny test Llama (bf16 weights, 2 layers, GQA 4/2) with a byte tokenizer: a float checkpoint."""
    path = tmp_path_factory.mktemp("calibration") / "llama-tiny"
    shutil.copytree(DATA / "llama-tiny", path)
    byte_tokenizer().save_pretrained(path)
    return path


def _engine(path: Path, **options) -> LLM:
    return LLM(
        model=str(path), **{"device": "cpu", "dtype": "float32", "kv_cache_max_tokens": 256, **options}
    )


def _prompt_logprobs(llm: LLM) -> torch.Tensor:
    """log p(token i | tokens < i) of the prompt's tokens after the first."""
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    return torch.tensor([entry[t] for entry, t in zip(out.prompt_logprobs[1:], PROMPT[1:])])


def _greedy(llm: LLM, n: int = 8) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids


# ---- the algorithms, on tensors ---------------------------------------------------------------


def test_round_to_nearest_grid_with_a_narrower_last_group():
    torch.manual_seed(0)
    w = torch.randn(16, 80)  # groups of 32: 32, 32 and a last one of 16 columns
    for symmetric in (True, False):
        q = quantize_rtn(w, QuantScheme(4, 32, symmetric=symmetric))
        assert q.scales.shape == q.zeros.shape == (16, 3)
        assert torch.equal(q.g_idx, torch.arange(80) // 32)
        assert torch.equal(q.scales.half().float(), q.scales)  # the fp16 checkpoints store them exactly
        assert bool((q.zeros == 8).all()) == symmetric
        step = q.scales[:, q.g_idx]
        error = (q.dequantize() - w).abs()
        inside = error <= step / 2 + 1e-6
        # only GPTQ's symmetric grid leaves a point outside: +max|w| above its highest code, 7 steps
        assert bool(inside.all()) or symmetric
        assert float(inside.float().mean()) > 0.97
    w[:, 64:] = 0  # an all-zero group dequantizes to zeros
    assert torch.equal(quantize_rtn(w, QuantScheme(4, 32, symmetric=False)).dequantize()[:, 64:], w[:, 64:])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(bits=3), r"bits=3 is not supported"),
        (dict(bits=8), r"bits=8 is not supported"),
        (dict(group_size=100), r"group_size=100 is not supported"),
        (dict(group_size=0), r"group_size=0 is not supported"),
    ],
)
def test_unsupported_bits_or_group_size_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        QuantScheme(**options)


def _correlated_inputs(n: int, k: int) -> torch.Tensor:
    """Inputs whose channels are correlated and of unequal size, as a layer's are: scales within e^+-2
    of each other. (Unbounded, a seed in ~100 gave one channel so large that GPTQ's gain over rounding
    to nearest fell below the 20% the test asks for; bounded, none in 400 seeds came within 3% of it.)"""
    x = torch.randn(n, k) @ (torch.eye(k) + 0.3 * torch.randn(k, k))
    return x * torch.exp(torch.randn(k).clamp(-2, 2))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_is_lower_than_round_to_nearest(symmetric, act_order, seed):
    x = _correlated_inputs(1024, 128)
    w = torch.randn(48, 128)
    hessian = gptq.Hessian(128, torch.device("cpu"))
    for part in x.split(300):  # accumulated over batches
        hessian.add(part)
    torch.testing.assert_close(hessian.matrix, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    scheme = QuantScheme(4, 32, symmetric=symmetric)
    ours = gptq.gptq_quantize(w, hessian.matrix, scheme, act_order=act_order, block_size=32)
    rtn = quantize_rtn(w, scheme)
    assert torch.equal(ours.g_idx, torch.arange(128) // 32)  # static groups: contiguous in any order

    def output_error(q):
        return float((x @ (q.dequantize() - w).T).pow(2).mean())

    assert output_error(ours) < 0.8 * output_error(rtn)


def test_awq_scale_search_never_does_worse_than_scale_one(seed):
    x = torch.randn(512, 64)
    x[:, :4] *= 30  # a few salient input channels
    w = torch.randn(32, 64)
    scheme = QuantScheme(4, 32, symmetric=False)
    reference = x @ w.T

    def loss_of(trial):
        return float((x @ trial[0].T - reference).pow(2).mean())

    scales, losses = awq.search_scales(x.abs().mean(0), [w], loss_of, scheme)
    assert len(losses) == awq.DEFAULT_GRID + 1
    assert losses[0] == loss_of([fake_quantize(w, scheme)])  # the first candidate is scale 1
    best = loss_of([fake_quantize(w * scales, scheme) / scales])
    assert best == min(losses) < losses[0]  # salient channels: scaling helps
    # a loss no scaling can beat keeps scale 1
    scales, _ = awq.search_scales(
        x.abs().mean(0), [w], lambda t: 0.0 if torch.equal(t[0], fake_quantize(w, scheme)) else 1.0, scheme
    )
    assert torch.equal(scales, torch.ones(64))


def test_awq_clipping_never_does_worse_than_the_full_range(seed):
    x = torch.randn(256, 64)
    w = torch.randn(40, 64)
    w[0, 0] = 12.0  # an outlier that stretches its group's grid
    scheme = QuantScheme(4, 32, symmetric=False)
    extents = awq.search_clipping(w, x, scheme)
    full = w.view(40, 2, 32).abs().amax(-1)
    assert bool((extents <= full).all()) and bool((extents >= full / 2).all())

    def group_errors(q):
        return (x.view(256, 1, 2, 32) * (q - w).view(1, 40, 2, 32)).sum(-1).pow(2).mean(0)

    clipped, unclipped = (
        group_errors(fake_quantize(w, scheme, extents)),
        group_errors(fake_quantize(w, scheme)),
    )
    assert bool((clipped <= unclipped + 1e-6).all()) and float(clipped.sum()) < float(unclipped.sum())


# ---- tensorjet quantize -------------------------------------------------------------------------


def _in_memory_logprobs(tiny_dir: Path, method: str, checkpoint_format: str) -> torch.Tensor:
    """The calibrated model's own prompt log-probabilities, before any checkpoint is written."""
    source = resolve_model(str(tiny_dir))
    scheme = QuantScheme(4, GROUP, symmetric=checkpoint_format == "gptq")
    token_ids = calibration_samples(load_tokenizer(source), *SEQ_LEN)
    job = CalibrationJob(
        source,
        CalibrationOptions(method, scheme),
        checkpoint_format,
        token_ids,
        torch.device("cpu"),
        torch.float32,
    )
    model = calibrate_source(job, progress=False).model
    runner = LayerwiseRunner(model, torch.tensor([PROMPT]), torch.device("cpu"))
    for index in range(len(model.layers)):
        with runner.on_device(index) as layer:
            runner.advance(runner.forward(layer))
    with torch.no_grad():
        logits = model.compute_logits(model.norm(runner.chunks[0].hidden))
    return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]


@pytest.mark.parametrize(
    "method, checkpoint_format",
    [("awq", "awq"), ("gptq", "gptq"), ("rtn", "awq")],
)
def test_quantize_writes_a_checkpoint_that_loads_with_the_in_memory_logits(
    tiny_dir, tmp_path, method, checkpoint_format
):
    out = tmp_path / "checkpoint"
    argv = [
        "quantize",
        str(tiny_dir),
        "--method",
        method,
        "--format",
        checkpoint_format,
        "--output",
        str(out),
    ]
    assert main([*argv, *SAMPLES, "--group_size", str(GROUP)]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        config["quant_method"] == checkpoint_format and config["bits"] == 4 and config["group_size"] == GROUP
    )
    assert (out / "tokenizer.json").exists()
    llm = _engine(out)
    try:
        assert llm.engine.runner.weight_format == f"int4 ({checkpoint_format})"
        loaded = _prompt_logprobs(llm)
    finally:
        llm.shutdown()
    torch.testing.assert_close(
        loaded, _in_memory_logprobs(tiny_dir, method, checkpoint_format), rtol=0, atol=1e-4
    )


def _published_dequantize(tensors: dict, name: str, checkpoint_format: str, group: int) -> torch.Tensor:
    """W [N, K] by the formats' published unpacking (AutoAWQ's `dequantize_gemm`, AutoGPTQ's v1 zeros),
    written out here rather than through tensorjet's packing."""
    shifts = torch.arange(0, 32, 4)
    qweight, qzeros, scales = (tensors[f"{name}.{t}"] for t in ("qweight", "qzeros", "scales"))

    def along_n(words):  # [rows, N / 8] -> [rows, N], eight nibbles per word in order
        return ((words[:, :, None] >> shifts) & 15).reshape(words.shape[0], -1)

    if checkpoint_format == "awq":
        reverse = torch.arange(qweight.shape[1] * 8).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
        codes, zeros = along_n(qweight)[:, reverse], along_n(qzeros)[:, reverse]
        g_idx = torch.arange(codes.shape[0]) // group
    else:
        codes = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, qweight.shape[1])
        zeros = along_n(qzeros) + 1
        g_idx = tensors[f"{name}.g_idx"].long()
    return ((codes - zeros[g_idx]) * scales.float()[g_idx]).T


@pytest.mark.parametrize("checkpoint_format", ["awq", "gptq"])
def test_quantized_checkpoint_computes_what_transformers_computes_from_its_published_dequantization(
    tiny_dir, tmp_path, checkpoint_format
):
    """transformers reads AWQ and GPTQ checkpoints only through GPTQModel's kernels, not installed on
    the CPU test machine: it runs the same weights dequantized instead, by the formats' own rules."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "checkpoint"  # the format is the question here, not the method: round to nearest
    argv = ["quantize", str(tiny_dir), "--method", "rtn", "--format", checkpoint_format]
    assert main([*argv, "--output", str(out), "--group_size", str(GROUP)]) == 0
    tensors = load_file(out / "model.safetensors")
    state = {}
    for name in list(tensors):
        module, _, kind = name.rpartition(".")
        if kind == "qweight":
            state[f"{module}.weight"] = _published_dequantize(tensors, module, checkpoint_format, GROUP)
        elif kind not in ("qzeros", "scales", "g_idx"):
            state[name] = tensors[name].float()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
    theirs = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    llm = _engine(out)
    try:
        ours = _prompt_logprobs(llm)
        tokens = _greedy(llm)
    finally:
        llm.shutdown()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    sequence = list(PROMPT)
    with torch.no_grad():
        for _ in tokens:  # transformers' greedy continuation, one token at a time
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    assert tokens == sequence[len(PROMPT) :]


# ---- calibrate at load --------------------------------------------------------------------------


def test_calibrate_at_load_caches_the_checkpoint_for_the_next_load(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORJET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(at_load, "DEFAULT_NUM_SAMPLES", SEQ_LEN[0])
    monkeypatch.setattr(at_load, "DEFAULT_SEQ_LEN", SEQ_LEN[1])
    calls = []
    quantize = at_load.quantize_to_checkpoint

    def recording(job, *args):
        calls.append(job.checkpoint_format)
        return quantize(job, *args)

    monkeypatch.setattr(at_load, "quantize_to_checkpoint", recording)
    runs = []
    for options in ({"quantization": "gptq"}, {"dtype": "int4_gptq"}):  # the guide's two spellings
        llm = _engine(tiny_dir, **options)
        try:
            assert llm.engine.runner.weight_format == "int4 (gptq)"
            assert llm.engine.source.name.endswith("(gptq, calibrated)")
            runs.append(_greedy(llm))
        finally:
            llm.shutdown()
    assert calls == ["gptq"]  # the second load read the cache
    assert runs[0] == runs[1]
    cache = tmp_path / "cache" / "calibrated"
    (entry,) = (path for path in cache.iterdir() if path.is_dir())
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 2  # config and weights, for the next load
    assert json.loads((entry / at_load.MANIFEST_FILE).read_text())["method"] == "gptq"
    (entry / "model.safetensors").write_bytes(b"")  # a broken entry is made again, not trusted
    _engine(tiny_dir, quantization="gptq").shutdown()
    assert calls == ["gptq", "gptq"]


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bits", "3"], r"bits=3 is not supported"),
        (["--group_size", "100"], r"group_size=100 is not supported"),
        (["--num_samples", "5000"], r"too short: .* num_samples=5000 x seq_len=64 needs 320000"),
        (["--seq_len", "300", "--num_samples", "1"], r"seq_len=300 is longer than the model's 256 positions"),
        (["--num_samples", "0"], r"num_samples=0 must be >= 1"),
    ],
)
def test_quantize_bad_inputs_name_the_field(tiny_dir, tmp_path, capsys, extra, message):
    argv = [
        "quantize",
        str(tiny_dir),
        "--method",
        "gptq",
        "--output",
        str(tmp_path / "out"),
        *SAMPLES,
        *extra,
    ]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_quantize_refuses_a_quantized_model_a_short_text_and_a_used_output(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be")
    used = tmp_path / "used"
    used.mkdir()
    (used / "file").write_text("x")
    cases = [
        ([str(DATA / "llama-tiny-awq-gemm"), "--output", str(tmp_path / "a")], "already quantized (awq)"),
        (
            [str(tiny_dir), "--output", str(tmp_path / "b"), "--calibration_data", str(short)],
            "is too short: 19 tokens",
        ),
        ([str(tiny_dir), "--output", str(used)], "exists and is not an empty directory"),
    ]
    for args, message in cases:
        assert main(["quantize", *args, "--method", "awq", *SAMPLES]) == 2
        assert message in capsys.readouterr().err
