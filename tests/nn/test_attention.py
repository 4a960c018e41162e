"""The attention lowerings against an independent float64 softmax attention, and their memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.nn import attention


def _reference(q, k, v):
    """softmax(q k^T / sqrt(H)) v in float64 NumPy, (B, T, N, H) layout."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _reference_grads(q, k, v, w):
    """d/d(q, k, v) of sum(w * attention) in float64 by JAX autodiff of the plain formula."""
    with jax.enable_x64(True):

        def f(q, k, v):
            s = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(q.shape[-1] * 1.0)
            return (jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v) * w).sum()

        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        w = jnp.asarray(w, jnp.float64)
        return [np.asarray(g) for g in jax.grad(f, argnums=(0, 1, 2))(*args)]


def _inputs(b, t_q, t_k, n, h, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t_q, n, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, t_k, n, h)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal((b, t_q, n, h)).astype(np.float32)
    return q, k, v, w


# Self-attention with whole tiles, a query length that needs padding (300 -> 2 tiles of 256),
# cross-attention with few keys, and a sequence shorter than one tile.
SHAPES = [(2, 1024, 1024, 2, 8), (1, 300, 300, 3, 16), (2, 600, 7, 2, 8), (1, 40, 40, 2, 4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_forward_and_gradients_equal_the_float64_formula(shape):
    q, k, v, w = _inputs(*shape)
    out = jax.jit(attention.chunked_attention)(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v), atol=2e-5, rtol=1e-4)
    loss = lambda q, k, v: (attention.chunked_attention(q, k, v) * w).sum()
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grads, _reference_grads(q, k, v, w)):
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * scale, rtol=1e-3)


def test_small_tiles_in_both_passes_give_the_same_result():
    """Tiles of 64 forward / 32 backward over 200 queries (padded to 224): the tiling is exact."""
    q, k, v, w = _inputs(1, 200, 96, 2, 8, seed=1)
    f = lambda q, k, v: attention.chunked_attention(q, k, v, forward_chunk=64, backward_chunk=32)
    np.testing.assert_allclose(np.asarray(f(q, k, v)), _reference(q, k, v), atol=2e-5, rtol=1e-4)
    grads = jax.grad(lambda *a: (f(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, _reference_grads(q, k, v, w)):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * np.abs(want).max(), rtol=1e-3)


def test_bfloat16_inputs_keep_float32_logits():
    """bf16 q, k, v: the output is bf16 and within bf16 rounding of the float64 formula."""
    q, k, v, _ = _inputs(1, 512, 512, 2, 16, seed=2)
    out = attention.chunked_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    qb, kb, vb = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k, v))
    np.testing.assert_allclose(
        np.asarray(out, np.float32), _reference(qb, kb, vb), atol=3e-2, rtol=2e-2
    )


def test_chunked_memory_is_linear_in_the_token_count():
    """XLA's plan for 2 heads: doubling the tokens (2048 -> 4096) doubles the chunked form's
    temporaries and quadruples the plain lowering's, which hold every head's logits at once."""

    def temp_bytes(impl, tokens):
        q = jax.ShapeDtypeStruct((1, tokens, 2, 16), jnp.float32)
        f = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=impl)
        return jax.jit(f).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("xla", 2048) >= 2 * 2048 * 2048 * 4
    assert temp_bytes("xla", 4096) / temp_bytes("xla", 2048) > 3.5
    assert temp_bytes("chunked", 4096) / temp_bytes("chunked", 2048) < 2.2
    assert temp_bytes("chunked", 4096) < 2 * 4096 * 4096 * 4 / 8


def test_auto_picks_by_backend_dtype_and_size():
    choose = attention.choose
    assert choose(4096, 4096, 40, jnp.float32, "cpu") == "chunked"
    assert choose(256, 256, 160, jnp.float32, "cpu") == "chunked"
    assert choose(255, 4096, 40, jnp.float32, "cpu") == "xla"
    assert choose(4096, 77, 40, jnp.float32, "cpu") == "xla"
    assert choose(4096, 4096, 40, jnp.float32, "tpu") == "xla"
    assert choose(4096, 4096, 40, jnp.bfloat16, "gpu") == "cudnn"
    assert choose(64, 64, 160, jnp.bfloat16, "gpu") == "xla"
    assert choose(4096, 4096, 40, jnp.float32, "gpu") == "xla"


def test_every_lowering_agrees_on_the_host():
    q, k, v, _ = _inputs(1, 256, 256, 2, 8, seed=3)
    want = _reference(q, k, v)
    for impl in ("auto", "xla", "chunked"):
        out = attention.dot_product_attention(q, k, v, implementation=impl)
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-4)


def test_unknown_implementation_is_named():
    q = np.zeros((1, 4, 1, 2), np.float32)
    with pytest.raises(
        ValueError,
        match=r"attention implementation must be one of "
        r"\('auto', 'xla', 'chunked', 'cudnn'\), got 'flash'",
    ):
        attention.dot_product_attention(q, q, q, implementation="flash")
