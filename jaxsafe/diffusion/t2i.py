r"""Text-to-image sampling with classifier-free guidance, the whole denoising loop compiled once.

Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", NeurIPS 2021
workshop, eq. 6, with diffusers' / Stable Diffusion's scale s = 1 + w):

.. math::

    \tilde\epsilon(x_t, c) = \epsilon(x_t, \varnothing)
        + s\,\bigl(\epsilon(x_t, c) - \epsilon(x_t, \varnothing)\bigr),

applied to whatever the UNet predicts (ε or v), as diffusers' ``StableDiffusionPipeline``. s = 1
is the conditional model alone (only the conditional half runs); a negative prompt's embedding
takes the place of ∅ (diffusers' ``negative_prompt``). Deviation: diffusers turns guidance off
for every s ≤ 1; here s < 1 is applied as written. Sample b starts from x_T ~ N(0, I) drawn with
``jax.random.key(seeds[b])`` (its DDPM / DDIM-η noise too), so an image depends only on its seed
and prompts, not on its batch (nor is it diffusers' image for that seed: diffusers draws torch
noise). The returned function is one ``jax.jit`` program: seeds → noise →
``schedulers.sample_loop`` (a ``lax.scan``, one batched [uncond; cond] UNet call per step) →
optional decode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsafe import parallel
from jaxsafe.diffusion import schedulers

__all__ = [
    "classifier_free_guidance",
    "composed_guidance",
    "initial_noise",
    "make_decode",
    "make_generator",
    "make_t2i_sampler",
]

# Stable Diffusion 1.x's VAE latent scale (AutoencoderKL config `scaling_factor`).
SD_SCALING_FACTOR = 0.18215


def classifier_free_guidance(eps_uncond, eps_cond, scale):
    """ε̃ = ε_∅ + s (ε_c − ε_∅)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def composed_guidance(eps_uncond, eps_conds, weights):
    """ε̃ = ε_∅ + Σ_j w_j (ε_{c_j} − ε_∅) (composable diffusion, Liu et al., ECCV 2022; concept
    arithmetic, Petsiuk & Saenko, ECCV 2024, eq. 2): ``eps_conds`` (J, B, ...), ``weights``
    (B, J). Weights (s, 0, …, 0) are classifier-free guidance with the first prompt."""
    w = jnp.moveaxis(jnp.asarray(weights, eps_uncond.dtype), -1, 0)
    w = w.reshape(w.shape + (1,) * (eps_uncond.ndim - 1))
    return eps_uncond + jnp.sum(w * (eps_conds - eps_uncond[None]), axis=0)


def _seed_keys(seeds):
    """(init, steps) keys per sample: one for x_T, one for the sampler's noise."""
    keys = jax.vmap(jax.random.key)(seeds)
    both = jax.vmap(jax.random.split)(keys)
    return both[:, 0], both[:, 1]


def initial_noise(seeds, latent_shape: Sequence[int], dtype=jnp.float32):
    """x_T ~ N(0, I) of shape (B, *latent_shape), sample b drawn from `seeds[b]` alone."""
    k_init, _ = _seed_keys(jnp.asarray(seeds))
    return jax.vmap(lambda k: jax.random.normal(k, tuple(latent_shape), dtype))(k_init)


def make_decode(vae_decode: Callable, scaling_factor: float = SD_SCALING_FACTOR):
    """decode(params, latents) = clip(vae_decode(params, latents / scaling_factor) / 2 + 1/2, 0, 1):
    the VAE's [−1, 1] output as images in [0, 1] (diffusers' VaeImageProcessor.postprocess)."""
    if not scaling_factor > 0:
        raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}.")

    def decode(params, latents):
        return jnp.clip(vae_decode(params, latents / scaling_factor) / 2 + 0.5, 0.0, 1.0)

    return decode


