"""Build the built-in model v2's training data (CPU): corpus, chat set, tokenizer, pre-tokenised binary.

Corpus: this interpreter's CPython stdlib as v1 (`train_builtin.corpus_files`: no tests, idlelib, turtledemo,
site-packages; HELDOUT files never enter anything) plus the `.py` files (tests and vendored copies of other projects
excluded: `corpus_member`) of the permissively licensed wheels in PACKAGES (`pip download`ed into --wheels, default
.builtin_wheels/; name, version and licence of each recorded in OUT/licences.json). A package file holding a
held-out function verbatim is dropped.
Chat set: every function or method with a docstring (parsed with `ast`) becomes a user request phrased from its
signature and the docstring's first sentence, answered by the function's source in a ```python block, encoded in
the official V4 chat format (chat mode, `dsv4.train.data.chat_document`: loss only on the assistant turn + EOS).
The held-out files' functions become OUT/heldout_chat.json (evaluation requests, never trained on).
Two more documents per chat example (data v3): the same function as a code document of its own (BOS + the answer's
source + EOS: what a user's bare `def name(args):` prompt should get, a short function that ends), and a renamed
chat copy: request and answer with the function's name replaced, consistently, by a name drawn from the tokenizer's
own words (`rename_pool`), so that the model learns to copy the requested name into its `def`, whatever the name
(run 19 wrote `defwrap(` for a request for `wrap`: it had never written that name after `def`).

Outputs under OUT: tokenizer.json (byte-level BPE, VOCAB ids, the V4 specials first), train.npz (uint16 `ids`,
int64 `offsets` of each document's start + the end, `mask` = np.packbits of the per-token target flags, `kind`
0 code / 1 chat per document), licences.json, heldout_chat.json, heldout.py.txt (held-out text for perplexity),
summary.json. Load train.npz with `load_documents` (what scripts/train_builtin_gpu.py does); `load_sources` gives
each document's source (`stdlib` or the package's name: `--upweight` in the trainer repeats one source's documents).
Usage: PYTHONPATH=. python3 scripts/builtin_data.py .builtin_data [--tokenizer OLD/tokenizer.json]
(--tokenizer: the corpus grows but the token ids stay those a checkpoint was trained with.)
"""

from __future__ import annotations

import argparse
import ast
import builtins
import itertools
import json
import keyword
import random
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exercises import exercise_files
from train_builtin import HELDOUT, HELDOUT_CHARS, chunks, corpus_files, read

from dsv4.builtin import BUILTIN_SPECIALS

VOCAB = 6144
DOC_TOKENS = 1024               # code documents: BOS + at most 1023 tokens, cut at line ends
MAX_FUNC_CHARS = 2400           # longer functions are left out of the chat set
MAX_PACKAGE_SHARE = 0.10        # no package above this share of the corpus's characters (sympy alone was 34%, more
                                # than the standard library's 23%: every continuation turned into sympy doctests)
MAX_REPLY_TOKENS = 256          # chat answers (reply + EOS) longer than this are left out: the chat set teaches
                                # small functions that end, as the check asks (def + EOS within 256 tokens);
                                # run 16 imitated long answers and ran past the turn's end
