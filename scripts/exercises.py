"""Synthetic exercises: many small, correct, self-contained Python functions for the built-in model's data.

Why: the built-in model's corpus (CPython stdlib + permissively licensed packages) is library code. It holds almost
no small classic functions, and the few it has (three Fibonacci functions) the model memorises verbatim instead of
learning the task: `def fibonacci(n):` gets a docstring and a nonsense body. This module writes the missing data.

What: FAMILIES holds task families (Fibonacci, gcd, bubble sort, Caesar cipher, matrix product, ...). Each family has
several function names, parameter-name choices, genuinely different implementation bodies, docstring phrasings,
optional type hints and test cases. `exercise_files` draws distinct combinations of these per family, renders each as
a function with a docstring (first sentence: what it does, ending with a period; sometimes followed by a doctest of
a test case) and groups them, shuffled across families, into small utility modules of 4-10 functions. Every function
imports what it needs inside its own body, so its source alone runs (a chat example's answer is that source alone).
HELDOUT_FAMILIES are never emitted by default: `exercise_files(heldout=True)` and `heldout_prompts` give the unseen
tasks a generalisation probe asks for; `family_of` maps a function name back to its family.

Licence: everything here (templates, bodies, docstrings, test cases) is written for this project, under its own
licence; no code is copied from elsewhere.

Template syntax (`string.Template`): `$x` in a body or docstring is the parameter whose name in the family's FIRST
parameter choice is `x`; it becomes the chosen name. `$FN` is the function's own name (recursion, doctests).
Test cases are tuples `(*args, expected)`.

Usage: python3 scripts/exercises.py OUT_DIR [--variants N] [--seed S] [--heldout]
(writes OUT_DIR/exercises/mod_0001.py, ... and prints the counts; tests/test_exercises.py checks every function).
"""

from __future__ import annotations

import argparse
import itertools
import random
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import NamedTuple

MIN_FUNCS, MAX_FUNCS = 4, 10          # functions per generated module file
DOC_WIDTH = 88                        # docstring summaries are wrapped at this many characters (plus the indent)


class Combo(NamedTuple):
    """One function of a family: an index into each of its choice lists (example 0: no doctest, 1: a doctest)."""
    name: int
    params: int
    body: int
    doc: int
    hinted: int
    example: int


@dataclass(frozen=True)
class Family:
    """One task (Fibonacci, bubble sort, ...) and the choices its functions are written from (see `family`)."""
    key: str
    topic: str                                   # a word for the module docstring ("math", "string", ...)
    names: tuple[str, ...]
    params: tuple[tuple[str, ...], ...]          # each choice names every parameter, in order
    bodies: tuple[str, ...]                      # templates, dedented, without the docstring
    docs: tuple[str, ...]                        # templates of the docstring's summary
    cases: tuple[tuple[tuple, object], ...]      # (args, expected)
    hints: tuple[str, ...] | None = None         # one annotation per parameter, then the return annotation

    @property
    def slots(self) -> tuple[str, ...]:
        """The placeholder names of the templates: the first parameter choice."""
        return self.params[0]

    def examples(self) -> list[tuple[tuple, object]]:
        """Up to two test cases that read well as a doctest: printable arguments and result, a short line, no None
        result (a doctest of a call returning None expects no output, which reads as a mistake), no empty or zero
        argument (`fib(0)` shows little). The longest first; then, where possible, one with another result
        (`is_prime(25)` -> False, then a True rather than False again)."""
        good = []
        for args, expected in self.cases:
            text = "".join(map(_expr, (*args, expected)))
            if expected is not None and all(args) and "<" not in text and "\\" not in text and len(text) <= 60:
                good.append((len(text), args, expected))
        good = [(args, expected) for _, args, expected in sorted(good, key=lambda g: -g[0])]
        if len(good) < 2:
            return good
        second = next((g for g in good[1:] if g[1] != good[0][1]), good[1])
        return [good[0], second]

    def sizes(self) -> tuple[int, ...]:
        """How many choices each Combo field has."""
        return (len(self.names), len(self.params), len(self.bodies), len(self.docs), 2 if self.hints else 1,
                2 if self.examples() else 1)

    def combos(self) -> list[Combo]:
        return [Combo(*c) for c in itertools.product(*(range(n) for n in self.sizes()))]

    def pick(self, count: int, rng: random.Random) -> list[Combo]:
        """`count` distinct combos (all of them when there are fewer). Each field cycles through its choices in a
        fresh random order (so at 40 a family, every name, body and phrasing is used, about equally often) and the
        fields pair up at random; a draw that repeats an earlier combo is skipped."""
        every = self.combos()
        if len(every) <= count:
            return every
        streams = [_balanced(n, rng) for n in self.sizes()]
        chosen: dict[Combo, None] = {}
        for _ in range(20 * count):
            if len(chosen) == count:
                break
            chosen.setdefault(Combo(*(next(s) for s in streams)), None)
        rest = [c for c in every if c not in chosen]            # only when the draws kept repeating themselves
        chosen.update(dict.fromkeys(rng.sample(rest, count - len(chosen))))
        return list(chosen)

    def render(self, combo: Combo) -> str:
        """The function's source: signature, docstring, body (4-space indent, ending with a newline)."""
        name, params = self.names[combo.name], self.params[combo.params]
        words = dict(zip(self.slots, params, strict=True)) | {"FN": name}
        summary = Template(self.docs[combo.doc]).substitute(words)
        lines = textwrap.wrap(summary, DOC_WIDTH)
        if combo.example:       # which case: varies with the name and parameters, so doctests are not all alike
            examples = self.examples()
            args, expected = examples[(combo.name + combo.params) % len(examples)]
            call = f"{name}({', '.join(map(_expr, args))})"
            doc = '"""' + "\n".join(lines) + f"\n\n>>> {call}\n{expected!r}\n" + '"""'
        else:
            doc = '"""' + "\n".join(lines) + '"""'
        body = Template(self.bodies[combo.body]).substitute(words)
        head = _signature(name, params, self.hints if combo.hinted else None)
        return head + "\n" + textwrap.indent(doc + "\n" + body, "    ") + "\n"


def _expr(value) -> str:
    """`value` as Python source: its repr, or a function's qualified name (`len`, `str.lower`; a lambda's
    `<lambda>` is no source, and examples() leaves such a case out)."""
    return value.__qualname__ if callable(value) else repr(value)


def _signature(name: str, params: tuple[str, ...], hints: tuple[str, ...] | None) -> str:
    if not hints:
        return f"def {name}({', '.join(params)}):"
    args = ", ".join(f"{p}: {h}" for p, h in zip(params, hints[:-1], strict=True))
    return f"def {name}({args}) -> {hints[-1]}:"


def _balanced(n: int, rng: random.Random) -> Iterator[int]:
    """0..n-1 in a fresh random order, again and again: a stream that uses every choice before repeating one."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def _split_top(text: str) -> list[str]:
    """`text` split at the commas outside brackets ("dict[str, int], int" -> two annotations)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def family(key: str, topic: str, names: str, params: str, bodies, docs, cases, hints: str | None = None) -> Family:
    """A Family from compact text: names space-separated; params space-separated choices, each comma-separated
    ("a,b x,y"); hints like "int, int -> int"; cases as (*args, expected) tuples."""
    choices = tuple(tuple(c.split(",")) for c in params.split())
    annotations = None
    if hints:
        args, ret = hints.split(" -> ")
        annotations = (*_split_top(args), ret.strip())
    return Family(key, topic, tuple(names.split()), choices, tuple(textwrap.dedent(b).strip("\n") for b in bodies),
                  tuple(docs), tuple((tuple(c[:-1]), c[-1]) for c in cases), annotations)


