"""Structured outputs below the server: parameters, the schema keyword checks (against what xgrammar really does),
the vocabulary views, the DSML tool-call grammar, masks on constrained rows only, and the engine on the built-in
model (valid JSON from seeded samples; unconstrained companions untouched). `LLM(dtype=...)` too."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from dsv4.builtin import builtin_config  # noqa: E402
from dsv4.chat import parse_completion  # noqa: E402
from dsv4.chat.dsml import render_tool_calls  # noqa: E402
from dsv4.chat.dsml_grammar import tool_call_tag  # noqa: E402
from dsv4.engine.sampling import SamplingParams  # noqa: E402
from dsv4.engine.structured import (  # noqa: E402
    IGNORED_FORMATS,
    IGNORED_KEYWORDS,
    Grammars,
    StructuredDecoding,
    StructuredOutputError,
    StructuredOutputsParams,
    check_schema,
)
from dsv4.tokenizer import load_tokenizer  # noqa: E402

VOCAB = builtin_config().vocab_size          # the shipped built-in model's (v1: 4096, v2: 6144)

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9},
                                           "tag": {"type": "string", "enum": ["red", "green"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"},
                                              "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                              "unit": {"type": "string", "enum": ["c", "f"]},
                                              "code": {"type": "string", "maxLength": 3}},
             "required": ["days", "unit"]}}},
         {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def builtin_tokenizer():
    from dsv4.builtin import builtin_model_path

    return load_tokenizer(builtin_model_path())


@pytest.fixture(scope="module")
def grammars(builtin_tokenizer):
    return Grammars(builtin_tokenizer, builtin_tokenizer.get_vocab_size(), 1)


def allowed(matcher, vocab: int) -> list[int]:
    mask = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(mask)
    bits = ((mask[0, torch.arange(vocab) // 32] >> (torch.arange(vocab) % 32)) & 1).bool()
    return bits.nonzero()[:, 0].tolist()


def random_walk(compiled, vocab: int, eos: int, rng: random.Random, limit: int = 1000) -> list[int]:
    """Uniformly random allowed tokens (EOS as soon as it is allowed): what an untrained model does, roughly. The
    walks grow with the vocabulary (free text inside strings): v2's 6,144 ids took up to 303 tokens at seed 0."""
    m, out = xgr.GrammarMatcher(compiled), []
    for _ in range(limit):
        ok = allowed(m, vocab)
        token = eos if eos in ok else rng.choice(ok)
        assert m.accept_token(token)
        if token == eos:
            return out
        out.append(token)
    raise AssertionError("the walk did not end")


# ------------------------------------------------------------------------------------------------ parameters

def test_params_take_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice="ab")
    assert StructuredOutputsParams(choice=["a", "b"]).choice == ("a", "b")
    so = StructuredOutputsParams(json={"type": "object"})
    assert hash(SamplingParams(structured_outputs=so)) == hash(SamplingParams(structured_outputs=so))
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs=StructuredOutputsParams(json_object=True))
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})


def test_cache_key_keeps_property_order():
    a = StructuredOutputsParams(json={"properties": {"b": {}, "a": {}}}).key()
    b = StructuredOutputsParams(json={"properties": {"a": {}, "b": {}}}).key()
    assert a != b       # the declared order is the generated order


# ------------------------------------------------------------------------------------------------ schema checks

VIOLATIONS = {   # keyword -> (schema, an instance that violates it)
    "not": ({"type": "integer", "not": {"const": 1}}, "1"),
    "if": ({"if": {"type": "integer"}, "then": {"minimum": 5}}, "1"),
    "then": ({"if": {"type": "integer"}, "then": {"minimum": 5}}, "1"),
    "else": ({"if": {"type": "string"}, "else": {"minimum": 5}}, "1"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "1"),
    "allOf": ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, "1"),
}


def _raw_xgrammar_accepts(schema, text: str) -> bool:
    info = xgr.TokenizerInfo([chr(i) for i in range(32, 127)], xgr.VocabType.RAW)
    m = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema)))
    return m.accept_string(text)


