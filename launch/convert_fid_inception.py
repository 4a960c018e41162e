r"""Converts pytorch-fid's FID Inception weights to the safetensors file jaxsafe loads.

    pip install -e '.[torch]'
    python -m launch.convert_fid_inception --pth=pt_inception-2015-12-05-6726825d.pth \
        --out=~/fid_inception.safetensors
    export JAXSAFE_FID_INCEPTION=~/fid_inception.safetensors

``--pth`` is pytorch-fid's port of TensorFlow's 2015-12-05 Inception graph (the user downloads
it: mseitzer/pytorch-fid's release ``fid_weights``; nothing is fetched here). The file keeps
torch's tensor names and layouts, less the classifier head (``fc.*``) and BatchNorm's step
counters; every tensor is checked against :class:`jaxsafe.nn.inception.FIDInceptionV3` before
the file is written (atomically), so a wrong or truncated ``.pth`` never leaves an output.
Errors are one line on stderr with exit status 2 (``--debug`` shows the traceback).
"""

import os

from absl import app, flags

from launch import user_errors


def _define_flags() -> None:
    global _PTH, _OUT
    _PTH = flags.DEFINE_string("pth", None, "pytorch-fid's pt_inception-2015-12-05-*.pth.")
    _OUT = flags.DEFINE_string("out", None, "Output .safetensors file.")
    flags.mark_flags_as_required(["pth", "out"])


def convert_file(pth: str, out: str) -> int:
    """Writes ``out`` from ``pth``; returns the number of tensors written."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("converting a .pth needs torch: pip install -e '.[torch]'") from e
    from jaxsafe.nn import inception
    from jaxsafe.weights import convert

    if not os.path.isfile(pth):
        raise FileNotFoundError(f"--pth {pth!r} not found")
    try:
        raw = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds on damaged files
        raise ValueError(f"{pth}: cannot read as a torch state dict ({type(e).__name__}: {e})")
    if not isinstance(raw, dict):
        raise ValueError(f"{pth}: expected a state dict, got {type(raw).__name__}")
    state = {
        k: v.detach().float().numpy()
        for k, v in raw.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    inception.from_state_dict(state, source=pth)  # names and shapes, before anything is written
    convert.write_safetensors(state, out)  # whole or not at all, with the tensors' checksums
    return len(state)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = os.path.expanduser(_OUT.value)
    n = convert_file(os.path.expanduser(_PTH.value), out)
    print(f"wrote {n} tensors to {out}")


if __name__ == "__main__":
    _define_flags()
    user_errors.run(main)