# ------------------------------------------------------------------------------------------------ number theory, math
MATH = (
    family(
        "fibonacci", "math",
        "fibonacci fib nth_fibonacci fibonacci_number fibo get_fibonacci",
        "n num k index position",
        ("""
         a, b = 0, 1
         for _ in range($n):
             a, b = b, a + b
         return a
         """, """
         if $n < 2:
             return $n
         return $FN($n - 1) + $FN($n - 2)
         """, """
         seq = [0, 1]
         for i in range(2, $n + 1):
             seq.append(seq[i - 1] + seq[i - 2])
         return seq[$n]
         """, """
         from functools import lru_cache

         @lru_cache(maxsize=None)
         def go(i):
             return i if i < 2 else go(i - 1) + go(i - 2)

         return go($n)
         """, """
         prev, curr = 0, 1
         while $n > 0:
             prev, curr = curr, prev + curr
             $n -= 1
         return prev
         """),
        ("Return the Fibonacci number at index $n.",
         "Compute the Fibonacci number at position $n, counting from F(0) = 0 and F(1) = 1.",
         "Return term $n of the Fibonacci sequence 0, 1, 1, 2, 3, 5, 8, counting from 0.",
         "Calculate F($n), where each Fibonacci number is the sum of the two before it."),
        [(0, 0), (1, 1), (2, 1), (10, 55), (15, 610)],
        "int -> int",
    ),
    family(
        "factorial", "math",
        "factorial fact compute_factorial factorial_of calc_factorial",
        "n num k x value",
        ("""
         result = 1
         for i in range(2, $n + 1):
             result *= i
         return result
         """, """
         if $n <= 1:
             return 1
         return $n * $FN($n - 1)
         """, """
         import math

         return math.prod(range(1, $n + 1))
         """, """
         result = 1
         while $n > 1:
             result *= $n
             $n -= 1
         return result
         """, """
         from functools import reduce

         return reduce(lambda acc, i: acc * i, range(1, $n + 1), 1)
         """),
        ("Return the factorial of $n.",
         "Compute $n factorial, the product of the integers from 1 to $n.",
         "Multiply together every integer from 1 up to $n and return the product.",
         "Return the factorial of the non-negative integer $n, where the factorial of 0 is 1."),
        [(0, 1), (1, 1), (5, 120), (10, 3628800)],
        "int -> int",
    ),
    family(
        "gcd", "math",
        "gcd greatest_common_divisor compute_gcd find_gcd hcf euclid_gcd",
        "a,b x,y m,n first,second",
        ("""
         while $b:
             $a, $b = $b, $a % $b
         return $a
         """, """
         if $b == 0:
             return $a
         return $FN($b, $a % $b)
         """, """
         import math

         return math.gcd($a, $b)
         """, """
         if $a == 0 or $b == 0:
             return $a + $b
         while $a != $b:
             if $a > $b:
                 $a -= $b
             else:
                 $b -= $a
         return $a
         """),
        ("Return the greatest common divisor of $a and $b.",
         "Find the largest integer that divides both $a and $b.",
         "Compute the greatest common divisor of the non-negative integers $a and $b.",
         "Return the highest common factor of $a and $b."),
        [(12, 18, 6), (17, 5, 1), (0, 7, 7), (100, 75, 25)],
        "int, int -> int",
    ),
    family(
        "lcm", "math",
        "lcm least_common_multiple lowest_common_multiple compute_lcm find_lcm",
        "a,b x,y m,n first,second",
        ("""
         import math

         return $a * $b // math.gcd($a, $b)
         """, """
         p, q = $a, $b
         while q:
             p, q = q, p % q
         return $a * $b // p
         """, """
         step = max($a, $b)
         multiple = step
         while multiple % $a or multiple % $b:
             multiple += step
         return multiple
         """, """
         import math

         return math.lcm($a, $b)
         """),
        ("Return the least common multiple of $a and $b.",
         "Compute the smallest positive integer divisible by both $a and $b.",
         "Find the lowest common multiple of the positive integers $a and $b."),
        [(4, 6, 12), (3, 5, 15), (7, 7, 7), (12, 18, 36)],
        "int, int -> int",
    ),
    family(
        "is_prime", "math",
        "is_prime isprime check_prime is_prime_number prime_check",
        "n num x value candidate",
        ("""
         if $n < 2:
             return False
         i = 2
         while i * i <= $n:
             if $n % i == 0:
                 return False
             i += 1
         return True
         """, """
         if $n < 2:
             return False
         return all($n % d for d in range(2, int($n ** 0.5) + 1))
         """, """
         if $n < 4:
             return $n >= 2
         if $n % 2 == 0 or $n % 3 == 0:
             return False
         i = 5
         while i * i <= $n:
             if $n % i == 0 or $n % (i + 2) == 0:
                 return False
             i += 6
         return True
         """, """
         import math

         if $n < 2:
             return False
         for d in range(2, math.isqrt($n) + 1):
             if $n % d == 0:
                 return False
         return True
         """),
        ("Return True if $n is a prime number.",
         "Check whether the integer $n is prime.",
         "Decide by trial division whether $n is prime.",
         "Return whether $n is greater than 1 and has no divisors other than 1 and itself."),
        [(0, False), (1, False), (2, True), (9, False), (17, True), (25, False), (97, True)],
        "int -> bool",
    ),
    family(
        "primes_up_to", "math",
        "primes_up_to sieve_of_eratosthenes prime_sieve list_primes find_primes",
        "n limit upper bound",
        ("""
         if $n < 2:
             return []
         is_p = [True] * ($n + 1)
         is_p[0] = is_p[1] = False
         for i in range(2, int($n ** 0.5) + 1):
             if is_p[i]:
                 for j in range(i * i, $n + 1, i):
                     is_p[j] = False
         return [i for i, flag in enumerate(is_p) if flag]
         """, """
         primes = []
         for candidate in range(2, $n + 1):
             if all(candidate % p for p in primes if p * p <= candidate):
                 primes.append(candidate)
         return primes
         """, """
         if $n < 2:
             return []
         marks = bytearray([1]) * ($n + 1)
         marks[0] = marks[1] = 0
         for i in range(2, int($n ** 0.5) + 1):
             if marks[i]:
                 marks[i * i::i] = bytearray(len(range(i * i, $n + 1, i)))
         return [i for i in range($n + 1) if marks[i]]
         """),
        ("Return all prime numbers less than or equal to $n.",
         "List the primes up to and including $n, in increasing order.",
         "Generate every prime number from 2 through $n.",
         "Find the prime numbers not greater than $n."),
        [(1, []), (2, [2]), (10, [2, 3, 5, 7]), (30, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29])],
        "int -> list[int]",
    ),
    family(
        "prime_factors", "math",
        "prime_factors factorize prime_factorization factorise get_prime_factors",
        "n num value x",
        ("""
         factors = []
         d = 2
         while d * d <= $n:
             while $n % d == 0:
                 factors.append(d)
                 $n //= d
             d += 1
         if $n > 1:
             factors.append($n)
         return factors
         """, """
         factors = []
         divisor = 2
         while $n > 1:
             if $n % divisor == 0:
                 factors.append(divisor)
                 $n //= divisor
             else:
                 divisor += 1
         return factors
         """, """
         for d in range(2, int($n ** 0.5) + 1):
             if $n % d == 0:
                 return [d] + $FN($n // d)
         return [$n] if $n > 1 else []
         """),
        ("Return the prime factors of $n in increasing order, with repetition.",
         "Decompose $n into a list of prime factors, smallest first.",
         "Factor the positive integer $n into primes and return them as a sorted list."),
        [(1, []), (2, [2]), (12, [2, 2, 3]), (97, [97]), (360, [2, 2, 2, 3, 3, 5])],
        "int -> list[int]",
    ),
    family(
        "sum_of_digits", "math",
        "sum_of_digits digit_sum sum_digits digits_sum total_of_digits",
        "n num number value",
        ("""
         return sum(int(ch) for ch in str(abs($n)))
         """, """
         $n = abs($n)
         total = 0
         while $n:
             total += $n % 10
             $n //= 10
         return total
         """, """
         $n = abs($n)
         total = 0
         while $n > 0:
             $n, digit = divmod($n, 10)
             total += digit
         return total
         """, """
         $n = abs($n)
         if $n < 10:
             return $n
         return $n % 10 + $FN($n // 10)
         """),
        ("Return the sum of the decimal digits of $n.",
         "Add up the digits of the integer $n, ignoring its sign.",
         "Compute the total of all digits in $n."),
        [(0, 0), (123, 6), (9875, 29), (-45, 9)],
        "int -> int",
    ),
    family(
        "digital_root", "math",
        "digital_root repeated_digit_sum digit_root reduce_to_digit",
        "n num number value",
        ("""
         if $n == 0:
             return 0
         return 1 + ($n - 1) % 9
         """, """
         while $n >= 10:
             $n = sum(int(ch) for ch in str($n))
         return $n
         """, """
         while $n > 9:
             total = 0
             while $n:
                 total += $n % 10
                 $n //= 10
             $n = total
         return $n
         """),
        ("Return the digital root of the non-negative integer $n.",
         "Repeatedly sum the digits of $n until a single digit remains, and return it.",
         "Reduce $n to one digit by adding its digits over and over."),
        [(0, 0), (9, 9), (16, 7), (942, 6), (493193, 2)],
        "int -> int",
    ),
    family(
        "reverse_integer", "math",
        "reverse_integer reverse_number reverse_digits reversed_int flip_digits",
        "n num number value",
        ("""
         sign = -1 if $n < 0 else 1
         return sign * int(str(abs($n))[::-1])
         """, """
         sign = -1 if $n < 0 else 1
         $n = abs($n)
         result = 0
         while $n:
             result = result * 10 + $n % 10
             $n //= 10
         return sign * result
         """, """
         digits = str(abs($n))
         result = int("".join(reversed(digits)))
         return -result if $n < 0 else result
         """),
        ("Return $n with its decimal digits in reverse order, keeping the sign.",
         "Reverse the digits of the integer $n.",
         "Flip the order of the digits in $n; a negative number stays negative."),
        [(123, 321), (-456, -654), (1200, 21), (0, 0), (7, 7)],
        "int -> int",
    ),
    family(
        "is_palindrome_number", "math",
        "is_palindrome_number is_number_palindrome is_palindromic_number int_is_palindrome palindrome_number",
        "n num number x value",
        ("""
         s = str($n)
         return s == s[::-1]
         """, """
         if $n < 0:
             return False
         original, backwards = $n, 0
         while $n:
             backwards = backwards * 10 + $n % 10
             $n //= 10
         return original == backwards
         """, """
         digits = str($n)
         left, right = 0, len(digits) - 1
         while left < right:
             if digits[left] != digits[right]:
                 return False
             left += 1
             right -= 1
         return True
         """),
        ("Return True if the integer $n reads the same forwards and backwards.",
         "Check whether $n is a palindromic number; negative numbers never are.",
         "Decide if the decimal digits of $n form a palindrome."),
        [(121, True), (-121, False), (10, False), (0, True), (12321, True), (123, False)],
        "int -> bool",
    ),
    family(
        "power", "math",
        "power fast_power power_by_squaring int_pow exponentiate",
        "base,exp x,n b,e base,exponent a,k",
        ("""
         result = 1
         while $exp > 0:
             if $exp & 1:
                 result *= $base
             $base *= $base
             $exp >>= 1
         return result
         """, """
         if $exp == 0:
             return 1
         half = $FN($base, $exp // 2)
         if $exp % 2:
             return half * half * $base
         return half * half
         """, """
         result = 1
         for _ in range($exp):
             result *= $base
         return result
         """),
        ("Raise $base to the power $exp, where $exp is a non-negative integer.",
         "Compute $base to the power of $exp without using the ** operator.",
         "Return $base multiplied by itself $exp times, or 1 when $exp is 0."),
        [(2, 10, 1024), (3, 0, 1), (5, 3, 125), (7, 1, 7), (-2, 3, -8)],
        "int, int -> int",
    ),
    family(
        "integer_sqrt", "math",
        "integer_sqrt int_sqrt floor_sqrt isqrt square_root_floor",
        "n num x value",
        ("""
         if $n < 2:
             return $n
         guess = $n
         while guess * guess > $n:
             guess = (guess + $n // guess) // 2
         return guess
         """, """
         lo, hi = 0, $n
         while lo < hi:
             mid = (lo + hi + 1) // 2
             if mid * mid <= $n:
                 lo = mid
             else:
                 hi = mid - 1
         return lo
         """, """
         root = 0
         while (root + 1) * (root + 1) <= $n:
             root += 1
         return root
         """),
        ("Return the largest integer whose square is at most $n.",
         "Compute the integer square root of the non-negative integer $n, rounded down.",
         "Find floor(sqrt($n)) using only integer arithmetic."),
        [(0, 0), (1, 1), (2, 1), (3, 1), (4, 2), (15, 3), (16, 4), (17, 4), (99, 9), (1000000, 1000)],
        "int -> int",
    ),
    family(
        "collatz_steps", "math",
        "collatz_steps collatz_length count_collatz_steps collatz_step_count steps_to_one",
        "n num start value",
        ("""
         steps = 0
         while $n != 1:
             $n = $n // 2 if $n % 2 == 0 else 3 * $n + 1
             steps += 1
         return steps
         """, """
         if $n == 1:
             return 0
         if $n % 2 == 0:
             return 1 + $FN($n // 2)
         return 1 + $FN(3 * $n + 1)
         """, """
         from itertools import count

         for steps in count():
             if $n == 1:
                 return steps
             $n = 3 * $n + 1 if $n % 2 else $n // 2
         """),
        ("Return how many Collatz steps it takes for $n to reach 1.",
         "Count the steps of the 3n + 1 process, starting from $n, until it reaches 1.",
         "Compute the number of halving or triple-plus-one steps that take the positive integer $n down to 1."),
        [(1, 0), (6, 8), (7, 16), (27, 111)],
        "int -> int",
    ),
    family(
        "triangular_number", "math",
        "triangular_number triangle_number nth_triangular triangular sum_to_n",
        "n num k",
        ("""
         return $n * ($n + 1) // 2
         """, """
         return sum(range(1, $n + 1))
         """, """
         total = 0
         for i in range(1, $n + 1):
             total += i
         return total
         """),
        ("Return the sum of the integers from 1 to $n.",
         "Compute the triangular number T($n), the sum of the first $n positive integers.",
         "Return how many dots form a triangle with $n rows, the first row holding one dot."),
        [(0, 0), (1, 1), (4, 10), (10, 55), (100, 5050)],
        "int -> int",
    ),
    family(
        "binomial", "math",
        "binomial binomial_coefficient n_choose_k choose combinations_count",
        "n,k total,chosen n,r m,k",
        ("""
         import math

         return math.comb($n, $k)
         """, """
         if $k < 0 or $k > $n:
             return 0
         $k = min($k, $n - $k)
         result = 1
         for i in range($k):
             result = result * ($n - i) // (i + 1)
         return result
         """, """
         if $k < 0 or $k > $n:
             return 0
         row = [1]
         for _ in range($n):
             row = [a + b for a, b in zip([0] + row, row + [0])]
         return row[$k]
         """, """
         if $k < 0 or $k > $n:
             return 0
         if $k == 0 or $k == $n:
             return 1
         return $FN($n - 1, $k - 1) + $FN($n - 1, $k)
         """),
        ("Return the number of ways to choose $k items from $n.",
         "Compute the binomial coefficient $n choose $k.",
         "Count the subsets of size $k of a set with $n elements."),
        [(5, 2, 10), (10, 0, 1), (10, 10, 1), (6, 3, 20), (4, 5, 0), (12, 6, 924)],
        "int, int -> int",
    ),
    family(
        "is_perfect_number", "math",
        "is_perfect is_perfect_number perfect_number check_perfect",
        "n num x value",
        ("""
         if $n < 2:
             return False
         return sum(d for d in range(1, $n) if $n % d == 0) == $n
         """, """
         if $n < 2:
             return False
         total = 1
         d = 2
         while d * d <= $n:
             if $n % d == 0:
                 total += d
                 if d != $n // d:
                     total += $n // d
             d += 1
         return total == $n
         """),
        ("Return True if $n equals the sum of its proper divisors.",
         "Check whether $n is a perfect number.",
         "Decide if the positive integer $n is perfect, meaning its divisors other than itself add up to it."),
        [(6, True), (28, True), (12, False), (1, False), (496, True), (27, False)],
        "int -> bool",
    ),
    family(
        "is_armstrong", "math",
        "is_armstrong is_armstrong_number is_narcissistic armstrong_check",
        "n num number value",
        ("""
         digits = str($n)
         power = len(digits)
         return $n == sum(int(d) ** power for d in digits)
         """, """
         digits = []
         rest = $n
         while rest:
             digits.append(rest % 10)
             rest //= 10
         power = len(digits)
         return $n == sum(d ** power for d in digits)
         """, """
         digits = [int(ch) for ch in str($n)]
         total = 0
         for d in digits:
             total += d ** len(digits)
         return total == $n
         """),
        ("Return True if $n is an Armstrong number.",
         "Check whether $n equals the sum of its digits, each raised to the number of digits.",
         "Decide if $n is narcissistic: its digits, each to the power of the digit count, add up to $n."),
        [(153, True), (370, True), (9474, True), (123, False), (10, False), (5, True)],
        "int -> bool",
    ),
    family(
        "count_divisors", "math",
        "count_divisors number_of_divisors divisor_count num_divisors tau",
        "n num x value",
        ("""
         return sum(1 for d in range(1, $n + 1) if $n % d == 0)
         """, """
         count = 0
         d = 1
         while d * d <= $n:
             if $n % d == 0:
                 count += 1 if d * d == $n else 2
             d += 1
         return count
         """, """
         return len([d for d in range(1, $n + 1) if $n % d == 0])
         """),
        ("Return how many positive integers divide $n exactly.",
         "Count the divisors of the positive integer $n.",
         "Compute the number of divisors of $n, including 1 and $n itself."),
        [(1, 1), (12, 6), (13, 2), (36, 9), (100, 9)],
        "int -> int",
    ),
    family(
        "is_leap_year", "date",
        "is_leap_year is_leap leap_year check_leap_year",
        "year y yr",
        ("""
         return $year % 4 == 0 and ($year % 100 != 0 or $year % 400 == 0)
         """, """
         if $year % 400 == 0:
             return True
         if $year % 100 == 0:
             return False
         return $year % 4 == 0
         """, """
         import calendar

         return calendar.isleap($year)
         """),
        ("Return True if $year is a leap year in the Gregorian calendar.",
         "Check whether the year $year has 366 days.",
         "Decide if $year is a leap year: divisible by 4, except centuries not divisible by 400."),
        [(2000, True), (1900, False), (2024, True), (2023, False), (2100, False)],
        "int -> bool",
    ),
    family(
        "celsius_to_fahrenheit", "conversion",
        "celsius_to_fahrenheit c_to_f to_fahrenheit celsius_to_f convert_c_to_f",
        "celsius c degrees temp",
        ("""
         return $celsius * 9 / 5 + 32
         """, """
         return $celsius * 1.8 + 32
         """, """
         fahrenheit = ($celsius * 9 / 5) + 32
         return fahrenheit
         """),
        ("Convert a temperature of $celsius degrees Celsius to Fahrenheit.",
         "Return the Fahrenheit equivalent of $celsius degrees Celsius.",
         "Convert $celsius from the Celsius scale to the Fahrenheit scale."),
        [(0, 32.0), (100, 212.0), (-40, -40.0), (20, 68.0)],
        "float -> float",
    ),
    family(
        "fahrenheit_to_celsius", "conversion",
        "fahrenheit_to_celsius f_to_c to_celsius fahrenheit_to_c convert_f_to_c",
        "fahrenheit f degrees temp",
        ("""
         return ($fahrenheit - 32) * 5 / 9
         """, """
         return ($fahrenheit - 32) / 1.8
         """, """
         celsius = ($fahrenheit - 32) * 5 / 9
         return celsius
         """),
        ("Convert a temperature of $fahrenheit degrees Fahrenheit to Celsius.",
         "Return the Celsius equivalent of $fahrenheit degrees Fahrenheit.",
         "Convert $fahrenheit from the Fahrenheit scale to the Celsius scale."),
        [(32, 0.0), (212, 100.0), (-40, -40.0), (50, 10.0)],
        "float -> float",
    ),
    family(
        "clamp", "math",
        "clamp clip constrain bound_value limit_to_range",
        "x,low,high value,lo,hi n,minimum,maximum value,min_value,max_value",
        ("""
         return max($low, min($x, $high))
         """, """
         if $x < $low:
             return $low
         if $x > $high:
             return $high
         return $x
         """, """
         return $low if $x < $low else $high if $x > $high else $x
         """, """
         return sorted(($low, $x, $high))[1]
         """),
        ("Limit $x to the closed range from $low to $high.",
         "Return $x clamped so that it lies between $low and $high.",
         "Restrict $x to the interval [$low, $high], assuming $low <= $high."),
        [(5, 0, 10, 5), (-3, 0, 10, 0), (15, 0, 10, 10), (2.5, 1, 2, 2)],
        "float, float, float -> float",
    ),
    family(
        "sign", "math",
        "sign signum sgn sign_of",
        "x n value num",
        ("""
         return ($x > 0) - ($x < 0)
         """, """
         if $x > 0:
             return 1
         if $x < 0:
             return -1
         return 0
         """, """
         return 0 if $x == 0 else (1 if $x > 0 else -1)
         """),
        ("Return 1 if $x is positive, -1 if it is negative and 0 otherwise.",
         "Return the sign of $x as -1, 0 or 1.",
         "Compute the signum of the number $x."),
        [(5, 1), (-2.5, -1), (0, 0)],
        "float -> int",
    ),
    family(
        "mean", "statistics",
        "mean average arithmetic_mean avg mean_of",
        "values nums numbers xs data",
        ("""
         return sum($values) / len($values)
         """, """
         total = 0
         count = 0
         for v in $values:
             total += v
             count += 1
         return total / count
         """, """
         import statistics

         return statistics.fmean($values)
         """),
        ("Return the arithmetic mean of the numbers in $values.",
         "Compute the average of the non-empty list of numbers $values.",
         "Average the items of $values."),
        [([1, 2, 3, 4], 2.5), ([5], 5.0), ([2, 4, 9], 5.0)],
        "list[float] -> float",
    ),
    family(
        "median", "statistics",
        "median median_of find_median compute_median middle_value",
        "values nums numbers xs data",
        ("""
         ordered = sorted($values)
         mid = len(ordered) // 2
         if len(ordered) % 2:
             return ordered[mid]
         return (ordered[mid - 1] + ordered[mid]) / 2
         """, """
         import statistics

         return statistics.median($values)
         """, """
         ordered = sorted($values)
         half, odd = divmod(len(ordered), 2)
         return ordered[half] if odd else (ordered[half - 1] + ordered[half]) / 2
         """),
        ("Return the median of the numbers in $values.",
         "Find the middle value of $values; with an even count, average the two middle values.",
         "Compute the median of the non-empty list $values without modifying it."),
        [([3, 1, 2], 2), ([4, 1, 3, 2], 2.5), ([7], 7), ([1, 10, 2, 9], 5.5)],
        "list[float] -> float",
    ),
    family(
        "mode", "statistics",
        "mode most_frequent_value find_mode mode_of statistical_mode",
        "values items data xs",
        ("""
         from collections import Counter

         return Counter($values).most_common(1)[0][0]
         """, """
         return max($values, key=$values.count)
         """, """
         counts = {}
         for v in $values:
             counts[v] = counts.get(v, 0) + 1
         return max(counts, key=counts.get)
         """, """
         import statistics

         return statistics.mode($values)
         """),
        ("Return the most common value in $values.",
         "Find the value that occurs most often in $values; a tie goes to the one seen first.",
         "Return the mode of the non-empty sequence $values."),
        [([1, 2, 2, 3], 2), (["a", "b", "a"], "a"), ([4, 5, 5, 4], 4), ([7], 7)],
    ),
    family(
        "variance", "statistics",
        "variance population_variance pvariance compute_variance var_of",
        "values data nums xs",
        ("""
         m = sum($values) / len($values)
         return sum((v - m) ** 2 for v in $values) / len($values)
         """, """
         import statistics

         return statistics.pvariance($values)
         """, """
         size = len($values)
         mean = sum($values) / size
         total = 0.0
         for v in $values:
             total += (v - mean) ** 2
         return total / size
         """),
        ("Return the population variance of $values.",
         "Compute the average squared deviation of $values from their mean.",
         "Measure how spread out the numbers in $values are, as the population variance."),
        [([1.0, 2.0, 3.0, 4.0], 1.25), ([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0], 4.0), ([5.0, 5.0], 0.0)],
        "list[float] -> float",
    ),
    family(
        "harmonic_number", "math",
        "harmonic_number harmonic nth_harmonic harmonic_sum",
        "n num k terms",
        ("""
         return sum((1 / i for i in range(1, $n + 1)), 0.0)
         """, """
         total = 0.0
         for i in range(1, $n + 1):
             total += 1 / i
         return total
         """, """
         total, i = 0.0, 1
         while i <= $n:
             total += 1 / i
             i += 1
         return total
         """),
        ("Return the sum of the reciprocals 1/1 through 1/$n.",
         "Return the harmonic number of order $n as a float.",
         "Add up 1/i for every i from 1 to $n."),
        [(0, 0.0), (1, 1.0), (2, 1.5), (4, 2.083333333333333)],
        "int -> float",
    ),
    family(
        "sum_of_squares", "math",
        "sum_of_squares square_sum sum_squares squares_total",
        "n num count limit",
        ("""
         return sum(i * i for i in range(1, $n + 1))
         """, """
         return $n * ($n + 1) * (2 * $n + 1) // 6
         """, """
         total = 0
         for i in range(1, $n + 1):
             total += i ** 2
         return total
         """),
        ("Return the sum of the squares of the integers from 1 to $n.",
         "Add up i * i for i from 1 to $n.",
         "Compute the sum of the first $n perfect squares."),
        [(0, 0), (1, 1), (3, 14), (10, 385)],
        "int -> int",
    ),
    family(
        "is_power_of_two", "math",
        "is_power_of_two is_pow2 power_of_two check_power_of_two",
        "n num x value",
        ("""
         return $n > 0 and ($n & ($n - 1)) == 0
         """, """
         if $n < 1:
             return False
         while $n % 2 == 0:
             $n //= 2
         return $n == 1
         """, """
         return $n > 0 and bin($n).count("1") == 1
         """),
        ("Return True if $n is a positive power of two.",
         "Check whether $n equals 2 raised to some non-negative integer power.",
         "Decide if the integer $n is positive and has exactly one bit set."),
        [(1, True), (2, True), (6, False), (64, True), (0, False), (-8, False)],
        "int -> bool",
    ),
    family(
        "count_set_bits", "math",
        "count_set_bits popcount count_ones bit_count hamming_weight",
        "n num x value",
        ("""
         return bin($n).count("1")
         """, """
         count = 0
         while $n:
             $n &= $n - 1
             count += 1
         return count
         """, """
         total = 0
         while $n:
             total += $n & 1
             $n >>= 1
         return total
         """, """
         return $n.bit_count()
         """),
        ("Return the number of 1 bits in the binary form of the non-negative integer $n.",
         "Count the set bits of $n.",
         "Compute the population count of $n, the number of ones in its binary representation."),
        [(0, 0), (7, 3), (8, 1), (255, 8), (1023, 10)],
        "int -> int",
    ),
    family(
        "to_binary", "conversion",
        "to_binary decimal_to_binary int_to_binary binary_string dec_to_bin",
        "n num value x",
        ("""
         return bin($n)[2:]
         """, """
         return format($n, "b")
         """, """
         if $n == 0:
             return "0"
         bits = []
         while $n:
             bits.append(str($n % 2))
             $n //= 2
         return "".join(reversed(bits))
         """, """
         return f"{$n:b}"
         """),
        ("Return the binary representation of the non-negative integer $n as a string.",
         "Convert $n to a string of binary digits without the 0b prefix.",
         "Write the non-negative integer $n in base 2."),
        [(0, "0"), (5, "101"), (10, "1010"), (255, "11111111")],
        "int -> str",
    ),
    family(
        "binary_to_int", "conversion",
        "binary_to_int bin_to_int parse_binary from_binary binary_to_decimal",
        "bits s binary text",
        ("""
         return int($bits, 2)
         """, """
         value = 0
         for ch in $bits:
             value = value * 2 + int(ch)
         return value
         """, """
         return sum(int(ch) << i for i, ch in enumerate(reversed($bits)))
         """),
        ("Convert the binary string $bits to an integer.",
         "Return the integer value of $bits, a string of 0s and 1s.",
         "Parse $bits as a base-2 number."),
        [("0", 0), ("101", 5), ("11111111", 255), ("1000", 8)],
        "str -> int",
    ),
)


