"""EDM's SongUNet (jaxsafe.nn.songunet) against an independent NumPy reading of EDM's networks.py.

`edm_layout` below spells out, from NVlabs/edm `training/networks.py::SongUNet.__init__`, which
modules EDM builds (names, channels, resampling, attention); the parameter counts and a float64
NumPy forward pass in EDM's own NCHW / PyTorch-weight layout are computed from it, so a wrong
channel count, skip order, filter, padding or q/k/v layout in the NHWC module shows up as a
mismatch.
"""

import functools
import inspect
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view
from subprocs import run_snippet

from jaxsafe.nn import songunet
from jaxsafe.nn.songunet import (
    SONGUNET_SHARDING_RULES,
    Conv2d,
    GroupNorm,
    SongUNet,
    UNetBlock,
    ddpmpp_cifar10,
    ddpmpp_ffhq64,
    fourier_embedding,
    ncsnpp_cifar10,
    ncsnpp_ffhq64,
    positional_embedding,
)
from jaxsafe.treepath import named_leaves, path_name

# --------------------------------------------------------------------------- EDM's architecture


def edm_layout(
    img_resolution,
    in_channels,
    out_channels,
    *,
    model_channels,
    channel_mult,
    num_blocks,
    attn_resolutions,
    encoder_type,
    decoder_type,
    **_,
):
    """EDM SongUNet's encoder and decoder modules in forward order: (name, kind, spec)."""
    enc, dec = [], []
    cout = caux = in_channels
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            enc.append((f"{res}x{res}_conv", "conv", {"cin": cout, "cout": model_channels, "k": 3}))
            cout = model_channels
        else:
            enc.append((f"{res}x{res}_down", "block", {"cin": cout, "cout": cout, "down": True}))
            if encoder_type == "skip":
                enc.append(
                    (
                        f"{res}x{res}_aux_down",
                        "conv",
                        {"cin": caux, "cout": caux, "k": 0, "down": True},
                    )
                )
                enc.append((f"{res}x{res}_aux_skip", "conv", {"cin": caux, "cout": cout, "k": 1}))
            if encoder_type == "residual":
                enc.append(
                    (
                        f"{res}x{res}_aux_residual",
                        "conv",
                        {"cin": caux, "cout": cout, "k": 3, "down": True, "fused": True},
                    )
                )
                caux = cout
        for idx in range(num_blocks):
            enc.append(
                (
                    f"{res}x{res}_block{idx}",
                    "block",
                    {"cin": cout, "cout": model_channels * mult, "attn": res in attn_resolutions},
                )
            )
            cout = model_channels * mult
    skips = [spec["cout"] for name, _, spec in enc if "aux" not in name]
    for level in reversed(range(len(channel_mult))):
        res, mult = img_resolution >> level, channel_mult[level]
        if level == len(channel_mult) - 1:
            dec.append((f"{res}x{res}_in0", "block", {"cin": cout, "cout": cout, "attn": True}))
            dec.append((f"{res}x{res}_in1", "block", {"cin": cout, "cout": cout}))
        else:
            dec.append((f"{res}x{res}_up", "block", {"cin": cout, "cout": cout, "up": True}))
        for idx in range(num_blocks + 1):
            cin = cout + skips.pop()
            cout = model_channels * mult
            dec.append(
                (
                    f"{res}x{res}_block{idx}",
                    "block",
                    {
                        "cin": cin,
                        "cout": cout,
                        "attn": idx == num_blocks and res in attn_resolutions,
                    },
                )
            )
        if decoder_type == "skip" or level == 0:
            if decoder_type == "skip" and level < len(channel_mult) - 1:
                dec.append(
                    (
                        f"{res}x{res}_aux_up",
                        "conv",
                        {"cin": out_channels, "cout": out_channels, "k": 0, "up": True},
                    )
                )
            dec.append((f"{res}x{res}_aux_norm", "norm", {"cin": cout, "cout": cout}))
            dec.append(
                (f"{res}x{res}_aux_conv", "conv", {"cin": cout, "cout": out_channels, "k": 3})
            )
    return enc, dec


def edm_param_count(cfg):
    """Trainable parameters of EDM's SongUNet(**cfg), counted from `edm_layout`."""
    n_noise = cfg["model_channels"] * cfg.get("channel_mult_noise", 1)
    n_emb = cfg["model_channels"] * cfg.get("channel_mult_emb", 4)

    def conv(cin, cout, k):  # weight [cout, cin, k, k] + bias
        return cin * cout * k * k + cout if k else 0

    def block(cin, cout, attn=False, up=False, down=False):
        n = 2 * cin + conv(cin, cout, 3) + (n_emb * cout + cout) + 2 * cout + conv(cout, cout, 3)
        if cin != cout or up or down:
            n += conv(cin, cout, 1)
        if attn:
            n += 2 * cout + conv(cout, 3 * cout, 1) + conv(cout, cout, 1)
        return n

    total = (n_noise * n_emb + n_emb) + (n_emb * n_emb + n_emb)
    if cfg.get("label_dim", 0):
        total += cfg["label_dim"] * n_noise + n_noise
    total += cfg.get("augment_dim", 0) * n_noise  # map_augment has no bias
    enc, dec = edm_layout(**cfg)
    for _, kind, s in enc + dec:
        if kind == "conv":
            total += conv(s["cin"], s["cout"], s["k"])
        elif kind == "norm":
            total += 2 * s["cin"]
        else:
            total += block(
                s["cin"], s["cout"], s.get("attn", False), s.get("up", False), s.get("down", False)
            )
    return total


