"""The PVE test server speaks the API the way Proxmox does (so provider tests prove something):
token auth, form bodies, `{"data": …}`, reasons in the status line, UPIDs, asynchronous tasks."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
import requests

from tests.proxmox.pve_server import FakePve, Rule

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


def wait_stopped(pve: FakePve, upid: str) -> dict:
    for _ in range(200):
        status = call(pve, "GET", f"/nodes/pve/tasks/{upid}/status").json()["data"]
        if status["status"] == "stopped":
            return status
        time.sleep(0.05)
    raise AssertionError(f"task {upid} still running")


def test_interfaces_of_a_stopped_container_answer_null_not_an_error(pve: FakePve) -> None:
    pve.add_container(160, "ct-160")
    stopped = call(pve, "GET", "/nodes/pve/lxc/160/interfaces")
    assert stopped.status_code == 200 and stopped.json() == {"data": None}
    pve.add_container(161, "ct-161", status="running")
    names = [i["name"] for i in call(pve, "GET", "/nodes/pve/lxc/161/interfaces").json()["data"]]
    assert names == ["lo", "eth0"]


def test_clone_locks_its_source_disk_takes_a_description_and_is_filed_under_the_source(pve: FakePve) -> None:
    pve.task_seconds = 2.0  # long enough to see the task running (and the lock held) on a busy machine
    pve.add_template(9000)
    answer = call(pve, "POST", "/nodes/pve/lxc/9000/clone", data={"newid": 170, "description": "zlh-instance: 1"})
    upid = answer.json()["data"]
    assert ":vzclone:9000:" in upid
    assert call(pve, "GET", "/nodes/pve/lxc/170/config").json()["data"]["description"] == "zlh-instance: 1"
    busy = call(pve, "POST", "/nodes/pve/lxc/9000/clone", data={"newid": 171})
    assert busy.status_code == 500 and busy.reason == "CT 9000 is locked (disk)"
    listed = call(pve, "GET", "/nodes/pve/tasks", params={"vmid": 9000, "typefilter": "vzclone", "source": "all"})
    assert [t["upid"] for t in listed.json()["data"]] == [upid]
    assert "status" not in listed.json()["data"][0]  # still running
    assert wait_stopped(pve, upid)["exitstatus"] == "OK"
    assert call(pve, "GET", "/nodes/pve/tasks", params={"vmid": 170}).json()["data"] == []
    archived = call(pve, "GET", "/nodes/pve/tasks", params={"vmid": 9000}).json()["data"]
    assert archived[0]["status"] == "OK" and "endtime" in archived[0]
    create = call(pve, "POST", "/nodes/pve/lxc", data={"vmid": 172, "ostemplate": "local:vztmpl/x.tar.zst",
                                                       "description": "made by ZLH"})
    assert create.status_code == 200
    assert call(pve, "GET", "/nodes/pve/lxc/172/config").json()["data"]["description"] == "made by ZLH"
    resources = call(pve, "GET", "/cluster/resources", params={"type": "vm"}).json()["data"]
    assert {r["vmid"] for r in resources} == {9000, 170, 172}


def test_a_task_ending_with_warnings_succeeded(pve: FakePve) -> None:
    pve.add_container(180, "ct-180")
    pve.inject(Rule("POST", "/nodes/pve/lxc/180/status/start", "task_warning", message="you may need nesting"))
    upid = call(pve, "POST", "/nodes/pve/lxc/180/status/start").json()["data"]
    assert wait_stopped(pve, upid)["exitstatus"] == "WARNINGS: 1"
    log = [line["t"] for line in call(pve, "GET", f"/nodes/pve/tasks/{upid}/log").json()["data"]]
    assert log[-2:] == ["WARN: you may need nesting", "TASK WARNINGS: 1"]
    assert call(pve, "GET", "/nodes/pve/lxc/180/status/current").json()["data"]["status"] == "running"
