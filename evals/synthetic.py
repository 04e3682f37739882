"""The embedded problem set: a generated family of small Python problems with executable tests.

Needs no download. Each problem is an instance of one of `TEMPLATES` (sums and counts with a condition,
filters, string transforms, small arithmetic rules, dictionary lookups; from one-liners to short loops)
with its own constants and function name, in HumanEval's form (`evals.problems`): the prompt is a
function signature and a docstring with one example call, the completion is the body, and the tests
define `check(candidate)` and end with `check(<entry point>)`, so `evals.harness.evaluate` scores them
through the execution service like HumanEval.

    synthetic_problems("train", 2000)    # for SFT and RL
    synthetic_problems("heldout", 100)   # for pass@k
    synthetic_problems("sft", 2000)      # train instances without the constants held back for RL ...
    synthetic_problems("rl", 1000)       # ... and those (a curriculum: RL meets constants SFT never showed)

Guarantees, for every instance:
  - its reference body passes its tests; a body returning None fails them (no expected value is None),
    and so does a constant one (the expected values are not all equal);
  - the tests tell it apart from every other instance of its template: for each other choice of the
    template's constants, some test expects a different result, so a body memorised from another
    instance (or with the constants off by one) fails;
  - train and heldout never share an instance: a template's constant choices are split between them by
    a hash (`HELDOUT_PERCENT` of them are held out), whatever the seed and sizes; the train split is the
    union of "sft" and "rl", which split its constant choices the same way (`RL_PERCENT` go to "rl");
  - the output is a function of (split, n, seed) alone, and a shorter list is a prefix of a longer one.

    python -m evals.synthetic --out_dir=artifacts/sft [--train=2000 --heldout=100 --seed=0]

writes (`write_embedded_sft_problems`, rewriting only what changed):

    synthetic_train.jsonl               SFT {"prompt", "completion"} records of the train problems
    synthetic_sft.jsonl                 ... of as many "sft" problems (no "rl" constants)
    synthetic_sft_imperfect.jsonl       ... the same, as an imperfect teacher writes them (the SFT default's)
    synthetic_validation.jsonl          ... of the held-out problems (for a held-out loss only)
    synthetic_train_problems.jsonl      HumanEval records (`evals.problems.load_problems` reads them)
    synthetic_heldout_problems.jsonl    ... of the held-out problems, for pass@k
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from evals import mutations
from evals.problems import HUMANEVAL_STOP, Problem

SPLITS = ("train", "heldout", "sft", "rl")  # train = sft + rl
DEFAULT_TRAIN = 2000
DEFAULT_HELDOUT = 100
DEFAULT_OUT_DIR = "artifacts/sft"
HELDOUT_PERCENT = 20  # of each template's constant choices
RL_PERCENT = 20  # ... of which these are held back from the "sft" split and given to "rl"
MIN_CASES = 4  # tests per problem, at least
MAX_CASES = 12  # ... and at most; an instance whose tests cannot reach the guarantees by then is redrawn
MAX_DRAWS = 200  # attempts at a new instance of one template before it counts as exhausted for the split
TASK_PREFIX = "synthetic"
# Of an imperfect teacher's completions, the share drawn for one plausible bug (`imperfect_completions`).
TEACHER_ERROR_PERCENT = 30


@dataclasses.dataclass(frozen=True)
class Template:
    """One problem family. `doc` and `body` are `str.format` patterns over the constants (`{k}`, `{c!r}`);
    `solve(c, *args)` computes the expected result of a call for constants `c`; `draw(rng, c)` returns the
    arguments of one test call (a tuple), biased towards inputs that tell constants apart."""

    name: str
    level: str  # "easy": a one-line expression or call; "medium": one line with a condition, comprehension or two steps; "hard": a loop
    functions: tuple[str, ...]  # names the function may get
    signature: str  # parameters and return annotation: "(numbers: list[int]) -> int"
    doc: str
    body: str
    consts: dict[str, tuple[Any, ...]]
    solve: Callable[..., Any]
    draw: Callable[[random.Random, dict[str, Any]], tuple[Any, ...]]

    def choices(self) -> list[dict[str, Any]]:
        """Every assignment of the constants, in a fixed order."""
        names = sorted(self.consts)
        return [dict(zip(names, values)) for values in itertools.product(*(self.consts[n] for n in names))]


# ---------------------------------------------------------------------------------------------------
# Input helpers: small values so the tests stay readable.

WORDS = ("a", "an", "ox", "cat", "dog", "sun", "tree", "bird", "moon", "kite", "apple", "river", "stone", "garden",
         "planet", "orange", "elephant", "mountain", "ant", "bee", "owl", "ice", "echo", "umbrella", "pear", "sky",
         "rain", "code", "data", "table", "chair", "light", "diamond", "morning", "butterfly", "yo")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _ints(rng: random.Random, lo: int, hi: int, min_len: int = 0, max_len: int = 8) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(min_len, max_len))]


def _text(rng: random.Random, letters: str = LETTERS, min_len: int = 0, max_len: int = 10,
          extra: str = "", extra_max: int = 3) -> str:
    """Random letters, plus up to `extra_max` copies of `extra` at random places."""
    chars = [rng.choice(letters) for _ in range(rng.randint(min_len, max_len))]
    for _ in range(rng.randint(0, extra_max) if extra else 0):
        chars.insert(rng.randint(0, len(chars)), extra)
    return "".join(chars)


def _words(rng: random.Random, min_len: int = 0, max_len: int = 7) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(min_len, max_len))]


def _sentence(rng: random.Random, min_len: int = 0, max_len: int = 7) -> str:
    return " ".join(_words(rng, min_len, max_len))


def _counts(rng: random.Random, lo: int = 0, hi: int = 25, near: int | None = None) -> dict[str, int]:
    """A small word -> count dictionary; with `near`, one value is `near` give or take one."""
    keys = rng.sample(WORDS, rng.randint(0, 6))
    counts = {key: rng.randint(lo, hi) for key in keys}
    if near is not None and counts:
        counts[keys[0]] = near + rng.randint(-1, 1)
    return counts


def _near(rng: random.Random, value: int, spread: int, lo: int, hi: int) -> int:
    """`value` give or take one half of the time (to probe a threshold), else uniform in [lo, hi]."""
    return value + rng.randint(-1, 1) if rng.random() < 0.5 else rng.randint(lo, hi + spread)


def _caesar(text: str, k: int) -> str:
    return "".join(chr((ord(ch) - 97 + k) % 26 + 97) if "a" <= ch <= "z" else ch for ch in text)


def _first(numbers: list[int], predicate: Callable[[int], bool], default: int) -> int:
    return next((x for x in numbers if predicate(x)), default)


def _times_divisible(n: int, k: int) -> int:
    count = 0
    while n % k == 0:
        n //= k
        count += 1
    return count


def _running(numbers: list[int], start: int) -> list[int]:
    return list(itertools.accumulate(numbers, initial=start))[1:]


def _word_counts(words: list[str], k: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for word in words:
        if len(word) >= k:
            counts[word] = counts.get(word, 0) + 1
    return counts


def _group_initial(words: list[str], k: int) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for word in words:
        if len(word) > k:
            groups.setdefault(word[0], []).append(word)
    return groups


def _fizz(n: int, c: dict[str, Any]) -> str:
    if n % c["a"] == 0 and n % c["b"] == 0:
        return c["w1"] + c["w2"]
    if n % c["a"] == 0:
        return c["w1"]
    if n % c["b"] == 0:
        return c["w2"]
    return str(n)


def _shuffled(rng: random.Random, items: list[Any]) -> list[Any]:
    rng.shuffle(items)
    return items


def _steps(rng: random.Random, k: int) -> list[int]:
    """A walk whose steps are often exactly `k`."""
    values = [rng.randint(0, 20)]
    for _ in range(rng.randint(1, 8)):
        values.append(values[-1] + (k if rng.random() < 0.4 else rng.randint(-3, 10)))
    return values


def _lookup_args(rng: random.Random) -> tuple[dict[str, int], str]:
    counts = _counts(rng)
    if counts and rng.random() < 0.5:
        return counts, rng.choice(sorted(counts))
    return counts, rng.choice([w for w in WORDS if w not in counts])


def _r(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b + 1))


# ---------------------------------------------------------------------------------------------------
# The templates. Parameter names are fixed per template, so the body of one instance runs in another.

INT = "(x: int) -> int"
NUMS_INT = "(numbers: list[int]) -> int"
NUMS_LIST = "(numbers: list[int]) -> list[int]"
TEXT_STR = "(text: str) -> str"

TEMPLATES: tuple[Template, ...] = (
    # --- numbers
    Template("add_constant", "easy", ("add_constant", "plus_offset", "shift_up"), INT,
             "Return x plus {k}.", "    return x + {k}\n", {"k": _r(1, 60)},
             lambda c, x: x + c["k"], lambda r, c: (r.randint(-20, 100),)),
    Template("multiply_constant", "easy", ("multiply", "scale", "times_constant"), INT,
             "Return x multiplied by {k}.", "    return x * {k}\n", {"k": _r(2, 40)},
             lambda c, x: x * c["k"], lambda r, c: (r.randint(-20, 50),)),
    Template("subtract_constant", "easy", ("subtract_constant", "minus_offset", "shift_down"), INT,
             "Return x minus {k}.", "    return x - {k}\n", {"k": _r(1, 60)},
             lambda c, x: x - c["k"], lambda r, c: (r.randint(-20, 100),)),
    Template("affine", "medium", ("linear", "affine", "line_value"), INT,
             "Return {a} times x plus {b}.", "    return {a} * x + {b}\n", {"a": _r(2, 9), "b": _r(1, 15)},
             lambda c, x: c["a"] * x + c["b"], lambda r, c: (r.randint(-10, 30),)),
    Template("remainder", "easy", ("remainder", "mod_constant", "leftover"), "(n: int) -> int",
             "Return the remainder of n divided by {k}.", "    return n % {k}\n", {"k": _r(2, 30)},
             lambda c, n: n % c["k"], lambda r, c: (r.randint(0, 500),)),
    Template("is_multiple", "easy", ("is_multiple", "divisible", "check_divisible"), "(n: int) -> bool",
             "Return True if n is divisible by {k}, otherwise False.", "    return n % {k} == 0\n", {"k": _r(2, 20)},
             lambda c, n: n % c["k"] == 0,
             lambda r, c: (c["k"] * r.randint(1, 15) if r.random() < 0.5 else r.randint(1, 200),)),
    Template("greater_than", "easy", ("is_big", "above_limit", "exceeds"), "(x: int) -> bool",
             "Return True if x is greater than {k}, otherwise False.", "    return x > {k}\n", {"k": _r(-10, 40)},
             lambda c, x: x > c["k"], lambda r, c: (_near(r, c["k"], 10, -20, 50),)),
    Template("clamp", "medium", ("clamp", "limit", "bound"), INT,
             "Return x limited to the range from {lo} to {hi}: {lo} if x is smaller, {hi} if x is larger, else x.",
             "    return max({lo}, min({hi}, x))\n", {"lo": _r(-10, 0), "hi": _r(5, 30)},
             lambda c, x: max(c["lo"], min(c["hi"], x)), lambda r, c: (r.randint(-30, 50),)),
    Template("parity_word", "easy", ("parity", "even_or_odd", "parity_label"), "(n: int) -> str",
             "Return {e!r} if n is even and {o!r} if it is odd.", "    return {e!r} if n % 2 == 0 else {o!r}\n",
             {"e": ("even", "yes", "E", "on", "zero"), "o": ("odd", "no", "O", "off", "one")},
             lambda c, n: c["e"] if n % 2 == 0 else c["o"], lambda r, c: (r.randint(0, 99),)),
    Template("digit_sum", "medium", ("digit_sum", "sum_digits", "digits_total"), "(n: int) -> int",
             "Return the sum of the decimal digits of the non-negative integer n, plus {k}.",
             "    return sum(int(d) for d in str(n)) + {k}\n", {"k": _r(1, 20)},
             lambda c, n: sum(int(d) for d in str(n)) + c["k"], lambda r, c: (r.randint(0, 99999),)),
    Template("sum_multiples_upto", "medium", ("sum_multiples", "multiples_total", "sum_of_multiples"),
             "(n: int) -> int", "Return the sum of the multiples of {k} from 1 to n inclusive.",
             "    return sum(x for x in range(1, n + 1) if x % {k} == 0)\n", {"k": _r(2, 15)},
             lambda c, n: sum(x for x in range(1, n + 1) if x % c["k"] == 0), lambda r, c: (r.randint(0, 100),)),
    Template("times_divisible", "hard", ("times_divisible", "divide_count", "power_of_factor"), "(n: int) -> int",
             "Return how many times the positive integer n can be divided by {k} without a remainder, "
             "dividing again after each step.",
             "    count = 0\n    while n % {k} == 0:\n        n //= {k}\n        count += 1\n    return count\n",
             {"k": _r(2, 7)}, lambda c, n: _times_divisible(n, c["k"]),
             lambda r, c: (r.choice((c["k"], r.randint(2, 7))) ** r.randint(0, 4) * r.choice((1, 1, 5, 7, 11)),)),
    Template("fizz_words", "hard", ("fizz", "label_number", "word_for"), "(n: int) -> str",
             "Return {w1!r} + {w2!r} if n is divisible by both {a} and {b}, {w1!r} if it is divisible by {a} only, "
             "{w2!r} if it is divisible by {b} only, and str(n) otherwise.",
             "    if n % {a} == 0 and n % {b} == 0:\n        return {w1!r} + {w2!r}\n    if n % {a} == 0:\n"
             "        return {w1!r}\n    if n % {b} == 0:\n        return {w2!r}\n    return str(n)\n",
             {"a": (2, 3, 4), "b": (5, 6, 7), "w1": ("Fizz", "Foo", "Ping"), "w2": ("Buzz", "Bar", "Pong")},
             lambda c, n: _fizz(n, c),
             lambda r, c: (r.choice((c["a"] * c["b"], c["a"], c["b"])) * r.randint(1, 4) if r.random() < 0.6
                           else r.randint(1, 80),)),
    # --- lists of numbers
    Template("sum_above", "easy", ("sum_above", "total_above", "sum_big"), NUMS_INT,
             "Return the sum of the numbers in the list that are greater than {k}.",
             "    return sum(x for x in numbers if x > {k})\n", {"k": _r(0, 20)},
             lambda c, xs: sum(x for x in xs if x > c["k"]),
             lambda r, c: (_ints(r, -5, 30) + [_near(r, c["k"], 0, 0, 25)],)),
    Template("count_multiples", "easy", ("count_multiples", "how_many_divisible", "count_divisible"), NUMS_INT,
             "Return how many numbers in the list are divisible by {k}.",
             "    return sum(1 for x in numbers if x % {k} == 0)\n", {"k": _r(2, 12)},
             lambda c, xs: sum(1 for x in xs if x % c["k"] == 0),
             lambda r, c: (_ints(r, 1, 60, 1, 10) + [c["k"] * r.randint(1, 5)] * r.randint(0, 2),)),
    Template("keep_below", "easy", ("keep_below", "small_numbers", "filter_below"), NUMS_LIST,
             "Return the numbers in the list that are smaller than {k}, in their original order.",
             "    return [x for x in numbers if x < {k}]\n", {"k": _r(0, 30)},
             lambda c, xs: [x for x in xs if x < c["k"]],
             lambda r, c: (_ints(r, -5, 40) + [_near(r, c["k"], 0, -5, 35)],)),
    Template("scale_all", "easy", ("scale_all", "multiply_each", "times_each"), NUMS_LIST,
             "Return a new list with every number multiplied by {k}.", "    return [x * {k} for x in numbers]\n",
             {"k": _r(2, 20)}, lambda c, xs: [x * c["k"] for x in xs], lambda r, c: (_ints(r, -9, 20),)),
    Template("add_to_all", "easy", ("add_to_all", "shift_each", "offset_each"), NUMS_LIST,
             "Return a new list with {k} added to every number.", "    return [x + {k} for x in numbers]\n",
             {"k": _r(1, 40)}, lambda c, xs: [x + c["k"] for x in xs], lambda r, c: (_ints(r, -9, 30),)),
    Template("max_plus", "easy", ("max_plus", "largest_plus", "peak_offset"), NUMS_INT,
             "Return the largest number in the non-empty list plus {k}.", "    return max(numbers) + {k}\n",
             {"k": _r(1, 30)}, lambda c, xs: max(xs) + c["k"], lambda r, c: (_ints(r, -20, 50, 1, 8),)),
    Template("min_minus", "easy", ("min_minus", "smallest_minus", "low_offset"), NUMS_INT,
             "Return the smallest number in the non-empty list minus {k}.", "    return min(numbers) - {k}\n",
             {"k": _r(1, 30)}, lambda c, xs: min(xs) - c["k"], lambda r, c: (_ints(r, -20, 50, 1, 8),)),
    Template("count_value", "easy", ("count_value", "occurrences", "how_many_times"), NUMS_INT,
             "Return how many times {k} occurs in the list.", "    return numbers.count({k})\n", {"k": _r(0, 15)},
             lambda c, xs: xs.count(c["k"]),
             lambda r, c: (_shuffled(r, _ints(r, 0, 15, 0, 8) + [c["k"]] * r.randint(0, 3)),)),
    Template("last_k", "easy", ("last_k", "tail", "take_last"), NUMS_LIST,
             "Return the last {k} numbers of the list (the whole list if it is shorter).",
             "    return numbers[-{k}:]\n", {"k": _r(1, 7)}, lambda c, xs: xs[-c["k"]:],
             lambda r, c: (_ints(r, 0, 50, 0, 10),)),
    Template("count_between", "medium", ("count_between", "count_in_range", "in_range_count"), NUMS_INT,
             "Return how many numbers in the list are between {lo} and {hi}, inclusive.",
             "    return sum(1 for x in numbers if {lo} <= x <= {hi})\n", {"lo": _r(0, 9), "hi": _r(10, 24)},
             lambda c, xs: sum(1 for x in xs if c["lo"] <= x <= c["hi"]),
             lambda r, c: (_ints(r, -3, 30, 0, 6) + [_near(r, c["lo"], 0, 0, 9), _near(r, c["hi"], 0, 10, 24)],)),
    Template("sum_squares_below", "medium", ("sum_squares_below", "small_squares", "squares_total"), NUMS_INT,
             "Return the sum of the squares of the numbers in the list that are smaller than {k}.",
             "    return sum(x * x for x in numbers if x < {k})\n", {"k": _r(1, 20)},
             lambda c, xs: sum(x * x for x in xs if x < c["k"]),
             lambda r, c: (_ints(r, -3, 25) + [_near(r, c["k"], 0, 0, 20)],)),
    Template("every_kth", "medium", ("every_kth", "take_every", "stride"), NUMS_LIST,
             "Return every {k}-th number of the list, starting at index {s}.", "    return numbers[{s}::{k}]\n",
             {"k": _r(2, 5), "s": _r(0, 3)}, lambda c, xs: xs[c["s"]::c["k"]],
             lambda r, c: (r.sample(range(100), r.randint(6, 14)),)),
    Template("adjacent_steps", "medium", ("count_steps", "adjacent_gaps", "step_pairs"), NUMS_INT,
             "Return how many pairs of neighbouring numbers in the list differ by exactly {k} "
             "(the second minus the first).",
             "    return sum(1 for a, b in zip(numbers, numbers[1:]) if b - a == {k})\n", {"k": _r(1, 9)},
             lambda c, xs: sum(1 for a, b in zip(xs, xs[1:]) if b - a == c["k"]),
             lambda r, c: (_steps(r, c["k"]),)),
    Template("replace_above", "medium", ("replace_above", "cap_values", "squash_big"), NUMS_LIST,
             "Return a copy of the list in which every number greater than {k} is replaced by {v}.",
             "    return [{v} if x > {k} else x for x in numbers]\n", {"k": _r(0, 15), "v": (-1, 0, 99, 100)},
             lambda c, xs: [c["v"] if x > c["k"] else x for x in xs],
             lambda r, c: (_ints(r, -3, 25) + [_near(r, c["k"], 0, 0, 15)],)),
    Template("first_above", "hard", ("first_above", "find_first_big", "first_over"), NUMS_INT,
             "Return the first number in the list that is greater than {k}, or {d} if there is none.",
             "    for x in numbers:\n        if x > {k}:\n            return x\n    return {d}\n",
             {"k": _r(0, 20), "d": (-1, 0, -100, 999)},
             lambda c, xs: _first(xs, lambda x: x > c["k"], c["d"]),
             lambda r, c: (_ints(r, -5, c["k"], 0, 4) + ([c["k"] + r.randint(1, 2)] + _ints(r, -5, 30, 0, 3)
                                                          if r.random() < 0.7 else []),)),
    Template("index_of_multiple", "hard", ("index_of_multiple", "find_divisible", "first_multiple_index"), NUMS_INT,
             "Return the index of the first number in the list that is divisible by {k}, or -1 if there is none.",
             "    for i, x in enumerate(numbers):\n        if x % {k} == 0:\n            return i\n    return -1\n",
             {"k": _r(2, 11)},
             lambda c, xs: next((i for i, x in enumerate(xs) if x % c["k"] == 0), -1),
             lambda r, c: (_shuffled(r, _ints(r, 1, 50, 0, 7) + [c["k"] * r.randint(1, 6)] * r.randint(0, 1)),)),
    Template("running_totals", "hard", ("running_totals", "prefix_sums", "cumulative"), NUMS_LIST,
             "Return the running totals of the list starting from {k}: the i-th result is {k} plus the sum "
             "of the numbers up to and including index i.",
             "    total = {k}\n    result = []\n    for x in numbers:\n        total += x\n"
             "        result.append(total)\n    return result\n",
             {"k": _r(0, 20)}, lambda c, xs: _running(xs, c["k"]), lambda r, c: (_ints(r, -5, 20, 0, 7),)),
    # --- strings
    Template("count_char", "easy", ("count_char", "char_count", "occurrences_of"), "(text: str) -> int",
             "Return how many times the character {c!r} occurs in text.", "    return text.count({c!r})\n",
             {"c": tuple(LETTERS)}, lambda c, t: t.count(c["c"]), lambda r, c: (_text(r, extra=c["c"]),)),
    Template("repeat_join", "easy", ("repeat", "repeat_with", "copies"), TEXT_STR,
             "Return text repeated {k} times, with {sep!r} between the copies.",
             "    return {sep!r}.join([text] * {k})\n", {"k": _r(2, 6), "sep": ("-", ",", " ", "|", "+", ":", "/")},
             lambda c, t: c["sep"].join([t] * c["k"]), lambda r, c: (r.choice(WORDS),)),
    Template("wrap_text", "easy", ("wrap", "surround", "decorate"), TEXT_STR,
             "Return text with {p!r} added at the start and {s!r} added at the end.",
             "    return {p!r} + text + {s!r}\n", {"p": ("<", "(", "[", "*", "#", ">>"), "s": (">", ")", "]", "*", "!", "<<")},
             lambda c, t: c["p"] + t + c["s"], lambda r, c: (r.choice(WORDS),)),
    Template("replace_char", "easy", ("replace_char", "mask_char", "swap_char"), TEXT_STR,
             "Return text with every {a!r} replaced by {b!r}.", "    return text.replace({a!r}, {b!r})\n",
             {"a": tuple("aeioustrn"), "b": ("*", "_", "#", "-", "+", ".")},
             lambda c, t: t.replace(c["a"], c["b"]), lambda r, c: (_text(r, extra=c["a"]),)),
    Template("remove_char", "easy", ("remove_char", "strip_char", "without_char"), TEXT_STR,
             "Return text with every {c!r} removed.", "    return text.replace({c!r}, '')\n", {"c": tuple(LETTERS)},
             lambda c, t: t.replace(c["c"], ""), lambda r, c: (_text(r, extra=c["c"]),)),
    Template("starts_with", "easy", ("starts_with", "has_prefix", "begins_with"), "(text: str) -> bool",
             "Return True if text starts with {p!r}, otherwise False.", "    return text.startswith({p!r})\n",
             {"p": ("ab", "co", "de", "pre", "re", "un", "ex", "st", "tr", "im", "ma", "ho")},
             lambda c, t: t.startswith(c["p"]),
             lambda r, c: (c["p"] + _text(r, max_len=5) if r.random() < 0.5 else _text(r, max_len=6),)),
    Template("longer_than", "easy", ("is_long", "longer_than", "too_long"), "(text: str) -> bool",
             "Return True if text has more than {k} characters, otherwise False.", "    return len(text) > {k}\n",
             {"k": _r(1, 15)}, lambda c, t: len(t) > c["k"],
             lambda r, c: (_text(r, min_len=max(0, c["k"] - 1), max_len=c["k"] + 1) if r.random() < 0.6
                           else _text(r, max_len=18),)),
    Template("count_in_set", "medium", ("count_special", "count_chosen", "count_members"), "(text: str) -> int",
             "Return how many characters of text occur in the string {chars!r}.",
             "    return sum(1 for ch in text if ch in {chars!r})\n",
             {"chars": tuple("".join(t) for t in itertools.combinations("abcdefg", 3))},
             lambda c, t: sum(1 for ch in t if ch in c["chars"]), lambda r, c: (_text(r, "abcdefg", 3, 12),)),
    Template("upper_every_kth", "medium", ("upper_every", "shout_every", "caps_stride"), TEXT_STR,
             "Return text with the characters at indices divisible by {k} in upper case and the others unchanged.",
             "    return ''.join(ch.upper() if i % {k} == 0 else ch for i, ch in enumerate(text))\n", {"k": _r(2, 6)},
             lambda c, t: "".join(ch.upper() if i % c["k"] == 0 else ch for i, ch in enumerate(t)),
             lambda r, c: (_text(r, min_len=6, max_len=14),)),
    Template("shorten", "medium", ("shorten", "truncate", "abbreviate"), TEXT_STR,
             "If text is longer than {k} characters, return its first {k} characters followed by {e!r}; "
             "otherwise return text unchanged.",
             "    if len(text) > {k}:\n        return text[:{k}] + {e!r}\n    return text\n",
             {"k": _r(3, 10), "e": ("...", "~", "!", "+")},
             lambda c, t: t[:c["k"]] + c["e"] if len(t) > c["k"] else t,
             lambda r, c: (_text(r, min_len=max(0, c["k"] - 1), max_len=c["k"] + 2) if r.random() < 0.6
                           else _text(r, max_len=14),)),
    Template("caesar", "hard", ("caesar", "shift_letters", "rotate_letters"), TEXT_STR,
             "Shift every lowercase letter of text {k} places forward in the alphabet, wrapping around from 'z' "
             "to 'a'; leave other characters unchanged.",
             "    result = []\n    for ch in text:\n        if 'a' <= ch <= 'z':\n"
             "            ch = chr((ord(ch) - ord('a') + {k}) % 26 + ord('a'))\n        result.append(ch)\n"
             "    return ''.join(result)\n",
             {"k": _r(1, 25)}, lambda c, t: _caesar(t, c["k"]), lambda r, c: (_text(r, LETTERS + " !", 1, 10),)),
    Template("long_words", "medium", ("long_words", "words_longer", "big_words"), "(sentence: str) -> list[str]",
             "Return the words of sentence (separated by spaces) that are longer than {k} characters, in order.",
             "    return [word for word in sentence.split() if len(word) > {k}]\n", {"k": _r(1, 7)},
             lambda c, s: [w for w in s.split() if len(w) > c["k"]], lambda r, c: (_sentence(r),)),
    Template("count_initial", "medium", ("count_initial", "words_starting", "initial_count"),
             "(sentence: str) -> int",
             "Return how many words of sentence (separated by spaces) start with {c!r}.",
             "    return sum(1 for word in sentence.split() if word.startswith({c!r}))\n",
             {"c": tuple(sorted({w[0] for w in WORDS}))},
             lambda c, s: sum(1 for w in s.split() if w.startswith(c["c"])), lambda r, c: (_sentence(r, 2, 9),)),
    Template("reverse_words", "medium", ("reverse_words", "backwards_words", "flip_words"), "(sentence: str) -> str",
             "Return the words of sentence (separated by spaces) in reverse order, joined with {sep!r}.",
             "    return {sep!r}.join(reversed(sentence.split()))\n",
             {"sep": (" ", "-", ", ", "|", "_", "/", " + ", ":")},
             lambda c, s: c["sep"].join(reversed(s.split())), lambda r, c: (_sentence(r, 1, 5),)),
    Template("join_words", "easy", ("join_words", "glue", "combine"), "(words: list[str]) -> str",
             "Return the words joined into one string with {sep!r} between them.", "    return {sep!r}.join(words)\n",
             {"sep": (", ", "-", " ", "|", "+", ":", "/", "; ", " and ", "_")},
             lambda c, ws: c["sep"].join(ws), lambda r, c: (_words(r, 1, 5),)),
    # --- dictionaries
    Template("lookup_default", "easy", ("lookup", "get_or_default", "value_of"), "(counts: dict[str, int], key: str) -> int",
             "Return the value stored under key in counts, or {d} if key is not there.",
             "    return counts.get(key, {d})\n", {"d": _r(-10, 30)},
             lambda c, counts, key: counts.get(key, c["d"]),
             lambda r, c: _lookup_args(r)),
    Template("sum_values_above", "medium", ("sum_values_above", "big_value_total", "total_over"),
             "(counts: dict[str, int]) -> int",
             "Return the sum of the values in the dictionary that are greater than {k}.",
             "    return sum(value for value in counts.values() if value > {k})\n", {"k": _r(0, 20)},
             lambda c, d: sum(v for v in d.values() if v > c["k"]), lambda r, c: (_counts(r, near=c["k"]),)),
    Template("keys_at_least", "medium", ("keys_at_least", "frequent_keys", "keys_over"),
             "(counts: dict[str, int]) -> list[str]",
             "Return the keys whose value is at least {k}, sorted alphabetically.",
             "    return sorted(key for key, value in counts.items() if value >= {k})\n", {"k": _r(1, 20)},
             lambda c, d: sorted(key for key, v in d.items() if v >= c["k"]),
             lambda r, c: (_counts(r, near=c["k"]),)),
    Template("scale_values", "medium", ("scale_values", "multiply_values", "boost"),
             "(counts: dict[str, int]) -> dict[str, int]",
             "Return a new dictionary with the same keys and every value multiplied by {k}.",
             "    return {{key: value * {k} for key, value in counts.items()}}\n", {"k": _r(2, 20)},
             lambda c, d: {key: v * c["k"] for key, v in d.items()}, lambda r, c: (_counts(r, 1, 25),)),
    Template("word_counts", "hard", ("word_counts", "count_words", "tally"), "(words: list[str]) -> dict[str, int]",
             "Count how often each word with at least {k} letters occurs in the list; return a dictionary from "
             "word to count, leaving shorter words out.",
             "    counts = {{}}\n    for word in words:\n        if len(word) >= {k}:\n"
             "            counts[word] = counts.get(word, 0) + 1\n    return counts\n", {"k": _r(2, 6)},
             lambda c, ws: _word_counts(ws, c["k"]), lambda r, c: (_words(r, 1, 9),)),
    Template("group_by_initial", "hard", ("group_by_initial", "index_words", "bucket_words"),
             "(words: list[str]) -> dict[str, list[str]]",
             "Group the words longer than {k} letters by their first letter: return a dictionary from the first "
             "letter to the list of those words, in their original order.",
             "    groups = {{}}\n    for word in words:\n        if len(word) > {k}:\n"
             "            groups.setdefault(word[0], []).append(word)\n    return groups\n", {"k": _r(1, 5)},
             lambda c, ws: _group_initial(ws, c["k"]), lambda r, c: (_words(r, 1, 9),)),
)


# ---------------------------------------------------------------------------------------------------
# Instances.


def _key(template: Template, consts: dict[str, Any]) -> str:
    """The instance's identity for the train/heldout split: its template and constants."""
    return template.name + ":" + ",".join(f"{name}={consts[name]!r}" for name in sorted(consts))


