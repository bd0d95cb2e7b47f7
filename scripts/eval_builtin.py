"""Evaluate a built-in model candidate on CPU (greedy), against issue 17's acceptance figures.

(a) code: distinct 4-gram ratio of 128 greedy tokens (EOS ignored) for each of CODE_PROMPTS (written for this
    evaluation: signatures and class headers of everyday functions, none of them verbatim in the training data);
    mean >= 0.6 and none below 0.3.
(b) chat: the first 20 held-out requests (`heldout_chat.json`: functions of the held-out files, never trained on)
    in the official chat encoding (`LLM.chat`, chat mode), greedy, <= 256 tokens: the fraction whose reply
    contains a `def` and ends with EOS (>= 90%).
(c) held-out perplexity of the held-out text (`heldout.py.txt`, the same 12,000 characters v1 was scored on) in
    512-token windows (BOS + 511), fp32, QAT emulation on, as v1's 153.4. Per-token perplexities of different
    tokenizers do not compare, so both models' summed NLL over the SAME characters is also given per character
    (nats/char), per byte (bits/byte = NLL / ln 2 / UTF-8 bytes) and per v1 token:
    ppl_per_v1_token = exp(NLL / n_v1_tokens), i.e. the candidate's perplexity had it used v1's tokenization of
    the text. The issue's "4x lower than v1 on the same files" is checked as v1_ppl / that >= 4.
(d) MTP: the MTP block fed as in training (spec §3.8, DeepSeek-V3 shift: position i combines the main stream h_i
    with token i+1 and predicts token i+2, `Transformer.mtp_forward`); top-1 agreement of its argmax with the main
    model's argmax at position i+1 (the main model's next-next token) on the held-out windows, and on the greedy
    code continuations of (a), where the main model's next-next token is the generated one (the acceptance rate
    one-token greedy speculative decoding would see).

Usage: PYTHONPATH=. python3 scripts/eval_builtin.py MODEL_DIR --out eval.json [--reference V1_DIR]
The reference (v1) defaults to the installed built-in model when it is v1, else the v1 files from git history.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsv4.train.greedy_probe import distinct_4gram_ratio  # noqa: E402  (shared with the training probe)

WINDOW = 512
CODE_TOKENS, CHAT_TOKENS, N_CHAT = 128, 256, 20
V1_COMMIT = "a3b9406"            # a main commit whose dsv4/builtin_model/ is v1 (the fallback reference)
CODE_PROMPTS = (
    "def fibonacci(n):",
    "def is_palindrome(text):",
    "def flatten(nested):",
    "def chunked(items, size):",
    "def merge_sorted(left, right):",
    "def count_words(path):",
    "def parse_key_value(line, sep='='):",
    "def retry(func, attempts=3, delay=0.5):",
    "def binary_search(items, target):",
    "def read_config(filename):",
    "def celsius_to_fahrenheit(degrees):",
    "def unique_everseen(iterable):",
    "class Stack:\n    def __init__(self):",
    "class LRUCache:\n    def __init__(self, capacity):",
    "class Vector2D:\n    def __init__(self, x, y):",
    "class Counter:\n    \"\"\"Count hashable items.\"\"\"\n\n    def __init__(self):",
    "class Timer:\n    def __enter__(self):",
    "import os\n\n\ndef list_python_files(root):",
    "def normalize_whitespace(s):",
    "async def fetch_all(urls):",
)


def has_def(text: str) -> bool:
    return re.search(r"\bdef\s+\w+\s*\(", text) is not None


def code_eval(llm, sp, prompts: tuple[str, ...] = CODE_PROMPTS) -> dict:
    greedy = sp(temperature=0, max_tokens=CODE_TOKENS, ignore_eos=True)
    outs = llm.generate(list(prompts), greedy)
    ratios = [distinct_4gram_ratio(o.token_ids) for o in outs]
    samples = [{"prompt": p, "text": o.text, "token_ids": o.token_ids, "distinct4": r}
               for p, o, r in zip(prompts, outs, ratios, strict=True)]
    mean, low = sum(ratios) / len(ratios), min(ratios)
    return {"n": len(ratios), "tokens": CODE_TOKENS, "distinct4_mean": mean, "distinct4_min": low,
            "pass": mean >= 0.6 and low >= 0.3, "samples": samples}


def chat_eval(llm, sp, requests: list[dict]) -> dict:
    eos = llm.model.cfg.eos_token_id
    outs = llm.chat([r["messages"] for r in requests], sp(temperature=0, max_tokens=CHAT_TOKENS))
    replies = []
    for r, o in zip(requests, outs, strict=True):
        stopped = o.finish_reason == "stop" and bool(o.token_ids) and o.token_ids[-1] == eos
        replies.append({"request": r["messages"][0]["content"], "reply": o.message.get("content") or o.text,
                        "tokens": len(o.token_ids), "eos": stopped, "def": has_def(o.text),
                        "parses": _parses(o.text)})
    ok = sum(r["eos"] and r["def"] for r in replies)
    return {"n": len(replies), "max_tokens": CHAT_TOKENS, "def_and_eos": ok, "fraction": ok / len(replies),
            "eos": sum(r["eos"] for r in replies), "def": sum(r["def"] for r in replies),
            "parses": sum(r["parses"] for r in replies), "pass": ok / len(replies) >= 0.9, "replies": replies}


def _parses(text: str) -> bool:
    """The reply's ```python block (or the whole reply) is valid Python defining a function."""
    import ast

    m = re.search(r"```(?:python)?\n(.*?)(```|$)", text, re.S)
    try:
        tree = ast.parse(m.group(1) if m else text)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(tree))