# ------------------------------------------------------------------------------------------------ lists
SORTED_CASES = [([3, 1, 2], [1, 2, 3]), ([], []), ([5, -1, 5, 0], [-1, 0, 5, 5]), ([1], [1]),
                ([9, 8, 7, 6, 5, 4], [4, 5, 6, 7, 8, 9])]
SORT_PARAMS = "items arr values nums xs lst"
LISTS = (
    family(
        "sum_list", "list",
        "sum_list list_sum add_all sum_of_list sum_numbers",
        "numbers nums values items xs",
        ("""
         total = 0
         for x in $numbers:
             total += x
         return total
         """, """
         return sum($numbers)
         """, """
         import operator
         from functools import reduce

         return reduce(operator.add, $numbers, 0)
         """, """
         if not $numbers:
             return 0
         return $numbers[0] + $FN($numbers[1:])
         """),
        ("Return the sum of the numbers in $numbers.",
         "Add up every element of $numbers.",
         "Compute the total of the list of numbers $numbers, which is 0 when it is empty."),
        [([1, 2, 3], 6), ([], 0), ([-5, 5, 10], 10)],
        "list[int] -> int",
    ),
    family(
        "find_max", "list",
        "find_max max_value largest maximum max_of_list",
        "items numbers values xs nums",
        ("""
         best = $items[0]
         for x in $items[1:]:
             if x > best:
                 best = x
         return best
         """, """
         best = $items[0]
         i = 1
         while i < len($items):
             if $items[i] > best:
                 best = $items[i]
             i += 1
         return best
         """, """
         from functools import reduce

         return reduce(lambda a, b: a if a >= b else b, $items)
         """),
        ("Return the largest element of the non-empty list $items without calling max().",
         "Find the maximum value in $items by scanning it once.",
         "Return the biggest item of the non-empty list $items."),
        [([3, 7, 2], 7), ([-1, -5], -1), ([4], 4), ([2, 9, 9, 1], 9)],
        "list[int] -> int",
    ),
    family(
        "find_min", "list",
        "find_min min_value smallest minimum min_of_list",
        "items numbers values xs nums",
        ("""
         best = $items[0]
         for x in $items[1:]:
             if x < best:
                 best = x
         return best
         """, """
         best = $items[0]
         i = 1
         while i < len($items):
             if $items[i] < best:
                 best = $items[i]
             i += 1
         return best
         """, """
         from functools import reduce

         return reduce(lambda a, b: a if a <= b else b, $items)
         """),
        ("Return the smallest element of the non-empty list $items without calling min().",
         "Find the minimum value in $items by scanning it once.",
         "Return the least item of the non-empty list $items."),
        [([3, 7, 2], 2), ([-1, -5], -5), ([4], 4), ([8, 1, 1, 3], 1)],
        "list[int] -> int",
    ),
    family(
        "reverse_list", "list",
        "reverse_list reversed_list list_reverse reverse_items flip_list",
        "items xs values lst seq",
        ("""
         return $items[::-1]
         """, """
         return list(reversed($items))
         """, """
         result = []
         for i in range(len($items) - 1, -1, -1):
             result.append($items[i])
         return result
         """, """
         result = list($items)
         left, right = 0, len(result) - 1
         while left < right:
             result[left], result[right] = result[right], result[left]
             left += 1
             right -= 1
         return result
         """),
        ("Return a new list with the elements of $items in reverse order.",
         "Reverse $items without modifying the original list.",
         "Build the reversed copy of the list $items."),
        [([1, 2, 3], [3, 2, 1]), ([], []), (["a", "b"], ["b", "a"]), ([1, 2, 3, 4], [4, 3, 2, 1])],
        "list -> list",
    ),
    family(
        "flatten_once", "list",
        "flatten flatten_once flatten_one_level concat_lists join_lists",
        "lists nested rows groups",
        ("""
         return [x for sub in $lists for x in sub]
         """, """
         result = []
         for sub in $lists:
             result.extend(sub)
         return result
         """, """
         from itertools import chain

         return list(chain.from_iterable($lists))
         """, """
         return sum($lists, [])
         """),
        ("Flatten the list of lists $lists by one level.",
         "Concatenate the inner lists of $lists into a single list.",
         "Return every element of every sublist of $lists, in order."),
        [([[1, 2], [3], []], [1, 2, 3]), ([], []), ([["a"], ["b", "c"]], ["a", "b", "c"]),
         ([[1, [2]], [3]], [1, [2], 3])],
        "list[list] -> list",
    ),
    family(
        "unique", "list",
        "unique dedupe unique_items remove_duplicates distinct ordered_unique",
        "items xs values seq",
        ("""
         seen = set()
         result = []
         for x in $items:
             if x not in seen:
                 seen.add(x)
                 result.append(x)
         return result
         """, """
         return list(dict.fromkeys($items))
         """, """
         result = []
         for x in $items:
             if x not in result:
                 result.append(x)
         return result
         """),
        ("Return the distinct elements of $items in the order they first appear.",
         "Remove duplicates from $items while keeping the original order.",
         "Build a list of the unique values in $items, keeping first occurrences only."),
        [([1, 2, 1, 3, 2], [1, 2, 3]), ([], []), (["b", "a", "b"], ["b", "a"])],
        "list -> list",
    ),
    family(
        "sorted_unique", "list",
        "sorted_unique unique_sorted distinct_sorted sorted_distinct",
        "items xs values seq",
        ("""
         return sorted(set($items))
         """, """
         result = []
         for x in sorted($items):
             if not result or result[-1] != x:
                 result.append(x)
         return result
         """, """
         ordered = sorted($items)
         return [x for i, x in enumerate(ordered) if i == 0 or ordered[i - 1] != x]
         """),
        ("Return the distinct values of $items in ascending order.",
         "Sort $items and drop repeated values.",
         "List each value of $items once, smallest first."),
        [([3, 1, 3, 2], [1, 2, 3]), ([], []), (["b", "a", "b"], ["a", "b"])],
        "list -> list",
    ),
    family(
        "count_occurrences", "list",
        "count_occurrences count_of occurrences count_value times_appears",
        "items,target xs,value values,x seq,item",
        ("""
         return $items.count($target)
         """, """
         count = 0
         for elem in $items:
             if elem == $target:
                 count += 1
         return count
         """, """
         return sum(1 for elem in $items if elem == $target)
         """),
        ("Return how many times $target appears in $items.",
         "Count the elements of $items equal to $target.",
         "Compute the number of occurrences of $target in the list $items."),
        [([1, 2, 1, 1], 1, 3), ([], 5, 0), (["a", "b"], "c", 0), (["a", "b", "a"], "a", 2)],
        "list, object -> int",
    ),
    family(
        "chunks", "list",
        "chunks chunked split_into_chunks batches make_batches",
        "items,size xs,n seq,k values,chunk_size",
        ("""
         return [$items[i:i + $size] for i in range(0, len($items), $size)]
         """, """
         result, current = [], []
         for elem in $items:
             current.append(elem)
             if len(current) == $size:
                 result.append(current)
                 current = []
         if current:
             result.append(current)
         return result
         """, """
         result = []
         start = 0
         while start < len($items):
             result.append($items[start:start + $size])
             start += $size
         return result
         """),
        ("Split $items into consecutive lists of length $size; the last one may be shorter.",
         "Break $items into chunks of $size elements each.",
         "Group the elements of $items into lists of at most $size items, in order."),
        [([1, 2, 3, 4, 5], 2, [[1, 2], [3, 4], [5]]), ([], 3, []), ([1, 2, 3], 3, [[1, 2, 3]])],
        "list, int -> list[list]",
    ),
    family(
        "rotate_left", "list",
        "rotate_left rotate_list left_rotate shift_left rotate",
        "items,k xs,n values,steps seq,shift",
        ("""
         if not $items:
             return []
         $k %= len($items)
         return $items[$k:] + $items[:$k]
         """, """
         from collections import deque

         d = deque($items)
         d.rotate(-$k)
         return list(d)
         """, """
         size = len($items)
         return [$items[(i + $k) % size] for i in range(size)]
         """),
        ("Rotate $items to the left by $k positions and return the result as a new list.",
         "Return $items shifted left $k places, with the leading elements wrapping around to the end.",
         "Move the first $k elements of $items to the end, wrapping $k around the length."),
        [([1, 2, 3, 4, 5], 2, [3, 4, 5, 1, 2]), ([1, 2, 3], 0, [1, 2, 3]), ([1, 2, 3], 4, [2, 3, 1]),
         ([], 3, [])],
        "list, int -> list",
    ),
    family(
        "second_largest", "list",
        "second_largest second_max runner_up second_biggest",
        "nums numbers values xs",
        ("""
         distinct = sorted(set($nums))
         return distinct[-2] if len(distinct) >= 2 else None
         """, """
         first = second = None
         for x in $nums:
             if first is None or x > first:
                 first, second = x, first
             elif x != first and (second is None or x > second):
                 second = x
         return second
         """, """
         top = max($nums)
         rest = [x for x in $nums if x != top]
         return max(rest) if rest else None
         """),
        ("Return the second largest distinct value in $nums, or None if there is none.",
         "Find the runner-up value of the non-empty list $nums, ignoring repeats of the maximum.",
         "Return the largest value of $nums strictly smaller than its maximum, or None."),
        [([3, 1, 4, 1, 5], 4), ([5, 5, 3], 3), ([2, 2], None), ([7, 9], 7), ([4, 4, 5], 4)],
        "list[int] -> int | None",
    ),
    family(
        "cumulative_sum", "list",
        "cumulative_sum running_total running_sum prefix_sums cumsum",
        "numbers nums values xs",
        ("""
         result = []
         total = 0
         for x in $numbers:
             total += x
             result.append(total)
         return result
         """, """
         from itertools import accumulate

         return list(accumulate($numbers))
         """, """
         total = 0
         return [total := total + x for x in $numbers]
         """),
        ("Return the running totals of $numbers.",
         "Compute the prefix sums of $numbers: element i is the sum of the first i + 1 values.",
         "Build a list whose i-th item is the sum of $numbers up to and including index i."),
        [([1, 2, 3, 4], [1, 3, 6, 10]), ([], []), ([5, -5], [5, 0])],
        "list[int] -> list[int]",
    ),
    family(
        "filter_evens", "list",
        "filter_evens even_numbers evens get_evens keep_even",
        "numbers nums values xs",
        ("""
         return [x for x in $numbers if x % 2 == 0]
         """, """
         result = []
         for x in $numbers:
             if x % 2 == 0:
                 result.append(x)
         return result
         """, """
         return list(filter(lambda x: x % 2 == 0, $numbers))
         """),
        ("Return the even numbers from $numbers, in their original order.",
         "Keep only the elements of $numbers that are divisible by 2.",
         "Select the even integers in $numbers."),
        [([1, 2, 3, 4, 6], [2, 4, 6]), ([1, 3], []), ([0, -2, 5], [0, -2])],
        "list[int] -> list[int]",
    ),
    family(
        "squares", "list",
        "squares square_all squared square_each map_squares",
        "numbers nums values xs",
        ("""
         return [x * x for x in $numbers]
         """, """
         result = []
         for x in $numbers:
             result.append(x ** 2)
         return result
         """, """
         return list(map(lambda x: x * x, $numbers))
         """),
        ("Return a list with the square of each number in $numbers.",
         "Square every element of $numbers and return the results as a new list.",
         "Map each value of $numbers to its square."),
        [([1, 2, 3], [1, 4, 9]), ([], []), ([-2, 0.5], [4, 0.25])],
        "list[float] -> list[float]",
    ),
    family(
        "dot_product", "list",
        "dot_product dot inner_product dot_prod scalar_product",
        "a,b u,v xs,ys vec1,vec2 left,right",
        ("""
         return sum(x * y for x, y in zip($a, $b))
         """, """
         total = 0
         for i in range(len($a)):
             total += $a[i] * $b[i]
         return total
         """, """
         import operator

         return sum(map(operator.mul, $a, $b))
         """, """
         total = 0
         for x, y in zip($a, $b):
             total += x * y
         return total
         """),
        ("Return the dot product of the equal-length vectors $a and $b.",
         "Multiply $a and $b element by element and sum the products.",
         "Compute the inner product of two sequences of numbers, $a and $b."),
        [([1, 2, 3], [4, 5, 6], 32), ([], [], 0), ([2], [-3], -6)],
        "list[float], list[float] -> float",
    ),
    family(
        "merge_sorted", "list",
        "merge_sorted merge_sorted_lists merge_two_sorted merge_lists combine_sorted",
        "a,b left,right xs,ys first,second list1,list2",
        ("""
         result = []
         i = j = 0
         while i < len($a) and j < len($b):
             if $a[i] <= $b[j]:
                 result.append($a[i])
                 i += 1
             else:
                 result.append($b[j])
                 j += 1
         result.extend($a[i:])
         result.extend($b[j:])
         return result
         """, """
         return sorted($a + $b)
         """, """
         import heapq

         return list(heapq.merge($a, $b))
         """),
        ("Merge the sorted lists $a and $b into one sorted list.",
         "Return the elements of the ascending lists $a and $b together in ascending order.",
         "Combine two already sorted lists, $a and $b, into a new sorted list."),
        [([1, 3, 5], [2, 4, 6], [1, 2, 3, 4, 5, 6]), ([], [1], [1]), ([1, 2], [], [1, 2]),
         ([1, 1], [1], [1, 1, 1])],
        "list[int], list[int] -> list[int]",
    ),
    family(
        "bubble_sort", "sorting",
        "bubble_sort bubblesort sort_bubble bubble_sorted",
        SORT_PARAMS,
        ("""
         n = len($items)
         for i in range(n):
             for j in range(n - 1 - i):
                 if $items[j] > $items[j + 1]:
                     $items[j], $items[j + 1] = $items[j + 1], $items[j]
         return $items
         """, """
         result = list($items)
         swapped = True
         while swapped:
             swapped = False
             for i in range(len(result) - 1):
                 if result[i] > result[i + 1]:
                     result[i], result[i + 1] = result[i + 1], result[i]
                     swapped = True
         return result
         """),
        ("Sort $items in ascending order using bubble sort.",
         "Return $items sorted with the bubble sort algorithm.",
         "Bubble sort the list $items, smallest value first, and return the sorted list."),
        SORTED_CASES,
        "list[int] -> list[int]",
    ),
    family(
        "insertion_sort", "sorting",
        "insertion_sort insertionsort insert_sort sort_by_insertion",
        SORT_PARAMS,
        ("""
         for i in range(1, len($items)):
             key = $items[i]
             j = i - 1
             while j >= 0 and $items[j] > key:
                 $items[j + 1] = $items[j]
                 j -= 1
             $items[j + 1] = key
         return $items
         """, """
         import bisect

         result = []
         for x in $items:
             bisect.insort(result, x)
         return result
         """, """
         result = []
         for value in $items:
             i = 0
             while i < len(result) and result[i] <= value:
                 i += 1
             result.insert(i, value)
         return result
         """),
        ("Sort $items in ascending order using insertion sort.",
         "Return $items sorted by inserting each element into its place among the ones before it.",
         "Apply insertion sort to the list $items and return the sorted result."),
        SORTED_CASES,
        "list[int] -> list[int]",
    ),
    family(
        "selection_sort", "sorting",
        "selection_sort selectionsort select_sort sort_by_selection",
        SORT_PARAMS,
        ("""
         for i in range(len($items)):
             smallest = i
             for j in range(i + 1, len($items)):
                 if $items[j] < $items[smallest]:
                     smallest = j
             $items[i], $items[smallest] = $items[smallest], $items[i]
         return $items
         """, """
         remaining = list($items)
         result = []
         while remaining:
             smallest = min(remaining)
             remaining.remove(smallest)
             result.append(smallest)
         return result
         """),
        ("Sort $items in ascending order using selection sort.",
         "Return $items sorted by repeatedly selecting the smallest remaining element.",
         "Apply selection sort to the list $items and return the sorted result."),
        SORTED_CASES,
        "list[int] -> list[int]",
    ),
    family(
        "merge_sort", "sorting",
        "merge_sort mergesort msort sort_by_merging",
        SORT_PARAMS,
        ("""
         if len($items) <= 1:
             return list($items)
         mid = len($items) // 2
         left = $FN($items[:mid])
         right = $FN($items[mid:])
         merged = []
         i = j = 0
         while i < len(left) and j < len(right):
             if left[i] <= right[j]:
                 merged.append(left[i])
                 i += 1
             else:
                 merged.append(right[j])
                 j += 1
         return merged + left[i:] + right[j:]
         """, """
         import heapq

         if len($items) < 2:
             return list($items)
         mid = len($items) // 2
         return list(heapq.merge($FN($items[:mid]), $FN($items[mid:])))
         """, """
         if len($items) <= 1:
             return $items[:]
         half = len($items) // 2
         left, right = $FN($items[:half]), $FN($items[half:])
         merged = []
         while left and right:
             merged.append(left.pop(0) if left[0] <= right[0] else right.pop(0))
         return merged + left + right
         """),
        ("Sort $items with merge sort and return a new sorted list.",
         "Return a sorted copy of $items, splitting it in halves, sorting each and merging them.",
         "Apply the merge sort algorithm to $items, smallest value first."),
        SORTED_CASES,
        "list[int] -> list[int]",
    ),
    family(
        "quick_sort", "sorting",
        "quick_sort quicksort qsort sort_by_partition",
        SORT_PARAMS,
        ("""
         if len($items) <= 1:
             return list($items)
         pivot = $items[0]
         smaller = [x for x in $items[1:] if x < pivot]
         larger = [x for x in $items[1:] if x >= pivot]
         return $FN(smaller) + [pivot] + $FN(larger)
         """, """
         if len($items) < 2:
             return list($items)
         pivot = $items[len($items) // 2]
         less = [x for x in $items if x < pivot]
         equal = [x for x in $items if x == pivot]
         greater = [x for x in $items if x > pivot]
         return $FN(less) + equal + $FN(greater)
         """),
        ("Sort $items with quicksort and return a new sorted list.",
         "Return a sorted copy of $items by partitioning it around a pivot and sorting each side.",
         "Apply the quicksort algorithm to the list $items, smallest value first."),
        SORTED_CASES,
        "list[int] -> list[int]",
    ),
    family(
        "binary_search", "searching",
        "binary_search bsearch binary_find search_sorted index_in_sorted",
        "items,target arr,x nums,value values,key sorted_list,item",
        ("""
         lo, hi = 0, len($items) - 1
         while lo <= hi:
             mid = (lo + hi) // 2
             if $items[mid] == $target:
                 return mid
             if $items[mid] < $target:
                 lo = mid + 1
             else:
                 hi = mid - 1
         return -1
         """, """
         def search(lo, hi):
             if lo > hi:
                 return -1
             mid = (lo + hi) // 2
             if $items[mid] == $target:
                 return mid
             if $items[mid] < $target:
                 return search(mid + 1, hi)
             return search(lo, mid - 1)

         return search(0, len($items) - 1)
         """, """
         import bisect

         i = bisect.bisect_left($items, $target)
         return i if i < len($items) and $items[i] == $target else -1
         """),
        ("Return the index of $target in the sorted list $items, or -1 if it is absent.",
         "Search the ascending list $items for $target by repeated halving; return its index or -1.",
         "Find the position of $target in sorted $items using binary search, returning -1 when not found."),
        [([1, 3, 5, 7, 9], 7, 3), ([1, 3, 5], 4, -1), ([], 1, -1), ([2, 4, 6, 8], 2, 0), ([2, 4, 6, 8], 8, 3)],
        "list[int], int -> int",
    ),
    family(
        "linear_search", "searching",
        "linear_search find_index index_of sequential_search search_list",
        "items,target xs,value values,x seq,item",
        ("""
         for i, elem in enumerate($items):
             if elem == $target:
                 return i
         return -1
         """, """
         return $items.index($target) if $target in $items else -1
         """, """
         i = 0
         while i < len($items):
             if $items[i] == $target:
                 return i
             i += 1
         return -1
         """, """
         return next((i for i, elem in enumerate($items) if elem == $target), -1)
         """),
        ("Return the index of the first occurrence of $target in $items, or -1.",
         "Scan $items from the start and return the position of $target, or -1 if it is missing.",
         "Find where $target first appears in $items with a linear search."),
        [([4, 2, 7], 7, 2), ([4, 2, 7], 5, -1), ([], 0, -1), ([1, 2, 1], 1, 0)],
        "list, object -> int",
    ),
    family(
        "two_sum", "searching",
        "two_sum find_pair_with_sum pair_sum_indices two_sum_indices",
        "nums,target numbers,total values,goal arr,k",
        ("""
         seen = {}
         for i, x in enumerate($nums):
             if $target - x in seen:
                 return (seen[$target - x], i)
             seen[x] = i
         return None
         """, """
         for i in range(len($nums)):
             for j in range(i + 1, len($nums)):
                 if $nums[i] + $nums[j] == $target:
                     return (i, j)
         return None
         """),
        ("Return the indices of two different elements of $nums that add up to $target, or None.",
         "Find positions i < j with $nums[i] + $nums[j] == $target and return them as a tuple.",
         "Look for a pair of entries in $nums summing to $target and return their indices, or None."),
        [([2, 7, 11, 15], 9, (0, 1)), ([3, 2, 4], 6, (1, 2)), ([3, 3], 6, (0, 1)), ([1, 2], 7, None)],
        "list[int], int -> tuple[int, int] | None",
    ),
    family(
        "pairwise_differences", "list",
        "pairwise_differences differences consecutive_differences diffs deltas",
        "numbers nums values xs",
        ("""
         return [b - a for a, b in zip($numbers, $numbers[1:])]
         """, """
         result = []
         for i in range(1, len($numbers)):
             result.append($numbers[i] - $numbers[i - 1])
         return result
         """, """
         from itertools import pairwise

         return [b - a for a, b in pairwise($numbers)]
         """),
        ("Return the differences between consecutive elements of $numbers.",
         "Compute $numbers[i + 1] - $numbers[i] for each adjacent pair of $numbers.",
         "List how much each value of $numbers changes from the one before it."),
        [([1, 4, 9, 16], [3, 5, 7]), ([5], []), ([3, 1], [-2])],
        "list[int] -> list[int]",
    ),
    family(
        "index_of_max", "list",
        "index_of_max argmax max_index position_of_max index_of_largest",
        "values numbers nums xs",
        ("""
         return max(range(len($values)), key=$values.__getitem__)
         """, """
         best = 0
         for i in range(1, len($values)):
             if $values[i] > $values[best]:
                 best = i
         return best
         """, """
         return $values.index(max($values))
         """),
        ("Return the index of the largest element of $values; the first one wins ties.",
         "Find the position of the maximum in the non-empty list $values.",
         "Locate the largest value of $values and return its index."),
        [([3, 9, 2], 1), ([1, 5, 5], 1), ([-2], 0), ([0, -1, 4, 4, 2], 2)],
        "list[float] -> int",
    ),
    family(
        "zip_to_dict", "dict",
        "zip_to_dict lists_to_dict make_dict pair_up dict_from_lists",
        "keys,values names,scores ks,vs labels,items",
        ("""
         return dict(zip($keys, $values))
         """, """
         return {k: v for k, v in zip($keys, $values)}
         """, """
         result = {}
         for i in range(min(len($keys), len($values))):
             result[$keys[i]] = $values[i]
         return result
         """),
        ("Pair each key in $keys with the value at the same position in $values and return a dict.",
         "Build a dictionary from the parallel lists $keys and $values, stopping at the shorter one.",
         "Return a dict mapping $keys[i] to $values[i] for every index i the two lists share."),
        [(["a", "b"], [1, 2], {"a": 1, "b": 2}), ([], [], {}), (["x"], [1, 2], {"x": 1})],
        "list, list -> dict",
    ),
    family(
        "frequency_dict", "dict",
        "frequencies frequency_dict count_items tally histogram value_counts",
        "items values xs seq",
        ("""
         counts = {}
         for x in $items:
             counts[x] = counts.get(x, 0) + 1
         return counts
         """, """
         from collections import Counter

         return dict(Counter($items))
         """, """
         return {x: $items.count(x) for x in $items}
         """, """
         counts = {}
         for x in $items:
             if x in counts:
                 counts[x] += 1
             else:
                 counts[x] = 1
         return counts
         """),
        ("Return a dict mapping each element of $items to how many times it occurs.",
         "Count the occurrences of every distinct value in $items.",
         "Tally the items of $items into a dictionary of counts."),
        [([1, 2, 1], {1: 2, 2: 1}), ([], {}), (["a", "b", "a", "a"], {"a": 3, "b": 1})],
        "list -> dict",
    ),
    family(
        "list_difference", "list",
        "list_difference difference subtract_lists items_not_in without",
        "a,b items,exclude first,second xs,ys",
        ("""
         banned = set($b)
         return [x for x in $a if x not in banned]
         """, """
         return [x for x in $a if x not in $b]
         """, """
         result = []
         for x in $a:
             if x not in $b:
                 result.append(x)
         return result
         """),
        ("Return the elements of $a that do not appear in $b, keeping their order.",
         "Remove from $a every value that is also in $b and return the rest as a new list.",
         "Compute the list difference $a minus $b, preserving order and repeats."),
        [([1, 2, 3, 4], [2, 4], [1, 3]), ([1, 1, 2], [2], [1, 1]), ([], [1], [])],
        "list, list -> list",
    ),
    family(
        "intersection", "list",
        "intersection common_elements intersect shared_items list_intersection",
        "a,b first,second xs,ys left,right",
        ("""
         other = set($b)
         result = []
         for x in $a:
             if x in other and x not in result:
                 result.append(x)
         return result
         """, """
         other = set($b)
         return [x for x in dict.fromkeys($a) if x in other]
         """),
        ("Return the values found in both $a and $b, without repeats, in the order of $a.",
         "Find the elements common to the lists $a and $b, each listed once.",
         "Intersect $a with $b, keeping the first list's order and dropping duplicates."),
        [([1, 2, 2, 3], [2, 3, 4], [2, 3]), ([1], [2], []), (["a", "b"], ["b", "a"], ["a", "b"])],
        "list, list -> list",
    ),
    family(
        "all_equal", "list",
        "all_equal all_same is_uniform same_values",
        "items values xs seq",
        ("""
         return len(set($items)) <= 1
         """, """
         return all(x == $items[0] for x in $items)
         """, """
         for x in $items[1:]:
             if x != $items[0]:
                 return False
         return True
         """),
        ("Return True if every element of $items is equal to the others.",
         "Check whether all values in $items are the same; an empty list counts as uniform.",
         "Decide if no two elements of $items differ."),
        [([1, 1, 1], True), ([1, 2], False), ([], True), (["a"], True), ([2, 2, 3], False)],
        "list -> bool",
    ),
    family(
        "is_sorted", "list",
        "is_sorted is_ascending check_sorted in_order is_nondecreasing",
        "items values xs nums",
        ("""
         return all(a <= b for a, b in zip($items, $items[1:]))
         """, """
         return $items == sorted($items)
         """, """
         for i in range(len($items) - 1):
             if $items[i] > $items[i + 1]:
                 return False
         return True
         """),
        ("Return True if $items is in non-decreasing order.",
         "Check whether each element of $items is at most the next one.",
         "Decide if the list $items is already sorted in ascending order."),
        [([1, 2, 2, 3], True), ([3, 1], False), ([], True), ([1, 3, 2], False)],
        "list -> bool",
    ),
    family(
        "moving_average", "statistics",
        "moving_average rolling_mean sliding_window_average rolling_average",
        "values,window nums,k data,size xs,n",
        ("""
         return [sum($values[i:i + $window]) / $window for i in range(len($values) - $window + 1)]
         """, """
         if $window > len($values):
             return []
         total = sum($values[:$window])
         result = [total / $window]
         for i in range($window, len($values)):
             total += $values[i] - $values[i - $window]
             result.append(total / $window)
         return result
         """, """
         averages = []
         for start in range(len($values) - $window + 1):
             chunk = $values[start:start + $window]
             averages.append(sum(chunk) / len(chunk))
         return averages
         """),
        ("Return the averages of every run of $window consecutive values in $values.",
         "Compute the simple moving average of $values with a window of length $window.",
         "Slide a window of size $window over $values and collect the mean at each position."),
        [([1, 2, 3, 4, 5], 2, [1.5, 2.5, 3.5, 4.5]), ([1, 2, 3], 3, [2.0]), ([1, 2], 3, [])],
        "list[float], int -> list[float]",
    ),
    family(
        "max_subarray_sum", "list",
        "max_subarray_sum max_subarray kadane largest_sum_subarray max_contiguous_sum",
        "nums numbers values arr",
        ("""
         best = current = $nums[0]
         for x in $nums[1:]:
             current = max(x, current + x)
             best = max(best, current)
         return best
         """, """
         best = $nums[0]
         for i in range(len($nums)):
             total = 0
             for j in range(i, len($nums)):
                 total += $nums[j]
                 best = max(best, total)
         return best
         """, """
         best = $nums[0]
         prefix = lowest = 0
         for x in $nums:
             prefix += x
             best = max(best, prefix - lowest)
             lowest = min(lowest, prefix)
         return best
         """),
        ("Return the largest sum of any non-empty contiguous subarray of $nums.",
         "Find the maximum total of a run of consecutive elements in $nums.",
         "Compute the maximum subarray sum of the non-empty list $nums."),
        [([-2, 1, -3, 4, -1, 2, 1, -5, 4], 6), ([-3, -1, -2], -1), ([5], 5), ([1, 2, 3], 6)],
        "list[int] -> int",
    ),
)


