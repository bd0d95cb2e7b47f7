"""Streaming detokenization: token ids in, valid text deltas out, with stop strings.

Byte-level BPE tokens are bytes, not text: a CJK character or an emoji is often split over two or three tokens,
so decoding a token on its own gives U+FFFD. The fast path keeps the bytes the ByteLevel decoder would produce for
each token and feeds them to Python's incremental UTF-8 decoder, which holds an incomplete trailing sequence back
until it completes (or proves invalid) — O(token length) per token, and the deltas concatenate to exactly
`tokenizer.decode(ids)` (both substitute U+FFFD per maximal invalid subpart). Any other decoder takes the plain
path: vLLM's prefix/read-offset window, which re-decodes a few recent tokens and emits the difference.

`TextStream` adds stop strings on top: it holds back the longest tail that could still grow into a stop, so a stop
(or text after it) is never streamed.

This supersedes `simple_generate.stream_text`, which re-decoded the whole output on every token (quadratic) and
never released a tail that ended in U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders

REPLACEMENT = "\ufffd"
_WINDOW_CONTEXT = 5  # plain path: prompt tokens decoded before the new ones, as vLLM does


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's `bytes_to_unicode`, inverted as a `str.translate` table: stand-in character -> the byte it encodes
    (as a latin-1 character). Other characters below 256 map to one `encode("latin-1")` rejects."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    table = {o: "\U0010ffff" for o in range(256)}
    table.update({b: chr(b) for b in kept})
    table.update({256 + i: chr(b) for i, b in enumerate(shifted)})
    return table


_BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes the ByteLevel decoder turns one token into.

    NOTE: like the Rust decoder, a token with any character outside the byte alphabet (added tokens such as
    `<｜end▁of▁sentence｜>`) contributes its raw UTF-8; unknown ids contribute nothing (`decode` drops them).
    """
    token = tokenizer.id_to_token(token_id)
    if token is None:
        return b""
    try:
        return token.translate(_BYTE_LEVEL_ALPHABET).encode("latin-1")  # 2x faster than a per-character loop
    except UnicodeEncodeError:
        return token.encode()


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops; `</think>` and `｜DSML｜` are not among them."""
    return frozenset(i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)


class IncrementalDetokenizer:
    """`add(id)` returns the text that became decodable; the deltas plus `flush()` equal `tokenizer.decode(ids)`.

    `prompt_ids` is context only: a character split across the prompt/output boundary is emitted whole with the
    output. `byte_level=None` picks the fast path when the tokenizer's decoder is ByteLevel; tests force either.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = False, byte_level: bool | None = None):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel) if byte_level is None else byte_level
        self.token_ids: list[int] = []
        self._pieces: list[str] = []
        prompt_ids = list(prompt_ids or ())
        if self.byte_level:
            self._skip = special_token_ids(tokenizer) if skip_special_tokens else frozenset()
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self._utf8.decode(self._prompt_tail(prompt_ids))  # primes a split character; its text is the prompt's
        else:
            self._init_window(prompt_ids[-_WINDOW_CONTEXT - 3:])

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        delta = self._add_bytes(token_id) if self.byte_level else self._add_window(token_id)
        self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """The held-back tail, with U+FFFD for bytes that never formed a character. Ends the stream."""
        rest = self._utf8.decode(b"", final=True) if self.byte_level else self._flush_window()
        self._pieces.append(rest)
        return rest

    # -- fast path: bytes through an incremental UTF-8 decoder -------------------------------------------------

    def _bytes(self, token_id: int) -> bytes:
        return b"" if token_id in self._skip else token_bytes(self.tokenizer, token_id)

    def _prompt_tail(self, prompt_ids: list[int]) -> bytes:
        # An incomplete sequence is at most 3 bytes, so the last 4 bytes decide what the decoder holds.
        tail = b""
        for token_id in reversed(prompt_ids):
            if len(tail) >= 4:
                break
            tail = self._bytes(token_id) + tail
        return tail

    def _add_bytes(self, token_id: int) -> str:
        return self._utf8.decode(self._bytes(token_id))

    # -- plain path: decode a window of recent tokens and diff ---------------------------------------------------

    def _decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _init_window(self, context: list[int]) -> None:
        # The window is self._ids: [0, read) is emitted text (here: the prompt's) kept as context. read moves back
        # over a trailing incomplete character so that it is emitted whole with the first output token.
        read = len(context)
        while read > 0 and len(context) - read < 3 and self._decode(context[:read]).endswith(REPLACEMENT):
            read -= 1
        self._ids = context[max(read - _WINDOW_CONTEXT, 0):]
        self._set_window(read - (len(context) - len(self._ids)))

    def _set_window(self, read: int) -> None:
        self._read, self._prefix_text = read, self._decode(self._ids[:read])

    def _add_window(self, token_id: int) -> str:
        self._ids.append(token_id)
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT):
            return ""  # an incomplete character (or nothing new) so far
        delta = new_text[len(self._prefix_text):]
        del self._ids[:self._read]  # the new window starts at the old read offset
        self._set_window(len(self._ids))
        return delta

    def _flush_window(self) -> str:
        return self._decode(self._ids)[len(self._prefix_text):]


def find_stop(text: str, stops: Iterable[str]) -> tuple[int, str] | None:
    """(start, stop) of the stop that completes first in `text` (ties: the one that starts first), or None.

    Ordering by end makes the answer independent of how the text arrived in pieces: it is where a stream fed
    character by character would have stopped.
    """
    hits = [(i + len(s), i, s) for s in stops if (i := text.find(s)) >= 0]
    if not hits:
        return None
    _, start, stop = min(hits)
    return start, stop


def partial_stop_len(text: str, stops: Iterable[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop (it may still grow into one)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """Detokenizer plus stop strings. `add(id) -> (delta, stopped)`; `finish()` releases what was held back.

    The emitted text (`.text`) ends just before the first stop; neither the stop nor anything after it is ever
    streamed, and a tail that might be the start of a stop is held until it is disproved or the stream finishes.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = (), skip_special_tokens: bool = False,
                 prompt_ids: Sequence[int] | None = None, byte_level: bool | None = None):
        self.stops = tuple(stop)
        if not all(self.stops):
            raise ValueError("empty stop string")
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens, byte_level)
        self.stopped = False
        self.stop_str: str | None = None  # the stop that matched
        self._held = ""
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def add(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        return self._push(self.detokenizer.add(token_id), final=False), self.stopped

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._push(self.detokenizer.flush(), final=True)

    def _push(self, delta: str, final: bool) -> str:
        # Only `held + delta` can hold a new match: a stop starting earlier would have a prefix in the emitted
        # text that was a tail prefix of it, and that tail would have been held.
        buf = self._held + delta
        hit = find_stop(buf, self.stops)
        if hit is not None:
            cut, self.stop_str = hit
            self.stopped = True
        else:
            cut = len(buf) - (0 if final else partial_stop_len(buf, self.stops))
        out, self._held = buf[:cut], ("" if self.stopped else buf[cut:])
        self._pieces.append(out)
        return out
