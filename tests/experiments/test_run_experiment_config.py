"""What ``experiments.run_experiment`` does with the config: the experiment's ``resolve`` hook
(config.json is the config ``build`` received and the run used; the caller's config is
unchanged), ``config.sharding_rules`` (validated, then put before the task's own rules, on 8
simulated devices), and the guard against a ``build`` that writes into its config."""

import copy
import json
import math
import os
import types

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from subprocs import run_python

import experiments
from configs.dbpm import basic_motions
from experiments import dbpm as E
from jaxsafe import parallel, train
from jaxsafe.data import timeseries as ts


def tiny_task(config, mesh):
    """A two-parameter task that trains in milliseconds."""
    del config, mesh
    return train.Task(
        graphdef=None,
        params={"w": jnp.zeros(2)},
        frozen={},
        optimizer=optax.sgd(0.1),
        loss_fn=lambda p, f, e, b, r: (jnp.sum((p["w"] - 1.0) ** 2), ({}, e)),
        train_data={"x": np.zeros((1, 1), np.float32)},
    )


@pytest.fixture
def fake(monkeypatch):
    """Registers modules under fake experiment names."""
    modules = {}
    monkeypatch.setattr(experiments, "get", lambda name: modules[name])
    return modules


def smoke_config():
    c = basic_motions.get_config("smoke")
    with c.unlocked():
        c.experiment = "dbpm_resolved"
        c.train.async_checkpointing = False
    c.lock()  # as the launchers load it
    return c


