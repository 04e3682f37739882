"""The lifecycle's stages: each one command of codelm's own, with the paths of `configs.lifecycle.layout`.

    corpus         python -m data.corpus           the embedded corpus (stdlib) and its code tokenizer
    problems       python -m evals.synthetic       generated train and held-out problems with tests
    curate         python -m data.prepare          filters, decontamination, exact + near dedup, PII,
                                                   repository documents (FIM is applied when training)
    pretrain       python -m train.pretrain        the tiny dense preset on the curated shards
    eval-<stage>   python -m evals.humaneval       pass@k of the stage's checkpoint on the held-out problems
    sft            python -m train.sft             fine-tuning on the generated "sft" problems (an imperfect teacher)
    rl             python -m rl.train              RL with execution rewards on the generated "rl" problems
    report         python -m lifecycle.report      HTML + Markdown report with PNGs
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from typing import Any

from configs.lifecycle.layout import Layout
from lifecycle.curation import write_curation_input

SANDBOX_URL = "<execution service URL>"  # placeholder in argv, replaced by the running service's URL
TRAINED = ("pretrain", "sft", "rl")  # the checkpoints evaluated, in lifecycle order


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    title: str
    argv: tuple[str, ...]
    before: Callable[[], None] | None = None  # in-process preparation (inputs, clearing a partial output)
    after: Callable[[], None] | None = None  # in-process completion (publishing the output)
    always: bool = False  # run even when done before (cheap stages that summarise the others)


def _config_spec(path: str, root: str) -> str:
    return path if ":" in path else f"{path}:{root}"


def _publish(partial: str, final: str) -> Callable[[], None]:
    def publish() -> None:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(partial, final)

    return publish


def _curation_inputs(layout: Layout, partial: str) -> Callable[[], None]:
    def prepare() -> None:
        if os.path.isdir(partial):
            shutil.rmtree(partial)  # an interrupted curation starts over
        write_curation_input(layout.corpus, layout.curation_input)

    return prepare


def lifecycle_stages(config: Any, peak_tflops: float, python: str) -> list[Stage]:
    """The stages of `config` (a `lifecycle.run.LifecycleConfig`), in order."""
    layout: Layout = config.layout
    peak = f"--config.train.peak_tflops_per_device={peak_tflops:.6g}"
    partial = f"{layout.curated}.partial"

    def train(name: str, module: str, *extra: str) -> Stage:
        section = getattr(config, name)
        return Stage(name, f"{module} ({section.config})",
                     (python, "-m", module, f"--config={_config_spec(section.config, layout.root)}", peak, *extra,
                      *section.overrides))

    def evaluate(name: str) -> Stage:
        e = config.eval
        return Stage(f"eval-{name}", f"pass@k of the {name} checkpoint on {config.problems.heldout} held-out problems",
                     (python, "-m", "evals.humaneval", f"--config.problems={layout.heldout_problems}",
                      f"--config.checkpoint={getattr(layout, name)}", f"--config.output={layout.evaluation(name)}",
                      f"--config.ks={e.ks}", f"--config.sampler.samples_per_problem={e.num_samples}",
                      f"--config.sampler.temperature={e.temperature}",
                      f"--config.sampler.max_new_tokens={e.max_new_tokens}",
                      f"--config.sampler.batch_size={e.batch_size}", f"--config.sandbox.url={SANDBOX_URL}"))

    return [
        Stage("corpus", "the embedded corpus and tokenizer",
              (python, "-m", "data.corpus", f"--out_dir={layout.corpus}")),
        Stage("problems", "generated train and held-out problems",
              (python, "-m", "evals.synthetic", f"--out_dir={layout.problems}", f"--train={config.problems.train}",
               f"--heldout={config.problems.heldout}")),
        Stage("curate", "curation of the train split",
              (python, "-m", "data.prepare", f"--input={layout.curation_input}", f"--output_dir={partial}",
               f"--tokenizer={layout.tokenizer}", f"--config.workers={config.curation.workers}",
               f"--config.decontam.eval_files={layout.heldout_problems}", *config.curation.overrides),
              before=_curation_inputs(layout, partial), after=_publish(partial, layout.curated)),
        train("pretrain", "train.pretrain"),
        evaluate("pretrain"),
        train("sft", "train.sft"),
        evaluate("sft"),
        train("rl", "rl.train", f"--config.rl.sandbox={SANDBOX_URL}"),
        evaluate("rl"),
        Stage("report", "the report", (python, "-m", "lifecycle.report", f"--root={layout.root}"), always=True),
    ]
