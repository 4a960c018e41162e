r"""PFGM++'s robustness study on the digits: Fréchet distance against the sampling perturbations.

    python -m launch.pfgmpp_study --out=/tmp/pf_study --D=128,2048,inf --seeds=0,1,2 \
        --alpha=0,0.05,0.1,0.2,0.3 --bits=0,8,6,5,4 --num=512 \
        --png=docs/images/pfgmpp_robustness.png --doc_table=/tmp/pf_study/table.md

For every D and training seed k, trains ``configs/pfgmpp/cifar10_d<D>.py:cpu``
(``cifar10_edm.py`` for D = ∞) in ``<out>/D<D>_seed<k>`` with ``train.seed = data.seed = k``
(the same budget for every D), then samples its EMA weights once per noise-injection α
(float32 weights) and once per quantisation width (α = 0) with ``launch.sample``'s probes
(PFGM++ Sec. 6.3, the reference ``generate_alpha.py`` / ``generate_quant.py``), ``--num``
samples with sampling seed 0, and reads the Fréchet distance on the digits classifier's
features. A cell of the table is mean ± sample standard deviation over the training seeds;
the PNG draws the same with error bars. Finished runs (``summary.json`` present) are not
repeated, so a stopped study resumes.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

from launch import user_errors


def _define_flags() -> None:
    global _OUT, _DS, _SEEDS, _ALPHA, _BITS, _NUM, _STEPS, _PNG, _TABLE
    _OUT = flags.DEFINE_string("out", None, "Directory of the runs.")
    _DS = flags.DEFINE_list("D", ["128", "2048", "inf"], "Augmentation dimensions (inf = EDM).")
    _SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
    _ALPHA = flags.DEFINE_list("alpha", ["0", "0.05", "0.1", "0.2", "0.3"], "Noise injection α.")
    _BITS = flags.DEFINE_list("bits", ["0", "8", "6", "5", "4"], "Quantisation bits (0 = float32).")
    _NUM = flags.DEFINE_integer("num", 512, "Samples per cell.")
    _STEPS = flags.DEFINE_integer("train_steps", None, "Training steps (default: the config's).")
    _PNG = flags.DEFINE_string("png", "", "Figure to write.")
    _TABLE = flags.DEFINE_string("doc_table", "", "Markdown table to write.")
    flags.mark_flags_as_required(["out"])


def config_file(D: str) -> str:
    """The cpu-variant config of augmentation dimension ``D`` ("inf": EDM)."""
    name = "cifar10_edm" if math.isinf(float(D)) else f"cifar10_d{int(float(D))}"
    path = os.path.join("configs", "pfgmpp", f"{name}.py")
    if not os.path.exists(path):
        raise ValueError(f"no config for D={D}: {path} does not exist")
    return path + ":cpu"


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_one(out: str, D: str, seed: int, alphas, bits, num: int, train_steps) -> list[dict]:
    """Trains (or resumes) one (D, seed) run and samples its probes; returns the rows."""
    workdir = os.path.join(out, f"D{D}_seed{seed}")
    summary = os.path.join(workdir, "probes", "summary.json")
    if os.path.exists(summary):
        with open(summary, encoding="utf-8") as f:
            return json.load(f)
    train = [
        sys.executable,
        "-m",
        "launch.train",
        f"--config={config_file(D)}",
        f"--workdir={workdir}",
        f"--config.train.seed={seed}",
        f"--config.data.seed={seed}",
        "--config.train.eval_every=0",
    ]
    if train_steps:
        train.append(f"--config.train.num_steps={train_steps}")
    _run(train)
    sample = [
        sys.executable,
        "-m",
        "launch.sample",
        f"--workdir={workdir}",
        f"--num={num}",
        f"--batch={min(num, 512)}",
        f"--out={os.path.join(workdir, 'probes_tmp')}",
    ]
    rows = []
    for flag, values in (("alpha", alphas), ("bits", [b for b in bits if int(b)])):
        _run(sample + [f"--{flag}=" + ",".join(values)])
        with open(os.path.join(workdir, "probes_tmp", "summary.json"), encoding="utf-8") as f:
            rows += json.load(f)
    os.makedirs(os.path.dirname(summary), exist_ok=True)
    with open(summary + ".tmp", "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    os.replace(summary + ".tmp", summary)  # written last: its presence marks the run finished
    return rows


def aggregate(rows_by_run: dict[tuple[str, int], list[dict]], probe: str, values) -> dict:
    """{D: (mean, sample std, n) per value of ``probe``} over the training seeds.

    ``probe`` is "alpha" (rows with float32 weights) or "bits" (rows with α = 0; 0 bits is the
    float32 model).
    """
    table = {}
    for D in dict.fromkeys(D for D, _ in rows_by_run):
        cells = []
        for v in values:
            fds = []
            for (d, _), rows in rows_by_run.items():
                if d != D:
                    continue
                other = "bits" if probe == "alpha" else "alpha"
                fds += [r["fd"] for r in rows if math.isclose(r[probe], float(v)) and r[other] == 0]
            fds = np.asarray(fds, np.float64)
            std = float(fds.std(ddof=1)) if len(fds) > 1 else float("nan")
            cells.append((float(fds.mean()) if len(fds) else float("nan"), std, len(fds)))
        table[D] = cells
    return table


def _label(D: str) -> str:
    return "D = ∞ (EDM)" if math.isinf(float(D)) else f"D = {int(float(D))}"


def markdown(alpha_table: dict, bits_table: dict, alphas, bits) -> str:
    def block(name, values, table):
        head = f"| {name} | " + " | ".join(_label(D) for D in table) + " |"
        lines = [head, "|---" * (len(table) + 1) + "|"]
        for i, v in enumerate(values):
            cells = [f"{m:.2f} ± {s:.2f} (n={n})" for m, s, n in (table[D][i] for D in table)]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    bit_names = ["32 (float)" if int(b) == 0 else b for b in bits]
    return block("α", alphas, alpha_table) + "\n\n" + block("bits", bit_names, bits_table) + "\n"


def plot(alpha_table: dict, bits_table: dict, alphas, bits, path: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: headless, no global state

    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    # Bits at even spacing in the order given (float first): the strength grows to the right,
    # as for α.
    bit_names = ["float" if int(b) == 0 else str(int(b)) for b in bits]
    panels = (
        (axes[0], alpha_table, [float(a) for a in alphas], "noise injection α"),
        (axes[1], bits_table, list(range(len(bits))), "weight bits"),
    )
    for ax, table, xs, name in panels:
        for j, (D, cells) in enumerate(table.items()):
            m, s, _ = zip(*cells)
            ax.errorbar(
                np.asarray(xs) + 0.008 * (j - 1) * (max(xs) - min(xs)),
                m,
                yerr=s,
                marker="o",
                capsize=3,
                label=_label(D),
            )
        ax.set_xlabel(name)
        ax.set_ylabel("Fréchet distance (digits features)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_xticks(range(len(bits)), bit_names)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if 0 not in [int(b) for b in _BITS.value] or 0.0 not in [float(a) for a in _ALPHA.value]:
        raise app.UsageError("--alpha and --bits must both include 0 (the unperturbed model)")
    rows = {}
    for D in _DS.value:
        config_file(D)  # fail on an unknown D before any training
    for D in _DS.value:
        for seed in _SEEDS.value:
            rows[(D, int(seed))] = run_one(
                _OUT.value, D, int(seed), _ALPHA.value, _BITS.value, _NUM.value, _STEPS.value
            )
    alpha_table = aggregate(rows, "alpha", _ALPHA.value)
    bits_table = aggregate(rows, "bits", _BITS.value)
    text = markdown(alpha_table, bits_table, _ALPHA.value, _BITS.value)
    print(text)
    if _TABLE.value:
        with open(_TABLE.value, "w", encoding="utf-8") as f:
            f.write(text)
    if _PNG.value:
        plot(alpha_table, bits_table, _ALPHA.value, _BITS.value, _PNG.value)


if __name__ == "__main__":
    _define_flags()
    user_errors.run(main)
