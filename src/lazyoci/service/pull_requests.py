"""`lazyoci pull` run by the running service, as nerdctl asks containerd to pull: the request the
CLI sends and the conversation that follows, on one control connection.

The service has the registry client, the image service and the lazy pull loaded already; a
pull it runs costs the CLI its own start and the drawing of rows, not the import of httpx and
the pull code. What the user sees is the same: the service sends the pull's progress events
and INFO lines, which the CLI draws and prints as it would its own, and its error arrives as
the same class and message (service/error_wire.py). One JSON object per line:

    CLI     -> {"op": "pull", "ref", "platform", "snapshotter", "all_platforms", "index_digest",
                "progress": bool, "insecure_registries": [...], "mirrors": {host: [...]},
                "environment": {...}}
    service -> {"progress": [key, kind, status, current, total]}      a progress event
               {"info": line}                                          a line for the user
               {"credentials": registry}                               a question: the CLI answers
    CLI     -> {"credentials": {"username", "password"} | null}       from its own docker config
               {"credentials_error": error reply}                      (reading it failed)
               {"op": "cancel"}                                        Ctrl-C: stop and roll back
    service -> {"ok": true, "digest": D} or an error reply              the end, after any rollback
               {"ok": false, "elsewhere": why}                         not here: the CLI pulls itself

Credentials are asked for when a registry challenges, and answered by the CLI from the docker
config it would have read itself (its $DOCKER_CONFIG, its home, its credential helpers), so
the service pulls with exactly what the user could pull with. The registry client also reads
its proxies and CA bundle from the environment: the request carries the CLI's, and a service
whose own differ leaves the pull to the CLI (`elsewhere`). So does a service too old to know
the request. Closing the connection (the CLI killed) cancels the pull too.

A service that goes while it pulls (`service restart` hands over at once, and after a crash the
session holder starts the next one) takes the pull with it, not the CLI: the CLI asks the next
service for the same pull, which goes on from what the store holds (up to RESUMES times, waiting
up to RESUME_SECONDS for a service to answer). A stopped service cancels its pulls instead: their
CLIs get the error.

This module is what the CLI imports: the standard library and the error tree only; the
service's side is service/pull_runner.py.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lazyoci.errors import LazyociError, ServiceError
from lazyoci.service.error_wire import error_from_reply, error_reply
from lazyoci.service.paths import ServicePaths, connect, pid_file_locked

if TYPE_CHECKING:
    from lazyoci.images.progress import ProgressSink
    from lazyoci.store.layout import DataRoot

__all__ = ["PullRequest", "registry_environment", "request_pull"]

CONNECT_TIMEOUT = 10.0
RESUMES = 2               # times a pull is asked of the next service after its service went
RESUME_SECONDS = 30.0     # ... waiting this long for one to answer
# Variables of the environment the registry client reads (httpx, through urllib's proxy rules and
# the CA bundle) and how layers are inflated: a service that sees other values is not asked.
_ENVIRONMENT = ("SSL_CERT_FILE", "SSL_CERT_DIR", "LAZYOCI_INFLATE")
_UNKNOWN = "unknown request 'pull'"     # what a service older than this request answers


def registry_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of `environ` (default: this process's) that change how a pull reaches
    registries: every `*_proxy` (any case, as urllib reads them) and the CA bundle's."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if v and (k.lower().endswith("_proxy") or k in _ENVIRONMENT)}


@dataclass(frozen=True)
class PullRequest:
    """What `lazyoci pull` was asked, and the registry settings of the CLI's flags and config."""

    ref: str
    snapshotter: str
    platform: str | None = None
    all_platforms: bool = False
    index_digest: str | None = None
    progress: bool = True
    insecure_registries: tuple[str, ...] = ()
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"op": "pull", "ref": self.ref, "snapshotter": self.snapshotter, "platform": self.platform,
                "all_platforms": self.all_platforms, "index_digest": self.index_digest,
                "progress": self.progress, "insecure_registries": list(self.insecure_registries),
                "mirrors": {k: list(v) for k, v in self.mirrors.items()}, "environment": dict(self.environment)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "PullRequest":
        """The request a CLI sent; a LazyociError names what is malformed."""
        def text(name: str, optional: bool = False) -> Any:
            value = doc.get(name)
            if not (isinstance(value, str) or (optional and value is None)):
                raise LazyociError(f"bad request: {name!r} must be a string")
            return value

        def texts(value: object, name: str) -> tuple[str, ...]:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise LazyociError(f"bad request: {name!r} must be a list of strings")
            return tuple(value)

        mirrors = doc.get("mirrors") or {}
        environment = doc.get("environment") or {}
        if not isinstance(mirrors, dict) or not isinstance(environment, dict) or \
                not all(isinstance(v, str) for v in environment.values()):
            raise LazyociError("bad request: 'mirrors' and 'environment' must be objects")
        return cls(ref=text("ref"), snapshotter=text("snapshotter"), platform=text("platform", True),
                   all_platforms=bool(doc.get("all_platforms")), index_digest=text("index_digest", True),
                   progress=bool(doc.get("progress")),
                   insecure_registries=texts(doc.get("insecure_registries") or [], "insecure_registries"),
                   mirrors={str(k): texts(v, "mirrors") for k, v in mirrors.items()},
                   environment={str(k): v for k, v in environment.items()})


