"""rl.train end to end on a tiny codelm run against a real execution service process: rollouts, rewards,
updates, rollout metrics and the time split; exact resume after a kill (the same rollouts and losses);
a service killed and restarted mid-run (its failures become the configured reward and a count)."""

import json
import shutil
import threading

import numpy as np
import pytest

from configs.rl import base as rl_base
from rl.train import load_rl_config, train_problems, train_rl
from sandbox.local import LocalSandbox
from tests.train.conftest import small_run
from tests.train.test_trainer import make_task, one_device, train


@pytest.fixture(scope="module")
def pretrained(corpus_dir, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_pretrained") / "run"
    run = small_run(corpus_dir, out, train__steps=2)
    train(run, make_task(run, tokenizer), mesh=one_device())
    return out


@pytest.fixture(scope="module")
def service():
    with LocalSandbox(workers=2) as s:
        yield s


@pytest.fixture(scope="module")
def coin_problems(tmp_path_factory):
    """Problems a random tiny model solves about half the time, so groups have reward variance: the
    completion is the body of a string literal and the test passes when its length is even."""
    path = tmp_path_factory.mktemp("rl_problems") / "coin.jsonl"
    records = [{"task_id": f"coin/{i}", "prompt": f"# coin {i}\ns = \"\"\"", "entry_point": "s",
                "test": '"""\n\ndef check(candidate):\n    assert len(candidate) % 2 == 0'} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rl_config(pretrained, out, problems="synthetic", **fields):
    cfg = rl_base.get_config()
    cfg.rl.init_from = str(pretrained)
    cfg.rl.problems = str(problems)
    cfg.rl.num_problems = 40
    cfg.rl.group_size, cfg.rl.prompts_per_batch, cfg.rl.mini_batches = 4, 4, 2  # 8 rows: the 8-device mesh
    cfg.rl.max_prompt_len, cfg.rl.max_response_len = 192, 16
    cfg.rl.eval.problems = ""
    cfg.rl.retry_deadline_s = 2.0
    cfg.rl.error_reward = -1.0
    cfg.optim.lr = 1e-3
    cfg.train.steps = 4
    cfg.train.output_dir = str(out)
    cfg.checkpoint.every = 1
    cfg.checkpoint.keep_last = 10
    cfg.checkpoint.async_save = False
    cfg.mesh.ici.fsdp = 1
    cfg.mesh.ici.data = -1
    for key, value in fields.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def records(out, split):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.mark.slow  # ~2 min on the loaded 2-core machine (3 runs with compilation)
def test_rl_runs_end_to_end_and_resumes_exactly(pretrained, service, coin_problems, tmp_path):
    out = tmp_path / "rl"
    run = load_rl_config(rl_config(pretrained, out, coin_problems))
    assert run.data.batch_size == 8 and run.data.seq_len == 208 and run.model.d_model == 64
    summary = train_rl(run, urls=[service.url])
    assert summary["steps"] == 4 and summary["rollout_batches"] == 2
    rollouts, steps = records(out, "rollout"), records(out, "train")
    assert [r["step"] for r in rollouts] == [1, 3]  # a rollout batch every mini_batches = 2 updates
    for r in rollouts:
        assert r["rewards_sampled"] == 16 and r["service_errors"] == 0 and 0 <= r["reward_mean"] <= 1
        assert r["rollout_s"] > 0 and r["response_len_mean"] > 0
    # the first update of a rollout batch is on-policy: ratio 1 (sampler log-probs equal the learner's)
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-3) and steps[0]["clip_frac"] == 0
    assert all(np.isfinite(s["loss"]) and s["entropy"] > 0 for s in steps)
    assert any(r["zero_variance_groups"] < 1 for r in rollouts) and any(s["loss"] != 0 for s in steps)
    assert steps[1]["ratio_mean"] != pytest.approx(1.0, abs=1e-7)  # the second mini-batch is off-policy
    assert (out / "reward_curve.png").is_file() and summary["time_split_s"]["rollout"] > 0

    # resume from step 1 (mid rollout batch: the unused mini-batch is in the checkpoint) and from step 2
    for start in (1, 2):
        again = tmp_path / f"resume{start}"
        shutil.copytree(out, again)
        for step_dir in (again / "checkpoints").iterdir():
            if step_dir.name.isdigit() and int(step_dir.name) > start:
                shutil.rmtree(step_dir)
        (again / "metrics.jsonl").unlink()
        train_rl(load_rl_config(rl_config(pretrained, again, coin_problems)), urls=[service.url])
        resumed = records(again, "train")
        assert [r["step"] for r in resumed] == list(range(start + 1, 5))
        np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in steps[start:]], rtol=1e-5)
        assert [r["reward_mean"] for r in records(again, "rollout")] == [r["reward_mean"] for r in rollouts
                                                                          if r["step"] > start]


