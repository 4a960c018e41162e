"""The launchers' persistent compilation cache: where it goes, and that a second process with
the same program loads it instead of compiling (JAX logs the cache hit)."""

import os
import subprocess
import sys

import pytest

from jaxsafe import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_directory_precedence(monkeypatch, tmp_path):
    import jax

    before = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    try:
        monkeypatch.setenv("JAXSAFE_XLA_CACHE", str(tmp_path / "a"))
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "b"))
        assert compilation_cache.enable() == str(tmp_path / "a")
        monkeypatch.delenv("JAXSAFE_XLA_CACHE")
        assert compilation_cache.enable() == str(tmp_path / "b")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "b")
        assert compilation_cache.enable(str(tmp_path / "c"), 2.5) == str(tmp_path / "c")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5
        assert os.path.isdir(tmp_path / "c")
        assert compilation_cache.enable("") is None
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        assert compilation_cache.DEFAULT_DIR.endswith(os.path.join(".cache", "jaxsafe", "xla"))
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


@pytest.mark.slow
def test_a_rerun_of_the_launcher_loads_its_programs_from_the_cache(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_COMPILATION_CACHE_DIR", "JAXSAFE_XLA_CACHE")
    }
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

    def train(workdir):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "launch.train",
                "--config=configs/grokking/softmax_float32.py:smoke",
                f"--workdir={workdir}",
                f"--compilation_cache={tmp_path / 'cache'}",
                "--verbosity=1",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = train(tmp_path / "one")
    assert first.returncode == 0, first.stderr[-2000:]
    assert os.listdir(tmp_path / "cache")  # the compiled programs were stored
    second = train(tmp_path / "two")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Persistent compilation cache hit" in second.stderr
    assert "Persistent compilation cache hit" not in first.stderr


def test_an_unusable_directory_is_one_line_and_exit_status_2(tmp_path):
    """A cache path below a regular file cannot be created: the launcher says so in one line
    naming the path, exits 2 and prints no traceback."""
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "cache"
    with pytest.raises(
        compilation_cache.CacheDirError,
        match=f"compilation cache directory '{bad}' cannot be created: Not a directory",
    ):
        compilation_cache.enable(str(bad))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--config=configs/grokking/softmax_float32.py:smoke",
            f"--workdir={tmp_path / 'w'}",
            f"--compilation_cache={bad}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert errors == [
        f"train: error: compilation cache directory '{bad}' cannot be created: Not a directory"
    ]
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize(
    "prog, args",
    [
        ("sample", ["--workdir=unused"]),
        (
            "attack",
            [
                f"--config={ROOT}/configs/attacks/ring_a_bell.py",
                "--model=unused",
                "--prompts=unused",
                "--judge=oracle:red",
                "--out=unused",
            ],
        ),
        ("robustness_table", ["--table=unused", "--out=unused"]),
    ],
)
def test_the_sampling_and_attack_launchers_use_the_cache_flag(tmp_path, prog, args):
    """`launch.sample`, `launch.attack` and `launch.robustness_table` point the cache at
    `--compilation_cache` before anything else: an unusable one is their first error."""
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "cache"
    r = subprocess.run(
        [sys.executable, "-m", f"launch.{prog}", *args, f"--compilation_cache={bad}"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert errors == [
        f"{prog}: error: compilation cache directory '{bad}' cannot be created: Not a directory"
    ]
