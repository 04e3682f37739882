"""IsoFLOP profiles of tiny code models on the embedded multi-language corpus (a CPU benchmark).

    python -m train.sweep --config=configs/sweeps/code_isoflop.py
    python -m analysis.report --results=results/scaling/code_isoflop.jsonl --out_dir=results/scaling

Seven sizes (4k-305k non-embedding parameters) x three compute budgets (FLOPs by the model's own
formula, 2x apart): every size sees three token budgets, D = C / flops_per_token(N), except the
largest at the smallest budget (26 steps, under min_steps) and the smallest at the largest (over max_steps). Sized for a 2-core CPU shared with other
jobs: about 35 minutes. (d16 and d24, then d12, were added after the larger sizes had run, when the
IsoFLOP minima sat at the smallest size; a rerun of the command trains only missing runs.) WSD with a 20%
decay: each size's longest run is the trunk the shorter budgets branch from.
"""

from ml_collections import ConfigDict


def size(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, d_ff: int) -> dict:
    return {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
            "head_dim": d_model // n_heads, "d_ff": d_ff}


def get_config(arg: str = "") -> ConfigDict:
    del arg
    cfg = ConfigDict()
    cfg.name = "code_isoflop"
    cfg.kind = "isoflop"
    cfg.base_config = "configs/sweeps/code_mix.py"
    cfg.base_overrides = {}
    cfg.output_dir = "runs/sweeps/code_isoflop"
    cfg.results = "results/scaling/code_isoflop.jsonl"
    cfg.seeds = (0,)
    cfg.sizes = {
        "d12": size(12, 2, 2, 1, 36),
        "d16": size(16, 2, 2, 1, 48),
        "d24": size(24, 2, 2, 1, 72),
        "d32": size(32, 2, 2, 1, 96),
        "d48": size(48, 2, 2, 1, 128),
        "d64": size(64, 3, 4, 2, 192),
        "d96": size(96, 3, 4, 2, 256),
    }
    cfg.compute_budgets = (2.5e11, 5e11, 1e12)
    cfg.min_steps = 30
    cfg.max_steps = 1100
    cfg.lr = {"kind": "fixed", "value": 4e-3}
    cfg.batch_tokens = {"kind": "fixed", "value": 2048.0}
    cfg.decay_fraction = 0.2
    cfg.branch = True
    return cfg
