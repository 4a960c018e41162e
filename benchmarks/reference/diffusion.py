"""PFGM++ / EDM's DDPM++ training step and Heun sampler in PyTorch, after the authors' code.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (NeurIPS 2022),
``NVlabs/edm``: ``training/networks.py`` (``SongUNet`` with the DDPM++ settings, ``EDMPrecond``),
``training/training_loop.py`` (Adam, learning-rate ramp-up, ``nan_to_num`` on the gradients, EMA
with a half-life in images), ``generate.py::edm_sampler`` (Heun, ``S_churn = 0``); Xu et al.,
"PFGM++" (ICML 2023), ``Newbeeer/pfgmpp`` ``training/loss.py`` (the perturbation drawn with
radius ``r = sigma sqrt(D)``: ``|n| = r sqrt(B / (1 - B))``, ``B ~ Beta(N/2, D/2)``, a uniform
direction), whose sampler is EDM's with the prior drawn the same way at ``sigma_max``.

Only what DDPM++ uses is written out (positional noise embedding, standard encoder and decoder,
the (1, 1) resampling filter); other SongUNet settings raise. Parameter names are EDM's, which
are jaxsafe's with ``.`` for ``/`` (``enc.32x32_block0.conv0.weight``), so jaxsafe's weights load
with ``jaxsafe.weights.convert.params_to_state_dict``.
"""

import math

import numpy as np


def _torch():
    import torch

    return torch


