"""Structured outputs (constrained decoding): grammars compiled once and cached, one matcher per constrained
sequence, token bitmasks filled on the CPU and applied to the constrained rows' logits only.

The grammar library is xgrammar (llguidance was the alternative). Why xgrammar:
* it ships DSML building blocks (the `deepseek_xml` parameter style, structural tags), so a forced tool call is
  constrained as the markup the model was trained on (`dsv4/chat/dsml_grammar.py` assembles the exact block
  that `dsv4/chat/dsml.py` parses), not as JSON the server would have to re-render;
* it is vLLM's and SGLang's default backend, with a multi-threaded batch mask fill and an in-place mask kernel
  for CPU and CUDA (`apply_token_bitmask_inplace`), so the per-step cost is known from the peers;
* llguidance covers more of JSON Schema, but every keyword the installed xgrammar would silently ignore is
  rejected here with an error naming it (`IGNORED_KEYWORDS`, `IGNORED_FORMATS`; tests/test_structured.py checks
  that the library really ignores them, so an upgrade that learns one shows up).

What is unusual here:
* Two views of the vocabulary. Special tokens (BOS, pad, role and placeholder tokens) are blanked so a grammar
  never emits them; EOS is the stop token, allowed exactly when the grammar may end. The `<think>`, `</think>`
  and `｜DSML｜` tokens are ordinary text to the tokenizer, but in a constrained *answer* they would break the
  chat parser, so they are blanked too — except for tool-call grammars, which must emit `｜DSML｜`.
  NOTE: the same texts spelled out of smaller tokens are still possible inside a JSON string.
* Thinking mode (`reasoning=True`): the reasoning is free; a row is unconstrained until it samples `</think>`.
* Every keyword check and compile runs where `compile()` is called: the server calls it from a worker thread
  before submitting, so the engine thread only ever hits the cache.
* JSON is generated in one layout, `json.dumps`' default (`{"a": 1, "b": [2, 3]}`): free whitespace lets a model
  (the built-in one loves newlines) spend its tokens on blanks, and strict mode generates no properties the
  schema does not name (`strict` false or true alike: the output is valid either way).
* Masks never read anything back from the device: a row's mask depends only on its already-sampled tokens (on
  the host), so it is filled while the device runs the step's forward and copied with `non_blocking`.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.chat.tokens import DSML, THINK_END, THINK_START

CACHE_SIZE = 256            # compiled grammars kept (keyed by kind + text)

# Keywords the installed xgrammar accepts but does not enforce (checked by tests/test_structured.py).
IGNORED_KEYWORDS = {
    "not": "negated schemas are not enforced",
    "if": "conditional schemas are not enforced",
    "then": "conditional schemas are not enforced",
    "else": "conditional schemas are not enforced",
    "oneOf": "exactly-one is not enforced (it would act as anyOf; use anyOf)",
}
IGNORED_FORMATS = {"idn-email", "idn-hostname", "iri", "iri-reference", "regex"}
KNOWN_FORMATS = {"date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
                 "uri-reference", "uuid", "uri-template", "json-pointer", "relative-json-pointer"}

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalProperties", "contains", "propertyNames", "unevaluatedProperties",
               "unevaluatedItems", "additionalItems")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "allOf", "items")
_CPP_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")   # "[02:15:37] /project/cpp/x.cc:5082: " on xgrammar errors


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled or would be enforced only in part; `keyword` names the culprit."""

    def __init__(self, message: str, keyword: str | None = None):
        super().__init__(message)
        self.keyword = keyword


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a request's output must match (vLLM's `StructuredOutputsParams`): exactly one of `json` (a JSON Schema,
    dict or text), `regex`, `choice` (one of these strings), `grammar` (EBNF, xgrammar/GBNF dialect),
    `json_object` (any JSON object), `structural_tag` (an xgrammar structural tag, dict or text).

    `reasoning`: the output starts with free reasoning ended by `</think>` (thinking mode); the constraint
    applies to what follows it.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | dict | None = None
    reasoning: bool = False

    def __post_init__(self):
        given = [k for k in ("json", "regex", "choice", "grammar", "structural_tag") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams needs exactly one of json, regex, choice, grammar, "
                             f"json_object, structural_tag; got {given or 'none'}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"StructuredOutputsParams.choice must be a non-empty list of strings, "
                                 f"got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"StructuredOutputsParams.{name} must be a string")

    def __hash__(self) -> int:     # `json` / `structural_tag` may be dicts: hash the canonical text instead
        return hash((self.key(), self.reasoning))

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): the cache key."""
        if self.json is not None:
            return "json", self.json if isinstance(self.json, str) else json.dumps(self.json, ensure_ascii=False)
        if self.structural_tag is not None:
            tag = self.structural_tag
            return "structural_tag", tag if isinstance(tag, str) else json.dumps(tag, ensure_ascii=False)
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice), ensure_ascii=False)
        if self.json_object:
            return "json_object", ""
        return ("regex", self.regex) if self.regex is not None else ("grammar", self.grammar)


# ------------------------------------------------------------------------------------------------ schema checks

def _subschemas(schema: dict):
    """(keyword, subschema) for every schema position directly inside `schema` (not enum/const/default data)."""
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            yield from ((f"{key}/{name}", s) for name, s in schema[key].items())
    for key in ("not", "if", "then", "else", *_SCHEMA_ONE):
        if isinstance(schema.get(key), dict):
            yield key, schema[key]
    for key in (*_SCHEMA_LISTS, "oneOf"):
        if isinstance(schema.get(key), list):
            yield from ((f"{key}/{i}", s) for i, s in enumerate(schema[key]))


def check_schema(schema, path: str = "#") -> None:
    """Raise StructuredOutputError for the first keyword xgrammar would ignore (a JSON pointer-ish path says where)."""
    if not isinstance(schema, dict):
        return
    for key, why in IGNORED_KEYWORDS.items():
        if key in schema:
            raise StructuredOutputError(f"JSON Schema keyword {key!r} at {path} is not supported: {why}", key)
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        raise StructuredOutputError(f"JSON Schema keyword 'allOf' at {path} with more than one schema is not "
                                    "supported (it is merged only in part); merge the schemas", "allOf")
    fmt = schema.get("format")
    if isinstance(fmt, str) and schema.get("type") in ("string", None) and fmt not in KNOWN_FORMATS:
        raise StructuredOutputError(f"JSON Schema 'format': {fmt!r} at {path} is not supported; supported formats: "
                                    f"{sorted(KNOWN_FORMATS)}", "format")
    for key, sub in _subschemas(schema):
        check_schema(sub, f"{path}/{key}")


def _parse_json(text_or_dict, what: str):
    if not isinstance(text_or_dict, str):
        return text_or_dict
    try:
        return json.loads(text_or_dict)
    except json.JSONDecodeError as e:
        raise StructuredOutputError(f"the {what} is not valid JSON: {e}") from None


def _library_message(e: Exception) -> str:
    return _CPP_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


# ------------------------------------------------------------------------------------------------ compiling

def tokenizer_info(tokenizer, vocab_size: int, eos_id: int, markup: bool):
    """xgrammar's view of a `tokenizers` byte-level BPE vocabulary, padded to the model's `vocab_size`.

    Added tokens keep their literal text (xgrammar decodes byte-level strings and takes the others as raw);
    special tokens other than EOS become "" (xgrammar never allows an empty token). `<think>`, `</think>` and
    `｜DSML｜` are blanked too unless `markup`.
    """
    import xgrammar as xgr

    vocab = [""] * vocab_size
    for text, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i < vocab_size:
            vocab[i] = text
    blank = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special and i != eos_id}
    markers = {tokenizer.token_to_id(t) for t in (THINK_START, THINK_END, DSML)} - {None}
    blank = blank - markers if markup else blank | markers    # the built-in tokenizer marks them special
    for i in blank:
        if i < vocab_size:
            vocab[i] = ""
    return xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=[eos_id],
                             add_prefix_space=False)


class Grammars:
    """Compiles `StructuredOutputsParams` into xgrammar grammars; thread-safe, compilers built on first use,
    results cached by (kind, text)."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int):
        self.tokenizer, self.vocab_size, self.eos_id = tokenizer, vocab_size, eos_id
        self._compilers: dict[bool, object] = {}
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def _compiler(self, markup: bool):
        import xgrammar as xgr

        with self._lock:
            if markup not in self._compilers:
                info = tokenizer_info(self.tokenizer, self.vocab_size, self.eos_id, markup)
                self._compilers[markup] = xgr.GrammarCompiler(info, max_threads=2)
            return self._compilers[markup]

    def compile(self, so: StructuredOutputsParams):
        key = so.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(*key)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, kind: str, text: str):
        compiled = self._compile_grammar(kind, text)
        _check_satisfiable(compiled, self.vocab_size, kind)
        return compiled

    def _compile_grammar(self, kind: str, text: str):
        if kind == "json":
            schema = _parse_json(text, "JSON schema")
            _check_meta(schema)
            check_schema(schema)
        tag = _parse_json(text, "structural tag") if kind == "structural_tag" else None
        compiler = self._compiler(markup=kind == "structural_tag" and DSML in text)
        try:
            if kind == "json":
                return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if kind == "choice":
                options = [{"type": "const_string", "value": c} for c in json.loads(text)]
                return compiler.compile_structural_tag({"type": "structural_tag",
                                                        "format": {"type": "or", "elements": options}})
            if kind == "structural_tag":
                return compiler.compile_structural_tag(tag)
            return compiler.compile_regex(text) if kind == "regex" else compiler.compile_grammar(text)
        except Exception as e:   # xgrammar raises RuntimeError / ValueError / its own errors for bad input
            raise StructuredOutputError(f"invalid {kind.replace('_', ' ')}: {_library_message(e)}") from None


