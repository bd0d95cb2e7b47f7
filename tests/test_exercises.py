"""scripts/exercises.py: every generated function is correct when its source alone runs, its docstring gives the
chat set a first sentence and correct doctests, the output is deterministic and varied, the files look like small
modules, and the held-out families never reach the training output."""

from __future__ import annotations

import ast
import builtins
import copy
import dataclasses
import doctest
import itertools
import keyword
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import exercises as ex
from builtin_data import first_sentence
from builtin_data import functions as chat_functions

BY_KEY = {f.key: f for f in ex.FAMILIES}
ONE_BODY: set[str] = set()       # families where only one implementation is natural (none so far)
KEEP_TRAINED = ("fibonacci", "factorial", "is_prime", "gcd")    # README demonstrates `def fibonacci(n):`


# ------------------------------------------------------------------------------------------------ helpers
DOCTESTS = doctest.DocTestParser()


def problems(source: str, cases) -> list[str]:
    """What is wrong with one generated function, its source exec'd alone in a fresh namespace (nothing from a
    module around it: imports, other functions):
    - a case it gets wrong: a result must equal the expected one and print the same (`2` for `2.0` is wrong; a
      doctest built from the case then holds). Arguments are deep-copied: a sort that works in place must not
      change the case for the next variant; a crash is reported like a wrong result;
    - a failing doctest in its docstring;
    - a docstring whose first sentence (builtin_data.first_sentence: what the chat set takes) is missing, does
      not end with a period, or is not the whole first paragraph (a sentence cut early, at "e.g.");
    - its name reused as a parameter, local or inner function: a renamed chat copy (builtin_data.renamed) would
      rename that too, and recursion would call the wrong thing."""
    tree = ast.parse(source)
    node = tree.body[0]
    namespace: dict = {}
    exec(compile(tree, f"<{node.name}>", "exec"), namespace)
    fn, out = namespace[node.name], []
    for args, expected in cases:
        try:
            got = fn(*copy.deepcopy(args))
        except Exception as e:
            out.append(f"{node.name}{args!r} raised {e!r}")
            continue
        if got != expected or repr(got) != repr(expected):
            out.append(f"{node.name}{args!r} returned {got!r}, expected {expected!r}")
    doc = ast.get_docstring(node) or ""
    if ">>>" in doc:
        runner = doctest.DocTestRunner(verbose=False)
        runner.run(DOCTESTS.get_doctest(doc, namespace, node.name, None, 0), out=lambda _: None)
        if runner.failures or not runner.tries:
            out.append(f"{node.name}: {runner.failures} of {runner.tries} doctests fail")
    sentence = first_sentence(doc) if doc else None
    if not sentence or not sentence.endswith(".") or sentence != " ".join(doc.split("\n\n")[0].split()):
        out.append(f"{node.name}: docstring first sentence {sentence!r}")
    taken = set()
    for n in ast.walk(node):
        if isinstance(n, ast.arg):
            taken.add(n.arg)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            taken.add(n.id)
        elif isinstance(n, ast.FunctionDef) and n is not node:
            taken.add(n.name)
    if node.name in taken:
        out.append(f"{node.name}: its own name is reused inside it")
    return out


def top_functions(source: str) -> list[tuple[str, str]]:
    """(name, source) of each top-level function of a module."""
    lines = source.splitlines(keepends=True)
    return [(node.name, "".join(lines[node.lineno - 1:node.end_lineno])) for node in ast.parse(source).body
            if isinstance(node, ast.FunctionDef)]


@pytest.fixture(scope="module")
def trained():
    return ex.exercise_files()


@pytest.fixture(scope="module")
def heldout():
    return ex.exercise_files(heldout=True)


