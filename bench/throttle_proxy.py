#!/usr/bin/env python3
"""A loopback HTTP proxy that makes a local registry behave like a remote one.

    throttle_proxy.py --upstream 127.0.0.1:5000 [--listen 127.0.0.1:0] \
        --rate-mbs 100 --latency-ms 20 [--port-file F] [--max-seconds 14400]

- Bandwidth: one token bucket shared by every connection caps the response bytes
  per second (MB = 10^6 bytes), as one network link would.
- Latency: each request waits `latency-ms` before it is forwarded (a round trip), and nothing
  else: the sockets it answers on send at once (TCP_NODELAY), as Go's net/http (the registry)
  and nginx do. Without it, every request on a kept-alive connection waited about 40 ms more:
  the body's last small segment sat until the client's delayed ACK.
- Streaming: response bodies are copied in 64 KiB chunks, never buffered whole.
- Counting: `GET /_proxy/stats` returns JSON {requests, bytes, by_method, range_requests};
  `POST /_proxy/reset` zeroes it. These two paths are never forwarded. `--request-log F`
  appends one JSON line per request (wall start and end, method, path, Range, status, bytes),
  to see which requests of a command waited for which.
- Bounded: at most --max-connections handlers at once; it exits by itself after
  --max-seconds, and on SIGTERM/SIGINT (stop it by its PID).
Only loopback addresses are accepted for --listen and --upstream.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 64 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade"}


class TokenBucket:
    """Shared rate limit: each caller reserves its bytes on one timeline (fair, FIFO-ish)."""

    def __init__(self, rate: float, burst: int = CHUNK) -> None:
        self.rate = rate
        self.burst = burst
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def consume(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now - self.burst / self.rate, self.next_free)
            self.next_free = start + n / self.rate
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.range_requests = 0
        self.by_method: dict[str, int] = {}

    def request(self, method: str, ranged: bool) -> None:
        with self.lock:
            self.requests += 1
            self.by_method[method] = self.by_method.get(method, 0) + 1
            self.range_requests += int(ranged)

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes += n

    def as_dict(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "bytes": self.bytes,
                    "range_requests": self.range_requests, "by_method": dict(self.by_method)}


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True       # TCP_NODELAY, see the module docstring
    server: "ThrottleServer"

    def log_message(self, fmt: str, *args) -> None:   # quiet: the registry logs requests
        pass

    def _reply_json(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_request_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _proxy(self) -> None:
        srv = self.server
        if self.path == "/_proxy/stats" and self.command == "GET":
            return self._reply_json(srv.stats.as_dict())
        if self.path == "/_proxy/reset" and self.command == "POST":
            self._read_request_body()
            srv.stats.reset()
            return self._reply_json({"reset": True})
        with srv.slots:
            started, sent, status = time.time(), 0, 0
            try:
                sent, status = self._forward()
            finally:
                if srv.request_log is not None:
                    srv.note(started, self.command, self.path, self.headers.get("Range"), status, sent)

    def _forward(self) -> tuple[int, int]:
        """Forward one request after the link's latency; the body bytes sent and the status."""
        srv = self.server
        body = self._read_request_body()
        srv.stats.request(self.command, "Range" in self.headers)
        if srv.latency > 0:
            time.sleep(srv.latency)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        up = http.client.HTTPConnection(srv.upstream_host, srv.upstream_port, timeout=120)
        try:
            up.request(self.command, self.path, body=body, headers=headers)
            resp = up.getresponse()
            self.send_response(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            if self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                return 0, resp.status
            if length is None:        # small bodies only (errors, JSON): read to size them
                data = resp.read()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                srv.bucket.consume(len(data))
                self.wfile.write(data)
                srv.stats.add_bytes(len(data))
                return len(data), resp.status
            self.send_header("Content-Length", length)
            self.end_headers()
            sent = 0
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                srv.bucket.consume(len(chunk))
                self.wfile.write(chunk)
                srv.stats.add_bytes(len(chunk))
                sent += len(chunk)
            return sent, resp.status
        finally:
            up.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy


class ThrottleServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], rate: float,
                 latency: float, max_connections: int) -> None:
        super().__init__(listen, ProxyHandler)
        self.upstream_host, self.upstream_port = upstream
        self.bucket = TokenBucket(rate)
        self.latency = latency
        self.stats = Stats()
        self.slots = threading.BoundedSemaphore(max_connections)
        self.request_log: str | None = None
        self._log_lock = threading.Lock()

    def note(self, started: float, method: str, path: str, ranged: str | None, status: int, sent: int) -> None:
        line = json.dumps({"start": started, "end": time.time(), "method": method, "path": path,
                           "range": ranged, "status": status, "bytes": sent})
        with self._log_lock, open(self.request_log or "", "a") as f:
            f.write(line + "\n")

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up mid-blob is normal (lazy reads, Ctrl-C): no traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def _loopback(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    if host in ("localhost", ""):
        host = "127.0.0.1"
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"{hostport}: only loopback addresses are allowed")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="bandwidth- and latency-limited loopback registry proxy")
    ap.add_argument("--upstream", required=True, help="registry host:port (loopback)")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on (port 0: any free)")
    ap.add_argument("--rate-mbs", type=float, default=100.0, help="bandwidth in MB/s (10^6 B/s); 0 = unlimited")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added latency per request")
    ap.add_argument("--max-connections", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=4 * 3600, help="exit by itself after this long")
    ap.add_argument("--port-file", help="write the listening port here once ready")
    ap.add_argument("--request-log", help="append one JSON line per request to this file")
    ap.add_argument("--nagle", action="store_true",
                    help="answer without TCP_NODELAY (what this proxy did before; bench/link_latency.py)")
    args = ap.parse_args(argv)
    ProxyHandler.disable_nagle_algorithm = not args.nagle
    srv = ThrottleServer(_loopback(args.listen), _loopback(args.upstream), args.rate_mbs * 1e6,
                         args.latency_ms / 1000.0, args.max_connections)
    srv.request_log = args.request_log
    port = srv.server_address[1]

    def stop(*_: object) -> None:
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    timer = threading.Timer(args.max_seconds, stop)
    timer.daemon = True
    timer.start()
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    print(f"throttle_proxy: 127.0.0.1:{port} -> {args.upstream} at {args.rate_mbs} MB/s, "
          f"+{args.latency_ms} ms/request (pid {os.getpid()})", flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        srv.server_close()


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, socket.error) as e:  # a client going away at exit
        print(f"throttle_proxy: {e}", file=sys.stderr)
