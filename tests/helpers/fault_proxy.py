"""A loopback HTTP proxy in front of a real registry that injects faults on request.

Tests point the client at the proxy's host instead of the registry's; every
request is forwarded (Host header kept, so the registry's Location URLs point
back at the proxy) unless a fault says otherwise. Usage:

    with FaultProxy(registry.host) as proxy:
        proxy.add(Fault("reset", match="/blobs/", method="GET"))      # once
        proxy.add(Fault("status", status=500, match="/manifests/", times=2))
        proxy.add(Fault("ignore_range", times=None))                 # always
        ... use Reference.parse(f"{proxy.host}/repo:tag") ...
        proxy.count(method="GET", match="/blobs/")  /  proxy.bytes_served  /  proxy.log

Fault kinds (a fault applies to the next `times` matching requests; times=None: always):
- "status":       answer `status` (401, 403, 404, 429, 500 ...) with a registry-style JSON error
                  body and `headers` (429 with headers={"Retry-After": "1"}: rate limiting),
                  without contacting the registry
- "corrupt":      forward, then flip one byte of the body (at `at`, default the middle)
- "wrong_bytes":  forward, then answer other bytes of the same length and status (a registry or
                  cache serving another blob's content under this digest)
- "truncate":     forward, but send only `at` bytes (default half) with a matching Content-Length
- "reset":        forward, send the full Content-Length header and `at` bytes (default half),
                  then reset the TCP connection (RST, after a 0.1 s pause so the bytes arrive first:
                  a RST makes the receiver drop unread data)
- "close":        like "reset" but a clean close (FIN) mid-body
- "ignore_range": forward without the Range header, so the registry answers 200 with the whole blob
- "first_range":  forward with only the first range of a Range header of several (storage that
                  serves one range per request: the registry answers a single 206 part)
- "redirect":     answer 307 with `location` (a URL) instead of contacting the registry
- "delay":        sleep `seconds` before forwarding (slow registries, timeouts)
- "drip":         forward, send the headers at once, then the body at `rate` bytes per second
                  (a stalling registry: rate=0.05 is one byte every 20 s; a slow link: 1e6)
Faults are checked in the order added; the first match wins. The list may be changed at
any time from the test thread (`add`, `clear`, or assigning `faults`).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from helpers.loopback_server import serve_in_thread, stop_server

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "content-length"}
_ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NOT_FOUND", 429: "TOOMANYREQUESTS"}


@dataclass
class Fault:
    kind: str
    match: str = ""                 # substring of the request path+query; "" matches every request
    method: str | None = None       # "GET", "HEAD", ... or None for any
    times: int | None = 1           # remaining applications; None = always
    status: int = 500               # for "status"
    at: int | None = None           # byte offset for corrupt / truncate / reset
    location: str = ""              # for "redirect"
    seconds: float = 0.0            # for "delay"
    rate: float = 0.0               # for "drip": bytes per second
    headers: dict[str, str] = field(default_factory=dict)
    message: str = ""               # for "status": the errors[].message (default: a standard text)
    applied: int = 0                # how many times it fired

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        return (self.method is None or self.method == method) and self.match in path


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    status: int
    range: str | None
    bytes_sent: int          # 0 when the client hung up before the whole body was written
    fault: str | None


class FaultProxy:
    """Start with `with FaultProxy(upstream_host) as proxy:`; `proxy.host` is "127.0.0.1:PORT"."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self._log: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------
    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server, self._thread = serve_in_thread(Handler, _QuietServer)
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_server(self._server, self._thread)
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- faults and counters ----------------------------------------------
    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults = []

    def reset_counters(self) -> None:
        with self._lock:
            self._log = []

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.times is not None:
                        fault.times -= 1
                    fault.applied += 1
                    return fault
        return None

    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self._log.append(rec)

    def begin_request(self) -> None:
        with self._lock:
            self._active += 1

    def end_request(self) -> None:
        with self._lock:
            self._active -= 1
            self._idle.notify_all()

    def _settled(self) -> list[RequestRecord]:
        """The log once requests in flight are recorded (waits up to 10 s; call with the lock held)."""
        self._idle.wait_for(lambda: self._active == 0, timeout=10)
        return list(self._log)

    @property
    def log(self) -> list[RequestRecord]:
        """Every request answered so far, those in flight included once they end."""
        with self._lock:
            return self._settled()

    @property
    def requests(self) -> int:
        with self._lock:
            return len(self._settled())

    @property
    def bytes_served(self) -> int:
        with self._lock:
            return sum(r.bytes_sent for r in self._settled())

    def count(self, method: str | None = None, match: str = "", status: int | None = None) -> int:
        """Requests seen with that method, path substring and answer status."""
        with self._lock:
            return sum(1 for r in self._settled() if (method is None or r.method == method)
                       and match in r.path and (status is None or r.status == status))


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        import sys
        if isinstance(sys.exc_info()[1], OSError):
            return    # the client went away mid-answer (a test closing a stream early): expected
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True    # TCP_NODELAY, as Go's net/http: no delayed-ACK wait per request

    def log_message(self, format: str, *args: object) -> None:   # keep test output clean
        pass

    def do_GET(self) -> None: self._handle()
    def do_HEAD(self) -> None: self._handle()
    def do_POST(self) -> None: self._handle()
    def do_PUT(self) -> None: self._handle()
    def do_PATCH(self) -> None: self._handle()
    def do_DELETE(self) -> None: self._handle()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        # Counted from request to record, so that counts read after a client saw its
        # answer include that request (the record is written after the answer is sent).
        self.owner.begin_request()
        try:
            self._serve()
        finally:
            self.owner.end_request()

    def _serve(self) -> None:
        method, path = self.command, self.path
        body = self._read_body()
        fault = self.owner.take_fault(method, path)
        kind = fault.kind if fault else None
        if fault and fault.kind == "status":
            return self._answer_error(fault)
        if fault and fault.kind == "redirect":
            self.send_response(307)
            self.send_header("Location", fault.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return self.owner.record(RequestRecord(method, path, 307, self.headers.get("Range"), 0, kind))
        if fault and fault.kind == "delay":
            time.sleep(fault.seconds)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if fault and fault.kind == "ignore_range":
            headers = {k: v for k, v in headers.items() if k.lower() not in ("range", "if-range")}
        if fault and fault.kind == "first_range":
            headers = {k: (v.split(",")[0] if k.lower() == "range" else v) for k, v in headers.items()}
        if body or method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.owner.upstream, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            up = conn.getresponse()
            data = up.read()
            status, reason, up_headers = up.status, up.reason, up.getheaders()
            length_header = up.getheader("Content-Length")
        finally:
            conn.close()
        cut = None
        if fault and fault.kind == "wrong_bytes":
            data = bytes(b ^ 0x5A for b in data)
        if fault and fault.kind in ("corrupt", "truncate", "reset", "close") and data:
            at = fault.at if fault.at is not None else len(data) // 2
            at = max(0, min(at, len(data) - 1))
            if fault.kind == "corrupt":
                data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
            elif fault.kind == "truncate":
                data = data[:at]
            else:
                cut = at
        self.send_response(status, reason)
        for k, v in up_headers:
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        if method == "HEAD":
            self.send_header("Content-Length", length_header or "0")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        sent = 0
        if method != "HEAD":
            payload = data if cut is None else data[:cut]
            if kind == "drip":
                sent = self._drip(payload, fault.rate)
            else:
                try:
                    self.wfile.write(payload)
                    sent = len(payload)
                except OSError:     # the client hung up mid-answer (a 200 it leaves unread): still recorded
                    self.close_connection = True
        self.owner.record(RequestRecord(method, path, status, self.headers.get("Range"), sent, kind))
        if cut is not None and fault.kind == "reset":
            self._reset_connection()
        elif cut is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _drip(self, payload: bytes, rate: float) -> int:
        """Send `payload` at `rate` bytes/s, ten writes a second (one byte at a time when slower);
        stops early, quietly, when the client goes away. Returns the bytes sent."""
        step = max(1, int(rate / 10))
        sent = 0
        try:
            while sent < len(payload):
                self.wfile.write(payload[sent:sent + step])
                self.wfile.flush()
                sent += len(payload[sent:sent + step])
                if sent < len(payload) and self._client_left_within(step / rate):
                    break
        except OSError:
            pass
        self.close_connection = True
        return sent

    def _client_left_within(self, seconds: float) -> bool:
        """Wait `seconds`, returning early (True) if the client closes the connection."""
        readable, _, _ = select.select([self.connection], [], [], seconds)
        if not readable:
            return False
        try:
            if self.connection.recv(1, socket.MSG_PEEK) == b"":
                return True
        except OSError:
            return True
        time.sleep(seconds)     # the client sent something (not an HTTP/1.1 client's habit): keep the pace
        return False

    def _answer_error(self, fault: Fault) -> None:
        code = _ERROR_CODES.get(fault.status, "UNKNOWN")
        message = fault.message or f"injected fault: {fault.status} {code.lower()}"
        payload = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self.send_response(fault.status)
        self.send_header("Content-Type", "application/json")
        for k, v in fault.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.owner.record(RequestRecord(self.command, self.path, fault.status, self.headers.get("Range"),
                                        0, "status"))

    def _reset_connection(self) -> None:
        """Abort the TCP connection with RST (SO_LINGER 0), as a crashed server or proxy would."""
        self.wfile.flush()
        self.close_connection = True
        time.sleep(0.1)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(self.connection.detach())


def spans_requested(ztoc, records: list[RequestRecord]) -> list[int]:
    """The spans of `ztoc` each Range request in `records` covered (a range = a run of adjacent
    spans; a request may ask for several), in request order: a span twice in the list was
    fetched twice."""
    out = []
    for r in records:
        spec = r.range or ""
        assert spec.startswith("bytes="), f"a blob GET without Range: {r}"
        for part in spec[len("bytes="):].split(","):
            m = re.fullmatch(r"\s*(\d+)-(\d+)\s*", part)
            assert m, f"a blob GET with a Range this helper does not read: {r}"
            lo, hi = int(m.group(1)), int(m.group(2)) + 1
            out += [i for i in range(ztoc.num_spans)
                    if ztoc.span_compressed_range(i)[0] >= lo and ztoc.span_compressed_range(i)[1] <= hi]
    return out
