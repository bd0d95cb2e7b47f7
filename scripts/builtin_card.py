"""The built-in model v2's card (docs/builtin_model.md), rendered by scripts/install_builtin.py.

Every figure comes from the JSON records: perf.json (scripts/train_builtin_gpu.py: hardware, steps, tokens,
tokens/s, peak memory, final loss), eval (scripts/eval_builtin.py on CPU), the data's summary.json
(scripts/builtin_data.py) and the CI expectations; the prose around them states only what the scripts do.
"""
# ruff: noqa: E501  (the f-strings below are the card's markdown lines, which carry long table rows)

from __future__ import annotations

from dsv4.chat.tokens import EOS


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _gib(perf: dict) -> str:
    return f"{perf['peak_mem_gib']:.1f} GiB" if perf.get("peak_mem_gib") is not None else "not measured (CPU)"


def architecture(cfg, model_bytes: int) -> str:
    kinds = ", ".join(cfg.layer_kinds[:cfg.n_layers])
    return f"""| | |
|---|---|
| blocks | {cfg.n_layers} ({kinds}) + {cfg.n_mtp_layers} MTP block; sliding window {cfg.window_size}; CSA ratio 4 with a {cfg.index_n_heads}-head lightning indexer, top-{cfg.index_topk}; HCA ratio 128 |
| width | dim {cfg.dim}, {cfg.n_heads} query heads of {cfg.head_dim} ({cfg.rope_head_dim} RoPE dims), q-LoRA {cfg.q_lora_rank}, grouped output ({cfg.o_groups} groups × {cfg.o_lora_rank}), mHC with {cfg.hc_mult} streams |
| MoE | {cfg.n_routed_experts} routed experts (inter {cfg.moe_inter_dim}), {cfg.n_activated_experts} active, {cfg.n_shared_experts} shared; the first {cfg.n_hash_layers} layers hash-routed, the rest top-k |
| format | official: FP8 e4m3 128×128 for dense linears, FP4 e2m1 per-32 for experts, e8m0 scales; embedding/head bf16 |
| size | {model_bytes / 1e6:.1f} MB of safetensors |
"""


def functions_note(summary: dict) -> str:
    """Data v3's function documents (summary.json from 2026-12-04 on), counted among the code documents."""
    n = summary.get("function_documents")
    return f" ({n:,} of them one function each: BOS, its source, EOS)" if n else ""


def renamed_note(summary: dict) -> str:
    n = summary.get("renamed_chat_examples")
    return (f", and {n:,} renamed copies of them (the function's name replaced, in request and reply alike, by "
            "words of the tokenizer)") if n else ""


def source_share(summary: dict, perf: dict, source: str, them: str) -> tuple[int, str]:
    """(tokens of one data source, the clause on its weight in the last run: "" when not upweighted)."""
    n = (summary.get("tokens_by_source") or {}).get(source) or 0
    k = (perf.get("settings", {}).get("args", {}).get("upweight") or {}).get(source, 1)
    weight = f"; the last run saw {them} {k} times an epoch (`--upweight {source}={k}`)" if k > 1 else ""
    return n, weight


def algorithms_note(summary: dict, perf: dict) -> str:
    """Data v4's `algorithms` package: its share, its weight in the last run, and what it means for README's prompt."""
    n, weight = source_share(summary, perf, "algorithms", "its documents")
    if not n:
        return ""
    return (f"\nData v4 adds the `algorithms` package (small classic functions, MIT): {n:,} of the tokens{weight}. It "
            "holds Fibonacci functions, so the README's prompt (`def fibonacci(n):`) is in the training "
            "distribution: what the model prints for it is recall of that kind of code, not a generalisation.\n")


