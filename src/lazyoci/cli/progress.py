"""Finch-style progress rows for pull and push, drawn from ProgressEvents.

On a terminal the rows are redrawn about ten times a second in place; when the
stream is not a terminal each row is printed once, when it finishes, with no
escape codes. The stream is a parameter: `run` sends progress to stderr so that
the container's stdout stays clean.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from lazyoci.images.progress import FINAL_STATUSES, ProgressEvent

BAR_WIDTH = 40           # including the two '|'
REFRESH_SECONDS = 0.1
_DIGEST_KEY = len("manifest-sha256:") + 64
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """``35.0 MiB``"""
    for unit in _UNITS:
        if n < 1024 or unit == _UNITS[-1]:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def short_bytes(n: float) -> str:
    """``63.8 M`` as in Finch's footer."""
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.1f} {unit}".rstrip() if unit else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} T"


def bar(current: int, total: int | None, final: bool) -> str:
    inner = BAR_WIDTH - 2
    if final:
        filled = inner
    elif not total:
        filled = 0
    else:
        filled = min(inner, int(inner * current / total))
    return "|" + "+" * filled + "-" * (inner - filled) + "|"


_HEX64 = re.compile(r"(sha256:[0-9a-f]{12})[0-9a-f]{52}")


def _shorten(key: str) -> str:
    return _HEX64.sub(r"\1", key)


@dataclass
class _Row:
    key: str
    kind: str
    status: str
    current: int
    total: int | None
    printed: bool = False

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


class ProgressDisplay:
    """A ProgressSink that draws rows; use as a context manager around the operation."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._rows: dict[str, _Row] = {}
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._drawn_lines = 0
        self._last_width: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            row = self._rows.get(event.key)
            if row is None:
                row = self._rows[event.key] = _Row(event.key, event.kind, event.status, event.current, event.total)
            else:
                row.status, row.current = event.status, event.current
                if event.total is not None:
                    row.total = event.total
            if not self.tty and row.final and not row.printed:
                row.printed = True
                self.stream.write(self._format(row, self._width()) + "\n")
                self.stream.flush()

    def __enter__(self) -> "ProgressDisplay":
        self._start = time.monotonic()
        if self.tty:
            self._thread = threading.Thread(target=self._loop, name="lazyoci-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.tty:
                self._draw()
                self.stream.write(self.footer(self._last_width) + "\x1b[K\n")
            else:
                self.stream.write(self.footer() + "\n")
            self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            with self._lock:
                self._draw()

    def _width(self, short: bool = False) -> int:
        # Digest rows all have the same length; starting from it keeps rows printed early aligned.
        return max([len(_shorten(k) if short else k) for k in self._rows] + [0 if short else _DIGEST_KEY]) + 2

    def _format(self, row: _Row, width: int, short: bool = False) -> str:
        key = _shorten(row.key) if short else row.key
        line = f"{(key + ':').ljust(width)}{row.status.ljust(15)}{bar(row.current, row.total, row.final)}"
        if row.status in ("downloading", "uploading") and row.total:
            line += f" {human_bytes(row.current)}/{human_bytes(row.total)}"
        return line

    def _draw(self) -> None:
        # A line that wraps would break the cursor arithmetic: on a narrow terminal digests are
        # shortened to 12 hex digits, and what still does not fit is cut.
        import shutil     # here: a quiet pull never draws (shutil imports the compressors, 4 ms)

        cols = shutil.get_terminal_size((1000, 24)).columns - 1
        short = self._width() + 15 + BAR_WIDTH + 22 > cols
        width = self._last_width = self._width(short)
        out = []
        if self._drawn_lines:
            out.append(f"\x1b[{self._drawn_lines}F")      # back to the first row
        for row in self._rows.values():
            out.append(self._format(row, width, short)[:cols] + "\x1b[K\n")
        out.append(self.footer(width)[:cols] + "\x1b[K\n")
        self._drawn_lines = len(self._rows) + 1
        self.stream.write("".join(out))
        self.stream.flush()
        # The footer is redrawn by close(); step back over it so it is not printed twice.
        self.stream.write("\x1b[1F")
        self._drawn_lines -= 1

    def transferred(self) -> int:
        return sum(r.current for r in self._rows.values()
                   if r.kind in ("layer", "config", "manifest", "index")
                   and r.status in ("downloading", "uploading", "done"))

    def footer(self, width: int | None = None) -> str:
        elapsed = time.monotonic() - self._start
        total = self.transferred()
        rate = total / elapsed if elapsed > 0 else 0
        left = f"elapsed: {elapsed:.1f}s"
        return f"{left.ljust(width or self._width())}total: {short_bytes(total):>6} ({human_bytes(rate)}/s)"
