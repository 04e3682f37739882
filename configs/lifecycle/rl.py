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
    cfg.rl.reward = "binary"  # the SFT model passes ~half its samples: all-tests-pass gives mixed groups
    # 16 problems x 8 samples per rollout batch (not 4 x 16): with 4 problems a batch's reward is mostly which
    # problems were drawn (a first run with 4 x 16 at lr 1e-4: held-out pass@1 0.478 -> 0.476; 16 x 8: 0.483).
    cfg.rl.prompts_per_batch = 16
    cfg.rl.group_size = 8
    cfg.rl.temperature = 0.8  # the recorded run's (results/lifecycle); the RL default samples at 1.0
    # 1e-4, as the RL default: 3e-4 made importance ratios reach 12 after one update and held-out pass@1
    # fell 0.478 -> 0.304 (results/lifecycle/README.md).
    cfg.optim.lr = 1e-4
    cfg.rl.eval.problems = ""
    cfg.train.output_dir = layout.rl
    return cfg
