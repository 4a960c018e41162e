r"""A loaded text-to-image model: a diffusers-layout folder, read and written back.

The folder is a real Stable Diffusion checkpoint (``unet/``, ``text_encoder/``, ``tokenizer/``
CLIP BPE, ``vae/``, ``scheduler/``) or an export of the miniature test bed
(``experiments/t2i_testbed.py``, :func:`export_testbed`: a word tokenizer and the patch-PCA
latent map ``latent/patch_pca.npz`` in place of the VAE; ``jaxsafe/data/assets/testbed_model``
is a shipped, trained one). :func:`load` reads either into a :class:`Pipeline`; :func:`save`
writes an edited model back in the same layout (untouched components copied, written to a
temporary sibling and renamed, so a crash never leaves a half-written model), so other tools
load it as they load the original. :func:`generator` is ``t2i.make_generator`` for the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.diffusion import schedulers, t2i
from jaxsafe.files import read_json
from jaxsafe.nn import patch_pca
from jaxsafe.nn.clip_text import CLIPTextModel
from jaxsafe.nn.unet2d_condition import UNet2DConditionModel

SHIPPED_TESTBED = str(Path(__file__).resolve().parent.parent / "data" / "assets" / "testbed_model")
#: The lightness-world test bed with SD's scaled-linear schedule (One More Step, docs/oms.md).
LIGHTNESS_TESTBED = str(Path(SHIPPED_TESTBED).parent / "testbed_lightness")


class T2I(nnx.Module):
    """The two networks erasure methods touch, in one module so one ``nnx.split`` separates the
    trained parameters (``unet/...``, ``text_encoder/...`` names) from the rest."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel):
        self.unet = unet
        self.text_encoder = text_encoder

    def encode(self, ids: jax.Array) -> jax.Array:
        return self.text_encoder(ids)["last_hidden_state"]

    def __call__(self, x, t, emb):
        return self.unet(x, t, emb)


