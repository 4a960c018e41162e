r"""One More Step (OMS): one extra sampling step at zero SNR in front of an unchanged sampler.

Hu et al., "One More Step: A Versatile Plug-and-Play Module for Rectifying Diffusion Schedule
Flaws and Enhancing Low-Frequency Controls", CVPR 2024; reference code ``mhh0318/OneMoreStep``
(``diffusers_patch/pipelines/oms/pipeline_oms.py``: ``oms_step`` L216-243, ``__call__``
L561-655). Schedules such as Stable Diffusion's end at ᾱ_T ≈ 0.0047 > 0, so training never shows
the model pure noise while sampling starts from it. OMS is a separate time-free network ψ
(``UNet2DConditionConfig(time_conditioning=False)``) with its own text encoder that predicts v
at a virtual step with ᾱ = 0, where v = −x₀:

.. math::

    \hat v = v_\psi(\tilde x, \varnothing)
        + s\,\bigl(v_\psi(\tilde x, c) - v_\psi(\tilde x, \varnothing)\bigr), \qquad
    x_{\tau_0} = -\sqrt{\bar\alpha_{\tau_0}}\, \hat v + \sigma \xi, \qquad
    \tilde x, \xi \sim \mathcal{N}(0, I),

s OMS's own guidance scale, ᾱ_{τ₀} at the base scheduler's first timestep, ξ fresh; the base
sampler then continues from x_{τ₀} unchanged. x̃ is the seed's starting noise, so runs with and
without OMS start from the same x̃. σ = 1 − ᾱ_{τ₀} in the code (``noise="code"``, the default,
behind the published images); ``noise="paper"`` is the paper's √(1 − ᾱ_{τ₀}). Training (no code
released): E‖v_ψ(ε, c) − (−x₀)‖² over (latent, caption) pairs, ε ~ N(0, I) independent of x₀,
captions dropped with probability p. Decisions and deviations: docs/oms.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsafe.diffusion import schedulers, t2i
from jaxsafe.files import read_json

__all__ = [
    "NOISE_SCALES",
    "OMS",
    "first_alpha_bar",
    "guide",
    "initial_latents",
    "load",
    "loss",
    "save",
    "step",
    "x0_from_v",
]

NOISE_SCALES = ("code", "paper")


def x0_from_v(v):
    """x̂₀ of a v prediction at ᾱ = 0: v = √ᾱ ε − √(1−ᾱ) x₀ = −x₀."""
    return -v


def guide(v_uncond, v_cond, scale: float):
    """OMS's own classifier-free guidance, v_∅ + s (v_c − v_∅) (P:217-219)."""
    return t2i.classifier_free_guidance(v_uncond, v_cond, scale)


def step(x0_hat, alpha_bar_tau0, xi, *, noise: str = "code"):
    """x_{τ₀} = √ᾱ_{τ₀} x̂₀ + σ ξ, σ = 1 − ᾱ_{τ₀} (``"code"``) or √(1 − ᾱ_{τ₀}) (``"paper"``)."""
    if noise not in NOISE_SCALES:
        raise ValueError(f"noise={noise!r}; expected one of {NOISE_SCALES}")
    a = jnp.asarray(alpha_bar_tau0, jnp.float32)
    sigma = 1 - a if noise == "code" else jnp.sqrt(1 - a)
    return jnp.sqrt(a) * x0_hat + sigma * xi


def first_alpha_bar(
    config: schedulers.SchedulerConfig, kind: str, num_inference_steps: int
) -> float:
    """ᾱ at the base sampler's first timestep, ``alphas_cumprod[int(timesteps[0])]`` (P:630)."""
    ts = (schedulers.euler_timesteps if kind == "euler" else schedulers.timesteps)(
        config, num_inference_steps
    )
    return float(schedulers.alphas_cumprod(config)[int(ts[0])])


def loss(apply: Callable, params, x0, emb, noise):
    """E ||v_ψ(ε, c) − (−x₀)||²: ``apply(params, ε, emb) -> v``, per-element mean."""
    return jnp.mean((apply(params, noise, emb) - (-x0)) ** 2)


def _xi_keys(seeds):
    # ξ from a key of its own per seed, independent of the seed's x̃ and sampler noise.
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0x0335))(seeds)


