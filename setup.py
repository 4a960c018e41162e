"""jaxsafe: safer and more robust generative and representation models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="jaxsafe",
    version="0.1.0",
    description=(
        "JAX/Flax reimplementations of methods for safer, more robust generative and "
        "representation models (grokking numerics, diffusion, concept erasure, contrastive)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["jaxsafe*", "experiments*", "configs*", "launch*"]),
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "chex>=0.1.88,<0.2",
        "absl-py>=2.1",
        "ml_collections>=1.0",
        "grain>=0.2.10,<0.3",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "scipy>=1.11",
        "scikit-learn>=1.3",  # ships the 8x8 digits used by the offline diffusion runs
        "pillow>=10",
        "safetensors>=0.4",  # diffusers-layout checkpoints, read/written without torch
        "aeon>=1.0",  # ships UCR/UEA .ts files used offline (located, never imported)
    ],
    package_data={"jaxsafe": ["data/assets/*", "data/assets/testbed_model/*",
                              "data/assets/testbed_model/*/*",
                              "data/assets/testbed_lightness/*",
                              "data/assets/testbed_lightness/*/*"]},
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbformat>=5.9", "nbclient>=0.10",
                 "ipykernel>=6.29"],
        # Reference checks against diffusers/transformers, and CLIP tokenizers of real SD folders.
        "torch": ["torch==2.13.0", "diffusers>=0.30", "transformers>=4.40"],
        "tfds": ["tensorflow-datasets>=4.9"],  # CIFAR-10 / FFHQ via tfds.data_source
        "ptbxl": ["wfdb>=4.1"],
        # The nudity judge of the attacks (ships its ONNX detector; jaxsafe.attacks.judges).
        "nudenet": ["nudenet>=3.4"],
    },
)
