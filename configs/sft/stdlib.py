"""The main job's model (runs/quickstart) fine-tuned on code this machine holds: the standard library's
documented functions and the generated problems together.

    python -m train.sft --config=configs/sft/stdlib.py        # after make quickstart

Data (built on first use, no download): prompt/completion pairs from the Python standard library's
documented functions (data/sft_corpus.py: signature + docstring -> body, held-out split by file) and
from a generated family of small programming problems (evals/synthetic.py, train split). Held-out
loss on both validation sets; pass@1 on the held-out synthetic problems through a private execution
service, before training and every train.eval_every steps. Most of its steps go to the stdlib pairs, and
held-out pass@1 ends at 0.01 (results/rl_generalization/README.md): `make sft` (configs/sft/quickstart.py)
trains on the problems alone and ends at 0.68.
"""

from ml_collections import ConfigDict

from configs import base
from configs.sft import base as sft_base


def get_config(arg: str = "") -> ConfigDict:
    cfg = sft_base.get_config(arg)
    cfg.sft.init_from = "runs/quickstart"
    cfg.data.sources = ConfigDict({
        "stdlib": base.source("jsonl", {"train": "artifacts/sft/train.jsonl", "validation": "artifacts/sft/validation.jsonl"}),
        "synthetic": base.source("jsonl", {"train": "artifacts/sft/synthetic_train.jsonl",
                                           "validation": "artifacts/sft/synthetic_validation.jsonl"}),
    })
    cfg.data.seq_len = 256
    cfg.data.batch_size = 16
    cfg.optim.lr = 5e-4  # a 5M-parameter model pretrained at 3e-3 (configs/quickstart.py)
    cfg.optim.schedule = "cosine"
    cfg.optim.min_lr_ratio = 0.1
    cfg.sft.epochs = 2.0
    cfg.sft.warmup_ratio = 0.03
    cfg.train.log_every = 10
    cfg.train.eval_every = 250
    cfg.train.eval_batches = 20
    cfg.train.output_dir = "runs/sft-stdlib"
    cfg.checkpoint.every = 250
    cfg.checkpoint.keep_last = 2
    cfg.sampler.max_len = 512
    cfg.sft.eval.problems = "synthetic"
    cfg.sft.eval.sandbox = "local"
    cfg.sft.eval.max_new_tokens = 96
    return cfg
