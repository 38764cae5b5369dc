"""IncrementalDetokenizer: equality with the full decode, multi-byte UTF-8, unknown ids, stop strings,
streaming deltas, and the cost bound of the windowed decode."""

import random

import pytest

from tensorjet.engine.detokenizer import IncrementalDetokenizer
from tensorjet.models.tokenizer import FastTokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve façade, jalapeño, Ångström, Øre, Łódź, Straße.",
    "你好，世界！我们今天去公园散步吧。机器学习很有意思。",
    "日本語のテキスト：こんにちは、お元気ですか？カタカナも。",
    "Emoji party 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 and ❤️ done.",
    "Ελληνικά και русский текст, العربية, עברית, हिन्दी, 한국어 텍스트.",
    "def f(x):\n    return x ** 2  # ∑ ∫ √ ≠ ≤ →\n\n\tindented\r\nline",
    "   leading spaces, trailing   \n\n  and math: α+β=γ, 10°C, ½ ¼ ¾, €100, ¥5, £3.",
    "Mixed 中文 and English 😀 with accents é à ü in one 🚀 line — dashes – and “quotes”.",
]


@pytest.fixture(scope="module")
def tok(bundled_tokenizer_dir):
    """The bundled model's tokenizer as the engine loads it (tests/test_tokenizer.py holds it to
    transformers' own)."""
    return FastTokenizer(bundled_tokenizer_dir)


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return as_ids(
        tok.apply_chat_template(
            [{"role": "user", "content": "Say something."}], add_generation_prompt=True, tokenize=True
        )
    )


def as_ids(x):
    return list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x)


def chunks(ids, rng, max_chunk=4):
    i = 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        yield ids[i : i + n]
        i += n


def feed(detok, ids, rng=None, max_chunk=1):
    """Feed ids (one at a time or in random chunks); return (deltas, stop, step index of the stop)."""
    deltas = []
    parts = [[t] for t in ids] if rng is None else list(chunks(ids, rng, max_chunk))
    for k, part in enumerate(parts):
        stop = detok.add_tokens(part)
        deltas.append(detok.take_delta())
        if stop is not None:
            return deltas, stop, k
    return deltas, None, None


