"""Host-side checks that nothing a sandboxed program started is still around."""

import json
import os
import textwrap
import urllib.error
import urllib.request

from sandbox.api import RunCodeRequest

CANARY_ENV = "CODELM_SANDBOX_TEST_CANARY"  # set in the test service's environment, never in a sandbox's
CANARY_VALUE = "canary-7f3a9c"


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, real uid, command line) for every host process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        table[int(entry)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]), cmdline)
    return table


def sandbox_processes(service_pid: int, slot_uids: list[int] | None) -> list[tuple[int, str]]:
    """Host processes that belong to sandboxes: descendants of the service, and (when the service
    runs sandboxes as dedicated uids) anything running as those uids, wherever it was reparented."""
    table = _processes()
    found = {}
    for pid, (_, uid, cmdline) in table.items():
        ancestor = pid
        while ancestor in table and ancestor not in (0, 1):
            ancestor = table[ancestor][0]
            if ancestor == service_pid:
                found[pid] = cmdline
        if slot_uids is not None and slot_uids[0] <= uid <= slot_uids[1]:
            found[pid] = cmdline
    return sorted(found.items())


def leftovers(service_pid: int, health: dict) -> dict[str, list]:
    """Everything finished requests may have left: sandbox processes, run cgroups, workspaces.
    All lists are empty when the service is idle and clean."""
    isolation = health["isolation"]
    groups = []
    for path in isolation["cgroups"].values():
        if os.path.isdir(path):
            groups += [os.path.join(path, d) for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]
    work_root = isolation["work_root"]
    workspaces = [d for d in os.listdir(work_root) if d.startswith("run-")]
    return {"processes": sandbox_processes(service_pid, isolation["slot_uids"]), "cgroups": groups,
            "workspaces": workspaces}


def python(code: str, **fields) -> RunCodeRequest:
    return RunCodeRequest(code=textwrap.dedent(code), language="python", **fields)


def report(response) -> dict:
    """The JSON a probe program printed as its last stdout line."""
    return json.loads(response.run_result.stdout.strip().splitlines()[-1])


def post(service, path: str, body: bytes | dict, method: str = "POST") -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(service.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