RENAME_SEED = 17               # the renamed chat copies' names are drawn from random.Random(RENAME_SEED + example)
# Pinned so the data is reproducible; every one is under MIT / BSD / Apache-2.0 / PSF (pure Python up to data v4;
# data v5 has compiled wheels too, of which only the .py files are read).
PACKAGES = ("attrs==26.1.0", "boltons==26.2.0", "cachetools==8.0.2", "click==8.5.1", "decorator==5.3.1",
            "flask==3.1.3", "idna==3.20", "iniconfig==2.3.1", "itsdangerous==2.2.0", "jinja2==3.1.6",
            "more-itertools==11.2.1", "networkx==3.6.1", "packaging==26.4", "pluggy==1.7.0", "pyparsing==3.3.3",
            "python-dateutil==4.0.0", "requests==2.34.2", "rich==15.0.0", "six==1.17.0", "sortedcontainers==2.4.0",
            "toolz==1.2.0", "typing-extensions==4.16.0", "urllib3==2.8.0", "werkzeug==3.1.9",
            # data v2 (2026-12-03): the first GPU runs reached 2 epochs of the 8.5 M tokens above in 9 minutes;
            # these more than double the corpus (sympy alone: 16.5 MB of source), all BSD-3 or MIT.
            "sympy==1.14.0", "mpmath==1.4.1", "django==5.2.19", "setuptools==84.2.1",
            # data v4 (2026-12-04): small classic algorithms (sorting, searching, dynamic programming, number
            # theory, strings; 401 files, MIT), the kind of function a user's bare `def name(n):` prompt asks for.
            # The library code above holds almost none (no Fibonacci outside sympy's class); this one does: README's
            # prompt is therefore in the data's distribution, as docs/builtin_model_v2_data.md says (and the card,
            # scripts/builtin_card.algorithms_note, once a model trained on it is installed).
            "algorithms==1.0.1",
            # data v5 (2026-12-05): the model trained on data v4 (16 M tokens, ~5 epochs) plateaued at a held-out
            # perplexity of ~21 with its training loss far below: data-limited. These 64 packages (web and async
            # servers and clients, databases, task queues, parsers, linters and type checkers, build tools, data
            # science) are ordinary library code with docstrings, MIT / BSD / Apache-2.0 (aiohttp: Apache-2.0 AND
            # MIT, trio: MIT OR Apache-2.0); their vendored subtrees are left out (VENDORED_PARTS). Some wheels are
            # CPython 3.11 x86-64 builds: only their .py files are read. Looked at and left out: astroid (LGPL),
            # docutils (GPL among its licences), peewee (no licence in its METADATA), numpy (Zlib, CC0 in its
            # licence expression), matplotlib (its own PSF-derived licence; bundled fonts under others), scipy (a
            # 35 MB wheel), pygments (lexers: regex tables), yapf (its tests and a lib2to3 copy are top-level
            # packages), statsmodels, fonttools, bokeh (specialised or declarative; the corpus was large enough).
            "aiohttp==3.14.5", "alembic==1.20.1", "anyio==4.16.0", "arrow==1.4.0", "babel==2.19.0",
            "beautifulsoup4==4.15.0", "black==26.10.1", "cattrs==26.2.1", "celery==5.7.0", "coverage==7.18.0",
            "cython==3.3.1", "dask==2026.8.0", "distributed==2026.8.0", "fastapi==0.165.0", "flake8==7.5.0",
            "h11==0.16.0", "hatchling==1.33.0", "httpcore==1.0.9", "httpx==0.29.0", "humanize==4.17.0",
            "inflect==7.6.0", "invoke==3.0.3", "ipython==9.18.1", "isort==9.0.2", "jedi==0.20.1",
            "jsonschema==4.26.0", "kombu==5.7.0", "lark==1.3.1", "markdown==3.11.3", "marshmallow==4.4.0",
            "mistune==3.4.0", "mypy==2.4.1", "nltk==3.10.4", "openpyxl==3.1.5", "pandas==3.1.1", "parso==0.8.7",
            "pip==26.3", "poetry-core==2.5.0", "prompt-toolkit==3.0.53", "pycodestyle==2.15.0", "pycparser==3.12",
            "pydantic==2.14.4", "pyflakes==4.1.0", "pyrsistent==0.20.0", "pytest==9.2.0", "pyyaml==6.0.4",
            "redis==8.2.0", "scikit-learn==1.9.1", "scrapy==2.19.0", "sphinx==9.0.4", "sqlalchemy==2.1.9",
            "sqlglot==30.31.0", "sqlparse==0.6.1", "starlette==1.10.0", "textual==8.2.8", "tomlkit==0.15.3",
            "tornado==6.6.1", "tox==4.67.17", "traitlets==5.16.1", "trio==0.35.0", "twisted==26.10.0",
            "virtualenv==21.15.14", "wrapt==2.5.2", "xarray==2026.9.0")
