#!/usr/bin/env python3
"""What one Range request costs through the throttling proxy, as lazyoci's registry client sees it.

    .venv/bin/python bench/link_latency.py [--requests 20] [--bytes 1500000]

One registry on loopback holds a random 20 MiB blob; the proxy in front of it models a 100 MB/s
link with 20 ms per request, once with TCP_NODELAY on its sockets (what `run_bench.py` uses) and
once without (`--nagle`, what it did before). Against each, `--requests` Range reads one after
another, of `--bytes` each (about one 4 MiB span of a gzip layer, compressed): through lazyoci's
`RegistryClient.fetch_range`, which keeps its connection alive as the service does, and through a
new `http.client` connection per request. The link alone gives 20 ms + bytes / 100 MB/s.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import localreg  # noqa: E402
from lazyoci.oci.reference import Reference  # noqa: E402
from lazyoci.registry.client import RegistryClient  # noqa: E402
from lazyoci.registry.options import RegistryOptions  # noqa: E402

BLOB = 20 << 20


def timed(n: int, one: "callable") -> list[float]:
    out = []
    for i in range(n):
        t = time.monotonic()
        one(i)
        out.append(1000 * (time.monotonic() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--bytes", type=int, default=1_500_000)
    args = ap.parse_args()
    size = min(args.bytes, BLOB // 2)
    work = Path(tempfile.mkdtemp(prefix="link-latency-"))
    reg = localreg.start_registry(work / "registry")
    rows: list[tuple[str, str, list[float]]] = []
    try:
        data = os.urandom(BLOB)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        options = RegistryOptions(insecure_registries=(reg.host,))
        RegistryClient(options).push_blob(Reference.parse(f"{reg.host}/bench/link:latest"), digest, BLOB,
                                          lambda: io.BytesIO(data))

        def span(i: int) -> tuple[int, int]:
            start = (i * 1_048_576) % (BLOB - size)
            return start, start + size

        for nagle in (False, True):
            proxy = localreg.start_proxy(reg.host, 100, 20, work, nagle=nagle)
            try:
                ref = Reference.parse(f"{proxy.host}/bench/link:latest")
                client = RegistryClient(RegistryOptions(insecure_registries=(proxy.host,)))

                def kept_alive(i: int) -> None:
                    start, end = span(i)
                    assert len(client.fetch_range(ref, digest, start, end)) == size

                def fresh(i: int) -> None:
                    start, end = span(i)
                    conn = http.client.HTTPConnection(proxy.host, timeout=30)
                    conn.request("GET", f"/v2/bench/link/blobs/{digest}",
                                 headers={"Range": f"bytes={start}-{end - 1}"})
                    assert len(conn.getresponse().read()) == size
                    conn.close()

                proxy_kind = "without TCP_NODELAY (before)" if nagle else "TCP_NODELAY"
                rows.append((proxy_kind, "lazyoci client, kept alive", timed(args.requests, kept_alive)))
                rows.append((proxy_kind, "new connection each", timed(args.requests, fresh)))
                client.close()
            finally:
                proxy.stop()
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"`{' '.join(['python', 'bench/link_latency.py', *sys.argv[1:]])}`: {args.requests} Range reads of "
          f"{size} bytes one after another; the link alone: {20 + size / 1e5:.0f} ms\n")
    print("| proxy | client | median ms | min-max ms |")
    print("|---|---|---:|---|")
    for proxy_kind, how, ms in rows:
        print(f"| {proxy_kind} | {how} | {statistics.median(ms):.0f} | {min(ms):.0f}-{max(ms):.0f} |")


if __name__ == "__main__":
    main()