# ------------------------------------------------------------------------------------------------ strings
STRINGS = (
    family(
        "reverse_string", "string",
        "reverse_string reverse_str reversed_string string_reverse flip_string",
        "s text word value",
        ("""
         return $s[::-1]
         """, """
         return "".join(reversed($s))
         """, """
         result = ""
         for ch in $s:
             result = ch + result
         return result
         """, """
         if len($s) <= 1:
             return $s
         return $FN($s[1:]) + $s[0]
         """),
        ("Return $s with its characters in reverse order.",
         "Reverse the string $s.",
         "Build the string $s read backwards."),
        [("hello", "olleh"), ("", ""), ("ab", "ba"), ("racecar", "racecar")],
        "str -> str",
    ),
    family(
        "is_palindrome", "string",
        "is_palindrome is_palindrome_string check_palindrome palindrome is_palindromic",
        "s text word phrase",
        ("""
         cleaned = [ch.lower() for ch in $s if ch.isalnum()]
         return cleaned == cleaned[::-1]
         """, """
         left, right = 0, len($s) - 1
         while left < right:
             if not $s[left].isalnum():
                 left += 1
             elif not $s[right].isalnum():
                 right -= 1
             elif $s[left].lower() != $s[right].lower():
                 return False
             else:
                 left += 1
                 right -= 1
         return True
         """, """
         cleaned = "".join(filter(str.isalnum, $s)).lower()
         return cleaned == cleaned[::-1]
         """, """
         import re

         cleaned = re.sub(r"[^a-z0-9]", "", $s.lower())
         return cleaned == cleaned[::-1]
         """),
        ("Return True if $s reads the same backwards, ignoring case and non-alphanumeric characters.",
         "Check whether the text $s is a palindrome when only its letters and digits are compared, ignoring case.",
         "Decide if $s is a palindrome, skipping punctuation and spaces and ignoring case."),
        [("A man, a plan, a canal: Panama", True), ("race a car", False), ("", True), ("Noon", True),
         ("abca", False)],
        "str -> bool",
    ),
    family(
        "count_vowels", "string",
        "count_vowels vowel_count num_vowels vowels_in count_vowel_letters",
        "s text word sentence",
        ("""
         return sum(1 for ch in $s.lower() if ch in "aeiou")
         """, """
         count = 0
         for ch in $s:
             if ch in "aeiouAEIOU":
                 count += 1
         return count
         """, """
         return len([ch for ch in $s if ch.lower() in "aeiou"])
         """, """
         import re

         return len(re.findall(r"[aeiou]", $s, re.IGNORECASE))
         """),
        ("Return the number of vowels (a, e, i, o, u) in $s, ignoring case.",
         "Count how many characters of $s are vowels, upper or lower case.",
         "Compute the vowel count of the string $s."),
        [("hello", 2), ("", 0), ("AEIOU xyz", 5), ("rhythm", 0)],
        "str -> int",
    ),
    family(
        "capitalize_words", "string",
        "capitalize_words capitalise_words cap_words upper_first_letters",
        "s text sentence phrase",
        ("""
         return " ".join(w[:1].upper() + w[1:] for w in $s.split(" "))
         """, """
         result = []
         prev = " "
         for ch in $s:
             result.append(ch.upper() if prev == " " else ch)
             prev = ch
         return "".join(result)
         """, """
         import re

         return re.sub(r"(^| )(\\w)", lambda m: m.group(1) + m.group(2).upper(), $s)
         """),
        ("Return $s with the first letter of every word in upper case.",
         "Capitalize the first character of each space-separated word in $s, leaving the rest unchanged.",
         "Upper-case the initial letter of each word of $s."),
        [("hello world", "Hello World"), ("", ""), ("python is fun", "Python Is Fun"),
         ("keep UPPER case", "Keep UPPER Case")],
        "str -> str",
    ),
    family(
        "title_case", "string",
        "title_case to_title_case titlecase make_title",
        "s text title phrase",
        ("""
         return " ".join(word.capitalize() for word in $s.split())
         """, """
         words = []
         for word in $s.split():
             words.append(word[0].upper() + word[1:].lower())
         return " ".join(words)
         """, """
         return " ".join(w[:1].upper() + w[1:].lower() for w in $s.split())
         """),
        ("Convert $s to title case, with single spaces between the words.",
         "Capitalize each word of $s and lower-case its other letters.",
         "Return $s with every word starting in upper case and continuing in lower case."),
        [("hello wORLD", "Hello World"), ("  the  end ", "The End"), ("a", "A"), ("", "")],
        "str -> str",
    ),
    family(
        "word_count", "string",
        "word_count count_words num_words words_in number_of_words",
        "s text sentence line",
        ("""
         return len($s.split())
         """, """
         count = 0
         in_word = False
         for ch in $s:
             if ch.isspace():
                 in_word = False
             elif not in_word:
                 in_word = True
                 count += 1
         return count
         """, """
         import re

         return len(re.findall(r"\\S+", $s))
         """),
        ("Return the number of whitespace-separated words in $s.",
         "Count the words in the string $s.",
         "Compute how many words the text $s contains, splitting on runs of whitespace."),
        [("hello world", 2), ("", 0), ("  many   spaces here ", 3), ("one", 1)],
        "str -> int",
    ),
    family(
        "is_anagram", "string",
        "is_anagram are_anagrams check_anagram is_anagram_of anagrams",
        "a,b s1,s2 first,second word1,word2 s,t",
        ("""
         return sorted($a) == sorted($b)
         """, """
         from collections import Counter

         return Counter($a) == Counter($b)
         """, """
         if len($a) != len($b):
             return False
         counts = {}
         for ch in $a:
             counts[ch] = counts.get(ch, 0) + 1
         for ch in $b:
             if counts.get(ch, 0) == 0:
                 return False
             counts[ch] -= 1
         return True
         """),
        ("Return True if $a and $b contain the same characters with the same counts.",
         "Check whether the string $b is a rearrangement of the characters of $a.",
         "Decide if $a and $b are anagrams of each other."),
        [("listen", "silent", True), ("abc", "abd", False), ("", "", True), ("aab", "abb", False),
         ("ab", "abc", False)],
        "str, str -> bool",
    ),
    family(
        "caesar_cipher", "string",
        "caesar_cipher caesar_encrypt caesar shift_letters rot_cipher",
        "text,shift s,k message,key plain,n",
        ("""
         result = []
         for ch in $text:
             if ch.isascii() and ch.isalpha():
                 base = ord("A") if ch.isupper() else ord("a")
                 result.append(chr((ord(ch) - base + $shift) % 26 + base))
             else:
                 result.append(ch)
         return "".join(result)
         """, """
         import string

         lower, upper = string.ascii_lowercase, string.ascii_uppercase
         offset = $shift % 26
         shifted = lower[offset:] + lower[:offset] + upper[offset:] + upper[:offset]
         return $text.translate(str.maketrans(lower + upper, shifted))
         """, """
         def rotate(ch):
             if "a" <= ch <= "z":
                 return chr((ord(ch) - ord("a") + $shift) % 26 + ord("a"))
             if "A" <= ch <= "Z":
                 return chr((ord(ch) - ord("A") + $shift) % 26 + ord("A"))
             return ch

         return "".join(rotate(ch) for ch in $text)
         """),
        ("Shift every letter of $text by $shift places in the alphabet, keeping case and other characters.",
         "Encrypt the ASCII text $text with a Caesar cipher that moves each letter $shift places.",
         "Return $text with each letter rotated $shift positions, wrapping from z back to a."),
        [("abc", 1, "bcd"), ("Hello, World!", 3, "Khoor, Zruog!"), ("xyz", 3, "abc"), ("abc", -1, "zab"),
         ("café", 1, "dbgé")],
        "str, int -> str",
    ),
    family(
        "remove_whitespace", "string",
        "remove_whitespace strip_whitespace delete_whitespace without_whitespace",
        "s text value line",
        ("""
         return "".join($s.split())
         """, """
         return "".join(ch for ch in $s if not ch.isspace())
         """, """
         import re

         return re.sub(r"\\s+", "", $s)
         """),
        ("Return $s with every whitespace character removed.",
         "Delete all spaces, tabs and newlines from $s.",
         "Strip out the whitespace anywhere in the string $s."),
        [(" a b\tc \n", "abc"), ("hello world", "helloworld"), ("", ""), ("  x  y  ", "xy")],
        "str -> str",
    ),
    family(
        "char_frequency", "string",
        "char_frequency char_counts count_chars letter_frequency character_count",
        "s text word value",
        ("""
         counts = {}
         for ch in $s:
             counts[ch] = counts.get(ch, 0) + 1
         return counts
         """, """
         from collections import Counter

         return dict(Counter($s))
         """, """
         return {ch: $s.count(ch) for ch in $s}
         """),
        ("Return a dict mapping each character of $s to the number of times it occurs.",
         "Count how often every character appears in $s.",
         "Build a character histogram of the string $s."),
        [("hello", {"h": 1, "e": 1, "l": 2, "o": 1}), ("", {}), ("aaa", {"a": 3})],
        "str -> dict[str, int]",
    ),
    family(
        "longest_word", "string",
        "longest_word find_longest_word longest_in longest_token",
        "s text sentence line",
        ("""
         return max($s.split(), key=len, default="")
         """, """
         best = ""
         for word in $s.split():
             if len(word) > len(best):
                 best = word
         return best
         """, """
         words = sorted($s.split(), key=len, reverse=True)
         return words[0] if words else ""
         """),
        ("Return the longest whitespace-separated word of $s, the first one on a tie.",
         "Find the longest word in the sentence $s, or an empty string when it has no words.",
         "Pick the word of $s with the most characters."),
        [("the quick brown fox", "quick"), ("", ""), ("a bb cc", "bb"), ("one", "one")],
        "str -> str",
    ),
    family(
        "is_pangram", "string",
        "is_pangram pangram has_all_letters uses_every_letter",
        "s text sentence phrase",
        ("""
         return set("abcdefghijklmnopqrstuvwxyz") <= set($s.lower())
         """, """
         import string

         return all(ch in $s.lower() for ch in string.ascii_lowercase)
         """, """
         letters = {ch for ch in $s.lower() if "a" <= ch <= "z"}
         return len(letters) == 26
         """),
        ("Return True if $s contains every letter of the English alphabet, ignoring case.",
         "Check whether $s is a pangram, a text using each letter from a to z.",
         "Decide if each of the 26 letters from a to z appears somewhere in $s."),
        [("The quick brown fox jumps over the lazy dog", True), ("Hello world", False), ("", False)],
        "str -> bool",
    ),
    family(
        "snake_to_camel", "string",
        "snake_to_camel to_camel_case snake_case_to_camel_case camelize",
        "name s identifier text",
        ("""
         first, *rest = $name.split("_")
         return first + "".join(word.capitalize() for word in rest)
         """, """
         parts = $name.split("_")
         return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])
         """, """
         result = []
         upper_next = False
         for ch in $name:
             if ch == "_":
                 upper_next = True
             else:
                 result.append(ch.upper() if upper_next else ch)
                 upper_next = False
         return "".join(result)
         """, """
         import re

         return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), $name)
         """),
        ("Convert the snake_case identifier $name to camelCase.",
         "Return $name with its underscores removed and each word after the first capitalized.",
         "Rewrite $name from snake_case to lower camelCase."),
        [("hello_world", "helloWorld"), ("snake_case_name", "snakeCaseName"), ("single", "single")],
        "str -> str",
    ),
    family(
        "camel_to_snake", "string",
        "camel_to_snake to_snake_case camel_case_to_snake_case snakify decamelize",
        "name s identifier text",
        ("""
         result = []
         for ch in $name:
             if ch.isupper():
                 if result:
                     result.append("_")
                 result.append(ch.lower())
             else:
                 result.append(ch)
         return "".join(result)
         """, """
         import re

         return re.sub(r"(?<!^)([A-Z])", r"_\\1", $name).lower()
         """, """
         return "".join("_" + ch.lower() if ch.isupper() and i else ch.lower()
                        for i, ch in enumerate($name))
         """),
        ("Convert the camelCase identifier $name to snake_case.",
         "Return $name with an underscore before each capital letter but the first, all in lower case.",
         "Rewrite $name from camelCase or PascalCase to snake_case."),
        [("helloWorld", "hello_world"), ("CamelCaseName", "camel_case_name"), ("simple", "simple")],
        "str -> str",
    ),
    family(
        "run_length_encode", "string",
        "run_length_encode rle_encode rle compress_runs encode_runs",
        "s text data raw",
        ("""
         if not $s:
             return ""
         result = []
         current, count = $s[0], 1
         for ch in $s[1:]:
             if ch == current:
                 count += 1
             else:
                 result.append(f"{current}{count}")
                 current, count = ch, 1
         result.append(f"{current}{count}")
         return "".join(result)
         """, """
         from itertools import groupby

         return "".join(f"{ch}{len(list(group))}" for ch, group in groupby($s))
         """, """
         out = ""
         i = 0
         while i < len($s):
             j = i
             while j < len($s) and $s[j] == $s[i]:
                 j += 1
             out += $s[i] + str(j - i)
             i = j
         return out
         """),
        ("Compress $s with run-length encoding, writing each character followed by its repeat count.",
         "Return the run-length encoding of $s, so that aaab becomes a3b1.",
         "Encode runs of repeated characters in $s as character-count pairs."),
        [("aaabbc", "a3b2c1"), ("", ""), ("abcd", "a1b1c1d1"), ("zzzzzzzzzzzz", "z12")],
        "str -> str",
    ),
    family(
        "run_length_decode", "string",
        "run_length_decode rle_decode decode_runs expand_runs decompress_runs",
        "encoded s text code",
        ("""
         import re

         return "".join(ch * int(n) for ch, n in re.findall(r"(\\D)(\\d+)", $encoded))
         """, """
         result = []
         char, digits = "", ""
         for ch in $encoded:
             if ch.isdigit():
                 digits += ch
             else:
                 if char:
                     result.append(char * int(digits))
                 char, digits = ch, ""
         if char:
             result.append(char * int(digits))
         return "".join(result)
         """),
        ("Expand the run-length encoded string $encoded, where each character is followed by its count.",
         "Decode $encoded, turning each pair such as a3 into aaa.",
         "Rebuild the original text from its run-length encoding $encoded."),
        [("a3b2c1", "aaabbc"), ("", ""), ("z12", "zzzzzzzzzzzz"), ("x1y2", "xyy")],
        "str -> str",
    ),
    family(
        "count_substring", "string",
        "count_substring count_overlapping substring_count occurrences_in count_matches",
        "text,sub s,pattern haystack,needle text,word",
        ("""
         size = len($sub)
         return sum(1 for i in range(len($text) - size + 1) if $text[i:i + size] == $sub)
         """, """
         count = 0
         start = $text.find($sub)
         while start != -1:
             count += 1
             start = $text.find($sub, start + 1)
         return count
         """, """
         return sum($text.startswith($sub, i) for i in range(len($text)))
         """),
        ("Return how many times $sub occurs in $text, counting overlapping matches.",
         "Count the possibly overlapping occurrences of the non-empty string $sub inside $text.",
         "Find the number of positions in $text where $sub starts."),
        [("banana", "ana", 2), ("aaaa", "aa", 3), ("abc", "d", 0), ("hello", "l", 2)],
        "str, str -> int",
    ),
    family(
        "first_non_repeated", "string",
        "first_non_repeated first_unique_char first_non_repeating_character first_single_char",
        "s text word value",
        ("""
         from collections import Counter

         counts = Counter($s)
         for ch in $s:
             if counts[ch] == 1:
                 return ch
         return None
         """, """
         counts = {}
         for ch in $s:
             counts[ch] = counts.get(ch, 0) + 1
         for ch in $s:
             if counts[ch] == 1:
                 return ch
         return None
         """, """
         return next((ch for ch in $s if $s.count(ch) == 1), None)
         """),
        ("Return the first character of $s that occurs exactly once, or None if every character repeats.",
         "Find the earliest character of $s that is not repeated anywhere in it.",
         "Return the first character that appears only once in $s, or None when there is no such character."),
        [("swiss", "w"), ("aabb", None), ("", None), ("abcab", "c")],
        "str -> str | None",
    ),
    family(
        "longest_common_prefix", "string",
        "longest_common_prefix common_prefix lcp shared_prefix",
        "strs words strings items",
        ("""
         if not $strs:
             return ""
         prefix = $strs[0]
         for word in $strs[1:]:
             while not word.startswith(prefix):
                 prefix = prefix[:-1]
         return prefix
         """, """
         prefix = []
         for chars in zip(*$strs):
             if len(set(chars)) != 1:
                 break
             prefix.append(chars[0])
         return "".join(prefix)
         """, """
         import os

         return os.path.commonprefix($strs)
         """, """
         if not $strs:
             return ""
         low, high = min($strs), max($strs)
         for i, ch in enumerate(low):
             if ch != high[i]:
                 return low[:i]
         return low
         """),
        ("Return the longest string that is a prefix of every string in $strs.",
         "Find the common starting part shared by all the words in $strs.",
         "Compute the longest common prefix of the list of strings $strs, or an empty string."),
        [(["flower", "flow", "flight"], "fl"), (["dog", "racecar", "car"], ""), ([], ""),
         (["same", "same"], "same"), (["ab", "a"], "a")],
        "list[str] -> str",
    ),
    family(
        "acronym", "string",
        "acronym make_acronym initials abbreviate to_acronym",
        "phrase s text name",
        ("""
         return "".join(word[0].upper() for word in $phrase.split())
         """, """
         letters = []
         for word in $phrase.split():
             letters.append(word[0])
         return "".join(letters).upper()
         """, """
         return "".join(w[:1] for w in $phrase.split()).upper()
         """),
        ("Return the acronym of $phrase, made of the upper-cased first letter of each word.",
         "Build an acronym from the initials of the words in $phrase.",
         "Abbreviate $phrase to the capitalized first letters of its words."),
        [("portable network graphics", "PNG"), ("As Soon As Possible", "ASAP"), ("", "")],
        "str -> str",
    ),
    family(
        "valid_parentheses", "string",
        "valid_parentheses is_balanced balanced_brackets is_valid_brackets check_brackets",
        "s text expr brackets",
        ("""
         pairs = {")": "(", "]": "[", "}": "{"}
         stack = []
         for ch in $s:
             if ch in "([{":
                 stack.append(ch)
             elif ch in pairs:
                 if not stack or stack.pop() != pairs[ch]:
                     return False
         return not stack
         """, """
         previous = None
         while $s != previous:
             previous = $s
             $s = $s.replace("()", "").replace("[]", "").replace("{}", "")
         return not $s
         """, """
         opening, closing = "([{", ")]}"
         stack = []
         for ch in $s:
             if ch in opening:
                 stack.append(ch)
             elif not stack or opening.index(stack.pop()) != closing.index(ch):
                 return False
         return not stack
         """),
        ("Return True if the brackets in $s, a string of ()[]{} characters, are balanced and properly nested.",
         "Check whether every bracket in the bracket string $s is closed in the right order.",
         "Decide if the bracket string $s is valid: each opener has a matching closer of the same kind."),
        [("()[]{}", True), ("([)]", False), ("", True), ("((", False), ("{[()]}", True), (")(", False)],
        "str -> bool",
    ),
)


