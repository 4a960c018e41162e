r"""What every concept-erasure experiment shares: the text-to-image model it starts from, its
generator, the erasure metrics, and writing the edited model back out.

The starting point is a diffusers-layout folder (``config.model.folder``): a real Stable
Diffusion folder (``unet/``, ``text_encoder/``, ``tokenizer/`` CLIP BPE, ``vae/``,
``scheduler/``) or a test-bed export (``experiments.t2i_testbed.export``: word tokenizer and the
patch-PCA latent map in place of the VAE; ``jaxsafe/data/assets/testbed_model`` is a shipped,
trained one). :func:`load` reads either into a :class:`Pipeline`; edited models are written back
in the same layout by :func:`save` (the untouched components are copied), so other tools load
them as they load the original.

Erasure metrics (:func:`evaluate`) exist for the test bed only, where the oracle classifier reads
every concept off a generated image: per-concept generation accuracy (``erasure_report``:
targets, synonym leakage, near concepts, the rest), the oracle Fréchet distance of generations
for held-out captions to the held-out images, and the held-out denoising loss on images without
the erased concepts (utility).
"""

from __future__ import annotations

import dataclasses
import json
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
from jaxsafe.nn.clip_text import CLIPTextModel
from jaxsafe.nn.unet2d_condition import UNet2DConditionModel

