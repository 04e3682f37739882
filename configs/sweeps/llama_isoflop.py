"""IsoFLOP profiles of the LLaMA-style size presets, for a cluster: one launch command per run.

    python -m train.sweep --config=configs/sweeps/llama_isoflop.py --mode=commands \
        --launcher="sbatch --nodes=1 launch/slurm.sbatch" > runs.sh      # then: bash runs.sh
    python -m train.sweep --config=configs/sweeps/llama_isoflop.py --mode=collect   # as runs finish
    python -m analysis.report --results=results/scaling/llama_isoflop.jsonl --out_dir=results/scaling

Six presets (llama-10m .. llama-400m) x four budgets 3e18 .. 1e20 FLOPs (by the model's own formula),
kept where the run has 200 .. 100k steps. Learning rate and batch size follow DeepSeek LLM's fitted
power laws in compute (Bi et al. 2024, eq. 1: lr = 0.3118 C^-0.125, batch = 0.2920 C^0.3271 tokens),
so each budget has its own optimizer setting and runs do not share a stable phase. The data is the
base config's: point `data.sources` at a real corpus (the embedded one is far too small for these budgets).
"""

from ml_collections import ConfigDict


def get_config(arg: str = "") -> ConfigDict:
    del arg
    cfg = ConfigDict()
    cfg.name = "llama_isoflop"
    cfg.kind = "isoflop"
    cfg.base_config = "configs/base.py"
    cfg.base_overrides = {"data": {"seq_len": 2048}, "optim": {"warmup_steps": 200}, "train": {"eval_batches": 50}}
    cfg.output_dir = "runs/sweeps/llama_isoflop"
    cfg.results = "results/scaling/llama_isoflop.jsonl"
    cfg.seeds = (0,)
    cfg.sizes = {name: {"preset": name} for name in
                 ("llama-10m", "llama-25m", "llama-50m", "llama-100m", "llama-200m", "llama-400m")}
    cfg.compute_budgets = (3e18, 1e19, 3e19, 1e20)
    cfg.min_steps = 200
    cfg.max_steps = 100_000
    cfg.lr = {"kind": "power_law", "coefficient": 0.3118, "exponent": -0.125}
    cfg.batch_tokens = {"kind": "power_law", "coefficient": 0.2920, "exponent": 0.3271}
    cfg.batch_multiple = 64  # rows divisible by data-parallel meshes up to 64 devices
    cfg.decay_fraction = 0.2
    return cfg