def score_text(model, tokenizer, text: str, max_windows: int | None = None) -> dict:
    """Summed NLL of `text` (its first `max_windows` windows) in WINDOW-token windows, and the MTP agreement on the
    same windows."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    nll, n, agree, mtp_hit, main_hit, n_mtp = 0.0, 0, 0, 0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids), WINDOW - 1)[:max_windows]:
            window = torch.tensor([[0, *ids[start:start + WINDOW - 1]]])
            h = model.hidden(window)
            logits = model.main_logits(h)[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            n += window.shape[1] - 1
            if model.cfg.n_mtp_layers and window.shape[1] >= 3:
                a, m, t = mtp_agreement(model, h, window)
                agree, mtp_hit, n_mtp = agree + a, mtp_hit + m, n_mtp + t
                main_hit += int((logits.argmax(-1) == window[0, 1:]).sum())
    chars, nbytes = len(text), len(text.encode())
    out = {"tokens": n, "nll": nll, "ppl": math.exp(nll / n), "nats_per_char": nll / chars,
           "bits_per_byte": nll / math.log(2) / nbytes}
    if n_mtp:
        out["mtp"] = {"positions": n_mtp, "agreement": agree / n_mtp, "mtp_top1_acc": mtp_hit / n_mtp,
                      "main_top1_acc": main_hit / n}
    return out


def body_logprob(model, tokenizer, prompt: str, body: str) -> dict:
    """Log-probabilities (nats) of `body`'s tokens after BOS + `prompt`, teacher-forced: how close the model is to
    writing that body for a code prompt (a continuous figure beside the greedy text, which moves only when a whole
    path changes). The prompt's tokens must be a prefix of (prompt + body)'s, else the body is not what follows."""
    head = tokenizer.encode(prompt, add_special_tokens=False).ids
    ids = tokenizer.encode(prompt + body, add_special_tokens=False).ids
    if ids[:len(head)] != head or len(ids) == len(head):
        raise ValueError(f"{body!r} does not tokenise as a continuation of {prompt!r}")
    seq = torch.tensor([[model.cfg.bos_token_id, *ids]])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).float()[0, :-1], dim=-1)
    lp = logp[len(head):].gather(-1, seq[0, len(head) + 1:, None]).squeeze(-1)
    return {"tokens": len(lp), "mean": lp.mean().item(), "min": lp.min().item()}


def mtp_agreement(model, h: torch.Tensor, ids: torch.Tensor) -> tuple[int, int, int]:
    """(MTP argmax == main argmax at i+1, MTP argmax == token i+2, positions) over one sequence ids [1, s]."""
    s = ids.shape[1]
    mtp = model.mtp_forward(h[:, :-1], ids[:, 1:])[0, :s - 2].argmax(-1)       # predicts token i+2
    main_next = model.main_logits(h[:, 1:-1])[0].argmax(-1)                   # main's prediction at i+1
    return int((mtp == main_next).sum()), int((mtp == ids[0, 2:]).sum()), s - 2


def greedy_mtp(llm, code: dict) -> dict:
    """MTP agreement on the greedy continuations themselves (prompt + 128 generated tokens)."""
    agree, n = 0, 0
    with torch.no_grad():
        for s in code["samples"]:
            ids = torch.tensor([llm.encode(s["prompt"]) + s["token_ids"]])
            h = llm.model.hidden(ids)
            a, _, t = mtp_agreement(llm.model, h, ids)
            agree, n = agree + a, n + t
    return {"positions": n, "agreement": agree / n}


def reference_dir(candidate: Path) -> tuple[Path, str]:
    """The v1 model to compare with: the installed one when it is v1, else v1's files from git."""
    from dsv4.builtin import builtin_config
    from dsv4.config import ModelConfig

    installed = REPO / "dsv4" / "builtin_model"
    if installed.resolve() != candidate.resolve() and (installed / "config.json").exists():
        cfg = ModelConfig.from_file(installed)
        if cfg == builtin_config(1).replace(max_seq_len=cfg.max_seq_len):
            return installed, "installed"
    tmp = Path(tempfile.mkdtemp(prefix="builtin_v1_"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", V1_COMMIT, "dsv4/builtin_model"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", str(tmp)], input=archive, check=True)
    return tmp / "dsv4" / "builtin_model", f"git {V1_COMMIT}"


