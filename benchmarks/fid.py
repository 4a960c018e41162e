r"""Throughput of the FID Inception-v3's pool3 features (what every FID evaluation waits for).

    python -m benchmarks.fid [--batch_sizes=16,64] [--resolution=32] [--calls=3] [--reference]

Per batch size: compile time, images/s of ``jaxsafe.diffusion.fid.feature_fn`` (uint8 images of
``--resolution``, resized to 299×299 inside, as CIFAR-10 samples are scored), XLA's planned
peak memory and the achieved FLOP/s (cost analysis × calls/s) against the measured f32 matmul
peak. The weights are random (He-scaled): throughput does not depend on them. ``--reference``
times pytorch-fid's network in PyTorch (``benchmarks/reference/inception.py``, the same weights,
``torch.no_grad``) in turn with jaxsafe's (A B A B) and prints the ratio (> 1: jaxsafe faster).
"""

from absl import app, flags

_BATCHES = flags.DEFINE_list("batch_sizes", ["16", "64"], "Batch sizes, one row each.")
_RES = flags.DEFINE_integer("resolution", 32, "Input image size (resized to 299 inside).")
_CALLS = flags.DEFINE_integer("calls", 3, "Calls per timing round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of the arms in turn.")
_REFERENCE = flags.DEFINE_bool("reference", False, "Also time pytorch-fid's network in PyTorch.")


def main(argv):
    del argv
    import time

    import jax
    import numpy as np
    from flax import nnx

    from benchmarks.common import (
        alternate,
        fmt_bytes,
        machine,
        matmul_peak_flops,
        memory_bytes,
        model_flops,
    )
    from jaxsafe.data import images
    from jaxsafe.nn import inception
    from jaxsafe.weights import convert

    print(machine())
    peak = matmul_peak_flops()
    print(f"f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    model = inception.FIDInceptionV3(rngs=nnx.Rngs(0))
    gain = lambda k: np.float32(np.sqrt(2.0) if k.endswith("kernel") else 1.0)  # noqa: E731
    params = {
        k: np.asarray(v, np.float32) * gain(k) for k, v in convert.model_params(model).items()
    }
    model = convert.load_params(inception.abstract(), params)
    graphdef, state = nnx.split(model)
    apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    torch_sd = None
    if _REFERENCE.value:
        import torch

        from benchmarks.reference import inception as reference
        from benchmarks.reference import torch_threads

        print(f"PyTorch reference: torch {torch.__version__}, {torch_threads()} threads")
        torch_sd = {k: torch.from_numpy(v) for k, v in convert.params_to_state_dict(params).items()}
    rng = np.random.default_rng(0)
    for b in map(int, _BATCHES.value):
        u8 = rng.integers(0, 256, (b, _RES.value, _RES.value, 3), dtype=np.uint8)
        x = jax.device_put(images.to_float(u8))
        t0 = time.perf_counter()
        compiled = apply.lower(state, x).compile()
        compile_s = time.perf_counter() - t0
        arms = {"jaxsafe": (lambda: compiled(state, x), _CALLS.value)}
        if torch_sd is not None:
            tx = torch.from_numpy(u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()

            def ref_call(tx=tx):
                with torch.no_grad():
                    reference.forward(torch_sd, tx)
                return 0

            arms["pytorch-fid"] = (ref_call, _CALLS.value)
        sec = {k: float(np.median(v)) for k, v in alternate(arms, _ROUNDS.value).items()}
        flops = model_flops(apply.lower, state, x)
        s = sec["jaxsafe"]
        line = (
            f"batch {b:4d}  compile {compile_s:6.1f} s  {b / s:7.2f} images/s  "
            f"{flops / s / 1e9:7.1f} GFLOP/s ({100 * flops / s / peak:4.1f} % of peak)  "
            f"memory {fmt_bytes(memory_bytes(compiled))}"
        )
        if "pytorch-fid" in sec:
            r = sec["pytorch-fid"]
            line += f"  PyTorch {b / r:7.2f} images/s  {r / s:5.2f}x the reference"
        print(line, flush=True)


if __name__ == "__main__":
    app.run(main)