# ------------------------------------------------------------------------------------------------ 1. the families
def test_families_have_enough_choices():
    assert len(ex.FAMILIES) >= 80
    assert len(BY_KEY) == len(ex.FAMILIES)
    for f in ex.FAMILIES:
        assert len(f.names) >= 3 and len(set(f.names)) == len(f.names), f.key
        assert len(f.bodies) >= (1 if f.key in ONE_BODY else 2), f.key
        assert len(set(f.bodies)) == len(f.bodies) and len(set(f.docs)) == len(f.docs), f.key
        assert len(f.docs) >= 3 and len(f.cases) >= 2 and len(f.params) >= 2, f.key
        for params in f.params:
            assert len(params) == len(f.slots) and len(set(params)) == len(params), (f.key, params)
            assert not set(params) & set(f.names), (f.key, params)
            assert all(p.isidentifier() and not keyword.iskeyword(p) for p in params), (f.key, params)
        for name in f.names:        # a keyword or builtin name would not run or would shadow what bodies call
            assert name.isidentifier() and not keyword.iskeyword(name) and not hasattr(builtins, name), name
        assert f.hints is None or len(f.hints) == len(f.slots) + 1, f.key
    names = [n for f in ex.FAMILIES for n in f.names]
    assert len(names) == len(set(names)), [n for n, c in Counter(names).items() if c > 1]   # family_of is a map
    assert all(ex.family_of(n) == f.key for f in ex.FAMILIES for n in f.names)
    assert ex.family_of("no_such_function") is None


def test_heldout_families():
    assert 8 <= len(ex.HELDOUT_FAMILIES) <= 12 and len(set(ex.HELDOUT_FAMILIES)) == len(ex.HELDOUT_FAMILIES)
    assert set(ex.HELDOUT_FAMILIES) <= set(BY_KEY)
    assert not set(KEEP_TRAINED) & set(ex.HELDOUT_FAMILIES)
    assert "fibonacci" in BY_KEY["fibonacci"].names and ("n",) in BY_KEY["fibonacci"].params


# ------------------------------------------------------------------------------------------------ 2. correctness
def test_every_name_parameter_body_and_hint_choice_is_correct():
    """Everything that changes what runs (name: recursion; parameter names; body; hints: evaluated at `def`),
    every combination of it, with the first docstring phrasing."""
    checked = 0
    for f in ex.FAMILIES:
        sizes = f.sizes()
        for n, p, b, h in itertools.product(*(range(k) for k in (sizes[0], sizes[1], sizes[2], sizes[4]))):
            source = f.render(ex.Combo(n, p, b, 0, h, 0))
            assert not problems(source, f.cases), (problems(source, f.cases), source)
            checked += 1
    assert checked > 10_000


def test_every_docstring_and_doctest_choice_is_correct():
    """Every docstring phrasing with every parameter choice, with and without its doctest; then 30 whole
    combinations a family, drawn at random (a fixed seed)."""
    rng = random.Random(0)
    for f in ex.FAMILIES:
        sizes = f.sizes()
        assert sizes[5] == 2, f.key                 # a doctest is possible for every family
        combos = [ex.Combo(0, p, 0, d, 1, x)
                  for d, p, x in itertools.product(range(sizes[3]), range(sizes[1]), range(sizes[5]))]
        for combo in combos + rng.sample(f.combos(), 30):
            source = f.render(combo)
            assert not problems(source, f.cases), (problems(source, f.cases), source)
            doc = ast.get_docstring(ast.parse(source).body[0])
            assert doc[0].isupper() and "$" not in doc, source
            assert (">>>" in doc) == bool(combo.example), source


def test_the_checks_can_fail():
    fib = BY_KEY["fibonacci"]
    good = fib.render(ex.Combo(0, 0, 0, 0, 0, 0))
    assert not problems(good, fib.cases)
    assert problems(good, [((10,), 56)]) == ["fibonacci(10,) returned 55, expected 56"]     # a wrong expectation
    assert problems(good, [((10,), 55.0)])                       # equal, but prints differently
    assert problems(good, [((-1,), 0), (("x",), 0)]) == [        # a crash is reported, not raised
        "fibonacci('x',) raised TypeError(\"'str' object cannot be interpreted as an integer\")"]
    broken = dataclasses.replace(fib, bodies=("return $n + 1",))
    assert len(problems(broken.render(ex.Combo(0, 0, 0, 0, 0, 0)), fib.cases)) == 5             # a wrong body
    doctested = good.replace('index n."""', 'index n.\n\n    >>> fibonacci(10)\n    56\n    """')
    assert problems(doctested, []) == ["fibonacci: 1 of 1 doctests fail"]
    assert problems(good.replace("index n.", "index n, e.g. 3."), []) == [
        "fibonacci: docstring first sentence 'Return the Fibonacci number at index n, e.g.'"]
    assert problems(good.replace("index n.", "index n"), [])
    assert problems("def total(xs):\n    \"\"\"Sum the numbers xs.\"\"\"\n    total = 0\n    return total\n",
                    []) == ["total: its own name is reused inside it"]
    # a body that leans on a module-level import fails when its source runs alone, as the chat answer must
    assert problems("def root(x):\n    \"\"\"Return the root of x.\"\"\"\n    return math.sqrt(x)\n",
                    [((4,), 2.0)]) == ["root(4,) raised NameError(\"name 'math' is not defined\")"]