# ------------------------------------------------------------------------------------------------ dicts, matrices, misc
ROMAN_VALUES = '{"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}'
ROMAN_TABLE = ('[(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),\n'
               '                  (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]')
MISC = (
    family(
        "invert_dict", "dict",
        "invert_dict invert swap_keys_values reverse_dict inverse_mapping",
        "d mapping table dictionary",
        ("""
         return {v: k for k, v in $d.items()}
         """, """
         result = {}
         for key, value in $d.items():
             result[value] = key
         return result
         """, """
         return dict(zip($d.values(), $d.keys()))
         """),
        ("Return a new dict with the keys and values of $d swapped.",
         "Invert the mapping $d so that each value points back to its key.",
         "Swap the keys and values of $d; when values repeat, the last key wins."),
        [({"a": 1, "b": 2}, {1: "a", 2: "b"}), ({}, {}), ({"x": 1, "y": 1}, {1: "y"})],
        "dict -> dict",
    ),
    family(
        "merge_dicts", "dict",
        "merge_dicts combine_dicts merged_dict dict_union merge_mappings",
        "a,b first,second base,override d1,d2 left,right",
        ("""
         return {**$a, **$b}
         """, """
         result = dict($a)
         result.update($b)
         return result
         """, """
         return $a | $b
         """, """
         result = {}
         for source in ($a, $b):
             for key, value in source.items():
                 result[key] = value
         return result
         """),
        ("Return a new dict with the entries of $a and $b; values from $b win on shared keys.",
         "Merge the dictionaries $a and $b without modifying either.",
         "Combine $a and $b into one dict, letting $b override $a."),
        [({"x": 1}, {"y": 2}, {"x": 1, "y": 2}), ({"x": 1}, {"x": 3}, {"x": 3}), ({}, {}, {})],
        "dict, dict -> dict",
    ),
    family(
        "group_by", "dict",
        "group_by groupby_key group_items bucket_by partition_by",
        "items,key xs,fn values,func seq,keyfunc",
        ("""
         groups = {}
         for x in $items:
             groups.setdefault($key(x), []).append(x)
         return groups
         """, """
         from collections import defaultdict

         groups = defaultdict(list)
         for x in $items:
             groups[$key(x)].append(x)
         return dict(groups)
         """, """
         groups = {}
         for x in $items:
             k = $key(x)
             if k not in groups:
                 groups[k] = []
             groups[k].append(x)
         return groups
         """),
        ("Group the elements of $items into a dict of lists keyed by $key(item).",
         "Return a dict mapping each result of $key to the elements of $items that produce it, in order.",
         "Bucket $items by the result of calling $key on each one, keeping their order."),
        [(["ab", "c", "de"], len, {2: ["ab", "de"], 1: ["c"]}), ([], len, {}),
         ([-1, 1, 2], abs, {1: [-1, 1], 2: [2]}), (["A", "a", "b"], str.lower, {"a": ["A", "a"], "b": ["b"]})],
    ),
    family(
        "fizzbuzz", "misc",
        "fizzbuzz fizz_buzz fizzbuzz_list play_fizzbuzz",
        "n limit count last",
        ("""
         result = []
         for i in range(1, $n + 1):
             if i % 15 == 0:
                 result.append("FizzBuzz")
             elif i % 3 == 0:
                 result.append("Fizz")
             elif i % 5 == 0:
                 result.append("Buzz")
             else:
                 result.append(str(i))
         return result
         """, """
         return ["Fizz" * (i % 3 == 0) + "Buzz" * (i % 5 == 0) or str(i) for i in range(1, $n + 1)]
         """, """
         result = []
         for i in range(1, $n + 1):
             word = ""
             if i % 3 == 0:
                 word += "Fizz"
             if i % 5 == 0:
                 word += "Buzz"
             result.append(word or str(i))
         return result
         """),
        ("Return the FizzBuzz sequence from 1 to $n as a list of strings.",
         "Build a list for the numbers 1 to $n, with Fizz for multiples of 3, Buzz for multiples of 5 and "
         "FizzBuzz for multiples of both.",
         "Play FizzBuzz up to $n and return the words in order."),
        [(5, ["1", "2", "Fizz", "4", "Buzz"]), (0, []),
         (15, ["1", "2", "Fizz", "4", "Buzz", "Fizz", "7", "8", "Fizz", "Buzz", "11", "Fizz", "13", "14",
               "FizzBuzz"])],
        "int -> list[str]",
    ),
    family(
        "transpose", "matrix",
        "transpose transpose_matrix matrix_transpose transposed",
        "matrix rows grid m",
        ("""
         return [list(row) for row in zip(*$matrix)]
         """, """
         return [[$matrix[r][c] for r in range(len($matrix))] for c in range(len($matrix[0]))]
         """, """
         result = []
         for c in range(len($matrix[0])):
             column = []
             for row in $matrix:
                 column.append(row[c])
             result.append(column)
         return result
         """),
        ("Return the transpose of $matrix, given as a non-empty list of equal-length rows.",
         "Swap the rows and columns of the matrix $matrix.",
         "Turn each column of $matrix into a row of the result."),
        [([[1, 2, 3], [4, 5, 6]], [[1, 4], [2, 5], [3, 6]]), ([[1]], [[1]]), ([[1, 2]], [[1], [2]])],
        "list[list[int]] -> list[list[int]]",
    ),
    family(
        "matrix_add", "matrix",
        "matrix_add add_matrices matrix_sum sum_matrices elementwise_add",
        "a,b m1,m2 left,right first,second x,y",
        ("""
         return [[p + q for p, q in zip(row_a, row_b)] for row_a, row_b in zip($a, $b)]
         """, """
         result = []
         for i in range(len($a)):
             result.append([$a[i][j] + $b[i][j] for j in range(len($a[i]))])
         return result
         """, """
         import operator

         return [list(map(operator.add, row_a, row_b)) for row_a, row_b in zip($a, $b)]
         """),
        ("Return the element-wise sum of the matrices $a and $b, which have the same shape.",
         "Add the two equally sized matrices $a and $b.",
         "Compute $a + $b for matrices given as lists of rows."),
        [([[1, 2], [3, 4]], [[5, 6], [7, 8]], [[6, 8], [10, 12]]), ([[0]], [[1]], [[1]]), ([], [], [])],
        "list[list[int]], list[list[int]] -> list[list[int]]",
    ),
    family(
        "matrix_multiply", "matrix",
        "matrix_multiply mat_mul multiply_matrices matmul matrix_product",
        "a,b m1,m2 left,right x,y",
        ("""
         cols = list(zip(*$b))
         return [[sum(p * q for p, q in zip(row, col)) for col in cols] for row in $a]
         """, """
         n, m, k = len($a), len($b), len($b[0])
         result = [[0] * k for _ in range(n)]
         for i in range(n):
             for j in range(k):
                 for t in range(m):
                     result[i][j] += $a[i][t] * $b[t][j]
         return result
         """, """
         result = []
         for row in $a:
             new_row = []
             for j in range(len($b[0])):
                 new_row.append(sum(row[t] * $b[t][j] for t in range(len(row))))
             result.append(new_row)
         return result
         """),
        ("Return the matrix product of $a and $b, where the column count of $a equals the row count of $b.",
         "Multiply the matrices $a and $b, given as lists of rows.",
         "Compute the product $a times $b of two compatible matrices."),
        [([[1, 2], [3, 4]], [[5, 6], [7, 8]], [[19, 22], [43, 50]]), ([[1, 2, 3]], [[1], [2], [3]], [[14]]),
         ([[2]], [[3]], [[6]])],
        "list[list[int]], list[list[int]] -> list[list[int]]",
    ),
    family(
        "identity_matrix", "matrix",
        "identity_matrix identity eye unit_matrix make_identity",
        "n size dim k",
        ("""
         return [[1 if i == j else 0 for j in range($n)] for i in range($n)]
         """, """
         result = []
         for i in range($n):
             row = [0] * $n
             row[i] = 1
             result.append(row)
         return result
         """, """
         return [[int(i == j) for j in range($n)] for i in range($n)]
         """),
        ("Return the $n by $n identity matrix as a list of lists.",
         "Build a square matrix of size $n with ones on the diagonal and zeros elsewhere.",
         "Create the identity matrix of order $n."),
        [(0, []), (1, [[1]]), (3, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])],
        "int -> list[list[int]]",
    ),
    family(
        "deep_flatten", "list",
        "deep_flatten flatten_deep flatten_nested flatten_all fully_flatten",
        "nested items data lst",
        ("""
         result = []
         for item in $nested:
             if isinstance(item, list):
                 result.extend($FN(item))
             else:
                 result.append(item)
         return result
         """, """
         result = []
         stack = [iter($nested)]
         while stack:
             for item in stack[-1]:
                 if isinstance(item, list):
                     stack.append(iter(item))
                     break
                 result.append(item)
             else:
                 stack.pop()
         return result
         """, """
         def walk(value):
             if isinstance(value, list):
                 for inner in value:
                     yield from walk(inner)
             else:
                 yield value

         return list(walk($nested))
         """),
        ("Flatten the arbitrarily nested list $nested into a flat list of its non-list items.",
         "Return every non-list element of $nested, however deeply it is nested, in order.",
         "Recursively flatten the nested lists in $nested."),
        [([1, [2, [3, [4]]], 5], [1, 2, 3, 4, 5]), ([], []), ([[[]]], []), (["a", ["b"]], ["a", "b"])],
        "list -> list",
    ),
    family(
        "gcd_of_list", "math",
        "gcd_of_list list_gcd gcd_all gcd_many",
        "numbers nums values ints",
        ("""
         import math
         from functools import reduce

         return reduce(math.gcd, $numbers)
         """, """
         import math

         return math.gcd(*$numbers)
         """, """
         result = 0
         for x in $numbers:
             while x:
                 result, x = x, result % x
         return result
         """),
        ("Return the greatest common divisor of all the integers in $numbers.",
         "Compute the GCD of the non-empty list of non-negative integers $numbers.",
         "Find the largest integer that divides every number in $numbers."),
        [([12, 18, 24], 6), ([7], 7), ([0, 5], 5), ([8, 12, 20], 4)],
        "list[int] -> int",
    ),
    family(
        "hamming_distance", "string",
        "hamming_distance hamming count_mismatches positions_differ",
        "a,b s1,s2 first,second x,y left,right",
        ("""
         return sum(c1 != c2 for c1, c2 in zip($a, $b))
         """, """
         count = 0
         for i in range(len($a)):
             if $a[i] != $b[i]:
                 count += 1
         return count
         """, """
         return len([i for i in range(len($a)) if $a[i] != $b[i]])
         """),
        ("Return the number of positions at which the equal-length sequences $a and $b differ.",
         "Compute the Hamming distance between $a and $b.",
         "Count the indices where $a and $b, two sequences of the same length, hold different items."),
        [("karolin", "kathrin", 3), ("", "", 0), ("abc", "abc", 0), ([1, 0, 1], [0, 0, 1], 1)],
    ),
    family(
        "manhattan_distance", "geometry",
        "manhattan_distance manhattan taxicab_distance l1_distance city_block_distance",
        "p,q a,b point1,point2 u,v",
        ("""
         return sum(abs(x - y) for x, y in zip($p, $q))
         """, """
         total = 0
         for i in range(len($p)):
             total += abs($p[i] - $q[i])
         return total
         """, """
         return sum(map(lambda x, y: abs(x - y), $p, $q))
         """),
        ("Return the Manhattan distance between the points $p and $q.",
         "Sum the absolute coordinate differences of the points $p and $q.",
         "Compute the taxicab distance from $p to $q, two points of the same dimension."),
        [((0, 0), (3, 4), 7), ((1, 2, 3), (1, 2, 3), 0), ((-1, 5), (2, 1), 7)],
        "tuple, tuple -> float",
    ),
    family(
        "euclidean_distance", "geometry",
        "euclidean_distance distance euclidean l2_distance straight_line_distance",
        "p,q a,b point1,point2 u,v",
        ("""
         import math

         return math.dist($p, $q)
         """, """
         import math

         return math.sqrt(sum((x - y) ** 2 for x, y in zip($p, $q)))
         """, """
         return sum((x - y) ** 2 for x, y in zip($p, $q)) ** 0.5
         """, """
         import math

         return math.hypot(*(x - y for x, y in zip($p, $q)))
         """),
        ("Return the Euclidean distance between the points $p and $q.",
         "Compute the straight-line distance from $p to $q, two points of the same dimension.",
         "Measure the length of the segment joining the points $p and $q."),
        [((0, 0), (3, 4), 5.0), ((1, 1), (4, 5), 5.0), ((0, 0, 0), (2, 3, 6), 7.0), ((2, 2), (2, 2), 0.0)],
        "tuple, tuple -> float",
    ),
    family(
        "roman_to_int", "conversion",
        "roman_to_int from_roman parse_roman roman_to_integer roman_value",
        "s roman numeral text",
        (f"""
         values = {ROMAN_VALUES}
         total = 0
         for i, ch in enumerate($s):
             if i + 1 < len($s) and values[ch] < values[$s[i + 1]]:
                 total -= values[ch]
             else:
                 total += values[ch]
         return total
         """, f"""
         values = {ROMAN_VALUES}
         total = prev = 0
         for ch in reversed($s):
             value = values[ch]
             total += value if value >= prev else -value
             prev = value
         return total
         """, f"""
         subtractive = {{"IV": "IIII", "IX": "VIIII", "XL": "XXXX",
                        "XC": "LXXXX", "CD": "CCCC", "CM": "DCCCC"}}
         for pair, spelled in subtractive.items():
             $s = $s.replace(pair, spelled)
         values = {ROMAN_VALUES}
         return sum(values[ch] for ch in $s)
         """),
        ("Convert the Roman numeral $s to an integer.",
         "Return the value of the Roman numeral string $s, handling subtractive pairs such as IV and CM.",
         "Parse $s, written in Roman numerals, into an int."),
        [("III", 3), ("IV", 4), ("LVIII", 58), ("MCMXCIV", 1994), ("MMXXIV", 2024)],
        "str -> int",
    ),
    family(
        "int_to_roman", "conversion",
        "int_to_roman to_roman roman_numeral integer_to_roman as_roman",
        "n num number",
        (f"""
         table = {ROMAN_TABLE}
         result = []
         for value, symbol in table:
             while $n >= value:
                 result.append(symbol)
                 $n -= value
         return "".join(result)
         """, f"""
         table = {ROMAN_TABLE}
         out = ""
         for value, symbol in table:
             count, $n = divmod($n, value)
             out += symbol * count
         return out
         """, """
         thousands = ["", "M", "MM", "MMM"]
         hundreds = ["", "C", "CC", "CCC", "CD", "D", "DC", "DCC", "DCCC", "CM"]
         tens = ["", "X", "XX", "XXX", "XL", "L", "LX", "LXX", "LXXX", "XC"]
         ones = ["", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"]
         return (thousands[$n // 1000] + hundreds[$n // 100 % 10]
                 + tens[$n // 10 % 10] + ones[$n % 10])
         """),
        ("Convert the integer $n, from 1 to 3999, to a Roman numeral.",
         "Return the Roman numeral for $n, using subtractive pairs such as IV and CM.",
         "Write the positive integer $n in Roman numerals."),
        [(3, "III"), (4, "IV"), (58, "LVIII"), (1994, "MCMXCIV"), (3999, "MMMCMXCIX")],
        "int -> str",
    ),
    family(
        "days_in_month", "date",
        "days_in_month month_length days_of_month month_days num_days_in_month",
        "year,month y,m yr,mon",
        ("""
         import calendar

         return calendar.monthrange($year, $month)[1]
         """, """
         if $month == 2:
             leap = $year % 4 == 0 and ($year % 100 != 0 or $year % 400 == 0)
             return 29 if leap else 28
         return 30 if $month in (4, 6, 9, 11) else 31
         """, """
         days = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
         if $month == 2 and ($year % 4 == 0 and $year % 100 != 0 or $year % 400 == 0):
             return 29
         return days[$month - 1]
         """),
        ("Return the number of days in month $month (1 to 12) of the year $year.",
         "Count the days of the given $month in $year, taking leap years into account.",
         "Return how long month $month of $year is, in days."),
        [(2024, 2, 29), (2023, 2, 28), (1900, 2, 28), (2000, 2, 29), (2023, 4, 30), (2023, 12, 31)],
        "int, int -> int",
    ),
    family(
        "compound_interest", "finance",
        "compound_interest future_value grow_investment final_balance",
        "principal,rate,years amount,r,n p,rate,t balance,interest,periods",
        ("""
         return round($principal * (1 + $rate) ** $years, 2)
         """, """
         for _ in range($years):
             $principal *= 1 + $rate
         return round($principal, 2)
         """, """
         balance_now = $principal
         for _ in range($years):
             balance_now += balance_now * $rate
         return round(balance_now, 2)
         """),
        ("Return the balance after $years years of yearly compounding of $principal at the rate $rate, "
         "rounded to cents.",
         "Compute what $principal grows to in $years years at interest rate $rate compounded once a year.",
         "Apply the annual interest rate $rate to $principal for $years years and round the result to 2 places."),
        [(1000, 0.05, 2, 1102.5), (500, 0.1, 3, 665.5), (200, 0.5, 1, 300.0)],
        "float, float, int -> float",
    ),
)