def initial_latents(
    apply: Callable,
    params,
    emb,
    uncond_emb,
    seeds,
    *,
    latent_shape,
    alpha_bar_tau0: float,
    guidance_scale: float = 1.0,
    noise: str = "code",
):
    """x_{τ₀} for each seed: ``apply(params, x̃, emb) -> v`` is the OMS network, ``emb``
    (B, L, D) its prompt embeddings, ``uncond_emb`` (1 or B, L, D) the empty prompt's.
    ``guidance_scale`` 1 skips the unconditional half (the reference computes it and
    discards it)."""
    seeds = jnp.asarray(seeds)
    x = t2i.initial_noise(seeds, latent_shape)
    if guidance_scale == 1:
        v = apply(params, x, emb)
    else:
        u = jnp.broadcast_to(uncond_emb, emb.shape).astype(emb.dtype)
        out = apply(params, jnp.concatenate([x, x]), jnp.concatenate([u, emb]))
        v = guide(out[: len(x)], out[len(x) :], guidance_scale)
    xi = jax.vmap(lambda k: jax.random.normal(k, tuple(latent_shape)))(_xi_keys(seeds))
    return step(x0_from_v(v), alpha_bar_tau0, xi, noise=noise)


@dataclasses.dataclass
class OMS:
    """A loaded OMS module: ``model`` a :class:`jaxsafe.diffusion.pipeline.T2I` whose UNet is
    time-free, ``tokenize`` its text encoder's tokenizer."""

    model: object
    tokenize: Callable[[Sequence[str]], np.ndarray]
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    def latents(
        self,
        prompts: Sequence[str],
        seeds,
        *,
        scheduler,
        kind: str,
        num_inference_steps: int,
        guidance_scale: float = 1.0,
        noise: str = "code",
    ) -> np.ndarray:
        """x_{τ₀} for ``prompts`` (the OMS prompts: the base prompts, or others for the
        low-frequency control), to pass as the base generator's ``x_T``. The compiled step is
        kept per (ᾱ_{τ₀}, guidance, noise), so repeated calls do not recompile."""
        from flax import nnx

        graphdef, state = nnx.split(self.model)
        cfg = self.model.unet.config
        shape = (cfg.sample_size, cfg.sample_size, cfg.in_channels)
        a = first_alpha_bar(scheduler, kind, num_inference_steps)
        key = (a, float(guidance_scale), noise)
        if key not in self._compiled:

            @jax.jit
            def run(state, ids, uncond_ids, seeds):
                m = nnx.merge(graphdef, state)
                return initial_latents(
                    lambda _, x, e: m(x, None, e),
                    None,
                    m.encode(ids),
                    m.encode(uncond_ids),
                    seeds,
                    latent_shape=shape,
                    alpha_bar_tau0=a,
                    guidance_scale=guidance_scale,
                    noise=noise,
                )

            self._compiled[key] = run
        ids = jnp.asarray(self.tokenize(list(prompts)))
        return np.asarray(
            self._compiled[key](
                state, ids, jnp.asarray(self.tokenize([""])), jnp.asarray(seeds, jnp.int32)
            )
        )


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("*.safetensors.index.json"))


def _variant(d: Path) -> str | None:
    """The precision variant of a folder that only has one (the published OMS modules ship
    ``diffusion_pytorch_model.fp16.safetensors`` only)."""
    if (d / "diffusion_pytorch_model.safetensors").is_file():
        return None
    for f in sorted(d.glob("diffusion_pytorch_model.*.safetensors")):
        return f.name.split(".")[1]
    return None