def split_of(template: Template, consts: dict[str, Any]) -> str:
    """The bucket ("heldout", "rl" or "sft") of an instance (a template with constants); stable across runs
    and machines. A template's constant choices are ranked by hash: the lowest `HELDOUT_PERCENT` (at least
    one) are held out, the next `RL_PERCENT` (at least one) are kept for RL, and the rest are for SFT."""
    return _buckets(template)[_key(template, consts)]


def in_split(bucket: str, split: str) -> bool:
    """Whether an instance in `bucket` (`split_of`) belongs to `split`: train is sft and rl together."""
    return bucket == split or (split == "train" and bucket != "heldout")


_BUCKETS: dict[str, dict[str, str]] = {}


def _buckets(template: Template) -> dict[str, str]:
    if template.name not in _BUCKETS:
        keys = sorted((_key(template, c) for c in template.choices()), key=lambda k: hashlib.sha256(k.encode()).digest())
        heldout = max(1, round(len(keys) * HELDOUT_PERCENT / 100))
        rl = heldout + max(1, round(len(keys) * RL_PERCENT / 100))
        _BUCKETS[template.name] = {key: "heldout" if i < heldout else "rl" if i < rl else "sft"
                                   for i, key in enumerate(keys)}
    return _BUCKETS[template.name]


