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
        "jax>=0.10,<0.11",  # the arrays, jit, shardings
        "flax>=0.12,<0.13",  # NNX modules of every network
        "optax>=0.2.4,<0.3",  # optimizers and schedules
        "orbax-checkpoint>=0.11,<0.13",  # the trainer's checkpoints
        "absl-py>=2.1",  # launchers' flags and logging
        "ml_collections>=1.0",  # configs
        "grain>=0.2.10,<0.3",  # input pipelines (MapDataset over sources)
        "numpy>=1.26",  # host-side arrays: data sources, metrics, statistics files
        "matplotlib>=3.8",  # PNG plots of runs and studies
        "tensorboardX>=2.6",  # TensorBoard event files next to metrics.jsonl
        "scikit-learn>=1.3",  # ships the 8x8 digits used by the offline diffusion runs
        "pillow>=10",  # PNG grids and image folders
        "safetensors>=0.4",  # diffusers-layout checkpoints, read/written without torch
        "aeon>=1.0",  # ships UCR/UEA .ts files used offline (located, never imported)
        "huggingface_hub>=0.34",  # hub ids as model folders (jaxsafe.weights.hub); 0.34: `hf` CLI
        "transformers>=4.40",  # the CLIP tokenizer of real SD folders (no torch needed)
    ],
    package_data={
        "jaxsafe": [
            "data/assets/*",
            "data/assets/testbed_model/*",
            "data/assets/testbed_model/*/*",
            "data/assets/testbed_lightness/*",
            "data/assets/testbed_lightness/*/*",
        ]
    },
    extras_require={
        # pytest; chex's tree assertions; SciPy as an independent reference (sqrtm, FID);
        # executing the notebooks; ruff, pinned so that `ruff format --check` is the same
        # everywhere (.ci/run, .pre-commit-config.yaml).
        "test": [
            "ruff==0.17.6",
            "pytest>=8",
            "pytest-xdist>=3.5",
            "chex>=0.1.88,<0.2",
            "scipy>=1.11",
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
        ],
        # Reference checks against PyTorch and diffusers/transformers' models; the FID Inception
        # converter (launch/convert_fid_inception.py).
        "torch": ["torch==2.13.0", "diffusers>=0.30"],
        "tfds": ["tensorflow-datasets>=4.9"],  # CIFAR-10 / FFHQ via tfds.data_source
        "ptbxl": ["wfdb>=4.1"],  # reads PTB-XL's WFDB records (jaxsafe.data.timeseries)
        # The nudity judge of the attacks (ships its ONNX detector; jaxsafe.attacks.judges).
        "nudenet": ["nudenet>=3.4"],
    },
)
