"""Acceptance 7: `tensorjet generate` and `tensorjet chat` from the command line, default model."""

import subprocess
import sys

import pytest

from tensorjet import SamplingParams

CLI = [sys.executable, "-m", "tensorjet.cli"]


def run(args, stdin=None):
    return subprocess.run(CLI + args, input=stdin, capture_output=True, text=True, timeout=300)


def test_generate_streams_the_greedy_completion(default_llm):
    prompt = "The capital of France is"
    result = run(["generate", prompt, "--max_tokens", "12", "--device", "cpu"])
    assert result.returncode == 0, result.stderr
    expected = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert result.stdout.strip() == expected.outputs[0].text.strip()


@pytest.mark.slow  # the bundled model, in a subprocess
def test_generate_batch_shows_a_progress_bar_and_all_outputs():
    result = run(["generate", "One plus one is", "The sky is", "--max_tokens", "6", "--device", "cpu"])
    assert result.returncode == 0, result.stderr
    assert "=== One plus one is" in result.stdout and "=== The sky is" in result.stdout
    assert "generating" in result.stderr and "2/2" in result.stderr  # tqdm writes to stderr


def test_chat_reads_turns_from_stdin(default_llm):
    result = run(
        ["chat", "--max_tokens", "10", "--device", "cpu"], stdin="What is the capital of France?\n\n"
    )
    assert result.returncode == 0, result.stderr
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = default_llm.chat(messages, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert expected.outputs[0].text.strip() in result.stdout


def test_bad_option_is_a_clean_error():
    result = run(["generate", "hi", "--scheduler_policy", "fastest", "--device", "cpu"])
    assert result.returncode == 2 and "scheduler_policy" in result.stderr
    assert "Traceback" not in result.stderr