# Data v6 (2026-12-06): small self-contained functions generated by scripts/exercises.py (task families with varied
# names, parameters, docstrings and bodies; some families held out for a generalisation probe). The models trained on
# library code recalled the three Fibonacci functions of `algorithms` verbatim (v9) without carrying a body over to a
# new name or signature: the corpus holds too few small functions of each kind. Written here: the project's licence.
EXERCISES = "exercises"
EXERCISE_VARIANTS = 40
PERMISSIVE = re.compile(r"\b(MIT|BSD|Apache|PSF|Python Software Foundation)", re.I)
SKIP_PARTS = {"test", "tests", "testing", "_testing", "_tests"}     # folder names, compared lower-case (Cython's Tests)
# Folders holding copies of other projects (pip/_vendor: rich, requests, urllib3, ...; setuptools/_vendor:
# packaging, more_itertools, ...; sklearn/externals): left out, as the corpus has most of them already (data v5).
VENDORED_PARTS = {"_vendor", "vendor", "_vendored", "vendored", "externals", "_externals", "third_party",
                  "_third_party"}
# Data v7 (2026-12-06): a third of the requests name no signature, as a newcomer types them ("Write a function that
# reverses a string."): the v12 models, trained only on requests that spelt the signature out, answered those with
# made-up names (`def weeks(self):` for a prime check), and v12c ran on to the token limit for 2 of 12
# (scripts/bench/natural_chat.py; bench/NOTES.md, twenty-sixth session). `{does}` is the docstring as a clause
# after "that" (`third_person`).
TEMPLATES = (
    "Write a Python function `{sig}` that {does}",
    "Implement `{sig}` in Python: {what}",
    "Can you write `{sig}`? {What}",
    "Python: define `{sig}`. {What}",
    "Write a function that {does}",
    "Write a Python function that {does}",
)
# The imperative openings of docstrings ("Return ...") that `third_person` conjugates ("returns ...").
VERBS = frozenset(
    "add append apply build calculate call check clear close collect compare compute convert copy count create "
    "decide decode determine encode escape filter find flatten format generate get group insert iterate join list "
    "load make merge normalize open parse pop produce push quote read remove replace return reverse run save set "
    "sort split strip test tell unquote update validate verify wrap write yield".split())


# ------------------------------------------------------------------------------------------------ corpus
def download(wheels: Path, pins=PACKAGES) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                    "-d", str(wheels), *pins], check=True)


def missing_pins(wheels: Path) -> list[str]:
    """The PACKAGES pins that have no wheel in `wheels` (by the wheel file name: name-version-...)."""
    have = {_pin(*w.name.split("-")[:2]) for w in wheels.glob("*.whl")}
    return [p for p in PACKAGES if _pin(*p.split("==")) not in have]


def wheel_licence(meta: str) -> str:
    msg = Parser().parsestr(meta)
    classifiers = [c.split("::")[-1].strip() for c in msg.get_all("Classifier") or [] if c.startswith("License")]
    text = msg.get("License-Expression") or "; ".join(classifiers) or (msg.get("License") or "").split("\n")[0]
    return text.strip()