def test_in_place_sorts_do_not_leak_between_cases():
    bubble = BY_KEY["bubble_sort"]
    source = bubble.render(ex.Combo(0, 0, 0, 0, 0, 0))               # body 0 sorts its argument in place
    args = ([3, 1, 2],)
    assert "items[j], items[j + 1] = items[j + 1], items[j]" in source
    assert not problems(source, [(args, [1, 2, 3])]) and args == ([3, 1, 2],)


# ------------------------------------------------------------------------------------------------ 3. the output
def test_deterministic(trained):
    assert ex.exercise_files() == trained
    assert ex.exercise_files(seed=1) != trained
    assert ex.exercise_files(variants=3, seed=5) == ex.exercise_files(variants=3, seed=5)


def functions_by_family(files) -> dict[str, list[tuple[str, str]]]:
    out = defaultdict(list)
    for _, source in files:
        for name, func in top_functions(source):
            out[ex.family_of(name)].append((name, func))
    return out


def test_varied_and_heldout_kept_out(trained, heldout):
    by_family = functions_by_family(trained)
    assert None not in by_family                                   # every name maps to its family
    assert not set(by_family) & set(ex.HELDOUT_FAMILIES)
    assert set(by_family) == set(BY_KEY) - set(ex.HELDOUT_FAMILIES)
    for key, funcs in by_family.items():
        f = BY_KEY[key]
        assert len(funcs) == min(40, len(f.combos())), key
        assert len({src for _, src in funcs}) == len(funcs), key     # no two identical functions
        assert {name for name, _ in funcs} == set(f.names), key     # every name is used
    assert len({name for name, _ in by_family["fibonacci"]}) >= 5
    assert "fibonacci" in {name for name, _ in by_family["fibonacci"]}
    held = functions_by_family(heldout)
    assert set(held) == set(ex.HELDOUT_FAMILIES)
    assert all(len(funcs) == 40 for funcs in held.values())


def test_every_choice_is_used():
    """At 40 functions a family, every name, parameter choice, body and docstring phrasing of every family shows
    up (Family.pick cycles through each list before repeating), and about half the docstrings have a doctest."""
    combos = defaultdict(list)
    for func in ex.exercise_functions():
        combos[func.family].append(func.combo)
        f = BY_KEY[func.family]
        assert func.source == f.render(func.combo) and func.name == f.names[func.combo.name]
    for key, chosen in combos.items():
        f = BY_KEY[key]
        for field, size in zip(ex.Combo._fields, f.sizes(), strict=True):
            assert {getattr(c, field) for c in chosen} == set(range(size)), (key, field)


def test_pick_takes_every_combination_when_there_are_few():
    f = BY_KEY["sign"]
    every = f.combos()
    assert sorted(f.pick(len(every) + 5, random.Random(0))) == sorted(every)
    few = f.pick(len(every) - 1, random.Random(0))
    assert len(set(few)) == len(every) - 1


def test_heldout_prompts():
    prompts = ex.heldout_prompts()
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert prompts == ex.heldout_prompts() and prompts != ex.heldout_prompts(seed=1)
    keys = set()
    for prompt in prompts:
        assert re.fullmatch(r"def \w+\([\w, ]+\):", prompt), prompt
        fn = ast.parse(prompt + "\n    pass\n").body[0]
        keys.add(ex.family_of(fn.name))
        assert tuple(a.arg for a in fn.args.args) in BY_KEY[ex.family_of(fn.name)].params
    assert keys == set(ex.HELDOUT_FAMILIES)
    assert len(ex.heldout_prompts(n=10_000)) == sum(len(BY_KEY[k].names) * len(BY_KEY[k].params)
                                                    for k in ex.HELDOUT_FAMILIES)


