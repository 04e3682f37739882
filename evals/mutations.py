"""Plausible one-edit bugs in a Python function body: the mistakes of an imperfect teacher.

A body's mutation sites are the edits a hurried programmer makes: a boundary comparison off by one
(`>` for `>=`), a flipped test (`==` for `!=`, `in` for `not in`), the wrong sign or operator next to a
constant (`x + 3` for `x - 3`, `x * 3` for `x + 3`), a flipped update (`+=` for `-=`), a dropped minus,
`max` for `min`, `startswith` for `endswith`, `upper` for `lower`, `and` for `or`. Each edit replaces one
operator or name in the source text and keeps the rest of it byte for byte, so a mutant differs from
the original in that token alone.

    sites(body)             # [Site(start, end, replacement), ...] in source order
    mutate(body, rng)       # the body with one site, drawn by rng, edited; None if it has no site

The mutants are not checked to fail: a test set may not tell `x > 3` from `x >= 3` when no input is 3.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import textwrap

_COMPARE = {ast.Gt: ">=", ast.GtE: ">", ast.Lt: "<=", ast.LtE: "<", ast.Eq: "!=", ast.NotEq: "==",
            ast.In: "not in", ast.NotIn: "in"}
_ARITHMETIC = {ast.Add: "-", ast.Sub: "+", ast.Mult: "+"}  # next to an integer constant
_UPDATE = {ast.Add: "-=", ast.Sub: "+="}
_BOOLEAN = {ast.And: "or", ast.Or: "and"}
_FUNCTIONS = {"max": "min", "min": "max"}
_METHODS = {"startswith": "endswith", "endswith": "startswith", "upper": "lower", "lower": "upper"}


@dataclasses.dataclass(frozen=True)
class Site:
    """Replace `body[start:end]` (character offsets into the body as given) with `replacement`."""

    start: int
    end: int
    replacement: str


def _is_int(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _next_to_int(node: ast.BinOp) -> bool:
    """An arithmetic operator between a number-valued operand and an integer constant (not `[text] * 3`)."""
    other = node.right if _is_int(node.left) else node.left if _is_int(node.right) else None
    return other is not None and not isinstance(other, (ast.List, ast.Tuple, ast.Constant))


def sites(body: str) -> list[Site]:
    """The mutation sites of a function body (statements indented as in a `def`), in source order."""
    source = textwrap.dedent(body)
    lines, original = source.splitlines(keepends=True), body.splitlines(keepends=True)
    starts = [0]  # where each line of the body starts
    for line in original:
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:
        # ast columns count UTF-8 bytes of the dedented line; the body's offsets count characters.
        line = lines[lineno - 1]
        removed = len(original[lineno - 1]) - len(line)
        return starts[lineno - 1] + removed + len(line.encode()[:col].decode())

    def between(left: ast.AST, right: ast.AST, replacement: str) -> Site:
        """The operator token(s) between two operands, without the spaces around them."""
        start, end = offset(left.end_lineno, left.end_col_offset), offset(right.lineno, right.col_offset)
        text = body[start:end]
        # Parentheses may close the left operand or open the right one: the operator is what is left.
        core = text.strip(" ()")
        first = start + text.index(core)
        return Site(first, first + len(core), replacement)

    found: list[Site] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i, op in enumerate(node.ops):
                found.append(between(operands[i], operands[i + 1], _COMPARE[type(op)]))
        elif isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC and _next_to_int(node):
            found.append(between(node.left, node.right, _ARITHMETIC[type(node.op)]))
        elif isinstance(node, ast.AugAssign) and type(node.op) in _UPDATE:
            found.append(between(node.target, node.value, _UPDATE[type(node.op)]))
        elif isinstance(node, ast.BoolOp):
            for left, right in zip(node.values, node.values[1:]):
                found.append(between(left, right, _BOOLEAN[type(node.op)]))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and _is_int(node.operand):
            start = offset(node.lineno, node.col_offset)
            found.append(Site(start, start + 1, ""))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in _FUNCTIONS:
                start = offset(func.lineno, func.col_offset)
                found.append(Site(start, start + len(func.id), _FUNCTIONS[func.id]))
            elif isinstance(func, ast.Attribute) and func.attr in _METHODS:
                end = offset(func.end_lineno, func.end_col_offset)
                found.append(Site(end - len(func.attr), end, _METHODS[func.attr]))
    return sorted(found, key=lambda site: site.start)


def apply(body: str, site: Site) -> str:
    return body[:site.start] + site.replacement + body[site.end:]


def mutate(body: str, rng: random.Random) -> str | None:
    """`body` with one of its sites, drawn by `rng`, edited; None if it has none."""
    candidates = sites(body)
    if not candidates:
        return None
    return apply(body, rng.choice(candidates))
