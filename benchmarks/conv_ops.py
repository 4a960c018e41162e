r"""Where a conv net's step goes on the host: its pieces one by one, jaxsafe against PyTorch.

    python -m benchmarks.conv_ops [--shapes=8x32x32x256,64x16x16x64] [--reference]

Per NHWC activation shape ``BxHxWxC`` it times, forward and forward + backward (the gradient of
``sum(out * g)`` for a fixed random ``g``), each piece of EDM's DDPM++ block as jaxsafe runs it:

* ``conv3x3``: ``lax.conv_general_dilated``, C -> C, 'SAME';
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


def _jax_ops(b, h, w, c):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxsafe.nn import songunet

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
    return {
        "conv3x3": lambda x: jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=dn
        ),
        "groupnorm+silu": lambda x: jax.nn.silu(nnx.merge(gd, gp)(x)),
        "fir_down": lambda x: songunet._fir_down(x, box, 0),
        "fir_down (depthwise conv)": depthwise_down,
        "fir_up": lambda x: songunet._fir_up(x, box, 0),
        "fir_up (depthwise conv)": depthwise_up,
        "dropout": lambda x: jnp.where(jax.random.bernoulli(key, 0.87, x.shape), x / 0.87, 0),
    }


def _torch_ops(c):
    import torch

    F = torch.nn.functional
    kernel = torch.randn(c, c, 3, 3) * 0.05
    gn = torch.nn.GroupNorm(min(32, c // 4), c, eps=1e-6)
    return {
        "conv3x3": lambda x: F.conv2d(x, kernel, padding=1),
        "groupnorm+silu": lambda x: F.silu(gn(x)),
        "fir_down": lambda x: F.avg_pool2d(x, 2),
        "fir_up": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
        "dropout": lambda x: F.dropout(x, 0.13, training=True),
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
        for name, fn in _jax_ops(b, h, w, c).items():
            out = jax.eval_shape(fn, x)
            g = r.standard_normal(out.shape).astype(np.float32)
            fwd = jax.jit(fn)
            # g is an argument: as a constant, XLA would fold the whole gradient of a linear op.
            both = jax.jit(jax.grad(lambda x, g, fn=fn: (fn(x) * g).sum()))
            arms[name, "forward"] = (lambda f=fwd: f(x), _REPS.value)
            arms[name, "fwd+bwd"] = (lambda f=both, g=g: f(x, g), _REPS.value)
        if _REFERENCE.value:
            tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
            leaf = tx.clone().requires_grad_()
            for name, fn in _torch_ops(c).items():
                tg = torch.randn_like(fn(tx))

                def fwd(fn=fn):
                    with torch.no_grad():
                        return fn(tx)

                arms["torch " + name, "forward"] = (fwd, _REPS.value)
                arms["torch " + name, "fwd+bwd"] = (
                    lambda fn=fn, tg=tg: torch.autograd.grad((fn(leaf) * tg).sum(), leaf),
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
