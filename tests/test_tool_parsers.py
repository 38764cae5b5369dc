"""Tool-call parsers on outputs in each model family's documented format, and the per-choice state that
streams them: deltas concatenate to the calls the whole text parses to."""

import json

import pytest

from tensorjet.serve.tools import ToolCallState, detect_parser, make_parser

# (parser, model output, expected content, expected [(name, arguments)]), in the formats the models write.
RECORDED = [
    (
        "hermes",
        '<tool_call>\n{"name": "get_current_temperature", '
        '"arguments": {"location": "San Francisco, CA, USA"}}\n</tool_call>',
        None,
        [("get_current_temperature", {"location": "San Francisco, CA, USA"})],
    ),
    (
        "hermes",
        "Let me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n</tool_call>',
        "Let me check both.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "unit": "celsius"})],
    ),
    ("hermes", "The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    (
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": {"x": 1',
        '<tool_call>\n{"name": "f", "arguments": {"x": 1',
        [],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}',
        None,
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "search", "parameters": {"query": "tensorjet"}}; '
        '{"name": "add", "parameters": {"a": 1, "b": 2}}',
        None,
        [("search", {"query": "tensorjet"}), ("add", {"a": 1, "b": 2})],
    ),
    ("llama3_json", "I can answer that: 4.", "I can answer that: 4.", []),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"tz": "CET"}}]',
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    (  # the marker is a special token: decoded without it
        "mistral",
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    ("mistral", "No tool is needed.", "No tool is needed.", []),
]


def as_pairs(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), RECORDED)
def test_parsers_read_recorded_outputs(parser, text, content, calls):
    got_content, got_calls = make_parser(parser).parse(text)
    assert got_content == content and as_pairs(got_calls) == calls


@pytest.mark.parametrize(("parser", "text", "content", "calls"), RECORDED)
def test_streamed_deltas_assemble_to_the_parsed_calls(parser, text, content, calls):
    state = ToolCallState("auto", parser=make_parser(parser))
    streamed_content, assembled = "", {}
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    for i, piece in enumerate(pieces):
        delta = state.advance(piece, finished=i == len(pieces) - 1)
        streamed_content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = assembled.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    assert [(c["name"], json.loads(c["arguments"])) for c in assembled.values()] == calls
    expected_content = text if not calls else (content or "")
    assert streamed_content.strip() == expected_content.strip()


def test_named_and_required_states():
    named = ToolCallState("named", function_name="get_weather")
    deltas = [named.advance(p, finished=False) for p in ('{"city"', ': "Paris"}')]
    assert deltas[0].tool_calls[0].function.name == "get_weather" and deltas[0].tool_calls[0].id
    assert "".join(d.tool_calls[0].function.arguments for d in deltas) == '{"city": "Paris"}'
    required = ToolCallState("required")
    assert required.advance('[{"name": "f", "parameters": {"a": 1}}', finished=False).tool_calls is None
    calls = required.advance("]", finished=True).tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("f", {"a": 1})]


def test_the_parser_follows_the_chat_template():
    assert detect_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_parser("{%- if message.role == 'ipython' %}<|python_tag|>") == "llama3_json"
    assert detect_parser("<tool_call>\n{{ tool_call | tojson }}\n</tool_call>") == "hermes"
    assert detect_parser(None) == "hermes"