def test_dbpm_resolve_is_pure_and_matches_the_data_set():
    c = smoke_config()
    before = c.to_dict()
    r = E.resolve(c)
    assert c.to_dict() == before and r is not c
    assert r.is_locked and r.train.is_locked
    # Independently: BasicMotions' training split, batch 20, 2 epochs.
    n = len(ts.load_bundled("BasicMotions").train["x"])
    spe = math.ceil(n / c.train.batch_size)
    assert (n, spe) == (40, 2)
    assert r.train.num_steps == c.epochs * spe == 4
    assert r.train.steps_per_call == max(k for k in range(1, 9) if spe % k == 0) == 2
    assert r.train.log_every == spe
    assert r.train.eval_every == r.train.num_steps
    assert r.train.checkpoint_every == spe * max(1, c.epochs // 8) == 2
    # Everything else is the input's.
    rest = r.to_dict()
    for k in E.EPOCH_FIELDS:
        rest["train"][k] = before["train"][k]
    assert rest == before
    # Values already given are kept; a resolved config resolves to itself.
    with c.unlocked():
        c.train.num_steps = 6
    r6 = E.resolve(c)
    assert (r6.train.num_steps, r6.train.eval_every, r6.train.log_every) == (6, 6, 2)
    assert E.resolve(r6).to_dict() == r6.to_dict()


def test_config_json_is_the_resolved_config_build_received(fake, tmp_path):
    c = smoke_config()
    before = copy.deepcopy(c.to_dict())
    seen = {}

    def build(config, mesh):
        seen["config"] = config.to_dict()
        with open(os.path.join(str(tmp_path), "config.json")) as f:
            seen["json"] = json.load(f)  # written before build runs
        return tiny_task(config, mesh)

    def summarize(config, state, task, workdir):
        return {"step": int(state.step)}

    fake["dbpm_resolved"] = types.SimpleNamespace(
        resolve=E.resolve, build=build, summarize=summarize
    )
    summary = experiments.run_experiment(c, str(tmp_path))
    assert c.to_dict() == before  # the caller's config is unchanged
    got = seen["config"]
    assert seen["json"] == json.loads(json.dumps(got))
    for k in E.EPOCH_FIELDS:
        assert got["train"][k] > 0, k  # no -1 left
    assert got["train"]["num_steps"] == 4 and summary["step"] == 4
    assert got == E.resolve(c).to_dict()


@pytest.mark.slow
def test_the_dbpm_experiment_runs_on_its_resolved_config(tmp_path, monkeypatch):
    c = basic_motions.get_config("smoke")
    with c.unlocked():
        c.train.async_checkpointing = False
    c.lock()
    before = c.to_dict()
    seen = {}
    build = E.build

    def spy(config, mesh):
        seen["build"] = config.to_dict()
        return build(config, mesh)

    monkeypatch.setattr(E, "build", spy)
    summary = experiments.run_experiment(c, str(tmp_path))
    assert c.to_dict() == before
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert (
        saved
        == json.loads(json.dumps(seen["build"]))
        == json.loads(json.dumps(E.resolve(c).to_dict()))
    )
    assert [saved["train"][k] for k in E.EPOCH_FIELDS] == [4, 2, 2, 4, 2]
    rows = train.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert max(r["step"] for r in rows) == 4 and 0 <= summary["probe_accuracy"] <= 1


def test_a_build_that_writes_into_its_config_is_refused(fake, tmp_path):
    def build(config, mesh):
        config.train.num_steps = 3
        return tiny_task(config, mesh)

    fake["writer"] = types.SimpleNamespace(build=build)
    c = smoke_config()
    with pytest.raises(RuntimeError, match="'writer': build wrote into its config"):
        experiments.run_experiment(_named(c, "writer"), str(tmp_path))


def _named(c, name):
    c = copy.deepcopy(c)
    c.experiment = name
    c.train.update(num_steps=2, steps_per_call=1, log_every=1, eval_every=0, checkpoint_every=2)
    return c


@pytest.mark.parametrize(
    "rule, message",
    [
        ((".*kernel",), r"rule \('\.\*kernel',\) is not a \(regex, spec\) pair"),
        ("kernel", r"rule 'kernel' is not a \(regex, spec\) pair"),
        (("([", ()), r"rule \('\(\[', \(\)\): bad regex"),
        ((3, ()), r"rule \(3, \(\)\): the regex must be a string"),
        (("kernel", (None, "model")), r"rule \('kernel', \(None, 'model'\)\): axis 'model' is not"),
        (("kernel", (("data", None),)), r"axis \('data', None\) is not one of the mesh's axes"),
        (("kernel", 5), r"rule \('kernel', 5\): spec 5; expected a tuple of mesh axis names"),
    ],
)
def test_malformed_sharding_rules_are_refused_by_name(fake, tmp_path, rule, message):
    fake["tiny"] = types.SimpleNamespace(build=tiny_task)
    c = _named(smoke_config(), "tiny")
    c.sharding_rules = (rule,)
    with pytest.raises(ValueError, match=message):
        experiments.run_experiment(c, str(tmp_path))
    assert not (tmp_path / "config.json").exists()  # refused before anything runs


def test_sharding_rules_parse_to_partition_specs():
    rules = parallel.rules_from_config(
        [
            ("a", (None, "fsdp")),
            ["b", ["data", None]],
            ("c", ()),
            ("d", None),
            ("e", "replicate"),
            ("f", "fsdp"),
            ("g", ((("data", "fsdp")),)),
            ("h", P("fsdp")),
        ],
        ("data", "fsdp"),
    )
    assert rules == [
        ("a", P(None, "fsdp")),
        ("b", P("data", None)),
        ("c", P()),
        ("d", P()),
        ("e", "replicate"),
        ("f", "fsdp"),
        ("g", P(("data", "fsdp"))),
        ("h", P("fsdp")),
    ]


def test_sharding_rules_on_an_edit_experiment_are_refused(fake, tmp_path):
    fake["editor"] = types.SimpleNamespace(edit=lambda config, workdir: {})
    c = _named(smoke_config(), "editor")
    c.sharding_rules = (("kernel", ()),)
    with pytest.raises(ValueError, match="'editor' edits and trains nothing"):
        experiments.run_experiment(c, str(tmp_path))


# The snippet runs in a fresh interpreter with 8 simulated CPU devices (this process has one).
SNIPPET = """
import json, sys, types
import jax, jax.numpy as jnp, numpy as np, optax
from absl import flags
from ml_collections import config_flags
import experiments
from jaxsafe import train

assert jax.device_count() == 8, jax.devices()
argv = ["prog", "--config=configs/dbpm/basic_motions.py:smoke", *sys.argv[2:]]
fv = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                sys_argv=argv)
fv(argv)
config = fv.config
config.experiment = "probe"
config.mesh.update(data=1, fsdp=8)
config.train.update(num_steps=2, steps_per_call=1, log_every=1, eval_every=0,
                    checkpoint_every=2, async_checkpointing=False, fsdp_min_size=1)

def build(config, mesh):
    params = {"dense": {"kernel": jnp.ones((16, 64)), "bias": jnp.ones((64,))},
              "out": {"kernel": jnp.ones((64, 8))}}
    loss = lambda p, f, e, b, r: (sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p)), ({}, e))
    # The model's own rules: every kernel over fsdp (largest divisible dimension).
    return train.Task(graphdef=None, params=params, frozen={}, optimizer=optax.adam(1e-3),
                      loss_fn=loss, train_data={"x": np.zeros((8, 1), np.float32)},
                      sharding_rules=[(r"kernel$", "fsdp")])

def summarize(config, state, task, workdir):
    spec = lambda x: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
    return {"params": jax.tree.map(spec, state.params),
            "mu": jax.tree.map(spec, state.opt_state[0].mu),
            "rules": [r[0] for r in task.sharding_rules]}

experiments.get = lambda name: types.SimpleNamespace(build=build, summarize=summarize)
out = experiments.run_experiment(config, sys.argv[1])
print("RESULT", json.dumps({k: out[k] for k in ("params", "mu", "rules")}))
"""


def run_on_8_devices(workdir, *overrides) -> dict:
    proc = run_python(SNIPPET, workdir, *overrides, n_devices=8, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def strip(spec):
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


@pytest.mark.slow
def test_config_sharding_rules_win_over_the_models_on_8_devices(tmp_path):
    # The model's rules alone: both kernels split over fsdp along their largest dimension.
    default = run_on_8_devices(tmp_path / "default")
    assert strip(default["params"]["dense"]["kernel"]) == [None, "fsdp"]
    assert strip(default["params"]["out"]["kernel"]) == ["fsdp"]
    assert strip(default["params"]["dense"]["bias"]) == ["fsdp"]  # fsdp_min_size=1
    # From the command line: replicate dense/kernel (params and Adam moments alike, which the
    # regex also matches), split out/kernel's other dimension, replicate the bias.
    rules = (
        '((r"dense/kernel$", ()), (r"^(params|opt_state/.*)/out/kernel$", (None, "fsdp")),'
        ' ("bias", "replicate"))'
    )
    got = run_on_8_devices(tmp_path / "rules", f"--config.sharding_rules={rules}")
    assert got["rules"][:3] == ["dense/kernel$", "^(params|opt_state/.*)/out/kernel$", "bias"]
    assert got["rules"][3:] == ["kernel$"]  # the model's own, after the config's
    for tree in (got["params"], got["mu"]):
        assert strip(tree["dense"]["kernel"]) == []
        assert strip(tree["dense"]["bias"]) == []
    assert strip(got["params"]["out"]["kernel"]) == [None, "fsdp"]
    assert strip(got["mu"]["out"]["kernel"]) == [None, "fsdp"]
    with open(tmp_path / "rules" / "config.json") as f:
        saved = json.load(f)["sharding_rules"]
    assert saved[0] == ["dense/kernel$", []] and saved[2] == ["bias", "replicate"]
