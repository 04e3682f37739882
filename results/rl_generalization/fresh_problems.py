"""Run n's RL problems: the numeric templates of `evals.synthetic` with constants drawn above each
template's range, so outside every split (a constant seen in RL is never seen in SFT or held out, and
memorising it earns nothing on the next problem).

    python -m results.rl_generalization.fresh_problems 1000 runs/exp5/fresh_problems.jsonl
"""

import dataclasses
import random
import sys

from evals import synthetic
from evals.problems import Problem


def fresh_template(template: synthetic.Template) -> synthetic.Template | None:
    """The template with each integer range lo..hi moved to hi+1..2*hi-lo+1 (short lists of values are kept);
    None for templates with non-integer constants (characters, words, separators)."""
    consts = {}
    for name, values in template.consts.items():
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return None
        lo, hi = min(values), max(values)
        consts[name] = tuple(range(hi + 1, 2 * hi - lo + 2)) if tuple(values) == tuple(range(lo, hi + 1)) else values
    return dataclasses.replace(template, name=f"{template.name}_fresh", consts=consts)


def fresh_problems(n: int, seed: int = 0, max_failures: int = 50) -> list[Problem]:
    """Up to `n` distinct problems, cycling over the fresh templates, with the generator's own test draws."""
    rng = random.Random(f"fresh:{seed}")
    templates = [t for t in map(fresh_template, synthetic.TEMPLATES) if t is not None]
    problems: list[Problem] = []
    used: set[tuple] = set()
    failures = dict.fromkeys((t.name for t in templates), 0)
    position = 0
    while len(problems) < n and min(failures.values()) <= max_failures:
        template = templates[position % len(templates)]
        position += 1
        if failures[template.name] > max_failures:
            continue
        consts = {name: rng.choice(values) for name, values in sorted(template.consts.items())}
        key = (template.name, tuple(sorted(consts.items())))
        cases = None if key in used else synthetic._draw_cases(template, consts, rng)
        if cases is None:
            failures[template.name] += 1
            continue
        used.add(key)
        function = rng.choice(template.functions)
        problems.append(synthetic._problem("rl_fresh", len(problems), template, function, consts, cases))
    return problems


if __name__ == "__main__":
    synthetic.write_problems_jsonl(fresh_problems(int(sys.argv[1])), sys.argv[2])