def _check_inputs(cond_emb, uncond_emb, seeds, weights=None):
    if weights is None and cond_emb.ndim != 3:
        raise ValueError(f"cond_emb must be (B, L, D), got shape {cond_emb.shape}.")
    if weights is not None and (cond_emb.ndim != 4 or weights.shape != cond_emb.shape[:2]):
        raise ValueError(
            f"with weights, cond_emb must be (B, J, L, D) and weights (B, J), got "
            f"{cond_emb.shape} and {weights.shape}."
        )
    b = cond_emb.shape[0]
    if (
        uncond_emb.ndim != 3
        or uncond_emb.shape[0] not in (1, b)
        or uncond_emb.shape[1:] != cond_emb.shape[-2:]
    ):
        raise ValueError(
            f"uncond_emb must be (B, L, D) or (1, L, D) with (L, D) = "
            f"{cond_emb.shape[-2:]} as cond_emb, got shape {uncond_emb.shape}."
        )
    if seeds.shape != (b,) or not jnp.issubdtype(seeds.dtype, jnp.integer):
        raise ValueError(
            f"seeds must be an integer array of shape ({b},) (one per prompt), "
            f"got {seeds.dtype} {seeds.shape}."
        )


def make_t2i_sampler(
    unet_apply: Callable,
    scheduler_config: schedulers.SchedulerConfig,
    *,
    kind: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    latent_shape: Sequence[int] = (64, 64, 4),
    decode: Callable | None = None,
    eta: float = 0.0,
):
    """A jitted `sample(params, cond_emb, uncond_emb, seeds) -> images or latents`.

    The sampler's arguments: `params` (passed through to unet_apply and decode), `cond_emb`
    (B, L, D) prompt embeddings, `uncond_emb` (B, L, D) or (1, L, D) negative-prompt (or empty
    prompt) embeddings, `seeds` (B,) integers, and optionally `x_T` (B, H, W, C), the starting
    latents in place of the seeds' noise (One More Step's output, `jaxsafe.diffusion.oms`; the
    loop scales them by `init_noise_sigma` as diffusers does with a pipeline's `latents=`), and
    `weights` (B, J) with `cond_emb` (B, J, L, D): J prompts composed per sample,
    ε̃ = ε_∅ + Σ_j w_j (ε_j − ε_∅) (:func:`composed_guidance`; `guidance_scale` is then unused).

    Args:
      unet_apply: `unet_apply(params, x, t, emb) -> model_output` with x NHWC latents (the
        scheduler's scaled model input), t (B,) timesteps (int32; float32 for Euler) and emb the
        text embeddings (B, L, D).
      scheduler_config: the `schedulers.SchedulerConfig` of the model (prediction type etc.).
      kind: 'ddim', 'ddpm' or 'euler'.
      num_inference_steps: N denoising steps.
      guidance_scale: s of classifier-free guidance (7.5: diffusers' Stable Diffusion default).
      latent_shape: (H, W, C) of one latent (SD 1.x at 512²: (64, 64, 4)).
      decode: optional `decode(params, latents) -> images` (e.g. `make_decode(vae_decode)`);
        without it the final latents are returned.
      eta: DDIM's η (0: deterministic DDIM).
    """
    if kind not in schedulers.KINDS:
        raise ValueError(f"kind must be one of {schedulers.KINDS}, got {kind!r}.")
    schedulers.timesteps(scheduler_config, num_inference_steps)  # validates N against the config
    latent_shape = tuple(latent_shape)
    if len(latent_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in latent_shape):
        raise ValueError(f"latent_shape must be (H, W, C) of positive ints, got {latent_shape}.")
    guided = guidance_scale != 1
    stochastic = kind == "ddpm" or (kind == "ddim" and eta != 0)

    def sample(params, cond_emb, uncond_emb, seeds, x_T=None, weights=None):
        cond_emb, uncond_emb = jnp.asarray(cond_emb), jnp.asarray(uncond_emb)
        seeds = jnp.asarray(seeds)
        weights = None if weights is None else jnp.asarray(weights)
        _check_inputs(cond_emb, uncond_emb, seeds, weights)
        b = cond_emb.shape[0]
        # Composed: the J prompts side by side, prompt-major, after the unconditional half.
        conds = (
            cond_emb
            if weights is None
            else jnp.swapaxes(cond_emb, 0, 1).reshape((-1,) + cond_emb.shape[2:])
        )
        copies = conds.shape[0] // b + 1  # network evaluations per sample and step (guided)
        uncond_emb = jnp.broadcast_to(uncond_emb, (b,) + conds.shape[1:]).astype(conds.dtype)
        emb = jnp.concatenate([uncond_emb, conds]) if guided or weights is not None else conds

        def denoise(x, t):
            if not guided and weights is None:
                return unet_apply(params, x, jnp.full((b,), t), emb)
            x_in = jnp.concatenate([x] * copies)
            out = unet_apply(params, x_in, jnp.full((x_in.shape[0],), t), emb)
            if weights is None:
                return classifier_free_guidance(out[:b], out[b:], guidance_scale)
            return composed_guidance(
                out[:b], out[b:].reshape((copies - 1, b) + out.shape[1:]), weights
            )

        _, k_steps = _seed_keys(seeds)
        if x_T is None:
            x_T = initial_noise(seeds, latent_shape)
        elif x_T.shape != (b, *latent_shape):
            raise ValueError(f"x_T: expected shape {(b, *latent_shape)}, got {x_T.shape}")
        latents = schedulers.sample_loop(
            scheduler_config,
            kind,
            denoise,
            x_T,
            num_inference_steps,
            eta=eta,
            rng=k_steps if stochastic else None,
        )
        return latents if decode is None else decode(params, latents)

    return jax.jit(sample)


