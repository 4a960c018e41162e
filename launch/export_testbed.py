r"""Exports a trained test-bed run (`configs/t2i/testbed.py`) as a diffusers-layout folder.

    python -m launch.export_testbed --workdir=/tmp/testbed [--out=/tmp/testbed/export] \
        [--step=N] [--evaluate] [--config=configs/t2i/testbed.py:cpu]

Reads `<workdir>/config.json` (written by `launch.train`; `--config` instead, e.g. to sample
with other settings) and the latest checkpoint's EMA weights, writes `unet/`, `text_encoder/`,
`scheduler/`, `tokenizer/` and `model_index.json` (`experiments.t2i_testbed.export`).
`--evaluate` also prints the held-out metrics: per-concept generation accuracy, oracle Fréchet
distance (and writes them to `<out>/testbed_metrics.json`), and the per-concept table of
docs/testbed.md. Bad input is one line on stderr and exit status 2 (`--debug`: the traceback).
"""

import json
import os

from absl import flags
from ml_collections import config_flags

from launch import user_errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of launch.train.")
_OUT = flags.DEFINE_string("out", None, "Export folder (default <workdir>/export).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EVALUATE = flags.DEFINE_bool("evaluate", False, "Also compute the test-bed metrics.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file[:arg] instead of the run's config.json.", lock_config=True
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    import ml_collections

    from experiments import t2i_testbed as tb
    from jaxsafe.files import read_json
    from jaxsafe.train.metrics import quiet_orbax

    quiet_orbax()
    if _CONFIG.value is not None:
        path, config = "--config", _CONFIG.value
    else:
        path = os.path.join(_WORKDIR.value, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path!r} not found: --workdir must be a launch.train run "
                "directory of configs/t2i/testbed.py"
            )
        config = ml_collections.ConfigDict(read_json(path, "the run's config"))
    if config.experiment != "t2i_testbed":
        raise ValueError(f"{path}: experiment={config.experiment!r}; expected 't2i_testbed'")
    graphdef, params, frozen, step = tb.restore(config, _WORKDIR.value, _STEP.value)
    out = _OUT.value or os.path.join(_WORKDIR.value, "export")
    tb.export(config, graphdef, params, frozen, out)
    print(f"exported step {step} to {out}")
    if _EVALUATE.value:
        metrics = {"step": step, **tb.evaluate_model(config, graphdef, params, frozen)}
        with open(os.path.join(out, "testbed_metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=1, sort_keys=True)
        print(json.dumps(metrics, indent=1, sort_keys=True))
        print(concept_table(metrics))


def concept_table(metrics: dict) -> str:
    """The per-concept markdown table of docs/testbed.md from the metrics."""
    from jaxsafe.data import shapes

    lines = [
        "| attribute | concept | accuracy (that attribute right) | all three attributes right |",
        "| --- | --- | --- | --- |",
    ]
    for w, (a, _) in shapes.CONCEPTS.items():
        name = shapes.ATTRIBUTES[a][0]
        shown = f"{w} (= {shapes.SYNONYMS[w]})" if w in shapes.SYNONYMS else w
        lines.append(
            f"| {name} | {shown} | {metrics[f'acc/{w}']:.3f} | {metrics[f'fidelity/{w}']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    user_errors.run(main)