@pytest.mark.parametrize("keyword", sorted(set(IGNORED_KEYWORDS) | {"allOf"}))
def test_keywords_xgrammar_ignores_are_rejected_by_name(keyword):
    schema, bad = VIOLATIONS[keyword]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(bad), schema)
    assert _raw_xgrammar_accepts(schema, bad), f"xgrammar now enforces {keyword!r}: drop it from the list"
    with pytest.raises(StructuredOutputError, match="#/properties/x/items") as e:
        check_schema({"type": "object", "properties": {"x": {"type": "array", "items": schema}}})
    assert e.value.keyword in (keyword, "if") and f"'{e.value.keyword}'" in str(e.value)


@pytest.mark.parametrize("fmt", sorted(IGNORED_FORMATS))
def test_formats_xgrammar_ignores_are_rejected(fmt):
    assert _raw_xgrammar_accepts({"type": "string", "format": fmt}, '" !"')
    with pytest.raises(StructuredOutputError, match="format"):
        check_schema({"type": "string", "format": fmt})


def test_supported_keywords_are_enforced_and_pass_the_check():
    for schema, bad in [({"type": "string", "maxLength": 2}, '"abc"'), ({"type": "integer", "maximum": 3}, "4"),
                        ({"type": "string", "format": "email"}, '"x"'), ({"anyOf": [{"type": "integer"}]}, '"a"')]:
        check_schema(schema)
        assert not _raw_xgrammar_accepts(schema, bad)


def test_check_looks_only_at_schema_positions():
    check_schema({"type": "object", "properties": {"not": {"type": "integer"}, "if": {"const": {"not": 1}}}})
    with pytest.raises(StructuredOutputError, match="#/properties/a/properties/b/items"):
        check_schema({"properties": {"a": {"properties": {"b": {"items": {"not": {}}}}}}})


@pytest.mark.parametrize("schema, message", [
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum greater than maximum"),
    ({"type": 3}, "invalid JSON schema"),
    ('{"type": ', "not valid JSON"),
    ({"enum": []}, "enum"),
])
def test_unsatisfiable_and_malformed_schemas_raise(grammars, schema, message):
    with pytest.raises(StructuredOutputError, match=message):
        grammars.compile(StructuredOutputsParams(json=schema))


def test_bad_regex_and_grammar_raise(grammars):
    with pytest.raises(StructuredOutputError, match="invalid regex"):
        grammars.compile(StructuredOutputsParams(regex="(a"))
    with pytest.raises(StructuredOutputError, match="invalid grammar"):
        grammars.compile(StructuredOutputsParams(grammar="root ::= undefined_rule"))


@pytest.mark.parametrize("so", [StructuredOutputsParams(regex="[^\\x00-\\U0010FFFF]"),
                                StructuredOutputsParams(grammar='root ::= [^\\x00-\\U0010FFFF]')])
def test_grammars_that_match_nothing_raise(grammars, so):
    # Compiled without error, but no token (not even EOS) is allowed at the first step: generation would sample
    # garbage from an all-masked row and drop the constraint.
    with pytest.raises(StructuredOutputError, match="matches no text"):
        grammars.compile(so)
    assert grammars.compile(StructuredOutputsParams(regex="")) is not None       # the empty string: EOS only


def test_compiled_grammars_are_cached(grammars):
    so = StructuredOutputsParams(json=SCHEMA)
    assert grammars.compile(so) is grammars.compile(StructuredOutputsParams(json=json.dumps(SCHEMA)))


# ------------------------------------------------------------------------------------------------ vocabulary

def test_special_and_markup_tokens_never_appear_in_constrained_text(grammars, builtin_tokenizer):
    tok = builtin_tokenizer
    m = xgr.GrammarMatcher(grammars.compile(StructuredOutputsParams(json={"type": "string"})))
    assert m.accept_string('"')                              # inside a string: almost anything goes
    ok = set(allowed(m, tok.get_vocab_size()))
    assert len(ok) > 3000
    for text in ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<think>", "</think>", "｜DSML｜", "<｜end▁of▁sentence｜>"):
        assert tok.token_to_id(text) not in ok, text
    markup = xgr.GrammarMatcher(grammars.compile(StructuredOutputsParams(structural_tag=tool_call_tag(TOOLS))))
    assert markup.accept_string("\n\n<")
    assert tok.token_to_id("｜DSML｜") in allowed(markup, tok.get_vocab_size())    # the markup compiler keeps it


