"""The server against hostile but realistic clients, on a tiny random-weight model (it serves in
milliseconds): nothing a request multiplies is unbounded, lax or non-finite input is a 400 naming the
field, a 500 shows only an id (a dead engine: a 503 saying why), the tokenizer runs off the event loop,
the API key, Host check, body limit and docs switch, and a SIGTERM that drains or cancels in bounded
time."""

import asyncio
import json
import logging
import math
import signal
import socket
import subprocess
import sys
import time

import httpx2 as httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from serving import make_tiny_chat_model, running_server

from tensorjet import LLM
from tensorjet.engine.engine_loop import EngineDeadError
from tensorjet.serve.app import build_app
from tensorjet.serve.cli import build_parser, resolve_args, server_options
from tensorjet.serve.options import API_KEY_ENV, DEFAULT_MAX_N, ServerOptions
from tensorjet.serve.tokenization import Tokenization

# Servers on the tiny model (well under a second each to start), and a bounded schemathesis run.
pytestmark = pytest.mark.slow

MAX_POSITIONS = 64
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), MAX_POSITIONS)


@pytest.fixture(scope="module")
def tiny_llm(tiny_model):
    llm = LLM(tiny_model, load_format="dummy", device="cpu", kv_cache_max_tokens=4096)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def url(tiny_llm):
    with running_server(build_app(tiny_llm)) as base:
        yield base


def post(base: str, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base}{path}", content=content, headers=JSON, timeout=10, **kwargs)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def kv_blocks_used(llm) -> int:
    return llm.stats()["kv_blocks_used"]


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---- 1. what a request multiplies is bounded ---------------------------------------------------------
def test_huge_n_is_refused_at_once_and_the_server_keeps_answering(url):
    start = time.monotonic()
    r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1, "n": 2147483648})
    assert_error(r, 400, "n")
    assert_error(
        post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1, "n": DEFAULT_MAX_N + 1}), 400, "n"
    )
    assert time.monotonic() - start < 2
    assert httpx.get(f"{url}/health", timeout=2).status_code == 200
    r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1, "n": DEFAULT_MAX_N})
    assert r.status_code == 200 and len(r.json()["choices"]) == DEFAULT_MAX_N


def test_max_n_and_max_sequences_options(tiny_llm):
    options = ServerOptions(max_n=2, max_sequences=4)
    with running_server(build_app(tiny_llm, options)) as base:
        assert_error(post(base, "/v1/completions", {"prompt": "x", "max_tokens": 1, "n": 3}), 400, "n")
        three_prompts = {"prompt": ["a", "b", "c"], "max_tokens": 1, "n": 2}  # 6 sequences > 4
        assert_error(post(base, "/v1/completions", three_prompts), 400, "n")
        assert post(base, "/v1/completions", {**three_prompts, "prompt": ["a", "b"]}).status_code == 200

        # Two long streams of 2 sequences each fill the server; a third request waits its turn (429).
        long = {"prompt": "x", "max_tokens": 60, "n": 2, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=10) as client:
            with client.stream("POST", f"{base}/v1/completions", json=long) as first:
                with client.stream("POST", f"{base}/v1/completions", json=long) as second:
                    assert first.status_code == second.status_code == 200
                    r = post(base, "/v1/completions", {"prompt": "x", "max_tokens": 1})
                    assert_error(r, 429)
                    assert r.headers["retry-after"] == "1"
        wait_until(lambda: kv_blocks_used(tiny_llm) == 0)
        assert post(base, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_max_tokens_past_the_context_is_a_400_not_cut(url, tiny_llm):
    prompt = tiny_llm.tokenizer.encode("the quick brown fox")
    room = MAX_POSITIONS - len(prompt)
    r = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": room, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == room
    error = assert_error(post(url, "/v1/completions", {"prompt": prompt, "max_tokens": room + 1}), 400)
    assert (
        error["param"] == "max_tokens" and f"maximum sequence length is {MAX_POSITIONS}" in error["message"]
    )
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": MAX_POSITIONS - 1}
    assert_error(post(url, "/v1/chat/completions", chat), 400, "max_completion_tokens")
    assert_error(post(url, "/v1/completions", {"prompt": [5] * MAX_POSITIONS}), 400, "prompt")


@pytest.mark.parametrize(
    "stop",
    [["s"] * 17, "x" * 65, [""], ["ok", 5]],
    ids=["too-many", "too-long", "empty", "not-a-string"],
)
def test_stop_strings_are_bounded(url, stop):
    assert_error(post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1, "stop": stop}), 400, "stop")


