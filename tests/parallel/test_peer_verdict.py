"""`distributed.await_peer_verdict` against an in-memory key-value store standing in for JAX's
coordination service: a dead peer's last heartbeat, written before it died but read only after
the error, must not pass for a live peer (that race once printed a traceback before the
watchdog's one line), and a live peer is recognised within a few heartbeat periods."""

import threading
import time

import pytest

from jaxsafe.parallel import distributed


class _Store:
    """The two key-value calls the watchdog makes."""

    def __init__(self):
        self.kv, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            self.kv[key] = value

    def key_value_try_get(self, key):
        with self.lock:
            if key not in self.kv:
                raise KeyError(key)
            return self.kv[key]


@pytest.fixture
def watchdog(monkeypatch):
    """Process 0 of 2 with a 1 s window (0.2 s period); `failed` records the watchdog's verdict
    of death (its time and line) instead of exiting the test process."""
    store = _Store()
    failed = []
    dog = distributed._Watchdog("test", 1.0, store, 0, 2)
    monkeypatch.setattr(
        dog, "_fail", lambda why: (failed.append((time.monotonic(), why)), dog.stopped.set())
    )
    monkeypatch.setattr(distributed, "_watchdog", dog)
    dog.store, dog.failed = store, failed
    yield dog
    dog.stopped.set()
    dog.join(timeout=5)


def test_a_dead_peers_last_beat_read_late_is_not_taken_for_life(watchdog):
    key = "jaxsafe/heartbeat/1"
    watchdog.store.key_value_set(key, "5")
    watchdog.start()
    while watchdog.seen[1][0] != "5":  # the watchdog has read beat 5
        time.sleep(0.01)
    # Beat 6 is the peer's last write before it dies; the watchdog has not read it yet when
    # this process's collective fails and asks for the verdict.
    watchdog.store.key_value_set(key, "6")
    distributed.await_peer_verdict()
    returned = time.monotonic()
    assert watchdog.seen[1][0] == "6"  # the late beat was read during the wait
    assert len(watchdog.failed) == 1, "the verdict returned without naming the dead peer"
    failed_at, why = watchdog.failed[0]
    assert failed_at <= returned
    assert why.startswith("process 1 of 2 sent no heartbeat for 1 s"), why


def test_a_live_peer_is_recognised_within_a_few_periods(watchdog):
    key = "jaxsafe/heartbeat/1"
    stop = threading.Event()

    def beat():
        n = 0
        while not stop.is_set():
            n += 1
            watchdog.store.key_value_set(key, str(n))
            stop.wait(watchdog.period)

    peer = threading.Thread(target=beat, daemon=True)
    peer.start()
    watchdog.start()
    try:
        time.sleep(3 * watchdog.period)
        t0 = time.monotonic()
        distributed.await_peer_verdict()
        waited = time.monotonic() - t0
    finally:
        stop.set()
        peer.join()
    assert not watchdog.failed
    # The proof needs two reads that start after the call (about two periods), and comes well
    # before the wait's deadline (the 1 s window and 4 periods).
    assert 1.5 * watchdog.period <= waited < watchdog.timeout + 3 * watchdog.period


def test_a_peer_that_finished_counts_as_alive_at_once(watchdog):
    watchdog.store.key_value_set("jaxsafe/heartbeat/1", distributed._DONE)
    watchdog.start()
    while watchdog.seen[1][0] != distributed._DONE:
        time.sleep(0.01)
    t0 = time.monotonic()
    distributed.await_peer_verdict()
    assert time.monotonic() - t0 < watchdog.period
    assert not watchdog.failed
