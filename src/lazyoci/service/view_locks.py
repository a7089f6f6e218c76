"""One mount or unmount of a view at a time in the service; a mount may hand its lock on.

A pull's mount returns once the view's index is checked, and a thread of its own builds the
tree and attaches the view (service/layers.py, `LayerManager.mount(attach_later=True)`). A `run`
right after the pull, another pull of the same image, or the pull's own rollback then reaches the
same view while that thread still works: it waits for the thread's end, and finds the view
attached (or mounts it again itself if the attach failed). So the lock a mount takes is released
by whichever thread ends the mount.
"""

from __future__ import annotations

import threading

__all__ = ["ViewLocks"]

View = tuple[str, str]     # (layer digest, index digest)


class ViewLocks:
    """A lock per view, made on first use and dropped once no thread holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[View, tuple[threading.Lock, list[int]]] = {}   # view -> lock, [users]
        self._handed_on: set[View] = set()

    def acquire(self, view: View) -> None:
        with self._guard:
            lock, users = self._locks.setdefault(view, (threading.Lock(), [0]))
            users[0] += 1
        lock.acquire()

    def hand_on(self, view: View) -> None:
        """The holder leaves the release to another thread (`settle` waits for it)."""
        with self._guard:
            self._handed_on.add(view)

    def release(self, view: View) -> None:
        """Release the view's lock (from any thread: a plain lock has no owner)."""
        with self._guard:
            lock, users = self._locks[view]
            users[0] -= 1
            if not users[0]:
                del self._locks[view]
            self._handed_on.discard(view)
            lock.release()

    def settle(self, timeout: float) -> None:
        """Wait, up to `timeout` seconds for each, for the mounts handed on to other threads."""
        with self._guard:
            waiting = list(self._handed_on)
        for view in waiting:
            with self._guard:
                entry = self._locks.get(view)
            if entry is not None and entry[0].acquire(timeout=timeout):
                entry[0].release()