# train.py's --arch presets (+ --cres for FFHQ); augment_dim=9 because --augment > 0 by default.
DDPMPP = {
    "embedding_type": "positional",
    "encoder_type": "standard",
    "decoder_type": "standard",
    "channel_mult_noise": 1,
    "resample_filter": (1, 1),
}
NCSNPP = {
    "embedding_type": "fourier",
    "encoder_type": "residual",
    "decoder_type": "standard",
    "channel_mult_noise": 2,
    "resample_filter": (1, 3, 3, 1),
}
BASE = {
    "model_channels": 128,
    "channel_mult_emb": 4,
    "num_blocks": 4,
    "attn_resolutions": (16,),
    "augment_dim": 9,
}
CIFAR = dict(img_resolution=32, in_channels=3, out_channels=3, channel_mult=(2, 2, 2), **BASE)
FFHQ = dict(img_resolution=64, in_channels=3, out_channels=3, channel_mult=(1, 2, 2, 2), **BASE)

# Counted by hand from networks.py via edm_param_count; also printed in the module docstring.
EDM_COUNTS = {
    ("ddpmpp_cifar10", 0): 55_733_891,
    ("ddpmpp_cifar10", 10): 55_735_299,
    ("ncsnpp_cifar10", 0): 56_397_827,
    ("ncsnpp_cifar10", 10): 56_400_643,
    ("ddpmpp_ffhq64", 0): 61_805_571,
    ("ncsnpp_ffhq64", 0): 62_761_091,
}
PRESETS = {
    "ddpmpp_cifar10": (ddpmpp_cifar10, {**CIFAR, **DDPMPP}),
    "ncsnpp_cifar10": (ncsnpp_cifar10, {**CIFAR, **NCSNPP}),
    "ddpmpp_ffhq64": (ddpmpp_ffhq64, {**FFHQ, **DDPMPP}),
    "ncsnpp_ffhq64": (ncsnpp_ffhq64, {**FFHQ, **NCSNPP}),
}


def _n_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("key", sorted(EDM_COUNTS))
def test_edm_counts_formula_and_docstring(key):
    name, label_dim = key
    cfg = {**PRESETS[name][1], "label_dim": label_dim}
    assert edm_param_count(cfg) == EDM_COUNTS[key]
    assert f"{EDM_COUNTS[key]:,}" in songunet.__doc__
    # augment_dim=0 drops exactly the 9 x N map_augment weights the docstring quotes.
    n_noise = 128 * cfg["channel_mult_noise"]
    assert EDM_COUNTS[key] - edm_param_count({**cfg, "augment_dim": 0}) == 9 * n_noise
    assert f"{9 * n_noise:,}" in songunet.__doc__


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(EDM_COUNTS))
def test_preset_param_counts_equal_edm(key):
    name, label_dim = key
    make = PRESETS[name][0]
    model = nnx.eval_shape(lambda: make(label_dim=label_dim, rngs=nnx.Rngs(0)))
    assert _n_params(model) == EDM_COUNTS[key]


@pytest.mark.parametrize(
    "encoder_type, decoder_type",
    [
        ("standard", "standard"),
        ("skip", "standard"),
        ("residual", "standard"),
        ("standard", "skip"),
        ("residual", "skip"),
    ],
)
def test_tiny_param_count_and_names(encoder_type, decoder_type):
    cfg = dict(TINY, encoder_type=encoder_type, decoder_type=decoder_type)
    model = nnx.eval_shape(lambda: SongUNet(**cfg, rngs=nnx.Rngs(0)))
    assert _n_params(model) == edm_param_count(cfg)
    enc, dec = edm_layout(**cfg)
    assert model.enc_order == tuple(name for name, _, _ in enc)
    assert model.dec_order == tuple(name for name, _, _ in dec)
    assert sorted(model.enc.keys()) == sorted(model.enc_order)
    assert sorted(model.dec.keys()) == sorted(model.dec_order)


# ------------------------------------------------------------------ NumPy reference (NCHW, torch)

TINY = {
    "img_resolution": 8,
    "in_channels": 3,
    "out_channels": 3,
    "label_dim": 3,
    "augment_dim": 2,
    "model_channels": 16,
    "channel_mult": (1, 2),
    "num_blocks": 1,
    "attn_resolutions": (4,),
    "dropout": 0.1,
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "skip",
    "decoder_type": "skip",
    "resample_filter": (1, 1),
}


def silu(x):
    return x / (1 + np.exp(-x))


def np_fir(filt):
    f = np.asarray(filt, np.float64)
    return np.outer(f, f) / f.sum() ** 2


def np_conv_nchw(x, w, pad, stride=1):
    """torch.nn.functional.conv2d: x (N, C, H, W), w (O, C, k, k), cross-correlation."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwab,ocab->nohw", win, w)


def np_fir_down(x, f, pad):
    """conv2d(x, f tiled per channel, groups=C, stride=2, padding=pad)."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, f.shape, axis=(2, 3))[:, :, ::2, ::2]
    return np.einsum("nchwab,ab->nchw", win, f)