SHIPPED_TESTBED = str(Path(__file__).resolve().parent.parent / "jaxsafe" / "data" / "assets"
                      / "testbed_model")


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
        return np.asarray(self.tokenizer(texts, padding="max_length", truncation=True,
                                         max_length=self._max_length,
                                         return_tensors="np").input_ids, np.int32)

    @property
    def _max_length(self) -> int:
        # The text encoder's positions bound it (a tokenizer without tokenizer_config.json
        # reports an effectively infinite model_max_length).
        return min(self.tokenizer.model_max_length,
                   self.model.text_encoder.config.max_position_embeddings)

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Token counts with SOT and EOT (the attention-mask sums)."""
        texts = list(texts)
        if self.testbed:
            return (self.tokenizer(texts) != self.tokenizer.pad_token_id).sum(-1)
        mask = self.tokenizer(texts, padding="max_length", truncation=True,
                              max_length=self._max_length,
                              return_tensors="np").attention_mask
        return np.asarray(mask).sum(-1)

    def embed(self, texts: Sequence[str]) -> jax.Array:
        """Text embeddings (N, L, D) of the loaded (unedited) text encoder."""
        return _encode(self.model.text_encoder, jnp.asarray(self.tokenize(texts)))


@nnx.jit
def _encode(text_encoder, ids):
    return text_encoder(ids)["last_hidden_state"]


def load(folder: str | None = None) -> Pipeline:
    """The pipeline in ``folder`` (default: the shipped test-bed model)."""
    from jaxsafe.weights import diffusers

    folder = str(folder or SHIPPED_TESTBED)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder!r} not found: expected a diffusers-layout "
                                "folder (a Stable Diffusion checkpoint or a test-bed export)")
    index = json.loads(Path(folder, "model_index.json").read_text()) if os.path.exists(
        os.path.join(folder, "model_index.json")) else None
    if index is None:
        raise FileNotFoundError(f"{folder}/model_index.json not found: not a diffusers folder")
    testbed = "testbed_latent" in index
    parts = diffusers.load_pipeline(folder, components=("unet", "text_encoder")
                                    + (() if testbed else ("vae", "tokenizer")))
    for name in ("unet", "text_encoder"):
        if name not in parts:
            raise FileNotFoundError(f"{folder}: no {name}/ component")
    if "scheduler_config" not in parts:
        raise FileNotFoundError(f"{folder}/scheduler/scheduler_config.json not found")
    unet = parts["unet"]
    size, ch = unet.config.sample_size, unet.config.in_channels
    if testbed:
        from experiments.t2i_testbed import load_latent
        from jaxsafe.data.word_tokenizer import WordTokenizer

        latent = load_latent(folder)
        tokenizer = WordTokenizer.load(os.path.join(folder, "tokenizer"))
        decode = jax.jit(lambda z: jnp.clip(latent.decode(z), -1.0, 1.0))
        encode_image = jax.jit(latent.encode)
    else:
        vae = parts["vae"]
        scale = vae.config.scaling_factor
        tokenizer = parts.get("tokenizer")
        decode = jax.jit(lambda z: jnp.clip(vae.decode(z / scale), -1.0, 1.0))
        encode_image = jax.jit(lambda x: vae.encode(x).mode() * scale) if hasattr(
            vae, "encode") else None
    return Pipeline(model=T2I(unet, parts["text_encoder"]), tokenizer=tokenizer,
                    scheduler=schedulers.SchedulerConfig.from_dict(parts["scheduler_config"]),
                    latent_shape=(size, size, ch), decode=decode, encode_image=encode_image,
                    folder=folder, testbed=testbed)


def make_generator(pipe: Pipeline, apply: Callable, encode: Callable, *, kind: str = "ddim",
                   num_inference_steps: int = 25, guidance_scale: float = 4.0,
                   batch_size: int = 32, aux: Callable | None = None):
    """``generate(params, captions, seeds) -> (n, H, W, 3)`` images in [−1, 1] with classifier-free
    guidance against the empty prompt. ``apply(params, x, t, emb)`` is the (edited) denoiser and
    ``encode(params, ids)`` the (edited) text encoder. With ``aux(params, ids, emb)`` (per-prompt
    values, e.g. SPM's transport strength), ``apply`` receives them as a fifth argument. Calls are
    padded to a multiple of ``batch_size`` (one compiled program); image k depends on
    (captions[k], seeds[k]) only."""
    unet = apply if aux is None else (lambda p, x, t, e: apply(p[0], x, t, e, p[1]))
    sampler = t2i.make_t2i_sampler(unet, pipe.scheduler, kind=kind,
                                   num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, latent_shape=pipe.latent_shape)

    @jax.jit
    def enc(params, ids):
        emb = encode(params, ids)
        return emb, (None if aux is None else aux(params, ids, emb))

    def generate(params, captions, seeds):
        captions, seeds = list(captions), np.asarray(seeds, np.int32).reshape(-1)
        if len(captions) != len(seeds):
            raise ValueError(f"one seed per caption: got {len(captions)} captions and "
                             f"{len(seeds)} seeds")
        n, pad = len(captions), -len(captions) % batch_size
        ids = pipe.tokenize(captions + [""] * pad)
        seeds = np.concatenate([seeds, np.zeros(pad, np.int32)])
        uncond, _ = enc(params, jnp.asarray(pipe.tokenize([""])))
        out = []
        for i in range(0, n + pad, batch_size):
            emb, a = enc(params, jnp.asarray(ids[i:i + batch_size]))
            p = params if aux is None else (params, a)
            out.append(np.asarray(pipe.decode(sampler(p, emb, uncond, seeds[i:i + batch_size]))))
        return np.concatenate(out)[:n]

    return generate


def model_generator(pipe: Pipeline, graphdef, **sampling):
    """:func:`make_generator` for states of a :class:`T2I` split with ``graphdef``:
    ``generate(state, captions, seeds)``, ``state`` a tuple of the split's states."""
    return make_generator(pipe, lambda s, x, t, e: nnx.merge(graphdef, *s)(x, t, e),
                          lambda s, ids: nnx.merge(graphdef, *s).encode(ids), **sampling)


def heldout_loss(pipe: Pipeline, apply: Callable, encode: Callable, params, n: int = 256,
                 seed: int = 0, exclude: Sequence[str] = ()) -> float:
    """ε-prediction loss on fixed held-out test-bed images, timesteps, noise and captions of the
    denoiser ``apply(params, x, t, emb)`` with text encoder ``encode(params, ids)``. Images whose
    label has an ``exclude`` concept are left out (the first ``n`` of the others are used): an
    erased model is meant to fail on those, so utility is measured on the rest."""
    from jaxsafe.data import shapes

    bad = {shapes.CONCEPTS[w] for w in exclude}
    data = shapes.ShapesDataset(1).arrays(0, 2 * n if bad else n)
    keep = np.flatnonzero([not any((a, v) in bad for a, v in enumerate(label))
                           for label in data["label"]])[:n]
    if len(keep) < n:
        raise ValueError(f"only {len(keep)} of {2 * n} held-out images are free of {exclude}")
    data = {k: np.asarray(v)[keep] for k, v in data.items()}
    z0 = pipe.encode_image(jnp.asarray(data["image"], jnp.float32) / 127.5 - 1.0)
    k_t, k_e = jax.random.split(jax.random.key(seed))
    t = jax.random.randint(k_t, (n,), 0, pipe.scheduler.num_train_timesteps)
    eps = jax.random.normal(k_e, z0.shape)
    ids = jnp.asarray(pipe.tokenize(data["caption"]))

    @jax.jit
    def loss(params):
        x_t = schedulers.add_noise(pipe.scheduler, z0, eps, t)
        return jnp.mean((apply(params, x_t, t, encode(params, ids)) - eps) ** 2)

    return float(loss(params))


def evaluate(pipe: Pipeline, generate: Callable, targets: Sequence[str], *, k: int = 16,
             seed: int = 0, fid_samples: int = 256, loss_fn: Callable | None = None) -> dict:
    """Test-bed erasure metrics of ``generate(captions, seeds)`` (module docstring); ``loss_fn()``
    -> held-out denoising loss, if given."""
    from jaxsafe.data import shapes, shapes_metrics
    from jaxsafe.nn import oracle as oracle_lib

    if not pipe.testbed:
        raise ValueError("erasure metrics need the test bed's oracle: the model folder must be a "
                         "test-bed export")
    oracle = oracle_lib.load()
    out = shapes_metrics.erasure_report(generate, oracle, targets=list(targets), k=k, seed=seed)
    if fid_samples:
        real = shapes.ShapesDataset(1).arrays(0, fid_samples)
        fake = generate(list(real["caption"]), np.arange(fid_samples) + 10**6)
        out["oracle_fd"] = shapes_metrics.oracle_frechet_distance(
            oracle, fake, real["image"].astype(np.float32) / 127.5 - 1.0)
    if loss_fn is not None:
        out["heldout_loss"] = loss_fn()
    return out


def save(pipe: Pipeline, out: str, *, unet=None, text_encoder=None,
         extra_files: dict[str, bytes] | None = None) -> str:
    """Writes ``out`` as a copy of the source folder with the edited ``unet`` / ``text_encoder``
    (NNX modules; None keeps the original files) and ``extra_files`` (relative path -> bytes).
    Written to a temporary sibling first and renamed, so a crash leaves no half-written model."""
    from jaxsafe.weights import diffusers

    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
    try:
        shutil.copytree(pipe.folder, tmp, dirs_exist_ok=True)
        if unet is not None:
            diffusers.save_unet(unet, unet.config, os.path.join(tmp, "unet"))
        if text_encoder is not None:
            diffusers.save_text_encoder(text_encoder, text_encoder.config,
                                        os.path.join(tmp, "text_encoder"))
        for rel, data in (extra_files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)) or tmp, exist_ok=True)
            Path(tmp, rel).write_bytes(data)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# Trained erasure methods: the trained copy and the frozen original share every parameter that