_CHOICES: dict[str, list[dict[str, Any]]] = {}


def _alternatives(template: Template, consts: dict[str, Any]) -> list[dict[str, Any]]:
    if template.name not in _CHOICES:
        _CHOICES[template.name] = template.choices()
    return [other for other in _CHOICES[template.name] if other != consts]


def _draw_cases(template: Template, consts: dict[str, Any], rng: random.Random) -> list[tuple[tuple, Any]] | None:
    """(arguments, expected) pairs meeting the guarantees in the module docstring, or None if `MAX_CASES`
    distinct draws do not get there."""
    cases: list[tuple[tuple, Any]] = []
    seen: set[str] = set()
    left = _alternatives(template, consts)  # other constants no case tells apart yet
    for _ in range(4 * MAX_CASES):
        args = template.draw(rng, consts)
        if repr(args) in seen:
            continue
        seen.add(repr(args))
        expected = template.solve(consts, *args)
        if expected is None:
            raise ValueError(f"template {template.name}: expected value None for {args!r}")
        cases.append((args, expected))
        left = [other for other in left if template.solve(other, *args) == expected]
        distinct = len({repr(e) for _, e in cases}) > 1
        if len(cases) >= MIN_CASES and not left and distinct:
            return _example_first(template, consts, cases)
        if len(cases) == MAX_CASES:
            return None
    return None


