"""Load and save Stable Diffusion pipelines in the diffusers folder layout, without torch.

Layout (what ``StableDiffusionPipeline.save_pretrained`` writes and the hub serves)::

    folder/model_index.json                    component -> [library, class]
    folder/unet/config.json                    UNet2DConditionModel config
    folder/unet/diffusion_pytorch_model.safetensors
    folder/vae/config.json + diffusion_pytorch_model.safetensors        AutoencoderKL
    folder/text_encoder/config.json + model.safetensors                 transformers CLIPTextModel
    folder/tokenizer/{vocab.json, merges.txt, ...}                      CLIPTokenizer
    folder/scheduler/scheduler_config.json

Weights may also be sharded (``<name>.safetensors.index.json``) or a precision variant
(``<name>.fp16.safetensors``, ``variant='fp16'``); pickled ``.bin`` files are refused (reading
them needs torch and runs arbitrary code). Saved folders load with diffusers'/transformers'
``from_pretrained``. Each loaded model carries its config as ``model.config``; the UNet's
``prediction_type`` comes from ``scheduler/scheduler_config.json`` when present.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.files import read_json
from jaxsafe.nn.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from jaxsafe.nn.clip_text import CLIPTextConfig, CLIPTextModel
from jaxsafe.nn.unet2d_condition import WOCT_CLASS, UNet2DConditionConfig, UNet2DConditionModel
from jaxsafe.weights.convert import (
    CheckpointError,
    load_params,
    model_params,
    params_to_state_dict,
    read_safetensors,
    read_sharded_index,
    state_dict_to_params,
    write_safetensors,
)

__all__ = [
    "load_pipeline",
    "load_text_encoder",
    "load_tokenizer",
    "load_unet",
    "load_vae",
    "save_pipeline",
    "save_text_encoder",
    "save_unet",
    "save_vae",
]

# The diffusers release whose layout and config keys this module was checked against.
DIFFUSERS_LAYOUT_VERSION = "0.42.1"
DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS = "diffusion_pytorch_model", "model"
CLIP_PREFIX = "text_model."
# Original-LDM VAE attention names still found in older hub checkpoints (e.g. SD 1.4's .bin
# converted to safetensors); diffusers renames them the same way on load.
VAE_LEGACY_RENAMES = [
    (r"\.query\.", ".to_q."),
    (r"\.key\.", ".to_k."),
    (r"\.value\.", ".to_v."),
    (r"\.proj_attn\.", ".to_out.0."),
]
COMPONENTS = {  # name -> (library, class) in model_index.json
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
}


ALIASES = {"tokenizer": ("CLIPTokenizerFast",)}  # loaded with CLIPTokenizer all the same


def _read_json(file: Path) -> dict:
    try:
        value = read_json(file)
    except ValueError as e:  # FileNotFoundError passes
        raise CheckpointError(str(e)) from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def component_dir(folder: Path | str, name: str) -> Path:
    """``folder/name`` for a pipeline folder, or ``folder`` itself if it is the component."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} not found")
    for d in (folder / name, folder):
        if (d / "config.json").is_file():
            return d
    raise FileNotFoundError(
        f"{name}: neither {str(folder / name / 'config.json')!r} nor "
        f"{str(folder / 'config.json')!r} exists"
    )


def _weight_files(d: Path, stem: str, variant: str | None) -> list[Path]:
    name = f"{stem}.{variant}" if variant else stem
    single, index = d / f"{name}.safetensors", d / f"{name}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        return read_sharded_index(index)
    if (d / f"{name}.bin").is_file():
        raise CheckpointError(
            f"{d / f'{name}.bin'}: pickled PyTorch weights are not supported; "
            "convert them to safetensors (e.g. save_pretrained with "
            "safe_serialization=True)"
        )
    raise FileNotFoundError(f"no weights in {str(d)!r}: expected {single.name!r} or {index.name!r}")


def _check_class(config: dict, d: Path, expected: str, key: str = "_class_name") -> None:
    found = config.get(key)
    if isinstance(found, list):  # transformers' "architectures"
        found = found[0] if len(found) == 1 else found
    if found is not None and found != expected:
        raise ValueError(f"{d / 'config.json'}: {key}={found!r}, expected {expected!r}")


