"""launch.pfgmpp_study: which config each D trains, and the mean ± std over seeds per cell."""

import numpy as np
import pytest

from launch import pfgmpp_study as study


def test_each_D_trains_its_cpu_config():
    assert study.config_file("128") == "configs/pfgmpp/cifar10_d128.py:cpu"
    assert study.config_file("2048.0") == "configs/pfgmpp/cifar10_d2048.py:cpu"
    assert study.config_file("inf") == "configs/pfgmpp/cifar10_edm.py:cpu"
    with pytest.raises(ValueError, match="no config for D=64: configs/pfgmpp/cifar10_d64.py"):
        study.config_file("64")


def _rows(fd0, alpha_fd, bits_fd):
    rows = [dict(alpha=0.0, bits=0, fd=fd0)]
    rows += [dict(alpha=a, bits=0, fd=v) for a, v in alpha_fd.items()]
    rows += [dict(alpha=0.0, bits=b, fd=v) for b, v in bits_fd.items()]
    return rows


def test_cells_are_mean_and_sample_std_over_seeds():
    runs = {
        ("128", 0): _rows(10.0, {0.1: 12.0}, {4: 20.0}),
        ("128", 1): _rows(14.0, {0.1: 18.0}, {4: 26.0}),
        ("inf", 0): _rows(11.0, {0.1: 15.0}, {4: 30.0}),
    }
    alpha = study.aggregate(runs, "alpha", ["0", "0.1"])
    bits = study.aggregate(runs, "bits", ["0", "4"])
    # Sample std (n − 1) of (10, 14) is 2√2; of (12, 18) 3√2.
    np.testing.assert_allclose(alpha["128"][0][:2], (12.0, 2 * np.sqrt(2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(alpha["128"][1][:2], (15.0, 3 * np.sqrt(2)), rtol=0, atol=1e-12)
    assert alpha["128"][0][2] == 2 and alpha["inf"][1][:1] == (15.0,)
    assert np.isnan(alpha["inf"][1][1])  # one seed: no spread
    # The bits column's 0 is the α = 0 float model; 4 bits is its quantised one.
    np.testing.assert_allclose(bits["128"][1][:2], (23.0, 3 * np.sqrt(2)), rtol=0, atol=1e-12)
    assert bits["128"][0] == alpha["128"][0]
    table = study.markdown(alpha, bits, ["0", "0.1"], ["0", "4"])
    assert "| α | D = 128 | D = ∞ (EDM) |" in table
    assert "| 0.1 | 15.00 ± 4.24 (n=2) | 15.00 ± nan (n=1) |" in table
    assert "| 32 (float) | 12.00 ± 2.83 (n=2) | 11.00 ± nan (n=1) |" in table
