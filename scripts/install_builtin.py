"""Install a GPU-trained built-in model v2 bundle (scripts/train_builtin_gpu.py --bundle) into the package.

One command after the bundle arrives (CPU, a few minutes):
    PYTHONPATH=. python3 scripts/install_builtin.py /work/v2_bundle
Steps: rejoin model.tar.* and check the model (builtin_config(2), strict load); evaluate it on CPU against v1
(scripts/eval_builtin.py, while v1 is still installed: BUNDLE/eval_cpu.json and docs/builtin_model_eval.json);
copy it into dsv4/builtin_model/; set dsv4.builtin.BUILTIN_VERSION = 2; write the CI expectations
(tests/data/builtin_expected.json: pinned greedy continuation, held-out perplexity, a chat reply that stops;
tests/data/builtin_heldout.py.txt), the README's sentence on it, docs/img/builtin_loss.png and the model card
docs/builtin_model.md (scripts/builtin_card.py, every figure from perf.json, eval_cpu.json and the data's summary.json).
Then run `python3 -m pytest -q tests/test_builtin_model.py tests/test_builtin_v2.py tests/test_cli.py
tests/test_parity_docs.py` and commit; docs/parity.md's worked example runs the built-in model, so rerun its three
commands and paste their output between its worked-example markers (and the --plot image into docs/img/) when that
test fails (the nineteenth session's install missed it: CI caught it).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import builtin_card  # noqa: E402  (a sibling script, found through sys.path)
import builtin_lineage  # noqa: E402
import eval_builtin  # noqa: E402

from dsv4.builtin import BUILTIN_GENERATION_CONFIG  # noqa: E402

VERSION = 2
README_WIDTH = 115                                   # README.md's prose lines
PROMPT, PINNED_TOKENS = "def fibonacci(n):", 24      # short: CI decodes it alone and batched on 2 cores
PPL_WINDOWS = 4                                       # CI scores the held-out text's first 4 windows (2,044 tokens)
CHAT_SLACK = 16                                       # the chat test allows the pinned reply's length + this


def unpack(bundle: Path, dest: Path) -> Path:
    parts = sorted(bundle.glob("model.tar.*"))
    if not parts:
        raise FileNotFoundError(f"{bundle} has no model.tar.NN parts")
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        tar.extractall(dest, filter="data")
    return dest / "model"


def check(model_dir: Path, data: Path) -> None:
    import dsv4
    from dsv4.builtin import builtin_config

    cfg = dsv4.ModelConfig.from_file(model_dir)
    if cfg != builtin_config(VERSION).replace(max_seq_len=cfg.max_seq_len):
        raise ValueError(f"{model_dir} is not builtin_config({VERSION})")
    if (model_dir / "tokenizer.json").read_bytes() != (data / "tokenizer.json").read_bytes():
        raise ValueError(f"{model_dir}/tokenizer.json differs from {data}/tokenizer.json")
    dsv4.load_model(model_dir, progress=False)                      # strict: every tensor, shape and dtype


def set_version(version: int, path: Path = REPO / "dsv4" / "builtin.py") -> None:
    text, n = re.subn(r"^BUILTIN_VERSION = \d+", f"BUILTIN_VERSION = {version}", path.read_text(), flags=re.M)
    if n != 1:
        raise RuntimeError(f"{path}: no `BUILTIN_VERSION = N` line to rewrite")
    path.write_text(text)


def update_readme(model_bytes: int, path: Path = REPO / "README.md", working: tuple[int, int] | None = None,
                  unseen: tuple[int, int] | None = None) -> bool:
    """The README's sentence on the built-in model: its size, what it was trained on and, with `working` (passed,
    asked: eval_builtin's working-functions figure on the training task families; `unseen`: on the held-out ones),
    how often its functions work. README must not promise more than those figures."""
    pattern = r"an? \d+ MB(\s+)DeepSeek-V4-architecture model trained on [^,]+, so it [^;]+;"
    if working:
        share = "most of them wrong" if 2 * working[0] < working[1] else "many of them wrong"
        held = f", {unseen[0]} of {unseen[1]} tasks it never saw" if unseen else ""
        what = (f"writes short functions that end, {share} ({working[0]} of {working[1]} small classic tasks "
                f"it was trained on get a working one{held})")
    else:
        what = "writes requested functions, in the shape of library code rather than correctly"
    new = (f"a {model_bytes / 1e6:.0f} MB\\1DeepSeek-V4-architecture model trained on Python source and chats built "
           f"from it, so it continues Python\n" + textwrap.fill(f"and {what};", README_WIDTH))
    text, n = re.subn(pattern, new, path.read_text())
    if n != 1:
        print(f"WARNING: {path}: the built-in model's sentence was not found; update it by hand", flush=True)
        return False
    path.write_text(text)
    return True


def expectations(model_dir: Path, result: dict) -> dict:
    """What tests/test_builtin_model.py checks: the pinned greedy continuation, the held-out perplexity, and the
    shortest held-out chat request the model answered with a def and EOS (pinned ids, so it stays fast)."""
    import dsv4

    llm = dsv4.LLM(str(model_dir), max_num_seqs=1)
    done = llm.generate(PROMPT, dsv4.SamplingParams(temperature=0, max_tokens=PINNED_TOKENS, ignore_eos=True))[0]
    text = (REPO / "tests" / "data" / "builtin_heldout.py.txt").read_text()
    ppl = eval_builtin.score_text(llm.model, llm.tokenizer, text, PPL_WINDOWS)["ppl"]
    out = {"version": VERSION, "prompt": PROMPT, "token_ids": done.token_ids, "text": done.text,
           "heldout_ppl": round(ppl, 4), "window": eval_builtin.WINDOW, "heldout_windows": PPL_WINDOWS}
    answered = [r for r in result["chat"]["replies"] if r["eos"] and r["def"]]
    if answered:
        best = min(answered, key=lambda r: r["tokens"])
        messages = [{"role": "user", "content": best["request"]}]
        reply = llm.chat(messages, dsv4.SamplingParams(temperature=0, max_tokens=best["tokens"] + CHAT_SLACK))[0]
        out["chat"] = {"messages": messages, "max_tokens": best["tokens"] + CHAT_SLACK,
                       "token_ids": reply.token_ids, "text": reply.text}
    else:
        print("WARNING: no held-out chat reply had a def and EOS: the expectations have no chat test", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", help="folder with model.tar.NN, perf.json, metrics.jsonl, loss.png (eval.json)")
    ap.add_argument("--data", default=str(REPO / ".builtin_data"), help="scripts/builtin_data.py's output folder")
    ap.add_argument("--eval-json", help="reuse this eval_builtin.py result instead of evaluating again")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lineage", help="the chain of runs that made the bundle's model, oldest first, the bundle's "
                                      "run last (scripts/builtin_lineage.py): the card reports every run and "
                                      "draws one loss curve across them")
    args = ap.parse_args(argv)
    bundle, data = Path(args.bundle), Path(args.data)
    perf = json.loads((bundle / "perf.json").read_text())
    lineage = builtin_lineage.load(Path(args.lineage)) if args.lineage else None
    if lineage:
        builtin_lineage.check_last(lineage, perf, bundle)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = unpack(bundle, Path(tmp))
        check(model_dir, data)
        if args.eval_json:
            result = json.loads(Path(args.eval_json).read_text())
        else:
            reference, source = eval_builtin.reference_dir(model_dir)     # v1, before it is replaced
            result = eval_builtin.evaluate(model_dir, data, reference, args.threads)
            result["reference_source"] = source
        print(eval_builtin.table(result), flush=True)
        text = json.dumps(result, indent=1, ensure_ascii=False) + "\n"
        (bundle / "eval_cpu.json").write_text(text)
        (REPO / "docs" / "builtin_model_eval.json").write_text(text)
        dest = REPO / "dsv4" / "builtin_model"
        shutil.rmtree(dest)
        shutil.copytree(model_dir, dest)
        (dest / "generation_config.json").write_text(json.dumps(BUILTIN_GENERATION_CONFIG, indent=1) + "\n")
    set_version(VERSION)
    tests_data = REPO / "tests" / "data"
    shutil.copy(data / "heldout.py.txt", tests_data / "builtin_heldout.py.txt")
    expected = expectations(dest, result)
    (tests_data / "builtin_expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    if lineage:
        builtin_lineage.plot(lineage, REPO / "docs" / "img" / "builtin_loss.png")
    else:
        shutil.copy(bundle / "loss.png", REPO / "docs" / "img" / "builtin_loss.png")
    summary = json.loads((data / "summary.json").read_text())
    train_eval = json.loads((bundle / "eval.json").read_text()) if (bundle / "eval.json").exists() else None
    trained, held = ((result.get("exercises") or {}).get(key) for key in ("trained", "heldout"))
    update_readme(perf["model_bytes"], working=(trained["passed"], trained["n"]) if trained else None,
                  unseen=(held["passed"], held["n"]) if held else None)
    card = builtin_card.render(perf, result, summary, expected, train_eval, lineage)
    (REPO / "docs" / "builtin_model.md").write_text(card)
    print(f"installed v{VERSION} into {dest}; wrote tests/data/builtin_expected.json, docs/builtin_model.md, "
          "docs/builtin_model_eval.json, docs/img/builtin_loss.png\nnext: python3 -m pytest -q "
          "tests/test_builtin_model.py tests/test_builtin_v2.py tests/test_cli.py tests/test_parity_docs.py "
          "(docs/parity.md's worked example runs the built-in model)", flush=True)


if __name__ == "__main__":
    main()
