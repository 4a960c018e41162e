"""SFD: the forgetting and remaining terms, and SFD with c_o = c_f is SiD."""

import jax
import numpy as np
import optax
import pytest

from jaxsafe.diffusion import sfd, sid
from tests.diffusion.test_sid import SHAPE, _state, tiny_denoise, tiny_params

K = 3


def test_sid_terms_draw_every_class_and_the_teacher_sees_the_same():
    (term,) = sfd.class_terms(K, 512)(jax.random.key(0))
    labels = np.argmax(np.asarray(term.cond), -1)
    assert set(labels) == {0, 1, 2} and term.weight == 1.0
    np.testing.assert_array_equal(np.asarray(term.teacher_cond), np.asarray(term.cond))


def test_sfd_terms_remaining_and_forgetting_batches():
    remain, forget = sfd.class_terms(K, 512, forget={0: 2}, forget_weight=0.01)(jax.random.key(1))
    r = np.argmax(np.asarray(remain.cond), -1)
    assert set(r) == {1, 2} and remain.weight == 1.0  # the forgotten class never remains
    np.testing.assert_array_equal(np.asarray(remain.teacher_cond), np.asarray(remain.cond))
    assert np.asarray(forget.cond).shape == (512, K) and forget.weight == 0.01
    assert set(np.argmax(np.asarray(forget.cond), -1)) == {0}
    assert set(np.argmax(np.asarray(forget.teacher_cond), -1)) == {2}  # the override
    # Two forgotten classes: each forgetting row's teacher sees that class's own override.
    _, f2 = sfd.class_terms(K, 256, forget={0: 2, 1: 2})(jax.random.key(2))
    assert set(np.argmax(np.asarray(f2.cond), -1)) == {0, 1}
    assert set(np.argmax(np.asarray(f2.teacher_cond), -1)) == {2}


def _step(terms):
    return jax.jit(
        sid.make_sid_step(
            tiny_denoise,
            terms,
            g_optimizer=optax.sgd(0.05),
            psi_optimizer=optax.sgd(0.05),
            latent_shape=SHAPE,
            batch_size=4,
        )
    )


@pytest.mark.slow
def test_sfd_with_the_override_equal_to_the_forgotten_class_is_sid():
    teacher, psi, G = tiny_params(0), tiny_params(1), tiny_params(2)
    state = _state(G, psi, teacher, optax.sgd(0.05), optax.sgd(0.05))
    rng = jax.random.key(5)
    same = sfd.class_terms(K, 4, forget={0: 0})

    def sid_terms(key):  # the same conditions, every term SiD's (teacher at the term's own c)
        return [sid.SiDTerm(t.cond, t.cond, t.weight) for t in same(key)]

    a, ma = _step(same)(state, None, rng)
    b, mb = _step(sid_terms)(state, None, rng)
    for net in ("G", "psi"):
        for name in G:
            np.testing.assert_array_equal(
                np.asarray(a.params[net][name]), np.asarray(b.params[net][name])
            )
    # Another override changes only the generator's update: f_ψ's loss has no teacher.
    c, mc = _step(sfd.class_terms(K, 4, forget={0: 1}))(state, None, rng)
    for name in G:
        np.testing.assert_array_equal(
            np.asarray(c.params["psi"][name]), np.asarray(a.params["psi"][name])
        )
    assert float(mc["loss"]) != float(ma["loss"])
    assert any(
        not np.array_equal(np.asarray(c.params["G"][n]), np.asarray(a.params["G"][n])) for n in G
    )


def test_class_terms_errors():
    with pytest.raises(ValueError, match="class 3 out of range for 3 classes"):
        sfd.class_terms(K, 4, forget={3: 0})
    with pytest.raises(ValueError, match="every class is forgotten"):
        sfd.class_terms(K, 4, forget={0: 1, 1: 2, 2: 0})
    with pytest.raises(ValueError, match="needs a class-conditional teacher"):
        sfd.class_terms(0, 4, forget={0: 1})
    (term,) = sfd.class_terms(0, 4)(jax.random.key(0))
    assert term.cond is None and term.teacher_cond is None