def exercises_clause(summary: dict, r: dict) -> str:
    """The intro's mention of data v6's exercises, when the data has them, with how many it gets right."""
    if not (summary.get("tokens_by_source") or {}).get("exercises"):
        return ""
    ex = r.get("exercises") or {}
    trained, held = ex.get("trained"), ex.get("heldout")
    if not trained:
        return ",\nand small classic functions from generated exercises"
    unseen = f", and {held['passed']} of {held['n']} unseen ones" if held else ""
    return (",\nand small classic functions from generated exercises (it writes a working function for "
            f"{trained['passed']} of their {trained['n']} task families{unseen})")


def exercises_note(summary: dict, perf: dict) -> str:
    """Data v6's generated exercises: their share, their weight in the last run, what they are for."""
    n, weight = source_share(summary, perf, "exercises", "them")
    if not n:
        return ""
    return (f"\nData v6 adds {summary.get('exercise_files', 0)} modules of small self-contained functions generated "
            f"by `scripts/exercises.py` ({n:,} of the tokens{weight}): task families (Fibonacci, gcd, sorting, "
            "string and list utilities, ...) each written with varied names, parameters, docstrings and bodies, "
            "every variant executed against its family's test cases (`tests/test_exercises.py`). Written for this "
            "project (its MIT licence). Ten families are held out of the data to measure generalisation (row (e) "
            "below); README's `def fibonacci(n):` is a training family, so what it prints is in the training "
            "distribution.\n")


def chain(lineage: list[dict] | None) -> str:
    """The runs that made the weights, when more than one did (scripts/builtin_lineage.py)."""
    if not lineage or len(lineage) < 2:
        return ""
    import builtin_lineage

    t = builtin_lineage.totals(lineage)
    return f"""The weights are the end of a chain of {t['runs']} runs, each continuing the previous run's model (`--init`:
weights and gate biases; the optimiser and the schedule start afresh): **{t['steps']:,} steps, {t['tokens']:,} tokens,
{t['train_minutes']:.1f} minutes of training** on {', '.join(t['devices'])}. The loss curve below covers every run.

{builtin_lineage.table(lineage)}
The last run in detail:

"""


def training(perf: dict, lineage: list[dict] | None = None) -> str:
    t = perf["train"]
    minutes = perf["train_s"] / 60
    start = ("from the previous run's weights" if perf["settings"]["args"].get("init")
             else "from the random initialisation of `dsv4 synth` (seed 0)")
    return f"""{chain(lineage)}With dsv4's own trainer (`dsv4.train.loop.Trainer`, full weights, fp32 master weights, {perf['dtype']} compute)
{start}, `--qat` with the QAT emulation on (the forward sees
each weight rounded to its FP8/FP4 storage format), so training computes what the saved checkpoint computes.
AdamW (no weight decay), peak lr {t['lr']:g}, {t['warmup_steps']} warmup steps, cosine to {t['lr'] * t['min_lr_ratio']:g},
gradient clipping {t['clip_grad']:g}, {t['packs_per_step']} packs of ≤ {t['seq_len']} tokens per step, MTP loss weight {t['mtp_weight']:g},
auxiliary-loss-free balancing of the top-k gates (γ = {t['bias_update_rate']:g}).

| | |
|---|---|
| hardware | {perf['device']}, torch {perf['torch']} |
| steps | {perf['steps']} |
| tokens | {perf['tokens']:,} ({perf['tokens_per_step']:,.0f} per step) |
| training time | {minutes:.1f} minutes (+ {perf['setup_s']:.0f} s setup) |
| throughput | {perf['tok_per_s']:,.0f} tokens/s overall, {perf['tok_per_s_steady']:,.0f} tokens/s after the first two steps |
| step time | {perf['step_s_median']:.3f} s median (first step {perf['step_s_first']:.2f} s) |
| peak memory | {_gib(perf)} |
| final loss (mean of the last 20 steps) | {perf['final_loss']:.3f} nats/token (MTP: {perf.get('final_mtp_loss', float('nan')):.3f}) |

![training loss](img/builtin_loss.png)
"""


