"""Test setup: a simulated 8-device CPU mesh, set before JAX is imported anywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Drops each test module's compiled programs once it is done. XLA:CPU maps every executable's
    code into the process, and a run of the whole suite with its slow tests otherwise passes the
    kernel's limit of 65,530 memory mappings and crashes inside a compile."""
    yield
    jax = sys.modules.get("jax")  # absent where only the Beam pipeline's tests run
    if jax is not None:
        jax.clear_caches()
        gc.collect()