class _Conversation:
    """The CLI's end of one pull's connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self.lost = False         # the service went without ending the pull

    def _lost(self, why: str = "") -> ServiceError:
        self.lost = True
        return ServiceError("lost the lazyoci service during the pull" + (f": {why}" if why else ""))

    def send(self, doc: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(doc).encode() + b"\n")
        except OSError as e:
            raise self._lost(str(e.strerror or e)) from None

    def next(self) -> dict[str, Any] | None:
        """The service's next message; None once it has closed the connection."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            doc = json.loads(line)
        except ValueError:
            raise ServiceError("the lazyoci service sent a malformed line during the pull") from None
        if not isinstance(doc, dict):
            raise ServiceError("the lazyoci service sent a malformed line during the pull")
        return doc

    def follow(self, progress: "ProgressSink | None", log: Callable[[str], None]) -> str | None:
        """Draw and print what the service reports until the pull ends: its image's digest, or
        None when the service leaves the pull to the CLI."""
        from lazyoci.images.progress import ProgressEvent

        while True:
            try:
                msg = self.next()
            except OSError as e:
                raise self._lost(str(e.strerror or e)) from None
            if msg is None:
                raise self._lost()
            if "progress" in msg:
                if progress is not None:
                    try:
                        event = ProgressEvent(*msg["progress"])
                    except TypeError:
                        raise ServiceError("the lazyoci service sent a malformed progress event") from None
                    progress(event)
            elif "info" in msg:
                log(str(msg["info"]))
            elif "credentials" in msg:
                self.send(_credentials_answer(str(msg["credentials"])))
            elif msg.get("ok"):
                return str(msg["digest"])
            elif msg.get("elsewhere") or (msg.get("error") == _UNKNOWN and msg.get("type") == "LazyociError"):
                return None
            else:
                raise error_from_reply(msg)

    def cancel(self) -> None:
        """Ask the service to stop the pull, and wait until it has rolled back (its last line)."""
        try:
            self.send({"op": "cancel"})
            while (msg := self.next()) is not None and "ok" not in msg:
                if "credentials" in msg:
                    self.send({"credentials": None})
        except (OSError, LazyociError):
            pass              # the service is gone, or broke the protocol: nothing more to wait for


def _credentials_answer(registry: str) -> dict[str, Any]:
    """This process's stored credentials for `registry`, as the CLI's own registry client reads them."""
    from lazyoci.registry.credentials import DockerConfig

    try:
        creds = DockerConfig().get(registry)
    except LazyociError as e:
        return {"credentials_error": error_reply(e)}
    return {"credentials": None if creds is None else {"username": creds.username, "password": creds.password}}


def request_pull(root: "DataRoot", request: PullRequest, progress: "ProgressSink | None",
                 log: Callable[[str], None]) -> str | None:
    """Have the running service pull: its progress goes to `progress`, its INFO lines to `log`;
    returns the pulled image's digest, or None when no service runs for `root` (or it leaves the
    pull to the caller). The pull's error is raised as the service met it. Ctrl-C (KeyboardInterrupt)
    cancels the service's pull and returns once it has rolled back, then goes on up."""
    paths = ServicePaths(root)
    try:
        sock = connect(paths.socket, CONNECT_TIMEOUT)
    except OSError:
        return None          # not running (or not ours to reach): the caller pulls, as without a service
    resumes = 0
    while True:
        with sock:
            sock.settimeout(None)
            talk = _Conversation(sock)
            try:
                talk.send(request.to_json())
                return talk.follow(progress, log)
            except LazyociError as e:
                # the pull's own end, or the connection's: nothing left to cancel; a service that
                # went without ending the pull is asked again below, through the next one
                if not talk.lost or resumes == RESUMES:
                    raise
                lost = e
            except BaseException:
                # Ctrl-C, or drawing failed (stdout closed): the pull stops, as the CLI's own would,
                # and rolls back before this process goes on
                talk.cancel()
                raise
        resumes += 1
        following = _next_service(paths)
        if following is None:
            raise lost
        sock = following


def _next_service(paths: ServicePaths) -> socket.socket | None:
    """A connection to the service that follows one that went; None if none answers in time, or
    none is coming: no service process holds its pid file's lock (one getting ready does) and no
    session holder lives (it starts the next one after a crash)."""
    from lazyoci.service.holder_link import HolderPaths, holder_alive

    deadline = time.monotonic() + RESUME_SECONDS
    while True:
        try:
            return connect(paths.socket, CONNECT_TIMEOUT)
        except OSError:
            if time.monotonic() > deadline:
                return None
            if not pid_file_locked(paths.pid_file) and not holder_alive(HolderPaths(paths.dir)):
                return None
        time.sleep(0.05)