def _example_first(template: Template, consts: dict[str, Any], cases: list[tuple[tuple, Any]]) -> list[tuple[tuple, Any]]:
    """`cases` with the most telling one first (it becomes the docstring's example): the case that the most
    other constant choices get wrong, so `f('data') == 'data'` does not stand for reversing words."""
    others = _alternatives(template, consts)
    telling = [sum(template.solve(other, *args) != expected for other in others) for args, expected in cases]
    best = telling.index(max(telling))
    return [cases[best], *cases[:best], *cases[best + 1:]]


def _call(name: str, args: tuple) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


def _prompt(template: Template, function: str, consts: dict[str, Any], example: tuple[tuple, Any]) -> str:
    doc = textwrap.wrap(template.doc.format(**consts), width=96)
    lines = [f"def {function}{template.signature}:", f'    """{doc[0]}', *(f"    {line}" for line in doc[1:]),
             f"    >>> {_call(function, example[0])}", f"    {example[1]!r}", '    """']
    return "\n".join(lines) + "\n"


def _tests(cases: Sequence[tuple[tuple, Any]]) -> str:
    """HumanEval's `test` field: a `check(candidate)` function (without the final call)."""
    asserts = "".join(f"    assert {_call('candidate', args)} == {expected!r}\n" for args, expected in cases)
    return f"\n\ndef check(candidate):\n{asserts}"


