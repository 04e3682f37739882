"""Architecture ablation on the embedded multi-language corpus: GQA vs MHA, SwiGLU vs GELU, x 3 seeds.

    python -m train.sweep --config=configs/sweeps/code_ablation_arch.py
    python -m analysis.report --results=results/scaling/code_ablation_arch.jsonl --out_dir=results/scaling

The base model (configs/sweeps/code_mix.py: d_model 64, 3 layers, 4 query heads sharing 2 KV heads,
SwiGLU d_ff 192) trained for 100 steps (205k tokens); GELU's d_ff 288 keeps the MLP's parameter count.
"""

from ml_collections import ConfigDict


def get_config(arg: str = "") -> ConfigDict:
    del arg
    cfg = ConfigDict()
    cfg.name = "code_ablation_arch"
    cfg.kind = "ablation"
    cfg.base_config = "configs/sweeps/code_mix.py"
    cfg.base_overrides = {}
    cfg.output_dir = "runs/sweeps/code_ablation_arch"
    cfg.results = "results/scaling/code_ablation_arch.jsonl"
    cfg.seeds = (0, 1, 2)
    cfg.rows = {
        "baseline": {},  # GQA: 4 query heads, 2 KV heads; SwiGLU d_ff 192
        "mha": {"model": {"n_kv_heads": 4}},
        "gelu": {"model": {"mlp": "gelu", "d_ff": 288}},  # equal MLP parameters: 2 x 288 = 3 x 192
    }
    cfg.baseline = "baseline"
    cfg.steps = 100
    return cfg
