"""A container's log: its output byte for byte, and when each line began.

`container.log` holds the output exactly as the container wrote it (binary
output stays intact). Beside it, `container.log.times` holds one record per line
start: the line's offset in the log and the time it arrived (nanoseconds), so
that `logs --timestamps` and `--since` can answer per line as docker's json-file
logs do, without changing what the log holds.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lazyoci.errors import ConfigError
from lazyoci.store.modes import open_private_log

_RECORD = struct.Struct("<QQ")          # offset of a line start, arrival time in ns since the epoch
_RECORD_BATCH = 4096
_STRETCH = 256 << 10                    # bytes of the log read at a time
_GO_DURATION = re.compile(r"((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def times_path(log: Path) -> Path:
    return log.with_name(log.name + ".times")


class LogWriter:
    """Appends output to the log and records when each of its lines started (thread-safe)."""

    def __init__(self, log: Path) -> None:
        self._log = _append_only(log)
        self._times = _append_only(times_path(log))
        self._offset = self._log.seek(0, os.SEEK_END)
        self._at_line_start = self._offset == 0 or _last_byte(log) == b"\n"
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            now = time.time_ns()
            starts = [self._offset] if self._at_line_start else []
            at = data.find(b"\n")
            while at != -1 and at + 1 < len(data):
                starts.append(self._offset + at + 1)
                at = data.find(b"\n", at + 1)
            self._log.write(data)
            if starts:
                self._times.write(b"".join(_RECORD.pack(s, now) for s in starts))
            self._offset += len(data)
            self._at_line_start = data.endswith(b"\n")

    def close(self) -> None:
        self._log.close()
        self._times.close()


def _append_only(path: Path):
    """A container's file, readable by its owner only, like the container's directory."""
    return os.fdopen(open_private_log(path), "ab", buffering=0)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


@dataclass(frozen=True)
class LogLine:
    data: bytes                 # with its newline, except a last line still being written
    time_ns: int | None         # when it arrived; None for output logged without times


class LogReader:
    """Reads the log a stretch at a time, line by line with each line's time (memory bounded by
    the stretch, whatever the log's size); call `read` again to follow it."""

    def __init__(self, log: Path) -> None:
        self._log = log
        self._offset = 0
        self._times_offset = 0
        self._times: deque[tuple[int, int]] = deque()    # line starts not reached yet, in order
        self._last_time: int | None = None
        self._pending = b""
        self.caught_up = False      # the last `read` reached the end of what was written

    def read(self, final: bool) -> list[LogLine]:
        """The lines completed in the next stretch; with `final`, once at the end, also a last line
        without newline. A line longer than a stretch comes in pieces, as docker splits long lines."""
        try:
            with open(self._log, "rb") as f:
                f.seek(self._offset)
                data = f.read(_STRETCH)
        except FileNotFoundError:
            data = b""
        self.caught_up = len(data) < _STRETCH
        start = self._offset - len(self._pending)
        self._offset += len(data)
        self._load_times(self._offset)
        data = self._pending + data
        lines = []
        at = 0
        while True:
            end = data.find(b"\n", at)
            if end == -1:
                break
            lines.append(LogLine(data[at:end + 1], self._time_at(start + at)))
            at = end + 1
        self._pending = data[at:]
        if self._pending and ((final and self.caught_up) or len(self._pending) >= _STRETCH):
            lines.append(LogLine(self._pending, self._time_at(start + at)))
            self._pending = b""
        return lines

    def _time_at(self, offset: int) -> int | None:
        """The time of the line starting at `offset`: its own record, else the last one before it."""
        while self._times and self._times[0][0] <= offset:
            self._last_time = self._times.popleft()[1]
        return self._last_time

    def _load_times(self, upto: int) -> None:
        """Queue the records of line starts before `upto` (and at most one batch more)."""
        if self._times and self._times[-1][0] >= upto:
            return
        try:
            f = open(times_path(self._log), "rb")
        except FileNotFoundError:
            return
        with f:
            f.seek(self._times_offset)
            while True:
                raw = f.read(_RECORD.size * _RECORD_BATCH)
                usable = len(raw) - len(raw) % _RECORD.size     # a record being written: next time
                self._times_offset += usable
                self._times.extend(_RECORD.iter_unpack(raw[:usable]))
                if len(raw) < _RECORD.size * _RECORD_BATCH or self._times[-1][0] >= upto:
                    return


def lines_since(lines: list[LogLine], since_ns: int | None) -> list[LogLine]:
    """The lines that arrived at `since_ns` or later (all of them if it is None)."""
    if since_ns is None:
        return lines
    return [l for l in lines if l.time_ns is not None and l.time_ns >= since_ns]


def rfc3339_nano(time_ns: int | None) -> str:
    """docker's --timestamps prefix (RFC 3339 with nanoseconds, UTC)."""
    if time_ns is None:
        return "0001-01-01T00:00:00.000000000Z"
    seconds, nanos = divmod(time_ns, 10**9)
    stamp = _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z"


def parse_tail(text: str) -> int | None:
    """`--tail`: a number of lines, or "all" (None)."""
    if text == "all":
        return None
    if text.isascii() and text.isdigit():
        return int(text)
    raise ConfigError(f"--tail must be a number of lines or 'all', not {text!r}")


def parse_since(text: str, now_ns: int | None = None) -> int:
    """`--since` as docker takes it: a duration before now (10m, 1h30m), a Unix time, or an RFC 3339 time."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if _GO_DURATION.fullmatch(text):
        total = 0.0
        for m in re.finditer(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", text):
            total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        return now_ns - int(total)
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds, _, fraction = text.partition(".")
        return int(seconds) * 10**9 + int((fraction + "000000000")[:9])
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since must be a duration (10m), a Unix time or an RFC 3339 time, not {text!r}") \
            from None
    if moment.tzinfo is None:
        moment = moment.astimezone()    # a time without zone is local, as docker reads it
    return int(moment.timestamp()) * 10**9 + moment.microsecond * 1000


def iter_chunks(lines: Iterable[LogLine], timestamps: bool) -> Iterator[bytes]:
    for line in lines:
        if timestamps:
            yield rfc3339_nano(line.time_ns).encode() + b" " + line.data
        else:
            yield line.data
