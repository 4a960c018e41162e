"""The PyTorch reference arm of benchmarks/contrastive.py is the experiment's network and loss:
the same parameter count as jaxsafe's SimCLR model for the config, and its NT-Xent equal to
``ntxent_per_pair``'s mean. Needs the torch extra."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.common import load_config  # noqa: E402
from benchmarks.reference import contrastive as reference  # noqa: E402
from experiments import dbpm  # noqa: E402
from jaxsafe.contrastive import ntxent_per_pair  # noqa: E402


@pytest.mark.parametrize("variant", ["cpu", "smoke"])
def test_the_reference_network_has_the_experiments_parameter_count(variant):
    from flax import nnx

    config = load_config(f"configs/dbpm/har.py:{variant}")
    _, model = reference.make_step(config, 4, 32, 9, dbpm.MODELS)
    ours = dbpm.SimCLR(9, config.model, rngs=nnx.Rngs(0))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    assert sum(p.numel() for p in model.parameters()) == count


def test_the_reference_ntxent_is_the_mean_per_pair_loss():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    got = float(reference.ntxent(torch.tensor(z1), torch.tensor(z2), 0.2))
    np.testing.assert_allclose(
        got, float(np.mean(ntxent_per_pair(z1, z2, 0.2))), rtol=1e-5, atol=1e-6
    )
