"""The PVE test server speaks the API the way Proxmox does (so provider tests prove something):
token auth, form bodies, `{"data": …}`, reasons in the status line, UPIDs, asynchronous tasks."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
import requests

from tests.proxmox.pve_server import FakePve

UPID = re.compile(r"^UPID:pve:[0-9A-F]{8}:[0-9A-F]{8}:[0-9A-F]{8}:vzcreate:150:root@pam!zlh:$")


@pytest.fixture
def pve() -> Iterator[FakePve]:
    server = FakePve(task_seconds=0.2)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def call(pve: FakePve, method: str, path: str, token: str | None = None, **kwargs: object) -> requests.Response:
    token = token or f"PVEAPIToken={pve.token_id}={pve.token_secret}"
    return requests.request(method, f"{pve.url}/api2/json{path}", headers={"Authorization": token},
                            verify=str(pve.cert_path), timeout=5, **kwargs)  # type: ignore[arg-type]


def test_token_is_checked_and_errors_carry_the_reason(pve: FakePve) -> None:
    assert call(pve, "GET", "/cluster/nextid", token="PVEAPIToken=root@pam!zlh=wrong").status_code == 401
    missing = call(pve, "GET", "/nodes/pve/lxc/150/status/current")
    assert missing.status_code == 500 and "does not exist" in missing.reason
    assert call(pve, "GET", "/cluster/nextid").json() == {"data": "100"}


def test_create_runs_as_an_asynchronous_task_with_a_upid(pve: FakePve) -> None:
    json_body = call(pve, "POST", "/nodes/pve/lxc", json={"vmid": 150, "ostemplate": "local:vztmpl/x.tar.zst"})
    assert json_body.status_code == 415  # PVE takes form bodies
    upid = call(pve, "POST", "/nodes/pve/lxc", data={"vmid": 150, "ostemplate": "local:vztmpl/x.tar.zst"}).json()["data"]
    assert UPID.match(upid)
    running = call(pve, "GET", f"/nodes/pve/tasks/{upid}/status").json()["data"]
    assert running["status"] == "running" and "exitstatus" not in running
    locked = call(pve, "PUT", "/nodes/pve/lxc/150/config", data={"cores": 2})
    assert locked.status_code == 500 and locked.reason == "CT 150 is locked (create)"
    time.sleep(0.25)
    done = call(pve, "GET", f"/nodes/pve/tasks/{upid}/status").json()["data"]
    assert (done["status"], done["exitstatus"]) == ("stopped", "OK")
    assert call(pve, "GET", f"/nodes/pve/tasks/{upid}/log").json()["data"][-1] == {"n": 2, "t": "TASK OK"}
    taken = call(pve, "GET", "/cluster/nextid", params={"vmid": 150})
    assert taken.status_code == 400 and "already exists" in taken.reason
