r"""Mean ± sample standard deviation of summary values over runs (seeds), as a markdown table.

    python -m launch.summarize --runs='/tmp/sfd/seed*' --keys=acc/0,override/0,fd

Each run directory's ``summary.json`` (written by ``launch.train`` / ``launch.erase``); a key
that is an ``fnmatch`` pattern averages the keys it matches per run first (``acc/[1-9]``). One
row per key.
"""

from __future__ import annotations

import fnmatch
import glob
import os

import numpy as np
from absl import app, flags

from launch import user_errors

_RUNS = flags.DEFINE_string("runs", None, "Glob of run directories (quote it).", required=True)
_KEYS = flags.DEFINE_list(
    "keys",
    None,
    "Summary keys; a pattern (acc/*, acc/[1-9]) averages its matches per run.",
    required=True,
)


def values(summaries: list[dict], key: str) -> np.ndarray:
    """One value per run: the key's, or the mean of the keys ``key`` matches (``fnmatch``)."""
    out = []
    for s in summaries:
        names = [k for k in s if fnmatch.fnmatch(k, key)] if set("*?[") & set(key) else [key]
        missing = [k for k in names if k not in s] or ([] if names else [key])
        if missing:
            raise KeyError(f"summary has no {missing[0]!r}")
        out.append(float(np.mean([s[k] for k in names])))
    return np.asarray(out)


def table(summaries: list[dict], keys: list[str]) -> str:
    rows = ["| value | runs | mean ± sd |", "|---|---|---|"]
    for key in keys:
        v = values(summaries, key)
        sd = v.std(ddof=1) if len(v) > 1 else 0.0
        rows.append(f"| {key} | {len(v)} | {v.mean():.3g} ± {sd:.2g} |")
    return "\n".join(rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    dirs = sorted(d for d in glob.glob(_RUNS.value) if os.path.isdir(d))
    files = [os.path.join(d, "summary.json") for d in dirs]
    missing = [f for f in files if not os.path.isfile(f)]
    if not dirs or missing:
        raise app.UsageError(
            f"--runs={_RUNS.value}: "
            + (f"no summary.json in {missing[0]}" if missing else "matches no directory")
        )
    from jaxsafe.files import read_json

    summaries = [read_json(f, "a run's summary") for f in files]
    try:
        print(table(summaries, _KEYS.value))
    except KeyError as e:
        raise app.UsageError(f"--keys: {e.args[0]}") from None


if __name__ == "__main__":
    user_errors.run(main)
