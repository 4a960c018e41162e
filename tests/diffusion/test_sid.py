"""SiD: the generator loss against hand computations, its gradients, and the alternating step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsafe.diffusion import edm, sid
from jaxsafe.train.state import init_state

SHAPE = (2, 2, 1)  # latent (H, W, C)
N = int(np.prod(SHAPE))
K = 3  # classes


def tiny_params(seed):
    r = np.random.default_rng(seed)
    return {
        "W": jnp.asarray(0.3 * r.normal(size=(N, N)), jnp.float32),
        "b": jnp.asarray(0.1 * r.normal(size=(N,)), jnp.float32),
        "E": jnp.asarray(0.2 * r.normal(size=(K, N)), jnp.float32),
    }


def tiny_denoise(params, x, sigma, cond, key):
    """EDM-preconditioned linear network with a class embedding; dropout ignored."""
    del key

    def F(x_in, c_noise, c):
        flat = x_in.reshape(x_in.shape[0], -1) @ params["W"] + c_noise[:, None] * params["b"]
        return (flat + c @ params["E"]).reshape(x_in.shape)

    return edm.denoise(F, x, sigma, cond)


def test_generator_loss_against_a_hand_computation():
    r = np.random.default_rng(0)
    x_g, f_phi, f_psi = (r.normal(size=(3, *SHAPE)) for _ in range(3))
    alpha = 1.2
    out = np.asarray(
        sid.generator_loss(*(jnp.asarray(a, jnp.float32) for a in (x_g, f_phi, f_psi)), alpha)
    )
    for b in range(3):
        omega = np.mean(np.abs(x_g[b] - f_phi[b]))
        d = (f_phi[b] - f_psi[b]).ravel()
        hand = (np.dot(d, (f_phi[b] - x_g[b]).ravel()) - alpha * np.dot(d, d)) / omega
        np.testing.assert_allclose(out[b], hand, rtol=1e-5, atol=1e-5)
    # α = 1: (f_φ − f_ψ)·(f_ψ − x_g) / ω.
    one = np.asarray(
        sid.generator_loss(*(jnp.asarray(a, jnp.float32) for a in (x_g, f_phi, f_psi)), 1.0)
    )
    hand = [
        np.dot((f_phi[b] - f_psi[b]).ravel(), (f_psi[b] - x_g[b]).ravel())
        / np.mean(np.abs(x_g[b] - f_phi[b]))
        for b in range(3)
    ]
    np.testing.assert_allclose(one, hand, rtol=1e-5, atol=1e-5)


def test_omega_is_stop_gradient():
    r = np.random.default_rng(1)
    x_g, f_phi, f_psi = (jnp.asarray(r.normal(size=(2, *SHAPE)), jnp.float32) for _ in range(3))
    g = jax.grad(lambda x: sid.generator_loss(x, f_phi, f_psi, 1.2).sum())(x_g)
    # With f_φ, f_ψ and ω held fixed, ∂L/∂x_g = −(f_φ − f_ψ)/ω; a differentiated ω would add
    # a term in sign(x_g − f_φ).
    omega = np.mean(np.abs(np.asarray(x_g - f_phi)), axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(
        np.asarray(g), -np.asarray(f_phi - f_psi) / omega, rtol=1e-5, atol=1e-5
    )


def test_karras_sigma_ends_and_generator_sigma_range():
    np.testing.assert_allclose(float(sid.karras_sigma(0.0)), 0.002, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(sid.karras_sigma(1.0)), 80.0, rtol=1e-6, atol=1e-4)
    # EDM's sampling levels are the same curve at t = 1 − i/(N − 1).
    steps = np.asarray(edm.edm_sigma_steps(18))[:-1]
    t = 1 - np.arange(18) / 17
    np.testing.assert_allclose(
        np.asarray(sid.karras_sigma(jnp.asarray(t))), steps, rtol=1e-5, atol=1e-8
    )
    s = np.asarray(sid.generator_sigma(jax.random.key(0), 4096, tmax=800))
    top = float(sid.karras_sigma(0.8))
    assert s.min() >= 0.002 and s.max() <= top and s.max() > 0.9 * top
    np.testing.assert_allclose(top, 24.4, atol=0.05)


def _state(G, psi, teacher, g_tx, psi_tx):
    params = {"G": G, "psi": psi}
    return init_state(
        params, {"teacher": teacher}, sid.pair_optimizer(g_tx, psi_tx), extra={"ema": G}
    )


def _terms(key):
    labels = jax.nn.one_hot(jax.random.randint(key, (4,), 0, K), K)
    return [sid.SiDTerm(labels, labels, 1.0)]


def test_first_fake_score_step_is_the_edm_loss_gradient_and_the_teacher_gets_none():
    teacher = tiny_params(0)
    lr = 0.1
    step = sid.make_sid_step(
        tiny_denoise,
        _terms,
        g_optimizer=optax.sgd(lr),
        psi_optimizer=optax.sgd(lr),
        latent_shape=SHAPE,
        batch_size=4,
        ema_beta=lambda n: jnp.float32(0.5),
    )
    state = _state(teacher, teacher, teacher, optax.sgd(lr), optax.sgd(lr))
    rng = jax.random.key(3)
    new, metrics = jax.jit(step)(state, None, rng)
    # The step's keys (documented in make_sid_step): the fake-score phase's conditions and the
    # one term's (z, σ/noise) keys.
    k_psi, _ = jax.random.split(rng)
    k_terms, key = jax.random.split(k_psi)
    labels = _terms(k_terms)[0].cond
    k_z, k_loss, _ = jax.random.split(key, 3)
    # G = the teacher: x_g is the teacher's one-step output at σ_init = 2.5.
    z = jax.random.normal(k_z, (4, *SHAPE))
    x_g = tiny_denoise(teacher, 2.5 * z, jnp.full((4,), 2.5), labels, None)
    k_sigma, k_n = jax.random.split(k_loss)
    sigma = jnp.exp(-1.2 + 1.2 * jax.random.normal(k_sigma, (4,)))
    noisy = x_g + sigma[:, None, None, None] * jax.random.normal(k_n, x_g.shape)

    def edm_loss(p):  # EDM's loss written out: λ(σ) Σ (D(y + σn) − y)², batch mean
        lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        err = tiny_denoise(p, noisy, sigma, labels, None) - x_g
        return jnp.mean(lam * jnp.sum(err**2, axis=(1, 2, 3)))

    grads = jax.grad(edm_loss)(teacher)
    for name in teacher:
        np.testing.assert_allclose(
            np.asarray(new.params["psi"][name]),
            np.asarray(teacher[name] - lr * grads[name]),
            rtol=1e-4,
            atol=1e-5,
            err_msg=name,
        )
    np.testing.assert_allclose(
        float(metrics["loss_fake_score"]), float(edm_loss(teacher)), rtol=1e-4, atol=1e-5
    )
    for name in teacher:  # the teacher is frozen; G moved; its EMA is half-way (β = 0.5)
        np.testing.assert_array_equal(
            np.asarray(new.frozen["teacher"][name]), np.asarray(teacher[name])
        )
        np.testing.assert_allclose(
            np.asarray(new.extra["ema"][name]),
            np.asarray(0.5 * teacher[name] + 0.5 * new.params["G"][name]),
            rtol=1e-6,
            atol=1e-7,
        )
    assert any(
        not np.array_equal(np.asarray(new.params["G"][n]), np.asarray(teacher[n])) for n in teacher
    )


def test_generator_gradient_flows_through_the_frozen_networks_inputs():
    teacher, psi, G = tiny_params(0), tiny_params(1), tiny_params(2)
    lr = 0.05
    step = sid.make_sid_step(
        tiny_denoise,
        _terms,
        g_optimizer=optax.sgd(lr),
        psi_optimizer=optax.sgd(0.0),
        latent_shape=SHAPE,
        batch_size=4,
        g_loss_scale=100.0,
    )
    rng = jax.random.key(7)
    new, metrics = jax.jit(step)(_state(G, psi, teacher, optax.sgd(lr), optax.sgd(0.0)), None, rng)
    _, k_g = jax.random.split(rng)
    k_terms, key = jax.random.split(k_g)
    labels = _terms(k_terms)[0].cond
    k_z, k_sigma, k_noise, _ = jax.random.split(key, 4)
    z = jax.random.normal(k_z, (4, *SHAPE))
    sigma = sid.generator_sigma(k_sigma, 4, 800.0)
    n = sigma[:, None, None, None] * jax.random.normal(k_noise, z.shape)

    def loss(g):  # written out: x_t depends on G, so do f_φ(x_t) and f_ψ(x_t); only ω is fixed
        x_g = tiny_denoise(g, 2.5 * z, jnp.full((4,), 2.5), labels, None)
        x_t = x_g + n
        f_phi = tiny_denoise(teacher, x_t, sigma, labels, None)
        f_psi = tiny_denoise(psi, x_t, sigma, labels, None)
        omega = jax.lax.stop_gradient(jnp.mean(jnp.abs(x_g - f_phi), axis=(1, 2, 3)))
        d = f_phi - f_psi
        return 100.0 * jnp.mean(jnp.sum(d * ((f_phi - x_g) - 1.2 * d), axis=(1, 2, 3)) / omega)

    grads = jax.grad(loss)(G)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss(G)), rtol=1e-4, atol=1e-4)
    for name in G:
        np.testing.assert_allclose(
            np.asarray(new.params["G"][name]),
            np.asarray(G[name] - lr * grads[name]),
            rtol=1e-4,
            atol=1e-5,
            err_msg=name,
        )

    # Treating f_φ(x_t) and f_ψ(x_t) as constants (no gradient through their inputs) differs.
    def detached(g):
        x_g = tiny_denoise(g, 2.5 * z, jnp.full((4,), 2.5), labels, None)
        x_t = jax.lax.stop_gradient(x_g + n)
        f_phi = tiny_denoise(teacher, x_t, sigma, labels, None)
        f_psi = tiny_denoise(psi, x_t, sigma, labels, None)
        omega = jnp.mean(jnp.abs(x_g - f_phi), axis=(1, 2, 3))
        d = f_phi - f_psi
        return 100.0 * jnp.mean(
            jnp.sum(d * ((f_phi - x_g) - 1.2 * d), axis=(1, 2, 3)) / jax.lax.stop_gradient(omega)
        )

    other = jax.grad(detached)(G)
    assert not np.allclose(np.asarray(other["W"]), np.asarray(grads["W"]), rtol=1e-3, atol=1e-6)


def test_pair_optimizer_refuses_a_joint_update():
    tx = sid.pair_optimizer(optax.adam(1e-3, b1=0.0), optax.adam(1e-3, b1=0.0))
    params = {"G": tiny_params(0), "psi": tiny_params(1)}
    state = tx.init(params)
    assert set(state) == {"G", "psi"}
    with pytest.raises(NotImplementedError, match="updated one after the other"):
        tx.update(params, state, params)


def test_vp_kernel_generates_from_pure_noise_and_its_fake_loss_is_the_epsilon_mse():
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)).astype(np.float32)
    kernel = sid.vp_kernel(abar, t_init=625, t_min=20, t_max=980)
    params = tiny_params(0)

    def eps_net(p, x, t, cond):  # an ε-predicting network; its x₀ prediction is the denoiser
        c_noise = t.astype(jnp.float32) / 1000
        flat = x.reshape(x.shape[0], -1) @ p["W"] + c_noise[:, None] * p["b"] + cond @ p["E"]
        return flat.reshape(x.shape)

    def x0(p, x, t, cond, key):
        a = jnp.asarray(abar)[t][:, None, None, None]
        return (x - jnp.sqrt(1 - a) * eps_net(p, x, t, cond)) / jnp.sqrt(a)

    cond = jax.nn.one_hot(jnp.arange(4) % K, K)
    z = jax.random.normal(jax.random.key(0), (4, *SHAPE))
    x_g = kernel.generate(x0, params, z, cond, None)
    x_T = np.sqrt(1 - abar[625]) * np.asarray(z)
    np.testing.assert_allclose(
        np.asarray(x_g),
        np.asarray(x0(params, jnp.asarray(x_T), jnp.full((4,), 625), cond, None)),
        rtol=1e-5,
        atol=1e-5,
    )
    # f_ψ's loss: the reference's ε-MSE on x_t = √ᾱ x + √(1 − ᾱ) ε, t ~ U{20..979}.
    key = jax.random.key(1)
    loss = np.asarray(kernel.fake_loss(x0, params, x_g, cond, key, None))
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (4,), 20, 980)
    eps = jax.random.normal(k_n, x_g.shape)
    a = jnp.asarray(abar)[t][:, None, None, None]
    x_t = jnp.sqrt(a) * x_g + jnp.sqrt(1 - a) * eps
    hand = np.sum(np.asarray(eps_net(params, x_t, t, cond) - eps) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(loss, hand, rtol=1e-3, atol=1e-4)
    levels = np.asarray(kernel.levels(jax.random.key(2), 4096))
    assert levels.min() >= 20 and levels.max() <= 979 and levels.max() > 970


def test_terms_run_as_one_batch_each_weighted_by_its_mean():
    teacher = tiny_params(0)
    a = jax.nn.one_hot(jnp.zeros(4, jnp.int32), K)
    b = jax.nn.one_hot(jnp.ones(4, jnp.int32), K)

    def terms(key):
        return [sid.SiDTerm(a, a, 1.0), sid.SiDTerm(b, a, 0.25)]

    step = sid.make_sid_step(
        tiny_denoise,
        terms,
        g_optimizer=optax.sgd(0.0),
        psi_optimizer=optax.sgd(0.0),
        latent_shape=SHAPE,
        batch_size=4,
    )
    rng = jax.random.key(11)
    _, metrics = jax.jit(step)(
        _state(teacher, teacher, teacher, optax.sgd(0.0), optax.sgd(0.0)), None, rng
    )
    k_psi, _ = jax.random.split(rng)
    _, key = jax.random.split(k_psi)
    k_z, k_loss, k_drop = jax.random.split(key, 3)
    cond = jnp.concatenate([a, b])
    z = jax.random.normal(k_z, (8, *SHAPE))
    x_g = sid.one_step(tiny_denoise, teacher, z, cond)
    rows = np.asarray(sid.fake_score_loss(tiny_denoise, teacher, x_g, cond, k_loss, key=k_drop))
    np.testing.assert_allclose(
        float(metrics["loss_fake_score"]),
        rows[:4].mean() + 0.25 * rows[4:].mean(),
        rtol=1e-5,
        atol=1e-5,
    )