def _problem(split: str, index: int, template: Template, function: str, consts: dict[str, Any],
             cases: list[tuple[tuple, Any]]) -> Problem:
    return Problem(
        task_id=f"{TASK_PREFIX}/{split}/{index}/{template.name}",
        prompt=_prompt(template, function, consts, cases[0]),
        tests=f"{_tests(cases)}\n\ncheck({function})\n",  # as evals.problems builds HumanEval's
        reference=template.body.format(**consts),
        stop=HUMANEVAL_STOP,
    )


def synthetic_problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    """`n` problems of `split` (one of `SPLITS`), cycling over the templates in an order shuffled by
    `seed`; a template whose instances for this split run out is skipped (ValueError if all do). About 4,400
    distinct train and 360 held-out problems exist."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"codelm-synthetic:{split}:{seed}")
    order = list(TEMPLATES)
    rng.shuffle(order)
    # No repeated problem within a split: held-out problems differ in their constants; train problems in their
    # constants or function name (the train split has more problems than constant choices).
    used: set[tuple[str, str]] = set()
    exhausted: set[str] = set()
    problems: list[Problem] = []
    position = 0
    while len(problems) < n:
        if len(exhausted) == len(order):
            raise ValueError(f"only {len(problems)} distinct {split} problems exist for seed {seed}; asked for {n}")
        template = order[position % len(order)]
        position += 1
        if template.name in exhausted:
            continue
        for _ in range(MAX_DRAWS):
            consts = {name: rng.choice(values) for name, values in sorted(template.consts.items())}
            function = rng.choice(template.functions)
            identity = (_key(template, consts), function if split != "heldout" else "")
            if not in_split(split_of(template, consts), split) or identity in used:
                continue
            cases = _draw_cases(template, consts, rng)
            if cases is None:
                continue
            used.add(identity)
            problems.append(_problem(split, len(problems), template, function, consts, cases))
            break
        else:
            exhausted.add(template.name)
    return problems


def template_of(problem: Problem) -> str:
    """The template name of a synthetic problem (the last part of its task id)."""
    return problem.task_id.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------------
# Files and SFT records.

_CHECK_CALL = re.compile(r"\n\ncheck\((\w+)\)\n\Z")


def humaneval_record(problem: Problem) -> dict[str, str]:
    """The problem as a HumanEval record; `load_problems` turns it back into an equal `Problem`."""
    match = _CHECK_CALL.search(problem.tests)
    if match is None or problem.setup or problem.reference is None:
        raise ValueError(f"{problem.task_id}: not a HumanEval-style problem (tests must end with check(<name>), "
                         "no setup, a reference)")
    return {"task_id": problem.task_id, "prompt": problem.prompt, "entry_point": match.group(1),
            "canonical_solution": problem.reference, "test": problem.tests[:match.start()]}


def _write_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """One JSON object per line, written to a temporary file and renamed into place; a file that already
    holds exactly these lines is left alone."""
    path = os.fspath(path)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_problems_jsonl(problems: Sequence[Problem], path: str | os.PathLike[str]) -> None:
    """HumanEval records, one per line (read back by `evals.problems.load_problems`)."""
    _write_jsonl((humaneval_record(p) for p in problems), path)


def problem_prompt_completions(problems: Sequence[Problem]) -> list[dict[str, str]]:
    """SFT records {"prompt": signature + docstring, "completion": reference body}: the form for a base code
    model (codelm's own), which continues the prompt's code exactly as `evals` samples it."""
    return [{"prompt": p.prompt, "completion": _reference(p)} for p in problems]


def imperfect_completions(problems: Sequence[Problem],
                          error_percent: float = TEACHER_ERROR_PERCENT) -> list[dict[str, str]]:
    """`problem_prompt_completions` as an imperfect teacher writes them: each problem is drawn, with
    probability `error_percent` / 100 and a generator seeded by its task id, for one plausible bug
    (`evals.mutations`: `>` for `>=`, `+` for `-`, `max` for `min`, ...); bodies without such a site
    stay correct, so at 30 about 23% of the embedded "sft" completions are edited and 22% fail their tests
    (an edit can be equivalent on a problem's tests).

    Why the SFT default learns from these: RL with execution rewards raises pass@1 by moving probability
    onto programs the model already samples, not by teaching what it never produces (Yue et al. 2025,
    "Does Reinforcement Learning Really Incentivize Reasoning Capacity in LLMs Beyond the Base Model?").
    A model fine-tuned on a correct teacher alone leaves RL nothing of that kind on these problems: its
    failures are constants it does not copy (results/rl_generalization/README.md). One that learned some
    of its teacher's bugs samples them at a rate the tests can punish on every template, seen or not."""
    records = []
    for problem in problems:
        body = _reference(problem)
        rng = random.Random(hashlib.sha256(problem.task_id.encode()).digest())
        if rng.random() * 100 < error_percent:
            body = mutations.mutate(body, rng) or body
        records.append({"prompt": problem.prompt, "completion": body})
    return records


def problem_conversations(problems: Sequence[Problem]) -> list[dict[str, list[dict[str, str]]]]:
    """SFT records {"messages": [user: the prompt, assistant: the reference body]}: the form for a chat
    model trained through its chat template. (Evaluation through `evals` still feeds the bare prompt.)"""
    return [{"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": _reference(p)}]}
            for p in problems]


