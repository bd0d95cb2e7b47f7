"""Does the built-in model write WORKING small functions? Functional pass rate of its greedy continuations of bare
signatures, checked against the test cases of scripts/exercises.py's task families.

Two prompt sets: `trained` (one signature per training family, its first name and parameters: `def fibonacci(n):`
among them, README's prompt) and `heldout` (`exercises.heldout_prompts`: families never in the training data,
the generalisation probe). Each prompt is continued greedily (one batch, on CPU, up to --max-tokens, stopping at
EOS); the function is the prompt plus the continuation up to the first non-indented line after it. It passes when,
run alone in a fresh Python process (10 s limit), it returns every case's expected value (equal and with the same
repr, as tests/test_exercises.py checks the generated data). The code run is the model's own output: a subprocess
with a time limit, on a machine with no network beyond the package registries.
Usage: PYTHONPATH=. python3 scripts/bench/exercise_pass.py MODEL_DIR [--out PATH] [--threads N] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # scripts/

import exercises as ex

MAX_TOKENS = 192                # a small function and its EOS fit (the exercises' longest are ~15 lines)
SCRIPTS = str(Path(__file__).resolve().parents[1])
# The cases come from scripts/exercises.py itself in the child (some arguments are functions, e.g. str.lower: no
# text form carries them).
RUNNER = textwrap.dedent("""
    import copy, json, sys
    source, name, family, scripts = json.loads(sys.stdin.read())
    sys.path.insert(0, scripts)
    import exercises
    cases = next(f for f in exercises.FAMILIES if f.key == family).cases
    namespace = {}
    try:
        exec(compile(source, "<generated>", "exec"), namespace)
        fn = namespace[name]
        for args, expected in cases:
            got = fn(*copy.deepcopy(args))
            if got != expected or repr(got) != repr(expected):
                print(f"{name}{tuple(args)!r} returned {got!r}, expected {expected!r}"); break
        else:
            print("PASS")
    except BaseException as e:
        print(f"{type(e).__name__}: {e}"[:200])
""")


def trained_prompts() -> list[tuple[str, str, str]]:
    """(prompt, function name, family key) for every training family: its first name and parameter choice."""
    return [(f"def {f.names[0]}({', '.join(f.params[0])}):", f.names[0], f.key) for f in ex.FAMILIES
            if f.key not in ex.HELDOUT_FAMILIES]


def heldout_prompts() -> list[tuple[str, str, str]]:
    out = []
    for p in ex.heldout_prompts():
        name = p[len("def "):p.index("(")]
        out.append((p, name, ex.family_of(name)))
    return out


def function_text(prompt: str, continuation: str) -> str:
    """The prompt's function: its first line, then the continuation's lines up to the first non-blank line that
    is not indented (the next top-level statement)."""
    lines = (prompt + continuation).split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line.strip() and not line[0].isspace():
            break
        kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def own_docstring(source: str, family: str) -> bool | None:
    """Is the function's docstring summary one of its family's phrasings (any parameter names), or None when it
    has no docstring? The twenty-fifth session found the body follows the docstring: a model that blends two
    families' phrasings then writes the blend's body."""
    m = re.search(r'^\s+"""(.*?)(?:\n\s*\n|>>>|""")', source, re.S | re.M)
    if not m:
        return None
    summary = " ".join(m.group(1).split())
    fam = next(f for f in ex.FAMILIES if f.key == family)
    return any(re.fullmatch(re.sub(r"\\\$\{?\w+\}?", r"\\w+", re.escape(t)), summary) for t in fam.docs)


def check(source: str, name: str, family: str, timeout: float = 10) -> str:
    """"PASS" or what went wrong (a wrong result, an exception, a timeout)."""
    try:
        out = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps([source, name, family, SCRIPTS]),
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timeout ({timeout:g} s)"
    return (out.stdout.strip().splitlines() or [out.stderr.strip()[-200:] or "no output"])[-1]


def run_set(llm, prompts: list[tuple[str, str, str]], max_tokens: int) -> dict:
    import dsv4

    outs = llm.generate([p for p, _, _ in prompts], dsv4.SamplingParams(temperature=0, max_tokens=max_tokens))
    samples = []
    for (prompt, name, family), o in zip(prompts, outs, strict=True):
        source = function_text(prompt, o.text)
        verdict = check(source, name, family)
        samples.append({"prompt": prompt, "family": family, "function": source, "eos": o.finish_reason == "stop",
                        "pass": verdict == "PASS", "verdict": verdict, "own_docstring": own_docstring(source, family)})
    passed = sum(s["pass"] for s in samples)
    by_doc = {}         # the pass rate by whether the docstring is one of the family's own phrasings
    for key, doc in (("own", True), ("other", False), ("none", None)):
        chosen = [s for s in samples if s["own_docstring"] is doc]
        by_doc[key] = {"n": len(chosen), "passed": sum(s["pass"] for s in chosen)}
    return {"n": len(samples), "passed": passed, "rate": passed / len(samples), "by_docstring": by_doc,
            "samples": samples}


def main(argv=None) -> dict:
    import dsv4

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a model folder (e.g. dsv4/builtin_model)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sets = {"trained": trained_prompts(), "heldout": heldout_prompts()}
    llm = dsv4.LLM(args.model, max_num_seqs=max(len(s) for s in sets.values()),
                   num_pages=4 * max(len(s) for s in sets.values()), page_size=128)
    out = {"model": args.model, "max_tokens": args.max_tokens}
    for name, prompts in sets.items():
        t = time.perf_counter()
        out[name] = run_set(llm, prompts, args.max_tokens)
        r = out[name]
        docs = ", ".join(f"{k} {v['passed']}/{v['n']}" for k, v in r["by_docstring"].items())
        print(f"{name}: {r['passed']}/{r['n']} pass ({time.perf_counter() - t:.0f} s); by docstring: {docs}",
              flush=True)
    readme = next(s for s in out["trained"]["samples"] if s["family"] == "fibonacci")
    print(f"{readme['prompt']} -> {readme['verdict']}\n{readme['function']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return out


if __name__ == "__main__":
    main()
