"""Structured output with the bundled model through the `openai` client: 20 JSON schemas (objects,
arrays, enums, nested objects, required fields) parse and validate, streamed and not, sent at once as
one batch; json_object gives a JSON object; guided_choice and guided_regex hold; and an unconstrained
request in that batch gets the tokens it gets alone."""

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from serving import running_server

from tensorjet.serve.app import build_app
from tensorjet.serve.options import DEFAULT_SERVED_MODEL_NAME

MODEL = DEFAULT_SERVED_MODEL_NAME
NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME}, "required": ["name"]},
    {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["age"],
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {
        "type": "object",
        "properties": {"size": {"enum": [1, 2, 3]}, "unit": {"enum": ["cm", "in"]}},
        "required": ["size", "unit"],
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 2},
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": NAME, "maxItems": 2}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "maximum": 99},
                    "y": {"type": "integer", "maximum": 99},
                },
                "required": ["x", "y"],
            }
        },
        "required": ["point"],
    },
    {"type": "object", "properties": {"name": NAME, "ok": {"type": "boolean"}}, "required": ["name", "ok"]},
    {
        "type": "object",
        "properties": {"fruit": {"enum": ["apple", "cherry"]}, "count": {"type": "integer", "maximum": 50}},
        "required": ["fruit", "count"],
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": NAME, "admin": {"type": "boolean"}},
                "required": ["name", "admin"],
            }
        },
        "required": ["user"],
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "maximum": 9}},
            "required": ["id"],
        },
        "minItems": 1,
        "maxItems": 2,
    },
    {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["answer"],
    },
    {"type": "object", "properties": {"city": NAME, "country": NAME}, "required": ["city", "country"]},
    {
        "type": "object",
        "properties": {
            "scores": {"type": "array", "items": {"type": "integer", "maximum": 100}, "maxItems": 3}
        },
        "required": ["scores"],
    },
    {
        "type": "object",
        "properties": {"level": {"enum": ["low", "mid", "high"]}, "active": {"type": "boolean"}},
        "required": ["level", "active"],
    },
    {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {"type": "object", "properties": {"c": {"type": "boolean"}}, "required": ["c"]}
                },
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
    {
        "type": "object",
        "properties": {"title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
        "required": ["title", "year"],
    },
    {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"enum": [1, 2]}, "minItems": 1, "maxItems": 3},
            "done": {"type": "boolean"},
        },
        "required": ["items", "done"],
    },
]


@pytest.fixture(scope="module")
def aclient(llm):
    with running_server(build_app(llm)) as url:
        yield url


def request_kwargs(schema: dict, i: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Give an example JSON value, number {i}."}],
        "max_tokens": 120,
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
        },
    }


async def whole(client, **kwargs) -> tuple[str, str]:
    r = await client.chat.completions.create(**kwargs)
    return r.choices[0].message.content, r.choices[0].finish_reason


async def streamed(client, **kwargs) -> tuple[str, str]:
    text, finish = "", None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_twenty_schemas_streamed_and_not_with_an_unconstrained_batch_mate(aclient, llm):
    plain = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name three red fruits."}],
        "max_tokens": 24,
        "temperature": 0,
    }

    async def run() -> tuple[list, tuple, tuple]:
        client = openai.AsyncOpenAI(base_url=f"{aclient}/v1", api_key="unused", max_retries=0, timeout=600)
        alone = await whole(client, **plain)
        jobs = [whole(client, **request_kwargs(s, i)) for i, s in enumerate(SCHEMAS)]
        jobs += [streamed(client, **request_kwargs(s, i)) for i, s in enumerate(SCHEMAS)]
        results = await asyncio.gather(whole(client, **plain), *jobs)
        await client.close()
        return results[1:], results[0], alone

    results, beside, alone = asyncio.run(run())
    assert beside == alone  # constrained batch-mates leave its tokens alone
    for (text, finish), schema in zip(results, SCHEMAS + SCHEMAS):
        assert finish == "stop", (text, schema)
        jsonschema.validate(json.loads(text), schema)
    # Greedy: streamed and whole agree.
    assert [t for t, _ in results[: len(SCHEMAS)]] == [t for t, _ in results[len(SCHEMAS) :]]


def test_json_object_choice_and_regex(aclient):
    client = openai.OpenAI(base_url=f"{aclient}/v1", api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "user", "content": "Describe a cat as JSON."}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=120, temperature=0, response_format={"type": "json_object"}
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert r.choices[0].message.content.startswith("{")
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=8,
        n=3,
        temperature=1,
        extra_body={"guided_choice": ["yes", "no", "maybe"]},
    )
    assert {c.message.content for c in r.choices} <= {"yes", "no", "maybe"}
    r = client.completions.create(
        model=MODEL,
        prompt="A phone number:",
        max_tokens=16,
        temperature=0,
        extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"},
    )
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.choices[0].text)