def np_fir_up(x, f, pad):
    """conv_transpose2d(x, 4 f per channel, groups=C, stride=2, padding=pad), by its definition:
    every input pixel scatters 4 f into the 2x grid, then `pad` is cropped from each side."""
    n, c, h, w = x.shape
    k = f.shape[0]
    full = np.zeros((n, c, 2 * (h - 1) + k, 2 * (w - 1) + k))
    for i in range(h):
        for j in range(w):
            full[:, :, 2 * i : 2 * i + k, 2 * j : 2 * j + k] += x[:, :, i, j, None, None] * 4 * f
    return full[:, :, pad : full.shape[2] - pad, pad : full.shape[3] - pad]


def _name(prefix, leaf):
    return f"{prefix}/{leaf}" if prefix else leaf


def np_conv2d(x, P, prefix, *, up=False, down=False, fused=False, filt=(1, 1)):
    """EDM Conv2d.forward with weights from our (k, k, in, out) kernels."""
    w = P.get(_name(prefix, "kernel"))
    w = None if w is None else w.transpose(3, 2, 0, 1)
    f = np_fir(filt)
    w_pad = 0 if w is None else w.shape[-1] // 2
    f_pad = (f.shape[0] - 1) // 2
    if fused and down and w is not None:
        x = np_fir_down(np_conv_nchw(x, w, w_pad + f_pad), f, 0)
    else:
        if up:
            x = np_fir_up(x, f, f_pad)
        if down:
            x = np_fir_down(x, f, f_pad)
        if w is not None:
            x = np_conv_nchw(x, w, w_pad)
    if _name(prefix, "bias") in P:
        x = x + P[_name(prefix, "bias")][None, :, None, None]
    return x