# ---- 2. no 500 for bad text or seeds; a 500 shows only an id -------------------------------------------
SURROGATE = '"a\\ud800b"'  # JSON's escape of a lone surrogate


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", '{"prompt": %s}', "prompt"),
        ("/v1/completions", '{"prompt": "x", "stop": [%s]}', "stop"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}]}', "messages"),
        ("/v1/chat/completions", '{"messages": [{"role": %s, "content": "hi"}]}', "messages"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}',
            "messages",
        ),
        ("/tokenize", '{"prompt": %s}', "prompt"),
        ("/v1/completions", '{"prompt": "x", "model": %s}', "model"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(url, path, raw, param):
    assert_error(post(url, path, (raw % SURROGATE).encode()), 400, param)


@pytest.mark.parametrize(
    ("seed", "n", "status"),
    [(2**63, 1, 400), (-(2**63) - 1, 1, 400), (2**63 - 1, 2, 400), (2**63 - 1, 1, 200), (-(2**63), 3, 200)],
)
def test_seeds_must_fit_64_bits_with_seed_plus_i(url, seed, n, status):
    r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1, "seed": seed, "n": n})
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert_error(r, status, "seed")


def test_a_500_shows_a_request_id_and_logs_the_traceback_once(url, monkeypatch, caplog):
    async def broken(self, text, add_special_tokens=True):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(Tokenization, "encode", broken)
    with caplog.at_level(logging.INFO):
        r = post(url, "/tokenize", {"prompt": "hi"})
    error = assert_error(r, 500)
    assert "secret" not in r.text and error["type"] == "internal_error"
    request_id = error["message"].split("request id ")[1].split(")")[0]
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and request_id in tracebacks[0].getMessage()
    assert "secret internal detail" in caplog.text
    assert post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_an_engine_failure_shows_a_request_id_and_is_logged_once(url, tiny_llm, monkeypatch, caplog):
    def broken_step():
        raise RuntimeError("secret engine detail")

    monkeypatch.setattr(tiny_llm.engine, "step", broken_step)
    with caplog.at_level(logging.INFO):
        r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        error = assert_error(r, 500)
        assert "secret" not in r.text and "request id" in error["message"]
        r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True})
        assert r.status_code == 200 and "secret" not in r.text
        event = json.loads(r.text.split("data: ")[1])
        assert event["error"]["type"] == "internal_error" and "request id" in event["error"]["message"]
    assert len([rec for rec in caplog.records if rec.exc_info]) == 2  # the engine loop's, one per failure
    monkeypatch.undo()
    assert post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_an_engine_that_can_run_no_request_answers_503_saying_why(long_context_model):
    """What a tensor-parallel engine whose worker died does (`EngineLoop.fail`, from its watchdog): the
    running stream ends with a 503 event, /health and new requests answer 503, each with the reason."""
    llm = LLM(long_context_model, load_format="dummy", device="cpu", kv_cache_max_tokens=8192)
    try:
        with running_server(build_app(llm)) as base:
            assert httpx.get(f"{base}/health").status_code == 200
            body = {"prompt": "x", "max_tokens": 8000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as events:
                lines = events.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))  # generating
                llm.loop.fail(EngineDeadError("the engine stopped: worker 1 is gone"))
                rest = [line for line in lines if line.startswith("data:")]
            assert rest[-1] == "data: [DONE]"
            event = json.loads(rest[-2].removeprefix("data: "))["error"]
            assert event["type"] == "service_unavailable" and "worker 1 is gone" in event["message"]
            assert "worker 1 is gone" in assert_error(httpx.get(f"{base}/health"), 503)["message"]
            r = post(base, "/v1/completions", {"prompt": "x", "max_tokens": 1})
            assert "worker 1 is gone" in assert_error(r, 503)["message"]
    finally:
        llm.shutdown()


