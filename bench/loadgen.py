"""The load generators, chosen so they are never the bottleneck: `wrk` (with a generated Lua script
for headers such as Authorization or Cookie) for small requests, `curl` for bulk bodies (download to
/dev/null, upload from a sparse file, so neither side touches a disk), and a blocking websocket
client over a plain socket framed by wsproto, run in a worker thread so Trio's scheduler adds nothing
to a round trip.

Every generator is bounded (a duration, a count or a byte size plus a timeout), runs on the load
cores, and reports what it measured; it must never retry silently or report a figure from a failed
run (it raises BenchError instead).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from bench.processes import BenchError, run_tool

WS_RECEIVE = 1 << 20


def tool_missing(name: str) -> str | None:
    """None when `name` is on PATH, else the reason a column or scenario is skipped."""
    return None if shutil.which(name) else f"{name} is not installed (apt-get install -y {name})"


# --- wrk: small requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_us: float
    p99_us: float
    errors: int
    non_2xx: int

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _lua_string(value: str) -> str:
    return "[==[" + value + "]==]"


def wrk_script(headers: dict[str, str]) -> str:
    # The spaces matter: "[[" would open a Lua long string.
    lines = [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()]
    lines.append(
        "done = function(summary, latency, requests)\n"
        "  local e = summary.errors\n"
        "  io.write(string.format('{\"requests\":%d,\"duration_us\":%d,\"p50_us\":%d,\"p99_us\":%d,"
        "\"socket_errors\":%d,\"non_2xx\":%d}\\n', summary.requests, summary.duration,"
        " latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.timeout,"
        " e.status))\n"
        "end"
    )
    return "\n".join(lines) + "\n"


async def run_wrk(
    url: str, *, headers: dict[str, str], connections: int, seconds: float, workdir: Path,
    cores: frozenset[int],
) -> WrkResult:
    script = workdir / f"wrk-{time.monotonic_ns()}.lua"
    script.write_text(wrk_script(headers))
    threads = max(1, min(len(cores), connections))
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, math.ceil(seconds))}s",
            "--timeout", "5s", "-s", str(script), url]
    output = await run_tool(argv, cores=cores, timeout=seconds + 30)
    summary = next((json.loads(line) for line in reversed(output.splitlines())
                    if line.startswith("{")), None)
    if summary is None:
        raise BenchError(f"wrk printed no summary:\n{output[-500:]}")
    result = WrkResult(summary["requests"], summary["duration_us"] / 1e6, summary["p50_us"],
                       summary["p99_us"], summary["socket_errors"], summary["non_2xx"])
    if result.non_2xx > result.requests // 100 or result.requests == 0:
        raise BenchError(f"wrk: {result.non_2xx} of {result.requests} answers were not 2xx/3xx at {url}")
    return result


# --- curl: bulk bodies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferResult:
    status: int
    size: int
    seconds: float

    @property
    def megabytes_per_second(self) -> float:
        return self.size / self.seconds / 1e6 if self.seconds else 0.0


def _curl_argv(url: str, headers: dict[str, str]) -> list[str]:
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", "3600",
            "-w", "%{http_code} %{size_download} %{size_upload} %{time_total}"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    return argv + [url]


def _transfer(output: str, direction: str) -> TransferResult:
    status, downloaded, uploaded, seconds = output.split()
    size = int(float(downloaded if direction == "down" else uploaded))
    return TransferResult(int(status), size, float(seconds))


async def curl_download(url: str, *, headers: dict[str, str], expected_size: int,
                        cores: frozenset[int], timeout: float) -> TransferResult:
    output = await run_tool(_curl_argv(url, headers), cores=cores, timeout=timeout)
    result = _transfer(output, "down")
    if result.status != 200 or result.size != expected_size:
        raise BenchError(f"download from {url}: HTTP {result.status}, {result.size} of {expected_size} bytes")
    return result


async def curl_upload(url: str, source: Path, *, headers: dict[str, str], cores: frozenset[int],
                      timeout: float) -> TransferResult:
    # No "Expect: 100-continue": every column gets the body at once, as a streaming client sends it.
    argv = _curl_argv(url, {**headers, "Expect": "", "Content-Type": "application/octet-stream"})
    argv[-1:-1] = ["-X", "PUT", "-T", str(source)]
    output = await run_tool(argv, cores=cores, timeout=timeout)
    result = _transfer(output, "up")
    if result.status not in (200, 201, 204) or result.size != source.stat().st_size:
        raise BenchError(f"upload to {url}: HTTP {result.status}, {result.size} bytes sent")
    return result


def sparse_file(path: Path, size: int) -> Path:
    """A file of `size` zero bytes that takes no disk space (reads come from no device)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