# does not train, so the original costs only a copy of the trained subset.


def split_trainable(pipe: Pipeline, trainable):
    """``(graphdef, params, frozen)`` of ``pipe.model`` with ``params`` the variables matching the
    NNX filter ``trainable`` and ``frozen = {"rest": other variables, "original": a copy of
    params}``: ε_θ = merge(params, rest), ε* = merge(original, rest)."""
    graphdef, params, rest = nnx.split(pipe.model, trainable, ...)
    if not jax.tree.leaves(params):
        raise ValueError("the trainable selection matches no parameter of the model")
    return graphdef, params, {"rest": rest, "original": jax.tree.map(jnp.copy, params)}


def trained_model(graphdef, params, frozen) -> T2I:
    return nnx.merge(graphdef, params, frozen["rest"])


def original_model(graphdef, frozen) -> T2I:
    return nnx.merge(graphdef, frozen["original"], frozen["rest"])


def _sampling(config) -> dict:
    return dict(config.sampling)


def evaluate_model(config, pipe: Pipeline, graphdef, state: tuple) -> dict:
    """:func:`evaluate` of the T2I module ``nnx.merge(graphdef, *state)`` with the config's
    sampling and ``eval`` settings (``eval.targets``, default the erased concepts)."""
    generate = model_generator(pipe, graphdef, **_sampling(config))
    e = config.eval
    apply = lambda s, x, t, emb: nnx.merge(graphdef, *s)(x, t, emb)
    encode = lambda s, ids: nnx.merge(graphdef, *s).encode(ids)
    return evaluate(pipe, lambda c, s: generate(state, c, s), list(config.concepts.erase),
                    k=e.samples_per_concept, seed=e.seed, fid_samples=e.fid_samples,
                    loss_fn=lambda: heldout_loss(pipe, apply, encode, state,
                                                 n=e.heldout_examples, seed=e.seed,
                                                 exclude=list(config.concepts.erase)))


