r"""Erases concepts from a text-to-image model: any method of ``configs/erasure/``.

    python -m launch.erase --config=configs/erasure/uce.py:cpu --workdir=/tmp/uce_square
    python -m launch.erase --config=configs/erasure/esd.py --workdir=/tmp/esd_nudity \
        --config.model.folder=/path/to/stable-diffusion-v1-4

The model is a diffusers-layout folder or a Hugging Face hub id ``org/name[@revision]``
(``--config.model.folder``, e.g. ``CompVis/stable-diffusion-v1-4``, with
``--config.model.revision`` / ``--config.model.variant=fp16``; read from the hub cache or
downloaded where the network allows: ``jaxsafe.weights.hub``); the ``cpu``/``smoke`` variants
default to the shipped test-bed model. The edited model is written to
``<workdir>/export`` in the same layout (or the method's adapter file next to a copy of the
original), with ``<workdir>/summary.json``: the method, the wall-clock time of the erasure and,
on the test bed, the erasure metrics (docs/erasure.md).

Trained methods (ESD, SPM, AdvUnlearn, SafeGen, TRCE's second stage) go through the generic
trainer: a rerun in the same workdir resumes from the latest checkpoint. Closed-form and
training-free methods (UCE, RECE, SAFREE) define ``edit(config, workdir)``.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from jaxsafe import compilation_cache as cache
from jaxsafe import host_memory
from launch import user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Erasure config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, the edited model and metrics."
)
cache.define_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    from jaxsafe.train.metrics import quiet_orbax

    quiet_orbax()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from experiments import run_experiment

    cache.enable_from_flag()
    host_memory.retain()  # XLA's temporaries stay mapped between calls
    summary = run_experiment(_CONFIG.value, _WORKDIR.value)
    logging.info("erasure: %s", json.dumps(summary, sort_keys=True, default=float))
    print(json.dumps(summary, indent=1, sort_keys=True, default=float))


if __name__ == "__main__":
    user_errors.run(main)
