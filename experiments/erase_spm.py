r"""SPM (Lyu et al., CVPR 2024) through the generic trainer: rank-1 adapters on the UNet's
transformer blocks (``jaxsafe.nn.adapters``) trained with ``jaxsafe.erasure.spm``'s objective,
the UNet frozen; generation with facilitated transport. Config: ``configs/erasure/spm.py``.

Per-prompt strength: the generator computes γ (B,) for its prompts with the original text
encoder (:class:`Transport`) and passes it, with the model state, as the sampler's parameters;
:func:`spm_apply` sets it as the adapters' strength on the model merged inside the jitted
sampler (``adapters.strength``). Under classifier-free guidance the unconditional half of the
batch takes its prompt's γ, as the reference (one adapter weighting per prompt and call).

The export (``<workdir>/export``, :func:`export`) is a copy of the original model folder
(untouched UNet) plus ``spm_adapter.safetensors``, the adapter parameters named relative to the
UNet in jaxsafe's (in, out) kernel layout, and ``spm.json`` (rank, α, the erased concepts, the
transport settings); :func:`load` re-attaches them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsafe.diffusion import pipeline
from jaxsafe.erasure import evaluation, prompts, spm
from jaxsafe.erasure import model as em
from jaxsafe.erasure import params as ep
from jaxsafe.nn import adapters
from jaxsafe.parallel import batch_shards, tile_to_shards
from jaxsafe.train import Task

ADAPTER_FILE, SETTINGS_FILE = "spm_adapter.safetensors", "spm.json"


def special_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids the token-overlap term ignores: SOT/EOT/PAD (and any other special token)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    ids |= {getattr(tokenizer, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return tuple(sorted(int(i) for i in ids if i is not None))


@dataclasses.dataclass(frozen=True)
class Transport:
    """Facilitated transport of one SPM (``spm.transport_strength``): ``transport(ids, emb)``
    -> γ^power (B,) for prompts' token ids (B, L) and original text-encoder outputs (B, L, D);
    all ones when ``enabled`` is False (the membrane at full strength everywhere). ``power`` 1 is
    the paper's γ; 2 reproduces the reference code, which scales both adapter factors by γ."""

    erased_emb: jax.Array
    erased_ids: jax.Array
    special_ids: tuple[int, ...]
    enabled: bool = True
    power: int = 1

    @classmethod
    def for_concepts(
        cls, pipe: pipeline.Pipeline, concepts: Sequence[str], enabled: bool = True, power: int = 1
    ) -> Transport:
        concepts = list(concepts)
        if not concepts:
            raise ValueError("concepts: at least one erased concept is needed for transport")
        if power not in (1, 2):
            raise ValueError(
                f"power must be 1 (the paper) or 2 (the reference code), got {power!r}"
            )
        return cls(
            pipe.embed(concepts),
            jnp.asarray(pipe.tokenize(concepts)),
            special_token_ids(pipe.tokenizer),
            bool(enabled),
            int(power),
        )

    def __call__(self, ids: jax.Array, emb: jax.Array) -> jax.Array:
        if not self.enabled:
            return jnp.ones((emb.shape[0],), jnp.float32)
        return (
            spm.transport_strength(emb, ids, self.erased_emb, self.erased_ids, self.special_ids)
            ** self.power
        )


def attach_adapters(pipe: pipeline.Pipeline, rank: int, alpha: float, seed: int = 0) -> None:
    """Replaces ``pipe.model.unet`` by a copy with zero-initialised adapters."""
    pipe.model.unet = adapters.add_adapters(
        pipe.model.unet, rank=rank, alpha=alpha, rngs=nnx.Rngs(seed)
    )


def spm_apply(graphdef, state: tuple, x, t, emb, gamma):
    """ε of the adapted T2I module ``nnx.merge(graphdef, *state)`` with per-prompt strength
    ``gamma``: one value per row of ``x``, or per prompt (B,) when ``x`` is the 2B rows of
    classifier-free guidance ([uncond; cond]), which repeat it."""
    model = nnx.merge(graphdef, *state)
    b, g = x.shape[0], gamma.shape[0]
    if b == 2 * g:
        gamma = jnp.concatenate([gamma, gamma])
    elif b != g:
        raise ValueError(f"gamma must have one value per prompt: batch {b}, gamma {gamma.shape}")
    with adapters.strength(model.unet, gamma):
        return model(x, t, emb)


def make_spm_generator(pipe: pipeline.Pipeline, graphdef, transport: Transport, **sampling):
    """``generate(state, captions, seeds) -> (n, H, W, 3)`` in [−1, 1] with facilitated transport:
    ``pipeline.make_generator`` with each prompt's strength γ as the per-prompt value."""
    return pipeline.make_generator(
        pipe,
        lambda s, x, t, e, gamma: spm_apply(graphdef, s, x, t, e, gamma),
        lambda s, ids: nnx.merge(graphdef, *s).encode(ids),
        aux=lambda s, ids, emb: transport(ids, emb),
        **sampling,
    )