FAMILIES: tuple[Family, ...] = MATH + LISTS + STRINGS + MISC
# Never emitted by exercise_files() (measures generalisation to unseen tasks); not the README's fibonacci example
# nor factorial / is_prime / gcd, which the model should learn.
HELDOUT_FAMILIES = ("roman_to_int", "run_length_encode", "moving_average", "hamming_distance", "is_armstrong",
                    "collatz_steps", "longest_common_prefix", "max_subarray_sum", "digital_root",
                    "valid_parentheses")
_FAMILY_OF = {name: f.key for f in FAMILIES for name in f.names}

MODULE_DOCS = (
    "Small {topics} helpers.",
    "Assorted {topics} utilities.",
    "A few self-contained {topics} functions.",
    "Utility functions for {topics} work.",
    "Helpers for everyday {topics} tasks.",
)
TOPIC_ORDER = ("math", "statistics", "conversion", "date", "finance", "geometry", "list", "sorting", "searching",
               "string", "dict", "matrix", "misc")


class Function(NamedTuple):
    """A generated function: its name, family key, topic, the choices it was rendered from, and its source."""
    name: str
    family: str
    topic: str
    combo: Combo
    source: str


def family_of(name: str) -> str | None:
    """The key of the family that has the function name `name`, or None (names are unique across families)."""
    return _FAMILY_OF.get(name)


