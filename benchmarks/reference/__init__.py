"""PyTorch reference arms of the benchmarks (``--reference``; needs the ``torch`` extra).

Each module writes one family's training or sampling step in PyTorch after the authors' code
(the same network, loss, optimizer and shapes, cited per module) and returns it as a
``call() -> value`` closure, so a benchmark times it in turn with its jaxsafe arm
(``benchmarks.common.alternate``). Nothing in ``jaxsafe/`` imports these.
"""


def torch_threads() -> int:
    """PyTorch's intra-op threads set to the cores XLA:CPU uses (every core), so both arms
    share the machine alike; returns the count."""
    import os

    import torch

    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n
