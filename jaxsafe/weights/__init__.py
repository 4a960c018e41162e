"""Loading, converting and saving public checkpoints (safetensors, diffusers layout)."""

from jaxsafe.weights.convert import CheckpointError
from jaxsafe.weights.diffusers import (
    load_pipeline,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    save_pipeline,
    save_text_encoder,
    save_unet,
    save_vae,
)

__all__ = [
    "CheckpointError",
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