def _chosen_families(heldout: bool) -> list[Family]:
    return [f for f in FAMILIES if (f.key in HELDOUT_FAMILIES) == heldout]


def exercise_functions(variants: int = 40, seed: int = 0, heldout: bool = False) -> list[Function]:
    """`variants` distinct functions of each family (all its combinations when it has fewer), in family order:
    the training families, or with heldout=True only the held-out ones."""
    rng = random.Random(seed)
    out = []
    for fam in _chosen_families(heldout):
        out += [Function(fam.names[c.name], fam.key, fam.topic, c, fam.render(c)) for c in fam.pick(variants, rng)]
    return out


def _group(functions: list[Function], rng: random.Random) -> list[list[Function]]:
    """Split `functions` (in their order) into files of MIN_FUNCS..MAX_FUNCS functions with no name twice in a
    file (a module defining `fib` twice reads as a mistake)."""
    files, pending = [], list(functions)
    while pending:
        left = len(pending)
        size = left if left <= MAX_FUNCS else rng.randint(MIN_FUNCS, min(MAX_FUNCS, left - MIN_FUNCS))
        group, names, rest = [], set(), []
        for f in pending:
            if len(group) < size and f.name not in names:
                group.append(f)
                names.add(f.name)
            else:
                rest.append(f)
        files.append(group)
        pending = rest
    # Only when the tail repeated a name: a short last file; its functions go to earlier files with room
    while len(files) > 1 and len(files[-1]) < MIN_FUNCS:
        for f in files.pop():
            home = next((g for g in files if len(g) < MAX_FUNCS and all(o.name != f.name for o in g)), files[-1])
            home.append(f)
    return files