def np_group_norm(x, P, prefix, eps=1e-6):
    n, c, _h, _w = x.shape
    g = min(32, c // 4)
    xg = x.reshape(n, g, -1)
    y = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
    y = y.reshape(x.shape)
    return (
        y * P[_name(prefix, "scale")][None, :, None, None]
        + P[_name(prefix, "bias")][None, :, None, None]
    )


def np_linear(x, P, prefix):
    y = x @ P[_name(prefix, "kernel")]
    return y + P[_name(prefix, "bias")] if _name(prefix, "bias") in P else y


def np_block(x, emb, P, prefix, spec, filt):
    """EDM UNetBlock.forward, SongUNet settings (adaptive_scale=False, one head, eval mode)."""
    up, down = spec.get("up", False), spec.get("down", False)
    orig = x
    x = np_conv2d(
        silu(np_group_norm(x, P, _name(prefix, "norm0"))),
        P,
        _name(prefix, "conv0"),
        up=up,
        down=down,
        filt=filt,
    )
    params = np_linear(emb, P, _name(prefix, "affine"))[:, :, None, None]
    x = silu(np_group_norm(x + params, P, _name(prefix, "norm1")))
    x = np_conv2d(x, P, _name(prefix, "conv1"))
    if spec["cin"] != spec["cout"] or up or down:
        orig = np_conv2d(orig, P, _name(prefix, "skip"), up=up, down=down, filt=filt)
    x = (x + orig) * np.sqrt(0.5)
    if spec.get("attn", False):
        n, c, h, w = x.shape
        heads = 1
        qkv = np_conv2d(np_group_norm(x, P, _name(prefix, "norm2")), P, _name(prefix, "qkv"))
        qkv = qkv.reshape(n * heads, c // heads, 3, h * w)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = np.einsum("ncq,nck->nqk", q, k / np.sqrt(k.shape[1]))
        wts = np.exp(logits - logits.max(2, keepdims=True))
        wts /= wts.sum(2, keepdims=True)
        a = np.einsum("nqk,nck->ncq", wts, v).reshape(n, c, h, w)
        x = (np_conv2d(a, P, _name(prefix, "proj")) + x) * np.sqrt(0.5)
    return x


def np_embedding(noise, labels, augment, P, cfg):
    n = cfg["model_channels"] * cfg["channel_mult_noise"]
    if cfg["embedding_type"] == "positional":
        omega = (1 / 10000) ** (np.arange(n // 2) / (n // 2 - 1))
    else:
        omega = 2 * np.pi * P["map_noise/freqs"]
    arg = np.outer(noise, omega)
    emb = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)  # EDM's [cos, sin] after the swap
    if cfg["label_dim"]:
        emb = emb + np_linear(labels * np.sqrt(cfg["label_dim"]), P, "map_label")
    if cfg["augment_dim"] and augment is not None:
        emb = emb + augment @ P["map_augment/kernel"]
    emb = silu(np_linear(emb, P, "map_layer0"))
    return silu(np_linear(emb, P, "map_layer1"))


def np_songunet(x_nhwc, noise, labels, augment, P, cfg):
    """EDM SongUNet.forward (eval mode) in NCHW; returns NHWC."""
    filt = cfg["resample_filter"]
    emb = np_embedding(noise, labels, augment, P, cfg)
    enc, dec = edm_layout(**cfg)
    x = aux = x_nhwc.transpose(0, 3, 1, 2)
    skips = []
    for name, kind, s in enc:
        p = f"enc/{name}"
        if "aux_down" in name:
            aux = np_conv2d(aux, P, p, down=True, filt=filt)
        elif "aux_skip" in name:
            x = skips[-1] = x + np_conv2d(aux, P, p)
        elif "aux_residual" in name:
            x = skips[-1] = aux = (
                x + np_conv2d(aux, P, p, down=True, fused=True, filt=filt)
            ) / np.sqrt(2)
        else:
            x = np_block(x, emb, P, p, s, filt) if kind == "block" else np_conv2d(x, P, p)
            skips.append(x)
    aux = tmp = None
    for name, kind, s in dec:
        p = f"dec/{name}"
        if "aux_up" in name:
            aux = np_conv2d(aux, P, p, up=True, filt=filt)
        elif "aux_norm" in name:
            tmp = np_group_norm(x, P, p)
        elif "aux_conv" in name:
            tmp = np_conv2d(silu(tmp), P, p)
            aux = tmp if aux is None else tmp + aux
        else:
            if x.shape[1] != s["cin"]:
                x = np.concatenate([x, skips.pop()], axis=1)
            x = np_block(x, emb, P, p, s, filt)
    return aux.transpose(0, 2, 3, 1)


def randomize(model, seed=0):
    """Fills every variable with O(1)-activation random values (kernels N(0, 1/fan_in), biases
    and GroupNorm shifts N(0, 0.2^2), scales 1 + N(0, 0.2^2), Fourier frequencies N(0, 16^2)) so
    every path reaches the output, unlike EDM's 1e-5 output convs. Works on `nnx.eval_shape`
    models, which skips the (slow, per-shape compiled) real initialisation."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        name = path_name(path)
        if name.endswith("kernel"):
            v = rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))
        elif name.endswith("freqs"):
            v = 16 * rng.standard_normal(x.shape)
        else:
            v = (1.0 if name.endswith("scale") else 0.0) + 0.2 * rng.standard_normal(x.shape)
        return jnp.asarray(v, x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(one, nnx.state(model)))
    return model


def random_model(cls=SongUNet, *args, seed=0, **kw):
    return randomize(nnx.eval_shape(lambda: cls(*args, **kw, rngs=nnx.Rngs(0))), seed)


def np_params(model):
    return {k: np.asarray(v, np.float64) for k, v in named_leaves(nnx.state(model)).items()}


def _inputs(cfg, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    r, c = cfg["img_resolution"], cfg["in_channels"]
    x = rng.standard_normal((batch, r, r, c)).astype(np.float32)
    noise = rng.standard_normal(batch).astype(np.float32)
    labels = (
        np.eye(cfg["label_dim"], dtype=np.float32)[rng.integers(cfg["label_dim"], size=batch)]
        if cfg["label_dim"]
        else None
    )
    augment = (
        rng.standard_normal((batch, cfg["augment_dim"])).astype(np.float32)
        if cfg["augment_dim"]
        else None
    )
    return x, noise, labels, augment


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, params, rest, x, noise, labels, augment, key):
    model = nnx.merge(graphdef, params, rest)
    return model(x, noise, labels, augment, rngs=None if key is None else nnx.Rngs(dropout=key))


def apply(model, x, noise, labels=None, augment=None, key=None):
    """The trainer's pattern: split once, plain jax.jit, merge inside (one compile per graph)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _apply(graphdef, params, rest, x, noise, labels, augment, key)


FORWARD_CASES = {
    "ncsnpp-3-levels": {
        "img_resolution": 16,
        "channel_mult": (1, 2, 2),
        "attn_resolutions": (8, 4),
        "embedding_type": "fourier",
        "channel_mult_noise": 2,
        "encoder_type": "residual",
        "resample_filter": (1, 3, 3, 1),
    },
    "ddpmpp-skip-skip": {},  # TINY itself: shares its compiled forward with the `tiny` fixture
    "ddpmpp": {"encoder_type": "standard", "decoder_type": "standard", "augment_dim": 0},
    "ncsnpp-skip-dec": {
        "embedding_type": "fourier",
        "channel_mult_noise": 2,
        "encoder_type": "residual",
        "decoder_type": "skip",
        "resample_filter": (1, 3, 3, 1),
        "label_dim": 0,
    },
}


@pytest.mark.parametrize(
    "case",
    [
        "ncsnpp-3-levels",
        "ddpmpp-skip-skip",
        pytest.param("ddpmpp", marks=pytest.mark.slow),
        pytest.param("ncsnpp-skip-dec", marks=pytest.mark.slow),
    ],
)
@pytest.mark.slow
def test_forward_matches_numpy_edm(case):
    cfg = {**TINY, **FORWARD_CASES[case]}
    model = random_model(**cfg, seed=3)
    model.eval()
    x, noise, labels, augment = _inputs(cfg)
    out = apply(model, x, noise, labels, augment)
    assert out.shape == x.shape[:3] + (cfg["out_channels"],) and out.dtype == jnp.float32
    expected = np_songunet(x.astype(np.float64), noise, labels, augment, np_params(model), cfg)
    assert np.std(expected) > 0.1  # every path is live after `randomize`
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-4, atol=2e-4 * np.std(expected))


@pytest.mark.parametrize(
    "spec, filt",
    [
        ({"cin": 8, "cout": 16, "down": True, "attn": True}, (1, 3, 3, 1)),
        ({"cin": 16, "cout": 16, "up": True}, (1, 1)),
        pytest.param({"cin": 24, "cout": 16, "attn": True}, (1, 1), marks=pytest.mark.slow),
        pytest.param({"cin": 16, "cout": 16}, (1, 3, 3, 1), marks=pytest.mark.slow),
    ],
)
def test_unet_block_matches_numpy_edm(spec, filt):
    block = random_model(
        UNetBlock,
        spec["cin"],
        spec["cout"],
        12,
        up=spec.get("up", False),
        down=spec.get("down", False),
        attention=spec.get("attn", False),
        resample_filter=filt,
        seed=4,
    )
    assert (block.skip is not None) == (
        spec["cin"] != spec["cout"] or "up" in spec or "down" in spec
    )
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 8, spec["cin"])).astype(np.float32)
    emb = rng.standard_normal((2, 12)).astype(np.float32)
    out = nnx.jit(lambda b, x, e: b(x, e))(block, x, emb)
    expected = np_block(
        x.transpose(0, 3, 1, 2).astype(np.float64),
        emb.astype(np.float64),
        np_params(block),
        "",
        spec,
        filt,
    )
    np.testing.assert_allclose(
        np.asarray(out), expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4
    )


