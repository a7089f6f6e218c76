"""The clock of one blob transfer: its deadline, its minimum rate, and the client's cancellation.

httpx's timeouts apply to each socket read, so a registry that sends a byte
now and then keeps a transfer alive forever. A `TransferGuard` is told about
every chunk received: a stretch of `rate_window` seconds slower than the
minimum rate ends the attempt with `TransferStalled` (an httpx read timeout, so
the retry and resume paths treat it like a dropped connection); the deadline
ends the whole transfer, retries included; a cancelled client (the service is
stopping) ends it at the next chunk or pause.
"""

from __future__ import annotations

import threading
import time

import httpx

from lazyoci.errors import RegistryError
from lazyoci.registry.options import TransferLimits

# httpx's own timeouts of an attempt never reach past the transfer's deadline by more than this,
# so a last attempt that runs out of time still ends with an error of its own.
_SLACK = 0.5


class TransferStalled(httpx.ReadTimeout):
    """The registry sent less than the minimum rate for a whole window: handled as a read timeout."""


class Cancellation:
    """A client's "stop now", set once for good; remembers when it last turned a transfer away,
    so that a stopping process can tell when its readers have given up."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.last_refusal = 0.0          # monotonic time; 0: none yet

    def set(self) -> None:
        self.last_refusal = time.monotonic()
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds`, or less if cancelled meanwhile (then True)."""
        return self._event.wait(seconds)

    def refuse(self, what: str) -> RegistryError:
        self.last_refusal = time.monotonic()
        return RegistryError(f"{what}: cancelled (the registry client is closing)")


class TransferGuard:
    """Deadline, rate floor and cancellation of one transfer; used by one thread."""

    def __init__(self, limits: TransferLimits, cancelled: Cancellation, what: str) -> None:
        self.limits = limits
        self.what = what
        self._cancelled = cancelled
        now = time.monotonic()
        self._deadline_at = now + limits.deadline if limits.deadline else None
        self._window_start = now
        self._window_bytes = 0
        self._read_timeout = 0.0
        self.last_failure = ""          # why the previous attempt ended, for the final message

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self._deadline_at is None else self._deadline_at - time.monotonic()

    def check(self) -> None:
        """RegistryError if the client was cancelled or the deadline has passed."""
        if self._cancelled.is_set():
            raise self._cancelled.refuse(self.what)
        left = self.remaining()
        if left is not None and left <= 0:
            reason = f" ({self.last_failure})" if self.last_failure else ""
            raise RegistryError(f"{self.what}: no complete answer within {self.limits.deadline:g}s{reason}")

    def timeout(self, read_timeout: float, connect_timeout: float) -> httpx.Timeout:
        """httpx timeouts for the next attempt: a socket read waits at most one rate window
        (a window without a byte is a stall anyway), nothing waits past the deadline."""
        read = read_timeout
        if self.limits.min_bytes_per_second > 0:
            read = min(read, self.limits.rate_window)
        left = self.remaining()
        if left is not None:
            read = min(read, max(left, 0.0) + _SLACK)
            connect_timeout = min(connect_timeout, max(left, 0.0) + _SLACK)
        self._read_timeout = read
        return httpx.Timeout(read, connect=connect_timeout)

    def explain(self, exc: Exception) -> str | None:
        """Why an attempt ended, when it is one of our timeouts (httpx says only "timed out")."""
        if isinstance(exc, TransferStalled):
            return str(exc)
        if isinstance(exc, httpx.ReadTimeout) and self._read_timeout:
            return f"the registry sent nothing for {self._read_timeout:.1f}s"
        return None

    def start_body(self) -> None:
        """An answer's body begins: its rate is measured from now (the wait for its headers,
        retries and pauses before it are bounded by the read timeout and the deadline)."""
        self.check()
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def received(self, n: int) -> None:
        """Count `n` bytes just received; raise when the transfer must end."""
        self.check()
        self._window_bytes += n
        floor = self.limits.min_bytes_per_second
        if floor <= 0:
            return
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed < self.limits.rate_window:
            return
        if self._window_bytes < floor * elapsed:
            raise TransferStalled(f"the registry sent {self._window_bytes} bytes in {elapsed:.1f}s, "
                                  f"less than the minimum {floor:g} bytes/s")
        self._window_start, self._window_bytes = now, 0

    def fits(self, seconds: float) -> bool:
        """Would a pause of `seconds` still end before the deadline?"""
        left = self.remaining()
        return left is None or seconds < left

    def pause(self, seconds: float, failure: str = "") -> None:
        """Wait before a retry; raise at once if cancelled, or if the pause would pass the deadline."""
        if failure:
            self.last_failure = failure
        self.check()
        if not self.fits(seconds):
            self._deadline_at = time.monotonic()     # no time for another attempt: give up now
            self.check()
        if self._cancelled.wait(seconds):
            self.check()
