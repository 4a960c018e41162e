r"""Prints the test-bed erasure table of docs/erasure.md from ``launch.erase`` workdirs.

    python -m launch.erasure_table /tmp/original /tmp/uce_square /tmp/esd_square ...

Columns (``jaxsafe.data.shapes_metrics``; accuracies are the oracle's on prompts naming the
concept, 16 per concept by default): the erased concepts, their synonyms (leakage), their near
concepts (``shapes.NEAR``: orange for red), the other values of the erased concepts' attribute,
the concepts of the other attributes, the oracle Fréchet distance of
generations for 256 held-out captions, the held-out denoising loss, and the erasure's wall-clock
time (edit or training, without evaluation).
"""

import json
import os
import sys

from jaxsafe.data import shapes


def row(workdir: str) -> str:
    path = os.path.join(workdir, "erasure.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run launch.erase with --workdir={workdir}")
    with open(path, encoding="utf-8") as f:
        s = json.load(f)
    erase = s["erase"]
    attrs = {shapes.CONCEPTS[w][0] for w in erase}
    ids = {shapes.CONCEPTS[w] for w in erase}
    near = {shapes.CONCEPTS[shapes.NEAR[w]] for w in erase if w in shapes.NEAR}
    groups = {"target": [], "synonym": [], "near": [], "same": [], "other": []}
    for w, (a, v) in shapes.CONCEPTS.items():
        if f"acc/{w}" not in s:
            continue
        key = ("target" if w in erase else "synonym" if (a, v) in ids else
               "near" if (a, v) in near else "same" if a in attrs else "other")
        groups[key].append(s[f"acc/{w}"])
    mean = lambda xs: f"{sum(xs) / len(xs):.3f}" if xs else "–"
    name = s["experiment"].removeprefix("erase_") + (f" ({s['variant']})" if s["variant"] != "cpu"
                                                     else "")
    return (f"| {name} | {', '.join(erase)} | {mean(groups['target'])} | {mean(groups['synonym'])} "
            f"| {mean(groups['near'])} | {mean(groups['same'])} | {mean(groups['other'])} | {s.get('oracle_fd', float('nan')):.2f} "
            f"| {s.get('heldout_loss', float('nan')):.4f} | {s['erase_seconds']:.1f} |")


HEADER = ("| method | erased | acc. erased ↓ | acc. synonym ↓ | acc. near ↑ | "
          "acc. rest of attribute ↑ | acc. other attributes ↑ | oracle FD ↓ | held-out loss ↓ | "
          "erase time (s) |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    print(HEADER)
    for workdir in argv[1:]:
        print(row(workdir))


if __name__ == "__main__":
    main(sys.argv)
