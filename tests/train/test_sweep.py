"""train.sweep: run expansion (IsoFLOP sizing, WSD branch points), launch commands, config hashes,
smoothed losses, and (slow) a local sweep whose branched runs equal runs trained from scratch."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from ml_collections import ConfigDict

from configs.schema import ConfigError, parse
from train import sweep as sweep_mod
from train.optimizer import learning_rate_schedule
from train.sweep import (
    SweepConfig,
    apply_overrides,
    config_hash,
    expand,
    launch_command,
    read_results,
    resolve,
    smoothed_loss,
)

SIZES = {"a": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "d_ff": 96},
         "b": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "d_ff": 192}}


def isoflop_sweep(**overrides) -> SweepConfig:
    values = {"name": "t", "kind": "isoflop", "base_config": "configs/sweeps/code_mix.py", "output_dir": "runs/t",
              "results": "t.jsonl", "sizes": SIZES, "compute_budgets": (1e11, 2e11, 4e11), "min_steps": 10,
              "lr": {"kind": "fixed", "value": 1e-3}, **overrides}
    return parse(SweepConfig, values)


def test_isoflop_runs_take_their_tokens_from_the_model_flop_formula():
    sweep = isoflop_sweep()
    runs = expand(sweep)
    base = resolve(sweep, {})
    tokens_per_step = base.data.batch_size * base.data.seq_len
    assert len(runs) == 6
    for run in runs:
        config = resolve(sweep, run.overrides)
        fpt = config.model.flops_per_token(config.data.seq_len)
        assert run.overrides["train.steps"] == round(run.labels["compute_budget"] / fpt / tokens_per_step)
        assert config.optim.schedule == "wsd" and config.optim.lr == 1e-3
    # min_steps drops the runs too short to be meaningful.
    shortest = min(r.overrides["train.steps"] for r in runs)
    assert len(expand(isoflop_sweep(min_steps=shortest + 1))) < 6


def test_shorter_budgets_branch_where_their_decay_begins():
    sweep = isoflop_sweep()
    runs = expand(sweep)
    by_name = {r.name: r for r in runs}
    for size in SIZES:
        group = [r for r in runs if r.labels["size"] == size]
        trunk = group[0]
        assert trunk.branch_from is None
        assert trunk.overrides["train.steps"] == max(r.overrides["train.steps"] for r in group)
        for run in group[1:]:
            optim = resolve(sweep, run.overrides).optim
            steps = run.overrides["train.steps"]
            if run.branch_from is None:  # its decay would begin inside the warmup: nothing to share
                assert steps - int(steps * optim.wsd_decay_fraction) <= optim.warmup_steps
                continue
            name, start = run.branch_from
            assert by_name[name] is trunk
            mine = learning_rate_schedule(optim, run.overrides["train.steps"])
            theirs = learning_rate_schedule(optim, trunk.overrides["train.steps"])
            # The same learning rate at every step before the branch point, and decay from it on.
            np.testing.assert_array_equal([mine(s) for s in range(start)], [theirs(s) for s in range(start)])
            assert mine(start + 1) < theirs(start + 1)
    assert sum(r.branch_from is not None for r in runs) >= 3
    assert all(r.branch_from is None for r in expand(isoflop_sweep(branch=False)))


def test_power_law_rules_give_each_budget_its_own_optimizer_and_trunk():
    runs = expand(isoflop_sweep(lr={"kind": "power_law", "coefficient": 0.3118, "exponent": -0.125},
                                batch_tokens={"kind": "power_law", "coefficient": 0.2920, "exponent": 0.3271},
                                batch_multiple=8))
    assert all(r.branch_from is None for r in runs)
    lrs = sorted({r.overrides["optim.lr"] for r in runs})
    assert lrs == pytest.approx([0.3118 * c**-0.125 for c in (4e11, 2e11, 1e11)])
    for run in runs:  # 0.292 C^0.3271 tokens per step, as rows of 128 tokens in multiples of 8
        rows = 0.2920 * run.labels["compute_budget"] ** 0.3271 / 128
        assert run.overrides["data.batch_size"] == 8 * max(1, round(rows / 8))


def test_launch_command_is_the_run():
    sweep = isoflop_sweep(base_overrides={"train": {"eval_batches": 4}})
    run = expand(sweep)[1]
    words = shlex.split(launch_command(sweep, run, "sbatch launch/slurm.sbatch"))
    assert words[:3] == ["sbatch", "launch/slurm.sbatch", "configs/sweeps/code_mix.py"]
    parsed = dict(w.removeprefix("--config.").split("=", 1) for w in words[3:])
    assert parsed["train.output_dir"] == f"runs/t/{run.name}" and parsed["train.eval_batches"] == "4"
    # Evaluated often enough for the smoothed loss (3 evals in the last 10% of steps) and at the end.
    assert int(parsed["train.eval_every"]) == max(1, round(run.overrides["train.steps"] * 0.1 / 2))
    for key, value in run.overrides.items():
        assert parsed[key] == str(value)


def test_config_hash_ignores_paths_and_logging_but_not_the_run():
    sweep = isoflop_sweep()
    run = expand(sweep)[0]
    reference = config_hash(resolve(sweep, run.overrides))
    same = {**run.overrides, "train.output_dir": "elsewhere", "checkpoint.every": 7, "train.log_every": 3}
    assert config_hash(resolve(sweep, same)) == reference
    for key, value in (("optim.lr", 2e-3), ("train.seed", 1), ("model.d_ff", 64)):
        assert config_hash(resolve(sweep, {**run.overrides, key: value})) != reference, key


def test_overrides_name_a_missing_field():
    cfg = ConfigDict({"train": {"steps": 1}})
    assert apply_overrides(cfg, {"train.steps": 5}).train.steps == 5
    with pytest.raises(ConfigError, match="no field 'stpes'"):
        apply_overrides(cfg, {"train.stpes": 5})
    with pytest.raises(ConfigError, match="no section 'trian'"):
        apply_overrides(cfg, {"trian.steps": 5})


def test_sweep_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="compute_budgets"):
        isoflop_sweep(compute_budgets=())
    with pytest.raises(ConfigError, match="baseline"):
        parse(SweepConfig, {"name": "a", "kind": "ablation", "base_config": "x.py", "output_dir": "o",
                            "results": "r.jsonl", "rows": {"base": {}}, "baseline": "other"})


def test_smoothed_loss_reads_a_line_through_the_last_evals_at_the_end():
    evals = [(80, 9.0), (90, 3.0), (95, 2.5), (100, 2.0)]
    assert smoothed_loss(evals, 100, n_evals=3, fraction=0.1) == pytest.approx(2.0)
    noisy = [(90, 3.1), (95, 2.4), (100, 2.1)]  # a line fit, read at step 100
    slope, intercept = np.polyfit([90, 95, 100], [3.1, 2.4, 2.1], 1)
    assert smoothed_loss(noisy, 100, 3, 0.1) == pytest.approx(slope * 100 + intercept)
    assert smoothed_loss([(100, 2.2)], 100, 3, 0.1) == 2.2
    assert smoothed_loss([(10, 5.0)], 100, 3, 0.1) is None


def test_ablation_rows_times_seeds():
    sweep = parse(SweepConfig, {"name": "a", "kind": "ablation", "base_config": "configs/sweeps/code_mix.py",
                                "output_dir": "o", "results": "r.jsonl", "seeds": (0, 1), "steps": 50,
                                "rows": {"base": {}, "mha": {"model": {"n_kv_heads": 4}}}, "baseline": "base"})
    runs = expand(sweep)
    assert [r.name for r in runs] == ["base-s0", "base-s1", "mha-s0", "mha-s1"]
    config = resolve(sweep, runs[3].overrides)
    assert (config.model.n_kv_heads, config.train.seed, config.data.shuffle_seed, config.train.steps) == (4, 1, 1, 50)
    assert runs[3].labels == {"row": "mha", "seed": 1, "baseline": "base"}


# ------------------------------------------------------------------------------ a real local sweep
@pytest.mark.slow
def test_local_sweep_branches_equal_runs_from_scratch_and_reruns_skip(tmp_path, corpus_dir):
    base = tmp_path / "base.py"
    base.write_text(
        "from tests.train.conftest import small_run_config\n"
        "def get_config(arg=''):\n"
        f"    cfg = small_run_config(__import__('pathlib').Path({str(corpus_dir)!r}), 'unused')\n"
        "    cfg.train.eval_batches = 2\n"
        "    cfg.checkpoint.every = 5\n"
        "    return cfg\n")
    tokens_per_step = 8 * 64

    def grid(name: str, branch: bool) -> SweepConfig:
        return parse(SweepConfig, {
            "name": name, "kind": "grid", "base_config": str(base), "output_dir": str(tmp_path / name),
            "results": str(tmp_path / f"{name}.jsonl"), "sizes": {"m": {"d_model": 64}},
            "token_budgets": (12 * tokens_per_step, 24 * tokens_per_step), "lr": {"kind": "fixed", "value": 1e-2},
            "branch": branch})

    branched, scratch = grid("branched", True), grid("scratch", False)
    for sweep in (branched, scratch):
        sweep_mod.run_sweep(sweep, expand(sweep))
    a, b = read_results(branched.results), read_results(scratch.results)
    short = "m-T6.14e+03-s0"
    assert a[short]["branched_from"] == ["m-T1.23e+04-s0", 10] and b[short]["branched_from"] is None
    for name in a:
        assert a[name]["config_hash"] == b[name]["config_hash"]
        assert a[name]["eval_loss"] == pytest.approx(b[name]["eval_loss"], rel=1e-5), name
    assert a[short]["tokens"] == 12 * tokens_per_step and a[short]["steps"] == 12
    lines = (tmp_path / "branched.jsonl").read_text().splitlines()
    sweep_mod.run_sweep(branched, expand(branched))  # everything recorded: nothing reruns
    assert (tmp_path / "branched.jsonl").read_text().splitlines() == lines
    assert json.loads(lines[0])["eval_loss_smoothed"] is not None
