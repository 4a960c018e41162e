"""Per-tensor b-bit weight quantisation: ≤ 2^b levels, error ≤ step/2, structure kept, selection."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsafe.diffusion import quantize_params, quantize_tensor


def step(w, bits):
    """The grid spacing: the range (widened to contain 0) over 2^b − 1 intervals."""
    w = np.asarray(w, np.float64)
    return (max(w.max(), 0.0) - min(w.min(), 0.0)) / (2**bits - 1)


W = np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32) * 0.2 + 0.05


class QuantizeTensorTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_levels_and_error_bound(self):
        for bits in (1, 2, 3, 5, 8):
            q = np.asarray(self.variant(lambda w, b=bits: quantize_tensor(w, b))(W), np.float64)
            levels = np.unique(q)
            self.assertLessEqual(len(levels), 2**bits)
            h = step(W, bits)
            self.assertLessEqual(np.abs(q - W).max(), h / 2 * (1 + 1e-5))
            # Levels are integer multiples of the step (z is an integer), so 0 is exactly a level.
            np.testing.assert_allclose(levels / h, np.round(levels / h), atol=1e-3)

    def test_zero_and_extremes(self):
        w = W.copy()
        w[0, 0] = 0.0
        q = np.asarray(quantize_tensor(w, 4))
        self.assertEqual(q[0, 0], 0.0)
        # The range end farther from 0 is a level (up to rounding of z): within step/2.
        self.assertLessEqual(abs(q.max() - w.max()), step(w, 4) / 2 * (1 + 1e-5))

    def test_one_sided_tensors_are_not_clipped(self):
        # The reference clamps the zero point and clips all-positive tensors; here the error
        # stays ≤ step/2.
        for w in (np.abs(W) + 1.0, -np.abs(W) - 1.0):
            q = np.asarray(quantize_tensor(w, 4), np.float64)
            self.assertLessEqual(np.abs(q - w).max(), step(w, 4) / 2 * (1 + 1e-5))

    def test_many_bits_leave_values_almost_unchanged(self):
        for bits in (24, 32):
            np.testing.assert_allclose(
                quantize_tensor(W, bits), W, rtol=0, atol=2e-6 * np.abs(W).max()
            )

    def test_all_zero_tensor_and_dtype(self):
        np.testing.assert_array_equal(quantize_tensor(jnp.zeros((3, 3)), 4), 0.0)
        w16 = jnp.asarray(W, jnp.bfloat16)
        q16 = quantize_tensor(w16, 3)
        self.assertEqual(q16.dtype, jnp.bfloat16)
        self.assertLessEqual(len(np.unique(np.asarray(q16, np.float32))), 8)


class QuantizeParamsTest(chex.TestCase):
    def test_pytree_structure_and_non_float_leaves(self):
        params = {
            "conv": {"kernel": jnp.asarray(W), "bias": jnp.asarray(W[0])},
            "step": jnp.int32(7),
            "key": jax.random.key(0),
        }
        out = quantize_params(params, 3)
        chex.assert_trees_all_equal_structs(out, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
        self.assertEqual(int(out["step"]), 7)
        np.testing.assert_array_equal(
            jax.random.key_data(out["key"]), jax.random.key_data(params["key"])
        )
        # Per tensor: each leaf has its own grid, so the bias gets ≤ 8 levels of its own range.
        for name in ("kernel", "bias"):
            w, q = np.asarray(params["conv"][name]), np.asarray(out["conv"][name])
            self.assertLessEqual(len(np.unique(q)), 8)
            self.assertLessEqual(np.abs(q - w).max(), step(w, 3) / 2 * (1 + 1e-5))

    def test_include_selects_leaves_by_path_name(self):
        params = {"enc": {"conv": {"kernel": jnp.asarray(W)}, "norm": {"scale": jnp.asarray(W[1])}}}
        names = []

        def include(name):
            names.append(name)
            return not name.split("/")[-2].startswith("norm")

        out = quantize_params(params, 2, include=include)
        self.assertCountEqual(names, ["enc/conv/kernel", "enc/norm/scale"])
        np.testing.assert_array_equal(out["enc"]["norm"]["scale"], params["enc"]["norm"]["scale"])
        self.assertLessEqual(len(np.unique(np.asarray(out["enc"]["conv"]["kernel"]))), 4)

    def test_nnx_state_round_trip_under_jit(self):
        model = nnx.Linear(5, 7, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model, nnx.Param)
        q_state = jax.jit(quantize_params, static_argnums=1)(state, 4)
        q_model = nnx.merge(graphdef, q_state)
        kernel = np.asarray(q_model.kernel[...])
        self.assertLessEqual(len(np.unique(kernel)), 16)
        self.assertLessEqual(
            np.abs(kernel - np.asarray(model.kernel[...])).max(),
            step(model.kernel[...], 4) / 2 * (1 + 1e-5),
        )


@pytest.mark.parametrize("bits", [0, -1, 2.5, True, "8"])
def test_bad_bits_raise(bits):
    for fn in (quantize_params, quantize_tensor):
        with pytest.raises(ValueError, match=r"bits must be an integer >= 1, got"):
            fn(jnp.ones(3), bits)
