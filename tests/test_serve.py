"""The OpenAI-compatible server end to end: the official `openai` client against a real uvicorn server
on 127.0.0.1, serving the shared bundled-model LLM; results are compared with the in-process API."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prompts import CHAT, PLAIN, varied_prompts
from serving import running_server

from tensorjet import SamplingParams
from tensorjet.serve.app import build_app
from tensorjet.serve.cli import build_parser, resolve_args
from tensorjet.serve.options import DEFAULT_SERVED_MODEL_NAME, ServerOptions

MODEL = DEFAULT_SERVED_MODEL_NAME


@pytest.fixture(scope="module")
def base_url(llm):
    with running_server(build_app(llm)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(llm, prompt, max_tokens: int, **options) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **options)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


def chat_greedy(llm, content: str, max_tokens: int) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return llm.chat([{"role": "user", "content": content}], params, use_tqdm=False)[0].outputs[0].text


def scrape(base_url: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels folded in), parsed by prometheus_client."""
    text = httpx.get(f"{base_url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def wait_for_idle_kv(base_url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(base_url)
        if m["tensorjet_kv_cache_blocks_used"] == 0 and m["tensorjet_num_requests_running"] == 0:
            return m
        assert time.monotonic() < deadline, f"KV blocks still in use: {m['tensorjet_kv_cache_blocks_used']}"
        time.sleep(0.05)


# ---- 1. completions and chat equal the in-process API ---------------------------------------------
def test_completion_greedy_equals_generate(client, llm):
    prompt = PLAIN[0]
    expected = greedy(llm, prompt, 12)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == MODEL
    n_prompt = len(llm.tokenizer.encode(prompt))
    assert r.usage.prompt_tokens == n_prompt and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens

    chunks = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_greedy_equals_llm_chat(client, llm):
    content = CHAT[0]
    expected = chat_greedy(llm, content, 12)
    messages = [{"role": "user", "content": content}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(llm.apply_chat_template(messages))

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_prompt_batch_of_text_and_token_ids(client, llm):
    ids = llm.tokenizer.encode(PLAIN[2])
    r = client.completions.create(model=MODEL, prompt=[PLAIN[1], PLAIN[3]], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [greedy(llm, PLAIN[1], 6), greedy(llm, PLAIN[3], 6)]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy(llm, PLAIN[2], 6) and r.usage.prompt_tokens == len(ids)


# ---- 2. n, stop, logprobs, echo, seed --------------------------------------------------------------
def test_n_and_seed_reproducibility(client):
    def sample(seed: int, n: int = 2) -> list[str]:
        r = client.completions.create(
            model=MODEL, prompt=PLAIN[1], max_tokens=8, temperature=1.0, n=n, seed=seed
        )
        assert sorted(c.index for c in r.choices) == list(range(n)) and r.usage.completion_tokens > n
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = sample(seed=7)
    assert sample(seed=7) == first
    streamed = ["", ""]
    for chunk in client.completions.create(
        model=MODEL, prompt=PLAIN[1], max_tokens=8, temperature=1.0, n=2, seed=7, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == first
    assert len({tuple(sample(seed=s)) for s in (1, 2)} | {tuple(first)}) > 1


def test_stop_string_cuts_the_output(client, llm):
    full = greedy(llm, PLAIN[1], 16)
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    r = client.completions.create(model=MODEL, prompt=PLAIN[1], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_completion_logprobs_legacy_format(client):
    r = client.completions.create(model=MODEL, prompt=PLAIN[4], max_tokens=8, temperature=0, logprobs=3)
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert logprob == max(top.values()) and top[token] == logprob  # greedy picks the argmax

    chunks = client.completions.create(
        model=MODEL, prompt=PLAIN[4], max_tokens=8, temperature=0, logprobs=3, stream=True
    )
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


def test_chat_logprobs_format(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": CHAT[3]}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for entry in content:
        assert bytes(entry.bytes).decode("utf-8") == entry.token
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob


def test_echo_with_zero_max_tokens_scores_the_prompt(client, llm):
    """lm-eval's loglikelihood request: token-id prompts, echo, max_tokens=0, logprobs=1."""
    prompts = [llm.tokenizer.encode(PLAIN[0]), llm.tokenizer.encode(PLAIN[5])]
    r = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    assert r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == sum(map(len, prompts))
    choices = sorted(r.choices, key=lambda c: c.index)
    ref_params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    for choice, ids in zip(choices, prompts):
        assert choice.text == llm.tokenizer.decode(ids) and choice.finish_reason == "length"
        ref = llm.generate(ids, ref_params, use_tqdm=False)[0].prompt_logprobs
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(ids)):
            assert lp.token_logprobs[i] == pytest.approx(ref[i][ids[i]], abs=1e-4)
            assert max(lp.top_logprobs[i].values()) == pytest.approx(max(ref[i].values()), abs=1e-4)

    # Newer lm-eval asks for one token and drops it itself: the prompt's entries, then that token's.
    r1 = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=1, echo=True, logprobs=1)
    lp1 = r1.choices[0].logprobs
    assert r1.usage.completion_tokens == 1 and len(lp1.tokens) == len(prompts[0]) + 1
    assert lp1.token_logprobs[:-1] == pytest.approx(choices[0].logprobs.token_logprobs, abs=1e-4)
    assert r1.choices[0].text.startswith(choices[0].text)

    chunks = list(
        client.completions.create(model=MODEL, prompt=PLAIN[0], max_tokens=0, echo=True, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == PLAIN[0]


# ---- 3. concurrency ---------------------------------------------------------------------------------
def test_64_concurrent_streams_are_correct_and_independent(base_url, llm):
    """64 greedy streams, plus bad requests and a client that leaves mid-stream among them."""
    prompts = varied_prompts(8, seed=3, min_words=3, max_words=30)
    expected = {p: greedy(llm, p, 8) for p in prompts}
    jobs = [prompts[i % len(prompts)] for i in range(64)]

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await aclient.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def bad(aclient: openai.AsyncOpenAI, **request) -> int:
        try:
            await aclient.completions.create(**{"model": MODEL, "max_tokens": 4, **request})
        except openai.APIStatusError as error:
            return error.status_code
        return 200

    async def leaver(aclient: openai.AsyncOpenAI) -> str:
        stream = await aclient.completions.create(
            model=MODEL, prompt=PLAIN[1], max_tokens=500, stream=True, extra_body={"ignore_eos": True}
        )
        async for _ in stream:
            break
        await stream.close()
        return "left"

    async def run_all() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        async with aclient:
            return await asyncio.gather(
                *(one(aclient, p) for p in jobs),
                bad(aclient, prompt=[1] * 9000),
                bad(aclient, prompt="hi", model="other"),
                bad(aclient, prompt="hi", temperature=-1),
                leaver(aclient),
            )

    before = scrape(base_url)
    results = asyncio.run(run_all())
    assert results[:64] == [expected[p] for p in jobs]
    assert results[64:] == [400, 404, 400, "left"]
    after = wait_for_idle_kv(base_url, timeout=10)
    assert after["tensorjet_kv_cache_blocks_free"] == after["tensorjet_kv_cache_blocks_total"]
    for outcome, count in (("finished", 64), ("aborted", 1)):
        name = f'tensorjet_requests_total{{outcome="{outcome}"}}'
        assert after[name] - before.get(name, 0) == count


# ---- 4. disconnects and bad input -------------------------------------------------------------------
def test_client_disconnect_mid_stream_frees_its_blocks(client, base_url):
    before = scrape(base_url)
    stream = client.completions.create(
        model=MODEL,
        prompt=PLAIN[1],
        max_tokens=2000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    during = scrape(base_url)
    assert during["tensorjet_kv_cache_blocks_used"] > 0 and during["tensorjet_num_requests_running"] == 1
    stream.close()
    after = wait_for_idle_kv(base_url, timeout=5)
    generated = after["tensorjet_generation_tokens_total"] - before["tensorjet_generation_tokens_total"]
    assert generated < 500  # aborted, not run to max_tokens
    aborted = 'tensorjet_requests_total{outcome="aborted"}'
    assert after[aborted] - before.get(aborted, 0) == 1


def test_client_disconnect_without_streaming_aborts_too(base_url):
    before = scrape(base_url)
    body = {"prompt": PLAIN[1], "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=1.5)
    after = wait_for_idle_kv(base_url, timeout=5)
    assert after["tensorjet_generation_tokens_total"] - before["tensorjet_generation_tokens_total"] < 500


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "x", "prompt": "hi",', 400, None),
    ("/v1/completions", b"not json at all", 400, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1] * 9000, "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 9000}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "x"}, 404, "model"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_documented_4xx(base_url, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{base_url}{path}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_errors_through_the_openai_client_and_the_server_keeps_serving(client, llm):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum sequence length is 8192"):
        client.completions.create(model=MODEL, prompt=[1] * 8192, max_tokens=2)
    r = client.completions.create(model=MODEL, prompt=PLAIN[3], max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy(llm, PLAIN[3], 6)


def test_queue_limit_rejects_with_429_and_recovers(llm):
    """A second app on the same engine with max_queue_size=1: a request waiting for its first token (a
    long prompt still in prefill) fills the queue; the next gets 429; later ones are served."""
    long_prompt = " ".join(varied_prompts(12, seed=11, min_words=40, max_words=40))
    with running_server(build_app(llm, ServerOptions(max_queue_size=1))) as url:
        qclient = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        first = qclient.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4, stream=True)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            qclient.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert "".join(c.choices[0].text for c in first if c.choices)
        assert qclient.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text
        assert scrape(url)['tensorjet_requests_total{outcome="rejected"}'] == 1


# ---- 5. metrics and the small endpoints ---------------------------------------------------------------
def test_metrics_parse_and_move(client, base_url):
    before = scrape(base_url)
    for name in (
        "tensorjet_num_requests_running",
        "tensorjet_num_requests_waiting",
        "tensorjet_kv_cache_usage_ratio",
        "tensorjet_prefix_cache_hit_rate",
        "tensorjet_num_preemptions_total",
    ):
        assert name in before
    client.completions.create(
        model=MODEL, prompt=PLAIN[5], max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    after = scrape(base_url)
    assert after["tensorjet_prompt_tokens_total"] > before["tensorjet_prompt_tokens_total"]
    assert after["tensorjet_generation_tokens_total"] - before["tensorjet_generation_tokens_total"] == 5
    for hist in ("time_to_first_token", "e2e_request_latency"):
        name = f"tensorjet_{hist}_seconds_count"
        assert after[name] == before.get(name, 0) + 1
    itl = "tensorjet_inter_token_latency_seconds_count"
    assert after[itl] - before.get(itl, 0) == 4


def test_models_tokenize_detokenize_health_version(client, base_url, llm):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert httpx.get(f"{base_url}/version").json()["version"]
    r = httpx.post(f"{base_url}/tokenize", json={"model": MODEL, "prompt": PLAIN[0]}).json()
    assert r["tokens"] == llm.tokenizer.encode(PLAIN[0]) and r["count"] == len(r["tokens"])
    messages = [{"role": "user", "content": CHAT[1]}]
    r = httpx.post(f"{base_url}/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == llm.apply_chat_template(messages)
    r = httpx.post(f"{base_url}/detokenize", json={"tokens": llm.tokenizer.encode(PLAIN[0])}).json()
    assert r["prompt"] == PLAIN[0]


# ---- the command line ---------------------------------------------------------------------------------
def test_cli_flags_config_file_and_precedence(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "max_batch_size: 64\nmax-num-tokens: 1024\nscheduler_policy: guaranteed_no_evict\n"
        "enable_chunked_context: false\nport: 9001\nserved_model_name: from-file\n"
    )
    argv = [
        "serve",
        "--config",
        str(config),
        "--max_batch_size",
        "8",
        "--kv-cache-free-gpu-mem-fraction",
        "0.5",
    ]
    args = resolve_args(build_parser().parse_args(argv))
    assert args.max_batch_size == 8 and args.max_num_tokens == 1024  # flag beats file; file fills the rest
    assert args.enable_chunked_context is False and args.scheduler_policy == "guaranteed_no_evict"
    assert args.kv_cache_free_gpu_mem_fraction == 0.5 and args.port == 9001 and args.host == "127.0.0.1"
    assert args.served_model_name == "from-file" and args.model is None

    args = resolve_args(build_parser().parse_args(["serve", "some/model", "--enable_chunked_context"]))
    assert (
        args.served_model_name == "some/model" and args.enable_chunked_context is True and args.port == 8000
    )

    config.write_text("max_batch_size: lots\n")
    with pytest.raises(SystemExit):
        resolve_args(build_parser().parse_args(["serve", "--config", str(config)]))
    config.write_text("no_such_option: 1\n")
    with pytest.raises(SystemExit):
        resolve_args(build_parser().parse_args(["serve", "--config", str(config)]))


@pytest.mark.slow  # a server process on the bundled model
def test_cli_serve_starts_a_working_server(tmp_path):
    """`serve` as a real process: the banner, a completion with --served_model_name, clean shutdown."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "tensorjet.serve.cli", "serve", "--port", str(port)]
    argv += ["--served-model-name", "tiny", "--kv_cache_max_tokens", "4096", "--max_batch_size", "4"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        sub = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        r = sub.completions.create(model="tiny", prompt=PLAIN[0], max_tokens=3)
        assert r.model == "tiny" and r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert (
        "tensorjet serve: model=SmolLM2-135M-Instruct" in text
        and "served as tiny" in text
        and "kv_cache=256 blocks x 16 = 4096 tokens" in text
    )
    assert "dtype=float32 device=cpu" in text
    assert f"{r.id} finished: tokens in=" in text