def reference_stop(text, stops, include):
    """Cut text at the first point where any stop string is complete (earliest end, then longest)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), -len(s)) < best[0]):
            best = ((i + len(s), -len(s)), s, i)
    if best is None:
        return text, None
    _, s, i = best
    return (text[: i + len(s)] if include else text[:i]), s


def longest_stop_prefix_suffix(text, stops):
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


# ---- plain decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_matches_full_decode(tok, prompt_ids, text):
    ids = as_ids(tok.encode(text, add_special_tokens=False))
    assert tok.decode(ids) == text  # the tokenizer round-trips; so must we
    detok = IncrementalDetokenizer(tok, prompt_ids)
    sent = ""
    for k, t in enumerate(ids):
        assert detok.add_tokens([t]) is None
        # At every step output_text is the full decode of the output so far.
        assert detok.output_text == tok.decode(ids[: k + 1], skip_special_tokens=True)
        sent += detok.take_delta()
        assert _REPL not in sent  # never streams half a character
        assert text.startswith(sent)
    assert detok.output_text == text
    assert sent == text


_REPL = "\ufffd"


def test_multibyte_tokens_really_split_characters(tok):
    # Guards the test above: some of these characters must be split across tokens, so that partial decodes
    # end in U+FFFD (otherwise the UTF-8 hold-back logic would go untested).
    ids = as_ids(tok.encode(TEXTS[4] + TEXTS[2], add_special_tokens=False))
    assert any(tok.decode(ids[:k]).endswith(_REPL) for k in range(1, len(ids)))


@pytest.mark.parametrize("skip", [True, False])
def test_random_valid_ids_match_full_decode(tok, skip):
    rng = random.Random(1234 + skip)
    vocab = len(tok)
    pool = sorted({t for s in TEXTS for t in as_ids(tok.encode(s, add_special_tokens=False))})
    specials = list(range(17))
    for trial in range(150):
        n = rng.randint(1, 60)
        ids = []
        for _ in range(n):
            r = rng.random()
            ids.append(
                rng.choice(pool) if r < 0.5 else rng.choice(specials) if r < 0.6 else rng.randrange(vocab)
            )
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        deltas, stop, _ = feed(detok, ids, rng, max_chunk=rng.choice([1, 3, 8]))
        assert stop is None
        expected = tok.decode(ids, skip_special_tokens=skip)
        assert detok.output_text == expected, (trial, ids, prompt)
        streamed = "".join(deltas)
        assert expected.startswith(streamed)
        # Non-final deltas hold back at most a trailing incomplete character; final=True releases it.
        assert set(expected[len(streamed) :]) <= {_REPL}
        assert streamed + detok.take_delta(final=True) == detok.output_text
        assert detok.take_delta() == ""


def test_prompt_ending_mid_character(tok):
    ids = as_ids(tok.encode("ab 😀🎉 cd", add_special_tokens=False))
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith(_REPL))
    prompt, output = ids[:cut], ids[cut:]
    detok = IncrementalDetokenizer(tok, prompt)
    feed(detok, output)
    assert detok.output_text == tok.decode(output, skip_special_tokens=True)


def test_leading_space_of_first_token(tok):
    prompt = as_ids(tok.encode("The capital of France is", add_special_tokens=False))
    output = as_ids(tok.encode(" Paris, of course.", add_special_tokens=False))
    detok = IncrementalDetokenizer(tok, prompt)
    deltas, _, _ = feed(detok, output)
    assert detok.output_text == tok.decode(output) == tok.decode(prompt + output)[len(tok.decode(prompt)) :]
    assert detok.output_text.startswith(" ")
    assert deltas[0] == tok.decode(output[:1])


class MetaspaceLikeTokenizer:
    """A SentencePiece-style toy: '▁' renders as a space, except at the very start of a decode."""

    vocab = ["<s>", "▁Hello", "▁world", "!", "▁foo", "bar"]
    all_special_ids = [0]
    added_tokens_decoder = {}

    def __len__(self):
        return len(self.vocab)

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        pieces = [self.vocab[i] for i in ids if not (skip_special_tokens and i in self.all_special_ids)]
        text = "".join(pieces).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def test_prompt_context_keeps_leading_space_for_sentencepiece_style_decoders():
    t = MetaspaceLikeTokenizer()
    detok = IncrementalDetokenizer(t, [0, 1])  # prompt "<s>Hello"
    detok.add_tokens([2])
    detok.add_tokens([3, 4])
    detok.add_tokens([5])
    assert detok.output_text == " world! foobar"
    # Without a prompt there is no context: the first token renders as at the start of a text.
    detok = IncrementalDetokenizer(t, [])
    for i in [2, 3, 4, 5]:
        detok.add_tokens([i])
    assert detok.output_text == "world! foobar" == t.decode([2, 3, 4, 5])


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kwargs)


class StrictTokenizer(CountingTokenizer):
    """Like slow tokenizers: unknown ids are an error (the fast one silently drops them)."""

    def decode(self, ids, **kwargs):
        assert all(0 <= i < len(self.tok) for i in ids), "out-of-vocabulary id reached decode"
        return super().decode(ids, **kwargs)


def test_out_of_vocabulary_ids_render_empty(tok, prompt_ids):
    strict = StrictTokenizer(tok)
    vocab = len(tok)
    text_ids = as_ids(tok.encode("Hi 你好 😀 there", add_special_tokens=False))
    oov = [vocab, vocab + 1, vocab + 1000, 10**9, -1]
    rng = random.Random(7)
    mixed = []
    for t in text_ids:
        mixed.append(t)
        if rng.random() < 0.5:
            mixed.append(rng.choice(oov))
    detok = IncrementalDetokenizer(strict, prompt_ids + [vocab + 5])
    deltas, stop, _ = feed(detok, mixed)
    assert stop is None
    assert detok.output_text == tok.decode(text_ids, skip_special_tokens=True)
    assert "".join(deltas) + detok.take_delta(final=True) == detok.output_text

    only_oov = IncrementalDetokenizer(strict, [vocab + 3])
    for t in oov:
        assert only_oov.add_tokens([t]) is None
    assert only_oov.output_text == "" and only_oov.take_delta(final=True) == ""


def test_special_tokens_kept_or_skipped(tok, prompt_ids):
    ids = as_ids(tok.encode("Hello there", add_special_tokens=False)) + [tok.eos_token_id]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
        feed(detok, ids)
        assert detok.output_text == tok.decode(ids, skip_special_tokens=skip)
    assert tok.eos_token in tok.decode(ids)  # the two cases really differ


def test_decode_window_stays_small(tok, prompt_ids):
    counting = CountingTokenizer(tok)
    base = as_ids(tok.encode(" ".join(TEXTS), add_special_tokens=False))
    ids = (base * (2000 // len(base) + 1))[:2000]
    detok = IncrementalDetokenizer(counting, prompt_ids)
    feed(detok, ids)
    assert detok.output_text == tok.decode(ids)
    assert max(counting.lengths) <= 16  # a window, never the whole output
    assert sum(counting.lengths) <= 12 * len(ids)


# ---- stop strings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_several_tokens(tok, prompt_ids, include):
    text = "Hello world, the answer is 42. END of story, more text follows."
    stop = "answer is 42"
    ids = as_ids(tok.encode(text, add_special_tokens=False))
    # The stop string is not inside any single token.
    assert all(stop not in tok.decode([t]) for t in ids)
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["never", stop], include_stop_str_in_output=include)
    deltas, matched, step = feed(detok, ids)
    assert matched == stop
    # Detected at the very token that completes it.
    first = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k]))
    assert step == first - 1
    expected = text[: text.index(stop) + (len(stop) if include else 0)]
    assert detok.output_text == expected
    assert "".join(deltas) == expected  # released automatically once the stop matched
    # Further tokens are ignored.
    assert detok.add_tokens(ids[:3]) == stop
    assert detok.output_text == expected and detok.take_delta() == ""


def test_stop_cut_at_first_occurrence(tok):
    text = "one STOP two STOP three"
    ids = as_ids(tok.encode(text, add_special_tokens=False))
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    feed(detok, ids, random.Random(0), max_chunk=len(ids))  # possibly all at once
    assert detok.output_text == "one "


def test_stop_earliest_completed_wins_regardless_of_batching(tok):
    text = "abc xyz tail"
    ids = as_ids(tok.encode(text, add_special_tokens=False))
    stops = ["c xyz", "xy", "zzz"]
    results = set()
    for seed in range(10):
        detok = IncrementalDetokenizer(tok, [], stop=stops)
        _, matched, _ = feed(detok, ids, random.Random(seed), max_chunk=len(ids))
        results.add((detok.output_text, matched))
    assert results == {(reference_stop(text, stops, False)[0], "xy")}


def test_streaming_holds_back_possible_stop_prefix(tok):
    stop = "<END>"
    pieces = ["Hello", " <", "E", "N", "x", " and", " <", "EN", "D", "> gone"]
    detok = IncrementalDetokenizer(tok, [], stop=[stop])
    sent = ""
    for i, piece in enumerate(pieces):
        ids = as_ids(tok.encode(piece, add_special_tokens=False))
        matched = detok.add_tokens(ids)
        sent += detok.take_delta()
        committed = "".join(pieces[: i + 1])
        if matched is None:
            hold = longest_stop_prefix_suffix(committed, [stop])
            assert sent == committed[: len(committed) - hold]
        else:
            assert matched == stop
            break
    assert detok.output_text == "Hello <ENx and "
    assert sent == detok.output_text


def test_stop_prefix_at_end_released_by_final(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    detok.add_tokens(as_ids(tok.encode("wait for it ST", add_special_tokens=False)))
    held = detok.take_delta()
    assert held == "wait for it "
    assert detok.output_text == "wait for it ST"
    assert held + detok.take_delta(final=True) == detok.output_text


def test_random_streams_with_stop_strings(tok, prompt_ids):
    rng = random.Random(99)
    vocab = len(tok)
    for trial in range(200):
        text = rng.choice(TEXTS) + " " + rng.choice(TEXTS)
        ids = as_ids(tok.encode(text, add_special_tokens=False))
        if rng.random() < 0.3:  # splice in random / out-of-vocabulary ids
            for _ in range(rng.randint(1, 4)):
                ids.insert(rng.randrange(len(ids) + 1), rng.randrange(vocab + 50))
        full = tok.decode([t for t in ids if t < vocab], skip_special_tokens=True)
        stops = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(full))
            s = full[a : a + rng.randint(1, 6)].replace(_REPL, "")
            if rng.random() < 0.4:
                s += "\x00"  # starts like the text but never matches: exercises the hold-back
            if s:
                stops.append(s)
        include = rng.random() < 0.5
        detok = IncrementalDetokenizer(tok, prompt_ids, stop=stops, include_stop_str_in_output=include)
        deltas, matched, _ = feed(detok, ids, rng, max_chunk=rng.choice([1, 2, 5]))
        expected, exp_stop = reference_stop(full, stops, include)
        ctx = (trial, text, stops, include)
        assert matched == exp_stop, ctx
        assert detok.output_text == expected, ctx
        streamed = "".join(deltas)
        assert expected.startswith(streamed), ctx  # nothing streamed is ever cut later
        if matched is not None:
            assert streamed == expected, ctx
        assert streamed + detok.take_delta(final=True) == detok.output_text, ctx


def test_stop_accepts_a_plain_string(tok):
    ids = as_ids(tok.encode("alpha beta gamma", add_special_tokens=False))
    detok = IncrementalDetokenizer(tok, [], stop="beta")
    _, matched, _ = feed(detok, ids)
    assert matched == "beta" and detok.output_text == "alpha "