def test_eos_is_allowed_exactly_when_the_grammar_may_end(grammars):
    m = xgr.GrammarMatcher(grammars.compile(StructuredOutputsParams(choice=["yes", "no"])))
    assert 1 not in allowed(m, VOCAB)
    assert m.accept_string("yes")
    assert allowed(m, VOCAB) == [1]


# ------------------------------------------------------------------------------------------------ DSML

@pytest.mark.parametrize("name", [None, "get_weather", "ping"])
def test_tool_grammar_accepts_the_rendered_call_token_by_token(grammars, builtin_tokenizer, name):
    args = {"city": "Paris, \"FR\"", "days": 3, "unit": "c"} if name != "ping" else {}
    text = render_tool_calls([{"function": {"name": name or "get_weather", "arguments": args}}])
    m = xgr.GrammarMatcher(grammars.compile(StructuredOutputsParams(structural_tag=tool_call_tag(TOOLS, name))))
    for t in builtin_tokenizer.encode(text, add_special_tokens=False).ids:
        assert m.accept_token(t), builtin_tokenizer.decode([t], skip_special_tokens=False)
    assert m.accept_token(1) and m.is_terminated()


def test_tool_grammar_rejects_a_call_of_another_tool_and_bad_arguments(grammars):
    forced = grammars.compile(StructuredOutputsParams(structural_tag=tool_call_tag(TOOLS, "ping")))
    bad = render_tool_calls([{"function": {"name": "get_weather", "arguments": {"days": 3, "unit": "c"}}}])
    assert not xgr.GrammarMatcher(forced).accept_string(bad)
    anyone = grammars.compile(StructuredOutputsParams(structural_tag=tool_call_tag(TOOLS)))
    bad = render_tool_calls([{"function": {"name": "get_weather", "arguments": {"days": 30, "unit": "c"}}}])
    assert not xgr.GrammarMatcher(anyone).accept_string(bad)
    with pytest.raises(ValueError, match="no tool"):
        tool_call_tag(TOOLS, "nope")


