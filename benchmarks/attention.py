r"""Self-attention alone: jaxsafe's lowerings against PyTorch's ``scaled_dot_product_attention``.

    python -m benchmarks.attention [--shapes=2x4096x8x40,2x1024x8x80,2x256x8x160] [--reference]
    python -m benchmarks.attention --shapes=2x4096x8x40 --chunks=128:128,256:256,512:256,1024:1024

Per shape ``BxTxNxH`` (batch, tokens, heads, head width; the defaults are SD 1.5's self-attention
at 64 × 64 latents and the next two levels) it times the forward and the forward + backward of
``jaxsafe.nn.attention.dot_product_attention`` with each ``implementation`` (``xla`` and
``chunked``, or one arm per ``--chunks`` tiling; what ``auto`` picks is marked), in turn
(A B A B, median of the rounds), with compile time, XLA's planned temporary memory and the
achieved FLOP/s of the two matmuls (``4 B N T^2 H`` forward, ``2.5 x`` that for forward +
backward, the flash count).
``--reference`` adds PyTorch's fused CPU kernel (diffusers' ``AttnProcessor2_0``) and prints
the ratios (> 1: jaxsafe faster).
"""

import time

from absl import app, flags

_SHAPES = flags.DEFINE_list(
    "shapes", ["2x4096x8x40", "2x1024x8x80", "2x256x8x160"], "BxTxNxH per row."
)
_REPS = flags.DEFINE_integer("reps", 3, "Calls per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of the arms in turn.")
_CHUNKS = flags.DEFINE_list(
    "chunks",
    None,
    "Query tiles FORWARD:BACKWARD of the chunked lowering, one arm each (default: the library's).",
)
_REFERENCE = flags.DEFINE_bool(
    "reference", False, "Also time torch's scaled_dot_product_attention."
)


def main(argv):
    del argv
    import jax
    import numpy as np

    from benchmarks.common import alternate, machine, matmul_peak_flops
    from jaxsafe.nn import attention

    peak = matmul_peak_flops()
    print(f"machine: {machine()}")
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    if _REFERENCE.value:
        import torch

        from benchmarks.reference import torch_threads

        print(f"PyTorch reference: scaled_dot_product_attention, {torch_threads()} threads")
    for spec in _SHAPES.value:
        b, t, n, h = map(int, spec.split("x"))
        r = np.random.default_rng(0)
        q, k, v, w = (r.standard_normal((b, t, n, h)).astype(np.float32) for _ in range(4))
        auto = attention.choose(t, t, h, np.float32)
        arms, info = {}, {}
        lowerings = {
            "xla": lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla")
        }
        for c in _CHUNKS.value or [f"{attention.FORWARD_CHUNK}:{attention.BACKWARD_CHUNK}"]:
            f_c, b_c = map(int, c.split(":"))
            name = "chunked" if not _CHUNKS.value else f"chunk{c}"
            lowerings[name] = lambda q, k, v, f_c=f_c, b_c=b_c: attention.chunked_attention(
                q, k, v, forward_chunk=f_c, backward_chunk=b_c
            )
        for impl, fwd in lowerings.items():
            both = jax.grad(lambda q, k, v, fwd=fwd: (fwd(q, k, v) * w).sum(), argnums=(0, 1, 2))
            for what, fn in (("forward", fwd), ("fwd+bwd", both)):
                t0 = time.perf_counter()
                compiled = jax.jit(fn).lower(q, k, v).compile()
                seconds = time.perf_counter() - t0
                temp = compiled.memory_analysis().temp_size_in_bytes
                arms[impl, what] = (lambda c=compiled: c(q, k, v), _REPS.value)
                info[impl, what] = (seconds, temp)
        if _REFERENCE.value:
            tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
            tw = torch.from_numpy(w).transpose(1, 2)
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def torch_fwd():
                with torch.no_grad():
                    return sdpa(tq, tk, tv)

            grads = [x.clone().requires_grad_() for x in (tq, tk, tv)]

            def torch_both():
                return torch.autograd.grad((sdpa(*grads) * tw).sum(), grads)

            arms["torch", "forward"] = (torch_fwd, _REPS.value)
            arms["torch", "fwd+bwd"] = (torch_both, _REPS.value)
        sec = {key: float(np.median(v)) for key, v in alternate(arms, _ROUNDS.value).items()}
        flops = 4 * b * n * t * t * h
        print(f"\n{spec} (B x T x N x H), auto: {auto}")
        for (impl, what), s in sec.items():
            f = flops * (2.5 if what == "fwd+bwd" else 1)
            extra = ""
            if (impl, what) in info:
                compile_s, temp = info[impl, what]
                extra = f"  compile {compile_s:5.2f} s  temp memory {temp / 2**20:8.1f} MiB"
            if ("torch", what) in sec and impl != "torch":
                extra += f"  {sec['torch', what] / s:5.2f}x the reference"
            print(
                f"  {impl:12s} {what:8s} {s * 1e3:9.1f} ms  {f / s / 1e9:7.1f} GFLOP/s "
                f"({100 * f / s / peak:5.1f} % of matmul peak){extra}"
            )


if __name__ == "__main__":
    app.run(main)