# ------------------------------------------------------------------------------------------------ 4, 5. the files
@pytest.mark.parametrize("which", ["trained", "heldout"])
def test_files_are_small_modules_of_self_contained_functions(which, request):
    files = request.getfixturevalue(which)
    assert [name for name, _ in files] == [f"exercises/mod_{i:04d}.py" for i in range(1, len(files) + 1)]
    n = with_doctest = 0
    for path, source in files:
        tree = ast.parse(source)
        assert ast.get_docstring(tree) and source.endswith("\n") and "\t" not in source, path
        assert all(isinstance(node, ast.FunctionDef) for node in tree.body[1:]), path    # no module imports
        funcs = top_functions(source)
        n += len(funcs)
        assert ex.MIN_FUNCS <= len(funcs) <= ex.MAX_FUNCS, path
        assert len({name for name, _ in funcs}) == len(funcs), path
        assert max(len(line) for line in source.splitlines()) <= 99, path      # PEP 8's longest
        # the chat set (scripts/builtin_data.py) takes every function, with the docstring's first sentence
        assert [sig.split("(")[0] for sig, _, _ in chat_functions(source)] == [name for name, _ in funcs], path
        for name, func in funcs:
            assert not problems(func, BY_KEY[ex.family_of(name)].cases), (path, func)
            with_doctest += ">>>" in func
    assert 0.2 * n < with_doctest < 0.8 * n


def test_command_line(tmp_path, capsys):
    ex.main([str(tmp_path), "--variants", "2", "--seed", "3"])
    written = sorted(tmp_path.glob("exercises/mod_*.py"))
    files = ex.exercise_files(variants=2, seed=3)
    assert [p.read_text() for p in written] == [source for _, source in files]
    out = capsys.readouterr().out
    assert f"functions {2 * (len(ex.FAMILIES) - len(ex.HELDOUT_FAMILIES))}" in out
    assert f"files {len(files)}" in out


# ------------------------------------------------------------------------------------------------ the pass-rate probe
def test_exercise_pass_checks_what_a_model_writes():
    """scripts/bench/exercise_pass.py (the card's working-functions row): the function is the prompt's def up to the
    next top-level line; a correct body passes, and a wrong result, a syntax error, a crash and a hang each fail
    with what went wrong; every training family has a prompt, the held-out prompts map back to their families."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
    import exercise_pass as P

    text = P.function_text("def fibonacci(n):", "\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
                                                "    return a\n\n\ndef other():\n    pass\n")
    assert text.endswith("    return a\n") and "other" not in text
    assert P.check(text, "fibonacci", "fibonacci") == "PASS"
    assert "expected" in P.check("def fibonacci(n):\n    return n\n", "fibonacci", "fibonacci")
    assert P.check("def fibonacci(n):\n    if n = 1\n", "fibonacci", "fibonacci").startswith("SyntaxError")
    assert P.check("def fibonacci(n):\n    return fib(n)\n", "fibonacci", "fibonacci").startswith("NameError")
    assert P.check("def fibonacci(n):\n    while True:\n        pass\n", "fibonacci", "fibonacci",
                   timeout=2).startswith("timeout")
    trained = P.trained_prompts()
    assert {k for _, _, k in trained} == {f.key for f in ex.FAMILIES} - set(ex.HELDOUT_FAMILIES)
    assert ("def fibonacci(n):", "fibonacci", "fibonacci") in trained
    held = P.heldout_prompts()
    assert held and all(k in ex.HELDOUT_FAMILIES and p.startswith(f"def {n}(") for p, n, k in held)


def test_exercise_pass_tells_a_familys_own_docstring_from_a_blend():
    """exercise_pass.own_docstring: every generated function's docstring is one of its family's phrasings (with
    its own names, wrapped, with or without a doctest); v11's README miss, two families' phrases blended, is not;
    a function without a docstring gives None."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
    import exercise_pass as P

    functions = ex.exercise_functions(variants=8)
    assert all(P.own_docstring(f.source, f.family) is True for f in functions)
    blend = ('def fibonacci(n):\n    """Return the Fibonacci number at the first n positive integers."""\n'
             '    return sum(int(n) for i in range(1, n + 1))\n')
    assert P.own_docstring(blend, "fibonacci") is False
    own = blend.replace("at the first n positive integers", "at index num")
    assert P.own_docstring(own, "fibonacci") is True
    assert P.own_docstring(own, "is_prime") is False                    # another family's phrasing
    assert P.own_docstring("def fibonacci(n):\n    return n\n", "fibonacci") is None
