"""A toolchain under a directory the sandbox uids cannot enter (like rustup's under /root) is exposed
read-only to sandboxes, and shutting the service down leaves it exactly as it was.

The toolchain is a stand-in `rustc` (a shell script) inside a 0700 directory: it answers
`--print sysroot` and "compiles" by writing a script that prints a fixed line.
"""

import asyncio
import os
import stat

import pytest

from sandbox.api import RunCodeRequest, RunStatus
from sandbox.client import SandboxClient
from sandbox.local import LocalSandbox

FAKE_RUSTC = """#!/bin/sh
if [ "$1" = --print ]; then cd "$(dirname "$0")/.." && pwd; exit 0; fi
if [ "$1" = --version ]; then echo "rustc 0.0.0-private"; exit 0; fi
while [ "$#" -gt 0 ]; do
  if [ "$1" = -o ]; then out=$2; fi
  shift
done
touch "$(dirname "$0")/../written-by-compile" 2>/dev/null
printf '#!/bin/sh\\necho compiled by the private toolchain\\n' > "$out"
chmod +x "$out"
"""


def snapshot(root: str) -> dict[str, tuple[int, bytes]]:
    tree = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                tree[os.path.relpath(path, root)] = (os.stat(path).st_mode, f.read())
    return tree


@pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes switch uids only when the service runs as root")
def test_private_toolchain_is_exposed_read_only_and_survives_shutdown(tmp_path):
    home = tmp_path / "home"
    bin_dir = home / "toolchain" / "bin"
    bin_dir.mkdir(parents=True)
    rustc = bin_dir / "rustc"
    rustc.write_text(FAKE_RUSTC)
    rustc.chmod(0o755)
    home.chmod(0o700)  # out of reach for the slot uids, like /root
    before = snapshot(str(home))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")

    with LocalSandbox(env=env, workers=1) as service:
        async def compile_and_run():
            async with SandboxClient(service.url) as client:
                health = await client.health()
                response = await client.run_code(RunCodeRequest(code="fn main() {}", language="rust"))
                return health, response

        health, response = asyncio.run(compile_and_run())
        assert health["languages"]["rust"]["tools"]["rustc"] == "/opt/toolchains/rust/bin/rustc"
        assert health["languages"]["rust"]["version"] == "rustc 0.0.0-private"
        assert response.status == RunStatus.SUCCESS, response
        assert response.run_result.stdout == "compiled by the private toolchain\n"
        work_root = health["isolation"]["work_root"]

    assert snapshot(str(home)) == before  # the compile step could not write into the toolchain
    assert not os.path.exists(work_root)  # state directory (and its mount point) removed
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
