"""DBPM's SimCLR training step in PyTorch, after Lan et al. (ICLR 2024),
github.com/lanxiang1017/DynamicBadPairMining_ICLR24: ``models/resnet.py`` (the 1-D ResNet: conv7
stem without bias → BN → ReLU, BasicBlocks conv3-BN-ReLU-conv3-BN + shortcut (conv1-BN when the
shape changes), global average pool, ``fc``)
and the trainer's projection head (Linear → ReLU → Linear), the symmetric NT-Xent over the
2B − 1 candidates (temperature ``config.temperature``) and Adam (``config.optimizer.lr``).

As in the reference (TS-TCC's ``Load_Dataset`` augments the whole set once, when the data set
is built), the two views are fixed tensors here; jaxsafe's step draws fresh views on the device
every step (``jaxsafe.contrastive.augment``), so it does slightly more work per step.
"""

import numpy as np


def _resnet(in_ch: int, widths, blocks, features: int, head_hidden: int, head_out: int):
    import torch
    from torch import nn

    def conv(a, b, k, stride=1):
        return nn.Conv1d(a, b, k, stride=stride, padding=(k - 1) // 2, bias=False)

    class Block(nn.Module):
        def __init__(self, a, b, stride):
            super().__init__()
            self.body = nn.Sequential(
                conv(a, b, 3, stride),
                nn.BatchNorm1d(b),
                nn.ReLU(),
                conv(b, b, 3),
                nn.BatchNorm1d(b),
            )
            self.short = (
                nn.Sequential(conv(a, b, 1, stride), nn.BatchNorm1d(b))
                if stride != 1 or a != b
                else nn.Identity()
            )

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    layers = [conv(in_ch, widths[0], 7), nn.BatchNorm1d(widths[0]), nn.ReLU()]
    a = widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            layers.append(Block(a, w, 2 if i > 0 and j == 0 else 1))
            a = w
    layers += [
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(a, features),
        nn.Linear(features, head_hidden),
        nn.ReLU(),
        nn.Linear(head_hidden, head_out),
    ]
    return nn.Sequential(*layers)


def ntxent(z1, z2, temperature: float):
    """Mean over the 2B rows of −log softmax(sim / t) at the positive, self excluded (SimCLR)."""
    import torch

    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    b = z1.shape[0]
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return torch.nn.functional.cross_entropy(sim, target)


def make_step(config, batch_size: int, length: int, channels: int, models: dict):
    """The PyTorch model of a ``configs/dbpm`` config and one SimCLR step of it.

    The step runs on a fixed pair of random views of (``batch_size``, ``length``, ``channels``);
    ``models`` is ``experiments.dbpm.MODELS``.

    Returns:
      ``(call, model)``: ``call() -> loss`` runs one step and returns its loss.
    """
    import torch

    m = config.model
    widths, blocks = models[m.name] if m.name in models else (tuple(m.widths), tuple(m.blocks))
    torch.manual_seed(0)
    model = _resnet(channels, widths, blocks, m.features, m.head_hidden, m.head_out)
    opt = torch.optim.Adam(model.parameters(), lr=config.optimizer.lr)
    rng = np.random.default_rng(0)
    # (B, C, T): PyTorch's Conv1d layout, as the reference's loaders hand it over.
    u, v = (
        torch.as_tensor(rng.normal(size=(batch_size, channels, length)), dtype=torch.float32)
        for _ in range(2)
    )

    def call():
        model.train()
        loss = ntxent(model(u), model(v), config.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return call, model
