"""The grokking MLP's full-batch training step in PyTorch, after Prieto et al. (ICLR 2025),
``LucasPrietoAl/grokking-at-the-edge-of-numerical-stability``: ``models.py::MLP`` (one-hot(a)
++ one-hot(b) → hidden → p, ReLU, no bias, ``nn.Linear`` init), ``utils.py`` (softmax or
StableMax cross-entropy on logits cast to the loss dtype), ``orthograd.py`` (⊥Grad: the
gradient's component along the weights removed per tensor, rescaled to the gradient's norm)
and the training loop's step (forward, loss, backward, optimizer step, zero_grad).
"""

import numpy as np


def stablemax_cross_entropy(logits, y):
    """−log s(x_y) / Σ_j s(x_j), s(x) = x + 1 for x ≥ 0 else 1 / (1 − x) (the reference's
    ``stablemax_cross_entropy``)."""
    import torch

    s = torch.where(logits >= 0, logits + 1, 1 / (1 - logits))
    return -torch.log(s.gather(-1, y[:, None])[:, 0] / s.sum(-1)).mean()


def orthograd_(params, eps: float = 1e-30) -> None:
    """In place: g ← (g − (w·g / (w·w + eps)) w) · ‖g‖ / (‖g⊥‖ + eps), per tensor."""
    import torch

    with torch.no_grad():
        for w in params:
            if w.grad is None:
                continue
            g, v = w.grad.reshape(-1), w.reshape(-1)
            g_perp = g - (v @ g) / (v @ v + eps) * v
            w.grad.copy_((g_perp * (g.norm() / (g_perp.norm() + eps))).view_as(w.grad))


def make_step(config, data: dict, kernels=None):
    """The PyTorch model of a ``configs/grokking`` config and one full-batch step of it (MLP only).

    Args:
      config: the config.
      data: ``data["train"]`` holds ``x`` (N, 2) operands and ``y`` (N,) labels.
      kernels: the layers' (in, out) weights to start from (jaxsafe's layout), or None for
        ``nn.Linear``'s init under ``train.seed``.

    Returns:
      ``(call, model)``: ``call() -> loss`` runs one step and returns its loss.
    """
    import torch

    m, d, o = config.model, config.data, config.optimizer
    if m.name != "mlp" or d.name != "modular":
        raise ValueError("the PyTorch reference arm covers the modular-arithmetic MLP only")
    p = d.p
    torch.manual_seed(config.train.seed)
    sizes = [2 * p, *m.hidden, p]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b, bias=m.use_bias), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    if kernels is not None:
        with torch.no_grad():
            for layer, w in zip(model[::2], kernels):
                layer.weight.copy_(torch.tensor(np.array(w, np.float32).T))
    x_ids = torch.as_tensor(np.asarray(data["train"]["x"]), dtype=torch.long)
    x = torch.cat(
        [torch.nn.functional.one_hot(x_ids[:, 0], p), torch.nn.functional.one_hot(x_ids[:, 1], p)],
        1,
    ).float()
    y = torch.as_tensor(np.asarray(data["train"]["y"]), dtype=torch.long)
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.loss.dtype]
    lr = o.lr / m.alpha**2
    if o.name == "adamw":
        opt = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
        )
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=o.momentum, weight_decay=o.weight_decay
        )

    def call():
        logits = m.alpha * model(x)
        if config.loss.name == "stablemax":
            loss = stablemax_cross_entropy(logits.to(dtype), y)
        else:
            loss = torch.nn.functional.cross_entropy(logits.to(dtype), y)
        loss.backward()
        if o.perp is not None:
            orthograd_(model.parameters())
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    return call, model