def evaluation(r: dict) -> str:
    c, ch, h = r["code"], r["chat"], r["heldout"]
    cand = h["candidate"]
    rows = [f"| (a) code: distinct 4-gram ratio of {c['tokens']} greedy tokens, {c['n']} prompts | mean "
            f"{c['distinct4_mean']:.3f}, min {c['distinct4_min']:.3f} | mean ≥ 0.6, none < 0.3 | {_mark(c['pass'])} |",
            f"| (b) chat: reply with a `def` ending with EOS within {ch['max_tokens']} tokens, {ch['n']} held-out "
            f"requests | {ch['def_and_eos']}/{ch['n']} ({ch['fraction']:.0%}); EOS {ch['eos']}, `def` {ch['def']}, "
            f"valid Python defining a function {ch['parses']} | ≥ 90% | {_mark(ch['pass'])} |",
            f"| (c) held-out perplexity, own tokens | {cand['ppl']:.2f} ({cand['tokens']} tokens) | | |",
            f"| held-out nats/char; bits/byte | {cand['nats_per_char']:.4f}; {cand['bits_per_byte']:.4f} | | |"]
    if "reference" in h:
        ref = h["reference"]
        rows += [f"| v1 on the same text: perplexity; nats/char | {ref['ppl']:.2f} ({ref['tokens']} v1 tokens); "
                 f"{ref['nats_per_char']:.4f} | | |",
                 f"| (c) v2 perplexity per v1 token; v1 ÷ it | {h['candidate_ppl_per_reference_token']:.2f}; "
                 f"{h['ratio']:.2f}× | ≥ 4× | {_mark(h['pass'])} |"]
    mtp = r.get("mtp") or {}
    if mtp.get("heldout"):
        m = mtp["heldout"]
        rows.append(f"| (d) MTP top-1 = main model's next-next token, held-out text | {m['agreement']:.3f} "
                    f"({m['positions']} positions; MTP top-1 accuracy {m['mtp_top1_acc']:.3f}, main "
                    f"{m['main_top1_acc']:.3f}) | reported | |")
    if mtp.get("greedy_code"):
        m = mtp["greedy_code"]
        rows.append(f"| (d) MTP top-1 = next-next greedy token, the code continuations of (a) | "
                    f"{m['agreement']:.3f} ({m['positions']} positions) | reported | |")
    ex = r.get("exercises") or {}
    if ex.get("trained"):
        t, h = ex["trained"], ex.get("heldout")
        held = f"; held-out task families {h['passed']}/{h['n']}" if h else ""
        rows.append(f"| (e) working functions: the greedy continuation of a bare signature (`def fibonacci(n):`, "
                    f"...) passes its task family's test cases (`scripts/bench/exercise_pass.py`) | training task "
                    f"families {t['passed']}/{t['n']}{held} | reported | |")
    if r.get("speed"):
        sp = r["speed"]
        rows.append(f"| CPU speed: one sequence's greedy decode, {sp['threads']} thread(s) on the evaluating machine | "
                    f"{sp['decode_tok_per_s_wall']:.1f} tokens/s wall ({sp['decode_tok_per_s_cpu']:.1f} per CPU second); "
                    f"{sp['tokens']} tokens in {sp['generate_s_wall']:.1f} s | | |")
    return "| | measured | target | met |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


