"""The end of a two-process run. Process 0 hosts the coordination service and leaves once JAX's
shutdown at exit lets it: a peer's watchdog must not take that for a dead process, whether the
peer is still at work when process 0 is done, or still exiting when process 0 has left (both
once stopped a finished run with status 75)."""

import subprocess
import sys

import pytest
from subprocs import REPO_ROOT, device_env, free_port

# A launcher in miniature: `user_errors.run` around a main whose process 1 keeps working for
# 5 s after the run's last collective, longer than the watchdog's 1.5 s (heartbeat timeout 6 s),
# and then spends 2 s more in an exit handler that runs after JAX's shutdown (registered
# before it: they run last in, first out), when process 0 has left.
SCRIPT = """
import atexit, sys, time
if sys.argv[2] == "1":
    atexit.register(time.sleep, 2)
from launch import user_errors

def main(argv):
    from jaxsafe.parallel import distributed
    distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]), heartbeat_timeout_s=6)
    import jax
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("last collective")
    if jax.process_index() == 1:
        time.sleep(5)
    print(f"process {jax.process_index()} done", flush=True)

user_errors.run(main, prog="tiny", argv=sys.argv[:1])
"""


@pytest.mark.slow
def test_a_peer_still_working_when_process_0_is_done_ends_normally(tmp_path):
    port = str(free_port())
    env = device_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, port, str(i)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        assert f"process {i} done" in out, out[-3000:]
