"""The ridge editor of cross-attention projections (UCE's closed form) and its token rows."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.erasure import closed_form as cf


def _problem(seed=0, d_in=12, d_out=7, n_e=3, n_p=5):
    r = np.random.default_rng(seed)
    f = lambda *s: r.standard_normal(s).astype(np.float32)
    P = f(d_in, 4)
    return dict(
        W_old=f(d_out, d_in),
        C_e=f(n_e, d_in),
        V_e=f(n_e, d_out),
        C_p=f(n_p, d_in),
        s_e=r.uniform(0.5, 2, n_e).astype(np.float32),
        s_p=r.uniform(0.1, 1, n_p).astype(np.float32),
        preserve_cov=(P @ P.T).astype(np.float32),
    )


class RidgeTest(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_solution_has_zero_gradient_of_its_objective(self):
        p = _problem()
        kw = dict(s_e=p["s_e"], C_p=p["C_p"], s_p=p["s_p"], lam=0.5, preserve_cov=p["preserve_cov"])
        W = self.variant(lambda a, b, c: cf.ridge_edit(a, b, c, **kw))(
            p["W_old"], p["C_e"], p["V_e"]
        )
        chex.assert_shape(W, p["W_old"].shape)
        g = jax.grad(lambda w: cf.ridge_objective(w, p["W_old"], p["C_e"], p["V_e"], **kw))(W)
        # Relative to the gradient's scale at W_old (the objective is ~1e2 here).
        g0 = jax.grad(lambda w: cf.ridge_objective(w, p["W_old"], p["C_e"], p["V_e"], **kw))(
            jnp.asarray(p["W_old"])
        )
        assert float(jnp.abs(g).max()) < 1e-4 * float(jnp.abs(g0).max())
        # And it is the minimum: any perturbation increases the objective.
        obj = lambda w: float(cf.ridge_objective(w, p["W_old"], p["C_e"], p["V_e"], **kw))
        d = np.random.default_rng(1).standard_normal(W.shape).astype(np.float32) * 1e-2
        assert obj(W + d) > obj(W) and obj(W - d) > obj(W)

    @chex.all_variants(with_pmap=False)
    def test_vanishing_lambda_without_preservation_maps_c_e_onto_targets(self):
        p = _problem(seed=2)
        with jax.enable_x64(True):
            W = self.variant(lambda a, b, c: cf.ridge_edit(a, b, c, lam=1e-9))(
                np.float64(p["W_old"]), np.float64(p["C_e"]), np.float64(p["V_e"])
            )
            np.testing.assert_allclose(
                np.asarray(W) @ p["C_e"].T.astype(np.float64), p["V_e"].T, atol=1e-6
            )
            # The least change that does it: W − W_old lies in the row space of C_e.
            D = np.asarray(W) - p["W_old"]
            proj = D @ np.linalg.pinv(p["C_e"].astype(np.float64)) @ p["C_e"]
            np.testing.assert_allclose(proj, D, atol=1e-5)

    def test_equals_the_explicit_formula(self):
        p = _problem(seed=3)
        S_e, S_p = np.diag(p["s_e"]), np.diag(p["s_p"])
        C_e, C_p, V, W0, P = (
            p[k].astype(np.float64) for k in ("C_e", "C_p", "V_e", "W_old", "preserve_cov")
        )
        lam = 0.3
        A = lam * np.eye(12) + C_e.T @ S_e @ C_e + C_p.T @ S_p @ C_p + P
        B = lam * W0 + V.T @ S_e @ C_e + W0 @ (C_p.T @ S_p @ C_p + P)
        W = cf.ridge_edit(
            p["W_old"],
            p["C_e"],
            p["V_e"],
            s_e=p["s_e"],
            C_p=p["C_p"],
            s_p=p["s_p"],
            lam=lam,
            preserve_cov=p["preserve_cov"],
        )
        np.testing.assert_allclose(W, B @ np.linalg.inv(A), rtol=2e-4, atol=2e-4)

    def test_large_lambda_keeps_w_old(self):
        p = _problem(seed=4)
        W = cf.ridge_edit(p["W_old"], p["C_e"], p["V_e"], lam=1e7)
        np.testing.assert_allclose(W, p["W_old"], atol=1e-4)

    def test_kernel_form_is_the_transpose(self):
        p = _problem(seed=5)
        K = cf.ridge_edit_kernel(p["W_old"].T, p["C_e"], p["V_e"], lam=0.5)
        np.testing.assert_allclose(
            K, cf.ridge_edit(p["W_old"], p["C_e"], p["V_e"], lam=0.5).T, rtol=1e-6, atol=1e-5
        )


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(W_old=np.zeros(3)), "W_old: expected (d_out, d_in)"),
        (dict(C_e=np.zeros((3, 5))), "C_e: expected (n, 12) rows"),
        (dict(V_e=np.zeros((2, 7))), "V_e: expected (3, 7)"),
        (dict(s_e=np.ones(4)), "s_e: expected a scalar or one weight per row (3,)"),
        (dict(preserve_cov=np.eye(3)), "preserve_cov: expected (12, 12)"),
        (dict(lam=-1.0), "lam must be >= 0"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    p = _problem()
    kw = {k: p[k] for k in ("W_old", "C_e", "V_e")} | change
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cf.ridge_edit(**kw)


def test_uce_maps_erased_rows_to_guide_values_and_keeps_preserved_ones():
    r = np.random.default_rng(7)
    K = {
        "a/attn2/to_k/kernel": r.standard_normal((16, 8)).astype(np.float32),
        "a/attn2/to_v/kernel": r.standard_normal((16, 6)).astype(np.float32),
    }
    c_e, c_g = r.standard_normal((2, 3, 16)).astype(np.float32)
    c_p = r.standard_normal((4, 16)).astype(np.float32)
    with jax.enable_x64(True):
        new = cf.uce_edit(
            {k: np.float64(v) for k, v in K.items()},
            np.float64(c_e),
            np.float64(c_g),
            np.float64(c_p),
            preserve_scale=1e6,
            lam=1e-9,
        )
        for name, k_old in K.items():
            k_new = np.asarray(new[name])
            # erased rows now give the guide's old values; preserved rows (huge weight) keep theirs
            np.testing.assert_allclose(c_e @ k_new, c_g @ k_old, atol=1e-4)
            np.testing.assert_allclose(c_p @ k_new, c_p @ k_old, atol=1e-4)


def test_uce_default_preserve_scale():
    assert cf.uce_default_preserve_scale(0) == 1.0
    assert cf.uce_default_preserve_scale(4) == 0.25
    assert cf.uce_default_preserve_scale(100) == 0.1


def test_aligned_tail_takes_rows_from_the_last_word_token():
    L, D = 8, 3
    a = np.arange(L * D, dtype=np.float32).reshape(L, D)
    b = -a
    # a: SOT w1 w2 EOT pad... (len 4, last word at 2); b: SOT EOT ... (len 2, "SOT" at 0)
    ra, rb = cf.aligned_tail(a, 4, b, 2)
    np.testing.assert_array_equal(ra, a[2:8])
    np.testing.assert_array_equal(rb, b[0:6])
    ra, rb = cf.aligned_tail(a, 3, a, 3)
    np.testing.assert_array_equal(ra, a[1:])
    with pytest.raises(ValueError, match="len_a=1: a prompt has 2"):
        cf.aligned_tail(a, 1, b, 2)
    with pytest.raises(ValueError, match="must both be"):
        cf.aligned_tail(a, 3, b[:4], 2)
