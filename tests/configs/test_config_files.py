"""Every config file under ``configs/``, with every variant it accepts: it loads, it refuses an
unknown variant in the one message format, and its trainer fields (``train``, ``mesh``,
``sharding_rules``) are the shared base's (``configs/shared.py``) with only the family's own
overrides; the command-line override of ``sharding_rules`` works on a locked config."""

import ast
import importlib
import re
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

import configs
from configs import shared


def config_modules() -> list[str]:
    """Every ``configs/<family>/<setting>.py`` file's module that defines ``get_config``."""
    root = Path(configs.__file__).parent
    names = []
    for path in sorted(root.glob("*/*.py")):
        if path.stem in ("__init__", "common"):
            continue
        name = f"configs.{path.parent.name}.{path.stem}"
        if hasattr(importlib.import_module(name), "get_config"):
            names.append(name)
    return names


MODULES = config_modules()
UNKNOWN = "no-such-variant"
MESSAGE = re.compile(r"^config argument 'no-such-variant'; expected one of (\(.*\))$")


def variants(name: str) -> tuple[str, ...]:
    """The variants a config file accepts, read from its refusal of an unknown one (which must
    have the one message format)."""
    with pytest.raises(ValueError) as info:
        importlib.import_module(name).get_config(UNKNOWN)
    match = MESSAGE.match(str(info.value))
    assert match, f"{name}: {info.value}"
    choices = ast.literal_eval(match.group(1))
    assert isinstance(choices, tuple) and choices and all(isinstance(c, str) for c in choices)
    return choices


def all_configs():
    for name in MODULES:
        for arg in variants(name):
            yield name, arg, importlib.import_module(name).get_config(arg)


def test_every_family_is_found():
    families = {n.split(".")[1] for n in MODULES}
    assert families == {"attacks", "dbpm", "erasure", "grokking", "oms", "pfgmpp", "sid", "t2i"}
    assert len(MODULES) >= 38


@pytest.mark.parametrize("name", MODULES)
def test_every_variant_loads_and_no_argument_is_the_first(name):
    choices = variants(name)
    module = importlib.import_module(name)
    for arg in choices:
        c = module.get_config(arg)
        assert isinstance(c, ml_collections.ConfigDict)
        assert c.variant, (name, arg)
    default = module.get_config(None).to_dict()
    assert default == module.get_config(choices[0]).to_dict() == module.get_config("").to_dict()


def test_trainer_fields_come_from_the_shared_base():
    trained = 0
    overridden = {k: set() for k in shared.TRAIN_DEFAULTS}
    for name, arg, c in all_configs():
        where = f"{name}:{arg}"
        if "train" not in c:
            # Only the attack configs (launch.attack, not the runner) have no trainer.
            assert name.startswith("configs.attacks."), where
            assert "mesh" not in c and "sharding_rules" not in c, where
            continue
        trained += 1
        assert "batch_size" not in c, f"{where}: the batch size's home is train.batch_size"
        for section in ("data", "esd", "spm", "trce", "safegen"):
            assert "batch_size" not in c.get(section, {}), f"{where}: {section}.batch_size"
        t = c.train.to_dict()
        assert set(shared.TRAIN_DEFAULTS) <= set(t), where
        assert set(t) <= set(shared.TRAIN_DEFAULTS) | set(shared.TRAIN_OPTIONAL), where
        for k, default in shared.TRAIN_DEFAULTS.items():
            assert type(t[k]) is type(default), (where, k, t[k])
            if t[k] != default:
                overridden[k].add(name.split(".")[1])
        if "batch_size" in t:
            assert isinstance(t["batch_size"], int) and t["batch_size"] > 0, where
        assert c.mesh.to_dict() == shared.MESH_DEFAULTS, where
        assert c.sharding_rules == () and c.get_type("sharding_rules") is tuple, where
    assert trained > 100
    # No family overrides these: the base's value is every config's.
    assert not overridden["verify_checkpoints"] and not overridden["lowering"]
    # Families override only what their runs need (a sample of the known overrides).
    assert overridden["fsdp_min_size"] == {"grokking", "dbpm"}
    assert overridden["async_checkpointing"] == {"erasure", "pfgmpp", "sid"}


def test_shared_helpers():
    assert shared.variant(None, ("paper", "cpu")) == "paper"
    assert shared.variant("", ("cpu", "smoke")) == "cpu"
    assert shared.variant(None, ("a", "b"), default="b") == "b"
    with pytest.raises(ValueError, match=r"^config argument 'gpu'; expected one of \('a', 'b'\)$"):
        shared.variant("gpu", ["a", "b"])
    t = shared.train(num_steps=5, batch_size=8)
    assert t == {**shared.TRAIN_DEFAULTS, "num_steps": 5, "batch_size": 8}
    assert "batch_size" not in shared.train()
    with pytest.raises(ValueError, match=r"train: unknown field\(s\) \['num_step'\]"):
        shared.train(num_step=5)
    assert shared.mesh(fsdp=2) == {"data": -1, "fsdp": 2}
    assert shared.sharding_rules() == ()
    assert shared.sharding_rules(["a", ("fsdp",)]) == (("a", ("fsdp",)),)


def _parse(argv):
    fv, argv = flags.FlagValues(), ["prog", *argv]
    # The override flags (--config.x) are defined from the command line it is given.
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return fv.config


# ml_collections loads the config file with importlib's deprecated load_module.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_sharding_rules_override_from_the_command_line_on_a_locked_config():
    c = _parse(
        [
            "--config=configs/dbpm/basic_motions.py:smoke",
            """--config.sharding_rules=((r"kernel$", (None, "fsdp")), ("bias", "replicate"))""",
        ]
    )
    assert c.is_locked
    assert c.sharding_rules == (("kernel$", (None, "fsdp")), ("bias", "replicate"))
    # A list literal is accepted too (ml_collections turns it into the field's tuple).
    c = _parse(
        [
            "--config=configs/pfgmpp/cifar10_edm.py:smoke",
            """--config.sharding_rules=[["^params/", ["fsdp", None]]]""",
        ]
    )
    assert c.sharding_rules == (["^params/", ["fsdp", None]],)
    # A misspelt field still fails loudly.
    with pytest.raises(Exception, match="sharding_rule"):
        _parse(["--config=configs/dbpm/basic_motions.py:smoke", "--config.sharding_rule=()"])