def heldout_eval(llm, text: str, reference: Path | None) -> dict:
    import dsv4
    from dsv4.tokenizer import load_tokenizer

    out = {"chars": len(text), "bytes": len(text.encode()), "window": WINDOW,
           "candidate": score_text(llm.model, llm.tokenizer, text)}
    if reference is not None:
        ref_model = dsv4.load_model(reference, progress=False)
        ref = score_text(ref_model, load_tokenizer(reference), text)
        ref.pop("mtp", None)
        per_v1 = math.exp(out["candidate"]["nll"] / ref["tokens"])
        out |= {"reference": ref, "candidate_ppl_per_reference_token": per_v1, "ratio": ref["ppl"] / per_v1,
                "pass": ref["ppl"] / per_v1 >= 4.0}
    return out


def evaluate(model_dir: Path, data: Path, reference: Path | None, threads: int) -> dict:
    import dsv4

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    llm = dsv4.LLM(str(model_dir), max_num_seqs=N_CHAT, num_pages=N_CHAT * 4, page_size=128)
    timing = {"load_s": time.perf_counter() - t0}
    requests = json.loads((data / "heldout_chat.json").read_text())[:N_CHAT]
    result = {"model": str(model_dir), "threads": threads, "params": sum(p.numel() for p in llm.model.parameters())}
    for name, run in (("code", lambda: code_eval(llm, dsv4.SamplingParams)),
                      ("chat", lambda: chat_eval(llm, dsv4.SamplingParams, requests)),
                      ("heldout", lambda: heldout_eval(llm, (data / "heldout.py.txt").read_text(), reference))):
        t = time.perf_counter()
        result[name] = run()
        timing[f"{name}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result["exercises"] = exercises_eval(llm)
    timing["exercises_s"] = time.perf_counter() - t
    result["mtp"] = {"heldout": result["heldout"]["candidate"].get("mtp")}
    if llm.model.cfg.n_mtp_layers:
        result["mtp"]["greedy_code"] = greedy_mtp(llm, result["code"])
    result["speed"] = speed(llm, dsv4.SamplingParams)
    result["timing"] = timing
    return result


def exercises_eval(llm) -> dict:
    """Working functions (scripts/bench/exercise_pass.py): the greedy continuation of a bare signature of each
    training task family of scripts/exercises.py, and of the held-out families, run against the family's cases."""
    sys.path.insert(0, str(REPO / "scripts" / "bench"))
    import exercise_pass

    return {name: exercise_pass.run_set(llm, prompts, exercise_pass.MAX_TOKENS) for name, prompts in
            (("trained", exercise_pass.trained_prompts()), ("heldout", exercise_pass.heldout_prompts()))}


def speed(llm, sp, tokens: int = 96) -> dict:
    """One sequence's greedy decode speed on this machine (what `dsv4 generate` runs): wall and CPU seconds of
    `tokens` tokens minus those of one (the prefill)."""
    def run(n):
        w, c = time.perf_counter(), time.process_time()
        llm.generate(CODE_PROMPTS[0], sp(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - w, time.process_time() - c

    run(1)                                                         # warm-up
    (w1, c1), (wn, cn) = run(1), run(tokens)
    return {"tokens": tokens, "threads": torch.get_num_threads(), "decode_tok_per_s_wall": (tokens - 1) / (wn - w1),
            "decode_tok_per_s_cpu": (tokens - 1) / (cn - c1), "generate_s_wall": wn, "generate_s_cpu": cn}


def table(r: dict) -> str:
    c, ch, h = r["code"], r["chat"], r["heldout"]
    cand = h["candidate"]
    rows = [("code: distinct 4-gram ratio, mean / min", f"{c['distinct4_mean']:.3f} / {c['distinct4_min']:.3f}",
             ">= 0.6 / >= 0.3", c["pass"]),
            (f"chat: def + EOS within {ch['max_tokens']} tokens", f"{ch['def_and_eos']}/{ch['n']}", ">= 90%",
             ch["pass"]),
            ("held-out perplexity (own tokens)", f"{cand['ppl']:.2f} ({cand['tokens']} tokens)", "", None),
            ("held-out nats/char, bits/byte", f"{cand['nats_per_char']:.4f}, {cand['bits_per_byte']:.4f}", "", None)]
    if "reference" in h:
        ref = h["reference"]
        rows += [("v1: perplexity, nats/char", f"{ref['ppl']:.2f} ({ref['tokens']} tokens), "
                  f"{ref['nats_per_char']:.4f}", "", None),
                 ("perplexity per v1 token; v1 / it", f"{h['candidate_ppl_per_reference_token']:.2f}; "
                  f"{h['ratio']:.2f}x", ">= 4x", h["pass"])]
    for key in ("trained", "heldout"):
        e = (r.get("exercises") or {}).get(key)
        if e:
            rows.append((f"working functions, {key} task families", f"{e['passed']}/{e['n']}", "", None))
    for key, label in (("heldout", "MTP agreement, held-out"), ("greedy_code", "MTP agreement, greedy code")):
        m = (r.get("mtp") or {}).get(key)
        if m:
            rows.append((label, f"{m['agreement']:.3f} ({m['positions']} positions)", "", None))
    width = max(len(a) for a, *_ in rows)
    if "speed" in r:
        sp = r["speed"]
        rows.append((f"CPU decode, 1 sequence, {sp['threads']} thread(s)", f"{sp['decode_tok_per_s_wall']:.1f} tok/s "
                     f"wall, {sp['decode_tok_per_s_cpu']:.1f} tok/s CPU", "", None))
    lines = [f"{a:<{width}}  {b:<32} {c:<16} {'' if ok is None else 'PASS' if ok else 'FAIL'}" for a, b, c, ok in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model directory (official format + tokenizer.json)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--data", default=str(REPO / ".builtin_data"), help="scripts/builtin_data.py's output folder")
    ap.add_argument("--reference", help="the v1 model directory (default: installed v1, else from git)")
    ap.add_argument("--no-reference", action="store_true", help="skip the v1 comparison")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = ap.parse_args(argv)
    model_dir = Path(args.model)
    reference, source = (None, None) if args.no_reference else (
        (Path(args.reference), "given") if args.reference else reference_dir(model_dir))
    result = evaluate(model_dir, Path(args.data), reference, args.threads)
    result["reference_source"] = source
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


if __name__ == "__main__":
    main()
