"""Lifecycle stage: RL with execution rewards from the SFT model, on the generated problems.

    python -m rl.train --config=configs/lifecycle/rl.py:runs/lifecycle --config.rl.sandbox=<service URL>

The RL default's recipe (configs/rl/quickstart.py: RLOO on the "rl" split's problems, whose constants the
SFT stage never showed, 16 problems x 8 samples at T 1.0, binary reward, lr 5e-5, 40 updates). The
lifecycle runner starts the execution service and passes its URL; held-out pass@k is the lifecycle's
evaluation stage, so the run itself does not evaluate.
"""

from ml_collections import ConfigDict

from configs.lifecycle.layout import Layout
from configs.rl import quickstart


def get_config(root: str = "") -> ConfigDict:
    layout = Layout(root) if root else Layout()
    cfg = quickstart.get_config()
    cfg.rl.init_from = layout.sft
    cfg.rl.eval.problems = ""
    cfg.train.output_dir = layout.rl
    return cfg
