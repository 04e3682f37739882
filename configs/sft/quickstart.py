"""The embedded SFT default: the main job's model (runs/quickstart) fine-tuned on the generated problems.

    make sft        # = python -m train.sft --config=configs/sft/quickstart.py (after make quickstart)

Data (built on first use, no download): 2,000 problems of `evals/synthetic.py`'s "sft" split as
prompt/completion pairs (a signature and docstring with an example call -> the body), loss on the
completion. The "sft" split leaves out the constants kept for RL (the "rl" split, `make rl`). Held-out
loss and greedy pass@1 on the 100 held-out problems (constants never seen in training) through a private
execution service, before training and every train.eval_every steps. Six epochs: pass@1 rises late, as
the cosine schedule decays (0.12 after three epochs, 0.49 after four, 0.61 after six; 0.68 when the
2,000 problems come from the whole train split; results/rl_generalization/README.md).
configs/sft/stdlib.py adds the standard library's documented functions.
"""

from ml_collections import ConfigDict

from configs import base
from configs.sft import stdlib


def get_config(arg: str = "") -> ConfigDict:
    cfg = stdlib.get_config(arg)
    cfg.data.sources = ConfigDict({
        "synthetic": base.source("jsonl", {"train": "artifacts/sft/synthetic_sft.jsonl",
                                           "validation": "artifacts/sft/synthetic_validation.jsonl"}),
    })
    cfg.optim.lr = 1e-3  # a 5M-parameter model pretrained at 3e-3 (configs/quickstart.py)
    cfg.sft.epochs = 6.0
    cfg.train.eval_every = 100
    cfg.checkpoint.every = 100
    cfg.train.output_dir = "runs/sft-quickstart"
    return cfg
