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

from evals import mutations, synthetic


def _shape(body: str) -> tuple[str, ...]:
    """The body's tokens with every number and string literal masked."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(body).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return ()
    return tuple("<lit>" if t.type in (tokenize.NUMBER, tokenize.STRING) else t.string
                 for t in tokens if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT))


def kinds(eval_dir: str, heldout: dict[str, str]) -> dict[str, int]:
    outcomes = {}
    with open(os.path.join(eval_dir, "samples.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            outcomes[row["task_id"], row["index"]] = row["outcome"]
    counts: collections.Counter[str] = collections.Counter()
    seen: collections.Counter[str] = collections.Counter()
    with open(os.path.join(eval_dir, "completions.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            task, body = row["task_id"], row["completion"]
            index = seen[task]
            seen[task] += 1
            reference = heldout[task]
            if outcomes[task, index] == "passed":
                counts["passed"] += 1
            elif body in {mutations.apply(reference, site) for site in mutations.sites(reference)}:
                counts["teacher_bug"] += 1
            elif _shape(body) == _shape(reference):
                counts["wrong_literal"] += 1
            else:
                counts["other"] += 1
    return dict(counts)


def main(argv: list[str]) -> None:
    heldout = {p.task_id: p.reference for p in synthetic.heldout_problems()}
    print(json.dumps({eval_dir: kinds(eval_dir, heldout) for eval_dir in argv}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