def package_files(wheels: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    """([(name, source)], licence records) of every wheel in `wheels`; a non-permissive licence is an error."""
    files, licences = [], []
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(z.read(meta_name).decode())
            if _pin(meta["Name"], meta["Version"]) not in {_pin(*p.split("==")) for p in PACKAGES}:
                continue                                    # not one of the pinned packages
            licence = wheel_licence(z.read(meta_name).decode())
            if not PERMISSIVE.search(licence):
                raise RuntimeError(f"{whl.name}: licence {licence!r} is not on the permissive list")
            names = sorted(n for n in z.namelist() if corpus_member(n))
            for n in names:
                files.append((f"{whl.name}:{n}", z.read(n).decode("utf-8", errors="replace")))
            licences.append({"name": meta["Name"], "version": meta["Version"], "licence": licence,
                             "files": len(names), "wheel": whl.name})
    missing = {_pin(*p.split("==")) for p in PACKAGES} - {_pin(r["name"], r["version"]) for r in licences}
    if missing:
        raise RuntimeError(f"{wheels} lacks the wheels of {sorted(missing)}")
    return files, licences


def exercises_licence(files: int, variants: int) -> dict:
    """The licences.json record of the generated exercises."""
    return {"name": EXERCISES, "version": f"scripts/exercises.py, {variants} functions per task family",
            "licence": "MIT (this project's own: generated by scripts/exercises.py, written here)", "files": files,
            "files_used": files, "wheel": None}


def corpus_member(name: str) -> bool:
    """Whether a wheel member (a path inside the wheel) enters the corpus: a .py file outside the dist-info, not a
    test (`test_*.py`, or under a SKIP_PARTS folder) and not a vendored copy of another project (under a
    VENDORED_PARTS folder). Folder names are compared lower-case."""
    *folders, base = name.split("/")
    parts = {f.lower() for f in folders}
    return (name.endswith(".py") and ".dist-info/" not in name and not base.startswith("test_")
            and not (SKIP_PARTS | VENDORED_PARTS) & parts)


def cap_packages(files: list[tuple[str, str]], other_chars: int, share: float = MAX_PACKAGE_SHARE
                 ) -> tuple[list[tuple[str, str]], dict]:
    """The package files (`package_files` names: WHEEL:path) with every wheel above `share` of the corpus
    (these files + `other_chars`) cut to about that share: whole files, in a fixed pseudo-random order (sha1 of the
    name), so the kept part samples the whole package rather than its first modules. Returns (kept files in their
    original order, {wheel: {"files": kept of total, "chars": kept of total}} for the capped wheels)."""
    import hashlib

    cap = share * (other_chars + sum(len(src) for _, src in files))
    by_wheel: dict[str, list[tuple[str, str]]] = {}
    for name, src in files:
        by_wheel.setdefault(name.split(":", 1)[0], []).append((name, src))
    keep, report = set(), {}
    for wheel, group in by_wheel.items():
        total = sum(len(src) for _, src in group)
        if total <= cap:
            keep.update(name for name, _ in group)
            continue
        chars, kept = 0, 0
        for name, src in sorted(group, key=lambda f: hashlib.sha1(f[0].encode()).hexdigest()):
            if chars + len(src) > cap:
                continue
            keep.add(name)
            chars, kept = chars + len(src), kept + 1
        report[wheel] = {"files": f"{kept} of {len(group)}", "chars": f"{chars:,} of {total:,}"}
    return [(n, s) for n, s in files if n in keep], report


def _pin(name: str, version: str) -> str:
    """`name==version` with the name normalised as PyPI does (PEP 503)."""
    return f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}"


# ------------------------------------------------------------------------------------------------ chat set
def first_sentence(doc: str) -> str | None:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    s = (m.group(1) if m else para).strip()
    if len(s) < 12 or len(s) > 300 or s.startswith((">>>", ":", "..")):
        return None
    return s


def functions(source: str):
    """(signature, docstring first sentence, source) of every function/method with a usable docstring."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__"):
            continue
        doc = ast.get_docstring(node)
        what = first_sentence(doc) if doc else None
        if not what:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        body = dedent(short_docstring(lines, node, start, doc))
        if len(body) > MAX_FUNC_CHARS:
            continue
        prefix = "async def " if isinstance(node, ast.AsyncFunctionDef) else ""
        yield f"{prefix}{node.name}({ast.unparse(node.args)})", what, body.rstrip() + "\n"


def dedent(text: str) -> str:
    """`text` moved left by its first line's indentation; blank lines stay (as bare newlines)."""
    indent = len(text) - len(text.lstrip(" "))
    out = []
    for line in text.splitlines(keepends=True):
        if not line.strip():
            out.append("\n")
        elif line[:indent].isspace() or not indent:
            out.append(line[indent:])
        else:                               # a continuation line left of the def (inside a string): flush left
            out.append(line.lstrip(" "))
    return "".join(out)


def short_docstring(lines: list[str], node, start: int, doc: str) -> str:
    """The function's source lines with its docstring cut to the first paragraph (a chat answer writes the
    function, not its doctests: long Examples sections teach replies that run past any turn's end). The source
    stays as written when the cut would not parse (escapes, odd quoting)."""
    text = "".join(lines[start:node.end_lineno])
    first = node.body[0]
    para = doc.strip().split("\n\n")[0].strip()
    if para == doc.strip() or '"""' in para or "\\" in para:
        return text
    ind = lines[first.lineno - 1][:first.col_offset]
    if not ind.isspace() and ind:
        return text
    cut = ind + '"""' + ("\n" + ind).join(para.splitlines()) + '"""\n'
    short = "".join(lines[start:first.lineno - 1]) + cut + "".join(lines[first.end_lineno:node.end_lineno])
    try:
        ast.parse(dedent(short))
    except SyntaxError:
        return text
    return short


