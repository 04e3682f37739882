"""The lifecycle runner: stages in order, finished stages skipped, a failed or interrupted stage resumed."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from configs.lifecycle import default
from configs.schema import ConfigError
from lifecycle import run as lifecycle_run
from lifecycle.curation import repository_of
from lifecycle.run import Interrupted, LifecycleState, ServiceOnDemand, StageFailed, load_config, run_stages
from lifecycle.stages import SANDBOX_URL, Stage, lifecycle_stages

REPO = Path(__file__).resolve().parents[2]


def _append(log: Path, name: str, fail_if: Path | None = None) -> Stage:
    """A stage whose command appends its name to `log` (and fails while `fail_if` exists)."""
    code = f"import pathlib; p = pathlib.Path({str(log)!r}); p.write_text(p.read_text() + {name!r} + ' ' if p.exists() else {name!r} + ' ')"
    if fail_if is not None:
        code += f"\nimport sys; sys.exit(3 if pathlib.Path({str(fail_if)!r}).exists() else 0)"
    return Stage(name, name, (sys.executable, "-c", code))


def test_stages_run_in_order_and_finished_ones_are_skipped(tmp_path):
    log, flag = tmp_path / "order.txt", tmp_path / "fail"
    flag.touch()
    stages = [_append(log, "a"), _append(log, "b", fail_if=flag), _append(log, "c")]
    state = LifecycleState.load(tmp_path)
    service = ServiceOnDemand("http://unused:1", 1)
    with pytest.raises(StageFailed, match=r"b failed \(exit 3\)"):
        run_stages(stages, state, service, tmp_path / "logs")
    assert log.read_text() == "a b "
    assert list(json.loads((tmp_path / "lifecycle.json").read_text())["stages"]) == ["a"]

    flag.unlink()  # the cause is fixed: the same command again goes on from the failed stage
    run_stages(stages, LifecycleState.load(tmp_path), service, tmp_path / "logs")
    assert log.read_text() == "a b b c "
    state = LifecycleState.load(tmp_path)
    assert all(state.is_done(name) for name in "abc")
    assert "-c" in state.stages["c"]["command"]
    assert (tmp_path / "logs" / "b.log").read_text().count("$ ") == 2  # both attempts, appended

    run_stages(stages, LifecycleState.load(tmp_path), service, tmp_path / "logs")  # all done: nothing runs
    assert log.read_text() == "a b b c "


def test_sandbox_placeholder_is_replaced_by_the_service_url(tmp_path):
    out = tmp_path / "argv.json"
    stage = Stage("s", "s", (sys.executable, "-c", f"import json, sys; json.dump(sys.argv[1:], open({str(out)!r}, 'w'))",
                             f"--config.rl.sandbox={SANDBOX_URL}"))
    run_stages([stage], LifecycleState.load(tmp_path), ServiceOnDemand("http://127.0.0.1:9", 1), tmp_path / "logs")
    assert json.loads(out.read_text()) == ["--config.rl.sandbox=http://127.0.0.1:9"]


def test_sigterm_reaches_the_stage_and_the_stage_is_not_recorded(tmp_path):
    """The runner forwards SIGTERM to the running stage (a training stage checkpoints on it) and stops."""
    marker = tmp_path / "got_sigterm"
    child = textwrap.dedent(f"""
        import signal, sys, time, pathlib
        def stop(signum, frame):
            pathlib.Path({str(marker)!r}).touch()
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
    """)
    driver = textwrap.dedent(f"""
        import sys
        from lifecycle.run import Interrupted, LifecycleState, ServiceOnDemand, run_stages
        from lifecycle.stages import Stage
        stages = [Stage("long", "long", (sys.executable, "-c", {child!r}))]
        try:
            run_stages(stages, LifecycleState.load({str(tmp_path)!r}), ServiceOnDemand("http://unused:1", 1),
                       __import__("pathlib").Path({str(tmp_path / "logs")!r}))
        except Interrupted as e:
            sys.exit(128 + e.signum)
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:  # the stage's output is teed to stderr
        if line.strip() == "ready" or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert marker.exists()
    assert not LifecycleState.load(tmp_path).is_done("long")