def _load(
    model_cls,
    cfg,
    files: list[Path],
    *,
    dtype,
    param_dtype,
    prefix: str | None = "",
    renames=(),
    ignore=(),
):
    """Builds the model abstractly and fills it; ``prefix=None`` detects CLIP's ``text_model.``."""
    abstract = nnx.eval_shape(
        lambda: model_cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    state_dict = read_safetensors(files)
    if prefix is None:
        prefix = CLIP_PREFIX if any(k.startswith(CLIP_PREFIX) for k in state_dict) else ""
    params = state_dict_to_params(
        state_dict,
        model_params(abstract),
        prefix=prefix,
        source=", ".join(str(f) for f in files),
        renames=renames,
        ignore=ignore,
    )
    return load_params(abstract, params)


def _scheduler_config(component_dir: Path) -> dict | None:
    for f in (
        component_dir.parent / "scheduler" / "scheduler_config.json",
        component_dir / "scheduler" / "scheduler_config.json",
    ):
        if f.is_file():
            return _read_json(f)
    return None


def load_unet(
    folder,
    *,
    variant: str | None = None,
    dtype=None,
    param_dtype=jnp.float32,
    component: str = "unet",
    time_conditioning: bool = True,
) -> tuple[UNet2DConditionModel, UNet2DConditionConfig]:
    """The UNet of a pipeline folder (or of a ``unet/`` folder); ``component="oms_module",
    time_conditioning=False``: One More Step's time-free ``UNet2DConditionWoCTModel``."""
    d = component_dir(folder, component)
    raw = _read_json(d / "config.json")
    _check_class(raw, d, "UNet2DConditionModel" if time_conditioning else WOCT_CLASS)
    if raw.get("_class_name") is None:
        raw = {**raw, "_class_name": "UNet2DConditionModel" if time_conditioning else WOCT_CLASS}
    sched = _scheduler_config(d)
    if sched and "prediction_type" in sched and "prediction_type" not in raw:
        raw = {**raw, "prediction_type": sched["prediction_type"]}
    cfg = UNet2DConditionConfig.from_dict(raw)
    model = _load(
        UNet2DConditionModel,
        cfg,
        _weight_files(d, DIFFUSERS_WEIGHTS, variant),
        dtype=dtype,
        param_dtype=param_dtype,
    )
    return model, cfg


def load_vae(
    folder, *, variant: str | None = None, dtype=None, param_dtype=jnp.float32
) -> tuple[AutoencoderKL, AutoencoderKLConfig]:
    """The VAE of a pipeline folder (or of a ``vae/`` folder)."""
    d = component_dir(folder, "vae")
    raw = _read_json(d / "config.json")
    _check_class(raw, d, "AutoencoderKL")
    cfg = AutoencoderKLConfig.from_dict(raw)
    model = _load(
        AutoencoderKL,
        cfg,
        _weight_files(d, DIFFUSERS_WEIGHTS, variant),
        dtype=dtype,
        param_dtype=param_dtype,
        renames=VAE_LEGACY_RENAMES,
    )
    return model, cfg


def load_text_encoder(
    folder, *, variant: str | None = None, dtype=None, param_dtype=jnp.float32
) -> tuple[CLIPTextModel, CLIPTextConfig]:
    """The CLIP text encoder of a pipeline folder (or of a ``text_encoder/`` folder).

    Keys may carry transformers' ``text_model.`` prefix (hub files, transformers 4.x) or not.
    """
    d = component_dir(folder, "text_encoder")
    raw = _read_json(d / "config.json")
    _check_class(raw, d, "CLIPTextModel", key="architectures")
    cfg = CLIPTextConfig.from_dict(raw)
    model = _load(
        CLIPTextModel,
        cfg,
        _weight_files(d, TRANSFORMERS_WEIGHTS, variant),
        dtype=dtype,
        param_dtype=param_dtype,
        prefix=None,
        ignore=[r"embeddings\.position_ids$"],
    )
    return model, cfg


def load_tokenizer(folder):
    """``transformers.CLIPTokenizer`` from ``folder/tokenizer`` (or ``folder``)."""
    try:
        from transformers import CLIPTokenizer
    except ImportError as e:
        raise ImportError(
            "load_tokenizer needs the optional dependency `transformers` (pip install transformers)"
        ) from e
    folder = Path(folder)
    d = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    # Hub folders ship vocab.json + merges.txt; transformers >= 5 saves only tokenizer.json.
    if not (
        (d / "tokenizer.json").is_file()
        or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())
    ):
        raise FileNotFoundError(
            f"tokenizer files not found in {str(d)!r}: expected "
            "'vocab.json' and 'merges.txt', or 'tokenizer.json'"
        )
    try:
        return CLIPTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 (transformers raises bare Exception, OSError, ...)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"tokenizer files in {str(d)!r} cannot be read as a CLIP tokenizer "
            f"({type(e).__name__}: {first})"
        ) from e


_LOADERS: dict[str, Callable] = {
    "unet": load_unet,
    "vae": load_vae,
    "text_encoder": load_text_encoder,
}