def perplexity_note(h: dict) -> str:
    if "reference" not in h:
        return ""
    ref, cand = h["reference"], h["candidate"]
    return f"""
How the perplexities compare: both models score the same {h['chars']:,} characters ({h['bytes']:,} bytes:
`tests/data/builtin_heldout.py.txt`, the start of the held-out files) in {h['window']}-token windows, each BOS + {h['window'] - 1}
tokens, fp32 with the QAT emulation on, as v1's card did. A per-token perplexity depends on the tokenizer
(v1: {ref['tokens']} tokens of a 4096-id BPE; v2: {cand['tokens']} tokens of a 6144-id BPE), so the summed NLL over
the text is compared instead: per character (v1 {ref['nats_per_char']:.4f}, v2 {cand['nats_per_char']:.4f} nats),
per byte (NLL / ln 2 / bytes: v1 {ref['bits_per_byte']:.4f}, v2 {cand['bits_per_byte']:.4f} bits), and as v2's
perplexity per v1 token, exp(NLL_v2 / {ref['tokens']}) = {h['candidate_ppl_per_reference_token']:.2f}, against v1's
{ref['ppl']:.2f}: v1's is {h['ratio']:.2f}× v2's. The conversion: ratio = exp((NLL_v1 − NLL_v2) / n_v1_tokens)
= exp((v1 − v2 nats/char) × {h['chars'] / ref['tokens']:.3f} characters per v1 token).
"""


# The evaluation's code samples run past EOS (their distinct-4 ratio is over a fixed token count); the CLI stops at it.
EOS_TEXT = EOS


def render(perf: dict, r: dict, summary: dict, expected: dict, train_eval: dict | None,
           lineage: list[dict] | None = None) -> str:
    from dsv4.builtin import builtin_config

    cfg = builtin_config(expected["version"])
    fib = next(s for s in r["code"]["samples"] if s["prompt"] == "def fibonacci(n):")
    chat = expected.get("chat")
    chat_block = (f"""`dsv4 chat`, the CI's pinned request (`{chat['messages'][0]['content']}`), greedy reply
({len(chat['token_ids'])} tokens, ends with EOS):

```text
{chat['text'].replace('<｜end▁of▁sentence｜>', '')}
```
""" if chat else "No held-out chat request was answered with a `def` and EOS: the CI has no chat-stop test.\n")
    gpu_ppl = (f"\nThe training script's own held-out perplexity (same text and windows, on its device): "
               f"{train_eval['heldout_ppl']:.2f}.\n" if train_eval and "heldout_ppl" in train_eval else "")
    return f"""# The built-in model (`builtin-python-v{expected['version']}`)

`dsv4 generate`, `dsv4 chat`, `dsv4 serve`, `dsv4 finetune` and `dsv4.LLM()` use it when no model is given.
Its `generation_config.json` says `do_sample: false`: `dsv4 serve` answers requests that give no temperature
greedily, as `dsv4 chat` and `dsv4 generate` run it (sampled at temperature 1 a model this small writes noise).
It is a DeepSeek-V4 model small enough to ship inside the package (`dsv4/builtin_model/`) and to run on a laptop
CPU, trained on Python source and on chat requests for functions built from it. It is a demonstration and a
regression fixture: it knows the look and habits of the Python standard library and a few packages{exercises_clause(summary, r)}, nothing else.
Evaluation records: `docs/builtin_model_eval.json` (`scripts/eval_builtin.py`).

## Architecture

`dsv4.builtin.builtin_config({expected['version']})`, every V4 feature present:

{architecture(cfg, perf['model_bytes'])}
## Data

{summary['files']} Python files ({summary['stdlib_files']} of the CPython standard library, {summary['package_files']} from
{summary['packages']} permissively licensed PyPI packages) as {summary['code_documents']:,} code documents of ≤ {summary['doc_tokens']} tokens{functions_note(summary)},
plus {summary['chat_examples']:,} chat examples (a request phrased from a function's signature and docstring, answered
with the function, in the official V4 chat format ending with EOS; loss on the reply only){renamed_note(summary)}: {summary['tokens']:,} tokens.
Held out of everything (tokenizer, code, chat): {', '.join(f'`{n}`' for n in summary['heldout'])}. Sources, versions, the
licence of each (all permit redistributing the weights with the notices retained) and how the chat set is built:
[builtin_model_v2_data.md](builtin_model_v2_data.md).
{algorithms_note(summary, perf)}{exercises_note(summary, perf)}
## Tokenizer

Byte-level BPE with {summary['vocab_size']} ids trained with the `tokenizers` library on the training files. Ids 0–14 are
special tokens (`dsv4.builtin.BUILTIN_SPECIALS`): BOS (0) and EOS (1) as in every V4 config, pad, then the chat
format's markers (`<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>`, `｜DSML｜`, `<｜latest_reminder｜>`, the six
task tokens). Saved as `dsv4/builtin_model/tokenizer.json`.

## Training

{training(perf, lineage)}
## Evaluation

CPU, greedy, fp32 with the QAT emulation on (as `dsv4 generate` runs it), `scripts/eval_builtin.py`:

{evaluation(r)}{perplexity_note(r['heldout'])}{gpu_ppl}
`dsv4 generate "def fibonacci(n):" --max-tokens {r['code']['tokens']}` (greedy; the prompt, then what it prints,
which ends at the model's EOS{'' if EOS_TEXT in fib['text'] else ' or at the token limit'}):

```text
def fibonacci(n):{fib['text'].split(EOS_TEXT)[0]}
```

{chat_block}
## Regression tests

`tests/test_builtin_model.py`, against `tests/data/builtin_expected.json` (written by the installer): the shipped
files (format, size ≤ 40 MB, every feature, tokenizer ids, strict load); the held-out perplexity below
{expected['heldout_ppl']:.2f} + 3% (its first {expected.get('heldout_windows') or 'all'} windows); the pinned greedy continuation of `{expected['prompt']}` ({len(expected['token_ids'])} tokens)
alone and batched with other prompts; {'a held-out chat request whose pinned reply ends with EOS' if chat else 'the chat path'}.
`tests/test_cli.py::test_generate_with_the_builtin_model` runs the README's first command.

## Reproduce

{reproduce(perf, lineage)}"""


