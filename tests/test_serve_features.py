"""The OpenAI fields beyond plain generation, with the official `openai` client against a real server on a
tiny random-weight model (its text is noise, so whatever holds was made to hold): structured output,
forced tool calls and their round trip, logit_bias, best_of, stop_token_ids, suffix, usage details,
continuous usage, GET /v1/models/{id}, the dependent-field 400s, and every vLLM metric family."""

import json

import httpx2 as httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import make_tiny_chat_model, running_server

from tensorjet import LLM
from tensorjet.serve.app import build_app
from tensorjet.serve.options import DEFAULT_SERVED_MODEL_NAME

pytestmark = pytest.mark.slow  # a server (on the tiny model: well under a second to start)

MODEL = DEFAULT_SERVED_MODEL_NAME
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>{{ tools | tojson }}</s>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}{{ c['function'] | tojson }}{% endfor %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "enum": [1, 2]}},
            "required": ["city", "days"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"enum": [1, 2, 3]}}, "required": ["a"]},
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-tools")
    make_tiny_chat_model(path, 2048)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    llm = LLM(str(path), load_format="dummy", device="cpu", kv_cache_max_tokens=8192)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def url(tiny_llm):
    with running_server(build_app(tiny_llm)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, **kwargs):
    messages = kwargs.pop("messages", [{"role": "user", "content": "the weather"}])
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


# ---- structured output ----------------------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": [1, 2, 3]}},
    "required": ["ok", "size"],
}


def test_response_format_and_guided_fields_hold_streaming_or_not(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    r = chat(client, max_tokens=60, response_format=fmt, n=3, temperature=1, seed=1)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = chat(client, max_tokens=60, response_format=fmt, stream=True, seed=2, temperature=1)
    jsonschema.validate(
        json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), SCHEMA
    )
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=8, n=4, temperature=1, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert {c.text for c in r.choices} <= {"yes", "no"}
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=8, extra_body={"guided_regex": "[0-9]{2}-[ab]"}
    )
    assert r.choices[0].text[:2].isdigit() and r.choices[0].text[2:] in ("-a", "-b")
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=8, extra_body={"guided_grammar": 'root ::= "A" [0-9]'}
    )
    assert len(r.choices[0].text) == 2 and r.choices[0].text[0] == "A"


# ---- tool calling ---------------------------------------------------------------------------------
def test_forced_tool_calls_validate_and_round_trip(client, tiny_llm):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        r = chat(client, max_tokens=120, tools=[WEATHER, ADD], tool_choice=choice, temperature=1, seed=4)
        message = r.choices[0].message
        assert message.tool_calls and r.choices[0].finish_reason in ("tool_calls", "stop")
        for call in message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            assert call.id and call.type == "function"
        if choice is named:
            assert [c.function.name for c in message.tool_calls] == ["get_weather"]

    # Streaming deltas assemble to the same call (the same seed gives the same text).
    whole = chat(client, max_tokens=120, tools=[WEATHER], tool_choice=named, seed=5, temperature=1)
    assembled = {"name": "", "arguments": ""}
    for chunk in chat(
        client, max_tokens=120, tools=[WEATHER], tool_choice=named, seed=5, temperature=1, stream=True
    ):
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            assembled["name"] += call.function.name or ""
            assembled["arguments"] += call.function.arguments or ""
    call = whole.choices[0].message.tool_calls[0]
    assert assembled == {"name": call.function.name, "arguments": call.function.arguments}

    # The call and its result continue the conversation; the template sees both, and the tools.
    messages = [
        {"role": "user", "content": "the weather"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
    ]
    r = chat(client, messages=messages, max_tokens=4, tools=[WEATHER])
    without_tools = chat(client, messages=messages, max_tokens=4)
    assert r.usage.prompt_tokens > without_tools.usage.prompt_tokens  # the tools are in the prompt
    prompt = tiny_llm.apply_chat_template(
        [{**m, "content": m["content"] or ""} for m in messages[:1]]
        + [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "function": {
                            "name": call.function.name,
                            "arguments": json.loads(call.function.arguments),
                        }
                    }
                ],
            },
            messages[2],
        ]
    )
    assert without_tools.usage.prompt_tokens == len(prompt)


# ---- sampling fields ---------------------------------------------------------------------------------
def test_logit_bias_best_of_stop_token_ids_and_usage_details(client, tiny_llm):
    forced = client.completions.create(
        model=MODEL, prompt="the lazy", max_tokens=5, logit_bias={"42": 100}, extra_body={"ignore_eos": True}
    )
    assert tiny_llm.tokenizer.encode(forced.choices[0].text) == [42] * 5 or forced.choices[0].text == (
        tiny_llm.tokenizer.decode([42] * 5)
    )
    stopped = client.completions.create(
        model=MODEL,
        prompt="the lazy",
        max_tokens=5,
        logit_bias={"42": 100},
        extra_body={"stop_token_ids": [42]},
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1

    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=6, n=2, best_of=5, temperature=1, logprobs=0, seed=3
    )
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens <= 5 * 6
    sums = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert sums == sorted(sums, reverse=True)

    prompt = "the quick brown fox jumps over the lazy dog " * 3
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16  # a block at least came from the cache

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=4,
            stream=True,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 4 and chunks[-1].usage.completion_tokens == 4


# ---- what is refused ---------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "bogus"}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"320": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [320]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a("}, "guided_regex"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": 5}}, "guided_json"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [ADD],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        "tool_choice",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_unusable_fields_are_a_400_naming_them(url, path, body, param):
    r = httpx.post(f"{url}{path}", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_models_by_id(client, url, tiny_llm):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.root == tiny_llm.engine.source.name
    assert httpx.get(f"{url}/v1/models/{MODEL}").json()["parent"] is None
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


# ---- metrics --------------------------------------------------------------------------------------
VLLM_FAMILIES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:num_preemptions",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
    "vllm:request_params_n",
    "vllm:request_params_max_tokens",
    "vllm:request_success",
    "vllm:spec_decode_num_drafts",
    "vllm:spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens",
]


def test_metrics_have_every_vllm_family_with_the_model_name(client, url):
    client.completions.create(model=MODEL, prompt="x", max_tokens=3, extra_body={"ignore_eos": True})
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    for name in VLLM_FAMILIES:
        assert name in families, name
        assert all(s.labels.get("model_name") == MODEL for s in families[name].samples), name
    assert "tensorjet_num_requests_running" in families and "tensorjet_spec_decode_num_drafts" in families
    success = {
        s.labels["finished_reason"]: s.value
        for s in families["vllm:request_success"].samples
        if s.name.endswith("_total")
    }
    assert success.get("length", 0) >= 1
    queue = next(s for s in families["vllm:request_queue_time_seconds"].samples if s.name.endswith("_count"))
    assert queue.value >= 1