def load_pipeline(
    folder,
    *,
    components: Sequence[str] | None = None,
    variant: str | None = None,
    revision: str | None = None,
    dtype=None,
    param_dtype=jnp.float32,
) -> dict[str, Any]:
    """Everything of a diffusers pipeline folder that jaxsafe models.

    Returns ``dict(unet=UNet2DConditionModel, vae=AutoencoderKL, text_encoder=CLIPTextModel,
    tokenizer=CLIPTokenizer, scheduler_config=dict, model_index=dict)``; components the folder
    lacks are absent (``components`` restricts the set further). Configs are ``model.config``.
    ``folder`` may be a hub id ``org/name[@revision]`` (``jaxsafe.weights.hub.resolve``), the
    revision also given as ``revision`` (a ValueError when the two differ).
    """
    from jaxsafe.weights import hub

    folder = Path(hub.resolve(str(folder), revision=revision, variant=variant))
    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder {str(folder)!r} not found")
    index = _read_json(folder / "model_index.json")
    wanted = list(COMPONENTS) if components is None else list(components)
    unknown = [c for c in wanted if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"components: unknown {unknown}; expected a subset of {list(COMPONENTS)}")
    out: dict[str, Any] = {"model_index": index}
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        out["scheduler_config"] = _read_json(sched)
    for name in wanted:
        entry = index.get(name)
        if not entry or entry[1] is None or not (folder / name).is_dir():
            continue
        if entry[1] not in (COMPONENTS[name][1], *ALIASES.get(name, ())):
            raise ValueError(
                f"{folder / 'model_index.json'}: {name} is {entry[1]!r}; jaxsafe "
                f"loads only {COMPONENTS[name][1]!r}"
            )
        if name == "tokenizer":
            out[name] = load_tokenizer(folder)
        else:
            out[name], _ = _LOADERS[name](
                folder, variant=variant, dtype=dtype, param_dtype=param_dtype
            )
    return out


def _save(model: nnx.Module, config_dict: dict, folder, stem: str, prefix: str = "") -> Path:
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    state_dict = params_to_state_dict(
        {p: np.asarray(x) for p, x in model_params(model).items()}, prefix=prefix
    )
    write_safetensors(state_dict, d / f"{stem}.safetensors")
    (d / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return d


def _check_config(model, config, what):
    if getattr(model, "config", config) != config:
        raise ValueError(f"{what}: config does not match model.config ({model.config})")


def save_unet(model: UNet2DConditionModel, config: UNet2DConditionConfig, folder) -> Path:
    """``folder/config.json`` + ``folder/diffusion_pytorch_model.safetensors`` (a ``unet/`` dir)."""
    _check_config(model, config, "save_unet")
    cfg = {**config.to_diffusers_dict(), "_diffusers_version": DIFFUSERS_LAYOUT_VERSION}
    return _save(model, cfg, folder, DIFFUSERS_WEIGHTS)


def save_vae(model: AutoencoderKL, config: AutoencoderKLConfig, folder) -> Path:
    """``folder/config.json`` + ``folder/diffusion_pytorch_model.safetensors`` (a ``vae/`` dir)."""
    _check_config(model, config, "save_vae")
    cfg = {**config.to_diffusers_dict(), "_diffusers_version": DIFFUSERS_LAYOUT_VERSION}
    return _save(model, cfg, folder, DIFFUSERS_WEIGHTS)


def save_text_encoder(model: CLIPTextModel, config: CLIPTextConfig, folder) -> Path:
    """``folder/config.json`` + ``folder/model.safetensors`` with ``text_model.`` keys."""
    _check_config(model, config, "save_text_encoder")
    return _save(model, config.to_hf_dict(), folder, TRANSFORMERS_WEIGHTS, prefix=CLIP_PREFIX)


_SAVERS: dict[str, Callable] = {
    "unet": save_unet,
    "vae": save_vae,
    "text_encoder": save_text_encoder,
}


def save_pipeline(components: dict[str, Any], folder) -> Path:
    """Writes a diffusers pipeline folder from a :func:`load_pipeline`-style dict.

    ``components`` may hold ``unet``, ``vae``, ``text_encoder`` (models, saved with their
    ``.config``), ``tokenizer`` (a transformers tokenizer, ``save_pretrained``),
    ``scheduler_config`` (a dict with ``_class_name``) and ``model_index`` (extra entries kept).
    """
    folder = Path(folder)
    unknown = set(components) - set(COMPONENTS) - {"scheduler_config", "model_index"}
    if unknown:
        raise ValueError(
            f"save_pipeline: unknown component(s) {sorted(unknown)}; expected "
            f"{list(COMPONENTS) + ['scheduler_config', 'model_index']}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    # Keep the old index's plain settings, not its component entries: only the components
    # written here exist in the new folder (a hub safety_checker entry would break loading).
    old = {k: v for k, v in components.get("model_index", {}).items() if not isinstance(v, list)}
    index = {
        "_class_name": "StableDiffusionPipeline",
        **old,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    index["_diffusers_version"] = DIFFUSERS_LAYOUT_VERSION
    for name, saver in _SAVERS.items():
        if name in components:
            model = components[name]
            saver(model, model.config, folder / name)
            index[name] = list(COMPONENTS[name])
    if "tokenizer" in components:
        components["tokenizer"].save_pretrained(str(folder / "tokenizer"))
        index["tokenizer"] = list(COMPONENTS["tokenizer"])
    sched = components.get("scheduler_config")
    if sched is not None:
        if "_class_name" not in sched:
            raise ValueError(
                "save_pipeline: scheduler_config needs '_class_name' (e.g. 'DDIMScheduler')"
            )
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index["scheduler"] = ["diffusers", sched["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
