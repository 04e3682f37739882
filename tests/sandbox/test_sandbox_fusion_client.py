"""The official `sandbox-fusion` client package, unchanged, against this service: its request and
response models, sync and async calls, files in and out, and a failing program."""

import asyncio
import base64

import sandbox_fusion
from sandbox_fusion import RunCodeRequest, RunStatus


def test_official_client_runs_code(service):
    response = sandbox_fusion.run_code(
        RunCodeRequest(code="import sys\nprint(open('in.txt').read() + sys.stdin.read())\n"
                            "open('out.txt', 'w').write('o')", language="python", stdin="!", files={"in.txt": base64.b64encode(b"hi").decode()},
                       fetch_files=["out.txt"]),
        endpoint=service.url)
    assert response.status == RunStatus.Success, response
    assert response.run_result.stdout == "hi!\n" and response.run_result.return_code == 0
    assert base64.b64decode(response.files["out.txt"]) == b"o"


def test_official_async_client_reports_failures(service):
    response = asyncio.run(sandbox_fusion.run_code_async(
        RunCodeRequest(code="raise SystemExit(3)", language="python", run_timeout=5), endpoint=service.url))
    assert response.status == RunStatus.Failed
    assert response.run_result.status == "Finished" and response.run_result.return_code == 3