@dataclasses.dataclass
class Pipeline:
    """A loaded text-to-image model (see module docstring)."""

    model: T2I
    tokenizer: Any
    scheduler: schedulers.SchedulerConfig
    latent_shape: tuple[int, int, int]
    decode: Callable[[jax.Array], jax.Array]  # latents -> images in [-1, 1]
    encode_image: Callable[[jax.Array], jax.Array] | None
    folder: str
    testbed: bool

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """(N, L) int32 ids, padded to the encoder's length."""
        texts = list(texts)
        if self.testbed:
            return self.tokenizer(texts)
        return np.asarray(
            self.tokenizer(
                texts,
                padding="max_length",
                truncation=True,
                max_length=self._max_length,
                return_tensors="np",
            ).input_ids,
            np.int32,
        )

    @property
    def _max_length(self) -> int:
        # The text encoder's positions bound it (a tokenizer without tokenizer_config.json
        # reports an effectively infinite model_max_length).
        return min(
            self.tokenizer.model_max_length, self.model.text_encoder.config.max_position_embeddings
        )

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Token counts with SOT and EOT (the attention-mask sums)."""
        texts = list(texts)
        if self.testbed:
            return (self.tokenizer(texts) != self.tokenizer.pad_token_id).sum(-1)
        mask = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self._max_length,
            return_tensors="np",
        ).attention_mask
        return np.asarray(mask).sum(-1)

    def embed(self, texts: Sequence[str]) -> jax.Array:
        """Text embeddings (N, L, D) of the loaded (unedited) text encoder."""
        return _encode(self.model.text_encoder, jnp.asarray(self.tokenize(texts)))


@nnx.jit
def _encode(text_encoder, ids):
    return text_encoder(ids)["last_hidden_state"]


def load(
    folder: str | None = None, *, revision: str | None = None, variant: str | None = None
) -> Pipeline:
    """The pipeline in ``folder`` (default: the shipped test-bed model), a diffusers-layout folder
    or a hub id ``org/name[@revision]`` (``jaxsafe.weights.hub.resolve``); ``variant`` picks
    ``*.<variant>.safetensors`` weights (``fp16``)."""
    from jaxsafe.data.word_tokenizer import WordTokenizer
    from jaxsafe.weights import diffusers, hub

    folder = hub.resolve(str(folder or SHIPPED_TESTBED), revision=revision, variant=variant)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"model folder {folder!r} not found: expected a diffusers-layout "
            "folder (a Stable Diffusion checkpoint or a test-bed export)"
        )
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"{folder}/model_index.json not found: not a diffusers folder")
    index = read_json(os.path.join(folder, "model_index.json"), "the pipeline's index")
    testbed = "testbed_latent" in index
    parts = diffusers.load_pipeline(
        folder,
        components=("unet", "text_encoder") + (() if testbed else ("vae", "tokenizer")),
        variant=variant,
    )
    for name in ("unet", "text_encoder"):
        if name not in parts:
            raise FileNotFoundError(f"{folder}: no {name}/ component")
    if "scheduler_config" not in parts:
        raise FileNotFoundError(f"{folder}/scheduler/scheduler_config.json not found")
    unet = parts["unet"]
    size, ch = unet.config.sample_size, unet.config.in_channels
    if testbed:
        latent = patch_pca.load(folder)
        tokenizer = WordTokenizer.load(os.path.join(folder, "tokenizer"))
        decode = jax.jit(lambda z: jnp.clip(latent.decode(z), -1.0, 1.0))
        encode_image = jax.jit(latent.encode)
    else:
        vae = parts["vae"]
        scale = vae.config.scaling_factor
        tokenizer = parts.get("tokenizer")
        decode = jax.jit(lambda z: jnp.clip(vae.decode(z / scale), -1.0, 1.0))
        encode_image = (
            jax.jit(lambda x: vae.encode(x).mode() * scale) if hasattr(vae, "encode") else None
        )
    return Pipeline(
        model=T2I(unet, parts["text_encoder"]),
        tokenizer=tokenizer,
        scheduler=schedulers.SchedulerConfig.from_dict(parts["scheduler_config"]),
        latent_shape=(size, size, ch),
        decode=decode,
        encode_image=encode_image,
        folder=folder,
        testbed=testbed,
    )


def from_config(model_config) -> Pipeline:
    """:func:`load` of a config's ``model`` block: ``folder`` (a folder or hub id; "" = the
    shipped test bed), ``revision`` and ``variant`` ("" = none)."""
    get = lambda k: model_config.get(k) or None  # noqa: E731
    return load(get("folder"), revision=get("revision"), variant=get("variant"))


def make_generator(pipe: Pipeline, apply: Callable, encode: Callable, **sampling):
    """``t2i.make_generator`` with the pipeline's tokenizer, scheduler, latent shape and decoder:
    ``generate(params, prompts, seeds, negative_prompts=None)`` with the (edited) denoiser
    ``apply(params, x, t, emb[, values])`` and text encoder ``encode(params, ids)``."""
    return t2i.make_generator(
        apply,
        encode,
        pipe.tokenize,
        pipe.scheduler,
        latent_shape=pipe.latent_shape,
        decode=lambda _, z: pipe.decode(z),
        **sampling,
    )


_GENERATORS: dict = {}  # (folder, graphdef, sampling) -> generate; see generator()
_MAX_GENERATORS = 8


def generator(pipe: Pipeline, graphdef, **sampling):
    """:func:`make_generator` for states of a :class:`T2I` split with ``graphdef``:
    ``generate(state, prompts, seeds)``, ``state`` a tuple of the split's states.

    The same (model folder, graph, sampling settings) get the same function back within a
    process, so its compiled sampler is reused: every edit of one model (the erasure table runs
    dozens) shares one compilation instead of compiling it again. The weights are arguments;
    what is baked in (tokenizer, scheduler, decoder) is the folder's."""
    try:
        key = (pipe.folder, graphdef, tuple(sorted(sampling.items())))
        hash(key)
    except TypeError:  # an unhashable setting: no reuse
        key = None
    if key is not None and key in _GENERATORS:
        return _GENERATORS[key]
    out = make_generator(
        pipe,
        lambda s, x, t, e: nnx.merge(graphdef, *s)(x, t, e),
        lambda s, ids: nnx.merge(graphdef, *s).encode(ids),
        **sampling,
    )
    if key is not None:
        if len(_GENERATORS) >= _MAX_GENERATORS:
            _GENERATORS.pop(next(iter(_GENERATORS)))
        _GENERATORS[key] = out
    return out