class _Modules:
    """The network's modules, built on first use so that importing this file needs no torch."""

    def __init__(self):
        torch = _torch()
        nn, F = torch.nn, torch.nn.functional

        class Conv2d(nn.Module):
            def __init__(self, cin, cout, kernel, *, up=False, down=False):
                super().__init__()
                self.up, self.down, self.out_channels = up, down, cout
                # Random weights: the speed does not depend on them, the tests load jaxsafe's.
                self.weight = (
                    nn.Parameter(torch.randn(cout, cin, kernel, kernel) * 0.05) if kernel else None
                )
                self.bias = nn.Parameter(torch.zeros(cout)) if kernel else None
                f = torch.ones(2, 2) / 4  # the (1, 1) filter f f^T / (sum f)^2
                self.register_buffer("f", f, persistent=False)

            def forward(self, x):
                c = x.shape[1]
                if self.up:
                    x = F.conv_transpose2d(x, (4 * self.f).tile(c, 1, 1, 1), groups=c, stride=2)
                if self.down:
                    x = F.conv2d(x, self.f.tile(c, 1, 1, 1), groups=c, stride=2)
                if self.weight is not None:
                    x = F.conv2d(
                        x, self.weight, padding=self.weight.shape[-1] // 2
                    ) + self.bias.reshape(1, -1, 1, 1)
                return x

        class GroupNorm(nn.Module):
            def __init__(self, c, eps=1e-6):
                super().__init__()
                self.groups, self.eps = min(32, c // 4), eps
                self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

            def forward(self, x):
                return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)

        class UNetBlock(nn.Module):
            def __init__(
                self, cin, cout, emb, *, up=False, down=False, attention=False, dropout=0.0
            ):
                super().__init__()
                self.in_channels, self.out_channels = cin, cout
                self.norm0 = GroupNorm(cin)
                self.conv0 = Conv2d(cin, cout, 3, up=up, down=down)
                self.affine = nn.Linear(emb, cout)
                self.norm1 = GroupNorm(cout)
                self.dropout = nn.Dropout(dropout)
                self.conv1 = Conv2d(cout, cout, 3)
                self.skip = (
                    Conv2d(cin, cout, 1, up=up, down=down) if cout != cin or up or down else None
                )
                self.attention = attention
                if attention:
                    self.norm2 = GroupNorm(cout)
                    self.qkv = Conv2d(cout, 3 * cout, 1)
                    self.proj = Conv2d(cout, cout, 1)

            def forward(self, x, emb):
                orig = x
                x = self.conv0(F.silu(self.norm0(x)))
                x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None]))
                x = self.conv1(self.dropout(x))
                x = (x + (orig if self.skip is None else self.skip(orig))) * math.sqrt(0.5)
                if self.attention:  # one head; softmax(q^T k / sqrt(C)) in float32 (AttentionOp)
                    n, c, h, w = x.shape
                    q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, h * w).unbind(2)
                    a = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(c))
                    a = torch.einsum("nqk,nck->ncq", a.softmax(2).to(v.dtype), v)
                    x = (self.proj(a.reshape(n, c, h, w)) + x) * math.sqrt(0.5)
                return x

        class SongUNet(nn.Module):
            def __init__(
                self,
                img_resolution,
                in_channels,
                out_channels,
                *,
                model_channels,
                channel_mult,
                channel_mult_emb,
                num_blocks,
                attn_resolutions,
                dropout,
                channel_mult_noise=1,
                embedding_type="positional",
                encoder_type="standard",
                decoder_type="standard",
                resample_filter=(1, 1),
                label_dim=0,
                augment_dim=0,
                **unused,
            ):
                super().__init__()
                settings = (
                    embedding_type,
                    encoder_type,
                    decoder_type,
                    tuple(resample_filter),
                    label_dim,
                    augment_dim,
                )
                if settings != ("positional", "standard", "standard", (1, 1), 0, 0):
                    raise ValueError(
                        f"the PyTorch reference is DDPM++ (positional, standard, "
                        f"standard, (1, 1), unconditional), got {settings}"
                    )
                self.noise_channels = model_channels * channel_mult_noise
                emb = model_channels * channel_mult_emb
                self.map_layer0 = nn.Linear(self.noise_channels, emb)
                self.map_layer1 = nn.Linear(emb, emb)
                block = {"emb": emb, "dropout": dropout}
                self.enc = nn.ModuleDict()
                cout = in_channels
                for level, mult in enumerate(channel_mult):
                    res = img_resolution >> level
                    if level == 0:
                        self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                        cout = model_channels
                    else:
                        self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                    for i in range(num_blocks):
                        cin, cout = cout, model_channels * mult
                        self.enc[f"{res}x{res}_block{i}"] = UNetBlock(
                            cin, cout, attention=res in attn_resolutions, **block
                        )
                skips = [b.out_channels for b in self.enc.values()]
                self.dec = nn.ModuleDict()
                for level, mult in reversed(list(enumerate(channel_mult))):
                    res = img_resolution >> level
                    if level == len(channel_mult) - 1:
                        self.dec[f"{res}x{res}_in0"] = UNetBlock(
                            cout, cout, attention=True, **block
                        )
                        self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
                    else:
                        self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
                    for i in range(num_blocks + 1):
                        cin, cout = cout + skips.pop(), model_channels * mult
                        self.dec[f"{res}x{res}_block{i}"] = UNetBlock(
                            cin,
                            cout,
                            attention=i == num_blocks and res in attn_resolutions,
                            **block,
                        )
                    if level == 0:
                        self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout)
                        self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3)

            def forward(self, x, noise_labels):
                half = self.noise_channels // 2  # PositionalEmbedding(endpoint=True), sin first
                freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32) / (half - 1))
                e = noise_labels.float()[:, None] * freqs[None]
                emb = torch.cat([torch.sin(e), torch.cos(e)], 1)
                emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
                skips = []
                for name, b in self.enc.items():
                    x = b(x) if name.endswith("_conv") else b(x, emb)
                    skips.append(x)
                out = None
                for name, b in self.dec.items():
                    if name.endswith("aux_norm"):
                        out = b(x)
                    elif name.endswith("aux_conv"):
                        out = b(F.silu(out))
                    else:
                        if x.shape[1] != b.in_channels:
                            x = torch.cat([x, skips.pop()], 1)
                        x = b(x, emb)
                return out

        self.SongUNet = SongUNet


def song_unet(**kwargs):
    """EDM's SongUNet (DDPM++ settings) in PyTorch, from jaxsafe's SongUNet keyword arguments."""
    return _Modules().SongUNet(**kwargs)


