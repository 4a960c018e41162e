"""Shared pieces of the notebooks' cell sources (one module per notebook in this folder)."""

from nbformat.v4 import new_code_cell, new_markdown_cell

__all__ = ["SETUP", "code", "md"]

SETUP = """\
import os, sys
JAXSAFE_REPO = "https://github.com/jaxsafe/jaxsafe"  # set to the repository you cloned from
if "google.colab" in sys.modules:  # Colab: install jaxsafe and work from its checkout
    !git clone -q {JAXSAFE_REPO} /content/jaxsafe && pip install -q -e /content/jaxsafe
    # jaxsafe's pinned jax is the CPU build: on a GPU or TPU runtime add the matching backend.
    if os.path.exists("/dev/nvidia0"):
        !pip install -q "jax[cuda12]>=0.10,<0.11"
    elif os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ:
        !pip install -q "jax[tpu]>=0.10,<0.11"
    %cd /content/jaxsafe
"""

md = new_markdown_cell
code = new_code_cell
