"""Code SFT of a mixture-of-experts model (Qwen3-30B-A3B class).

    python -m train.sft --config=configs/sft/moe_code.py --config.sft.init_from=path/to/Qwen3-30B-A3B ...

Hyperparameters encode the findings quoted in codelm issue 12 for code SFT of MoE models: they collapse at
global batch sizes >= 512, and want learning rates 5e-6..1e-5, a constant schedule and more epochs than
dense models (the issue cites them as published; the primary source was not re-checked here). MoE runs
log per-layer expert load (`moe/expert_load/layer_i/max_over_mean` in metrics.jsonl).
"""

from ml_collections import ConfigDict

from configs.sft import base


def get_config(arg: str = "") -> ConfigDict:
    cfg = base.get_config(arg)
    cfg.data.batch_size = 256  # keep well below 512
    cfg.optim.lr = 1e-5  # 5e-6..1e-5
    cfg.optim.schedule = "constant"
    cfg.sft.epochs = 5.0
    cfg.sft.warmup_ratio = 0.03
    cfg.mesh.ici.expert = 1  # raise to shard experts (expert parallelism)
    cfg.train.output_dir = "runs/sft-moe"
    return cfg
