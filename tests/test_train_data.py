"""SFT data: official encoding, loss only on what the assistant writes, packing, deterministic data order."""

from __future__ import annotations

import json

import pytest

from dsv4.chat import encode_messages
from dsv4.tokenizer import load_tokenizer
from dsv4.train.data import Document, PackStream, chat_document, concat_pack, pack, read_documents


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _target_text(tok, doc: Document) -> str:
    return tok.decode([t for t, m in zip(doc.ids, doc.mask, strict=True) if m], skip_special_tokens=False)


def test_chat_mask_covers_assistant_content_and_eos_only(tok):
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "Four."}]}
    doc = chat_document(rec, tok)
    assert tok.decode(doc.ids, skip_special_tokens=False) == encode_messages(rec["messages"])
    assert _target_text(tok, doc) == "Hello!<｜end▁of▁sentence｜>Four.<｜end▁of▁sentence｜>"
    assert not doc.mask[0]


def test_thinking_mode_trains_reasoning_and_tool_calls(tok):
    tools = [{"type": "function", "function": {"name": "get_time", "description": "now",
                                               "parameters": {"type": "object", "properties": {}}}}]
    rec = {"tools": tools, "messages": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "reasoning_content": "Need the tool.", "content": "",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        {"role": "assistant", "reasoning_content": "Got it.", "content": "It is noon."}]}
    doc = chat_document(rec, tok, thinking_mode="thinking")
    target = _target_text(tok, doc)
    assert target.startswith("Need the tool.</think>") and "get_time" in target
    assert target.endswith("Got it.</think>It is noon.<｜end▁of▁sentence｜>")
    prompt = tok.decode([t for t, m in zip(doc.ids, doc.mask, strict=True) if not m], skip_special_tokens=False)
    assert "12:00" in prompt and "Time?" in prompt and "<｜Assistant｜><think>" in prompt
    assert "12:00" not in target and "get_time" in prompt            # the tool schema is prompt


def test_read_documents_errors_name_the_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"input_ids": [0, 5, 6]}) + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: .*no assistant tokens"):
        read_documents(path, tok, vocab_size=512)
    path.write_text(json.dumps({"input_ids": [0, 700]}) + "\n")
    with pytest.raises(ValueError, match=r":1: token id 700 is outside the model's vocabulary"):
        read_documents(path, tok, vocab_size=512)
    path.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="messages"):
        read_documents(path, tok)


def test_pack_keeps_whole_documents_and_warns_on_truncation():
    docs = [Document([1] * n, [True] * n) for n in (5, 3, 4, 9, 2)]
    with pytest.warns(UserWarning, match="1 of 5 documents are longer than seq_len=8"):
        packs = pack(docs, 8)
    assert [[len(d) for d in p] for p in packs] == [[5, 3], [4], [8], [2]]


def test_pack_stream_is_deterministic_and_covers_each_epoch():
    packs = [[Document([i, i], [True, True])] for i in range(6)]
    a, b = PackStream(packs, 2, seed=3), PackStream(packs, 2, seed=3)
    epoch = [p[0].ids[0] for s in range(3) for p in a.step(s)]
    assert sorted(epoch) == list(range(6))
    assert [p[0].ids for p in a.step(4)] == [p[0].ids for p in b.step(4)]


def test_concat_pack_keeps_exactly_the_per_document_targets():
    from dsv4.train.forward import IGNORE, packed_batch

    docs = [Document([0, 5, 6, 1], [False, True, True, True]), Document([0, 7, 8], [True, False, True])]
    one = concat_pack(docs)
    assert one.ids == [0, 5, 6, 1, 0, 7, 8]
    assert one.mask == [False, True, True, True, False, False, True]     # no document's BOS is a target
    per_doc = packed_batch(docs, "cpu").targets.tolist()
    joined = packed_batch([one], "cpu").targets.tolist()
    assert per_doc == joined == [5, 6, 1, IGNORE, IGNORE, 8, IGNORE]
    assert one.n_targets == sum(d.n_targets for d in docs)