def keep_chat(doc) -> bool:
    """A chat document enters the set when it fits a document and its reply (+ EOS) fits MAX_REPLY_TOKENS."""
    return len(doc) <= DOC_TOKENS and doc.n_targets <= MAX_REPLY_TOKENS


def third_person(what_l: str) -> str:
    """A lower-cased docstring sentence as a clause after "... a function that": an imperative opening verb in the
    third person ("return the sum" -> "returns the sum", "apply" -> "applies", "push" -> "pushes"); any other
    opening as "does this: <sentence>"; one already in the third person ("converts ...") as it is."""
    verb, _, rest = what_l.partition(" ")
    if verb[:-1] in VERBS or verb[:-2] in VERBS or (verb.endswith("ies") and verb[:-3] + "y" in VERBS):
        return what_l
    if verb not in VERBS:
        return f"does this: {what_l[0].upper()}{what_l[1:]}"
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        verb += "es"
    elif verb.endswith("y") and verb[-2] not in "aeiou":
        verb = verb[:-1] + "ies"
    else:
        verb += "s"
    return f"{verb} {rest}".rstrip()


def chat_record(sig: str, what: str, body: str, k: int) -> dict:
    what_l = what[0].lower() + what[1:] if what[:2] != what[:2].upper() else what
    user = TEMPLATES[k % len(TEMPLATES)].format(sig=sig, what=what_l, What=what, does=third_person(what_l))
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": f"```python\n{body}```"}]}


def function_document(body: str, tok):
    """The function alone as a code document: BOS + its source + EOS, every token a target (a bare header prompt,
    as README's `def fibonacci(n):`, then has short functions that end to follow)."""
    from dsv4.train.data import Document

    ids = [0, *tok.encode(body, add_special_tokens=False).ids, 1]
    return Document(ids, [True] * len(ids))


def rename_pool(tok) -> list[str]:
    """Lower-case words the tokenizer has as one token both bare (`X`: after a backtick in a request) and after a
    space (`ĠX`: after `def`), less keywords and builtins: the names a renamed chat copy is built from."""
    vocab = tok.get_vocab()
    taken = set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins)) | {"self", "cls"}
    return sorted(t for t in vocab if len(t) >= 3 and t.isascii() and t.isidentifier() and t == t.lower()
                  and "Ġ" + t in vocab and t not in taken and not t.startswith("_"))


def _uses(name: str) -> re.Pattern:
    """`name` where it means the function: a bare word (not an attribute of something else, so `x.join` stays),
    or an attribute of self / cls (a method calling itself)."""
    return re.compile(rf"(?:(?<![\w.])|(?<=\bself\.)|(?<=\bcls\.)){re.escape(name)}(?!\w)")


def renamed(sig: str, what: str, body: str, rng: random.Random, pool: list[str]):
    """(sig, what, body) with the function's name replaced everywhere it names the function by one or two different
    pool words joined by `_` (leading underscores kept), or None when no draw gives a body that parses."""
    old = re.match(r"(?:async def )?(\w+)\(", sig).group(1)
    lead, uses = old[:len(old) - len(old.lstrip("_"))], _uses(old)
    for _ in range(8):
        new = lead + "_".join(rng.sample(pool, min(rng.choice((1, 2)), len(pool))))
        if new == old or re.search(rf"(?<!\w){re.escape(new)}(?!\w)", sig + what + body):
            continue                                    # a name already in the text would merge two meanings
        out = (uses.sub(new, sig), uses.sub(new, what), uses.sub(new, body))
        try:
            ast.parse(out[2])
        except SyntaxError:
            continue
        if re.search(rf"\bdef {re.escape(new)}\(", out[2]):
            return out
    return None