def summarize_trained(config, state, task, workdir: str | None) -> dict:
    """Exports the trained model to ``<workdir>/export`` (unet, and text_encoder when any of its
    parameters trained) and, on the test bed with ``eval.enabled``, returns its metrics."""
    from jaxsafe.parallel import fetch

    pipe = load(config.model.folder or None)
    params, frozen = fetch(state.params), fetch(state.frozen)
    model = trained_model(task.graphdef, params, frozen)
    trained_names = {n.split("/")[0] for n in _names(params)}
    out = {}
    if workdir:
        out["export"] = save(pipe, os.path.join(workdir, "export"),
                             unet=model.unet if "unet" in trained_names else None,
                             text_encoder=(model.text_encoder if "text_encoder" in trained_names
                                           else None))
    if config.eval.enabled and pipe.testbed:
        graphdef, state = nnx.split(model)
        out.update(evaluate_model(config, pipe, graphdef, (state,)))
    return out


def _names(tree) -> list[str]:
    from jaxsafe.treepath import named_leaves

    return list(named_leaves(tree))


def fix_articles(text: str) -> str:
    """Single spaces, and "a"/"an" agreeing with the next word ("a orange" -> "an orange")."""
    words = text.split()
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


TESTBED_TEMPLATES = "{testbed}"  # templates = the test bed's caption forms (see below)
SAME_ATTRIBUTE = "{same_attribute}"  # preserve = the other values of the erased attribute


def testbed_templates(attribute: int) -> list[str]:
    """The test bed's caption forms with ``{}`` in the slot of ``attribute`` (0 shape, 1 colour,
    2 background), the other attributes enumerated: "a {}", "a {} circle", ..., "a red circle on
    a {} background". Edits then see the token states the evaluation captions produce (the text
    encoder is causal: "a red" is the prefix of every caption naming red, while the word "red"
    alone gives other states)."""
    from jaxsafe.data import shapes

    slot = ["{}" if a == attribute else None for a in range(3)]
    forms = set()
    for s_ in (None,) + shapes.SHAPES:
        for c in (None,) + shapes.COLOURS:
            for b in (None,) + shapes.BACKGROUNDS:
                shape, colour, bg = (slot[0] or s_, slot[1] or c, slot[2] or b)
                if shape is None or (attribute == 0 and s_ is not None) or (
                        attribute == 1 and c is not None) or (attribute == 2 and b is not None):
                    continue
                words = ["a"] + ([colour] if colour else []) + [shape]
                forms.add(" ".join(words + ([f"on a {bg} background"] if bg else [])))
    if attribute == 1:
        forms.add("a {}")  # the prefix of every caption naming the colour
    return sorted(forms)


def _forms(templates: Sequence[str], word: str) -> list[str]:
    if list(templates) != [TESTBED_TEMPLATES]:
        return list(templates)
    from jaxsafe.data import shapes

    if word not in shapes.CONCEPTS:
        raise ValueError(f"templates {TESTBED_TEMPLATES!r} need test-bed concept words; got "
                         f"{word!r}")
    return testbed_templates(shapes.CONCEPTS[word][0])


def expand(templates: Sequence[str], words: Sequence[str], like: str | None = None) -> list[str]:
    """Prompts ``template.format(word)`` for every word (outer) and template (inner); no
    templates means the words themselves. ``templates = ("{testbed}",)`` stands for the test
    bed's caption forms of the word's attribute (of ``like``'s, for a guide word)."""
    if not templates:
        return list(words)
    return [fix_articles(t.format(w)) for w in words for t in _forms(templates, like or w)]


def preserve_words(concepts) -> list[str]:
    """``concepts.preserve`` with ``"{same_attribute}"`` replaced by the other values of the
    erased concepts' attributes (test bed: erasing red preserves orange, green and blue)."""
    from jaxsafe.data import shapes

    out = []
    for w in concepts.preserve:
        if w != SAME_ATTRIBUTE:
            out.append(w)
            continue
        erased = {shapes.CONCEPTS[e] for e in concepts.erase}
        for a in sorted({a for a, _ in erased}):
            out += [v for i, v in enumerate(shapes.ATTRIBUTES[a][1]) if (a, i) not in erased]
    return out


def prompt_pairs(concepts) -> list[tuple[str, str]]:
    """(erase prompt, guide prompt) pairs of a config's ``concepts``: each erased word with its
    guide (``guide``: one for all, or one per erased word) in every template."""
    erase, g = list(concepts.erase), concepts.guide
    g = [g] if isinstance(g, str) else list(g)
    guides = g * len(erase) if len(g) == 1 else g
    if len(guides) != len(erase):
        raise ValueError(f"concepts.guide: one guide or one per erased concept ({len(erase)}), "
                         f"got {len(guides)}")
    tpl = list(concepts.templates)
    return [(a, b) for w, gw in zip(erase, guides)
            for a, b in zip(expand(tpl, [w]), expand(tpl, [gw], like=w))]