async def curl_status(url: str, *, headers: dict[str, str], cores: frozenset[int], method: str = "GET") -> int:
    """The HTTP status of one small request (used to tell a missing route from a working one)."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "-X", method]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    return int((await run_tool(argv + [url], cores=cores, timeout=15)).strip() or 0)


# --- websocket client -----------------------------------------------------------------------------


class WebSocketRejected(BenchError):
    def __init__(self, status: int) -> None:
        super().__init__(f"websocket handshake refused with HTTP {status}")
        self.status = status


class WebSocketClosed(BenchError):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"websocket closed by the peer: {code} {reason}")
        self.code = code


class BlockingWebSocket:
    """A websocket client on a blocking socket; call it from one worker thread at a time."""

    def __init__(self, sock: socket.socket, protocol: WSConnection, pending: deque[Event]) -> None:
        self.sock = sock
        self.protocol = protocol
        self.pending = pending
        self.subprotocol: str | None = None

    @classmethod
    def connect(cls, url: str, *, headers: dict[str, str] | None = None,
                subprotocols: list[str] | None = None, timeout: float = 10.0) -> BlockingWebSocket:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol = WSConnection(ConnectionType.CLIENT)
        extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        sock.sendall(protocol.send(Request(host=f"{host}:{port}", target=target or "/",
                                           extra_headers=extra, subprotocols=subprotocols or [])))
        client = cls(sock, protocol, deque())
        while True:
            event = client._next_event()
            if isinstance(event, AcceptConnection):
                client.subprotocol = event.subprotocol
                return client
            if isinstance(event, (RejectConnection, RejectData)):
                status = event.status_code if isinstance(event, RejectConnection) else 0
                sock.close()
                raise WebSocketRejected(status)

    def _next_event(self) -> Event:
        while not self.pending:
            self.pending.extend(self.protocol.events())
            if self.pending:
                break
            data = self.sock.recv(WS_RECEIVE)
            if not data:
                raise WebSocketClosed(1006, "connection lost")
            self.protocol.receive_data(data)
        return self.pending.popleft()

    def send(self, message: str | bytes) -> None:
        event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        self.sock.sendall(self.protocol.send(event))

    def receive(self) -> str | bytes:
        parts: list[str | bytes] = []
        while True:
            event = self._next_event()
            if isinstance(event, (TextMessage, BytesMessage)):
                parts.append(bytes(event.data) if isinstance(event, BytesMessage) else event.data)
                if event.message_finished:
                    if isinstance(event, TextMessage):
                        return "".join(str(p) for p in parts)
                    return b"".join(p for p in parts if isinstance(p, bytes))
            elif isinstance(event, Ping):
                self.sock.sendall(self.protocol.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise WebSocketClosed(event.code, event.reason or "")

    def close(self) -> None:
        try:
            self.sock.sendall(self.protocol.send(CloseConnection(code=1000)))
        except (OSError, LocalProtocolError):
            pass  # the peer is gone or already closed: closing is best effort
        self.sock.close()


@dataclass(frozen=True)
class RoundTrips:
    count: int
    seconds: float
    p50_us: float
    p99_us: float

    @property
    def messages_per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


Message = str | bytes
Exchange = Callable[[int], tuple[Message, Callable[[Message], bool]]]


def measure_round_trips(ws: BlockingWebSocket, make_message: Exchange, count: int,
                        seconds: float) -> RoundTrips:
    """Send one message, wait for its answer, repeat: `make_message(i)` gives (frame, is_answer)."""
    samples: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    for index in range(count):
        frame, is_answer = make_message(index)
        sent = time.perf_counter_ns()
        ws.send(frame)
        while not is_answer(ws.receive()):
            pass
        samples.append((time.perf_counter_ns() - sent) / 1000)
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - started
    samples.sort()
    return RoundTrips(len(samples), elapsed, percentile(samples, 0.5), percentile(samples, 0.99))


def measure_echo_throughput(ws: BlockingWebSocket, message_size: int, total_bytes: int,
                            seconds: float) -> TransferResult:
    """Echo binary messages of `message_size` until `total_bytes` came back (or time ran out)."""
    payload = bytes(message_size)
    echoed = 0
    started = time.perf_counter()
    deadline = started + seconds
    while echoed < total_bytes and time.perf_counter() < deadline:
        ws.send(payload)
        answer = ws.receive()
        while not isinstance(answer, bytes):
            answer = ws.receive()
        if len(answer) != message_size:
            raise BenchError(f"echo answered {len(answer)} bytes for a {message_size}-byte message")
        echoed += len(answer)
    return TransferResult(200, echoed, time.perf_counter() - started)
