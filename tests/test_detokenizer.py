"""Streaming detokenizer and stop strings, on DeepSeek-V4's real tokenizer; both decode paths are run."""

from __future__ import annotations

import random
import time

import pytest

from dsv4.engine.detokenizer import (
    _BYTE_LEVEL_ALPHABET,
    REPLACEMENT,
    IncrementalDetokenizer,
    TextStream,
    find_stop,
    special_token_ids,
    token_bytes,
)
from dsv4.tokenizer import load_tokenizer

EOS, THINK_END, DSML = 1, 128822, 128825

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.\n\tindented  double  spaces ",
    "  leading spaces, trailing newline\n\n",
    "你好，世界！深度求索的模型会说中文。日本語のテキスト、ひらがなとカタカナ。한국어 문장입니다.",
    "family 👨‍👩‍👧‍👦, couple 👩‍❤️‍💋‍👨, flags 🇯🇵🇺🇦🏳️‍🌈, skin tones 👋🏽👍🏿, keycap 1️⃣",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0357a\u035b\u0344l\u0346g\u0310o\u0342",
    "Devanagari नमस्ते, Arabic مرحبا بالعالم, Thai สวัสดี, Hebrew שָׁלוֹם, Georgian გამარჯობა",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞ ≠ ≤, CJK ext-B 𠀀𠜎𡃁, music 𝄞, old italic 𐌰𐌱",
    "<think>let me think 🤔 about 世界</think>answer: ｜DSML｜ and <｜end▁of▁sentence｜> inline",
    "1234567890 3.14159 -42 0xDEADBEEF",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def byte_token(tok):
    """Byte value -> id of the token that is exactly that byte (splits every character as finely as possible)."""
    return {ord(b): tok.token_to_id(chr(c)) for c, b in _BYTE_LEVEL_ALPHABET.items() if ord(b) < 256}


def encodings(tok, byte_token, text):
    """The same text as BPE ids, with specials between pieces, and one token per byte."""
    words = [tok.encode(w, add_special_tokens=False).ids for w in text.split(" ")]  # specials only between characters
    mixed = [DSML]
    for i, w in enumerate(words):
        mixed += [*w, (EOS, THINK_END, DSML, 0)[i % 4]]
    return {"bpe": tok.encode(text, add_special_tokens=False).ids, "mixed": mixed,
            "bytes": [byte_token[b] for b in text.encode()]}


def stream(detok, ids):
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush()


def stream_stops(ts, ids):
    deltas = []
    for i in ids:
        delta, stopped = ts.add(i)
        deltas.append(delta)
        if stopped:
            break
    return deltas, ts.finish()


def test_token_bytes_match_decode_for_every_id(tok):
    ids = range(tok.get_vocab_size())
    expected = tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
    assert [token_bytes(tok, i).decode("utf-8", "replace") for i in ids] == expected
    assert token_bytes(tok, 10**7) == b"" and tok.decode([10**7, 65]) == tok.decode([65])


def test_specials(tok):
    specials = special_token_ids(tok)
    assert EOS in specials and 0 in specials and THINK_END not in specials and DSML not in specials


@pytest.mark.parametrize("byte_level", [True, False])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, byte_token, text, skip, byte_level):
    for how, ids in encodings(tok, byte_token, text).items():
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip, byte_level=byte_level)
        deltas, rest = stream(detok, ids)
        expected = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) + rest == expected == detok.text, how
        assert rest == "" and not any(REPLACEMENT in d for d in deltas), how
        for d in deltas:
            d.encode("utf-8")  # no lone surrogates: a delta is whole code points


def test_byte_path_is_eager(tok, byte_token):
    # After every token the stream has emitted exactly the complete characters so far: nothing partial, nothing late.
    text = "".join(TEXTS)
    ids = [byte_token[b] for b in text.encode()]
    detok, data = IncrementalDetokenizer(tok), text.encode()
    for n, i in enumerate(ids, 1):
        detok.add(i)
        assert detok.text == data[:n].decode("utf-8", "ignore")


@pytest.mark.parametrize("byte_level", [True, False])
def test_special_tokens_kept_or_skipped(tok, byte_level):
    ids = [*tok.encode("hi", add_special_tokens=False).ids, THINK_END, EOS, DSML]
    kept, _ = stream(IncrementalDetokenizer(tok, byte_level=byte_level), ids)
    skipped, _ = stream(IncrementalDetokenizer(tok, skip_special_tokens=True, byte_level=byte_level), ids)
    assert "".join(kept) == "hi</think><｜end▁of▁sentence｜>｜DSML｜"
    assert "".join(skipped) == "hi</think>｜DSML｜"


@pytest.mark.parametrize("byte_level", [True, False])
@pytest.mark.parametrize("skip", [False, True])
def test_random_ids_never_crash_and_match_decode(tok, byte_token, skip, byte_level):
    # Byte tokens make split and invalid UTF-8 likely; pure byte runs pit Python's U+FFFD substitution against Rust's.
    rng = random.Random(0)
    high = [byte_token[b] for b in range(0x80, 0x100)]
    pools = [[*high, *range(tok.get_vocab_size())], [*high, *byte_token.values()]]
    specials = [EOS, THINK_END, DSML, 0, 128000]
    for n in range(300):
        pool = pools[n % 2]
        ids = [rng.choice(specials) if rng.random() < 0.05 else rng.choice(pool) for _ in range(rng.randint(1, 30))]
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip, byte_level=byte_level)
        deltas, rest = stream(detok, ids)
        assert "".join(deltas) + rest == tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("byte_level", [True, False])
