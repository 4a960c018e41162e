"""Multi-host start-up, and stopping cleanly when another process dies.

On TPU pods and SLURM clusters `jax.distributed.initialize()` finds the coordinator itself; on
plain machines (and in our two-process localhost tests) pass the address, process count and id.
CPU processes exchange collectives through gloo.

When one process of a run dies, the others would wait in their next collective (gloo on CPU
can wait indefinitely) until JAX's coordination service notices the missing heartbeats and
aborts them with a C++ stack trace. A watchdog thread here exchanges its own heartbeats through
the coordination service's key-value store and, after `heartbeat_timeout_s / 4` without news
from a peer, prints one line naming the silent process and exits with `EXIT_PEER_LOST`
(EX_TEMPFAIL: restarting every process resumes from the last checkpoint), before JAX's abort.
That abort can come as early as about `heartbeat_timeout_s / 2` after the death (with a half
window, the inferred cause of one abort seen under load; docs/reliability.md), hence the quarter.
"""

import os
import sys
import threading
import time

import jax

EXIT_PEER_LOST = 75  # sysexits.h EX_TEMPFAIL: a rerun of all processes resumes

_watchdog = None
_HEARTBEAT = "jaxsafe/heartbeat"
_DONE = "done"  # a process's last heartbeat, set by `finish`
# The peers' last steps (a final evaluation, an export) may take long; a dead one is caught by
# the watchdog, not by this timeout.
_FINISH_TIMEOUT_MS = 7 * 24 * 3600 * 1000


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = 100,
    prog: str = "jaxsafe",
) -> None:
    """Calls `jax.distributed.initialize` once (before any other JAX call) and, with more than
    one process, starts the watchdog; `prog` starts its error line."""
    global _watchdog
    if heartbeat_timeout_s < 2:
        raise ValueError(f"heartbeat_timeout_s={heartbeat_timeout_s}: must be at least 2 s")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    if jax.process_count() > 1 and _watchdog is None:
        from jax._src import distributed  # the client jax.distributed.initialize created

        _watchdog = _Watchdog(
            prog,
            heartbeat_timeout_s / 4,
            distributed.global_state.client,
            jax.process_index(),
            jax.process_count(),
        )
        _watchdog.start()


def is_primary() -> bool:
    """True on the process that writes logs, metrics and plots."""
    return jax.process_index() == 0


def await_peer_verdict() -> None:
    """Called on an error: returns once every peer has proved itself alive by a heartbeat
    written after the call (the error is this process's own), else the watchdog names the dead
    one and exits the process first. Without a watchdog (one process) it returns at once.

    The proof is a change between two reads that both started after the call: a change seen
    against an older read may be a dead peer's last beat, written before it died but read only
    now (that race once printed the error's traceback before the watchdog's line)."""
    if _watchdog is None:
        return
    # Pass `asked + 1` may have started before this call; `asked + 2` and later did not, so a
    # change recorded in pass `asked + 3` or later compares two post-call reads.
    asked = _watchdog.passes
    deadline = time.monotonic() + _watchdog.timeout + 4 * _watchdog.period
    while time.monotonic() < deadline:
        if all(
            value == _DONE or changed_in >= asked + 3
            for value, _, changed_in in list(_watchdog.seen.values())
        ):
            return
        time.sleep(_watchdog.period / 4)


def finish() -> None:
    """Called when a run ends normally: marks this process done, waits until every process is,
    then stops the watchdog.

    Process 0 hosts the coordination service and leaves as soon as JAX's shutdown at exit lets
    it; a watchdog still running in a peer then takes the vanished coordinator for a dead
    process. So the watchdog stops first, but only after the others are done too: meanwhile it
    still watches the peers that are not (a peer that dies in its last steps still stops the
    run with status 75), and a done process counts as alive for them. Without a watchdog (one
    process) it returns at once."""
    global _watchdog
    if _watchdog is None:
        return
    _watchdog.done.set()
    _watchdog.client.key_value_set(f"{_HEARTBEAT}/{_watchdog.me}", _DONE, allow_overwrite=True)
    _watchdog.client.wait_at_barrier("jaxsafe/finish", _FINISH_TIMEOUT_MS)
    _watchdog.stopped.set()
    _watchdog.join()
    _watchdog = None


class _Watchdog(threading.Thread):
    def __init__(self, prog: str, timeout: float, client, me: int, n: int):
        super().__init__(name="jaxsafe-peer-watchdog", daemon=True)
        self.client, self.prog, self.timeout = client, prog, timeout
        self.period = max(0.2, timeout / 5)
        self.me, self.n = me, n
        # peer -> (last heartbeat read, when it changed, the read pass that saw the change)
        self.seen = {j: (None, time.monotonic(), 0) for j in range(n) if j != me}
        self.passes = 0  # read passes completed
        self.done, self.stopped = threading.Event(), threading.Event()

    def _fail(self, why: str) -> None:
        sys.stderr.write(
            f"{self.prog}: error: {why}; stopping process {self.me} too (rerun all "
            f"{self.n} processes to resume from the last checkpoint)\n"
        )
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)  # the main thread may be blocked in a collective forever

    def run(self) -> None:
        """The verdict, from what `_exchange` last read: a peer whose heartbeat has not changed
        for `timeout` is dead. Taken on its own thread because a call into the coordination
        service can block (seen once when a peer was SIGKILLed, until JAX's own abort)."""
        threading.Thread(target=self._exchange, name="jaxsafe-heartbeats", daemon=True).start()
        while not self.stopped.is_set():
            now = time.monotonic()
            for j, (value, since, _) in list(self.seen.items()):
                if value != _DONE and now - since > self.timeout:
                    self._fail(
                        f"process {j} of {self.n} sent no heartbeat for "
                        f"{now - since:.0f} s: it has probably died"
                    )
            self.stopped.wait(self.period)

    def _exchange(self) -> None:
        """Writes this process's heartbeat and reads the others' every `period`."""
        beat, seen = 0, self.seen
        while not self.stopped.is_set():
            beat += 1
            try:
                self.client.key_value_set(
                    f"{_HEARTBEAT}/{self.me}",
                    _DONE if self.done.is_set() else str(beat),
                    allow_overwrite=True,
                )
            except Exception:  # the coordination service lives in process 0
                # Past `finish`'s barrier, process 0 may leave first: that is the end of the run.
                if self.done.is_set() and self.stopped.wait(self.timeout):
                    return
                self._fail(f"lost the coordinator (process 0 of {self.n}): it has probably died")
            now = time.monotonic()
            for j, (value, _, _) in list(seen.items()):
                try:
                    new = self.client.key_value_try_get(f"{_HEARTBEAT}/{j}")
                except Exception:  # not written yet
                    new = None
                if new != value:
                    seen[j] = (new, now, self.passes + 1)
            self.passes += 1
            self.stopped.wait(self.period)
