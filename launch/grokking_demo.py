r"""Main demo: ⊥AdamW vs AdamW (no weight decay, softmax, float32) on addition mod 113.

    python -m launch.grokking_demo --workdir=/tmp/jaxsafe_demo [--size=cpu|smoke]

Trains both runs with the generic trainer (each in its own sub-directory of the workdir, so a
rerun resumes), writes `grokking_demo.png` (train/test accuracy, loss and Softmax Collapse
fraction per step) and prints the final accuracies. AdamW without weight decay memorises the
training set, drifts into Softmax Collapse and does not generalise; ⊥AdamW generalises.
"""

import importlib
import os

from absl import flags

from launch import user_errors

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/jaxsafe_demo", "Output directory.")
_SIZE = flags.DEFINE_enum("size", "cpu", ["cpu", "smoke"], "Config variant.")

RUNS = {"AdamW": "configs.grokking.adamw", "⊥AdamW": "configs.grokking.perp_adamw"}


def main(argv):
    del argv
    from jaxsafe.train.metrics import quiet_orbax

    quiet_orbax()
    from experiments import run_experiment
    from jaxsafe.train import read_jsonl
    from jaxsafe.train.plots import plot_runs

    logs, finals = {}, {}
    for name, module in RUNS.items():
        config = importlib.import_module(module).get_config(_SIZE.value)
        workdir = os.path.join(_WORKDIR.value, module.rsplit(".", 1)[-1])
        finals[name] = run_experiment(config, workdir)
        logs[name] = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    png = os.path.join(_WORKDIR.value, "grokking_demo.png")
    plot_runs(
        logs,
        [
            ("accuracy", ["eval/train_accuracy", "eval/test_accuracy"]),
            ("train loss", ["train/loss"]),
            ("softmax collapse", ["train/sc_fraction"]),
        ],
        png,
        log_y=("train loss",),
    )
    for name, final in finals.items():
        print(
            f"{name:8s} train accuracy {final['train_accuracy']:.3f}  "
            f"test accuracy {final['test_accuracy']:.3f}  "
            f"SC fraction {final['train_sc_fraction']:.3f}"
        )
    print(f"plot: {png}")


if __name__ == "__main__":
    user_errors.run(main)
