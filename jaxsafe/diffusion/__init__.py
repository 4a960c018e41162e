"""Diffusion maths: EDM preconditioning and schedule (Karras et al., 2022), PFGM++ kernels for any D
(Xu et al., 2023; D -> inf is EDM), Heun/Euler samplers, Fréchet distance and robustness probes."""

from jaxsafe.diffusion.edm import (
    SIGMA_DATA,
    as_batch_sigma,
    denoise,
    edm_sigma_steps,
    loss_weight,
    precondition,
    sample_training_sigma,
)
from jaxsafe.diffusion.metrics import frechet_distance, gaussian_stats
from jaxsafe.diffusion.pfgmpp import (
    check_D,
    denoising_loss,
    perturbation,
    perturbation_student_t,
    prior_sample,
    r_from_sigma,
)
from jaxsafe.diffusion.robustness import quantize_params, quantize_tensor
from jaxsafe.diffusion.samplers import euler_sampler, heun_sampler

__all__ = [
    "SIGMA_DATA",
    "as_batch_sigma",
    "check_D",
    "denoise",
    "denoising_loss",
    "edm_sigma_steps",
    "euler_sampler",
    "frechet_distance",
    "gaussian_stats",
    "heun_sampler",
    "loss_weight",
    "perturbation",
    "perturbation_student_t",
    "precondition",
    "prior_sample",
    "quantize_params",
    "quantize_tensor",
    "r_from_sigma",
    "sample_training_sigma",
]
