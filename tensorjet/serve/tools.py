"""Tool calling: the grammar that forces a call (`tool_choice` "required" or a named function), the
parsers that find calls in a model's free output (`tool_choice` "auto"), and the per-choice state that
turns generated text into `tool_calls`, whole or as stream deltas.

A forced call is generated as JSON that the grammar makes parse: a named function's arguments object, or
for "required" an array of `{"name": ..., "parameters": {...}}` with at least one entry (one at most when
`parallel_tool_calls` is false). With "auto" the model writes calls in its own format, which the server's
parser reads:
- `hermes` (Hermes, Qwen2.5): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one tag a call;
- `llama3_json` (Llama 3.1/3.2): the whole output is `{"name": ..., "parameters": {...}}` (after an
  optional `<|python_tag|>`), several separated by `;`;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or `[TOOL_CALLS]name[ARGS]{...}`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from tensorjet.serve.options import TOOL_CALL_PARSERS
from tensorjet.serve.protocol import ChatCompletionRequest, ChatTool, DeltaFunctionCall, DeltaToolCall


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text


def forced_tool_schema(request: ChatCompletionRequest) -> dict | None:
    """The JSON schema a forced tool call's output follows; None unless the choice forces one."""
    mode = request.tool_mode
    if mode == "named":
        name = request.tool_choice.function.name
        tool = next(t for t in request.tools if t.function.name == name)
        return _parameters(tool)
    if mode != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
            "required": ["name", "parameters"],
        }
        for t in request.tools
    ]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def _parameters(tool: ChatTool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def detect_parser(chat_template: str | None) -> str:
    """The call format a chat template teaches its model; Hermes' tags when it names none."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


# ---- parsers: text -> (content before the calls, calls) ----------------------------------------------
_decoder = json.JSONDecoder()


def _arguments_of(entry: object, key: str) -> ParsedToolCall | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return None
    arguments = entry.get(key, entry.get("arguments", entry.get("parameters", {})))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ParsedToolCall(entry["name"], text)


def _json_values(text: str, separator: str = "") -> list[object] | None:
    """Every JSON value in `text`, separated by whitespace or `separator`; None if anything else is there."""
    values, position = [], 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] == separator):
            position += 1
        if position == len(text):
            return values
        try:
            value, position = _decoder.raw_decode(text, position)
        except ValueError:
            return None
        values.append(value)


class HermesParser:
    start = "<tool_call>"
    end = "</tool_call>"

    def markers(self, text: str) -> tuple[str, ...]:
        return (self.start,)

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        if self.start not in text:
            return text, []
        content, _, rest = text.partition(self.start)
        calls = []
        for block in rest.split(self.start):
            body = block.split(self.end)[0]
            values = _json_values(body)
            call = _arguments_of(values[0], "arguments") if values and len(values) == 1 else None
            if call is None:
                return text, []  # not a well-formed call: the text stays content
            calls.append(call)
        return content.strip() or None, calls


class Llama3JsonParser:
    tag = "<|python_tag|>"

    def markers(self, text: str) -> tuple[str, ...]:
        # A call is the whole output: only a `{` that opens it counts.
        return (self.tag, "{") if not text.strip() else (self.tag,)

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        body = text.strip().removeprefix(self.tag).strip()
        if not body.startswith("{"):
            return text, []
        values = _json_values(body, separator=";")
        calls = [_arguments_of(v, "parameters") for v in values or []]
        if not calls or None in calls:
            return text, []
        return None, calls


class MistralParser:
    start = "[TOOL_CALLS]"
    args = "[ARGS]"

    def markers(self, text: str) -> tuple[str, ...]:
        # The marker is a special token that skip_special_tokens drops: then a leading `[{` opens the calls.
        return (self.start, "[{") if not text.strip() else (self.start,)

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        if self.start in text:
            content, _, body = text.partition(self.start)
        elif text.strip().startswith("[{"):
            content, body = "", text
        else:
            return text, []
        calls: list[ParsedToolCall | None] = []
        for part in body.split(self.start):
            part = part.strip()
            if self.args in part:  # name[ARGS]{...}
                name, _, arguments = part.partition(self.args)
                values = _json_values(arguments)
                ok = values is not None and len(values) == 1
                calls.append(
                    ParsedToolCall(name.strip(), json.dumps(values[0], ensure_ascii=False)) if ok else None
                )
            else:
                values = _json_values(part)
                if not values or not isinstance(values[0], list):
                    return text, []
                calls += [_arguments_of(entry, "arguments") for entry in values[0]]
        if not calls or None in calls:
            return text, []
        return content.strip() or None, calls


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}
assert tuple(PARSERS) == TOOL_CALL_PARSERS


def make_parser(name: str):
    return PARSERS[name]()


# ---- one choice's tool calls ---------------------------------------------------------------------------
def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolDelta:
    content: str | None
    tool_calls: list[DeltaToolCall] | None


class ToolCallState:
    """Turns one choice's text into content and tool calls as it grows. Named: the text is the arguments,
    streamed as they come. Required: the text is a JSON array of calls, sent whole when it is complete.
    Auto: content streams until the parser's marker shows up (text that may be the start of a marker is
    held back); what follows is parsed once the choice finishes, and goes out as content if it holds no
    well-formed call."""

    def __init__(self, mode: str, function_name: str | None = None, parser=None) -> None:
        self.mode = mode
        self.function_name = function_name
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of `text` sent as content (auto)
        self.in_calls = False  # auto: the marker was seen
        self.num_calls = 0

    def advance(self, new_text: str, finished: bool) -> ToolDelta:
        self.text += new_text
        if self.mode == "named":
            return self._named(new_text)
        if self.mode == "required":
            return self._required(finished)
        return self._auto(finished)

    def _named(self, new_text: str) -> ToolDelta:
        if self.num_calls == 0:
            self.num_calls = 1
            call = DeltaToolCall(
                index=0,
                id=tool_call_id(),
                type="function",
                function=DeltaFunctionCall(name=self.function_name, arguments=new_text),
            )
            return ToolDelta(None, [call])
        if not new_text:
            return ToolDelta(None, None)
        return ToolDelta(None, [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=new_text))])

    def _required(self, finished: bool) -> ToolDelta:
        if not finished:
            return ToolDelta(None, None)
        try:
            entries = json.loads(self.text)
        except ValueError:  # cut short by max_tokens: what there is goes out as content
            return ToolDelta(self.text, None)
        calls = [_arguments_of(entry, "parameters") for entry in entries]
        return ToolDelta(None, self._whole([c for c in calls if c is not None]))

    def _auto(self, finished: bool) -> ToolDelta:
        if not self.in_calls:
            unsent = self.text[self.sent :]
            at = min(
                (i for m in self.parser.markers(self.text[: self.sent]) if (i := unsent.find(m)) >= 0),
                default=-1,
            )
            if at >= 0:
                self.in_calls = True
                content = unsent[:at]
                self.sent += at
            else:
                keep = 0 if finished else _held_back(unsent, self.parser.markers(self.text[: self.sent]))
                content = unsent[: len(unsent) - keep]
                self.sent += len(content)
                return ToolDelta(content or None, None)
        else:
            content = ""
        if not finished:
            return ToolDelta(content or None, None)
        _, calls = self.parser.parse(self.text)  # the content before the calls is sent already
        if not calls:  # no well-formed call after all: the rest is content
            rest = self.text[self.sent :]
            self.sent = len(self.text)
            return ToolDelta((content + rest) or None, None)
        return ToolDelta(content or None, self._whole(calls))

    def _whole(self, calls: list[ParsedToolCall]) -> list[DeltaToolCall]:
        deltas = []
        for call in calls:
            function = DeltaFunctionCall(name=call.name, arguments=call.arguments)
            deltas.append(
                DeltaToolCall(index=self.num_calls, id=tool_call_id(), type="function", function=function)
            )
            self.num_calls += 1
        return deltas


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could begin a marker (and so wait for the next piece)."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                longest = max(longest, size)
                break
    return longest