# ------------------------------------------------------------------------------------------------ tokens
def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(BUILTIN_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    check_tokenizer(tok, "the trained tokenizer")
    tok.save(str(out))


def check_tokenizer(tok, where) -> None:
    """The built-in model's contract: VOCAB ids (token ids are stored as uint16) with the V4 specials first."""
    if tok.get_vocab_size() != VOCAB:
        raise RuntimeError(f"{where}: {tok.get_vocab_size()} ids, expected {VOCAB}")
    for i, s in enumerate(BUILTIN_SPECIALS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"{where}: special token {s!r} has id {tok.token_to_id(s)}, expected {i}")


def save_documents(docs, kinds: list[int], path: Path, sources: list[str] | None = None) -> None:
    """train.npz: the documents' tokens, targets and kinds; with `sources` (a name per document) also `source`
    (an index per document) and `source_names`."""
    lengths = np.array([len(d.ids) for d in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.fromiter((t for d in docs for t in d.ids), dtype=np.uint16, count=int(offsets[-1]))
    mask = np.packbits(np.fromiter((m for d in docs for m in d.mask), dtype=bool, count=int(offsets[-1])))
    # compressed: token ids of code deflate ~3x, and this file travels to the GPU machine (64 MiB per call)
    extra = {}
    if sources is not None:
        if len(sources) != len(docs):
            raise ValueError(f"{len(sources)} sources for {len(docs)} documents")
        names = sorted(set(sources))
        index = {n: i for i, n in enumerate(names)}
        extra = {"source": np.array([index[n] for n in sources], dtype=np.uint16), "source_names": np.array(names)}
    np.savez_compressed(path, ids=ids, offsets=offsets, mask=mask, kind=np.array(kinds, dtype=np.uint8), **extra)


def load_documents(path) -> tuple[list, np.ndarray]:
    """(list of dsv4.train.data.Document, kind per document) from a train.npz written by `save_documents`."""
    from dsv4.train.data import Document

    z = np.load(path)
    offsets = z["offsets"]
    ids = z["ids"].astype(np.int64)
    mask = np.unpackbits(z["mask"], count=int(offsets[-1])).astype(bool)
    docs = [Document(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in itertools.pairwise(offsets)]
    return docs, z["kind"]


def load_sources(path) -> list[str]:
    """Each document's source in a train.npz (`stdlib` or a package's name); data written before v4 has none."""
    z = np.load(path)
    if "source" not in z:
        raise ValueError(f"{path} records no document sources (data before v4): rebuild it with "
                         "scripts/builtin_data.py")
    names = [str(n) for n in z["source_names"]]
    return [names[i] for i in z["source"]]


def main() -> None:
    from tokenizers import Tokenizer

    from dsv4.train.data import Document, chat_document

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--wheels", default=".builtin_wheels",
                    help="folder of the wheels; the PACKAGES it lacks are pip-downloaded into it")
    ap.add_argument("--exercises", type=int, default=EXERCISE_VARIANTS, metavar="N",
                    help="functions per task family of scripts/exercises.py's generated exercises (data v6; "
                         f"default {EXERCISE_VARIANTS}; 0 leaves them out)")
    ap.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one (keeps the token ids "
                                        "of models trained on earlier data, so they can go on training)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wheels = Path(args.wheels)
    missing = missing_pins(wheels)
    if missing:
        download(wheels, missing)
    std, held = corpus_files()
    held_funcs = [f for p in held for f in functions(read(p))]
    held_sources = {body for _, _, body in held_funcs}
    pkg, licences = package_files(wheels)
    std_sources = [(str(p), read(p)) for p in std]
    pkg, capped = cap_packages(pkg, sum(len(src) for _, src in std_sources))
    for r in licences:
        r["files_used"] = sum(n.startswith(r["wheel"] + ":") for n, _ in pkg)
    dropped = [n for n, s in pkg if any(b in s for b in held_sources)]
    sources = std_sources + [(n, s) for n, s in pkg if n not in dropped]
    wheel_name = {r["wheel"]: r["name"] for r in licences}
    origin = ["stdlib"] * len(std_sources) + [wheel_name[n.split(":", 1)[0]] for n, _ in sources[len(std_sources):]]
    ex = exercise_files(variants=args.exercises) if args.exercises else []
    if ex:
        sources += ex
        origin += [EXERCISES] * len(ex)
        licences.append(exercises_licence(len(ex), args.exercises))

    if args.tokenizer:
        check_tokenizer(Tokenizer.from_file(args.tokenizer), args.tokenizer)
        if Path(args.tokenizer).resolve() != (out / "tokenizer.json").resolve():
            shutil.copy(args.tokenizer, out / "tokenizer.json")
    else:
        train_tokenizer([s for _, s in sources], out / "tokenizer.json")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    newline_ids = {i for t, i in tok.get_vocab().items() if "Ċ" in t}

    pool = rename_pool(tok)
    docs, kinds, n_chat, n_renamed, seen, func_tokens = [], [], 0, 0, set(), 0
    doc_sources = []
    for (_, text), src in zip(sources, origin, strict=True):
        first = len(docs)
        for piece in chunks(tok.encode(text, add_special_tokens=False).ids, newline_ids, DOC_TOKENS - 1):
            docs.append(Document([0, *piece], [True] * (len(piece) + 1)))
            kinds.append(0)
        for sig, what, body in functions(text):
            if body in seen or body in held_sources:
                continue
            seen.add(body)
            doc = chat_document(chat_record(sig, what, body, n_chat), tok)
            if not keep_chat(doc):
                continue
            func = function_document(body, tok)
            docs += [doc, func]
            kinds += [1, 0]
            n_chat, func_tokens = n_chat + 1, func_tokens + len(func)
            copy = renamed(sig, what, body, random.Random(RENAME_SEED + n_chat), pool)
            doc = copy and chat_document(chat_record(*copy, n_chat), tok)   # another template than the original's
            if doc and keep_chat(doc):
                docs.append(doc)
                kinds.append(1)
                n_renamed += 1
        doc_sources += [src] * (len(docs) - first)
    save_documents(docs, kinds, out / "train.npz", doc_sources)

    requests = [{**chat_record(sig, what, body, k), "reference": body} for k, (sig, what, body) in
                enumerate(held_funcs)]
    for r in requests:
        r["messages"] = r["messages"][:1]
    (out / "heldout_chat.json").write_text(json.dumps(requests, indent=1, ensure_ascii=False) + "\n")
    (out / "heldout.py.txt").write_text("".join(read(p) for p in held)[:HELDOUT_CHARS])
    stdlib = {"name": "CPython standard library", "version": sys.version.split()[0],
              "licence": "PSF-2.0 (Python Software Foundation License Version 2)", "files": len(std)}
    (out / "licences.json").write_text(json.dumps([stdlib, *licences], indent=1) + "\n")
    n_tok = sum(len(d) for d in docs)
    tokens_by_source = dict.fromkeys(doc_sources, 0)                     # first-seen order: stdlib, then packages
    for d, src in zip(docs, doc_sources, strict=True):
        tokens_by_source[src] += len(d)
    summary = {"files": len(sources), "stdlib_files": len(std), "package_files": len(pkg) - len(dropped),
               "dropped_package_files": dropped, "packages": sum(r["wheel"] is not None for r in licences),
               "exercise_files": len(ex), "exercise_variants": args.exercises, "documents": len(docs),
               "code_documents": len(docs) - n_chat - n_renamed, "chat_examples": n_chat,
               "function_documents": n_chat,                     # one per chat example
               "renamed_chat_examples": n_renamed, "rename_pool": len(pool), "tokens": n_tok,
               "chat_tokens": sum(len(d) for d, k in zip(docs, kinds, strict=True) if k),
               "function_tokens": func_tokens,
               "target_tokens": sum(d.n_targets for d in docs), "heldout_chat_requests": len(requests),
               "vocab_size": VOCAB, "doc_tokens": DOC_TOKENS, "max_reply_tokens": MAX_REPLY_TOKENS,
               "max_package_share": MAX_PACKAGE_SHARE, "capped_packages": capped,
               "heldout": list(HELDOUT),
               "tokens_by_source": tokens_by_source,
               "train_npz_bytes": (out / "train.npz").stat().st_size}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "dropped_package_files"}), flush=True)


if __name__ == "__main__":
    main()
