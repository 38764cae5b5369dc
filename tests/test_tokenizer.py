"""tensorjet's own tokenizer (`FastTokenizer`: the `tokenizers` library and jinja2, no transformers) gives
the token ids, text and chat prompts of transformers' tokenizer of the same files (the bundled model's,
as its GGUF cache entry holds them), and is used only where the files say transformers would do no
more than run them."""

import copy
import json
import random
import shutil

import jinja2
import pytest
import transformers

from tensorjet.models.loader import _directory_tokenizer
from tensorjet.models.tokenizer import FastTokenizer, runs_without_transformers

TEXTS = [
    "The capital of France is",
    "",
    " leading space, trailing space ",
    "Café crème brûlée, naïve façade, Straße, Łódź",
    "你好，世界！日本語のテキスト、한국어",
    "Emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "def f(x):\n    return x ** 2  # ∑ √ ≠\n\n\tindented\r\nline",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|> and a half <|im_sta",
    "    many     spaces\n\n\n\nand newlines",
    "don't can't I'm we've they're it's",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, in °C",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                "required": ["city"],
            },
        },
    }
]
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Name three red fruits."}],
    "system and turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 😀"},
        {"role": "user", "content": "What is 2+2? «réponds» <b>html</b>"},
    ],
    "tool call and result": [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
            ],
        },
        {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call-1"},
    ],
    "reasoning": [
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "Done.", "reasoning_content": "Let me see..."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Done again.", "reasoning": "As before."},
    ],
    "system not first": [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "b"},
    ],
}
LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\nYou have access to these functions.\\n\\n" }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}{%- endif %}
{{- "Today: " + strftime_now("%Y") + "\\n" + system_message + "<|eot_id|>" }}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls is defined %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- for call in message.tool_calls %}{{- '{"name": "' + call.function.name + '", "parameters": ' }}
{{- call.function.arguments | tojson }}{{- "}" }}{%- endfor %}{{- "<|eot_id|>" }}
{%- elif message.role == "tool" %}
{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
{%- else %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
{{- message['content'] | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""
QWEN_STYLE = """{%- set ns = namespace(last_user=0) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'system' and not loop.first %}{{ raise_exception('System message must come first') }}
{%- endif %}
{%- if message.role == 'tool' %}{%- continue %}{%- endif %}
<|im_start|>{{ message.role }}
{%- if message.reasoning_content and loop.index0 > ns.last_user %}
<think>{{ message.reasoning_content }}</think>
{%- endif %}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{%- endif %}"""
GENERATION_TAG = """{% set d = dict(sep=': ') %}{% for message in messages %}
{% if message.role == 'assistant' %}{% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}
{% else %}{{ message.role }}{{ d.sep }}{{ message.content }}
{% endif %}{% if loop.index >= 3 %}{% break %}{% endif %}{% endfor %}
{% if add_generation_prompt %}assistant{{ d.sep }}{% endif %}"""
PRIVATE_NAMESPACE = """{% set ns = namespace(_hidden=1) %}{{ messages[0].content }}"""
TEMPLATES = {
    "bundled": None,
    "llama3 style": LLAMA3_STYLE,
    "qwen style": QWEN_STYLE,
    "generation tag": GENERATION_TAG,
    "private namespace": PRIVATE_NAMESPACE,
}


@pytest.fixture(scope="module")
def ours(bundled_tokenizer_dir) -> FastTokenizer:
    return FastTokenizer(bundled_tokenizer_dir)


@pytest.fixture(scope="module")
def theirs(bundled_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(bundled_tokenizer_dir)


def _with_template(tokenizer: FastTokenizer, chat_template: str) -> FastTokenizer:
    changed = copy.copy(tokenizer)  # shares the backend tokenizer
    changed.chat_template = chat_template
    return changed


def _outcome(call, *args, **kwargs):
    """What `call(*args, **kwargs)` returns, or the kind and message of what it raises."""
    try:
        result = call(*args, **kwargs)
    except (jinja2.TemplateError, ValueError, TypeError) as error:
        return "raises", type(error).__name__, str(error)
    ids = result.get("input_ids") if hasattr(result, "keys") else result
    return "returns", list(ids) if isinstance(ids, list) else ids


def test_the_bundled_tokenizer_runs_without_transformers(bundled_tokenizer_dir, ours):
    assert runs_without_transformers(bundled_tokenizer_dir)
    assert isinstance(_directory_tokenizer(bundled_tokenizer_dir), FastTokenizer)
    assert ours.chat_template is not None and ours.eos_token == "<|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_transformers(ours, theirs, text):
    for special in (True, False):
        assert ours.encode(text, add_special_tokens=special) == theirs.encode(
            text, add_special_tokens=special
        )


def test_decode_equals_transformers(ours, theirs):
    rng = random.Random(0)
    sequences = [ours.encode(text) for text in TEXTS]
    sequences += [ours.encode(TEXTS[5])[:k] for k in range(1, 8)]  # cut inside multi-byte characters
    sequences += [[rng.randrange(len(ours)) for _ in range(rng.randint(1, 12))] for _ in range(40)]
    sequences += [[1, 2, 0, 42, 2, 5, 3], []]  # special tokens among others
    for ids in sequences:
        for skip in (True, False):
            for clean_up in (None, False, True):
                options = dict(skip_special_tokens=skip, clean_up_tokenization_spaces=clean_up)
                assert ours.decode(ids, **options) == theirs.decode(ids, **options), (ids, options)
    assert ours.decode(42) == theirs.decode(42)


def test_vocabulary_and_special_tokens_equal_transformers(ours, theirs):
    assert len(ours) == len(theirs) and ours.vocab_size == theirs.vocab_size
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.all_special_ids == theirs.all_special_ids
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    ids = [0, 1, 2, 17, 1000, 49151]
    for skip in (True, False):
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=skip) == theirs.convert_ids_to_tokens(
            ids, skip_special_tokens=skip
        )
    assert ours.convert_ids_to_tokens(1000) == theirs.convert_ids_to_tokens(1000)
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in theirs.added_tokens_decoder.items()
    }


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools"])
def test_chat_prompts_equal_transformers(ours, theirs, template, conversation, tools):
    chat_template = TEMPLATES[template] or ours.chat_template
    ours = _with_template(ours, chat_template)
    messages = copy.deepcopy(CONVERSATIONS[conversation])
    for add_generation_prompt in (True, False):
        for tokenize in (False, True):
            options = dict(tools=tools, add_generation_prompt=add_generation_prompt, tokenize=tokenize)
            expected = _outcome(theirs.apply_chat_template, messages, chat_template=chat_template, **options)
            assert _outcome(ours.apply_chat_template, messages, **options) == expected
    assert messages == CONVERSATIONS[conversation], "the caller's messages are left as they were"


def test_template_variables_reach_the_template(ours, theirs):
    messages = CONVERSATIONS["one user turn"]
    for thinking in (True, False):
        expected = theirs.apply_chat_template(
            messages,
            chat_template=QWEN_STYLE,
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=thinking,
        )
        local = _with_template(ours, QWEN_STYLE)
        assert local.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, enable_thinking=thinking
        ) == (expected)


def test_the_rest_of_the_api_is_transformers_own(ours, theirs):
    text = TEXTS[3] * 10
    assert ours.encode(text, verbose=False) == theirs.encode(text, verbose=False)
    options = dict(truncation=True, max_length=7)
    truncated = theirs.encode(text, **options)
    assert ours.encode(text, **options) == truncated and len(truncated) == 7
    assert ours("The capital of France is").input_ids == theirs("The capital of France is").input_ids
    assert ours.batch_decode([[1, 2, 3], [4, 5]]) == theirs.batch_decode([[1, 2, 3], [4, 5]])
    assert ours.transformers_tokenizer is ours.transformers_tokenizer
    messages = CONVERSATIONS["one user turn"]
    assert ours.apply_chat_template(messages, return_dict=True)["input_ids"] == list(
        theirs.apply_chat_template(messages, return_dict=True)["input_ids"]
    )


@pytest.mark.parametrize(
    "flags",
    [{"add_bos_token": True}, {"add_eos_token": True}, {"add_bos_token": True, "add_eos_token": True}],
)
def test_bos_and_eos_flags_act_as_in_transformers(bundled_tokenizer_dir, tmp_path, flags):
    """transformers leaves a TokenizersBackend's post-processor as tokenizer.json has it."""
    directory = tmp_path / "tokenizer"
    shutil.copytree(bundled_tokenizer_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | flags))
    ours, theirs = FastTokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS[:4]:
        assert ours.encode(text) == theirs.encode(text)


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer_class": "GPT2Tokenizer"},
        {"tokenizer_class": "LlamaTokenizerFast"},
        {"extra_special_tokens": ["<|im_start|>"]},
        {"clean_up_tokenization_spaces": True},
        {"bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True}},
    ],
    ids=str,
)
def test_tokenizers_that_transformers_would_change_load_through_it(bundled_tokenizer_dir, tmp_path, change):
    directory = tmp_path / "tokenizer"
    shutil.copytree(bundled_tokenizer_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | change))
    assert not runs_without_transformers(directory)
    assert not isinstance(_directory_tokenizer(directory), FastTokenizer)