def test_random_walks_of_the_tool_grammar_parse_into_valid_calls(grammars, builtin_tokenizer):
    """The parser of dsv4/chat turns every output of the grammar into tool calls whose arguments validate."""
    tools = [t for t in TOOLS if t["function"]["name"] == "ping"] + [{**TOOLS[0], "function": {
        **TOOLS[0]["function"], "parameters": {**TOOLS[0]["function"]["parameters"],
                                               "properties": {k: v for k, v in TOOLS[0]["function"]["parameters"][
                                                   "properties"].items() if k != "city"}}}}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    compiled = grammars.compile(StructuredOutputsParams(structural_tag=tool_call_tag(tools)))
    rng, names = random.Random(0), set()
    for _ in range(6):
        text = builtin_tokenizer.decode(random_walk(compiled, VOCAB, 1, rng), skip_special_tokens=False)
        reply = parse_completion(text, "chat")
        assert reply["content"] == "" and reply["tool_calls"]
        for call in reply["tool_calls"]:
            names.add(call["function"]["name"])
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    assert names == set(schemas)


# ------------------------------------------------------------------------------------------------ masks

def test_masks_touch_only_constrained_rows_and_match_the_plain_twin(builtin_tokenizer):
    sd = StructuredDecoding(builtin_tokenizer, VOCAB, 1)
    sd.add(7, StructuredOutputsParams(choice=["yes", "no"]))
    assert sd.masks([1, 2]) is None                            # no constrained row: nothing to do
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    fast, plain = logits.clone(), logits.clone()
    sd.apply(fast, [1, 7, 2])
    sd.apply(plain, [1, 7, 2], backend="torch_native")
    assert torch.equal(fast, plain)
    assert torch.equal(fast[[0, 2]], logits[[0, 2]])
    kept = torch.isfinite(fast[1]).nonzero()[:, 0].tolist()
    assert kept and all(builtin_tokenizer.decode([t]) in ("yes", "no", "y", "n", "ye") for t in kept)
    assert torch.equal(fast[1, kept], logits[1, kept])


@pytest.mark.gpu
def test_cuda_masks_match_the_cpu_ones(builtin_tokenizer):
    sd = StructuredDecoding(builtin_tokenizer, VOCAB, 1)
    sd.add(7, StructuredOutputsParams(json=SCHEMA))
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    on_gpu = logits.cuda()
    sd.apply(on_gpu, [1, 2, 7, 3])
    sd.apply(logits, [1, 2, 7, 3])
    assert torch.equal(on_gpu.cpu(), logits)


def test_thinking_rows_are_free_until_the_end_of_reasoning(builtin_tokenizer):
    sd = StructuredDecoding(builtin_tokenizer, VOCAB, 1)
    sd.add(3, StructuredOutputsParams(choice=["yes"], reasoning=True))
    for token in builtin_tokenizer.encode("let me think", add_special_tokens=False).ids:
        assert sd.masks([3]) is None and sd.accept(3, token)
    assert sd.accept(3, builtin_tokenizer.token_to_id("</think>"))
    assert sd.masks([3]) is not None
    assert not sd.accept(3, builtin_tokenizer.token_to_id("no")) and 3 not in sd


# ------------------------------------------------------------------------------------------------ engine

@pytest.fixture(scope="module")
def llm():
    import dsv4

    return dsv4.LLM(dtype=torch.float32, max_num_seqs=8)


def test_seeded_samples_of_the_builtin_model_all_validate(llm):
    so = StructuredOutputsParams(json=SCHEMA)
    out = llm.generate(["def main():"], SamplingParams(max_tokens=40, seed=5, n=8, structured_outputs=so))[0]
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_unconstrained_requests_get_the_same_tokens_in_a_mixed_batch(llm):
    plain = [SamplingParams(max_tokens=8, seed=s) for s in (1, 2)]
    alone = [o.outputs[0].token_ids for o in llm.generate(["import os", "x = 1"], plain)]
    so = StructuredOutputsParams(choice=["alpha", "beta"])
    mixed = llm.generate(["import os", "def f():", "x = 1"],
                         [plain[0], SamplingParams(max_tokens=8, seed=3, structured_outputs=so), plain[1]])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    assert mixed[1].outputs[0].text in ("alpha", "beta")


def test_regex_choice_stop_strings_and_n(llm):
    regex = llm.generate(["x = "], SamplingParams(max_tokens=12, seed=1, n=3, structured_outputs=
                                                  StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")))[0]
    assert all(len(c.text) == 6 and c.text[3] == "-" for c in regex.outputs)
    stopped = llm.generate(["x = "], SamplingParams(max_tokens=12, seed=1, stop=["-"], structured_outputs=
                                                    StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")))[0]
    assert len(stopped.outputs[0].text) == 3 and stopped.outputs[0].finish_reason == "stop"


def test_a_bad_constraint_is_a_request_error(llm):
    from dsv4.engine.engine import RequestError

    with pytest.raises(RequestError, match="not supported"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(json={"not": {}})))
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("dtype", [torch.float32, "float32", "auto", None])
def test_llm_dtype_accepts_what_load_model_does(dtype):
    from dsv4.engine.config import EngineConfig

    assert EngineConfig(dtype=dtype).torch_dtype() == torch.float32


def test_llm_dtype_rejects_non_float(llm):
    import dsv4

    assert llm.model.dtype == torch.float32
    with pytest.raises(ValueError, match="floating-point"):
        dsv4.LLM(dtype=torch.int8)


def test_constrained_rows_are_exact_under_speculative_decoding(llm):
    """With speculation on, constrained rows are not speculated (their tokens go through the masked sampler), so
    the constraint holds and greedy output equals the engine without speculation; unconstrained companions keep
    speculating (and equal their non-speculative output too)."""
    import dsv4

    spec = dsv4.LLM(dtype=torch.float32, max_num_seqs=8, num_speculative_tokens=2)
    params = [SamplingParams(max_tokens=40, temperature=0, structured_outputs=StructuredOutputsParams(json=SCHEMA)),
              SamplingParams(max_tokens=12, temperature=0)]
    prompts = ["def main():", "import os"]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    got = spec.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == want
    jsonschema.validate(json.loads(got[0].outputs[0].text), SCHEMA)
    assert got[0].metrics.num_draft_tokens == 0                  # the constrained row proposed nothing
