"""A threaded HTTP server on a free loopback port, served from a daemon thread.

The test servers (fault proxy, token endpoint) share this lifecycle so that each
stops cleanly, joins its thread and frees its port.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve_in_thread(handler: type[BaseHTTPRequestHandler],
                    server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer,
                    ) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = server_class(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True, kwargs={"poll_interval": 0.05})
    thread.start()
    return server, thread


def stop_server(server: ThreadingHTTPServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(5)