def reproduce(perf: dict, lineage: list[dict] | None) -> str:
    """The commands that make the weights: the one run's, or the chain's with each --init the previous run's
    output and each run's step count fixed (a --minutes budget sizes differently on other hardware)."""
    runs = lineage if lineage and len(lineage) > 1 else [{"run": "run", "perf": perf}]
    lines, prev = [], None
    for r in runs:
        args = dict(r["perf"]["settings"]["args"])
        if len(runs) > 1:
            args.update(out=f"/tmp/{r['run']}", init=f"/tmp/{prev}/model" if prev else None,
                        steps=r["perf"]["steps"], minutes=None, row_len=args.get("row_len") or 0)
        last = r is runs[-1]
        where = "CPU" if r["perf"].get("device") == "cpu" else "GPU"          # the device the run had
        lines.append(f"python3 {' '.join(_args(args))}{' --bundle BUNDLE' if last else ''}   # {where}")
        prev = r["run"]
    note = ("" if len(runs) == 1 else "\nThe chain's runs trained on the data of their day (the table's last column): "
            "today's scripts give every run today's data, so a rerun is the same recipe, not the same bits.\n")
    return ("```bash\nPYTHONPATH=. python3 scripts/builtin_data.py .builtin_data                        # CPU, about a minute\n"
            + "\n".join(lines)
            + "\nPYTHONPATH=. python3 scripts/install_builtin.py BUNDLE"
            + (" --lineage LINEAGE.json" if len(runs) > 1 else "")
            + "   # CPU: evaluate, install, expectations, this card\n```\n"
            + note)


def _args(args: dict) -> list[str]:
    """perf.json's parsed arguments back as train_builtin_gpu.py's command line (lists as `9,11`, the upweights as
    `stdlib=2,algorithms=4`: the forms its parser reads; their Python reprs were printed until v11)."""
    out = ["scripts/train_builtin_gpu.py", args["data"], args["out"]]
    for k, v in args.items():
        if k in ("data", "out", "bundle") or v is None or v is False or v in ({}, [], ()):
            continue
        if isinstance(v, dict):
            v = ",".join(f"{name}={n}" for name, n in v.items())
        elif isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        out.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return out
