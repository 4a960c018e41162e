"""Hugging Face hub ids as model folders: ``CompVis/stable-diffusion-v1-4`` wherever a folder goes.

:func:`resolve` returns a local diffusers-layout folder for a folder path (unchanged) or a hub
id ``org/name`` (optionally ``org/name@revision``), through ``huggingface_hub.snapshot_download``:
the local cache first (``local_files_only``), then, unless the hub's offline mode is on
(``HF_HUB_OFFLINE=1``), a download of only what jaxsafe reads — ``model_index.json``, every
component's JSON and tokenizer files, a test-bed export's latent (``.npz``), and the
``.safetensors`` weights of the requested variant
(``fp16``: ``*.fp16.safetensors``; none: the plain files), never ``.bin`` / ``.ckpt``. When
neither works the error names the id, the revision and the cache folder searched.
"""

from __future__ import annotations

import os
import re

__all__ = ["is_hub_id", "resolve", "allow_patterns"]

# org/name as the hub spells repository ids (letters, digits, '-', '_', '.'), optional @revision.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as ``org/name[@revision]`` and is not an existing path."""
    return bool(_HUB_ID.match(spec)) and not os.path.exists(spec)


def allow_patterns(variant: str | None) -> list[str]:
    """The files of a diffusers repository that jaxsafe reads (module docstring)."""
    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    return ["model_index.json", "*/*.json", "*/*.txt", "*/*.npz", "*/" + weights]


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
    try:
        return huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kwargs)
    except Exception as cached_error:  # not in the cache: LocalEntryNotFoundError and kin
        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "ON")
        why = "the hub's offline mode is on (HF_HUB_OFFLINE)" if offline else None
        if not offline:
            try:
                return huggingface_hub.snapshot_download(repo_id, **kwargs)
            except Exception as e:  # no network, unknown or gated repository
                why = f"downloading failed ({type(e).__name__}: {str(e).splitlines()[0]})"
        raise FileNotFoundError(
            f"{spec!r} is no folder, and the hub model {repo_id!r} (revision "
            f"{revision or 'main'}) is not in the cache {cache!r} and {why}; download it where "
            f"there is network (`hf download {repo_id}`) or pass a local folder"
        ) from cached_error
