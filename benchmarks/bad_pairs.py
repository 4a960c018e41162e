r"""Bad-pair benchmark: does DBPM find injected bad positive pairs, and does it help the probe?

    python -m benchmarks.bad_pairs [--config=configs/dbpm/japanese_vowels.py:cpu] \
        [--seeds=0,1,2] [--noisy=0.1] [--faulty=0.1] [--epochs=40]

A measurable check of Lan et al. (ICLR 2024)'s claim. Into the pre-training set of a real data
set (offline default: JapaneseVowels from aeon, pooled and re-split) it injects a known fraction
of noisy positive pairs (instances replaced by Gaussian noise) and of faulty positive pairs (the
strong view replaced by a random shuffle of the time steps, `--faulty_view=shuffle`, or by
Gaussian noise, `--faulty_view=noise`); see `experiments.dbpm.inject_bad_pairs`. For every seed
it trains `clean` (SimCLR on the uncorrupted data), `simclr` (on the corrupted data),
`simclr+dbpm` (the same with DBPM: beta_np = 2, beta_fp = 3, Gaussian density) and, with
`--normalized`, `+dbpm-norm` (the peak-normalised weight), and prints the linear-probe test
accuracy on the clean splits and, for the corrupted runs, the precision / recall of the pairs
DBPM flags at the end of training (for `simclr`: what DBPM would flag) against the injected
ground truth, then mean ± std over seeds. The CPU scaling (`--tiny`, `--epochs`, the warm-up at
the paper's 50/80 ratio) is described in docs/dbpm.md, "Bad-pair benchmark".
"""

import json
import os
import tempfile
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/dbpm/japanese_vowels.py:cpu", "DBPM config.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (one run per arm and seed).")
_NOISY = flags.DEFINE_float("noisy", 0.1, "Fraction of instances replaced by noise.")
_FAULTY = flags.DEFINE_float("faulty", 0.1, "Fraction of instances with destroyed strong views.")
_VIEW = flags.DEFINE_enum(
    "faulty_view",
    "shuffle",
    ["shuffle", "noise"],
    "Faulty views: time steps shuffled, or N(0, 1) noise.",
)
_EPOCHS = flags.DEFINE_integer("epochs", 20, "Epochs; warm-up = round(50/80 * epochs).")
_TINY = flags.DEFINE_bool(
    "tiny",
    True,
    "A 2-stage 16/32-channel ResNet (fc 32, head 32-64-32) "
    "instead of the cpu variant's 4-stage one.",
)
_LR = flags.DEFINE_float("lr", 0.0, "Adam learning rate (0: the config's 3e-4).")
_NORMALIZED = flags.DEFINE_bool("normalized", False, "Also run DBPM with normalized weights.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where runs are kept (default: a temp dir).")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the per-run results.")


def arms():
    out = [
        ("clean", False, False, False),
        ("simclr", True, False, False),
        ("simclr+dbpm", True, True, False),
    ]
    if _NORMALIZED.value:
        out.append(("+dbpm-norm", True, True, True))
    return out


def main(argv):
    del argv
    import jax

    from benchmarks.common import load_config, machine, stats
    from configs.dbpm import common
    from experiments import run_experiment
    from jaxsafe.train.metrics import quiet_orbax

    root = _WORKDIR.value or tempfile.mkdtemp(prefix="bad_pairs_")
    quiet_orbax()
    # Seeds change only data values: later runs of an arm reuse its compiled programs.
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    print(f"machine: {machine()}")
    print(
        f"config: {_CONFIG.value}  tiny: {_TINY.value}  epochs: {_EPOCHS.value}  "
        f"lr: {_LR.value or 'config'}  noisy: {_NOISY.value}  "
        f"faulty: {_FAULTY.value} ({_VIEW.value})  seeds: {','.join(_SEEDS.value)}"
    )
    results = []
    for seed in map(int, _SEEDS.value):
        for name, corrupt, enabled, normalized in arms():
            config = load_config(_CONFIG.value)
            with config.unlocked():
                common.set_epochs(config, _EPOCHS.value)
                config.dbpm.update(enabled=enabled, normalized=normalized)
                config.bad_pairs.update(
                    noisy_fraction=_NOISY.value if corrupt else 0.0,
                    faulty_fraction=_FAULTY.value if corrupt else 0.0,
                    faulty_view=_VIEW.value,
                    seed=seed,
                )
                config.train.seed = seed
                if _LR.value:
                    config.optimizer.lr = _LR.value
                config.train.async_checkpointing = False
                if _TINY.value:
                    config.model.update(
                        name="custom",
                        widths=(16, 32),
                        blocks=(1, 1),
                        features=32,
                        head_hidden=64,
                        head_out=32,
                    )
            t0 = time.perf_counter()
            summary = run_experiment(config, os.path.join(root, f"{name}_seed{seed}"))
            row = {"arm": name, "seed": seed, "seconds": time.perf_counter() - t0, **summary}
            results.append(row)
            line = f"seed {seed} {name:12s} probe accuracy {row['probe_accuracy']:.4f}"
            if corrupt:
                line += "  " + "  ".join(
                    f"{k} P/R {row[f'dbpm_{k}_precision']:.2f}/{row[f'dbpm_{k}_recall']:.2f}"
                    for k in ("noisy", "faulty")
                )
                line += f"  flagged {row['dbpm_flagged_noisy']}+{row['dbpm_flagged_faulty']}"
            print(f"{line}  ({row['seconds']:.0f} s)", flush=True)
    print(
        "\n| arm | probe accuracy | noisy precision | noisy recall | faulty precision | "
        "faulty recall |\n|---|---|---|---|---|---|"
    )
    for name, corrupt, _, _ in arms():
        rows = [r for r in results if r["arm"] == name]
        cells = [stats([r["probe_accuracy"] for r in rows])]
        for key in ("noisy_precision", "noisy_recall", "faulty_precision", "faulty_recall"):
            cells.append(stats([r[f"dbpm_{key}"] for r in rows]) if corrupt else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if _OUT.value:
        with open(_OUT.value, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    app.run(main)
