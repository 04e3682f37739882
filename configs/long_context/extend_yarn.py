"""Context extension: the lifecycle's pretrained `tiny` (rows of 256 tokens) continued at 4x the length
with YaRN, on the same curated repository documents.

    make lifecycle          # or only its stages up to pretrain
    python -m train.pretrain --config=configs/long_context/extend_yarn.py
    python -m train.pretrain --config=configs/long_context/extend_yarn.py:runs/lifecycle --config.train.steps=20

`train.init_from` starts from the short-context run's weights (not its optimizer or step); the model
section changes only what context extension changes: `rope_scaling` YaRN with factor 4 over the
original 256 positions (NTK-by-parts interpolation plus attention temperature, Peng et al. 2023, as
Qwen2.5-Coder extends 32K -> 128K) and `max_seq_len`. The recipe's other half is a short run at a low
learning rate on long documents: repository documents (one per stdlib package) fill the 1,024-token rows.
Raise `rope_theta` instead of (or with) YaRN for a base change (Qwen2.5-Coder's repository stage: 1M).
"""

from ml_collections import ConfigDict

from configs import base
from configs.lifecycle.layout import Layout

SHORT = 256  # the lifecycle's pretraining row length (configs/quickstart.py)
FACTOR = 4


def get_config(root: str = "") -> ConfigDict:
    layout = Layout(root) if root else Layout()
    cfg = base.get_config()
    cfg.model.preset = "tiny"
    cfg.model.max_seq_len = SHORT * FACTOR
    cfg.model.rope_scaling = ConfigDict({"kind": "yarn", "factor": float(FACTOR), "original_max_position": SHORT})
    cfg.train.init_from = layout.pretrain
    cfg.data.sources = ConfigDict({
        "repos": base.source("arrayrecord", {"train": layout.curated_glob, "validation": layout.validation_glob}),
    })
    cfg.data.tokenizer_path = layout.tokenizer
    cfg.data.seq_len = SHORT * FACTOR
    cfg.data.batch_size = 4  # the same tokens per step as the short run's 16 x 256
    cfg.data.fim.level = "document"
    cfg.data.fim.fim_rate = 0.25
    cfg.optim.lr = 3e-4  # a tenth of the short run's peak
    cfg.optim.warmup_steps = 10
    cfg.train.steps = 100
    cfg.train.log_every = 10
    cfg.train.eval_every = 50
    cfg.train.eval_batches = 8
    cfg.train.output_dir = "runs/long_context/extend_yarn"
    cfg.checkpoint.every = 50
    return cfg
