"""How wrong is the imperfect teacher? Runs its SFT completions (`evals.synthetic.imperfect_completions`)
against the problems' tests in a private execution service and prints the pass rate as JSON.

    python -m results.rl_generalization.teacher_errors [n=2000] [split=sft]
"""

from __future__ import annotations

import asyncio
import json
import sys

from evals import harness, synthetic
from sandbox.client import SandboxClient
from sandbox.local import LocalSandbox


async def _evaluate(problems, completions, url: str) -> harness.Report:
    async with SandboxClient(url) as client:
        return await harness.evaluate(problems, completions, client, ks=(1,), progress=False)


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else synthetic.DEFAULT_TRAIN
    split = argv[1] if len(argv) > 1 else "sft"
    problems = synthetic.synthetic_problems(split, n)
    records = synthetic.imperfect_completions(problems)
    completions = {p.task_id: [r["completion"]] for p, r in zip(problems, records)}
    edited = {p.task_id for p, r in zip(problems, records) if r["completion"] != p.reference}
    with LocalSandbox(workers=2, max_queue=256) as service:
        report = asyncio.run(_evaluate(problems, completions, service.url))
    passed = {r.task_id for r in report.problems if r.samples[0].outcome == "passed"}
    print(json.dumps({"split": split, "problems": n, "edited": len(edited),
                      "edited_and_passing": len(edited & passed), "unedited_failing": len(set(completions) - edited - passed),
                      "teacher_pass_rate": len(passed) / n}))


if __name__ == "__main__":
    main(sys.argv[1:])