def _reference(problem: Problem) -> str:
    if problem.reference is None:
        raise ValueError(f"{problem.task_id}: no reference solution")
    return problem.reference


def write_sft_jsonl(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """SFT records (from `problem_prompt_completions` or `problem_conversations`), one per line."""
    _write_jsonl(records, path)


def heldout_problems(n: int = DEFAULT_HELDOUT, seed: int = 0) -> list[Problem]:
    """The embedded held-out set that SFT and RL report pass@k on."""
    return synthetic_problems("heldout", n, seed)


def write_embedded_sft_problems(out_dir: str | os.PathLike[str] = DEFAULT_OUT_DIR, *, n_train: int = DEFAULT_TRAIN,
                                n_heldout: int = DEFAULT_HELDOUT, seed: int = 0) -> dict[str, str]:
    """Writes the six files listed in the module docstring under `out_dir`; returns name -> path."""
    train = synthetic_problems("train", n_train, seed)
    heldout = synthetic_problems("heldout", n_heldout, seed)
    paths = {name: os.path.join(os.fspath(out_dir), f"synthetic_{name}.jsonl")
             for name in ("train", "sft", "sft_imperfect", "validation", "train_problems", "heldout_problems")}
    sft = synthetic_problems("sft", n_train, seed)
    write_sft_jsonl(problem_prompt_completions(train), paths["train"])
    write_sft_jsonl(problem_prompt_completions(sft), paths["sft"])
    write_sft_jsonl(imperfect_completions(sft), paths["sft_imperfect"])
    write_sft_jsonl(problem_prompt_completions(heldout), paths["validation"])
    write_problems_jsonl(train, paths["train_problems"])
    write_problems_jsonl(heldout, paths["heldout_problems"])
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help="output directory")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="number of train problems")
    parser.add_argument("--heldout", type=int, default=DEFAULT_HELDOUT, help="number of held-out problems")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_embedded_sft_problems(args.out_dir, n_train=args.train, n_heldout=args.heldout, seed=args.seed)
    print(json.dumps({"templates": len(TEMPLATES), "train": args.train, "heldout": args.heldout, "files": paths}))


if __name__ == "__main__":
    main()
