"""Lifecycle stage: supervised fine-tuning of the pretrained model on the embedded instruction set.

    python -m train.sft --config=configs/lifecycle/sft.py:runs/lifecycle

The SFT default's recipe and data (configs/sft/quickstart.py): 2,000 generated problems of
the "sft" split as an imperfect teacher writes them (evals/synthetic.py: a docstring with an example call ->
the body, 22% of the bodies with one plausible bug that the RL stage then trains away), prompt and
completion packed several per row, loss on the completion. Held-out pass@k is the lifecycle's evaluation
stage (the same for every checkpoint), so the run itself reports held-out loss only.
"""

from ml_collections import ConfigDict

from configs import base
from configs.lifecycle.layout import Layout
from configs.sft import quickstart


def get_config(root: str = "") -> ConfigDict:
    layout = Layout(root) if root else Layout()
    cfg = quickstart.get_config()
    cfg.sft.init_from = layout.pretrain
    cfg.data.sources = ConfigDict({
        "synthetic": base.source("jsonl", {"train": f"{layout.problems}/synthetic_sft_imperfect.jsonl",
                                           "validation": f"{layout.problems}/synthetic_validation.jsonl"}),
    })
    cfg.sft.eval.problems = ""
    cfg.train.eval_every = 100
    cfg.train.eval_batches = 10
    cfg.train.output_dir = layout.sft
    cfg.checkpoint.every = 100
    return cfg
