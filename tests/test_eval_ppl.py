"""`tensorjet eval ppl` and `perplexity(llm, text)`: the engine's perplexity equals the one computed
from HF transformers' logits over the same windows, the command prints and writes it, and bad input
ends with a message naming the flag and its limit."""

import json
import math
import subprocess
import sys

import pytest
import torch

from tensorjet.eval.perplexity import first_scored_position, perplexity, tokenizer_adds_bos, windows_of

CLI = [sys.executable, "-m", "tensorjet.cli", "eval", "ppl"]
CONTEXT_LEN = 64
# 2 windows of 64 tokens of the bundled model's tokenizer, and a tail left out of both.
MAX_CHARS = 700
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a "
    "cloth for the lens. From the gallery he could see the whole bay: the fishing boats coming home, "
    "the gulls settling on the breakwater, and far out to sea the grey line where the weather would "
    "come from. He wrote the wind and the state of the sea in a book that his father had kept before "
    "him, in the same careful hand, and on stormy nights he did not sleep at all. When the lamp was lit "
    "and turning, its beam swept over the water every ten seconds, and the captains who knew the coast "
    "counted the flashes to tell which headland they were passing. In the morning he walked down to the "
    "village for bread and news, and the children asked him whether he had seen any ships go down. He "
    "always told them that the light was there so that none would, and that was the whole of his work. "
    "Years later, when the lamp was made electric and the keeper's cottage was sold, the book went to "
    "the museum in town, where it lies open under glass at a page from a winter long ago."
)


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=300)


def hf_scored_nlls(hf_model, windows: list[list[int]], first: int) -> torch.Tensor:
    """-log p of every scored token, from one HF forward per window."""
    nlls = []
    with torch.no_grad():
        for window in windows:
            logprobs = hf_model(torch.tensor([window])).logits[0].double().log_softmax(-1)
            targets = torch.tensor(window[first + 1 :])
            nlls.append(-logprobs[first : len(window) - 1].gather(1, targets[:, None])[:, 0])
    return torch.cat(nlls)


@pytest.mark.parametrize(("score_from", "add_bos"), [(0.5, None), (0.0, True)])
def test_perplexity_equals_the_one_from_hf_logits(llm, hf_model, score_from, add_bos):
    result = perplexity(
        llm, TEXT, context_len=CONTEXT_LEN, score_from=score_from, max_chars=MAX_CHARS, add_bos=add_bos
    )
    ids = llm.tokenizer.encode(TEXT[:MAX_CHARS], add_special_tokens=False)
    assert len(ids) >= 2 * CONTEXT_LEN and len(ids) < 3 * CONTEXT_LEN
    windows = [ids[:CONTEXT_LEN], ids[CONTEXT_LEN : 2 * CONTEXT_LEN]]
    if add_bos:
        windows = [[llm.tokenizer.bos_token_id] + w[1:] for w in windows]
    first = int(score_from * CONTEXT_LEN)
    nlls = hf_scored_nlls(hf_model, windows, first)

    assert result.num_windows == 2 and result.num_text_tokens == len(ids)
    assert result.add_bos is bool(add_bos) and result.first_scored_position == first
    assert result.num_scored_tokens == len(nlls) == 2 * (CONTEXT_LEN - 1 - first)
    assert result.token_nlls == pytest.approx(nlls.tolist(), abs=1e-3)
    assert result.nll == pytest.approx(nlls.mean().item(), abs=2e-4)
    assert result.perplexity == pytest.approx(math.exp(nlls.mean().item()), rel=2e-4)
    stderr = result.perplexity * (nlls.var(unbiased=False).item() / (len(nlls) - 1)) ** 0.5
    assert result.perplexity_stderr == pytest.approx(stderr, rel=1e-3)
    assert result.seconds > 0 and result.tokens_per_second == pytest.approx(2 * CONTEXT_LEN / result.seconds)


def test_the_bundled_tokenizer_adds_no_bos(llm):
    """As the GGUF says (tokenizer.ggml.add_bos_token false): llama.cpp scores it without BOS too."""
    assert llm.tokenizer.bos_token_id is not None and not tokenizer_adds_bos(llm.tokenizer)
    assert perplexity(llm, TEXT, context_len=CONTEXT_LEN, use_tqdm=False).add_bos is False