# ------------------------------------------------------------------------- resampling filters


class ResampleTest(chex.TestCase):
    def _x(self, c=3, r=8):
        return np.random.default_rng(0).standard_normal((2, r, r, c)).astype(np.float32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_box_down_is_2x2_average_pooling(self):
        x = self._x()
        down = Conv2d(3, 3, 0, down=True, resample_filter=(1, 1), rngs=nnx.Rngs(0))
        got = self.variant(lambda v: down(v))(x)
        pooled = x.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
        np.testing.assert_allclose(got, pooled, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_box_up_is_nearest_neighbour(self):
        x = self._x()
        up = Conv2d(3, 3, 0, up=True, resample_filter=(1, 1), rngs=nnx.Rngs(0))
        got = self.variant(lambda v: up(v))(x)
        np.testing.assert_allclose(got, x.repeat(2, axis=1).repeat(2, axis=2), rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fir_1331_down_and_up_match_torch_definitions(self):
        x = self._x()
        f = np_fir((1, 3, 3, 1))
        np.testing.assert_array_equal(f.sum(), 1.0)  # exact: entries are k / 64
        x_nchw = x.transpose(0, 3, 1, 2).astype(np.float64)
        for kw, ref in (
            ({"down": True}, np_fir_down(x_nchw, f, 1)),
            ({"up": True}, np_fir_up(x_nchw, f, 1)),
        ):
            conv = Conv2d(3, 3, 0, resample_filter=(1, 3, 3, 1), rngs=nnx.Rngs(0), **kw)
            got = self.variant(lambda v, conv=conv: conv(v))(x)
            np.testing.assert_allclose(got, ref.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fir_up_preserves_constants(self):
        # Interior pixels of an upsampled constant stay constant (gain 4 on a 4x-sparse grid).
        up = Conv2d(1, 1, 0, up=True, resample_filter=(1, 3, 3, 1), rngs=nnx.Rngs(0))
        got = self.variant(lambda v: up(v))(np.full((1, 6, 6, 1), 2.5, np.float32))
        np.testing.assert_allclose(got[0, 1:-1, 1:-1, 0], 2.5, rtol=1e-6, atol=5e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fused_down_conv_runs_before_the_filter(self):
        conv = random_model(
            Conv2d, 3, 5, 3, down=True, fused_resample=True, resample_filter=(1, 3, 3, 1)
        )
        x = self._x()
        P = np_params(conv)
        w = P["kernel"].transpose(3, 2, 0, 1)
        ref = (
            np_fir_down(
                np_conv_nchw(x.transpose(0, 3, 1, 2).astype(np.float64), w, 2),
                np_fir((1, 3, 3, 1)),
                0,
            )
            + P["bias"][None, :, None, None]
        )
        got = self.variant(lambda v: conv(v))(x)
        assert got.shape == (2, 4, 4, 5)
        np.testing.assert_allclose(got, ref.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ embeddings


class EmbeddingTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_positional_embedding_endpoint(self):
        x = np.array([0.0, 0.3, -2.5, 100.0], np.float32)
        got = self.variant(lambda v: positional_embedding(v, 8, endpoint=True))(x)
        # endpoint=True: frequencies run from 1 down to exactly 1/10000.
        omega = np.array([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
        arg = x[:, None].astype(np.float64) * omega
        np.testing.assert_allclose(
            got, np.concatenate([np.cos(arg), np.sin(arg)], 1), rtol=1e-5, atol=2e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_positional_embedding_no_endpoint(self):
        x = np.array([0.7, 3.0], np.float32)
        got = self.variant(lambda v: positional_embedding(v, 6))(x)
        omega = 10000.0 ** (-np.arange(3) / 3)
        arg = x[:, None].astype(np.float64) * omega
        np.testing.assert_allclose(
            got, np.concatenate([np.cos(arg), np.sin(arg)], 1), rtol=1e-5, atol=2e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_fourier_embedding(self):
        freqs = np.array([0.5, -3.0, 16.0], np.float32)
        x = np.array([0.01, -0.2], np.float32)
        got = self.variant(fourier_embedding)(x, freqs)
        arg = 2 * np.pi * np.outer(x, freqs).astype(np.float64)
        np.testing.assert_allclose(
            got, np.concatenate([np.cos(arg), np.sin(arg)], 1), rtol=1e-5, atol=2e-5
        )


@pytest.mark.parametrize("embedding_type, mult", [("positional", 1), ("fourier", 2)])
def test_mapping_network_matches_numpy(embedding_type, mult):
    cfg = {**TINY, "embedding_type": embedding_type, "channel_mult_noise": mult}
    model = random_model(**cfg)
    _, noise, labels, augment = _inputs(cfg, batch=3)
    expected = np_embedding(noise.astype(np.float64), labels, augment, np_params(model), cfg)
    # Fourier arguments 2 pi f noise reach ~300 here: float32 rounds them by up to ~3e-5.
    np.testing.assert_allclose(
        model.embedding(noise, labels, augment),
        expected,
        rtol=1e-5,
        atol=1e-5 if embedding_type == "positional" else 5e-5,
    )


def test_label_dropout_zeroes_whole_label_vectors():
    model = random_model(**{**TINY, "label_dropout": 0.5})
    _, noise, labels, augment = _inputs(TINY, batch=64)
    model.eval()  # label dropout off
    kept = np.asarray(model.embedding(noise, labels, augment))
    dropped = np.asarray(model.embedding(noise, np.zeros_like(labels), augment))
    model.train()
    got = np.asarray(model.embedding(noise, labels, augment, rngs=nnx.Rngs(dropout=0)))
    is_kept = np.all(np.isclose(got, kept, rtol=1e-6, atol=1e-6), axis=1)
    is_dropped = np.all(np.isclose(got, dropped, rtol=1e-6, atol=1e-6), axis=1)
    assert np.all(is_kept ^ is_dropped)  # each example: its label or no label, nothing else
    assert 16 <= is_dropped.sum() <= 48  # Binomial(64, 0.5)
    again = np.asarray(model.embedding(noise, labels, augment, rngs=nnx.Rngs(dropout=0)))
    np.testing.assert_array_equal(got, again)
    with pytest.raises(ValueError, match=r"label_dropout=0.5 in training mode needs rngs"):
        model.embedding(noise, labels, augment)


# ------------------------------------------------------------------------- norm and init


def test_group_norm_groups_and_eps():
    for c, groups in ((8, 2), (48, 12), (256, 32), (384, 32)):
        assert GroupNorm(c, eps=1e-6).num_groups == groups
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 8)).astype(np.float32) * 3 + 1
    gn = randomize(GroupNorm(8, eps=1e-6))
    ref = np_group_norm(x.transpose(0, 3, 1, 2).astype(np.float64), np_params(gn), "")
    np.testing.assert_allclose(gn(x), ref.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="GroupNorm: num_channels=3 must be >= 4"):
        GroupNorm(3)


def _xavier_bound(shape):
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return math.sqrt(6 / (shape[-2] * receptive + shape[-1] * receptive))


@pytest.mark.slow
def test_edm_init_distributions():
    # The smallest model with every kind of layer; a real (not eval_shape) initialisation.
    cfg = {
        "img_resolution": 8,
        "in_channels": 3,
        "out_channels": 3,
        "label_dim": 2,
        "augment_dim": 2,
        "model_channels": 16,
        "channel_mult": (1,),
        "num_blocks": 1,
        "attn_resolutions": (8,),
        "embedding_type": "fourier",
        "channel_mult_noise": 64,
    }
    model = SongUNet(**cfg, rngs=nnx.Rngs(0))
    P = np_params(model)
    gains = {
        "conv1/kernel": 1e-5,
        "proj/kernel": 1e-5,
        "aux_conv/kernel": 1e-5,
        "qkv/kernel": math.sqrt(0.2),
    }
    for name, w in P.items():
        if name.endswith("kernel"):
            gain = next((g for suffix, g in gains.items() if name.endswith(suffix)), 1.0)
            bound = gain * _xavier_bound(w.shape)
            assert np.abs(w).max() <= bound * (1 + 1e-6), name
            if w.size >= 2000:  # uniform on [-bound, bound]: std bound / sqrt(3)
                assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.1, (name, w.std(), bound)
        elif name.endswith("bias"):
            assert not w.any(), name
        elif name.endswith("scale"):
            assert (w == 1).all(), name
    # NCSN++'s Fourier frequencies: a fixed N(0, 16^2) buffer, not a parameter.
    freqs = P["map_noise/freqs"]
    assert freqs.shape == (16 * 64 // 2,)
    assert isinstance(model.map_noise["freqs"], songunet.Buffer)
    assert not isinstance(model.map_noise["freqs"], nnx.Param)
    assert 14.5 < freqs.std() < 17.5 and abs(freqs.mean()) < 2.5
    # The initial F is tiny (1e-5 output conv) but not exactly zero as with init_weight=0.
    model.eval()
    x, noise, labels, augment = _inputs(cfg)
    out = np.asarray(apply(model, x, noise, labels, augment))
    assert 0 < np.abs(out).max() < 1e-3


# ----------------------------------------------------------------- dropout, labels, dtype, jit


@pytest.fixture(scope="module")
def tiny():
    """A randomized TINY model (DDPM++-like) and its inputs, shared to compile once."""
    model = random_model(**TINY)
    return model, _inputs(TINY)


def test_dropout_keys_come_from_call_time_rngs(tiny):
    model, (x, noise, labels, augment) = tiny
    model.train()
    run = lambda k: np.asarray(apply(model, x, noise, labels, augment, jax.random.key(k)))
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    assert not jax.tree.leaves(nnx.state(model, nnx.RngState))  # the module holds no RNG state
    with pytest.raises(ValueError, match="no `rngs` argument was provided to Dropout"):
        apply(model, x, noise, labels, augment)
    model.eval()
    try:
        e1 = np.asarray(apply(model, x, noise, labels, augment))
        e2 = np.asarray(apply(model, x, noise, labels, augment, jax.random.key(5)))
    finally:
        model.train()
    np.testing.assert_array_equal(e1, e2)
    assert np.abs(e1 - a).max() > 1e-3


def test_class_and_augment_labels_condition_the_output(tiny):
    model, (x, noise, labels, augment) = tiny
    model.eval()
    try:
        out = np.asarray(apply(model, x, noise, labels, augment))
        other = np.asarray(apply(model, x, noise, np.roll(labels, 1, axis=1), augment))
        no_aug = np.asarray(apply(model, x, noise, labels, np.zeros_like(augment)))
        # augment_labels=None means "no augmentation", i.e. the same embedding as zeros.
        np.testing.assert_allclose(
            model.embedding(noise, labels, None),
            model.embedding(noise, labels, np.zeros_like(augment)),
            rtol=1e-6,
            atol=5e-6,
        )
    finally:
        model.train()
    assert np.abs(out - other).max() > 1e-2
    assert np.abs(out - no_aug).max() > 1e-2


def test_bfloat16_compute(tiny):
    model, (x, noise, labels, augment) = tiny
    model.eval()
    model16 = nnx.clone(model)
    model16.dtype = jnp.bfloat16
    try:
        ref = np.asarray(apply(model, x, noise, labels, augment))
        out = apply(model16, x, noise, labels, augment)
    finally:
        model.train()
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05, err


def test_split_merge_round_trip_keeps_forward_order(tiny):
    # nnx.split/merge rebuild nnx.Dicts with sorted keys ('16x16_...' before '8x8_...'), so the
    # forward order must survive apart from them; `apply` (used by every forward test here) runs
    # the merged copy under plain jax.jit, as the trainer does.
    model, (x, noise, labels, augment) = tiny
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.jit(lambda p: p)(params)
    merged = nnx.merge(graphdef, params, rest)
    assert merged.enc_order == model.enc_order and merged.dec_order == model.dec_order
    assert list(merged.enc.keys()) != list(merged.enc_order)  # the reason for enc_order
    assert named_leaves(nnx.state(merged)).keys() == named_leaves(nnx.state(model)).keys()
    key = jax.random.key(7)
    np.testing.assert_array_equal(
        apply(merged, x, noise, labels, augment, key), apply(model, x, noise, labels, augment, key)
    )


@pytest.mark.slow
def test_gradients_reach_every_parameter(tiny):
    model, (x, noise, labels, augment) = tiny
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = jax.random.key(7)
    loss = lambda p: jnp.sum(_apply(graphdef, p, rest, x, noise, labels, augment, key) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    zero = [k for k, g in named_leaves(grads).items() if not np.abs(np.asarray(g)).max() > 0]
    assert not zero, zero


# -------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise(tiny):
    model, (x, noise, labels, augment) = tiny
    with pytest.raises(
        ValueError, match=r"x: expected NHWC shape \(B, 8, 8, 3\), got \(2, 3, 8, 8\)"
    ):
        model(x.transpose(0, 3, 1, 2), noise, labels)
    with pytest.raises(ValueError, match=r"noise_labels: expected shape \(2,\), got \(2, 1\)"):
        model(x, noise[:, None], labels)
    with pytest.raises(
        ValueError, match=r"class_labels: expected shape \(2, 3\) for label_dim=3, got None"
    ):
        model(x, noise)
    with pytest.raises(ValueError, match=r"class_labels: expected shape \(2, 3\), got \(2,\)"):
        model(x, noise, labels.argmax(1))
    with pytest.raises(ValueError, match=r"augment_labels: expected shape \(2, 2\), got \(2, 9\)"):
        model(x, noise, labels, np.zeros((2, 9), np.float32))
    uncond = random_model(**{**TINY, "label_dim": 0, "augment_dim": 0})
    with pytest.raises(ValueError, match=r"augment_labels: the model was built with augment_dim=0"):
        uncond(x, noise, None, augment)
    with pytest.raises(ValueError, match=r"class_labels: the model was built with label_dim=0"):
        uncond(x, noise, labels)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (
            {"embedding_type": "sinusoidal"},
            r"embedding_type: expected one of \('positional', 'fourier'\), got 'sinusoidal'",
        ),
        (
            {"encoder_type": "progressive"},
            r"encoder_type: expected one of \('standard', 'skip', 'residual'\)",
        ),
        (
            {"decoder_type": "residual"},
            r"decoder_type: expected one of \('standard', 'skip'\), got 'residual'",
        ),
        (
            {"img_resolution": 10, "channel_mult": (1, 2, 2)},
            r"img_resolution=10 must be divisible by 2\*\*\(len\(channel_mult\) - 1\) = 4",
        ),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"resample_filter": ()}, r"resample_filter: expected a 1-D filter"),
    ],
)
def test_bad_config_raises(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SongUNet(**{**TINY, **kw}, rngs=nnx.Rngs(0))


def test_preset_rejects_unknown_override():
    with pytest.raises(ValueError, match=r"unknown SongUNet argument\(s\) \['channels'\]"):
        ddpmpp_cifar10(channels=64, rngs=nnx.Rngs(0))


def test_presets_follow_edm_train_py():
    for name, (make, cfg) in PRESETS.items():
        params = inspect.signature(make).parameters
        dropout = 0.13 if "cifar" in name else 0.05
        assert params["dropout"].default == dropout and params["augment_dim"].default == 9
        assert params["label_dim"].default == 0


# ------------------------------------------------------------------------------------ sharding


def _first_rule(name):
    import re

    return next(
        (spec for pattern, spec in SONGUNET_SHARDING_RULES if re.search(pattern, name)), None
    )


def test_sharding_rules_cover_every_leaf():
    for cfg in (
        {**TINY, "encoder_type": "skip", "decoder_type": "skip"},
        {**TINY, "embedding_type": "fourier", "encoder_type": "residual"},
    ):
        model = nnx.eval_shape(lambda cfg=cfg: SongUNet(**cfg, rngs=nnx.Rngs(0)))
        names = named_leaves(nnx.state(model))
        assert any(n == "map_noise/freqs" for n in names) == (cfg["embedding_type"] == "fourier")
        for name in names:
            expected = "fsdp" if name.endswith("/kernel") else "replicate"
            assert _first_rule(name) == expected, name


@pytest.mark.slow
def test_fsdp_sharding_on_8_devices():
    run_snippet("""
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jax.sharding import NamedSharding
        from jaxsafe.parallel import make_mesh, shardings_for
        from jaxsafe.treepath import named_leaves, path_name
        from jaxsafe.nn.songunet import SONGUNET_SHARDING_RULES, SongUNet, ncsnpp_cifar10
        assert jax.device_count() == 8
        mesh = make_mesh(data=1, fsdp=8)

        # The full NCSN++ CIFAR-10 model (shapes only): every large kernel is split over fsdp.
        abstract = nnx.state(nnx.eval_shape(lambda: ncsnpp_cifar10(label_dim=10, rngs=nnx.Rngs(0))))
        specs = named_leaves(shardings_for(abstract, mesh, SONGUNET_SHARDING_RULES),
                             is_leaf=lambda s: isinstance(s, NamedSharding))
        shapes = {k: v.shape for k, v in named_leaves(abstract).items()}
        assert specs.keys() == shapes.keys()
        sharded = {k for k, s in specs.items() if "fsdp" in tuple(s.spec)}
        big = {k for k in shapes if k.endswith("/kernel") and np.prod(shapes[k]) >= 2**14}
        assert big <= sharded
        assert all(k.endswith("/kernel") for k in sharded)
        # (3, 3, 256, 256): the first of the two largest dimensions.
        assert tuple(specs["enc/16x16_block1/conv0/kernel"].spec) == (None, None, "fsdp", None)
        assert tuple(specs["enc/16x16_block1/norm0/scale"].spec) == ()
        assert tuple(specs["map_noise/freqs"].spec) == ()
        frac = sum(np.prod(shapes[k]) for k in sharded) / sum(np.prod(s) for s in shapes.values())
        assert frac > 0.998, frac  # the rest: GroupNorm and bias vectors

        # A tiny model run with fsdp-sharded parameters equals the single-device result.
        model = nnx.eval_shape(lambda: SongUNet(
            8, 3, 3, label_dim=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
            attn_resolutions=(4,), embedding_type="fourier", channel_mult_noise=2,
            encoder_type="residual", resample_filter=(1, 3, 3, 1), rngs=nnx.Rngs(0)))
        model.eval()
        graphdef, state = nnx.split(model)
        rng = np.random.default_rng(0)
        state = jax.tree.map(
            lambda v: jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype), state)
        x = rng.standard_normal((8, 8, 8, 3)).astype(np.float32)
        noise = rng.standard_normal(8).astype(np.float32)
        y = np.eye(3, dtype=np.float32)[rng.integers(3, size=8)]
        apply = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
        ref = np.asarray(apply(state, x, noise, y))
        shard = shardings_for(state, mesh, SONGUNET_SHARDING_RULES, min_size=256)
        placed = jax.device_put(state, shard)
        kernels = [v for k, v in named_leaves(placed).items() if k.endswith("conv0/kernel")]
        assert any(
            len(v.sharding.device_set) == 8 and not v.sharding.is_fully_replicated
            for v in kernels)
        got = np.asarray(apply(placed, x, noise, y))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    """)