@pytest.mark.slow
def test_rl_survives_a_service_killed_and_restarted(pretrained, coin_problems, tmp_path):
    out = tmp_path / "restart"
    service = LocalSandbox(workers=2).start()
    port = service.url.rsplit(":", 1)[1]
    restarted = []
    try:
        run = load_rl_config(rl_config(pretrained, out, coin_problems, train__steps=6, rl__prompts_per_batch=2, rl__mini_batches=1))
        killed = threading.Event()

        def kill_then_restart():  # after the first rollout batch is scored: down for a while, then back
            import time  # noqa: PLC0415

            while not (out / "metrics.jsonl").is_file() or not records(out, "rollout"):
                time.sleep(0.2)
            service.proc.kill()
            service.proc.wait()
            killed.set()
            time.sleep(8)
            restarted.append(LocalSandbox(workers=2, port=int(port)).start())

        thread = threading.Thread(target=kill_then_restart, daemon=True)
        thread.start()
        summary = train_rl(run, urls=[service.url])
        thread.join(60)
    finally:
        service.stop()
        for s in restarted:
            s.stop()
    rollouts = records(out, "rollout")
    assert killed.is_set() and restarted and summary["steps"] == 6 and len(rollouts) == 6
    errors = [r["service_errors"] for r in rollouts]
    assert errors[0] == 0 and sum(errors) > 0  # scored as error_reward and counted while it was down...
    assert errors[-1] == 0  # ... and scored again once it was back
    down = [r for r in rollouts if r["service_errors"] == r["rewards_sampled"]]
    assert all(r["reward_mean"] == -1.0 for r in down)


@pytest.mark.slow
def test_rl_with_reference_kl_truncated_is_and_dynamic_sampling(pretrained, service, coin_problems, tmp_path):
    """The other paths: a frozen reference (KL k3), old log-probs recomputed by the learner with truncated
    IS against the sampler's, GSPO's sequence ratio, DAPO dynamic sampling and the soft overlong penalty."""
    out = tmp_path / "variants"
    run = load_rl_config(rl_config(pretrained, out, coin_problems, train__steps=2, rl__mini_batches=1,
                                   rl__prompts_per_batch=2, rl__kl_coef=0.1, rl__tis_cap=2.0, rl__ratio="sequence",
                                   rl__dynamic_sampling=True, rl__overlong="soft", rl__overlong_cache=8,
                                   rl__estimator="grpo", rl__aggregation="seq-mean-token-mean"))
    summary = train_rl(run, urls=[service.url])
    steps, rollouts = records(out, "train"), records(out, "rollout")
    assert summary["steps"] == 2 and len(rollouts) == 2
    # step 1: policy == reference == old policy, and the learner's log-probs match the sampler's
    assert steps[0]["kl_ref"] == pytest.approx(0.0, abs=1e-5)
    assert steps[0]["is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert abs(steps[0]["sampler_kl"]) < 1e-3
    assert steps[1]["kl_ref"] > 0  # after one update the policy moved away from the reference
    assert all(1 <= r["sampling_rounds"] <= 3 and r["chosen_groups"] <= 2 for r in rollouts)


def test_rl_configs_load_and_name_bad_fields(pretrained, tmp_path):
    from configs.rl import quickstart  # noqa: PLC0415
    from configs.schema import ConfigError  # noqa: PLC0415

    cfg = quickstart.get_config()
    cfg.rl.init_from = str(pretrained)
    run = load_rl_config(cfg)
    assert run.rl.group_size == 8 and run.rl.prompts_per_batch == 16 and run.rl.estimator == "rloo"
    assert run.data.batch_size == 64 and run.rl.sequences_per_row == 8  # 16 x 8 sequences, 2 mini-batches
    assert run.data.seq_len == 256 and run.data.tokenizer_path == str(pretrained / "tokenizer.model")
    with pytest.raises(ConfigError, match="rl.init_from"):
        load_rl_config(rl_base.get_config())
    with pytest.raises(ConfigError, match="rl.mini_batches"):
        load_rl_config(rl_config(pretrained, tmp_path, rl__mini_batches=3))
    with pytest.raises(ConfigError, match="rl.estimator"):
        load_rl_config(rl_config(pretrained, tmp_path, rl__estimator="ppo"))
    with pytest.raises(ConfigError, match=r"rl\.dual_clip: must be 0 \(off\) or > 1"):
        load_rl_config(rl_config(pretrained, tmp_path, rl__dual_clip=0.5))
    with pytest.raises(ConfigError, match="rl.synthetic_split"):
        load_rl_config(rl_config(pretrained, tmp_path, rl__synthetic_split="heldout"))
    with pytest.raises(ConfigError, match=r"rl\.num_problems: only \d+ distinct rl problems exist"):
        train_problems(load_rl_config(rl_config(pretrained, tmp_path, rl__synthetic_split="rl", rl__num_problems=5000)).rl,
                       lambda text: [0])