def build(config, mesh) -> Task:
    pipe = pipeline.from_config(config.model)
    s = config.spm
    attach_adapters(pipe, s.rank, s.alpha, config.train.seed)
    sel = ep.nnx_filter(lambda n: n.startswith("unet/") and adapters.is_adapter_param(n))
    graphdef, params, frozen = em.split_trainable(pipe.model, sel)
    eps_theta, eps_star = em.score_functions(graphdef)

    loss_fn = spm.make_spm_loss(
        eps_theta,
        eps_star,
        pipe.scheduler,
        latent_shape=pipe.latent_shape,
        anchor_weight=s.anchor_weight,
        num_anchors=s.num_anchors,
        eta=s.erase_guidance,
        start_guidance=s.start_guidance,
        num_inference_steps=s.ddim_steps,
        anchor_scale=tuple(s.anchor_scale),
        batch_size=config.train.batch_size,
        anchor_batch=s.anchor_batch,
    )
    # The pool of (target, neutral) prompt pairs: every erased concept with its guide in every
    # ``concepts.templates`` form (no templates, guide "": the reference's target and neutral
    # prompts); each step draws ``train.batch_size`` of them, as the reference draws one prompt
    # pair per step. Tiled whole to the mesh's batch shards.
    pairs = prompts.prompt_pairs(config.concepts)
    emb = np.asarray(pipe.embed([a for a, _ in pairs] + [g for _, g in pairs] + [""]))
    p = len(pairs)
    batch = tile_to_shards(
        {"c_e": emb[:p], "c_from": emb[p : 2 * p], "uncond": np.repeat(emb[2 * p :], p, 0)},
        batch_shards(mesh),
    )
    o = config.optimizer
    lr = spm.cosine_with_hard_restarts(o.lr, o.warmup_steps, config.train.num_steps, o.num_cycles)
    optimizer = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.max_grad_norm > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(o.max_grad_norm), optimizer)
    return Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=optimizer,
        loss_fn=loss_fn,
        train_data=batch,
    )


def export(pipe: pipeline.Pipeline, unet: nnx.Module, config, out: str) -> str:
    """Writes ``out``: a copy of ``pipe``'s folder with the adapter file and its settings.

    The adapter parameters are named relative to the UNet, e.g.
    ``down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_k/adapter/down/kernel``.
    """
    tensors = {k: np.asarray(v) for k, v in adapters.adapter_params(unet).items()}
    settings = {
        "method": "SPM",
        "rank": int(config.spm.rank),
        "alpha": float(config.spm.alpha),
        "concepts": list(config.concepts.erase),
        "adapter_file": ADAPTER_FILE,
        "layers": adapters.TRANSFORMER_BLOCK_LINEARS.pattern,
        "transport": {
            "enabled": bool(config.spm.transport),
            "power": int(config.spm.transport_power),
            "metric": "max(clipcos, tokenuni)",
        },
    }
    return pipeline.save(
        pipe,
        out,
        extra_tensors={ADAPTER_FILE: tensors},
        extra_files={SETTINGS_FILE: json.dumps(settings, indent=1).encode()},
    )


def load(folder: str) -> tuple[pipeline.Pipeline, Transport]:
    """The pipeline of an SPM export with its adapters re-attached, and its transport.

    Usage::

        pipe, transport = load(folder)
        graphdef, state = nnx.split(pipe.model)
        images = make_spm_generator(pipe, graphdef, transport)((state,), captions, seeds)
    """
    from jaxsafe.files import read_json
    from jaxsafe.weights.convert import read_safetensors

    settings_file = Path(folder, SETTINGS_FILE)
    if not settings_file.is_file():
        raise FileNotFoundError(f"{settings_file} not found: not an SPM export")
    settings = read_json(settings_file, "an SPM export's settings")
    pipe = pipeline.load(folder)
    attach_adapters(pipe, settings["rank"], settings["alpha"])
    adapters.load_adapter_params(
        pipe.model.unet, read_safetensors(Path(folder, settings["adapter_file"]))
    )
    t = settings["transport"]
    return pipe, Transport.for_concepts(pipe, settings["concepts"], t["enabled"], t["power"])


def evaluate(config, pipe: pipeline.Pipeline, model: nnx.Module, transport: Transport) -> dict:
    """Test-bed erasure metrics of the adapted T2I ``model`` with transport, and the mean γ of
    each concept's evaluation prompts (``strength/<concept>``)."""
    from jaxsafe.data import shapes, shapes_metrics

    graphdef, state = nnx.split(model)
    state = (state,)
    e = config.eval
    generate = make_spm_generator(pipe, graphdef, transport, **dict(config.sampling))

    def encode(s, ids):
        emb = nnx.merge(graphdef, *s).encode(ids)
        return emb, transport(ids, emb)

    out = evaluation.evaluate(
        pipe,
        lambda c, sd: generate(state, c, sd),
        list(config.concepts.erase),
        k=e.samples_per_concept,
        seed=e.seed,
        fid_samples=e.fid_samples,
        sampling=dict(config.sampling),
        loss_fn=lambda: evaluation.heldout_loss(
            pipe,
            lambda s, x, t, enc: spm_apply(graphdef, s, x, t, *enc),
            encode,
            state,
            n=e.heldout_examples,
            seed=e.seed,
            exclude=list(config.concepts.erase),
        ),
    )
    gamma = jax.jit(encode)
    for concept in shapes.CONCEPTS:
        captions, _ = shapes_metrics.concept_prompts(concept, e.samples_per_concept, e.seed)
        out[f"strength/{concept}"] = float(
            jnp.mean(gamma(state, jnp.asarray(pipe.tokenize(captions)))[1])
        )
    return out


def summarize(config, state, task, workdir) -> dict:
    from jaxsafe.parallel import fetch

    pipe = pipeline.from_config(config.model)
    model = em.trained_model(task.graphdef, fetch(state.params), fetch(state.frozen))
    out = {}
    if workdir:
        out["export"] = export(pipe, model.unet, config, os.path.join(workdir, "export"))
    if config.eval.enabled and pipe.testbed:
        transport = Transport.for_concepts(
            pipe, config.concepts.erase, config.spm.transport, config.spm.transport_power
        )
        out.update(evaluate(config, pipe, model, transport))
    return out
