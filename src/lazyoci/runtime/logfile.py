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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lazyoci.errors import ConfigError
from lazyoci.store.modes import open_private_log

_RECORD = struct.Struct("<QQ")          # offset of a line start, arrival time in ns since the epoch
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
    """Reads the log line by line with each line's time; call `read` again to follow it."""

    def __init__(self, log: Path) -> None:
        self._log = log
        self._offset = 0
        self._times_offset = 0
        self._starts: dict[int, int] = {}
        self._last_time: int | None = None
        self._pending = b""

    def read(self, final: bool) -> list[LogLine]:
        """The lines completed since the last call; with `final`, also a last line without newline."""
        try:
            with open(self._log, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self._load_times()
        start = self._offset - len(self._pending)
        self._offset += len(data)
        data = self._pending + data
        lines = []
        at = 0
        while True:
            end = data.find(b"\n", at)
            if end == -1:
                break
            lines.append(self._line(start + at, data[at:end + 1]))
            at = end + 1
        self._pending = data[at:]
        if final and self._pending:
            lines.append(self._line(start + at, self._pending))
            self._pending = b""
        return lines

    def _line(self, offset: int, data: bytes) -> LogLine:
        t = self._starts.pop(offset, None)
        if t is not None:
            self._last_time = t
        return LogLine(data, t if t is not None else self._last_time)

    def _load_times(self) -> None:
        try:
            with open(times_path(self._log), "rb") as f:
                f.seek(self._times_offset)
                raw = f.read()
        except FileNotFoundError:
            return
        usable = len(raw) - len(raw) % _RECORD.size
        self._times_offset += usable
        for offset, t in _RECORD.iter_unpack(raw[:usable]):
            self._starts[offset] = t


def select_lines(lines: list[LogLine], tail: int | None, since_ns: int | None) -> list[LogLine]:
    """docker's order of options: lines from `since` on, then the last `tail` of them."""
    if since_ns is not None:
        lines = [l for l in lines if l.time_ns is not None and l.time_ns >= since_ns]
    if tail is not None:
        lines = lines[-tail:] if tail else []
    return lines


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


def iter_chunks(lines: list[LogLine], timestamps: bool) -> Iterator[bytes]:
    for line in lines:
        if timestamps:
            yield rfc3339_nano(line.time_ns).encode() + b" " + line.data
        else:
            yield line.data
