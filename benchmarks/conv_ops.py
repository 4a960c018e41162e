r"""Where a conv net's step goes on the host: its pieces one by one, jaxsafe against PyTorch.

    python -m benchmarks.conv_ops [--shapes=8x32x32x256,64x16x16x64] [--reference]

    python -m benchmarks.conv_ops --ops=conv3x3,conv3x3_xla --reference \
        --shapes=8x32x32x256,2x64x64x320,2x32x32x640,2x16x16x1280,2x8x8x1280

Per NHWC activation shape ``BxHxWxC`` it times, forward and forward + backward (the gradient of
``sum(out * g)`` for a fixed random ``g``, with respect to the input and, for the convolutions,
the filter), each piece of EDM's DDPM++ block as jaxsafe runs it (``--ops``: a subset):

* ``conv3x3``: ``jaxsafe.nn.conv3x3.conv_general_dilated``, C -> C, 'SAME' (Winograd or im2col
  on the CPU where it applies, as the SD layers, SongUNet and the Inception run it), and, for the
  record, ``conv3x3_xla``: XLA's ``lax.conv_general_dilated`` it replaced;
* ``groupnorm+silu``: ``jaxsafe.nn.songunet.GroupNorm`` (float32 statistics) then SiLU;
* ``fir_down`` / ``fir_up``: the (1, 1) FIR resampling as jaxsafe runs it (separable shifted
  multiply-adds) and, for the record, as the depthwise convolution it replaced
  (``feature_group_count = C``);
* ``dropout``: a 13 % dropout mask drawn with JAX's default (threefry) key.

The arms are timed in turn (A B A B, median of the rounds). ``--reference`` adds PyTorch's
``conv2d``, ``GroupNorm`` + ``silu``, ``avg_pool2d`` / ``interpolate(nearest)`` and ``dropout``
on NCHW tensors (oneDNN's kernels on the CPU) and prints the ratio (> 1: jaxsafe faster).
"""

from absl import app, flags

_SHAPES = flags.DEFINE_list("shapes", ["8x32x32x256", "64x16x16x64"], "BxHxWxC per block.")
_REPS = flags.DEFINE_integer("reps", 5, "Calls per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of the arms in turn.")
_REFERENCE = flags.DEFINE_bool("reference", False, "Also time PyTorch's kernels.")
_OPS = flags.DEFINE_list("ops", [], "Pieces to time (default: all).")


def _jax_ops(b, h, w, c):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxsafe.nn import conv3x3, songunet

    dn = ("NHWC", "HWIO", "NHWC")
    kernel = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, c, c)) * 0.05, jnp.float32)
    gd, gp = nnx.split(songunet.GroupNorm(c, eps=1e-6))
    box = np.array([0.5, 0.5])
    f2d = np.full((2, 2, 1, c), 0.25, np.float32)

    def depthwise_down(x):
        return jax.lax.conv_general_dilated(
            x, f2d, (2, 2), [(0, 0)] * 2, dimension_numbers=dn, feature_group_count=c
        )

    def depthwise_up(x):
        return jax.lax.conv_general_dilated(
            x,
            4 * f2d,
            (1, 1),
            [(1, 1)] * 2,
            lhs_dilation=(2, 2),
            dimension_numbers=dn,
            feature_group_count=c,
        )

    key = jax.random.key(0)
    # name -> (fn(x, p), p): p is the filter the gradient also flows to, or None.
    return {
        "conv3x3": (
            lambda x, k: conv3x3.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn),
            kernel,
        ),
        "conv3x3_xla": (
            lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn),
            kernel,
        ),
        "groupnorm+silu": (lambda x, _: jax.nn.silu(nnx.merge(gd, gp)(x)), None),
        "fir_down": (lambda x, _: songunet._fir_down(x, box, 0), None),
        "fir_down (depthwise conv)": (lambda x, _: depthwise_down(x), None),
        "fir_up": (lambda x, _: songunet._fir_up(x, box, 0), None),
        "fir_up (depthwise conv)": (lambda x, _: depthwise_up(x), None),
        "dropout": (
            lambda x, _: jnp.where(jax.random.bernoulli(key, 0.87, x.shape), x / 0.87, 0),
            None,
        ),
    }


def _torch_ops(c):
    import torch

    F = torch.nn.functional
    kernel = (torch.randn(c, c, 3, 3) * 0.05).requires_grad_()
    gn = torch.nn.GroupNorm(min(32, c // 4), c, eps=1e-6)
    conv = (lambda x: F.conv2d(x, kernel, padding=1), kernel)
    return {
        "conv3x3": conv,
        "conv3x3_xla": conv,
        "groupnorm+silu": (lambda x: F.silu(gn(x)), None),
        "fir_down": (lambda x: F.avg_pool2d(x, 2), None),
        "fir_up": (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), None),
        "dropout": (lambda x: F.dropout(x, 0.13, training=True), None),
    }


def main(argv):
    del argv
    import jax
    import numpy as np

    from benchmarks.common import alternate, machine

    print(f"machine: {machine()}")
    if _REFERENCE.value:
        import torch

        from benchmarks.reference import torch_threads

        print(f"PyTorch reference: {torch_threads()} threads")
    for spec in _SHAPES.value:
        b, h, w, c = map(int, spec.split("x"))
        r = np.random.default_rng(0)
        x = r.standard_normal((b, h, w, c)).astype(np.float32)
        arms = {}
        wanted = lambda name: not _OPS.value or name in _OPS.value
        for name, (fn, p) in _jax_ops(b, h, w, c).items():
            if not wanted(name):
                continue
            out = jax.eval_shape(fn, x, p)
            g = r.standard_normal(out.shape).astype(np.float32)
            fwd = jax.jit(fn)
            # g is an argument: as a constant, XLA would fold the whole gradient of a linear op.
            both = jax.jit(
                jax.grad(
                    lambda x, p, g, fn=fn: (fn(x, p) * g).sum(), (0, 1) if p is not None else 0
                )
            )
            arms[name, "forward"] = (lambda f=fwd, p=p: f(x, p), _REPS.value)
            arms[name, "fwd+bwd"] = (lambda f=both, p=p, g=g: f(x, p, g), _REPS.value)
        if _REFERENCE.value:
            tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
            leaf = tx.clone().requires_grad_()
            for name, (fn, p) in _torch_ops(c).items():
                if not wanted(name):
                    continue
                with torch.no_grad():
                    tg = torch.randn_like(fn(tx))
                wrt = (leaf,) if p is None else (leaf, p)

                def fwd(fn=fn):
                    with torch.no_grad():
                        return fn(tx)

                arms["torch " + name, "forward"] = (fwd, _REPS.value)
                arms["torch " + name, "fwd+bwd"] = (
                    lambda fn=fn, tg=tg, wrt=wrt: torch.autograd.grad((fn(leaf) * tg).sum(), wrt),
                    _REPS.value,
                )
        sec = {key: float(np.median(v)) for key, v in alternate(arms, _ROUNDS.value).items()}
        print(f"\n{spec} (B x H x W x C)")
        for (name, what), s in sec.items():
            if name.startswith("torch "):
                continue
            ref = sec.get(("torch " + name, what))
            ratio = f"  PyTorch {ref * 1e3:8.2f} ms  {ref / s:5.2f}x the reference" if ref else ""
            print(f"  {name:26s} {what:8s} {s * 1e3:8.2f} ms{ratio}")


if __name__ == "__main__":
    app.run(main)