def test_invalid_tail_is_flushed_with_replacement(tok, byte_token, byte_level):
    ids = [*tok.encode("ok", add_special_tokens=False).ids, byte_token[0xE4], byte_token[0xB8]]  # half of 世
    detok = IncrementalDetokenizer(tok, byte_level=byte_level)
    deltas, rest = stream(detok, ids)
    assert "".join(deltas) == "ok" and rest == REPLACEMENT == tok.decode(ids)[2:]


@pytest.mark.parametrize("byte_level", [True, False])
def test_prompt_context(tok, byte_token, byte_level):
    prompt = tok.encode("Say: café", add_special_tokens=False).ids
    out = tok.encode(" 你好 👋🏽", add_special_tokens=False).ids
    deltas, rest = stream(IncrementalDetokenizer(tok, prompt, byte_level=byte_level), out)
    assert "".join(deltas) + rest == " 你好 👋🏽"
    # A character split across the boundary comes out whole with the output.
    ids = [*tok.encode("Say: ", add_special_tokens=False).ids, byte_token[0xE4], byte_token[0xB8], byte_token[0x96]]
    ids += tok.encode("界!", add_special_tokens=False).ids
    deltas, rest = stream(IncrementalDetokenizer(tok, ids[:-3], byte_level=byte_level), ids[-3:])
    assert "".join(deltas) + rest == "世界!" and REPLACEMENT not in "".join(deltas)


# -- stop strings ------------------------------------------------------------------------------------------------


def reference_stop(text, stops):
    hit = find_stop(text, stops)
    return text if hit is None else text[:hit[0]]


@pytest.mark.parametrize("byte_level", [True, False])
@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("Hello world<END> more text", ("<END>",), "Hello world"),  # spans tokens
        ("STOPabc", ("STOP",), ""),  # at the very start
        ("a STOP b END c", ("END", "STOP"), "a "),  # earliest wins, whatever the order given
        ("zabcd", ("abX", "bc"), "za"),  # a partial candidate overlaps the real match
        ("xabcd", ("abc", "bcd"), "x"),  # overlapping matches
        ("abcd", ("abcd", "c"), "ab"),  # nested: the one completing first wins, however the text is split
        ("abYab", ("abX",), "abYab"),  # partial matches that never complete are released
        ("你好世界!", ("世界",), "你好"),  # multi-byte stop
        ("think</think>answer", ("</think>",), "think"),  # stop made of a special token
        ("no stop here", ("zzz",), "no stop here"),
        ("ends with stop", ("stop",), "ends with "),  # completes on the last token
    ],
)
def test_stop_strings(tok, byte_token, byte_level, text, stops, expected):
    assert reference_stop(text, stops) == expected
    for how, ids in encodings(tok, byte_token, text).items():
        if how == "mixed":
            continue
        ts = TextStream(tok, stop=stops, byte_level=byte_level)
        deltas, rest = stream_stops(ts, ids)
        assert "".join(deltas) + rest == ts.text == expected, how
        assert ts.stopped == (expected != text) and (ts.stop_str in stops if ts.stopped else ts.stop_str is None)


def test_partial_stop_is_held_then_released(tok):
    enc = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    ts = TextStream(tok, stop=("</s>",))
    out = [ts.add(i) for i in enc("a</")]
    assert "".join(d for d, _ in out) == "a" and not any(s for _, s in out)  # "</" might become "</s>"
    assert ts.add(enc("x")[0]) == ("</x", False)  # disproved: released at once
    ts = TextStream(tok, stop=("</s>",))
    assert "".join(ts.add(i)[0] for i in enc("a</")) == "a"
    assert ts.finish() == "</" and ts.text == "a</" and not ts.stopped  # finish releases the held tail


def test_nothing_after_a_stop(tok):
    ts = TextStream(tok, stop=("END",))
    stream_stops(ts, tok.encode("a END b", add_special_tokens=False).ids)
    assert ts.stopped and ts.add(tok.token_to_id("b")) == ("", True) and ts.finish() == "" and ts.text == "a "


def test_stops_random(tok, byte_token):
    # Property: any text, any stops, any split into tokens -> the text before the first stop, never more.
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice("ab 世") for _ in range(rng.randint(0, 20)))
        stops = tuple("".join(rng.choice("ab 世") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3)))
        ids = rng.choice(list(encodings(tok, byte_token, text).values())[::2])  # bpe or bytes
        ts, expected, emitted = TextStream(tok, stop=stops), reference_stop(text, stops), ""
        for i in ids:
            delta, stopped = ts.add(i)
            emitted += delta
            assert expected.startswith(emitted), (text, stops)
            if stopped:
                break
        assert emitted + ts.finish() == expected, (text, stops)


def test_empty_stop_rejected(tok):
    with pytest.raises(ValueError):
        TextStream(tok, stop=("",))


@pytest.mark.parametrize("byte_level", [True, False])
def test_5000_tokens_fast(tok, byte_level):
    ids = tok.encode(" ".join(TEXTS[:-2]) * 40, add_special_tokens=False).ids[:5000]  # no stop inside
    assert len(ids) == 5000
    ts = TextStream(tok, stop=("<｜end▁of▁sentence｜>", "\n\nUser:"), byte_level=byte_level)
    start = time.perf_counter()
    for i in ids:
        ts.add(i)
    ts.finish()
    elapsed = time.perf_counter() - start
    assert ts.text == tok.decode(ids) and not ts.stopped
    assert elapsed < 0.3, elapsed
