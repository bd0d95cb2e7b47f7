"""Train the built-in model (`dsv4/builtin_model/`): a tiny DeepSeek-V4 on the Python standard library's source.

Stages, all under OUT: `corpus` (the file lists), `tokenizer.json` (byte-level BPE of BUILTIN_VOCAB ids, the V4
special tokens first), `train.jsonl` (pre-tokenised chunks of <= DOC_TOKENS tokens, each starting with BOS, cut
at line ends), `base/` (random init by `dsv4 synth`'s generator + the tokenizer), `run/` (`dsv4.train.run.finetune`
with --full --qat, the QAT emulation on, i.e. exactly what the saved checkpoint computes), `heldout.json` (the
held-out perplexity of `run/model`). `--install` then copies `run/model` into `dsv4/builtin_model/` and writes
`tests/data/builtin_heldout.py.txt` (the held-out text the regression test scores), `tests/data/builtin_expected.json`
(the pinned greedy continuation of PROMPT) and `docs/img/builtin_loss.png`.

The corpus is this interpreter's stdlib (`sysconfig.get_paths()['stdlib']`) without tests, idlelib and
site-packages; HELDOUT files never enter the tokenizer or the training data. The exact command of the shipped
model is in docs/builtin_model.md.
Usage (defaults as shipped): PYTHONPATH=. OMP_NUM_THREADS=1 python3 scripts/train_builtin.py OUT [--install]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sysconfig
import time
from pathlib import Path

import torch

from dsv4.builtin import BUILTIN_SPECIALS, builtin_config

REPO = Path(__file__).resolve().parent.parent
HELDOUT = ("colorsys.py", "fractions.py", "shlex.py", "textwrap.py")
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
BUILTIN_VOCAB = 4096
DOC_TOKENS = 512
HELDOUT_CHARS = 12000          # of the held-out text kept for the CI perplexity test
PROMPT, PINNED_TOKENS = "def fibonacci(n):", 48


def corpus_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the stdlib, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    held = [root / name for name in HELDOUT]
    return [p for p in files if p not in held], held


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BUILTIN_VOCAB, special_tokens=list(BUILTIN_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((read(p) for p in files), trainer)
    for i, s in enumerate(BUILTIN_SPECIALS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    tok.save(str(out))
    return out


def chunks(ids: list[int], newline_ids: set[int], size: int) -> list[list[int]]:
    """`ids` cut into pieces of <= size tokens, each ending after a newline token where one is near the end."""
    out, start = [], 0
    while start < len(ids):
        end = min(start + size, len(ids))
        if end < len(ids):
            cut = next((i + 1 for i in range(end - 1, start + size * 3 // 4, -1) if ids[i] in newline_ids), end)
            end = cut
        out.append(ids[start:end])
        start = end
    return out


def write_records(files: list[Path], tokenizer_file: Path, out: Path) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    newline_ids = {i for t, i in tok.get_vocab().items() if "Ċ" in t}      # byte-level "\n"
    n_tokens = 0
    with open(out, "w") as f:
        for p in files:
            ids = tok.encode(read(p), add_special_tokens=False).ids
            for piece in chunks(ids, newline_ids, DOC_TOKENS - 1):
                f.write(json.dumps({"input_ids": [0, *piece]}) + "\n")
                n_tokens += len(piece) + 1
    return n_tokens


def heldout_text(files: list[Path]) -> str:
    return "".join(read(p) for p in files)[:HELDOUT_CHARS]


def perplexity(model_dir: Path, text: str) -> float:
    """exp(mean next-token NLL) of `text` in DOC_TOKENS windows (each BOS + tokens), QAT emulation on."""
    import dsv4
    from dsv4.tokenizer import load_tokenizer

    model = dsv4.load_model(model_dir, dtype=torch.float32, progress=False)
    ids = load_tokenizer(model_dir).encode(text, add_special_tokens=False).ids
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), DOC_TOKENS - 1):
            window = [0, *ids[start:start + DOC_TOKENS - 1]]
            logits = model(torch.tensor([window]))[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
            n += len(window) - 1
    return math.exp(nll / n)


def train(out: Path, steps: int, lr: float, packs_per_step: int) -> Path:
    from dsv4.checkpoint import synthesize
    from dsv4.train.loop import TrainConfig
    from dsv4.train.run import finetune

    base = synthesize(builtin_config(), out / "base", seed=0, progress=False)
    shutil.copy(out / "tokenizer.json", base / "tokenizer.json")
    cfg = TrainConfig(max_steps=steps, lr=lr, warmup_steps=min(50, steps // 10), min_lr_ratio=0.1,
                      weight_decay=0.0, clip_grad=1.0, seq_len=DOC_TOKENS * 2, packs_per_step=packs_per_step,
                      grad_ckpt=False, mtp_weight=0.3, bias_update_rate=1e-3, seed=0)
    finetune(out / "train.jsonl", out / "run", str(base), qat=True, train=cfg, quant_emulation=True)
    return out / "run" / "model"


def install(out: Path) -> None:
    import dsv4

    dest, data = REPO / "dsv4" / "builtin_model", REPO / "tests" / "data"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(out / "run" / "model", dest)
    _, held = corpus_files()
    data.mkdir(exist_ok=True)
    (data / "builtin_heldout.py.txt").write_text(heldout_text(held))
    shutil.copy(out / "run" / "loss.png", REPO / "docs" / "img" / "builtin_loss.png")
    llm = dsv4.LLM(str(dest), max_num_seqs=1)
    done = llm.generate(PROMPT, dsv4.SamplingParams(temperature=0, max_tokens=PINNED_TOKENS, ignore_eos=True))[0]
    pinned = {"prompt": PROMPT, "token_ids": done.token_ids, "text": done.text}
    (data / "builtin_expected.json").write_text(json.dumps(pinned, indent=1, ensure_ascii=False) + "\n")
    print(f"held-out perplexity {perplexity(dest, heldout_text(held)):.4f}\n{PROMPT}{done.text}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--packs-per-step", type=int, default=2)
    ap.add_argument("--install", action="store_true", help="copy OUT's trained model into the package")
    args = ap.parse_args()
    out = Path(args.out)
    if args.install:
        install(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    files, held = corpus_files()
    (out / "corpus.json").write_text(json.dumps({"train": [str(p) for p in files], "heldout": [str(p) for p in held]},
                                                indent=1))
    train_tokenizer(files, out / "tokenizer.json")
    n_tokens = write_records(files, out / "tokenizer.json", out / "train.jsonl")
    print(f"{len(files)} training files, {n_tokens} tokens; held out: {', '.join(HELDOUT)}", flush=True)
    t0 = time.perf_counter()
    model_dir = train(out, args.steps, args.lr, args.packs_per_step)
    minutes = (time.perf_counter() - t0) / 60
    ppl = perplexity(model_dir, heldout_text(held))
    summary = {"train_files": len(files), "train_tokens": n_tokens, "steps": args.steps, "train_minutes": minutes,
               "heldout_ppl": ppl, "threads": torch.get_num_threads()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
