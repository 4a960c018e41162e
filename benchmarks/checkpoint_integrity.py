r"""What checkpoint verification costs: the checksums written with each save and checked on
restore (``jaxsafe.train.checkpoint``; ``train.verify_checkpoints=False`` turns them off).

    python -m benchmarks.checkpoint_integrity [--sizes_mb=16,256] [--leaves=64] [--rounds=3] \
        [--safetensors_mb=256]

For a state of ``--leaves`` float32 arrays totalling each size: the fingerprint program's compile
time and throughput (GB/s over the state), and the wall time of a save (until orbax hands the
write to its background thread, i.e. what the training step waits for, and until the write is
committed) and of a restore, with and without verification, alternated (A B A B); the
overhead is the difference. The saves go to a temporary directory on the local disk.

The same for the exports: ``jaxsafe.weights.convert.write_safetensors`` / ``read_safetensors``
(CRC-32 of every tensor in the header, verified on read) against safetensors' own
``save_file`` / ``load_file`` on ``--safetensors_mb`` of float32 tensors (files in the page
cache).
"""

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes_mb", ["16", "256"], "State sizes in MiB, one row each.")
_LEAVES = flags.DEFINE_integer("leaves", 64, "Arrays in the state.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of the arms in turn.")
_ST_MB = flags.DEFINE_integer("safetensors_mb", 256, "Export size in MiB (0: skip).")


def main(argv):
    del argv
    import shutil
    import tempfile
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import machine, stats
    from jaxsafe.train import checkpoint

    print(machine())
    for mb in map(int, _SIZES.value):
        n = mb * 2**20 // 4 // _LEAVES.value
        state = {
            f"w{i}": jnp.asarray(np.random.default_rng(i).normal(size=n), jnp.float32)
            for i in range(_LEAVES.value)
        }
        gb = 4 * n * _LEAVES.value / 1e9
        t0 = time.perf_counter()
        jax.block_until_ready(checkpoint.fingerprint(state))
        compile_s = time.perf_counter() - t0
        fp = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(checkpoint.fingerprint(state))
            fp.append(time.perf_counter() - t0)
        print(
            f"state {mb} MiB ({_LEAVES.value} arrays): fingerprint compile+first "
            f"{compile_s:.2f} s, {stats(fp)} s per call = {gb / np.median(fp):.2f} GB/s"
        )
        times = {
            (v, k): []
            for v in (True, False)
            for k in ("save_blocking", "save_committed", "restore")
        }
        for r in range(_ROUNDS.value + 1):  # round 0 warms up orbax and the compiles
            for verify in (True, False):
                d = tempfile.mkdtemp(prefix="ckbench")
                try:
                    ck = checkpoint.Checkpointer(d, save_every=1, verify=verify)
                    t0 = time.perf_counter()
                    ck.save(1, state)
                    t1 = time.perf_counter()
                    ck.wait()
                    t2 = time.perf_counter()
                    ck.restore(state)
                    t3 = time.perf_counter()
                    ck.close()
                finally:
                    shutil.rmtree(d)
                if r:
                    times[verify, "save_blocking"].append(t1 - t0)
                    times[verify, "save_committed"].append(t2 - t0)
                    times[verify, "restore"].append(t3 - t2)
        for what in ("save_blocking", "save_committed", "restore"):
            on, off = np.median(times[True, what]), np.median(times[False, what])
            print(
                f"  {what:15s} verified {stats(times[True, what])} s, unverified "
                f"{stats(times[False, what])} s: {on - off:+.3f} s "
                f"({100 * (on / off - 1):+.0f} %)"
            )

    if _ST_MB.value:
        _safetensors(_ST_MB.value, _LEAVES.value, _ROUNDS.value)


def _safetensors(mb: int, leaves: int, rounds: int) -> None:
    import os
    import tempfile
    import time

    import numpy as np
    from safetensors.numpy import load_file, save_file

    from benchmarks.common import stats
    from jaxsafe.weights import convert

    n = mb * 2**20 // 4 // leaves
    tensors = {
        f"w{i}": np.random.default_rng(i).normal(size=n).astype(np.float32) for i in range(leaves)
    }
    arms = {
        "write": (lambda f: convert.write_safetensors(tensors, f), lambda f: save_file(tensors, f)),
        "read": (convert.read_safetensors, load_file),
    }
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "x.safetensors")
        times = {(what, checked): [] for what in arms for checked in (True, False)}
        for r in range(rounds + 1):
            for checked in (True, False):
                for what in ("write", "read"):
                    t0 = time.perf_counter()
                    arms[what][0 if checked else 1](f)
                    if r:
                        times[what, checked].append(time.perf_counter() - t0)
    print(f"safetensors export {mb} MiB ({leaves} tensors):")
    for what in arms:
        on, off = np.median(times[what, True]), np.median(times[what, False])
        print(
            f"  {what:5s} with checksums {stats(times[what, True])} s, safetensors alone "
            f"{stats(times[what, False])} s: {on - off:+.3f} s ({100 * (on / off - 1):+.0f} %)"
        )


if __name__ == "__main__":
    app.run(main)
