"""Where each stage of the lifecycle (`python -m lifecycle.run`) reads and writes, under one root.

The stage configs (configs/lifecycle/{pretrain,sft,rl}.py) take the root as their config argument,
`--config=configs/lifecycle/pretrain.py:runs/lifecycle`, so one lifecycle never reads another's files.
"""

from __future__ import annotations

import dataclasses

DEFAULT_ROOT = "runs/lifecycle"


@dataclasses.dataclass(frozen=True)
class Layout:
    root: str = DEFAULT_ROOT

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    @property
    def state(self) -> str:  # finished stages, their commands and times (lifecycle.run)
        return self.path("lifecycle.json")

    # data
    @property
    def corpus(self) -> str:  # the embedded corpus and its tokenizer (data/corpus.py)
        return self.path("data", "corpus")

    @property
    def tokenizer(self) -> str:
        return self.path("data", "corpus", "tokenizer.model")

    @property
    def validation_glob(self) -> str:  # held-out files, not curated: the same loss target for every stage
        return self.path("data", "corpus", "arrayrecord", "validation-*.array_record")

    @property
    def curation_input(self) -> str:  # the train split as JSONL, one repository per stdlib package
        return self.path("data", "curation_input.jsonl")

    @property
    def curated(self) -> str:  # data.prepare's shards and report.json
        return self.path("data", "curated")

    @property
    def curated_glob(self) -> str:
        return self.path("data", "curated", "data-*.array_record")

    @property
    def problems(self) -> str:  # SFT records and HumanEval-style problem files (evals/synthetic.py)
        return self.path("data", "problems")

    @property
    def heldout_problems(self) -> str:
        return self.path("data", "problems", "synthetic_heldout_problems.jsonl")

    # runs
    @property
    def pretrain(self) -> str:
        return self.path("pretrain")

    @property
    def sft(self) -> str:
        return self.path("sft")

    @property
    def rl(self) -> str:
        return self.path("rl")

    def evaluation(self, stage: str) -> str:
        return self.path("eval", stage)

    @property
    def report(self) -> str:
        return self.path("report")