def _config(**changes) -> ConfigDict:
    cfg = default.get_config()
    for path, value in changes.items():
        node = cfg
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"eval\.ks: each k must be in \[1, eval\.num_samples=5\]"):
        load_config(_config(**{"eval.num_samples": 5}))
    with pytest.raises(ConfigError, match=r"sft\.config: no such file 'configs/lifecycle/nope\.py'"):
        load_config(_config(**{"sft.config": "configs/lifecycle/nope.py"}))
    with pytest.raises(ConfigError, match=r"problems\.train"):
        load_config(_config(**{"problems.train": 0}))


def test_stage_commands_point_every_stage_at_the_root():
    config = load_config(_config(root="runs/lc-test"))
    stages = lifecycle_stages(config, peak_tflops=0.2, python="python")
    assert [s.name for s in stages] == ["corpus", "problems", "curate", "pretrain", "eval-pretrain", "sft", "eval-sft",
                                        "rl", "eval-rl", "report"]
    by_name = {s.name: s.argv for s in stages}
    assert "--config=configs/lifecycle/sft.py:runs/lc-test" in by_name["sft"]
    assert "--config.train.peak_tflops_per_device=0.2" in by_name["pretrain"]
    assert f"--config.rl.sandbox={SANDBOX_URL}" in by_name["rl"]
    assert "--config.checkpoint=runs/lc-test/sft" in by_name["eval-sft"]
    assert "--config.decontam.eval_files=runs/lc-test/data/problems/synthetic_heldout_problems.jsonl" in by_name["curate"]
    for argv in by_name.values():
        assert all("runs/lifecycle" not in arg for arg in argv)


def test_stage_configs_load_with_the_root_argument(tmp_path):
    """Each training stage's config file reads and writes under the root it is given."""
    from configs.lifecycle import pretrain, rl, sft

    root = str(tmp_path / "lc")
    assert pretrain.get_config(root).train.output_dir == f"{root}/pretrain"
    assert pretrain.get_config(root).data.sources.stdlib.splits["train"] == f"{root}/data/curated/data-*.array_record"
    assert sft.get_config(root).sft.init_from == f"{root}/pretrain"
    assert rl.get_config(root).rl.init_from == f"{root}/sft"
    assert sft.get_config(root).data.sources.synthetic.splits["train"] == f"{root}/data/problems/synthetic_sft_imperfect.jsonl"
    assert rl.get_config(root).rl.synthetic_split == "rl"


def test_repository_of_groups_files_by_top_level_package():
    assert repository_of("email/mime/text.py") == "stdlib/email"
    assert repository_of("json/__init__.py") == "stdlib/json"
    assert repository_of("ast.py") == "stdlib/ast"


def test_display_command_makes_the_interpreter_relative():
    argv = [str(REPO / ".venv" / "bin" / "python"), "-m", "train.sft", "--config=a b.py"]
    assert lifecycle_run.display_command(argv) == ".venv/bin/python -m train.sft '--config=a b.py'"
    assert lifecycle_run.display_command(["/usr/bin/python3", "-m", "x"]) == "/usr/bin/python3 -m x"


def test_interrupted_names_the_signal():
    assert str(Interrupted(signal.SIGTERM)) == "SIGTERM"


def test_always_stages_run_again(tmp_path):
    log = tmp_path / "order.txt"
    stages = [_append(log, "a"), dataclasses.replace(_append(log, "report"), always=True)]
    for _ in range(2):
        run_stages(stages, LifecycleState.load(tmp_path), ServiceOnDemand("http://unused:1", 1), tmp_path / "logs")
    assert log.read_text() == "a report report "


def test_the_default_problem_counts_exist():
    """The problems stage writes as many "sft" problems as `problems.train` asks: the split must hold them
    (it has 3,303; a default of 4,000 once failed the stage on a fresh clone)."""
    from evals.synthetic import synthetic_problems

    config = load_config(_config())
    assert len(synthetic_problems("sft", config.problems.train)) == config.problems.train
    assert len(synthetic_problems("heldout", config.problems.heldout)) == config.problems.heldout
