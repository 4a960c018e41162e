"""Hugging Face hub ids as model folders: ``CompVis/stable-diffusion-v1-4`` wherever a folder goes.

:func:`resolve` returns a local diffusers-layout folder for a folder path (unchanged) or a hub
id ``org/name`` (optionally ``org/name@revision``), through ``huggingface_hub.snapshot_download``:
the local cache first (``local_files_only``), used when its snapshot holds the requested
variant's weights (:func:`missing_weights`); else, unless the hub's offline mode is on
(``HF_HUB_OFFLINE=1``), a download of only what jaxsafe reads (:func:`allow_patterns`):
``model_index.json``, every component's JSON and tokenizer files, a test-bed export's latent
(``.npz``), the ``.safetensors`` weights of the requested variant of ``unet``, ``vae`` and
``text_encoder`` (``fp16``: ``*.fp16.safetensors``; none: the plain files), and the settings and
adapter files of an SPM, SAFREE or SFD export; never ``.bin`` / ``.ckpt``, nor the safety
checker's weights. When neither works, the error names the id, the revision, the variant and the
cache searched.
"""

from __future__ import annotations

import json
import os
import re

__all__ = ["is_hub_id", "resolve", "allow_patterns", "missing_weights"]

# org/name as the hub spells repository ids (letters, digits, '-', '_', '.'), optional @revision.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# The components jaxsafe loads weights of and their weight files' stem (diffusers' and
# transformers' names; jaxsafe/weights/diffusers.py).
WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
# Top-level files of the exports sampled their own way (launch/robustness_table.py).
EXPORT_FILES = ("spm.json", "spm_adapter.safetensors", "safree.json", "sfd.json")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as ``org/name[@revision]`` and is not an existing path."""
    return bool(_HUB_ID.match(spec)) and not os.path.exists(spec)


def _stem(component: str, variant: str | None) -> str:
    return f"{WEIGHTS[component]}.{variant}" if variant else WEIGHTS[component]


def allow_patterns(variant: str | None) -> list[str]:
    """The files of a diffusers repository that jaxsafe reads (module docstring); shards are
    ``<stem>-00001-of-0000N.safetensors`` (diffusers and transformers name variant shards
    ``<stem>.fp16-00001-of-0000N.safetensors``)."""
    weights = [
        f"{c}/{_stem(c, variant)}{shard}.safetensors" for c in WEIGHTS for shard in ("", "-*")
    ]
    return ["model_index.json", "*/*.json", "*/*.txt", "*/*.npz", *weights, *EXPORT_FILES]


def missing_weights(folder: str, variant: str | None) -> list[str]:
    """The weight files of ``variant`` that the pipeline in ``folder`` names (its
    ``model_index.json``: unet, vae, text_encoder) and ``folder`` lacks, relative to it: a
    cached snapshot can hold another variant only."""
    index_file = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_file):
        return ["model_index.json"]
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return []  # the loader names a malformed index
    missing = []
    for component in WEIGHTS:
        entry = index.get(component) if isinstance(index, dict) else None
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        single = f"{component}/{_stem(component, variant)}.safetensors"
        sharded = os.path.join(folder, single + ".index.json")
        if os.path.isfile(os.path.join(folder, single)):
            continue
        if not os.path.isfile(sharded):
            missing.append(single)
            continue
        try:
            with open(sharded, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # the loader names a malformed index
        missing += [
            f"{component}/{s}"
            for s in shards
            if not os.path.isfile(os.path.join(folder, component, s))
        ]
    return missing


def resolve(
    spec: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
) -> str:
    """A local folder for a folder path or a hub id (see module docstring).

    ``revision`` may also be given as ``org/name@revision``; ``cache_dir`` defaults to the hub's
    (``HF_HUB_CACHE``).
    """
    spec = os.fspath(spec)
    if not is_hub_id(spec):
        return spec
    repo_id, _, at = spec.partition("@")
    if at and revision and at != revision:
        raise ValueError(f"{spec!r}: revision {at!r} in the id and revision={revision!r} differ")
    revision = at or revision
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as e:
        raise ImportError(
            f"loading the hub id {repo_id!r} needs `pip install huggingface_hub`"
        ) from e
    cache = cache_dir or constants.HF_HUB_CACHE
    kwargs = dict(revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns(variant))
    cached, cached_error, missing = None, None, []
    try:
        cached = huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kwargs)
    except Exception as e:  # not in the cache: LocalEntryNotFoundError and kin
        cached_error = e
    if cached is not None:
        missing = missing_weights(cached, variant)
        if not missing:
            return cached
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "ON")
    why = "the hub's offline mode is on (HF_HUB_OFFLINE)"
    if not offline:
        try:
            return huggingface_hub.snapshot_download(repo_id, **kwargs)
        except Exception as e:  # no network, unknown or gated repository
            why = f"downloading failed ({type(e).__name__}: {str(e).splitlines()[0]})"
    what = f"revision {revision or 'main'}" + (f", variant {variant}" if variant else "")
    where = (
        f"is not in the cache {cache!r}"
        if cached is None
        else f"is in the cache {cache!r} without {', '.join(missing)}"
    )
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    raise FileNotFoundError(
        f"{spec!r} is no folder, and the hub model {repo_id!r} ({what}) {where}, and {why}; "
        f"download it where there is network (`{command}`) or pass a local folder"
    ) from cached_error
