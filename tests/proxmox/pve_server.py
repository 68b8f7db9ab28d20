"""A Proxmox VE API-compatible test server: HTTPS with a self-signed certificate made at start,
API-token auth (`PVEAPIToken=user@realm!id=secret`), form-encoded bodies, `{"data": …}` answers,
error messages in the HTTP reason phrase (where proxmoxer reads them), and LXC tasks that run
asynchronously under real UPIDs. Failures are injected by rule: HTTP errors, "CT is locked",
task errors, tasks that end `WARNINGS: n` and slow answers (a `delay` answers late but still carries the
call out, as PVE does after waiting out a config lock). A container made by another team
(`add_container`) sits beside ours, and `dhcp_answers = False` makes eth0 never get an address.

It models what the provider relies on, as PVE behaves (pve-container `src/PVE/API2/LXC.pm`, pve-common
`PVE/Tools.pm`): a container being created or cloned carries a `create` lock until its task ends and
every mutating call on a locked container fails; a clone locks its source with `disk` (template or
not), so a second clone of a busy source fails with a lock error; `clone` and `create` accept
`description`, written into the new config before the task starts; a task ending `OK` or
`WARNINGS: n` succeeded, anything else failed (a failed create/clone removes its container);
destroying a running container is refused; `GET …/interfaces` of a stopped container answers
`data: null`; `GET /nodes/{node}/tasks` lists tasks by `vmid`/`typefilter` (a clone's task is filed
under its *source* VMID, as in PVE); `GET /cluster/resources?type=vm` lists every guest;
`/cluster/nextid` answers the lowest free VMID, racing exactly like the real one. It must never be
used outside tests: it keeps everything in memory and trusts any well-formed request."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A fresh key and a self-signed certificate for 127.0.0.1 / localhost; returns (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pve-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "pve.crt", directory / "pve.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class ConnectionDropped(Exception):
    """The handler closes the connection without an answer; nothing was done."""


class PveError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Rule:
    """An injected failure: the next `times` requests matching method and path fail this way, after
    `seconds` (a `delay` only waits; any other kind waits, then fails as it says)."""

    method: str
    path: str  # regular expression over the path below /api2/json
    kind: str  # http | locked | task_error | task_warning | delay | drop (close, do nothing)
    times: int = 1
    status: int = 500
    message: str = "internal error"
    seconds: float = 0.0


@dataclass
class Task:
    upid: str
    type: str
    id: str
    started: float
    duration: float
    exitstatus: str = "OK"
    log: list[str] = field(default_factory=list)
    starttime: int = 0
    on_success: Callable[[], None] | None = None
    on_end: Callable[[], None] | None = None
    finished: bool = False


@dataclass
class Ct:
    vmid: int
    config: dict[str, Any]
    status: str = "stopped"
    lock: str | None = None
    template: bool = False


class FakePve:
    def __init__(self, *, token_id: str = "root@pam!zlh", token_secret: str = "s3cr3t-token-value",
                 node: str = "pve", task_seconds: float = 0.05) -> None:
        self.token_id = token_id
        self.token_secret = token_secret
        self.node = node
        self.task_seconds = task_seconds
        self.containers: dict[int, Ct] = {}
        self.tasks: dict[str, Task] = {}
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.created: list[int] = []  # every VMID a create or clone task made, in order
        self.dhcp_answers = True  # False: eth0 of a running container never gets an IPv4 address
        self.eth0_address: str | None = None  # every container's eth0 address (default 10.10.x.y by VMID)
        # The template's PVE hookscript at pre-start (a test starts the agent here); runs in the server thread.
        self.prestart: Callable[[Ct], None] | None = None
        self.lock = threading.RLock()
        self._pid = 0x1000
        self._dir = Path(tempfile.mkdtemp(prefix="zlh-pve-"))
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.cert_path = Path()
        self.url = ""

    # lifecycle

    def start(self) -> None:
        self.cert_path, key_path = make_self_signed_certificate(self._dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, key_path)
        fake = self

        class Handler(PveHandler):
            pve = fake

        httpd = QuietServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self.url = f"https://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        for path in self._dir.iterdir():
            path.unlink()
        self._dir.rmdir()

    # test controls

    def inject(self, rule: Rule) -> None:
        with self.lock:
            self.rules.append(rule)

    def add_template(self, vmid: int, hostname: str = "zlh-template") -> None:
        with self.lock:
            self.containers[vmid] = Ct(vmid, {"hostname": hostname, "template": 1}, template=True)

    def add_container(self, vmid: int, hostname: str, status: str = "stopped", tags: str = "",
                      description: str = "") -> None:
        """A container the gateway did not make (another team's, or one made by hand)."""
        with self.lock:
            config = {"hostname": hostname, "tags": tags, "rootfs": f"local-lvm:vm-{vmid}-disk-0,size=8G"}
            if description:
                config["description"] = description
            self.containers[vmid] = Ct(vmid, config, status=status)

    def requests_for(self, vmid: int) -> list[tuple[str, str]]:
        """Every (method, path) that named CT `vmid`, in order."""
        with self.lock:
            return [(m, p) for m, p, _ in self.requests if re.fullmatch(rf"/nodes/{self.node}/lxc/{vmid}(/.*)?", p)]

    def mutations_of(self, vmid: int) -> list[tuple[str, str]]:
        """The calls that would change CT `vmid`: anything but a GET."""
        return [(m, p) for m, p in self.requests_for(vmid) if m != "GET"]

    def calls(self, method: str, pattern: str) -> list[dict[str, str]]:
        with self.lock:
            return [form for m, p, form in self.requests if m == method and re.fullmatch(pattern, p)]

    # task machinery

    def _new_task(self, kind: str, vmid: int | str, *, on_success: Callable[[], None] | None = None,
                  on_end: Callable[[], None] | None = None, error: str | None = None) -> str:
        self._pid += 1
        started = int(time.time())
        upid = f"UPID:{self.node}:{self._pid:08X}:{self._pid * 7:08X}:{started:08X}:{kind}:{vmid}:{self.token_id}:"
        task = Task(upid, kind, str(vmid), time.monotonic(), self.task_seconds,
                    on_success=on_success, on_end=on_end, starttime=started)
        task.log.append(f"starting task {kind} for {vmid}")
        if error is not None and error.startswith("WARN: "):
            task.exitstatus = "WARNINGS: 1"
            task.log.extend([error, "TASK WARNINGS: 1"])
        elif error is not None:
            task.exitstatus = error
            task.log.append(error)
        else:
            task.log.append("TASK OK")
        self.tasks[upid] = task
        return upid

    def _settle(self, task: Task) -> None:
        if task.finished or time.monotonic() < task.started + task.duration:
            return
        task.finished = True
        if not task_status_is_error(task.exitstatus) and task.on_success is not None:
            task.on_success()
        if task.on_end is not None:
            task.on_end()

    def settle_all(self) -> None:
        with self.lock:
            for task in self.tasks.values():
                self._settle(task)

    # request handling

    def handle(self, method: str, path: str, form: dict[str, str]) -> Any:
        with self.lock:
            self.requests.append((method, path, form))
            for task in self.tasks.values():
                self._settle(task)
            rule = self._matching_rule(method, path)
        if rule is not None and rule.seconds:
            time.sleep(rule.seconds)  # then carried out all the same, as PVE does after a lock wait
        if rule is not None and rule.kind == "delay":
            rule = None
        if rule is not None and rule.kind == "drop":
            raise ConnectionDropped(path)
        with self.lock:
            if rule is not None and rule.kind == "http":
                raise PveError(rule.status, rule.message)
            if rule is not None and rule.kind == "locked":
                raise PveError(500, rule.message)
            task_error = None
            if rule is not None and rule.kind == "task_error":
                task_error = rule.message
            if rule is not None and rule.kind == "task_warning":
                task_error = "WARN: " + rule.message
            return self._route(method, path, form, task_error)

    def _matching_rule(self, method: str, path: str) -> Rule | None:
        for rule in self.rules:
            if rule.times > 0 and rule.method == method and re.fullmatch(rule.path, path):
                rule.times -= 1
                return rule
        return None

    def _ct(self, vmid: int) -> Ct:
        ct = self.containers.get(vmid)
        if ct is None:
            raise PveError(500, f"Configuration file 'nodes/{self.node}/lxc/{vmid}.conf' does not exist")
        return ct

    def _unlocked(self, ct: Ct) -> None:
        if ct.lock is not None:
            raise PveError(500, f"CT {ct.vmid} is locked ({ct.lock})")

    def _next_free(self) -> int:
        vmid = 100
        while vmid in self.containers:
            vmid += 1
        return vmid

    def _route(self, method: str, path: str, form: dict[str, str], task_error: str | None) -> Any:
        node = self.node
        if method == "GET" and path == "/cluster/nextid":
            if "vmid" in form:
                wanted = int(form["vmid"])
                if wanted in self.containers:
                    raise PveError(400, f"VM {wanted} already exists")
                return str(wanted)
            return str(self._next_free())
        if method == "GET" and path == "/cluster/resources":
            if form.get("type", "vm") != "vm":
                raise PveError(400, "test server lists type=vm only")
            return [{"id": f"lxc/{ct.vmid}", "type": "lxc", "vmid": ct.vmid, "node": node, "status": ct.status,
                     "name": ct.config.get("hostname"), "template": int(ct.template),
                     **({"tags": ct.config["tags"]} if ct.config.get("tags") else {})}
                    for ct in self.containers.values()]
        if method == "GET" and path == f"/nodes/{node}/tasks":
            return self._task_list(form)
        match = re.fullmatch(rf"/nodes/{node}/tasks/([^/]+)/(status|log)", path)
        if match and method == "GET":
            task = self.tasks.get(match.group(1))
            if task is None:
                raise PveError(500, "no such task")
            self._settle(task)
            if match.group(2) == "log":
                return [{"n": i + 1, "t": line} for i, line in enumerate(task.log)]
            answer = {"upid": task.upid, "node": node, "type": task.type, "id": task.id,
                      "status": "stopped" if task.finished else "running", "user": self.token_id}
            if task.finished:
                answer["exitstatus"] = task.exitstatus
            return answer
        if path == f"/nodes/{node}/lxc":
            if method == "GET":
                return [{"vmid": ct.vmid, "name": ct.config.get("hostname"), "status": ct.status,
                         "tags": ct.config.get("tags", ""), **({"template": 1} if ct.template else {}),
                         **({"lock": ct.lock} if ct.lock else {})} for ct in self.containers.values()]
            if method == "POST":
                return self._create(form, task_error)
        match = re.fullmatch(rf"/nodes/{node}/lxc/(\d+)(/.*)?", path)
        if match is None:
            raise PveError(501, f"Method '{method} {path}' not implemented")
        vmid, rest = int(match.group(1)), match.group(2) or ""
        if rest == "" and method == "DELETE":
            ct = self._ct(vmid)
            self._unlocked(ct)
            if ct.status == "running":
                raise PveError(500, f"CT {vmid} is running - destroy failed")
            if form.get("purge") != "1" or form.get("destroy-unreferenced-disks") != "1":
                raise PveError(400, "test server expects purge=1 and destroy-unreferenced-disks=1")
            ct.lock = "destroyed"

            def destroyed() -> None:
                self.containers.pop(vmid, None)

            return self._new_task("vzdestroy", vmid, on_success=destroyed,
                                  on_end=lambda: setattr(ct, "lock", None), error=task_error)
        if rest == "/clone" and method == "POST":
            return self._clone(vmid, form, task_error)
        if rest == "/config":
            ct = self._ct(vmid)
            if method == "GET":
                return {**ct.config, **({"lock": ct.lock} if ct.lock else {})}
            if method == "PUT":
                self._unlocked(ct)
                ct.config.update(form)
                return None
        if rest == "/resize" and method == "PUT":
            ct = self._ct(vmid)
            self._unlocked(ct)
            ct.lock = "disk"
            size = form.get("size", "")

            def resized() -> None:
                ct.config["rootfs"] = re.sub(r"size=\w+", f"size={size}", ct.config.get("rootfs", f"size={size}"))

            return self._new_task("resize", vmid, on_success=resized, on_end=lambda: setattr(ct, "lock", None),
                                  error=task_error)
        if rest == "/status/current" and method == "GET":
            ct = self._ct(vmid)
            return {"vmid": vmid, "status": ct.status, "name": ct.config.get("hostname"),
                    **({"lock": ct.lock} if ct.lock else {})}
        if rest == "/interfaces" and method == "GET":
            ct = self._ct(vmid)
            if ct.status != "running":
                return None  # PVE: 200 with data null for a stopped container
            eth0: dict[str, str] = {"name": "eth0", "hwaddr": "bc:24:11:00:00:01", "inet6": "fe80::1/64"}
            if self.dhcp_answers:
                eth0["inet"] = self.eth0_address or f"10.10.{vmid // 256 % 256}.{vmid % 256}/16"
            return [{"name": "lo", "inet": "127.0.0.1/8"}, eth0]
        match = re.fullmatch(r"/status/(start|stop|shutdown)", rest)
        if match and method == "POST":
            ct = self._ct(vmid)
            self._unlocked(ct)
            action = match.group(1)
            if action == "start" and ct.status == "running":
                raise PveError(500, f"CT {vmid} already running")
            target = "running" if action == "start" else "stopped"

            def done() -> None:
                if action == "start" and self.prestart is not None:
                    self.prestart(ct)
                ct.status = target

            return self._new_task(f"vz{action}", vmid, on_success=done, error=task_error)
        raise PveError(501, f"Method '{method} {path}' not implemented")

    def _create(self, form: dict[str, str], task_error: str | None) -> str:
        vmid = int(form["vmid"])
        if vmid in self.containers:
            raise PveError(500, f"unable to create CT {vmid} - CT {vmid} already exists on node '{self.node}'")
        if "ostemplate" not in form:
            raise PveError(400, "parameter verification failed: ostemplate: property is missing")
        config = {k: v for k, v in form.items() if k not in {"vmid", "ostemplate", "storage", "start"}}
        ct = Ct(vmid, config, lock="create")
        self.containers[vmid] = ct
        self.created.append(vmid)
        return self._new_task("vzcreate", vmid, on_success=lambda: setattr(ct, "lock", None),
                              on_end=self._drop_if_failed(ct), error=task_error)

    def _clone(self, source: int, form: dict[str, str], task_error: str | None) -> str:
        src = self._ct(source)
        if src.lock is not None:
            raise PveError(500, f"CT {source} is locked ({src.lock})")
        newid = int(form["newid"])
        if newid in self.containers:
            raise PveError(500, f"unable to create CT {newid} - CT {newid} already exists on node '{self.node}'")
        config = {k: v for k, v in src.config.items() if k != "template"}
        config.update({k: v for k, v in form.items() if k not in {"newid", "full", "storage", "target"}})
        ct = Ct(newid, config, lock="create")
        self.containers[newid] = ct
        self.created.append(newid)
        src.lock = "disk"  # PVE: set_lock($vmid, 'disk') on the source, template or not

        def ended() -> None:
            src.lock = None
            self._drop_if_failed(ct)()

        # PVE files the clone's task under the source VMID (fork_worker('vzclone', $vmid, …)).
        return self._new_task("vzclone", source, on_success=lambda: setattr(ct, "lock", None), on_end=ended,
                              error=task_error)

    def _task_list(self, form: dict[str, str]) -> list[dict[str, Any]]:
        """`GET /nodes/{node}/tasks`: newest first, filtered by `vmid` and `typefilter`; `source`
        archive (default: finished tasks), active or all; a finished task's `status` is its exit status."""
        source = form.get("source", "archive")
        listed = []
        for task in sorted(self.tasks.values(), key=lambda t: t.started, reverse=True):
            self._settle(task)
            if "vmid" in form and task.id != form["vmid"]:
                continue
            if "typefilter" in form and task.type != form["typefilter"]:
                continue
            if (source == "archive" and not task.finished) or (source == "active" and task.finished):
                continue
            entry: dict[str, Any] = {"upid": task.upid, "node": self.node, "type": task.type, "id": task.id,
                                     "user": self.token_id, "starttime": task.starttime}
            if task.finished:
                entry.update(status=task.exitstatus, endtime=task.starttime + 1)
            listed.append(entry)
        return listed[: int(form.get("limit", 50))]

    def _drop_if_failed(self, ct: Ct) -> Callable[[], None]:
        def end() -> None:
            if ct.lock == "create":  # the task failed: PVE removes the half-made container
                self.containers.pop(ct.vmid, None)

        return end


def task_status_is_error(exitstatus: str) -> bool:
    """pve-common's upid_status_is_error: `OK` and `WARNINGS: n` are successes."""
    return not (exitstatus == "OK" or re.fullmatch(r"WARNINGS: \d+", exitstatus))


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # a client that timed out and left is part of the tests, not an error


class PveHandler(BaseHTTPRequestHandler):
    pve: FakePve
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _answer(self, status: int, reason: str, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status, reason.replace("\n", " "))
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not parts.path.startswith("/api2/json/"):
            self._answer(404, "Not Found", {"data": None})
            return
        expected = f"PVEAPIToken={self.pve.token_id}={self.pve.token_secret}"
        if self.headers.get("Authorization") != expected:
            self._answer(401, "invalid token value!", {"data": None})
            return
        form = dict(parse_qsl(parts.query, keep_blank_values=True))
        if raw:
            if not (self.headers.get("Content-Type") or "").startswith("application/x-www-form-urlencoded"):
                self._answer(415, "expected a form-encoded body", {"data": None})
                return
            form.update(parse_qsl(raw.decode(), keep_blank_values=True))
        path = unquote(parts.path[len("/api2/json"):])
        try:
            data = self.pve.handle(self.command, path, form)
        except ConnectionDropped:
            self.close_connection = True
            return
        except PveError as exc:
            self._answer(exc.status, exc.message, {"data": None, "message": exc.message + "\n"})
            return
        self._answer(200, "OK", {"data": data})

    do_GET = do_POST = do_PUT = do_DELETE = _serve