def random_rows(loss_fn, batch_size: int):
    """Wraps ``loss_fn`` so that each step uses ``batch_size`` rows drawn (with replacement,
    from the step's key) from a fixed batch of prompt rows: every (erase, guide) pair is seen,
    with ESD's one prompt per iteration as ``batch_size = 1``."""

    def wrapped(params, frozen, extra, batch, rng):
        k_pick, k = jax.random.split(rng)
        n = jax.tree.leaves(batch)[0].shape[0]
        idx = jax.random.randint(k_pick, (batch_size,), 0, n)
        return loss_fn(params, frozen, extra, jax.tree.map(lambda x: x[idx], batch), k)

    return wrapped


def fixed_batch(x: jax.Array, batch_size: int) -> jax.Array:
    """Repeats the rows of ``x`` cyclically to ``batch_size`` rows (prompt sets as batches)."""
    x = jnp.asarray(x)
    return x[jnp.arange(batch_size) % x.shape[0]]


# --------------------------------------------------------------------------------------------
# Closed-form editors read and rewrite named kernels of the model.


def kernels(model: nnx.Module, names: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """``{name: array}`` of the model's parameters ``names`` (default: every cross-attention
    key/value kernel, ``jaxsafe.erasure.params.cross_attention_kv``)."""
    from jaxsafe.erasure.params import cross_attention_kv
    from jaxsafe.treepath import named_leaves

    named = named_leaves(nnx.state(model, nnx.Param))
    names = cross_attention_kv(named) if names is None else list(names)
    missing = [n for n in names if n not in named]
    if missing:
        raise KeyError(f"no parameter(s) {missing[:3]} in the model")
    return {n: jnp.asarray(named[n]) for n in names}


def set_kernels(model: nnx.Module, new: dict[str, jax.Array]) -> None:
    """Writes ``new`` (name -> array of the same shape) into the model's parameters in place."""
    from jaxsafe.treepath import path_name

    state = nnx.state(model, nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [path_name(p) for p, _ in flat]
    unknown = sorted(set(new) - set(names))
    if unknown:
        raise KeyError(f"no parameter(s) {unknown[:3]} in the model")
    leaves = []
    for n, (_, old) in zip(names, flat):
        if n in new:
            if tuple(new[n].shape) != tuple(old.shape):
                raise ValueError(f"{n}: new shape {tuple(new[n].shape)} != {tuple(old.shape)}")
            if not bool(jnp.all(jnp.isfinite(new[n]))):
                # e.g. a closed-form edit with λ = 0 and too few rows: A is singular.
                raise FloatingPointError(f"{n}: the edited tensor has non-finite values; "
                                         "the model was not changed")
            leaves.append(jnp.asarray(new[n], old.dtype))
        else:
            leaves.append(old)
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))


# --------------------------------------------------------------------------------------------
# Running a method: what launch/erase.py does, importable without its absl flags.


def erase(config, workdir: str) -> dict:
    """Runs the erasure method of ``config`` (``launch/erase.py``): ``edit(config, workdir)`` for
    closed-form and training-free methods, else the generic trainer then ``summarize``. Writes
    ``<workdir>/config.json`` and ``<workdir>/erasure.json`` (the summary, with the erasure's
    wall-clock time) and returns the summary."""
    import time

    from experiments import get
    from jaxsafe import parallel, train

    module = get(config.experiment)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    if hasattr(module, "edit"):
        summary = dict(module.edit(config, workdir))
        seconds = summary.pop("erase_seconds", time.perf_counter() - t0)
    else:
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        task = module.build(config, mesh)
        state = train.run(task, config.train, workdir, mesh)
        seconds = time.perf_counter() - t0
        summary = dict(module.summarize(config, state, task, workdir))
    summary = {"experiment": config.experiment, "variant": config.variant,
               "erase": list(config.concepts.erase), "erase_seconds": seconds, **summary}
    if parallel.is_primary():
        _write_atomic(os.path.join(workdir, "config.json"),
                      config.to_json_best_effort(indent=2, sort_keys=True))
        _write_atomic(os.path.join(workdir, "erasure.json"),
                      json.dumps(summary, indent=1, sort_keys=True, default=float))
    return summary


def _write_atomic(path: str, text: str) -> None:
    """Temporary file + rename: a killed run never leaves a half-written summary."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
