"""Code SFT of a dense model (Qwen2.5-Coder / DeepSeek-Coder / StarCoder2 class).

    python -m train.sft --config=configs/sft/dense_code.py --config.sft.init_from=path/to/checkpoint ...

Hyperparameters encode the findings quoted in codelm issue 12 for code SFT of dense models: training is
stable at global batch sizes 64-256 with learning rates 2e-6..5e-6 over 3-5 epochs (the issue cites them
as published; the primary source was not re-checked here).
"""

from ml_collections import ConfigDict

from configs.sft import base


def get_config(arg: str = "") -> ConfigDict:
    cfg = base.get_config(arg)
    cfg.data.batch_size = 128  # stable range: 64-256
    cfg.optim.lr = 5e-6  # 2e-6..5e-6
    cfg.optim.schedule = "cosine"
    cfg.sft.epochs = 3.0  # 3-5
    cfg.sft.warmup_ratio = 0.03
    cfg.train.output_dir = "runs/sft-dense"
    return cfg
