"""What a model's held-out samples get wrong: counts each sample of an `evals.humaneval` output directory as
passed, a teacher's bug (the reference with one `evals.mutations` edit), a wrong constant (the reference's
code with other literals), or something else; prints JSON.

    python -m results.rl_generalization.failure_kinds <eval dir> [<eval dir> ...]
"""

from __future__ import annotations

import collections
import io
import json
import os
import sys
import tokenize

from data.jsonl import read_jsonl
from evals import mutations, synthetic
from evals.completions import read_completions
from evals.problems import Problem


def _shape(body: str) -> tuple[str, ...]:
    """The body's tokens with every number and string literal masked."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(body).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return ()
    return tuple("<lit>" if t.type in (tokenize.NUMBER, tokenize.STRING) else t.string
                 for t in tokens if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT))


def kinds(eval_dir: str, heldout: dict[str, Problem]) -> dict[str, int]:
    completions = read_completions(os.path.join(eval_dir, "completions.jsonl"), heldout.values(), allow_missing=True)
    outcomes = {(line.record["task_id"], line.record["index"]): line.record["outcome"]
                for line in read_jsonl(os.path.join(eval_dir, "samples.jsonl"))}
    counts: collections.Counter[str] = collections.Counter()
    for task, bodies in completions.items():
        reference = heldout[task].reference
        teacher_bugs = {mutations.apply(reference, site) for site in mutations.sites(reference)}
        for index, body in enumerate(bodies):
            if outcomes[task, index] == "passed":
                counts["passed"] += 1
            elif body in teacher_bugs:
                counts["teacher_bug"] += 1
            elif _shape(body) == _shape(reference):
                counts["wrong_literal"] += 1
            else:
                counts["other"] += 1
    return dict(counts)


def main(argv: list[str]) -> None:
    heldout = {p.task_id: p for p in synthetic.heldout_problems()}
    print(json.dumps({eval_dir: kinds(eval_dir, heldout) for eval_dir in argv}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
