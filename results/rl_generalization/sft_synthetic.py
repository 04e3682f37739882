"""SFT of the main job's model (runs/quickstart) on generated train problems only, for the RL experiments
in this folder's README.

    python -m train.sft --config=results/rl_generalization/sft_synthetic.py:<epochs>,<lr>,<out>[,<problems jsonl>]

The SFT default's recipe (configs/sft/quickstart.py) with the synthetic source alone; <problems jsonl> is
a {"prompt", "completion"} file (default: the embedded 2,000 train problems). Greedy held-out pass@1
every 25 steps, and a checkpoint with it.
"""

from ml_collections import ConfigDict

from configs import base
from configs.sft import quickstart


def get_config(arg: str) -> ConfigDict:
    epochs, lr, out, *rest = arg.split(",")
    cfg = quickstart.get_config()
    cfg.data.sources = ConfigDict({
        "synthetic": base.source("jsonl", {"train": rest[0] if rest else "artifacts/sft/synthetic_train.jsonl",
                                           "validation": "artifacts/sft/synthetic_validation.jsonl"}),
    })
    cfg.optim.lr = float(lr)
    cfg.sft.epochs = float(epochs)
    cfg.train.eval_every = 25
    cfg.checkpoint.every = 25
    cfg.checkpoint.keep_last = 20
    cfg.train.output_dir = out
    return cfg