def _primary_writes(name: str):
    """Decorator: only process 0 runs the writer (the others return None); with several
    processes all wait for it, so none reads a folder that is still being written."""

    def wrap(write):
        def run(*args, **kwargs):
            from jaxsafe import parallel

            out = write(*args, **kwargs) if parallel.is_primary() else None
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(name)
            return out

        return run

    return wrap


@_primary_writes("jaxsafe.pipeline.save")
def save(
    pipe: Pipeline,
    out: str,
    *,
    unet=None,
    text_encoder=None,
    extra_files: dict[str, bytes] | None = None,
    extra_tensors: dict[str, dict[str, np.ndarray]] | None = None,
) -> str:
    """Writes ``out`` as a copy of the source folder with the edited ``unet`` / ``text_encoder``
    (NNX modules; None keeps the original files), ``extra_files`` (relative path -> bytes) and
    ``extra_tensors`` (relative path -> tensors, a checksummed safetensors file), atomically
    (module docstring); on process 0 only, the others wait for it."""
    from jaxsafe.weights import convert, diffusers

    with atomic_folder(out) as tmp:
        shutil.copytree(pipe.folder, tmp, dirs_exist_ok=True)
        if unet is not None:
            diffusers.save_unet(unet, unet.config, os.path.join(tmp, "unet"))
        if text_encoder is not None:
            diffusers.save_text_encoder(
                text_encoder, text_encoder.config, os.path.join(tmp, "text_encoder")
            )
        for rel, data in (extra_files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)) or tmp, exist_ok=True)
            Path(tmp, rel).write_bytes(data)
        for rel, tensors in (extra_tensors or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)) or tmp, exist_ok=True)
            convert.write_safetensors(tensors, os.path.join(tmp, rel))
    return os.path.abspath(out)


@contextlib.contextmanager
def atomic_folder(out: str):
    """Yields a temporary sibling of ``out`` to write into; on success it replaces ``out``, on
    any error (or kill) ``out`` is untouched and the temporary folder is removed."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
    try:
        yield tmp
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@_primary_writes("jaxsafe.pipeline.export_testbed")
def export_testbed(
    unet,
    text_encoder,
    scheduler: schedulers.SchedulerConfig,
    tokenizer,
    latent: patch_pca.PatchPCA,
    folder: str,
) -> str:
    """Writes a test-bed model as a diffusers-layout folder: ``unet/``, ``text_encoder/``,
    ``scheduler/scheduler_config.json`` (DDIMScheduler), ``tokenizer/`` (the word tokenizer's
    vocab.json + tokenizer_config.json; not listed in model_index.json, which jaxsafe reads as a
    CLIPTokenizer), ``latent/patch_pca.npz`` (in place of ``vae/``) and ``model_index.json``
    (with ``"testbed_latent"``); on process 0 only. :func:`load` reads it back."""
    from jaxsafe.weights import diffusers

    sched = {"_class_name": "DDIMScheduler", **dataclasses.asdict(scheduler)}
    diffusers.save_pipeline(
        {
            "unet": unet,
            "text_encoder": text_encoder,
            "scheduler_config": sched,
            "model_index": {"testbed_latent": patch_pca.LATENT_FILE},
        },
        folder,
    )
    tokenizer.save(os.path.join(folder, "tokenizer"))
    patch_pca.save(latent, folder)
    return folder
