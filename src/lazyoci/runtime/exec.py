"""`exec`: a command in a running container through `runc exec`, and docker's 127/126 for a missing command.

The new process is the container's own process (config.json) with the exec's
arguments, environment, user and working directory, written as a process file
for `runc exec --process`, so that `-e` replaces a variable instead of adding a
second one. It sees the container's mounts, so a lazy container's exec reads
lazily too.

Before the runtime is asked, the command is looked up as the runtime would look
it up (the container's PATH, symlinks resolved inside the container): a command
that is not there is `CommandNotFoundError` (exit 127), one that cannot be run is
`CommandNotExecutableError` (126), each one line in docker's words instead of the
runtime's raw log line and exit status 1.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from lazyoci.errors import CommandNotExecutableError, CommandNotFoundError, ConfigError, ContainerError
from lazyoci.runtime.bundle import DEFAULT_PATH, merge_env, resolve_in_root, resolve_user
from lazyoci.runtime.containers import ContainerStore
from lazyoci.runtime.runc import Runtime
from lazyoci.store.layout import DataRoot
from lazyoci.store.modes import write_file


@dataclass(frozen=True)
class ExecOptions:
    """docker exec's flags."""

    args: tuple[str, ...]
    interactive: bool = False      # -i
    tty: bool = False              # -t
    env: tuple[str, ...] = ()      # -e K=V / K
    user: str | None = None        # -u USER[:GROUP]
    workdir: str | None = None     # -w


def _under_mount(path: str, mount_targets: tuple[str, ...]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in mount_targets)


def _may_execute(st: os.stat_result, user: dict | None) -> bool:
    """Whether the process's user may execute the file (root: any x bit, as the kernel rules)."""
    uid = (user or {}).get("uid", 0)
    if uid == 0:
        return bool(st.st_mode & 0o111)
    gids = {(user or {}).get("gid", 0), *(user or {}).get("additionalGids", [])}
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid in gids:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def check_command(root: Path, process: dict, mount_targets: tuple[str, ...] = ()) -> None:
    """Raise docker's error if the runtime spec `process` cannot start in the filesystem at `root`.

    `root` is the container's root as this process sees it; paths under `mount_targets`
    (volumes, not visible there) are left to the runtime. The lookup is the runtime's: a
    name without `/` is searched in the process's PATH for a file with an x bit; then the
    process's user must be allowed to execute it."""
    argv0, cwd = process["args"][0], process.get("cwd") or "/"
    if "/" in argv0:
        candidates = [argv0 if argv0.startswith("/") else os.path.join(cwd, argv0)]
    else:
        env = process.get("env", [])
        path_var = next((e.split("=", 1)[1] for e in env if e.startswith("PATH=")), DEFAULT_PATH.split("=", 1)[1])
        candidates = [os.path.join(d or ".", argv0) for d in path_var.split(":")]
        candidates = [c if c.startswith("/") else os.path.join(cwd, c) for c in candidates]
    for candidate in candidates:
        if _under_mount(os.path.normpath(candidate), mount_targets):
            return
        host = resolve_in_root(root, candidate)
        try:
            st = os.stat(host) if host is not None else None
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            if not _may_execute(st, process.get("user")):
                raise CommandNotExecutableError(f'exec: "{argv0}": permission denied')
            return
        if "/" in argv0:
            if st is None:
                raise CommandNotFoundError(f'exec: "{argv0}": stat {argv0}: no such file or directory')
            raise CommandNotExecutableError(f'exec: "{argv0}": permission denied')
    raise CommandNotFoundError(f'exec: "{argv0}": executable file not found in $PATH')


def _exec_process(spec: dict, croot: Path, opts: ExecOptions) -> dict:
    """The process of the exec: the container's, with the exec's overrides."""
    process = dict(spec["process"])
    env = merge_env(tuple(process.get("env", [])), opts.env)
    if opts.user is not None:
        user = resolve_user(croot, opts.user)
        process["user"] = {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.additional_gids)}
        if not any(e.startswith("HOME=") for e in opts.env):
            env = [e for e in env if not e.startswith("HOME=")] + [f"HOME={user.home}"]
    if opts.tty and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    cwd = opts.workdir or process.get("cwd") or "/"
    if not cwd.startswith("/"):
        raise ConfigError(f"the working directory must be absolute, not {cwd!r}")
    process.update(args=list(opts.args), env=env, cwd=cwd, terminal=opts.tty)
    process.pop("consoleSize", None)
    return process


def exec_in_container(root: DataRoot, store: ContainerStore, name_or_id: str, opts: ExecOptions) -> int:
    """Run `opts.args` in the running container; its exit status (128+N for signal N)."""
    if not opts.args:
        raise ConfigError("exec needs a command to run in the container")
    rec = store.get(name_or_id)
    if rec.status != "running":
        raise ContainerError(f"container {rec.name} is not running")
    runtime = Runtime.find(rec.runtime, root.path)
    state = runtime.state(rec.id)
    if state is None or state.get("status") != "running" or not state.get("pid"):
        raise ContainerError(f"container {rec.name} is not running")
    cdir = store.dir(rec.id)
    try:
        spec = json.loads((cdir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ContainerError(f"cannot read the bundle of container {rec.name}: {e}") from None
    croot = Path(f"/proc/{state['pid']}/root")
    process = _exec_process(spec, croot, opts)
    check_command(croot, process)
    pfile = cdir / f"exec-{secrets.token_hex(8)}.json"
    write_file(pfile, json.dumps(process).encode())      # 0600: it holds the container's environment
    try:
        return _run(runtime.cmd("exec", "--process", str(pfile), rec.id), opts.interactive or opts.tty)
    finally:
        pfile.unlink(missing_ok=True)


def _run(cmd: list[str], with_stdin: bool) -> int:
    """The runtime in the foreground; Ctrl-C reaches the process through it (it forwards signals)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(cmd, stdin=None if with_stdin else subprocess.DEVNULL, close_fds=True,
                                restore_signals=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        code = proc.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 128 - code if code < 0 else code
