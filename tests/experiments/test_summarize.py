"""launch.summarize: mean ± sample sd over runs, wildcard keys averaged per run first."""

import pytest

from launch import summarize

RUNS = [{"acc/0": 0.0, "acc/1": 1.0, "fd": 10.0}, {"acc/0": 0.5, "acc/1": 0.5, "fd": 14.0}]


def test_values_and_table_by_hand():
    assert list(summarize.values(RUNS, "fd")) == [10.0, 14.0]
    # acc/* per run: (0 + 1) / 2 and (0.5 + 0.5) / 2.
    assert list(summarize.values(RUNS, "acc/*")) == [0.5, 0.5]
    assert list(summarize.values(RUNS, "acc/[1-9]")) == [1.0, 0.5]
    out = summarize.table(RUNS, ["fd", "acc/0"])
    # fd: mean 12, sample sd sqrt(((10-12)^2 + (14-12)^2) / 1) = 2.83.
    assert "| fd | 2 | 12 ± 2.8 |" in out
    assert "| acc/0 | 2 | 0.25 ± 0.35 |" in out


def test_missing_key_is_named():
    with pytest.raises(KeyError, match="summary has no 'override/0'"):
        summarize.values(RUNS, "override/0")
    with pytest.raises(KeyError, match="summary has no 'x/\\*'"):
        summarize.values(RUNS, "x/*")
