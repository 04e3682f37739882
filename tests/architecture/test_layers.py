"""The import contracts in pyproject.toml hold, and are not vacuous: each fails on a back-edge."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = tuple(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"])
LAYERS = "Layers, lowest last"  # the layers contract (configs <- data <- models <- evals <- analysis <- train <- rl <- lifecycle)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root)})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the packages and pyproject.toml, to add back-edges to."""
    root = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


def test_the_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "broken" in result.stdout and " 0 broken" in result.stdout


@pytest.mark.parametrize("module, back_edge, contract", [
    ("models/decoder.py", "import train.trainer", LAYERS),
    ("configs/schema.py", "import data.config", LAYERS),
    ("data/pipeline.py", "import models.config", LAYERS),
    ("train/step.py", "import rl", LAYERS),
    ("sandbox/api.py", "import configs.schema", "The execution service imports nothing of codelm"),
    ("evals/harness.py", "import train.trainer", "Evaluation uses the model stack and the sandbox client"),
    ("models/sampler.py", "import evals.harness", LAYERS),
    ("rl/train.py", "import lifecycle.run", LAYERS),
    ("train/trainer.py", "import bench.train_step", "Nothing imports benchmarks"),
    ("data/tokenizer.py", "import data.hf_tokenizer", "Tokenizers: the interface below its implementations"),
])
def test_each_back_edge_breaks_its_contract(tree, module, back_edge, contract):
    path = tree / module
    original = path.read_text()
    path.write_text(f"{back_edge}  # noqa\n{original}")
    try:
        result = lint_imports(tree)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(line.startswith(contract) for line in broken), result.stdout[-3000:]
