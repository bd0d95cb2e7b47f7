"""Built-in model v2's pieces that run without training: its architecture's size, the data builder's chat set and
binary format, and the GPU script's budget arithmetic (scripts/builtin_data.py, scripts/train_builtin_gpu.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dsv4.builtin import BUILTIN_SPECIALS, builtin_config
from dsv4.chat.tokens import EOS
from dsv4.checkpoint.inventory import inventory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import builtin_data
import train_builtin_gpu


def test_v2_every_feature_within_40_mb():
    cfg = builtin_config(2)
    size = sum(s.nbytes for s in inventory(cfg).values())
    assert size <= 40e6
    assert size > 2 * sum(s.nbytes for s in inventory(builtin_config(1)).values())
    assert {0, 4, 128} <= set(cfg.compress_ratios)                 # sliding, CSA (+ indexer), HCA
    assert 0 < cfg.n_hash_layers < cfg.n_layers and cfg.n_shared_experts and cfg.n_mtp_layers and cfg.hc_mult > 1
    assert (cfg.dtype, cfg.expert_dtype) == ("fp8", "fp4")
    assert builtin_config() == builtin_config(1)                      # the shipped model stays loadable
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


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SOURCE], trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(BUILTIN_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def test_chat_record_trains_only_the_reply_and_its_eos(tmp_path):
    from dsv4.train.data import chat_document

    tok = _tokenizer()
    sig, what, body = next(builtin_data.functions(SOURCE))
    record = builtin_data.chat_record(sig, what, body, 0)
    assert record["messages"][0]["content"] == "Write a Python function `add(a, b=1)` that return the sum of a and b."
    doc = chat_document(record, tok)
    target = tok.decode([t for t, m in zip(doc.ids, doc.mask, strict=True) if m], skip_special_tokens=False)
    assert target == f"```python\n{body}```{EOS}"
    assert doc.ids[-1] == 1 and doc.mask[-1] and not any(doc.mask[:5])

    kinds = [1, 0]
    from dsv4.train.data import Document
    docs = [doc, Document([0, 7, 8], [True, True, True])]
    builtin_data.save_documents(docs, kinds, tmp_path / "train.npz")
    back, back_kinds = builtin_data.load_documents(tmp_path / "train.npz")
    assert [(d.ids, d.mask) for d in back] == [(d.ids, d.mask) for d in docs] and list(back_kinds) == kinds


def test_sized_steps_fills_the_budget():
    # 10 steps done in 20 s at 2 s a step; 100 s left buys 47 more with the 5% margin.
    assert train_builtin_gpu.sized_steps(10, 20.0, [2.0, 2.0, 2.1], 120.0) == 57
    assert train_builtin_gpu.sized_steps(10, 200.0, [2.0], 120.0) == 11      # over budget: at least one more


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