def load(folder, *, text_encoder_folder=None, latent_channels: int | None = None) -> OMS:
    """An OMS module from a diffusers-style folder: ``oms_module/`` (config.json with
    ``_class_name`` ``UNet2DConditionWoCTModel`` + safetensors, fp16 variant or not) and
    ``oms_text_encoder/`` + ``oms_tokenizer/``. The published modules keep no text-encoder
    weights: their config names the model that has them (``_name_or_path``, ``subfolder``:
    SD 2.1's OpenCLIP-H); pass that model's local folder as ``text_encoder_folder`` (its
    ``text_encoder/`` and ``tokenizer/``). The text encoder's width must equal the module's
    ``cross_attention_dim`` and, given ``latent_channels``, the base model's latent channels
    its ``in_channels``; a mismatch raises ValueError naming both values."""
    from jaxsafe.diffusion.pipeline import T2I
    from jaxsafe.nn.clip_text import CLIPTextConfig
    from jaxsafe.nn.unet2d_condition import WOCT_CLASS, UNet2DConditionConfig
    from jaxsafe.weights import diffusers

    folder = Path(folder)
    if not (folder / "oms_module" / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'oms_module' / 'config.json'} not found: not an OMS folder"
        )
    d = folder / "oms_module"
    ucfg = UNet2DConditionConfig.from_dict(
        {**read_json(d / "config.json"), "_class_name": WOCT_CLASS}
    )
    te_dir = folder / "oms_text_encoder"
    if te_dir.is_dir() and _has_weights(te_dir):
        te_folder, tok_dir = te_dir, folder / "oms_tokenizer"
    else:
        if text_encoder_folder is None:
            named = ""
            if (te_dir / "config.json").is_file():
                c = read_json(te_dir / "config.json")
                named = f" (its config names {c.get('_name_or_path')}/{c.get('subfolder', '')})"
            raise FileNotFoundError(
                f"{te_dir}: no text-encoder weights{named}; pass "
                "text_encoder_folder=<a local copy of that model>"
            )
        te_folder = Path(text_encoder_folder)
        tok_dir = te_folder / "tokenizer"
    # Widths first: a mismatch is named before any weights are read.
    te_config = diffusers.component_dir(te_folder, "text_encoder") / "config.json"
    width = CLIPTextConfig.from_dict(read_json(te_config)).hidden_size
    if width != ucfg.cross_attention_dim:
        raise ValueError(
            f"OMS text encoder ({te_folder}) has width {width}; the OMS "
            f"module's cross_attention_dim is {ucfg.cross_attention_dim}"
        )
    if latent_channels is not None and latent_channels != ucfg.in_channels:
        raise ValueError(
            f"OMS module takes {ucfg.in_channels} latent channels; the base model "
            f"has {latent_channels}"
        )
    unet, _ = diffusers.load_unet(
        folder, component="oms_module", time_conditioning=False, variant=_variant(d)
    )
    text_encoder, tcfg = diffusers.load_text_encoder(te_folder)
    if not tok_dir.is_dir() or not any(tok_dir.iterdir()):
        tok_dir = te_folder / "tokenizer"
    tokenize = _tokenizer(tok_dir, tcfg.max_position_embeddings)
    return OMS(model=T2I(unet, text_encoder), tokenize=tokenize)


def save(folder, unet, text_encoder, tokenizer) -> str:
    """Writes an OMS folder that :func:`load` reads without ``text_encoder_folder``:
    ``oms_module/`` (``UNet2DConditionWoCTModel`` config + safetensors), ``oms_text_encoder/``
    with its weights, ``oms_tokenizer/`` (a test-bed word tokenizer's ``save``) and
    ``model_index.json`` naming them as the published modules do; atomically (written to a
    temporary sibling, then renamed). Returns the folder."""
    from jaxsafe.diffusion.pipeline import atomic_folder
    from jaxsafe.nn.unet2d_condition import WOCT_CLASS
    from jaxsafe.weights import diffusers

    if unet.config.time_conditioning:
        raise ValueError(
            "oms.save: the module must be time-free "
            "(UNet2DConditionConfig(time_conditioning=False))"
        )
    with atomic_folder(str(folder)) as tmp:
        tmp = Path(tmp)
        diffusers.save_unet(unet, unet.config, tmp / "oms_module")
        diffusers.save_text_encoder(text_encoder, text_encoder.config, tmp / "oms_text_encoder")
        tokenizer.save(str(tmp / "oms_tokenizer"))
        index = {
            "_class_name": "OMSPipeline",
            "oms_module": ["unet_2d_condition_woct", WOCT_CLASS],
            "oms_text_encoder": ["transformers", "CLIPTextModel"],
            "oms_tokenizer": ["jaxsafe", "WordTokenizer"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return str(Path(folder).resolve())


def _tokenizer(d: Path, max_positions: int) -> Callable:
    """The test bed's word tokenizer (its ``tokenizer_config.json`` says so), else
    transformers' CLIP tokenizer padded to the text encoder's length."""
    cfg = d / "tokenizer_config.json"
    if cfg.is_file() and read_json(cfg).get("tokenizer_class") == "WordTokenizer":
        from jaxsafe.data.word_tokenizer import WordTokenizer

        return WordTokenizer.load(str(d))
    from jaxsafe.weights import diffusers

    tok = diffusers.load_tokenizer(d)
    n = min(tok.model_max_length, max_positions)
    return lambda texts: np.asarray(
        tok(
            list(texts), padding="max_length", truncation=True, max_length=n, return_tensors="np"
        ).input_ids,
        np.int32,
    )
