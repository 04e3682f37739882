"""Lifecycle stage: supervised fine-tuning of the pretrained model on the embedded instruction set.

    python -m train.sft --config=configs/lifecycle/sft.py:runs/lifecycle

The generated train problems (evals/synthetic.py: a docstring with an example call -> the body), prompt
and completion packed several per row, loss on the completion only. Held-out pass@k is the lifecycle's
evaluation stage (the same for every checkpoint), so the run itself reports held-out loss only.
"""

from ml_collections import ConfigDict

from configs import base
from configs.lifecycle.layout import Layout
from configs.sft import base as sft_base


def get_config(root: str = "") -> ConfigDict:
    layout = Layout(root) if root else Layout()
    cfg = sft_base.get_config()
    cfg.sft.init_from = layout.pretrain
    cfg.data.sources = ConfigDict({
        "synthetic": base.source("jsonl", {"train": f"{layout.problems}/synthetic_train.jsonl",
                                           "validation": f"{layout.problems}/synthetic_validation.jsonl"}),
    })
    cfg.data.seq_len = 256
    cfg.data.batch_size = 16
    cfg.optim.lr = 1e-3
    cfg.optim.schedule = "cosine"
    cfg.optim.min_lr_ratio = 0.1
    cfg.sft.epochs = 3.0
    cfg.sft.warmup_ratio = 0.03
    cfg.train.log_every = 10
    cfg.train.eval_every = 100
    cfg.train.eval_batches = 10
    cfg.train.output_dir = layout.sft
    cfg.checkpoint.every = 100
    cfg.checkpoint.keep_last = 2
    return cfg