def _check_satisfiable(compiled, vocab_size: int, kind: str) -> None:
    """Refuse a grammar whose first step allows no token, not even EOS (e.g. the regex `[^\\x00-\\U0010FFFF]`):
    its language is empty, and a row with every token masked would sample garbage (the sampler has no choice
    left) and be dropped from the constraint, so the client would get unconstrained text as if it matched."""
    import xgrammar as xgr

    mask = xgr.allocate_token_bitmask(1, vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(mask)
    if not mask.any():
        raise StructuredOutputError(f"the {kind.replace('_', ' ')} matches no text at all (not even the empty "
                                    "string): no output could satisfy it")


def _check_meta(schema) -> None:
    from jsonschema import exceptions, validators

    if not isinstance(schema, dict | bool):
        raise StructuredOutputError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as e:
        raise StructuredOutputError(f"invalid JSON schema: {e.message}") from None


# ------------------------------------------------------------------------------------------------ decoding

@dataclass
class _Row:
    matcher: object             # xgrammar.GrammarMatcher
    waiting: bool               # thinking mode: not constrained until `</think>` is sampled


class StructuredDecoding:
    """The engine's constrained sequences: their matchers, the step's masks, the sampled tokens fed back."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int):
        self.grammars = Grammars(tokenizer, vocab_size, eos_id)
        self.vocab_size = vocab_size
        self.think_end = tokenizer.token_to_id(THINK_END)
        self._rows: dict[int, _Row] = {}
        self._mask: torch.Tensor | None = None     # reused host buffer [rows, ceil(V / 32)] int32
        self._batch = None                         # xgrammar.BatchGrammarMatcher (thread pool), on first use

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._rows

    def add(self, seq_id: int, so: StructuredOutputsParams) -> None:
        import xgrammar as xgr

        self._rows[seq_id] = _Row(xgr.GrammarMatcher(self.grammars.compile(so)), so.reasoning)

    def remove(self, seq_id: int) -> None:
        self._rows.pop(seq_id, None)

    def accept(self, seq_id: int, token_id: int) -> bool:
        """Feed a sampled token; False if the grammar rejects it (the row is then left unconstrained)."""
        row = self._rows.get(seq_id)
        if row is None:
            return True
        if row.waiting:
            row.waiting = token_id != self.think_end
            return True
        if row.matcher.is_terminated() or row.matcher.accept_token(token_id):
            return True
        self.remove(seq_id)
        return False

    def masks(self, seq_ids: list[int]) -> tuple[torch.Tensor, list[int]] | None:
        """(host bitmask [len(seq_ids), ceil(V / 32)] int32, constrained row indices), or None when no row is."""
        rows = [(i, r.matcher) for i, sid in enumerate(seq_ids)
                if (r := self._rows.get(sid)) is not None and not r.waiting and not r.matcher.is_terminated()]
        if not rows:
            return None
        import xgrammar as xgr

        words = (self.vocab_size + 31) // 32
        if self._mask is None or self._mask.shape[0] < len(seq_ids):
            pin = torch.cuda.is_available()
            self._mask = torch.empty(max(len(seq_ids), 16), words, dtype=torch.int32, pin_memory=pin)
            self._batch = self._batch or xgr.BatchGrammarMatcher(max_threads=2)
        # NOTE: the buffer is reused; on CUDA the previous step's copy out of it has finished, because the runner
        # reads that step's sampled tokens back before the next fill.
        mask = self._mask[:len(seq_ids)]
        self._batch.batch_fill_next_token_bitmask([m for _, m in rows], mask, indices=[i for i, _ in rows])
        return mask, [i for i, _ in rows]

    def apply(self, logits: torch.Tensor, seq_ids: list[int], backend: str = "auto") -> None:
        """Set the logits [n, V] of tokens a constrained row's grammar forbids to -inf, in place; unconstrained
        rows are not touched (and cost nothing when no row is constrained)."""
        found = self.masks(seq_ids)
        if found is None:
            return
        import xgrammar as xgr

        mask, rows = found
        index = torch.tensor(rows, dtype=torch.int32)
        if logits.device.type == "cuda":   # pinned: the copies are queued on the stream, the host never waits
            mask, index = mask.to(logits.device, non_blocking=True), index.pin_memory().to(logits.device,
                                                                                           non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size,
                                        indices=index if logits.device.type == "cuda" else rows, backend=backend)
