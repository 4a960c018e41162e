"""Grokking at the Edge of Numerical Stability: StableMax, ⊥Grad, ⊥AdamW vs AdamW."""

from cells import SETUP, code, md

CELLS = [
    md(
        "# Grokking at the Edge of Numerical Stability, in JAX\n\n"
        "Prieto et al. (ICLR 2025) show that without regularisation, softmax cross-entropy "
        "pushes the logits along the *naive loss minimisation* direction until the float32 sum "
        "of `exp(z - max z)` rounds to exactly 1 (**Softmax Collapse**, SC) and learning stops. "
        "Two fixes: **StableMax** (a softmax with `s(x) = x + 1` / `1/(1 - x)` in place of `exp`) "
        "and **⊥Grad** (drop the gradient's component along the weights). This notebook checks "
        "both numerically and reruns the paper's ⊥AdamW-vs-AdamW comparison at a small scale."
    ),
    code(SETUP),
    code(
        "import jax, jax.numpy as jnp, numpy as np\n"
        "from jaxsafe import grokking, optim\n"
        "# A confident, correct prediction with a logit gap of 30:\n"
        "logits = jnp.array([[30.0, 0.0, 0.0]])\n"
        "labels = jnp.array([0])\n"
        "sm = grokking.softmax_cross_entropy(logits, labels)\n"
        "st = grokking.stablemax_cross_entropy(logits, labels)\n"
        "print('softmax CE:', sm, ' stablemax CE:', st)\n"
        "print('SC fraction (float32):', grokking.softmax_collapse_fraction(logits))\n"
        "assert float(sm[0]) == 0.0 and float(st[0]) > 0  # softmax gives no gradient signal"
    ),
    md(
        "StableMax is softmax applied to `sign(x)·log1p|x|`, and its gradient is "
        "finite everywhere, including at `x = 1` where a naive `where` gives NaN:"
    ),
    code(
        "x = jnp.array([-1e30, -1.0, 0.0, 1.0, 1e30])\n"
        "print(jax.vmap(jax.grad(grokking.s))(x))\n"
        "np.testing.assert_allclose(grokking.stablemax(x), "
        "jax.nn.softmax(jnp.sign(x) * jnp.log1p(jnp.abs(x))), rtol=1e-5)"
    ),
    md("⊥Grad as an optax transformation: the update is orthogonal to the weights."),
    code(
        "params = {'w': jnp.array([1.0, 2.0, 3.0])}\n"
        "grads = {'w': jnp.array([1.0, 1.0, 0.0])}\n"
        "tx = optim.perpgrad()\n"
        "g_perp, _ = tx.update(grads, tx.init(params), params)\n"
        "print(g_perp, 'dot with w:', jnp.vdot(g_perp['w'], params['w']))\n"
        "assert abs(float(jnp.vdot(g_perp['w'], params['w']))) < 1e-5"
    ),
    md(
        "## ⊥AdamW vs AdamW on addition mod 113 (40 % training data)\n\n"
        "The `cpu` configs run 2,000 full-batch steps each (about a minute on two "
        "CPU cores); `smoke` runs in seconds."
    ),
    code(
        "SIZE = os.environ.get('JAXSAFE_NOTEBOOK_SIZE', 'cpu')  # 'smoke': seconds (CI)\n"
        "import tempfile\n"
        "from experiments import run_experiment\n"
        "from configs.grokking import adamw, perp_adamw\n"
        "from jaxsafe.train import read_jsonl\n"
        "workdir = tempfile.mkdtemp()\n"
        "finals, logs = {}, {}\n"
        "for name, module in [('AdamW', adamw), ('⊥AdamW', perp_adamw)]:\n"
        "    wd = os.path.join(workdir, module.__name__.rsplit('.', 1)[-1])\n"
        "    finals[name] = run_experiment(module.get_config(SIZE), wd)\n"
        "    logs[name] = read_jsonl(os.path.join(wd, 'metrics.jsonl'))\n"
        "finals"
    ),
    code(
        "from jaxsafe.train.plots import plot_runs\n"
        "from IPython.display import Image\n"
        "png = os.path.join(workdir, 'grokking.png')\n"
        "plot_runs(logs, [('accuracy', ['eval/train_accuracy', 'eval/test_accuracy']),\n"
        "                 ('train loss', ['train/loss']), "
        "('softmax collapse', ['train/sc_fraction'])],\n"
        "          png, log_y=('train loss',))\n"
        "Image(png)"
    ),
]
