"""The wire contract: SandboxFusion's request/response shape, validation errors naming the field,
HTTP errors, and the ping/health endpoints. Raw HTTP through urllib, as a foreign client would."""

import base64
import json
import urllib.request

import pydantic
import pytest

from sandbox.api import OutputMatch, RequestValidationError, RunCodeRequest, RunTestsRequest, stdout_matches
from tests.sandbox.helpers import post


def test_response_has_sandboxfusion_fields(service):
    status, body = post(service, "/run_code", {"code": "import sys\nprint(input())\nsys.exit(3)",
                                               "language": "python", "stdin": "hello"})
    assert status == 200
    assert set(body) == {"status", "message", "compile_result", "run_result", "executor_pod_name", "files"}
    assert body["status"] == "Failed" and body["compile_result"] is None
    run = body["run_result"]
    assert set(run) == {"status", "execution_time", "return_code", "stdout", "stderr"}
    assert (run["status"], run["return_code"], run["stdout"]) == ("Finished", 3, "hello\n")


def test_ping_and_health(service):
    with urllib.request.urlopen(service.url + "/v1/ping") as response:
        assert json.loads(response.read()) == "pong"
    with urllib.request.urlopen(service.url + "/health") as response:
        health = json.loads(response.read())
    assert health["status"] == "ok"
    assert health["languages"]["python"]["available"] is True
    recipes = {"python", "pytest", "cpp", "c", "java", "junit", "nodejs", "go", "rust", "bash", "perl"}
    assert recipes < set(health["languages"])  # plus SandboxFusion's languages without a recipe here
    assert health["pool"]["workers"] == 2 and health["limits"]["max_output_bytes"] == 65536


@pytest.mark.parametrize("body, field", [
    ({"language": "python"}, "code"),
    ({"code": "print(1)"}, "language"),
    ({"code": 1, "language": "python"}, "code"),
    ({"code": "", "language": "cobol"}, "language"),
    ({"code": "", "language": "python", "run_timeout": "10"}, "run_timeout"),
    ({"code": "", "language": "python", "run_timeout": 0}, "run_timeout"),
    ({"code": "", "language": "python", "run_timeout": 1e6}, "run_timeout"),
    ({"code": "", "language": "python", "memory_limit_MB": 4}, "memory_limit_MB"),
    ({"code": "", "language": "python", "memory_limit_MB": True}, "memory_limit_MB"),
    ({"code": "", "language": "python", "files": {"a.txt": "not base64!"}}, "files.a.txt"),
    ({"code": "", "language": "python", "files": {"/etc/passwd": ""}}, "files./etc/passwd"),
    ({"code": "", "language": "python", "files": {"../up": ""}}, "files.../up"),
    ({"code": "", "language": "python", "files": {"main.py": ""}}, "files.main.py"),
    ({"code": "", "language": "python", "fetch_files": ["/etc/shadow"]}, "fetch_files.0"),
    ({"code": "", "language": "python", "stdin": 5}, "stdin"),
])
def test_invalid_requests_name_the_field(service, body, field):
    status, response = post(service, "/run_code", body)
    assert status == 422
    (error,) = response["detail"]
    assert ".".join(str(part) for part in error["loc"][1:]) == field


@pytest.mark.parametrize("body, field", [
    ({"code": "", "language": "python"}, "test_cases"),
    ({"code": "", "language": "python", "test_cases": []}, "test_cases"),
    ({"code": "", "language": "python", "test_cases": [{"stdin": ""}, {"stdin": 3}]}, "test_cases.1.stdin"),
    ({"code": "", "language": "python", "test_cases": [{}], "output_match": "fuzzy"}, "output_match"),
])
def test_invalid_batch_requests_name_the_field(service, body, field):
    status, response = post(service, "/run_tests", body)
    assert status == 422
    assert ".".join(str(part) for part in response["detail"][0]["loc"][1:]) == field


def test_http_errors(service):
    status, body = post(service, "/run_code", b"{not json")
    assert status == 422 and body["detail"][0]["type"] == "json_invalid"
    assert post(service, "/nope", {})[0] == 404
    assert post(service, "/run_code", b"", method="GET")[0] == 405


def test_language_without_toolchain_is_a_sandbox_error(service):
    with urllib.request.urlopen(service.url + "/health") as response:
        languages = json.loads(response.read())["languages"]
    missing = [name for name, info in languages.items() if not info["available"]]
    if not missing:
        pytest.skip("every language's toolchain is installed here")
    status, body = post(service, "/run_code", {"code": "", "language": missing[0]})
    assert status == 200 and body["status"] == "SandboxError"
    assert "not available on this server" in body["message"]


def test_files_are_written_and_fetched(service):
    code = "data = open('data/in.txt').read()\nopen('out.txt', 'w').write(data.upper())\n"
    status, body = post(service, "/run_code", {
        "code": code, "language": "python",
        "files": {"data/in.txt": base64.b64encode(b"shout").decode(), "skipped.txt": None},
        "fetch_files": ["out.txt", "missing.txt"]})
    assert status == 200 and body["status"] == "Success"
    assert body["files"] == {"out.txt": base64.b64encode(b"SHOUT").decode()}


def test_fetch_does_not_follow_symlinks_out_of_the_workspace(service):
    code = "import os\nos.symlink('/etc/hostname', 'link')\nos.symlink('/usr/bin/python3', 'bin')\n"
    status, body = post(service, "/run_code", {"code": code, "language": "python", "fetch_files": ["link", "bin"]})
    assert status == 200 and body["status"] == "Success" and body["files"] == {}


def test_request_round_trips():
    request = RunTestsRequest.model_validate({"code": "x", "language": "cpp", "test_cases": [{"stdin": "1"}],
                                              "output_match": "exact", "stop_on_first_failure": True, "extra": 1})
    assert RunTestsRequest.model_validate(request.model_dump(mode="json")) == request
    code_request = RunCodeRequest(code="print(1)", language="python", files={"a": "YQ=="})
    assert RunCodeRequest.model_validate_json(code_request.model_dump_json()) == code_request
    with pytest.raises(pydantic.ValidationError):
        RunCodeRequest.model_validate([])


def test_service_errors_have_fastapis_shape():
    error = RequestValidationError(("test_cases", 3, "stdin"), "bad")
    assert error.detail() == [{"type": "value_error", "loc": ["body", "test_cases", 3, "stdin"], "msg": "bad"}]


@pytest.mark.parametrize("actual, expected, lines, exact", [
    ("3\n", "3", True, False),
    ("3  \n\n\n", "3\n", True, False),
    ("1 2\n3\n", "1 2\n3\n", True, True),
    ("1  2\n", "1 2\n", False, False),  # inner whitespace matters in both modes
    ("4\n", "3\n", False, False),
])
def test_stdout_matching(actual, expected, lines, exact):
    assert stdout_matches(actual, expected, OutputMatch.LINES) is lines
    assert stdout_matches(actual, expected, OutputMatch.EXACT) is exact