def denoiser(net, x, sigma, sigma_data=0.5):
    """EDMPrecond: ``D(x) = c_skip x + c_out F(c_in x, ln(sigma) / 4)``."""
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + s**2).sqrt()
    return c_skip * x + c_out * net(c_in * x, sigma.log() / 4)


def pfgmpp_perturbation(sigma, shape, D, rng):
    """The PFGM++ training perturbation for per-example ``sigma`` (``r = sigma sqrt(D)``)."""
    torch = _torch()
    n = int(np.prod(shape[1:]))
    r = sigma.double().numpy() * math.sqrt(D)
    b = np.clip(rng.beta(n / 2.0, D / 2.0, size=shape[0]), 1e-3, 1 - 1e-3)
    norm = r * np.sqrt(b / (1 - b + 1e-8) + 1e-8)
    g = torch.randn(shape[0], n)
    u = g / g.norm(dim=1, keepdim=True)
    return (u * torch.from_numpy(norm).float()[:, None]).reshape(shape)


def make_train_step(
    model_kwargs,
    batch,
    image_shape,
    *,
    D=128.0,
    P_mean=-1.2,
    P_std=1.2,
    sigma_data=0.5,
    lr=1e-3,
    lr_rampup_kimg=10000.0,
    ema_halflife_kimg=500.0,
    ema_rampup_ratio=0.05,
):
    """``(call, net)``: ``call()`` is one training step on a random batch of ``image_shape``
    (H, W, C): the PFGM++ loss (EDM's when ``D = inf``), backward, ``nan_to_num`` on the gradients,
    Adam with the ramped learning rate, the EMA update; it returns the loss."""
    torch = _torch()
    torch.manual_seed(0)
    net = song_unet(**model_kwargs).train()
    ema = song_unet(**model_kwargs).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    h, w, c = image_shape
    images = torch.rand(batch, c, h, w) * 2 - 1
    rng = np.random.default_rng(0)
    state = {"nimg": 0}

    def call():
        sigma = (torch.randn(batch) * P_std + P_mean).exp()
        if math.isinf(D):
            n = torch.randn_like(images) * sigma.reshape(-1, 1, 1, 1)
        else:
            n = pfgmpp_perturbation(sigma, images.shape, D, rng)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        loss = (
            weight.reshape(-1, 1, 1, 1)
            * (denoiser(net, images + n, sigma, sigma_data) - images) ** 2
        )
        opt.zero_grad(set_to_none=True)
        loss.sum().mul(1 / batch).backward()
        state["nimg"] += batch
        for g in opt.param_groups:
            g["lr"] = lr * min(state["nimg"] / max(lr_rampup_kimg * 1000, 1e-8), 1)
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        halflife = min(ema_halflife_kimg * 1000, state["nimg"] * ema_rampup_ratio)
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
        return float(loss.detach().mean())

    return call, net


def heun_steps(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's time steps ``(s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, then
    0."""
    i = np.arange(num_steps, dtype=np.float64)
    t = (
        sigma_max ** (1 / rho)
        + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    return np.append(t, 0.0)


def make_sampler(net, batch, image_shape, *, D=128.0, sigma_data=0.5, **steps):
    """``call()``: EDM's deterministic Heun sampler (``2 N - 1`` network evaluations) from the
    PFGM++ prior at ``sigma_max`` (Gaussian for ``D = inf``), under ``no_grad``."""
    torch = _torch()
    t_steps = heun_steps(**steps)
    h, w, c = image_shape
    shape = (batch, c, h, w)
    rng = np.random.default_rng(0)
    net = net.eval()

    def call():
        with torch.no_grad():
            s_max = torch.full((batch,), float(t_steps[0]))
            x = (
                torch.randn(shape) * s_max[0]
                if math.isinf(D)
                else pfgmpp_perturbation(s_max, shape, D, rng)
            )
            for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
                d = (x - denoiser(net, x, torch.full((batch,), t_cur), sigma_data)) / t_cur
                x_next = x + (t_next - t_cur) * d
                if i < len(t_steps) - 2:
                    d2 = (
                        x_next - denoiser(net, x_next, torch.full((batch,), t_next), sigma_data)
                    ) / t_next
                    x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
                x = x_next
            return x

    return call
