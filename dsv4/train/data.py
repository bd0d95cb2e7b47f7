"""SFT data: JSONL records -> token ids + loss mask -> packs of whole documents.

A record is either a chat `{"messages": [...], "tools"?: [...]}` (OpenAI form, encoded with the official V4
format; the loss covers only what the assistant writes: reasoning, content, tool calls and the closing EOS) or
pre-tokenised `{"input_ids": [...], "loss_mask"?: [...]}` (synthetic tasks; mask defaults to every token).
Packing never lets documents see each other: a pack is a list of documents that the model runs as separate
sequences of one flattened batch (`StepBatch`), so nothing is padded and nothing attends across documents.
NOTE: the mask marks tokens to be *predicted*; position t is trained to predict token t+1 where mask[t+1].
"""

from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass

from dsv4.chat.encoding import encode_segments
from dsv4.chat.tokens import BOS


@dataclass
class Document:
    ids: list[int]
    mask: list[bool]             # mask[t]: token t is a training target

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.mask[1:])


def chat_document(record: dict, tokenizer, bos_id: int = 0, thinking_mode: str = "chat") -> Document:
    """Encode one chat record; a token is a target when its first character lies in assistant output."""
    messages = record["messages"]
    if record.get("tools"):                      # tools belong on the system message in the V4 format
        if messages and messages[0].get("role") == "system":
            messages = [{**messages[0], "tools": record["tools"]}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": "", "tools": record["tools"]}, *messages]
    pieces = encode_segments(messages, thinking_mode=thinking_mode)
    text, spans, pos = BOS, [], len(BOS)
    for piece, target in pieces:
        if target:
            spans.append((pos, pos + len(piece)))
        text, pos = text + piece, pos + len(piece)
    enc = tokenizer.encode(text, add_special_tokens=False)
    if not enc.ids or enc.ids[0] != bos_id:
        raise ValueError(f"the tokenizer did not encode the BOS text as id {bos_id}")
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    return Document(list(enc.ids), mask)


def token_document(record: dict) -> Document:
    ids = record["input_ids"]
    mask = record.get("loss_mask", [1] * len(ids))
    if len(mask) != len(ids):
        raise ValueError(f"loss_mask has {len(mask)} entries for {len(ids)} input_ids")
    return Document([int(t) for t in ids], [bool(m) for m in mask])


def read_documents(path: str | os.PathLike, tokenizer=None, vocab_size: int | None = None, bos_id: int = 0,
                   thinking_mode: str = "chat") -> list[Document]:
    """Every record of a JSONL file; errors name the line. Documents without any target are an error."""
    docs = []
    with open(path, "rb") as f:                  # lines decoded one by one: a bad byte's error names its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                docs.append(_document(json.loads(line), tokenizer, bos_id, thinking_mode, vocab_size))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
    if not docs:
        raise ValueError(f"{path}: no training records")
    return docs


def _document(record, tokenizer, bos_id, thinking_mode, vocab_size) -> Document:
    if not isinstance(record, dict) or ("messages" not in record and "input_ids" not in record):
        raise ValueError('each line must be a JSON object with "messages" (chat) or "input_ids" (tokens)')
    if "messages" in record:
        if tokenizer is None:
            raise ValueError("chat records need a tokenizer")
        doc = chat_document(record, tokenizer, bos_id, thinking_mode)
    else:
        doc = token_document(record)
    if len(doc) < 2 or not doc.n_targets:
        raise ValueError("the record has no assistant tokens to train on")
    bad = [t for t in doc.ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary (vocab_size={vocab_size})")
    return doc


def pack(docs: list[Document], seq_len: int) -> list[list[Document]]:
    """Greedy packing in order: each pack holds whole documents totalling <= seq_len tokens. Longer documents
    are cut to seq_len (with one warning saying how many)."""
    cut = sum(len(d) > seq_len for d in docs)
    if cut:
        warnings.warn(f"{cut} of {len(docs)} documents are longer than seq_len={seq_len} and were truncated",
                      UserWarning, stacklevel=2)
    packs, size = [], 0
    for d in docs:
        d = Document(d.ids[:seq_len], d.mask[:seq_len]) if len(d) > seq_len else d
        if not packs or size + len(d) > seq_len:
            packs.append([])
            size = 0
        packs[-1].append(d)
        size += len(d)
    return packs


def concat_pack(pack_docs: list[Document]) -> Document:
    """One pack's documents as a single sequence (each keeps its BOS; attention runs across the boundaries).

    The targets are exactly the per-document ones: a document's first token is never a target of the previous
    document's last. Why: the step runs per sequence, so a pack of ~30 short documents costs ~30x the kernel
    launches of one long sequence; on a GPU the per-document run was launch-bound (~3k tokens/s on an H200).
    """
    ids, mask = [], []
    for d in pack_docs:
        ids += d.ids
        mask += [False, *d.mask[1:]]
    return Document(ids, mask)


@dataclass
class Row(Document):
    """One row of a rows pack (`row_packs`): whole documents concatenated (`concat_pack`), then padding up to the
    row length; `real` = the number of tokens before the padding (padding is never a target)."""
    real: int = 0


def row_packs(docs: list[Document], row_len: int, rows: int, pad_id: int = 0, seed: int = 0) -> list[list[Row]]:
    """Packs of `rows` rows of exactly `row_len` tokens (the last pack may hold fewer rows), each row a sequence
    from position 0 that starts with a document: best-fit decreasing bin packing of the documents into rows
    (longest first, each into the fullest row it fits), rows shuffled by `seed`, then grouped.

    Why rows: one long concatenated sequence per pack (`concat_pack`) puts nearly every token thousands of
    positions after the sequence start, but generation starts every prompt at position 0 with empty windows and
    compressor state: a model trained only on concatenated 32k packs continued `def fibonacci(n):` with garbage
    at position 0 and correctly after any earlier context (bench/notes/train_rows.md). Rows keep a document start
    at position 0 every `row_len` tokens while running as one [rows, row_len] batch (`FreshBatch`), not one
    sequence per document (launch-bound). Documents longer than row_len are cut (one warning)."""
    if row_len < 2 or rows < 1:
        raise ValueError(f"row_len must be >= 2 and rows >= 1, got {row_len} and {rows}")
    cut = sum(len(d) > row_len for d in docs)
    if cut:
        warnings.warn(f"{cut} of {len(docs)} documents are longer than row_len={row_len} and were truncated",
                      UserWarning, stacklevel=2)
    free: list[list[int]] = [[] for _ in range(row_len + 1)]     # free[k]: rows with exactly k tokens left
    contents: list[list[Document]] = []
    for d in sorted((Document(d.ids[:row_len], d.mask[:row_len]) for d in docs), key=len, reverse=True):
        k = next((k for k in range(len(d), row_len + 1) if free[k]), None)
        if k is None:
            contents.append([])
            r, k = len(contents) - 1, row_len
        else:
            r = free[k].pop()
        contents[r].append(d)
        free[k - len(d)].append(r)
    random.Random(seed).shuffle(contents)
    out = []
    for content in contents:
        row = concat_pack(content)
        n = row_len - len(row)
        out.append(Row(row.ids + [pad_id] * n, row.mask + [False] * n, len(row)))
    return [out[i:i + rows] for i in range(0, len(out), rows)]


class PackStream:
    """Packs for step after step: `packs_per_step` per step, reshuffled every epoch from `seed`; deterministic
    given (seed, step), so a resumed run sees exactly the data it would have seen."""

    def __init__(self, packs: list[list[Document]], packs_per_step: int, seed: int = 0):
        if packs_per_step < 1:
            raise ValueError(f"packs_per_step must be >= 1, got {packs_per_step}")
        self.packs, self.per_step, self.seed = packs, packs_per_step, seed

    def step(self, step: int) -> list[list[Document]]:
        n = len(self.packs)
        out = []
        for k in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, i = divmod(k, n)
            order = list(range(n))
            random.Random(self.seed * 100003 + epoch).shuffle(order)
            out.append(self.packs[order[i]])
        return out

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.packs) // self.per_step)
