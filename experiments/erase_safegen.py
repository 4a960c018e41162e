"""SafeGen (Li et al., CCS 2024) through the generic trainer: ``jaxsafe.erasure.safegen``'s loss on
the UNet's self-attention parameters (``attn1``), conditioned on the empty prompt, with the
reference's AdamW, gradient clipping and EMA of the trained parameters (the EMA weights are the
exported model). Config: ``configs/erasure/safegen.py``.

Triplets (unsafe, mosaic, normal) come from

* the test bed (``safegen.triplets = ""`` on a test-bed model): shapes-dataset images showing an
  erased concept (unsafe), their block mosaic (``jaxsafe.erasure.safegen.pixelate``; made grey
  too for a colour concept, ``safegen.censor = "grey_mosaic"``), and images without any erased
  concept (normal), all encoded with the model's latent map;
* a CSV manifest (``safegen.triplets = path``) with the reference's columns
  ``nude_image_path, mos_image_path, norm_image_path`` (relative paths from the CSV's folder),
  resized (shorter side, bilinear) and centre-cropped to ``safegen.resolution``, then encoded with
  the VAE (its mean; the reference samples the posterior).
"""

from __future__ import annotations

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsafe.diffusion import pipeline
from jaxsafe.erasure import evaluation, safegen
from jaxsafe.erasure import model as em
from jaxsafe.erasure import params as ep
from jaxsafe.parallel import batch_shards, tile_to_shards
from jaxsafe.train import Task, ema_after_update

_COLUMNS = ("nude_image_path", "mos_image_path", "norm_image_path")


def _encode(pipe, images: np.ndarray, chunk: int = 8) -> np.ndarray:
    if pipe.encode_image is None:
        raise ValueError(
            f"{pipe.folder}: the model has no image encoder (VAE encoder) to encode the triplets"
        )
    return np.concatenate(
        [
            np.asarray(pipe.encode_image(jnp.asarray(images[i : i + chunk])))
            for i in range(0, len(images), chunk)
        ]
    )


CENSORS = ("mosaic", "grey_mosaic")


def censor(images: np.ndarray, kind: str, block: int) -> np.ndarray:
    """The test-bed "mosaic" of images in [−1, 1]: the ``block`` pixelation, and for
    ``grey_mosaic`` then its luminance (ITU-R BT.601) in all three channels, which also removes a
    colour concept (a pixelation keeps the colour)."""
    if kind not in CENSORS:
        raise ValueError(f"safegen.censor={kind!r}; expected one of {CENSORS}")
    out = np.asarray(safegen.pixelate(jnp.asarray(images), block))
    if kind == "grey_mosaic":
        out = np.repeat(out @ np.array([0.299, 0.587, 0.114], out.dtype), 3).reshape(out.shape)
    return out


def testbed_images(
    concepts, n: int, kind: str = "mosaic", block: int = 16, seed: int = 0, scan: int = 256
):
    """(unsafe, mosaic, normal) images in [−1, 1], n of each: the first n examples of shapes
    stream ``seed`` showing any of ``concepts`` (label value), their :func:`censor`, and the
    first n examples showing none of them."""
    from jaxsafe.data import shapes

    wanted = [shapes.CONCEPTS[c] for c in concepts]
    data, unsafe, normal, start = shapes.ShapesDataset(seed), [], [], 0
    while len(unsafe) < n or len(normal) < n:
        chunk = data.arrays(start, scan)
        hit = np.any([chunk["label"][:, a] == v for a, v in wanted], axis=0)
        unsafe += list(chunk["image"][hit])
        normal += list(chunk["image"][~hit])
        start += scan
    as_float = lambda x: np.stack(x[:n]).astype(np.float32) / 127.5 - 1.0
    u = as_float(unsafe)
    return u, censor(u, kind, block), as_float(normal)


def _load_image(path: str, resolution: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = resolution / min(img.size)
    img = img.resize(
        (max(resolution, round(img.size[0] * scale)), max(resolution, round(img.size[1] * scale))),
        Image.BILINEAR,
    )
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.asarray(img, np.float32) / 127.5 - 1.0


def manifest_images(path: str, resolution: int):
    """(unsafe, mosaic, normal) images in [−1, 1] listed in the CSV manifest ``path``."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or any(c not in rows[0] for c in _COLUMNS):
        raise ValueError(f"{path}: expected a CSV with columns {', '.join(_COLUMNS)}")
    root = os.path.dirname(os.path.abspath(path))
    return tuple(
        np.stack([_load_image(os.path.join(root, r[c]), resolution) for r in rows])
        for c in _COLUMNS
    )


def testbed_censor(concept: str) -> tuple[str, int]:
    """``safegen.censor = "auto"`` on the test bed: a grey 4-px mosaic for a colour (pixelation
    keeps the colour), a 16-px mosaic otherwise (finer mosaics of a square still read as one)."""
    from jaxsafe.data import shapes

    colour = shapes.ATTRIBUTES[shapes.CONCEPTS[concept][0]][0] == "colour"
    return ("grey_mosaic", 4) if colour else ("mosaic", 16)


def triplet_latents(config, pipe) -> dict:
    """``{"z_unsafe", "z_mosaic", "z_normal"}`` of the config's triplet source."""
    g = config.safegen
    if g.triplets:
        images = manifest_images(g.triplets, g.resolution)
    elif pipe.testbed:
        censor, block = (
            (g.censor, g.mosaic_block)
            if g.censor != "auto"
            else testbed_censor(config.concepts.erase[0])
        )
        images = testbed_images(config.concepts.erase, g.num_triplets, censor, block, g.data_seed)
    else:
        raise ValueError(
            "safegen.triplets: a CSV manifest of (nude, mosaic, normal) image paths "
            "is required for a model that is not a test-bed export"
        )
    return dict(zip(("z_unsafe", "z_mosaic", "z_normal"), (_encode(pipe, x) for x in images)))


def build(config, mesh) -> Task:
    pipe = pipeline.from_config(config.model)
    g, o = config.safegen, config.optimizer
    graphdef, params, frozen = em.split_trainable(
        pipe.model, ep.nnx_filter(ep.selection("selfattn", "unet"))
    )
    eps_theta, _ = em.score_functions(graphdef)
    loss_fn = safegen.make_safegen_loss(
        eps_theta,
        pipe.scheduler,
        target=g.target,
        weight_mosaic=g.weight_mosaic,
        weight_preserve=g.weight_preserve,
        batch_size=config.train.batch_size,
    )
    shards = batch_shards(mesh)
    # The triplets and the one unconditional prompt differ in rows: each is tiled on its own.
    batch = {
        **tile_to_shards(triplet_latents(config, pipe), shards),
        "uncond": tile_to_shards(np.asarray(pipe.embed([""])), shards),
    }
    optimizer = optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )
    ema = g.ema_decay > 0  # diffusers' EMAModel rule, as the reference's --use_ema
    return Task(
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        optimizer=optimizer,
        loss_fn=loss_fn,
        train_data=batch,
        extra={"ema": jax.tree.map(jnp.copy, params)} if ema else {},
        after_update=ema_after_update(g.ema_decay) if ema else None,
    )


def summarize(config, state, task, workdir) -> dict:
    if config.safegen.ema_decay > 0:
        state = state.replace(params=state.extra["ema"])
    return evaluation.summarize(config, state, task, workdir)
