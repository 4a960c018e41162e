"""XLA's persistent compilation cache for the launchers.

A rerun of a launcher (a resume after a pre-emption, the next seed, a changed flag that leaves
the program alone) compiles the same programs again, and the SongUNet's and the test bed's
training steps are slow to compile on CPU (docs/benchmarks.md, "Compile time on a rerun: the
persistent compilation cache"). With the cache, XLA stores each compiled executable under
a key of its HLO, compile options and backend, and a later process with the same program
loads it instead of compiling (JAX's ``jax_compilation_cache_dir``; programs that compiled in
under ``min_compile_secs`` are not stored).
"""

import os

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jaxsafe", "xla")
#: The help of the launchers' ``--compilation_cache`` flag.
FLAG_HELP = (
    "XLA's persistent compilation cache directory (default: $JAXSAFE_XLA_CACHE or "
    "~/.cache/jaxsafe/xla; empty: off): a rerun loads the compiled programs instead "
    "of compiling them again."
)


def define_flag() -> None:
    """Defines the launchers' ``--compilation_cache`` flag, once per process (tests import
    several launchers into one process; absl refuses a second definition of a name)."""
    from absl import flags

    if "compilation_cache" not in flags.FLAGS:
        flags.DEFINE_string("compilation_cache", None, FLAG_HELP)


def enable_from_flag() -> str | None:
    """:func:`enable` with the parsed ``--compilation_cache`` flag (:func:`define_flag`)."""
    from absl import flags

    return enable(flags.FLAGS.compilation_cache)


class CacheDirError(OSError):
    """The cache directory cannot be created (the message names it and why)."""


def enable(directory: str | None = None, min_compile_secs: float | None = None) -> str | None:
    """Points JAX's persistent compilation cache at ``directory``; ``""`` leaves it off.
    Default: $JAXSAFE_XLA_CACHE, else JAX's own $JAX_COMPILATION_CACHE_DIR, else
    ``~/.cache/jaxsafe/xla``; ``min_compile_secs`` default: JAX's
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, else 1. Returns the directory used."""
    import jax

    if directory is None:
        directory = os.environ.get(
            "JAXSAFE_XLA_CACHE", os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_DIR)
        )
    if not directory:
        return None
    if min_compile_secs is None:
        min_compile_secs = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CacheDirError(
            f"compilation cache directory {directory!r} cannot be created: {e.strerror or e}"
        ) from e
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return directory