def module_source(functions: list[Function], rng: random.Random) -> str:
    """A module: a one-line docstring naming its (at most three most frequent) topics, then the functions
    separated by two blank lines."""
    counts = {t: sum(f.topic == t for f in functions) for t in TOPIC_ORDER}
    topics = sorted((t for t in TOPIC_ORDER if counts[t]), key=lambda t: -counts[t])    # stable: ties by order
    if len(topics) > 3:
        topics = [*topics[:3], "other"]
    words = topics[0] if len(topics) == 1 else ", ".join(topics[:-1]) + " and " + topics[-1]
    doc = rng.choice(MODULE_DOCS).format(topics=words)
    return f'"""{doc[0].upper() + doc[1:]}"""\n\n\n' + "\n\n".join(f.source for f in functions)


def exercise_files(variants: int = 40, seed: int = 0, heldout: bool = False) -> list[tuple[str, str]]:
    """[(name, source)] of the generated modules (`exercises/mod_0001.py`, ...): `variants` distinct functions per
    family (all of a family's combinations when it has fewer), shuffled across families, 4-10 per file.
    Deterministic in `seed`. heldout=False: every family but HELDOUT_FAMILIES; heldout=True: only those."""
    rng = random.Random(seed)
    functions = exercise_functions(variants, seed, heldout)
    rng.shuffle(functions)
    return [(f"exercises/mod_{i:04d}.py", module_source(group, rng))
            for i, group in enumerate(_group(functions, rng), 1)]


def heldout_prompts(seed: int = 0, n: int = 20) -> list[str]:
    """`n` distinct bare-signature prompts (`def roman_to_int(s):`) of the held-out families, taking the families
    in turn so that every one is asked about (fewer when the families have fewer signatures)."""
    rng = random.Random(seed)
    queues = []
    for fam in _chosen_families(heldout=True):
        sigs = [_signature(name, params, None) for name in fam.names for params in fam.params]
        rng.shuffle(sigs)
        queues.append(sigs)
    prompts = []
    for sig in itertools.chain.from_iterable(itertools.zip_longest(*queues)):
        if sig is not None and len(prompts) < n:
            prompts.append(sig)
    return prompts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the synthetic exercise modules (small self-contained functions "
                                             "of many task families) under OUT_DIR/exercises/ and print counts.")
    ap.add_argument("out_dir", metavar="OUT_DIR")
    ap.add_argument("--variants", type=int, default=40, metavar="N",
                    help="distinct functions per task family (default 40; fewer when a family has fewer)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the draw and the shuffle (default 0)")
    ap.add_argument("--heldout", action="store_true",
                    help=f"write only the held-out families ({', '.join(HELDOUT_FAMILIES)}) instead of the others")
    args = ap.parse_args(argv)
    files = exercise_files(args.variants, args.seed, args.heldout)
    out = Path(args.out_dir)
    for name, source in files:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    n_funcs = sum(src.count("\ndef ") for _, src in files)
    print(f"families {len(_chosen_families(args.heldout))}  functions {n_funcs}  files {len(files)}  "
          f"characters {sum(len(src) for _, src in files)}  -> {out / 'exercises'}")


if __name__ == "__main__":
    main()
