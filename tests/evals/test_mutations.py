import ast
import random
import textwrap

import pytest

from evals import mutations, synthetic


def _all_mutants(body: str) -> list[str]:
    return [mutations.apply(body, site) for site in mutations.sites(body)]


@pytest.mark.parametrize("body, expected", [
    ("    return x > 7\n", ["    return x >= 7\n"]),
    ("    return 3 * x + 15\n", ["    return 3 + x + 15\n", "    return 3 * x - 15\n"]),
    ("    return numbers[-2:]\n", ["    return numbers[2:]\n"]),
    ("    return max(numbers) - 3\n", ["    return min(numbers) - 3\n", "    return max(numbers) + 3\n"]),
    ("    return text.startswith('ab')\n", ["    return text.endswith('ab')\n"]),
    ("    return sum(1 for ch in text if ch in 'bce')\n", ["    return sum(1 for ch in text if ch not in 'bce')\n"]),
    ("    return a and not b\n", ["    return a or not b\n"]),
    ("    if 'a' <= ch <= 'z':\n        n += 1\n    return n\n",
     ["    if 'a' < ch <= 'z':\n        n += 1\n    return n\n",
      "    if 'a' <= ch < 'z':\n        n += 1\n    return n\n",
      "    if 'a' <= ch <= 'z':\n        n -= 1\n    return n\n"]),
])
def test_each_site_edits_one_operator_and_keeps_the_rest(body, expected):
    assert _all_mutants(body) == expected


def test_parenthesised_operands_locate_the_operator_between_them():
    body = "    return chr((ord(ch) - ord('a') + 23) % 26)\n"
    assert _all_mutants(body) == ["    return chr((ord(ch) - ord('a') - 23) % 26)\n"]


def test_nested_parentheses_and_blank_lines_keep_the_offsets():
    body = "    y = ((x)) + 3\n\n    return y\n"
    assert _all_mutants(body) == ["    y = ((x)) - 3\n\n    return y\n"]
    body = "    if x:\n\n        return x > 2\n    return 0\n"
    assert _all_mutants(body) == ["    if x:\n\n        return x >= 2\n    return 0\n"]


def test_offsets_count_characters_after_non_ascii_text():
    body = "    return text.count('é€') > 3 and x < 2\n"
    assert _all_mutants(body) == ["    return text.count('é€') >= 3 and x < 2\n",
                                  "    return text.count('é€') > 3 or x < 2\n",
                                  "    return text.count('é€') > 3 and x <= 2\n"]


@pytest.mark.parametrize("body", [
    "    return '/'.join([text] * 5)\n",  # sequence repetition, not arithmetic
    "    return numbers.count(4)\n",
    "    return x * y\n",  # no constant next to the operator
])
def test_bodies_without_a_plausible_edit_have_no_site(body):
    assert mutations.sites(body) == []
    assert mutations.mutate(body, random.Random(0)) is None


def test_mutate_is_a_function_of_the_rng():
    body = "    return max(-6, min(14, x))\n"
    draws = {mutations.mutate(body, random.Random(seed)) for seed in range(40)}
    assert draws == set(_all_mutants(body)) and len(draws) == 3
    assert mutations.mutate(body, random.Random(7)) == mutations.mutate(body, random.Random(7))


def test_every_mutant_of_the_embedded_problems_parses_and_differs_in_one_place():
    with_sites = set()
    for problem in synthetic.synthetic_problems("train", 600):
        body = problem.reference
        for site in mutations.sites(body):
            mutant = mutations.apply(body, site)
            ast.parse(textwrap.dedent(mutant))
            assert mutant != body
            prefix = len(body[:site.start])
            assert mutant[:prefix] == body[:prefix] and mutant.endswith(body[site.end:])
            with_sites.add(synthetic.template_of(problem))
    assert len(with_sites) >= 35  # most templates have at least one plausible bug
