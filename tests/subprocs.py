"""Tests that need a fresh interpreter: several simulated CPU devices (this pytest process has
already initialised JAX with one), a second process of a `jax.distributed` run, or malloc
settings. Importable from every test module (pytest puts this folder, the root conftest's, on
``sys.path``)."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def device_env(n_devices: int = 1, **extra: str) -> dict:
    """This process's environment on the CPU backend with ``n_devices`` simulated devices,
    appended to (not replacing) the suite's XLA_FLAGS."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    flag = f"--xla_force_host_platform_device_count={n_devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    return env


def run_python(
    code: str, *args: str, n_devices: int = 1, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs the dedented ``code`` with ``args`` in a fresh interpreter from the repository root
    and fails the test, with the process's output, unless it exits with status 0."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=REPO_ROOT,
        env=device_env(n_devices),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc


def run_snippet(code: str, n_devices: int = 8, timeout: float = 300, prefix: str = "") -> str:
    """Runs ``prefix`` and the dedented ``code`` on ``n_devices`` simulated devices; fails unless
    the process reaches the code's end. Returns its stdout."""
    proc = run_python(
        prefix + textwrap.dedent(code) + "\nprint('SNIPPET-OK')\n",
        n_devices=n_devices,
        timeout=timeout,
    )
    assert "SNIPPET-OK" in proc.stdout, proc.stdout[-4000:]
    return proc.stdout


def free_port() -> int:
    """A TCP port free on the loopback interface now, for a coordinator address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