# ---- 3. the event loop never waits for the tokenizer -----------------------------------------------------
def test_a_prompt_too_long_for_the_context_is_refused_by_its_bytes(url, tiny_llm, monkeypatch):
    limit = Tokenization(tiny_llm, MAX_POSITIONS).max_prompt_bytes
    assert limit is not None and limit < 2000  # 64 positions x the longest token's bytes

    def never(*args, **kwargs):
        raise AssertionError("tokenized a prompt its byte length already rules out")

    monkeypatch.setattr(tiny_llm.tokenizer, "encode", never)
    error = assert_error(post(url, "/v1/completions", {"prompt": "a" * (limit + 1)}), 400, "prompt")
    assert f"maximum sequence length is {MAX_POSITIONS}" in error["message"]


def test_health_answers_while_a_large_body_is_tokenized(url, tiny_llm, monkeypatch):
    """A slow tokenizer stands in for a megabytes-long /tokenize: /health must not wait for it."""
    encode = tiny_llm.tokenizer.encode

    def slow_encode(*args, **kwargs):
        time.sleep(1.5)
        return encode(*args, **kwargs)

    monkeypatch.setattr(tiny_llm.tokenizer, "encode", slow_encode)

    async def race() -> tuple[float, int]:
        async with httpx.AsyncClient(timeout=10) as client:
            tokenize = asyncio.ensure_future(client.post(f"{url}/tokenize", json={"prompt": "word " * 1000}))
            await asyncio.sleep(0.2)
            start = time.monotonic()
            health = await client.get(f"{url}/health")
            waited = time.monotonic() - start
            assert health.status_code == 200
            return waited, (await tokenize).status_code

    waited, status = asyncio.run(race())
    assert status == 200 and waited < 0.5


# ---- 4. finite numbers only --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('{"prompt": "x", "temperature": NaN}', "temperature"),
        ('{"prompt": "x", "temperature": Infinity}', "temperature"),
        ('{"prompt": "x", "top_p": 1e400}', "top_p"),
        ('{"prompt": "x", "repetition_penalty": NaN}', "repetition_penalty"),
        ('{"prompt": "x", "repetition_penalty": 1e-300}', "repetition_penalty"),
        ('{"prompt": "x", "presence_penalty": -Infinity}', "presence_penalty"),
    ],
)
def test_non_finite_numbers_are_refused(url, raw, param):
    assert_error(post(url, "/v1/completions", raw.encode()), 400, param)


def test_tiny_temperature_and_top_p_sample_the_likeliest_tokens(url):
    greedy = {"prompt": "the lazy", "max_tokens": 6, "ignore_eos": True, "temperature": 0, "logprobs": 2}
    expected = post(url, "/v1/completions", greedy).json()["choices"][0]
    r = post(url, "/v1/completions", {**greedy, "temperature": 1.0, "top_p": 1e-300}).json()["choices"][0]
    assert r["logprobs"]["tokens"] == expected["logprobs"]["tokens"]  # the nucleus holds the top token only
    r = post(url, "/v1/completions", {**greedy, "temperature": 1e-300}).json()["choices"][0]
    lp = r["logprobs"]
    assert len(lp["tokens"]) == 6
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert math.isfinite(chosen) and chosen >= max(top.values()) - 0.1  # near-greedy, not token 0


# ---- 6. no coercion ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": "4"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 4.5}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "x", "echo": 1}, "echo"),
        ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
        ("/v1/completions", {"prompt": [[False]]}, "prompt"),
        ("/v1/completions", {"prompt": [True, 5]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "true"}}, "stream_options"),
        ("/detokenize", {"tokens": [False]}, "tokens"),
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "", "content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": "true"},
            "logprobs",
        ),
        ("/tokenize", {"prompt": None}, None),
        ("/tokenize", {"prompt": "a", "messages": None}, None),
    ],
)
def test_lax_types_are_refused(url, path, body, param):
    assert_error(post(url, path, body), 400, param)