def check_terms(terms, n: int) -> tuple[list[list[str]], list[float]]:
    """``terms=(texts, weights)`` of a generator checked for ``n`` samples: J lists of n
    prompts and J weights, as lists."""
    texts, weights = terms
    texts, weights = [list(col) for col in texts], [float(w) for w in weights]
    if len(texts) != len(weights) or not texts:
        raise ValueError(
            f"terms: expected J >= 1 prompt lists and J weights, got {len(texts)} "
            f"lists and {len(weights)} weights"
        )
    for col in texts:
        if len(col) != n:
            raise ValueError(f"terms: each list needs one prompt per sample ({n}), got {len(col)}")
    return texts, weights


def make_generator(
    apply: Callable,
    encode: Callable,
    tokenize: Callable,
    scheduler_config: schedulers.SchedulerConfig,
    *,
    latent_shape: Sequence[int],
    decode: Callable | None = None,
    kind: str = "ddim",
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    batch_size: int = 32,
    aux: Callable | None = None,
    negative_prompt: str = "",
    encode_negative: Callable | None = None,
    mesh=None,
):
    """``generate(params, prompts, seeds, negative_prompts=None) -> (n, ...)`` numpy images (or
    latents without ``decode``): prompts to images in compiled batches, the one generator of
    the text-to-image test bed and of every erasure method.

    ``apply(params, x, t, emb)`` is the denoiser, ``encode(params, ids) -> emb`` the text
    encoder, ``tokenize(texts) -> ids`` the tokenizer, ``decode(params, z)`` the latent decoder.
    Classifier-free guidance runs against ``negative_prompt`` (default the empty prompt) or one
    negative prompt per prompt, encoded by ``encode_negative`` (default ``encode``; SAFREE
    encodes its prompts filtered and its negative prompt plain). ``aux(params, ids, emb)``
    gives per-prompt values (e.g. SPM's transport strength), then passed to ``apply`` as a
    fifth argument (B values under guidance, which the unconditional half repeats; with
    ``terms`` one per network row, (2 + J)·B: the prompt's for ∅ and itself, then each
    composed prompt's own). Calls are padded to a multiple of ``batch_size`` (one compiled program);
    with ``mesh`` the batch size is rounded up to a multiple of its batch shards and each
    batch is split over them. Image k depends on (prompts[k], seeds[k], its negative prompt)
    only (:func:`make_t2i_sampler`'s per-sample
    seeds), so padding and batching change nothing. ``x_T`` (one latent per prompt) replaces
    the seeds' starting noise (the seeds still draw DDPM / DDIM-η noise). ``terms=(texts,
    weights)`` composes J more prompts per sample (``texts`` J lists of n prompts, ``weights``
    J numbers): ε̃ = ε_∅ + s (ε_prompt − ε_∅) + Σ_j w_j (ε_j − ε_∅) (concept arithmetic,
    :func:`composed_guidance`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sharding = None
    if mesh is not None:
        shards = parallel.batch_shards(mesh)
        batch_size = -(-batch_size // shards) * shards
        sharding = parallel.batch_sharding(mesh)
    unet = apply if aux is None else (lambda p, x, t, e: apply(p[0], x, t, e, p[1]))
    sampler = make_t2i_sampler(
        unet,
        scheduler_config,
        kind=kind,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        latent_shape=latent_shape,
        decode=None if decode is None else (lambda p, z: decode(p if aux is None else p[0], z)),
    )

    @jax.jit
    def enc(params, ids):
        emb = encode(params, ids)
        return emb, (None if aux is None else aux(params, ids, emb))

    enc_negative = jax.jit(encode if encode_negative is None else encode_negative)

    def put(x):
        # Host arrays: device_put splits them over the mesh's devices directly.
        return jnp.asarray(x) if sharding is None else jax.device_put(np.asarray(x), sharding)

    def generate(params, prompts, seeds, negative_prompts=None, x_T=None, terms=None):
        prompts, seeds = list(prompts), np.asarray(seeds, np.int32).reshape(-1)
        if len(prompts) != len(seeds):
            raise ValueError(
                f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds"
            )
        n, pad = len(prompts), -len(prompts) % batch_size
        if terms is not None:
            extra, weights = check_terms(terms, n)
            weights = np.broadcast_to(
                np.asarray([guidance_scale, *weights], np.float32), (batch_size, 1 + len(weights))
            )
            extra_ids = [np.asarray(tokenize(col + [""] * pad)) for col in extra]
        if x_T is not None:
            x_T = np.asarray(x_T, np.float32)
            if x_T.shape != (n, *latent_shape):
                raise ValueError(
                    f"x_T: expected one latent per prompt, shape "
                    f"{(n, *tuple(latent_shape))}, got {x_T.shape}"
                )
            x_T = np.concatenate([x_T, np.zeros((pad, *x_T.shape[1:]), np.float32)])
        ids = np.asarray(tokenize(prompts + [""] * pad))
        seeds = np.concatenate([seeds, np.zeros(pad, np.int32)])
        if negative_prompts is None:
            neg_ids = None
            uncond = enc_negative(params, jnp.asarray(tokenize([negative_prompt])))
        else:
            negative_prompts = list(negative_prompts)
            if len(negative_prompts) != n:
                raise ValueError(
                    f"one negative prompt per prompt: got {len(negative_prompts)} for {n} prompts"
                )
            neg_ids = np.asarray(tokenize(negative_prompts + [""] * pad))
        out = []
        for i in range(0, n + pad, batch_size):
            rows = slice(i, i + batch_size)
            emb, values = enc(params, put(ids[rows]))
            if neg_ids is not None:
                uncond = enc_negative(params, put(neg_ids[rows]))
            p = params if aux is None else (params, values)
            start = None if x_T is None else put(x_T[rows])
            if terms is None:
                images = sampler(p, emb, uncond, put(seeds[rows]), start)
            else:
                more = [enc(params, put(e[rows])) for e in extra_ids]
                emb = jnp.stack([emb] + [e for e, _ in more], 1)
                if aux is not None:  # one value per network row: [∅ (the prompt's); prompt; terms]
                    p = (params, jnp.concatenate([values, values] + [v for _, v in more]))
                images = sampler(p, emb, uncond, put(seeds[rows]), start, put(weights))
            out.append(np.asarray(parallel.fetch(images)))
        return np.concatenate(out)[:n]

    return generate