def test_windows_do_not_overlap_and_bos_replaces_the_first_token():
    ids = list(range(10, 21))  # 11 tokens: 2 windows of 5 and a tail of 1
    assert windows_of(ids, 5, None) == [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    assert windows_of(ids, 5, 1) == [[1, 11, 12, 13, 14], [1, 16, 17, 18, 19]]
    assert windows_of(ids, 12, None) == []


def test_first_scored_position_is_llama_cpps_half_and_leaves_a_token():
    assert first_scored_position(512, 0.5) == 256  # 255 scored tokens per window, as llama.cpp
    assert first_scored_position(64, 0.0) == 0
    with pytest.raises(ValueError, match="context_len must be >= 2"):
        first_scored_position(1, 0.5)
    with pytest.raises(ValueError, match="score_from must be in"):
        first_scored_position(64, 1.0)
    with pytest.raises(ValueError, match="score_from=0.99 leaves no token"):
        first_scored_position(64, 0.99)


def test_text_shorter_than_one_window_names_context_len(llm):
    with pytest.raises(ValueError, match=r"shorter than one window of context_len=512"):
        perplexity(llm, TEXT, max_chars=MAX_CHARS, use_tqdm=False)


def test_context_len_past_max_seq_len_names_the_limit(llm):
    limit = llm.engine.max_seq_len - 1
    with pytest.raises(ValueError, match=rf"context_len must be at most {limit} .*got {limit + 1}"):
        perplexity(llm, TEXT, context_len=limit + 1, use_tqdm=False)


def test_empty_text_is_an_error(llm):
    with pytest.raises(ValueError, match="text is empty"):
        perplexity(llm, "  \n", use_tqdm=False)


@pytest.mark.slow  # the bundled model, in a subprocess
def test_cli_prints_and_writes_the_perplexity(default_llm, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "ppl.json"
    result = run(
        ["--data", str(data), "--context_len", str(CONTEXT_LEN), "--max_chars", str(MAX_CHARS)]
        + ["--device", "cpu", "--json", str(out)]
    )
    assert result.returncode == 0, result.stderr
    expected = perplexity(default_llm, TEXT, context_len=CONTEXT_LEN, max_chars=MAX_CHARS, use_tqdm=False)
    assert f"perplexity: {expected.perplexity:.4f} +/- {expected.perplexity_stderr:.4f}" in result.stdout
    assert f"over {expected.num_scored_tokens} scored tokens" in result.stdout
    assert "generating" in result.stderr and "2/2" in result.stderr  # tqdm writes to stderr
    written = json.loads(out.read_text())
    for name, value in expected.to_dict().items():
        if name not in ("seconds", "tokens_per_second"):
            assert written[name] == pytest.approx(value, rel=1e-9), name


@pytest.mark.slow  # the bundled model, in a subprocess
def test_cli_text_shorter_than_one_window_is_a_clean_error(tmp_path):
    data = tmp_path / "short.txt"
    data.write_text(TEXT)
    result = run(["--data", str(data), "--context_len", "512", "--device", "cpu"])
    assert result.returncode == 2 and "shorter than one window of context_len=512" in result.stderr
    assert "Traceback" not in result.stderr


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "text.txt"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda tmp: ["--data", str(tmp / "missing.txt")], "--data {tmp}/missing.txt: cannot read it"),
        (lambda tmp: ["--data", _write(tmp, " \n")], "--data {tmp}/text.txt is empty"),
        (lambda tmp: ["--data", _write(tmp, TEXT), "--context_len", "1"], "context_len must be >= 2"),
        (lambda tmp: ["--data", _write(tmp, TEXT), "--score_from", "1"], "score_from must be in [0, 1)"),
        (
            lambda tmp: ["--data", _write(tmp, TEXT), "--max_chars", "0"],
            "argument --max_chars/--max-chars: must be >= 1",
        ),
    ],
    ids=["missing_file", "empty_file", "context_len_1", "score_from_1", "max_chars_0"],
)
def test_cli_bad_input_is_a_clean_error_before_loading_the_model(tmp_path, capsys, args, message):
    from tensorjet.cli import main

    try:
        code = main(["eval", "ppl"] + args(tmp_path) + ["--device", "cpu"])
    except SystemExit as error:  # argparse's own checks
        code = error.code
    assert code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_cli_takes_every_engine_option():
    """Like `tensorjet generate`: each engine option's flag reaches the engine (`--dtype fp8` as well)."""
    from tensorjet.cli import build_parser
    from tensorjet.config import ENGINE_OPTIONS
    from tensorjet.engine_args import engine_options

    parser = build_parser()
    required = ["eval", "ppl", "--data", "text.txt"]
    assert engine_options(parser.parse_args(required)) == {"model": None}
    assert engine_options(parser.parse_args([*required, "--model", "m"])) == {"model": "m"}
    samples = {int: ("3", 3), float: ("0.5", 0.5), str: ("x", "x"), bool: ("off", False)}
    for spec in ENGINE_OPTIONS.values():
        if spec.name != "model":
            text, value = samples[spec.type]
            assert engine_options(parser.parse_args([*required, f"--{spec.name}", text]))[spec.name] == value