# ---- 7. the OpenAPI schema says what the server does ------------------------------------------------------
def test_openapi_schema_has_real_statuses_bounds_and_response_models(url):
    schema = httpx.get(f"{url}/openapi.json").json()
    assert '"422"' not in json.dumps(schema)
    completions = schema["paths"]["/v1/completions"]["post"]
    assert {"200", "400", "404", "413", "429", "500"} <= set(completions["responses"])
    ok = completions["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/CompletionResponse"}
    assert "text/event-stream" in ok
    for path in ("/v1/models", "/tokenize", "/detokenize", "/health", "/version"):
        operation = next(iter(schema["paths"][path].values()))
        assert operation["responses"]["200"]["content"]["application/json"]["schema"], path
    request = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    n = next(s for s in request["n"]["anyOf"] if s.get("type") == "integer")
    assert n["maximum"] == DEFAULT_MAX_N
    penalty = next(s for s in request["repetition_penalty"]["anyOf"] if s.get("type") == "number")
    assert penalty["minimum"] > 0
    text = next(s for s in request["prompt"]["anyOf"] if s.get("type") == "string")
    assert text["minLength"] == 1
    tokens = schema["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]
    assert tokens["items"]["exclusiveMaximum"] == 320  # the tiny tokenizer's size


def test_method_not_allowed_names_the_allowed_ones(url):
    r = httpx.get(f"{url}/v1/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"


# ---- 8. API key, Host check, body size, docs ------------------------------------------------------------
def test_api_key_with_the_openai_client(tiny_llm):
    with running_server(build_app(tiny_llm, ServerOptions(api_key="sekret"))) as base:
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0)
        r = good.completions.create(model=ServerOptions().served_model_name, prompt="x", max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert [m.id for m in good.models.list().data] == [ServerOptions().served_model_name]
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.completions.create(model=ServerOptions().served_model_name, prompt="x", max_tokens=2)
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        missing = httpx.post(f"{base}/v1/completions", json={"prompt": "x"})
        assert_error(missing, 401)
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_error(httpx.post(f"{base}/tokenize", json={"prompt": "x"}), 401)
        for open_path in ("/health", "/metrics", "/version", "/openapi.json"):
            assert httpx.get(f"{base}{open_path}").status_code == 200, open_path
        schema = httpx.get(f"{base}/openapi.json").json()
        assert "401" in schema["paths"]["/v1/completions"]["post"]["responses"]


def test_api_key_from_the_environment_and_the_server_flags(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = resolve_args(build_parser().parse_args(["serve"]))
    assert server_options(args).api_key == "from-env"
    argv = ["serve", "--api-key", "flag", "--allowed_hosts", "a.example, *.b.example", "--disable_docs"]
    argv += ["--max_n", "4", "--max_request_body_bytes", "1000", "--shutdown_timeout", "2.5"]
    args = resolve_args(build_parser().parse_args(argv))
    options = server_options(args)
    assert options.api_key == "flag" and options.allowed_hosts == ("a.example", "*.b.example")
    assert options.disable_docs and options.max_n == 4 and options.max_request_body_bytes == 1000
    assert args.shutdown_timeout == 2.5


def test_allowed_hosts_and_disabled_docs(tiny_llm):
    options = ServerOptions(allowed_hosts=("localhost", "*.example.com"), disable_docs=True)
    with running_server(build_app(tiny_llm, options)) as base:
        port = base.rsplit(":", 1)[1]
        for host, status in (("localhost", 200), (f"localhost:{port}", 200), ("api.example.com", 200)):
            assert httpx.get(f"{base}/health", headers={"host": host}).status_code == status, host
        for host in ("evil.test", f"127.0.0.1:{port}", "example.com.evil.test"):
            assert_error(httpx.get(f"{base}/v1/models", headers={"host": host}), 400)
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{base}{path}", headers={"host": "localhost"}).status_code == 404, path


def test_request_body_limit_before_and_while_reading(tiny_llm):
    with running_server(build_app(tiny_llm, ServerOptions(max_request_body_bytes=1000))) as base:
        big = json.dumps({"prompt": "x" * 2000}).encode()
        assert_error(post(base, "/v1/completions", big), 413)

        def chunked():  # no Content-Length: the limit is enforced as the body arrives
            for i in range(0, len(big), 100):
                yield big[i : i + 100]

        r = httpx.post(f"{base}/tokenize", content=chunked(), headers=JSON, timeout=10)
        assert_error(r, 413)
        assert post(base, "/tokenize", {"prompt": "x" * 100}).status_code == 200


# ---- 5. aborts and shutdown -------------------------------------------------------------------------------
def test_abort_mid_prefill_drops_the_remaining_chunks_and_frees_every_block(tiny_model):
    """An 8-chunk prompt aborted after its first step: no other chunk is computed and, once the next
    step has run, every KV block is free again (the block-count invariant)."""
    llm = LLM(tiny_model, load_format="dummy", device="cpu", kv_cache_max_tokens=1024, max_num_tokens=8)
    try:
        from tensorjet import SamplingParams

        engine = llm.engine
        engine.add_request("long", list(range(10, 74))[:63], SamplingParams(max_tokens=1))
        engine.step()
        assert engine.stats()["prompt_tokens_computed"] == 8 and kv_blocks_used(llm) > 0
        engine.abort_request("long")
        assert kv_blocks_used(llm) == 0 and not engine.has_unfinished_requests()
        engine.add_request("next", [11, 12, 13], SamplingParams(max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.stats()["prompt_tokens_computed"] == 8 + 3 and kv_blocks_used(llm) == 0
    finally:
        llm.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(tiny_model: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = ["serve", tiny_model, "--load_format", "dummy", "--device", "cpu", "--port", str(port), *flags]
    code = f"from tensorjet.serve.cli import main; main({argv!r})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory) -> str:
    """The tiny model with room for thousands of tokens: long prefills and generations that take seconds."""
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-long"), 8192)


def test_a_stream_left_during_prefill_is_aborted_before_its_prompt_is_done(long_context_model):
    llm = LLM(
        long_context_model, load_format="dummy", device="cpu", kv_cache_max_tokens=8192, max_num_tokens=16
    )
    try:
        with running_server(build_app(llm)) as base:
            body = {"prompt": [7] * 4000, "max_tokens": 1, "stream": True}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/v1/completions", json=body, timeout=0.3)
            wait_until(lambda: kv_blocks_used(llm) == 0 and not llm.engine.has_unfinished_requests())
            assert llm.stats()["prompt_tokens_computed"] < 4000
    finally:
        llm.shutdown()


def test_sigterm_drains_short_requests_and_cancels_long_ones_in_bounded_time(long_context_model):
    def stream_then_sigterm(proc: subprocess.Popen, base: str, max_tokens: int) -> tuple[list[str], float]:
        body = {"prompt": "x", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        lines: list[str] = []
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", f"{base}/v1/completions", json=body) as r,
        ):
            chunks = r.iter_lines()
            lines.append(next(line for line in chunks if line.startswith("data:")))
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                lines += [line for line in chunks if line]
            except httpx.RemoteProtocolError:  # cut off when the shutdown timeout cancelled it
                pass
        # uvicorn re-raises the signal once shut down, so the exit status still says SIGTERM.
        assert proc.wait(timeout=30) == -signal.SIGTERM
        return lines, time.monotonic() - start

    # A request that finishes within the timeout is drained: it gets all its tokens.
    proc, base = start_serve(long_context_model, "--shutdown_timeout", "20", "--kv_cache_max_tokens", "8192")
    try:
        lines, took = stream_then_sigterm(proc, base, 200)
        assert lines[-1] == "data: [DONE]" and took < 20
        assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    finally:
        proc.kill()
    # One that would run for a minute is cancelled once the timeout passes.
    proc, base = start_serve(long_context_model, "--shutdown_timeout", "1", "--kv_cache_max_tokens", "8192")
    try:
        lines, took = stream_then_sigterm(proc, base, 8000)
        assert "data: [DONE]" not in lines and took < 1 + 5
    finally:
        proc.kill()


# ---- 7. the schema fuzzed: every operation, valid and invalid data ---------------------------------------
FUZZ_OPTIONS = ServerOptions(max_n=3, max_sequences=8)
PROMPT_BYTES = 24  # a byte-level BPE prompt of this many bytes has at most this many tokens
CHAT_PROMPT_TOKENS = 2 + PROMPT_BYTES + 1  # one message: its role token and </s>, then <|assistant|>
FUZZ_CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    negative_data_rejection,
    positive_data_acceptance,
]


@pytest.fixture(scope="module")
def fuzz_url(tiny_llm):
    with running_server(build_app(tiny_llm, FUZZ_OPTIONS)) as base:
        yield base


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_url):
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")


def within_the_runtime_rules(body):
    """A valid body brought within the rules that depend on the prompt's tokens or tie fields together,
    which no JSON schema states (the server answers them with 400): prompt plus max_tokens within the
    context, min_tokens <= max_tokens, max_tokens=0 only with echo, seed + n - 1 within 64 bits, prompts x n
    within max_sequences. Prompts are cut to PROMPT_BYTES bytes to bound their tokens."""
    if not isinstance(body, dict):
        return body
    body = within_the_field_dependencies(dict(body))
    n = int(body.get("n") or 1)
    if body.get("seed") is not None:
        # Also below: a seed within 2048 of -2**63 is the bound itself to a float, as schemathesis compares.
        body["seed"] = max(min(body["seed"], 2**63 - n), -(2**63))
    if isinstance(body.get("messages"), list) and body["messages"]:
        message = dict(body["messages"][0])
        content = message["content"]
        if isinstance(content, str):
            message["content"] = cut(content)
        else:
            message["content"] = [{**part, "text": cut(part["text"])} for part in content[:1]]
        body["messages"] = [message]
        room = MAX_POSITIONS - CHAT_PROMPT_TOKENS
        asked = body.get("max_completion_tokens") or body.get("max_tokens") or room
    elif isinstance(body.get("prompt"), (str, list)):
        prompt = body["prompt"]
        prompts = [prompt] if isinstance(prompt, str) or not isinstance(prompt[0], (str, list)) else prompt
        prompts = [cut(p) if isinstance(p, str) else p[:PROMPT_BYTES] for p in prompts]
        body["prompt"] = prompts[: FUZZ_OPTIONS.max_sequences // n]
        room = MAX_POSITIONS - PROMPT_BYTES
        if body.get("max_tokens") == 0 and not body.get("echo"):
            body["max_tokens"] = 1
        asked = body.get("max_tokens", 16)  # absent: 16; null: what the context leaves; 0: echo's 1 token
        asked = room if asked is None else max(asked, 1)
    else:
        return body
    for field in ("max_tokens", "max_completion_tokens"):
        if body.get(field) is not None:
            body[field] = min(body[field], room)
    if body.get("min_tokens") is not None:
        body["min_tokens"] = min(body["min_tokens"], asked, room)
    return body


STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def within_the_field_dependencies(body: dict) -> dict:
    """Fields that need another one get it, at most one structured output field stays, and what must
    compile (a schema, regex or grammar) or fit the context (tool definitions, rendered into the prompt) is
    made to: the server answers the rest with 400. A suffix needs fill-in-the-middle tokens, which the tiny
    tokenizer lacks."""
    if body.get("stream_options") is not None and not body.get("stream"):
        body.pop("stream_options")
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        body.pop("top_logprobs")
    best_of = body.get("best_of")
    if best_of is not None and (best_of < int(body.get("n") or 1) or body.get("stream")):
        body.pop("best_of")
    body.pop("suffix", None)
    for field in ("tools", "tool_choice", "guided_json", "guided_regex", "guided_grammar"):
        body.pop(field, None)
    given = [f for f in STRUCTURED_FIELDS if body.get(f) is not None]
    for field in given[1:]:
        body.pop(field)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        body["response_format"] = {**response_format, "json_schema": {"name": "any", "schema": {"enum": [1]}}}
    if isinstance(body.get("messages"), list) and body["messages"]:
        message = dict(body["messages"][0])
        message.pop("tool_calls", None)
        if message.get("content") is None:
            message["content"] = "x"
        if message.get("role") == "tool" and not message.get("tool_call_id"):
            message["tool_call_id"] = "call_1"
        body["messages"] = [message, *body["messages"][1:]]
    return body


def cut(text: str) -> str:
    return text.encode()[:PROMPT_BYTES].decode(errors="ignore") or "x"


lazy_schema = schemathesis.pytest.from_fixture("fuzz_schema")


@lazy_schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_schemathesis_finds_no_server_error_and_no_disagreement_with_the_schema(case, fuzz_url):
    if case.meta is not None and case.meta.generation.mode.is_positive:
        case.body = within_the_runtime_rules(case.body)
    case.call_and_validate(base_url=fuzz_url, checks=FUZZ_CHECKS, timeout=30)
