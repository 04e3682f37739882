"""Lifecycle stage: RL with execution rewards from the SFT model, on the generated train problems.

    python -m rl.train --config=configs/lifecycle/rl.py:runs/lifecycle --config.rl.sandbox=<service URL>

The lifecycle runner starts the execution service and passes its URL; held-out pass@k is the
lifecycle's evaluation stage, so the run itself does not evaluate.
"""

from ml_collections import ConfigDict

from configs.lifecycle.layout import Layout
from configs.rl import quickstart


def get_config(root: str = "") -> ConfigDict:
    layout = Layout(root) if root else Layout()
    cfg = quickstart.get_config()
    cfg.rl.init_from = layout.sft
    cfg.rl.problems = layout.train_problems
    cfg.rl.num_problems = 4000
    cfg.rl.reward = "binary"
    cfg.rl.eval.problems = ""
    cfg.train.output_dir = layout.rl
    return cfg
