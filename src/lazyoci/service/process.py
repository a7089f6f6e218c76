"""What the service and the session holder both do as processes of their own: detach from
whoever started them, and tell their memory use (`service status`).

Standard library only: the session holder imports little."""

from __future__ import annotations

import os
from pathlib import Path


def daemonize(log_file: Path) -> None:
    """Double fork: the grandchild goes on, re-parented to init in a session of its own (so neither
    the CLI nor a test runner has to reap it), its output appended to `log_file` (0600).

    The starter returns once the intermediate child has exited; locks taken before stay held."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)      # the intermediate child exits at once
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def rss_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
