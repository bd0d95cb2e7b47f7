"""Built-in model v2's pieces that run without training: its architecture's size, the data builder's chat set and
binary format, and the GPU script's budget arithmetic (scripts/builtin_data.py, scripts/train_builtin_gpu.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dsv4.builtin import BUILTIN_SPECIALS, BUILTIN_VERSION, builtin_config
from dsv4.chat.tokens import EOS
from dsv4.checkpoint.inventory import inventory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import builtin_card
import builtin_data
import eval_builtin
import install_builtin
import train_builtin_gpu


def test_v2_every_feature_within_40_mb():
    cfg = builtin_config(2)
    size = sum(s.nbytes for s in inventory(cfg).values())
    assert size <= 40e6
    assert size > 2 * sum(s.nbytes for s in inventory(builtin_config(1)).values())
    assert {0, 4, 128} <= set(cfg.compress_ratios)                 # sliding, CSA (+ indexer), HCA
    assert 0 < cfg.n_hash_layers < cfg.n_layers and cfg.n_shared_experts and cfg.n_mtp_layers and cfg.hc_mult > 1
    assert (cfg.dtype, cfg.expert_dtype) == ("fp8", "fp4")
    assert builtin_config() == builtin_config(BUILTIN_VERSION)        # the default is the shipped model
    with pytest.raises(ValueError):
        builtin_config(3)


SOURCE = '''
def add(a, b=1):
    """Return the sum of a and b.  More words here."""
    return a + b


class K:
    @staticmethod
    def twice(x):
        """Double x, as a number."""
        return 2 * x

    def _nodoc(self):
        return 1

def short():
    """Too short"""
'''


def test_functions_signature_first_sentence_and_dedented_source():
    found = list(builtin_data.functions(SOURCE))
    assert [(sig, what) for sig, what, _ in found] == [("add(a, b=1)", "Return the sum of a and b."),
                                                       ("twice(x)", "Double x, as a number.")]
    body = found[1][2]
    assert body.startswith("@staticmethod\ndef twice(x):\n") and body.endswith("return 2 * x\n")
    # a module-level function keeps its indentation (the eighth session's data flushed every line left)
    assert found[0][2] == 'def add(a, b=1):\n    """Return the sum of a and b.  More words here."""\n    return a + b\n'


def test_a_chat_answer_keeps_the_docstring_summary_and_blank_lines():
    source = (
        "class C:\n"
        "    def total(self, xs):\n"
        '        """Sum the items of xs,\n'
        "        skipping None.\n\n"
        "        Examples\n"
        "        ========\n\n"
        "        >>> C().total([1, None])\n"
        "        1\n"
        '        """\n'
        "        t = 0\n\n"
        "        for x in xs:\n"
        "            t += x or 0\n"
        "        return t\n")
    [(sig, what, body)] = builtin_data.functions(source)
    assert (sig, what) == ("total(self, xs)", "Sum the items of xs, skipping None.")
    assert body == ('def total(self, xs):\n    """Sum the items of xs,\n    skipping None."""\n    t = 0\n\n'
                    "    for x in xs:\n        t += x or 0\n    return t\n")
    raw = 'def f(x):\n    r"""Match a\\d digit.\n\n    More.\n    """\n    return x\n'
    [(_, _, kept)] = builtin_data.functions(raw)                   # a backslash: the docstring stays whole
    assert kept == raw


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SOURCE], trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(BUILTIN_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def test_chat_requests_phrase_the_docstring_as_a_newcomer_would():
    """Some requests name no signature (data v7); the docstring's imperative verb is conjugated after "that"."""
    sig, what, body = "f(x)", "Return x squared.", "def f(x):\n    return x * x\n"
    asks = [builtin_data.chat_record(sig, what, body, k)["messages"][0]["content"] for k in range(6)]
    assert "Write a function that returns x squared." in asks and "`f(x)`" not in asks[4] + asks[5]
    assert sum("`f(x)`" in a for a in asks) == 4
    third = builtin_data.third_person
    assert third("apply f to x.") == "applies f to x." and third("push x.") == "pushes x."
    assert third("decode the bytes.") == "decodes the bytes." and third("copy x.") == "copies x."
    assert third("the sum of x.") == "does this: The sum of x."
    assert third("converts x.") == "converts x." and third("copies x.") == "copies x."


def test_chat_record_trains_only_the_reply_and_its_eos(tmp_path):
    from dsv4.train.data import chat_document

    tok = _tokenizer()
    sig, what, body = next(builtin_data.functions(SOURCE))
    record = builtin_data.chat_record(sig, what, body, 0)
    assert record["messages"][0]["content"] == "Write a Python function `add(a, b=1)` that returns the sum of a and b."
    doc = chat_document(record, tok)
    target = tok.decode([t for t, m in zip(doc.ids, doc.mask, strict=True) if m], skip_special_tokens=False)
    assert target == f"```python\n{body}```{EOS}"
    assert doc.ids[-1] == 1 and doc.mask[-1] and not any(doc.mask[:5])

    assert builtin_data.keep_chat(doc) and doc.n_targets == sum(doc.mask)
    long = chat_document(builtin_data.chat_record(sig, what, body + "    x = 1\n" * 200, 0), tok)
    assert long.n_targets > builtin_data.MAX_REPLY_TOKENS and not builtin_data.keep_chat(long)

    kinds = [1, 0]
    from dsv4.train.data import Document
    docs = [doc, Document([0, 7, 8], [True, True, True])]
    builtin_data.save_documents(docs, kinds, tmp_path / "train.npz")
    back, back_kinds = builtin_data.load_documents(tmp_path / "train.npz")
    assert [(d.ids, d.mask) for d in back] == [(d.ids, d.mask) for d in docs] and list(back_kinds) == kinds


def test_a_function_document_is_the_answer_alone_between_bos_and_eos():
    tok = _tokenizer()
    _, _, body = next(builtin_data.functions(SOURCE))
    doc = builtin_data.function_document(body, tok)
    assert doc.ids[0] == 0 and doc.ids[-1] == 1 and all(doc.mask)
    assert tok.decode(doc.ids[1:-1], skip_special_tokens=False) == body


RECURSIVE = '''
class Walker:
    def walk(self, node, depth=0):
        """Walk node and its children; walk stops at depth 9."""
        if depth > 9:
            return [node.walk]
        out = ", ".join(str(c) for c in node.children)
        return [out] + [self.walk(c, depth + 1) for c in node.children] + [walk(node)]
'''


def test_a_renamed_copy_renames_the_function_and_only_the_function():
    import random

    [(sig, what, body)] = builtin_data.functions(RECURSIVE)
    new_sig, new_what, new_body = builtin_data.renamed(sig, what, body, random.Random(0), ["alpha"])
    assert new_sig == "alpha(self, node, depth=0)"
    assert new_what == "Walk node and its children; alpha stops at depth 9."
    assert "def alpha(self, node, depth=0):" in new_body and "self.alpha(c, depth + 1)" in new_body
    assert "[alpha(node)]" in new_body                                   # a bare call: the same name
    assert "node.walk]" in new_body and '", ".join(' in new_body          # other objects' attributes stay
    assert new_body.replace("alpha", "walk") == body
    # a name the text already uses is never drawn (it would merge two meanings); no usable name: None
    assert builtin_data.renamed(sig, what, body, random.Random(0), ["node"]) is None
    doubled = {builtin_data.renamed(sig, what, body, random.Random(s), ["alpha", "beta"])[0] for s in range(40)}
    assert "alpha_beta(self, node, depth=0)" in doubled and "beta(self, node, depth=0)" in doubled
    [(sig, what, body)] = builtin_data.functions('def _twice(x):\n    """Double x, as a number."""\n    return 2 * x\n')
    assert builtin_data.renamed(sig, what, body, random.Random(0), ["alpha"])[0] == "_alpha(x)"


def test_the_rename_pool_takes_words_with_a_bare_and_a_spaced_token():
    class Vocab:
        @staticmethod
        def get_vocab():
            return {w: i for i, w in enumerate(["wrap", "Ġwrap", "fill", "Ġlen", "len", "Ġfor", "for", "ĠAB", "AB",
                                                "_x", "Ġ_x", "ab", "Ġab", "Ġonly"])}

    assert builtin_data.rename_pool(Vocab) == ["wrap"]       # not: builtins, keywords, upper case, short, one form


def test_a_package_above_its_share_is_cut_to_whole_files_near_the_share():
    big = [(f"big.whl:m{i}.py", "x" * 100) for i in range(50)]                  # 5,000 chars
    small = [("small.whl:a.py", "y" * 300), ("small.whl:b.py", "z" * 200)]       # 500 chars
    files = small[:1] + big + small[1:]
    kept, report = builtin_data.cap_packages(files, other_chars=4_500, share=0.1)  # cap: 0.1 x 10,000 = 1,000
    assert [f for f in kept if f[0].startswith("small")] == small                  # under the cap: untouched
    big_kept = [f for f in kept if f[0].startswith("big")]
    assert len(big_kept) == 10 and report == {"big.whl": {"files": "10 of 50", "chars": "1,000 of 5,000"}}
    assert [f for f in files if f in kept] == kept                                 # the original order
    assert big_kept != big[:10]                                                    # sampled, not the first modules
    assert builtin_data.cap_packages(files, 4_500, share=0.1) == (kept, report)    # deterministic


def test_chat_repeat_adds_copies_of_the_chat_documents_only():
    docs, kinds = ["code", "chat1", "code2", "chat2"], [0, 1, 0, 1]
    assert train_builtin_gpu.repeat_chat(docs, kinds, 1) == (docs, kinds)
    assert train_builtin_gpu.repeat_chat(docs, kinds, 3) == (
        docs + ["chat1", "chat2"] * 2, [*kinds, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="chat-repeat"):
        train_builtin_gpu.repeat_chat(docs, kinds, 0)


def test_upweight_repeats_the_named_sources_documents_only_and_names_a_typo():
    docs, kinds, sources = ["a", "b", "c", "d"], [0, 1, 0, 1], ["stdlib", "algorithms", "algorithms", "flask"]
    assert train_builtin_gpu.upweight(docs, kinds, sources, {}) == (docs, kinds)
    assert train_builtin_gpu.upweight(docs, kinds, sources, {"algorithms": 3}) == (
        [*docs, "b", "b", "c", "c"], [*kinds, 1, 1, 0, 0])
    assert train_builtin_gpu.upweight(docs, kinds, sources, {"algorithms": 2, "flask": 2}) == (
        [*docs, "b", "c", "d"], [*kinds, 1, 0, 1])
    with pytest.raises(ValueError, match=r"no document comes from \['algorithm'\]"):
        train_builtin_gpu.upweight(docs, kinds, sources, {"algorithm": 2})
    assert train_builtin_gpu.parse_args(["d", "o", "--steps", "1", "--upweight", "algorithms=8, stdlib=2"]
                                        ).upweight == {"algorithms": 8, "stdlib": 2}
    for bad in ("algorithms", "algorithms=x", "algorithms=0"):
        with pytest.raises(SystemExit):
            train_builtin_gpu.parse_args(["d", "o", "--steps", "1", "--upweight", bad])


def test_documents_keep_their_sources_through_train_npz(tmp_path):
    from dsv4.train.data import Document

    docs = [Document([0, 7, 8], [True] * 3), Document([0, 9], [True] * 2), Document([0, 5], [True] * 2)]
    builtin_data.save_documents(docs, [0, 1, 0], tmp_path / "train.npz", ["stdlib", "algorithms", "stdlib"])
    assert builtin_data.load_sources(tmp_path / "train.npz") == ["stdlib", "algorithms", "stdlib"]
    with pytest.raises(ValueError, match="3 documents"):
        builtin_data.save_documents(docs, [0, 1, 0], tmp_path / "bad.npz", ["stdlib"])
    builtin_data.save_documents(docs, [0, 1, 0], tmp_path / "old.npz")              # data before v4: no sources
    with pytest.raises(ValueError, match="no document sources"):
        builtin_data.load_sources(tmp_path / "old.npz")


def test_data_shards_partition_the_documents_and_copy_the_rest(tmp_path):
    import json

    import data_shard

    from dsv4.train.data import Document

    docs = [Document([0, 10 + i, 20 + i], [i % 2 == 0, True, False]) for i in range(7)]
    kinds, sources = [i % 2 for i in range(7)], ["stdlib" if i % 3 else "algorithms" for i in range(7)]
    data = tmp_path / "data"
    data.mkdir()
    builtin_data.save_documents(docs, kinds, data / "train.npz", sources)
    (data / "tokenizer.json").write_text("{}")
    (data / "heldout.py.txt").write_text("x = 1\n")
    (data / "summary.json").write_text(json.dumps({"tokens": 21}))
    seen = []
    for k in range(3):
        info = data_shard.shard(data, tmp_path / f"s{k}", k, 3)
        got, got_kinds = builtin_data.load_documents(tmp_path / f"s{k}" / "train.npz")
        want = list(range(k, 7, 3))
        assert [(d.ids, d.mask) for d in got] == [(docs[i].ids, docs[i].mask) for i in want]
        assert list(got_kinds) == [kinds[i] for i in want]
        assert builtin_data.load_sources(tmp_path / f"s{k}" / "train.npz") == [sources[i] for i in want]
        assert (tmp_path / f"s{k}" / "heldout.py.txt").read_text() == "x = 1\n"
        assert json.loads((tmp_path / f"s{k}" / "summary.json").read_text())["shard"] == info == {
            "index": k, "of": 3, "whole": [], "documents": len(want), "tokens": 3 * len(want)}
        seen += want
    assert sorted(seen) == list(range(7))
    with pytest.raises(ValueError, match="0 <= K < N"):
        data_shard.shard(data, tmp_path / "bad", 3, 3)
    # --whole: shard 1 of 3 plus every algorithms document (0, 3, 6), in the original order
    data_shard.shard(data, tmp_path / "w", 1, 3, ("algorithms",))
    got, _ = builtin_data.load_documents(tmp_path / "w" / "train.npz")
    assert [d.ids for d in got] == [docs[i].ids for i in (0, 1, 3, 4, 6)]
    assert builtin_data.load_sources(tmp_path / "w" / "train.npz") == ["algorithms", "stdlib", "algorithms",
                                                                       "stdlib", "algorithms"]
    with pytest.raises(ValueError, match="no document comes from"):
        data_shard.shard(data, tmp_path / "bad", 0, 3, ("numpy",))


def test_chat_prompts_are_the_requests_of_the_given_length_through_the_marker():
    from dsv4.train.data import Document

    end = 6
    docs = [Document([0, 3, 4, end, 9, 1], [False] * 3 + [True] * 3),        # chat: request of 4 tokens
            Document([0, 3, end, 9, 1], [False] * 2 + [True] * 3),           # chat: 3 tokens
            Document([0, 5, 5, end, 2], [True] * 5)]                         # code (kind 0), same shape
    assert train_builtin_gpu.chat_prompts(docs, [1, 1, 0], 4, end) == [[0, 3, 4, end]]
    assert train_builtin_gpu.chat_prompts(docs, [1, 1, 0], 5, end) == []


def test_header_prompts_are_the_answers_first_def_lines_encoded_as_a_user_prompt():
    from tokenizers import Tokenizer

    from dsv4.tokenizer import encode_prompt
    from dsv4.train.data import Document

    tok = Tokenizer.from_file(str(Path(__file__).resolve().parents[1] / "dsv4/builtin_model/tokenizer.json"))
    end = tok.token_to_id("</think>")

    def chat(answer):
        ids = [0, *tok.encode("Write it.", add_special_tokens=False).ids, end,
               *tok.encode(answer, add_special_tokens=False).ids]
        return Document(ids, [True] * len(ids))

    docs = [chat("```python\n@classmethod\ndef from_float(cls, f):\n    return f\n```"),
            chat("```python\ndef add(a,\n        b):\n    return a\n\ndef sub(a, b):\n    return a\n```"),
            chat("```python\ndef from_float(cls, f):\n    pass\n```"),                  # the same header again
            Document(encode_prompt(tok, "def code(x):", 0), [True] * 6)]               # kind 0: not a chat answer
    head = encode_prompt(tok, "def from_float(cls, f):", 0)
    sub = encode_prompt(tok, "def sub(a, b):", 0)                # add's header spans two lines: its next one-liner
    assert len(head) != len(sub)                                 # so a length picks one of them
    assert train_builtin_gpu.header_prompts(docs, [1, 1, 1, 0], tok, (len(head), len(sub)), end, 0) == [head, sub]
    assert train_builtin_gpu.header_prompts(docs, [1, 1, 1, 0], tok, (len(sub),), end, 0) == [sub]
    assert train_builtin_gpu.header_prompts(docs, [0, 0, 0, 0], tok, (len(head),), end, 0) == []


def test_class_prompts_are_class_headers_of_code_documents():
    from tokenizers import Tokenizer

    from dsv4.tokenizer import encode_prompt
    from dsv4.train.data import Document

    tok = Tokenizer.from_file(str(Path(__file__).resolve().parents[1] / "dsv4/builtin_model/tokenizer.json"))

    def doc(text):
        ids = [0, *tok.encode(text, add_special_tokens=False).ids]
        return Document(ids, [True] * len(ids))

    plain = "class Stack:\n    def __init__(self):"
    documented = 'class Timer(Base):\n    """Time a block."""\n\n    def __enter__(self, a=1):'
    docs = [doc(f"import os\n\n\n{plain}\n        self.items = []\n\n\n{documented}\n        pass\n"),
            doc(f"{plain}\n        pass\n"),                                             # the same header again
            doc("class Flat:\n    x = 1\n\n    def f(self):\n        pass\n"),      # a body before the def
            doc(f"{plain}\n")]                                                        # kind 1 below: not code
    a, b = encode_prompt(tok, plain, 0), encode_prompt(tok, documented, 0)
    assert len(a) != len(b)
    assert train_builtin_gpu.class_prompts(docs, [0, 0, 0, 1], tok, (len(a), len(b)), 0) == [a, b]
    assert train_builtin_gpu.class_prompts(docs, [0, 0, 0, 1], tok, (len(b),), 0) == [b]
    assert train_builtin_gpu.class_prompts(docs, [1, 1, 1, 1], tok, (len(a),), 0) == []


def test_schedule_is_resized_after_probes_in_the_first_quarter():
    """v7a (nineteenth session) was sized once, from its first, capture-laden probe, and trained for half its budget."""
    resize = train_builtin_gpu.resize_now
    assert resize(8, 8, 400, probed=False)                     # calibration, probe or not
    assert resize(16, 8, 400, probed=True) and resize(96, 8, 400, probed=True)
    assert not resize(17, 8, 400, probed=False)                 # no new probe time to learn from
    assert not resize(104, 8, 400, probed=True)                 # past the first quarter: the schedule stays
    assert not resize(4, 8, 400, probed=True)                   # before calibration


def test_sized_steps_fills_the_budget():
    # 10 steps done in 20 s at 2 s a step; 100 s left buys 47 more with the 5% margin.
    assert train_builtin_gpu.sized_steps(10, 20.0, [2.0, 2.0, 2.1], 120.0) == 57
    assert train_builtin_gpu.sized_steps(10, 200.0, [2.0], 120.0) == 11      # over budget: at least one more
    # a probe of 8 s every 8 steps costs 1 s a step more: 100 s * 0.95 / 3 s
    assert train_builtin_gpu.sized_steps(10, 20.0, [2.0, 2.0, 2.1], 120.0, 8.0 / 8) == 41



def test_the_probes_cost_leaves_out_the_first_probe():
    assert train_builtin_gpu.probe_s_per_step([4.4, 1.2, 1.6], 2) == pytest.approx(0.7)     # (1.2 + 1.6) / 2 / 2
    assert train_builtin_gpu.probe_s_per_step([4.4], 4) == pytest.approx(1.1)               # the only one: kept
    assert train_builtin_gpu.probe_s_per_step([], 4) == 0.0


def test_bundle_cuts_the_model_into_parts_that_rejoin(tmp_path, monkeypatch):
    import io
    import tarfile

    out, dest = tmp_path / "run", tmp_path / "bundle"
    (out / "model").mkdir(parents=True)
    (out / "model" / "a.safetensors").write_bytes(bytes(range(256)) * 40)
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    monkeypatch.setattr(train_builtin_gpu, "SHARD_BYTES", 4096)
    files = train_builtin_gpu.bundle(out, dest)
    parts = sorted(dest.glob("model.tar.*"))
    assert len(parts) > 2 and all(p.stat().st_size <= 4096 for p in parts)
    assert {f.name for f in files} == {p.name for p in parts} | {"metrics.jsonl"}
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        assert tar.extractfile("model/a.safetensors").read() == bytes(range(256)) * 40


def _wheel(folder: Path, name: str, version: str, licence: str) -> None:
    import zipfile

    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\nLicense-Expression: {licence}\n")
        z.writestr(f"{name}/__init__.py", "X = 1\n")
        z.writestr(f"{name}/tests/test_x.py", "def test(): pass\n")


def test_package_files_take_the_pinned_permissive_wheels_without_tests(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_data, "PACKAGES", ("demo-pkg==1.0",))
    _wheel(tmp_path, "demo_pkg", "1.0", "MIT")
    _wheel(tmp_path, "unpinned", "2.0", "MIT")
    files, licences = builtin_data.package_files(tmp_path)
    assert [n for n, _ in files] == ["demo_pkg-1.0-py3-none-any.whl:demo_pkg/__init__.py"]
    assert [(r["name"], r["version"], r["licence"]) for r in licences] == [("demo_pkg", "1.0", "MIT")]
    _wheel(tmp_path, "demo_pkg", "1.0", "GPL-3.0-only")
    with pytest.raises(RuntimeError, match="not on the permissive list"):
        builtin_data.package_files(tmp_path)
    monkeypatch.setattr(builtin_data, "PACKAGES", ("demo-pkg==1.0", "absent==3"))
    (tmp_path / "demo_pkg-1.0-py3-none-any.whl").unlink()
    with pytest.raises(RuntimeError, match="lacks the wheels"):
        builtin_data.package_files(tmp_path)


def test_package_files_leave_out_vendored_copies_and_tests_in_any_case(tmp_path, monkeypatch):
    """pip/_vendor holds rich, requests, urllib3, ...: copies of other projects (some already in the corpus) stay
    out (data v5), as do test folders whatever their case (Cython's Tests/); look-alike names stay in."""
    import zipfile

    monkeypatch.setattr(builtin_data, "PACKAGES", ("demo-pkg==1.0",))
    _wheel(tmp_path, "demo_pkg", "1.0", "MIT")
    left_out = ("_vendor/rich/console.py", "vendor/yaml/nodes.py", "_vendored/tomli/_parser.py",
                "externals/_packaging/version.py", "third_party/lib.py", "Tests/helper.py", "_tests/tutil.py",
                "a/Vendored/b.py", "__init__.pyi")
    with zipfile.ZipFile(tmp_path / "demo_pkg-1.0-py3-none-any.whl", "a") as z:
        for name in (*left_out, "external/loader.py", "vendors.py", "contest/rules.py"):
            z.writestr(f"demo_pkg/{name}", "Y = 2\n")
    files, licences = builtin_data.package_files(tmp_path)
    assert [n.split(":", 1)[1] for n, _ in files] == [
        "demo_pkg/__init__.py", "demo_pkg/contest/rules.py", "demo_pkg/external/loader.py", "demo_pkg/vendors.py"]
    assert licences[0]["files"] == 4
    assert not any(builtin_data.corpus_member(f"demo_pkg/{name}") for name in left_out)
    assert builtin_data.corpus_member("pip/_internal/cli/main.py")
    assert not builtin_data.corpus_member("pip/_vendor/requests/api.py")


def test_packages_pin_each_project_once():
    names = [builtin_data._pin(*p.split("==")).split("==")[0] for p in builtin_data.PACKAGES]
    assert len(names) == len(set(names)) and all(p.count("==") == 1 for p in builtin_data.PACKAGES)


def test_distinct_4gram_ratio_and_reply_checks():
    assert eval_builtin.distinct_4gram_ratio(list(range(10))) == 1.0
    assert eval_builtin.distinct_4gram_ratio([1, 2] * 10) == 2 / 17            # a 2-token loop: 2 distinct 4-grams
    assert eval_builtin.distinct_4gram_ratio([1, 2, 3]) == 0.0
    assert eval_builtin.has_def("```python\ndef f(x):\n    return x\n```") and not eval_builtin.has_def("define(")
    assert eval_builtin._parses("```python\ndef f(x):\n    return x\n```")
    assert not eval_builtin._parses("```python\ndef f(x:\n```") and not eval_builtin._parses("\n\n")


def test_mtp_agreement_compares_mtp_at_i_with_main_at_i_plus_1():
    import torch

    class Fake:
        # MTP at position i predicts token i+2; main at position i predicts i+1: both read off h directly
        def mtp_forward(self, h, ids):
            return torch.nn.functional.one_hot(h[0, :, 0].long() + 1, 8).float()[None]

        def main_logits(self, h):
            return torch.nn.functional.one_hot(h[0, :, 0].long(), 8).float()[None]

    h = torch.tensor([[[0.0], [1.0], [2.0], [5.0], [4.0]]])       # main argmax at i: 0 1 2 5 4
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    # MTP argmax at i = h_i + 1 = 1 2 3 (i = 0..2), main argmax at i+1 = 1 2 5: two agree; tokens i+2 = 2 3 4: none
    assert eval_builtin.mtp_agreement(Fake(), h, ids) == (2, 0, 3)


def test_set_version_rewrites_the_one_line(tmp_path):
    src = tmp_path / "builtin.py"
    src.write_text("X = 1\nBUILTIN_VERSION = 1               # comment\nY = 'BUILTIN_VERSION = 1'\n")
    install_builtin.set_version(2, src)
    assert src.read_text() == "X = 1\nBUILTIN_VERSION = 2               # comment\nY = 'BUILTIN_VERSION = 1'\n"
    src.write_text("nothing\n")
    with pytest.raises(RuntimeError, match="BUILTIN_VERSION"):
        install_builtin.set_version(2, src)


def _card_records():
    perf = {"dtype": "torch.bfloat16", "device": "NVIDIA H200", "torch": "2.x", "steps": 1234, "tokens": 98765432,
            "tokens_per_step": 80036.8, "train_s": 390.0, "setup_s": 12.0, "tok_per_s": 253245.0,
            "tok_per_s_steady": 260001.0, "step_s_median": 0.3101, "step_s_first": 4.25, "peak_mem_gib": 41.27,
            "final_loss": 1.2345, "final_mtp_loss": 2.3456, "model_bytes": 39181780,
            "train": {"lr": 2e-3, "warmup_steps": 40, "min_lr_ratio": 0.1, "clip_grad": 1.0, "packs_per_step": 4,
                      "seq_len": 16384, "mtp_weight": 0.3, "bias_update_rate": 1e-3},
            "settings": {"budget_minutes": 6.5, "args": {"data": ".builtin_data", "out": "/tmp/o", "minutes": 6.5,
                                                          "bundle": "/b", "no_eval": False}}}
    sample = {"prompt": "def fibonacci(n):", "text": "\n    return n\n"}
    result = {"code": {"n": 20, "tokens": 128, "distinct4_mean": 0.8123, "distinct4_min": 0.4567, "pass": True,
                       "samples": [sample]},
              "chat": {"n": 20, "max_tokens": 256, "def_and_eos": 19, "fraction": 0.95, "eos": 19, "def": 20,
                       "parses": 17, "pass": True},
              "heldout": {"chars": 12000, "bytes": 12000, "window": 512,
                          "candidate": {"tokens": 3000, "ppl": 9.8765, "nats_per_char": 0.5713,
                                        "bits_per_byte": 0.8242, "mtp": {}},
                          "reference": {"tokens": 4000, "ppl": 153.41, "nats_per_char": 1.6771, "bits_per_byte": 2.42},
                          "candidate_ppl_per_reference_token": 5.5555, "ratio": 27.61, "pass": True},
              "mtp": {"heldout": {"agreement": 0.4321, "positions": 2990, "mtp_top1_acc": 0.3111,
                                  "main_top1_acc": 0.6222},
                      "greedy_code": {"agreement": 0.7654, "positions": 2700}}}
    expected = {"version": 2, "prompt": "def fibonacci(n):", "token_ids": [5] * 32, "heldout_ppl": 9.8765,
                "chat": {"messages": [{"role": "user", "content": "Write f"}], "token_ids": [1] * 40,
                         "text": "```python\ndef f(): pass\n```" + EOS}}
    summary = {"files": 1387, "stdlib_files": 649, "package_files": 738, "packages": 24, "code_documents": 6865,
               "doc_tokens": 1024, "chat_examples": 9821, "tokens": 8546385, "vocab_size": 6144,
               "heldout": ["colorsys.py"]}
    return perf, result, summary, expected


def test_card_takes_every_figure_from_the_records():
    perf, result, summary, expected = _card_records()
    card = builtin_card.render(perf, result, summary, expected, None)
    for figure in ("NVIDIA H200", "1234", "98,765,432", "253,245 tokens/s", "0.310 s", "41.3 GiB", "1.234",
                   "0.812", "0.457", "19/20", "9.88", "0.5713", "153.41", "5.56", "27.61×", "0.432", "0.765",
                   "39.2 MB", "builtin-python-v2", "--minutes 6.5 --bundle", "8,546,385", "img/builtin_loss.png",
                   "builtin_model_v2_data.md"):
        assert figure in card, figure
    assert EOS not in card and "**no**" not in card


def test_card_counts_data_v3s_function_documents_and_renamed_copies():
    perf, result, summary, expected = _card_records()
    assert "renamed" not in builtin_card.render(perf, result, summary, expected, None)      # older data: no claim
    summary = {**summary, "function_documents": 4321, "renamed_chat_examples": 4300}
    card = builtin_card.render(perf, result, summary, expected, None)
    assert "(4,321 of them one function each: BOS, its source, EOS)" in card
    assert "and 4,300 renamed copies of them" in card
    assert "algorithms" not in card                                                     # data v3: no v4 claim


def test_card_says_data_v4s_algorithms_put_readmes_prompt_in_distribution():
    perf, result, summary, expected = _card_records()
    summary = {**summary, "tokens_by_source": {"stdlib": 100, "algorithms": 502816}}
    card = builtin_card.render(perf, result, summary, expected, None)
    assert "`algorithms` package (small classic functions, MIT): 502,816 of the tokens. It holds Fibonacci" in card
    perf["settings"]["args"]["upweight"] = {"algorithms": 16}
    card = builtin_card.render(perf, result, summary, expected, None)
    assert ("502,816 of the tokens; the last run saw its documents 16 times an epoch (`--upweight algorithms=16`)"
            in card)


def _write_run(root, name, perf, init, steps, lr):
    import json

    run = {**perf, "steps": steps, "tokens": steps * 1000, "train_s": 60.0 * steps, "final_loss": 2.0 + lr,
           "settings": {"args": {**perf["settings"]["args"], "out": f"/x/{name}", "init": init, "lr": lr,
                                 "minutes": 8.0}}}
    (root / f"{name}.json").write_text(json.dumps(run))
    (root / f"{name}.jsonl").write_text("".join(json.dumps({"step": i, "loss": 3.0 - i * lr, "tokens": 1000}) + "\n"
                                               for i in range(steps)))
    return {"run": name, "perf": f"{name}.json", "metrics": f"{name}.jsonl", "note": f"{name} note"}


def test_a_lineage_reports_every_run_and_checks_the_chain(tmp_path):
    import json

    import builtin_lineage

    perf, result, summary, expected = _card_records()
    entries = [_write_run(tmp_path, "a", perf, None, 3, 1e-3),
               _write_run(tmp_path, "b", {**perf, "device": "cpu"}, "/tmp/a/model", 2, 5e-4)]
    (tmp_path / "lineage.json").write_text(json.dumps(entries))
    runs = builtin_lineage.load(tmp_path / "lineage.json", root=tmp_path)
    assert builtin_lineage.totals(runs) | {"devices": None} == {"runs": 2, "steps": 5, "tokens": 5000,
                                                              "train_minutes": 5.0, "devices": None}
    assert builtin_lineage.plot(runs, tmp_path / "loss.png").stat().st_size > 1000
    builtin_lineage.check_last(runs, runs[-1]["perf"], "bundle")
    with pytest.raises(ValueError, match="not with the run"):
        builtin_lineage.check_last(runs, runs[0]["perf"], "bundle")
    card = builtin_card.render(runs[-1]["perf"], result, summary, expected, None, runs)
    for figure in ("chain of 2 runs", "**5 steps, 5,000 tokens", "| a | random", "| b | a | 2 | 2,000 |", "b note",
                   ".builtin_data /tmp/a ", "--steps 3", "--row-len 0", "/tmp/b ", "--steps 2", "--init /tmp/a/model",
                   "--lineage LINEAGE.json"):
        assert figure in card, figure
    first, second = card.split("## Reproduce")[1].split("\npython3 ")[1:3]
    assert first.endswith("# GPU") and "--bundle BUNDLE   # CPU" in second             # each run's own device
    assert "--minutes" not in card.split("## Reproduce")[1]

    for bad, match in (([entries[1]], "continues /tmp/a/model"), ([entries[0], entries[0]], "random weights")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            builtin_lineage.load(tmp_path / "bad.json", root=tmp_path)
    (tmp_path / "a.jsonl").write_text(json.dumps({"step": 0, "loss": 3.0, "tokens": 1}) + "\n")
    with pytest.raises(ValueError, match="1 metrics records for 3 steps"):
        builtin_lineage.load(tmp_path / "lineage.json", root=tmp_path)


def test_update_readme_rewrites_the_builtin_sentence(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("with the built-in tiny model (no download: an 11 MB\nDeepSeek-V4-architecture model trained "
                      "on the Python standard library, so it writes Python-like text; model card: ...")
    assert install_builtin.update_readme(39_181_780, readme)
    assert readme.read_text() == ("with the built-in tiny model (no download: a 39 MB\nDeepSeek-V4-architecture model "
                                  "trained on Python source and chats built from it, so it continues Python\nand "
                                  "writes requested functions, in the shape of library code rather than correctly; "
                                  "model card: ...")
    assert install_builtin.update_readme(39_181_780, readme)          # idempotent: the new sentence matches too
    assert install_builtin.update_readme(39_181_780, readme, working=(12, 96))       # with the eval's figure
    assert readme.read_text() == ("with the built-in tiny model (no download: a 39 MB\nDeepSeek-V4-architecture model "
                                  "trained on Python source and chats built from it, so it continues Python\nand "
                                  "writes short functions that end, most of them wrong (12 of 96 small classic "
                                  "tasks it was trained on get a\nworking one); model card: ...")     # wrapped at 115
    assert install_builtin.update_readme(39_181_780, readme, working=(66, 96), unseen=(0, 20))
    assert readme.read_text().endswith("writes short functions that end, many of them wrong (66 of 96 small classic "
                                       "tasks it was trained on get a\nworking one, 0 of 20 tasks it never saw); "
                                       "model card: ...")
    readme.write_text("nothing")
    assert not install_builtin.update_readme(39_181_780, readme)


def test_a_continuation_must_be_the_v2_architecture(tmp_path):
    from dataclasses import replace

    cfg = builtin_config(2)
    train_builtin_gpu.check_same_config(replace(cfg, max_seq_len=cfg.max_seq_len * 2), cfg, tmp_path)
    with pytest.raises(ValueError, match="n_layers"):
        train_builtin_gpu.check_same_config(replace(cfg, n_layers=cfg.n_layers + 1), cfg, tmp_path)


def test_missing_pins_and_a_reused_tokenizer_keep_the_contract(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    monkeypatch.setattr(builtin_data, "PACKAGES", ("demo-pkg==1.0", "other==2.0"))
    _wheel(tmp_path, "demo_pkg", "1.0", "MIT")
    assert builtin_data.missing_pins(tmp_path) == ["other==2.0"]
    with pytest.raises(RuntimeError, match="expected"):
        builtin_data.check_tokenizer(_tokenizer(), "small")           # another vocabulary size (400 ids)
    installed = Tokenizer.from_file(str(Path(__file__).resolve().parent.parent / "dsv4" / "builtin_model" /
                                        "tokenizer.json"))
    builtin_data.check_tokenizer(installed, "the installed v2")        # the contract the shipped model keeps


def test_profile_needs_a_fixed_step_count_larger_than_it():
    """--profile N profiles the last N steps of a --steps run: without --steps, or with N >= steps, it is refused."""
    for extra in (["--minutes", "1", "--profile", "2"], ["--steps", "3", "--profile", "3"]):
        with pytest.raises(SystemExit):
            train_builtin_gpu.parse_args(["data", "out", *extra])
    assert train_builtin_gpu.parse_args(["data", "out", "--steps", "10", "--profile", "3"]).profile == 3


def test_body_logprob_scores_each_body_token_after_its_own_prefix():
    """Teacher-forced body log-probabilities equal those of one forward per prefix (the last position's)."""
    import torch
    from tokenizers import Tokenizer

    import dsv4

    path = Path(__file__).resolve().parent.parent / "dsv4" / "builtin_model"
    model = dsv4.load_model(path, quant_emulation=True, progress=False).eval()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    prompt, body = "def fibonacci(n):", "\n    return n\n"
    got = eval_builtin.body_logprob(model, tok, prompt, body)
    ids = [0, *tok.encode(prompt + body, add_special_tokens=False).ids]
    start = 1 + len(tok.encode(prompt, add_special_tokens=False).ids)
    with torch.no_grad():
        each = [torch.log_softmax(model(torch.tensor([ids[:i]])).float()[0, -1], -1)[ids[i]].item()
                for i in range(start, len(ids))]
    assert got["tokens"] == len(each) == len(ids) - start > 1
    assert got["mean"] == pytest.approx(sum(each) / len(each), abs=1e-4)       # fp32: one forward vs many
    assert got["min"] == pytest.approx(min(each), abs=1e-4)
    with pytest.raises(ValueError, match="continuation"):
        eval_builtin.body_logprob(model, tok, prompt, "")


def test_card_shows_the_readme_sample_as_the_cli_prints_it():
    # The evaluation's samples run past EOS (ignore_eos, for the distinct-4 ratio); `dsv4 generate` stops there.
    perf, result, summary, expected = _card_records()
    result["code"]["samples"][0]["text"] = "\n    return n\n" + EOS + " # Try to find the"
    card = builtin_card.render(perf, result, summary, expected, None)
    assert "def fibonacci(n):\n    return n\n\n```" in card and "Try to find" not in card and EOS not in card


def test_cards_reproduce_commands_parse_back_to_each_runs_arguments():
    """Every train_builtin_gpu.py line of the card's Reproduce block (the committed lineage, as installed) is a
    command its parser accepts, giving that run's recorded arguments back: the upweights, the probe lengths and
    the rest (until v11 the card printed their Python reprs, `--upweight {'stdlib': 2}`, which no shell accepts)."""
    import json
    import shlex

    repo = Path(__file__).resolve().parents[1]
    lineage = json.loads((repo / "bench/results/builtin_v2_lineage.json").read_text())
    for run in lineage:
        run["perf"] = json.loads((repo / run["perf"]).read_text())
    block = builtin_card.reproduce(lineage[-1]["perf"], lineage)
    lines = [line for line in block.splitlines() if "train_builtin_gpu.py" in line]
    assert len(lines) == len(lineage)
    for line, run in zip(lines, lineage, strict=True):
        argv = shlex.split(line, comments=True)[2:]
        got = vars(train_builtin_gpu.parse_args([a for a in argv if a != "BUNDLE" and a != "--bundle"]))
        want = run["perf"]["settings"]["args"]
        for key in ("upweight", "probe_header_lens", "probe_class_lens", "lr", "seed", "row_len", "chat_repeat"):
            if key in want:
                assert got[key] == (tuple(want[key]) if isinstance(want[key], list) else want[key]) or (
                    key == "row_len" and not want[key]), (run["run"], key, got[key], want[key])
        assert got["steps"] == run["perf"]["steps"], run["run"]
