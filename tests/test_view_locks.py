"""One mount or unmount of a view at a time, and a mount's lock handed on to the thread that
attaches the view (service/view_locks.py)."""

from __future__ import annotations

import threading
import time

from lazyoci.service.view_locks import ViewLocks

VIEW = ("sha256:" + "a" * 64, "sha256:" + "b" * 64)
OTHER = ("sha256:" + "a" * 64, "sha256:" + "c" * 64)


def test_a_second_mount_of_a_view_waits_for_the_thread_the_first_handed_its_lock_to():
    locks = ViewLocks()
    events: list[str] = []
    attached = threading.Event()
    locks.acquire(VIEW)
    locks.hand_on(VIEW)

    def attach() -> None:
        attached.wait(10)
        events.append("attached")
        locks.release(VIEW)

    threading.Thread(target=attach, daemon=True).start()

    def second_mount() -> None:
        locks.acquire(VIEW)
        events.append("second mount")
        locks.release(VIEW)

    second = threading.Thread(target=second_mount, daemon=True)
    second.start()
    locks.acquire(OTHER)          # another view's lock is its own
    locks.release(OTHER)
    time.sleep(0.1)
    assert events == []
    attached.set()
    second.join(10)
    assert events == ["attached", "second mount"]
    assert locks._locks == {} and locks._handed_on == set()      # nothing kept once no one holds them


def test_settle_waits_for_the_views_handed_on_and_no_others():
    locks = ViewLocks()
    locks.acquire(OTHER)          # a mount under way that keeps its lock: not waited for
    locks.acquire(VIEW)
    locks.hand_on(VIEW)
    settled = threading.Event()
    waiter = threading.Thread(target=lambda: (locks.settle(60), settled.set()), daemon=True)
    waiter.start()
    time.sleep(0.1)
    assert not settled.is_set()
    locks.release(VIEW)
    waiter.join(10)
    assert settled.is_set()
    locks.settle(60)              # nothing handed on now: returns although OTHER is held
    locks.release(OTHER)


def test_settle_gives_up_after_its_timeout():
    locks = ViewLocks()
    locks.acquire(VIEW)
    locks.hand_on(VIEW)
    locks.settle(0.05)            # returns, the view still held
    assert locks._handed_on == {VIEW}
    locks.release(VIEW)
