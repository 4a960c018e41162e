"""Suite-wide set-up: a compilation cache shared by the test processes, a faster XLA compile
level, and a compile counter.

The persistent compilation cache: every test process (the xdist workers, and the launchers and
snippets the tests start as subprocesses, which inherit the environment) reads and writes one
XLA cache directory for the duration of the run, so a program compiled by one process (the
trainer's step in a kill/resume test, a sampler two tests share) is loaded, not recompiled, by
the next. `.ci/run` points `JAX_COMPILATION_CACHE_DIR` at a fresh directory it removes
afterwards; without it, one is made here per run and removed by the process that made it.
"""

import contextlib
import os
import shutil
import tempfile

_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # The first process (pytest, or xdist's controller) makes the directory; the workers it
    # starts inherit the variable and so share it.
    _OWN_CACHE = tempfile.mkdtemp(prefix="jaxsafe-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
# Cache programs that took at least this long to compile: the small ones cost more to write
# than to compile again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Tests are dominated by compiling many small programs once each. LLVM at -O1 without its
# expensive passes, instead of XLA's default -O2, compiles them 40-50% faster with the same run
# time on these sizes (docs/testing.md); the maths is XLA's HLO, which these flags leave alone.
# Subprocess tests append their device count to this XLA_FLAGS rather than replace it.
_FAST_COMPILE = "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import jax  # noqa: E402  (after the environment above, which jax reads at import)
import pytest  # noqa: E402

if os.environ.get("JAXSAFE_CI") == "1":
    # CI installs every extra (.ci/run), so a test skipped for a missing import would hide a
    # broken install: there, `pytest.importorskip` imports or fails.
    import importlib

    def _import_or_fail(modname, minversion=None, reason=None, **kwargs):
        del minversion, reason, kwargs
        return importlib.import_module(modname)

    pytest.importorskip = _import_or_fail

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` (.ci/run) sends the tests of one `xdist_group` to one worker, so the
    expensive module fixtures they share are built once. The worker tags each grouped test's id
    with ``@<group>`` for the scheduler; under pytest 9.2 with pytest-xdist 3.8 the worker's own
    hook no longer does (the groups were split over both workers, and fixtures such as the SID
    teacher trained twice): xdist sets ``item._nodeid``, and pytest 9.2 keeps the id in a
    structured ``item._id``. The tag is set here when it is missing."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = {
            str(m.args[0] if m.args else m.kwargs.get("name", "default"))
            for m in item.iter_markers("xdist_group")
        }
        if not names or "@" in item.nodeid.rsplit("]", 1)[-1]:
            continue
        tagged = f"{item.nodeid}@{'_'.join(sorted(names))}"
        if hasattr(item, "_id"):
            from _pytest.nodeid import coerce_node_id

            item._id = coerce_node_id(tagged)
        else:
            item._nodeid = tagged


def pytest_unconfigure(config):
    # Only the process that made the directory removes it (not the xdist workers, which
    # inherited it from the controller's environment).
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compile_log: list | None = None


def _on_event(event, duration, **kwargs):
    if event == _BACKEND_COMPILE and _compile_log is not None:
        _compile_log.append(kwargs.get("fun_name", "?"))


jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def _count():
    global _compile_log
    _compile_log = []
    try:
        yield _compile_log
    finally:
        _compile_log = None


@pytest.fixture
def compile_log():
    """`with compile_log() as names:` collects the name of every XLA compilation (each jit cache
    miss, whether or not the persistent cache then supplies the executable) in the block."""
    return _count


@pytest.fixture(scope="session")
def random_fid_inception(tmp_path_factory):
    """A randomly initialised FID Inception safetensors file, written as
    launch.convert_fid_inception writes pytorch-fid's (torch names and layouts): He-normal
    kernels (std √(2 / fan-in), so features stay O(1) through 94 ReLU layers), batch-norm scale
    and variance 1, shift and mean 0. Drawn in NumPy at the shapes of the abstract model: NNX's
    eager initialisation of the same took 17 s (36 s in the loaded suite)."""
    import numpy as np
    from flax import nnx

    from jaxsafe.nn import inception
    from jaxsafe.weights import convert

    path = tmp_path_factory.mktemp("inception") / "fid_inception.safetensors"
    shapes = convert.model_params(
        nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0)))
    )
    rng = np.random.default_rng(0)

    def value(name, shape):
        if name.endswith("kernel"):
            return rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / np.prod(shape[:-1]))
        return (np.ones if name.endswith(("scale", "var")) else np.zeros)(shape, np.float32)

    params = {k: value(k, s.shape).astype(np.float32) for k, s in shapes.items()}
    convert.write_safetensors(convert.params_to_state_dict(params), path)
    return str(path)
