"""Concept erasure in PyTorch, after the authors' code.

* UCE (Gandikota et al., WACV 2024; ``rohitgandikota/unified-concept-editing``,
  ``train-scripts/train_erase.py::edit_model``): per projection ``W`` (d_out × d_in), in turn,
  ``W <- (lam W + s_e sum v* c_e^T + s_p sum (W c_p) c_p^T) (lam I + s_e sum c_e c_e^T
  + s_p sum c_p c_p^T)^-1`` with ``v* = W c_guide``, the sums formed as the authors do (per-row
  outer products summed, ``torch.inverse``). One deviation, in the reference's favour: the authors
  recompute every layer's guide values inside each layer's loop; here each layer computes its own.
* ESD-x (Gandikota et al., ICCV 2023; ``rohitgandikota/erasing``, ``train-scripts/train-esd.py``
  and its diffusers port ``esd_diffusers.py``): one update at a given ``x_t`` with two frozen
  UNet calls under ``no_grad`` (``e_0`` unconditional, ``e_p`` on the concept), the trained UNet's
  ``e_n`` on the concept, ``loss = mse(e_n, e_0 - eta (e_p - e_0))``, backward, Adam on the
  cross-attention (``attn2``) parameters only. The partial DDIM sampling that produces ``x_t`` is
  UNet calls under ``no_grad`` and is timed separately by the UNet benchmark.
"""

import numpy as np


def uce_edit(
    kernels,
    erase_rows,
    guide_rows,
    preserve_rows=None,
    *,
    lam=0.5,
    erase_scale=1.0,
    preserve_scale=1.0,
    prompt_rows=None,
):
    """UCE on Flax-layout kernels (name -> (d_in, d_out) arrays); returns the new kernels as
    NumPy arrays, same layout, for comparison with ``jaxsafe.erasure.closed_form.uce_edit``.
    ``preserve_rows`` are taken ``prompt_rows`` at a time (one prompt's token rows, as the
    authors loop; default: the erased prompt's row count); the sums do not depend on it."""
    import torch

    with torch.no_grad():
        c_e, c_g = torch.as_tensor(erase_rows), torch.as_tensor(guide_rows)
        c_p = None if preserve_rows is None else torch.as_tensor(preserve_rows)
        out = {}
        for name, k in kernels.items():
            w = torch.as_tensor(np.asarray(k)).T.contiguous()  # (d_out, d_in), nn.Linear.weight
            mat1 = lam * w
            mat2 = lam * torch.eye(w.shape[1])
            v = c_g @ w.T
            mat1 += erase_scale * (v[:, :, None] @ c_e[:, None, :]).sum(0)
            mat2 += erase_scale * (c_e[:, :, None] @ c_e[:, None, :]).sum(0)
            # The authors loop over the preserved prompts, one prompt's token rows at a time.
            for rows in [] if c_p is None else torch.split(c_p, prompt_rows or len(c_e)):
                v_p = rows @ w.T
                mat1 += preserve_scale * (v_p[:, :, None] @ rows[:, None, :]).sum(0)
                mat2 += preserve_scale * (rows[:, :, None] @ rows[:, None, :]).sum(0)
            out[name] = (mat1 @ torch.inverse(mat2)).T.numpy()
        return out


def make_esd_x_update(config, latent_shape, context, *, eta=1.0, lr=1e-5, timestep=500):
    """``(call, parts)``: ``call()`` is one ESD-x update of a diffusers UNet built from
    ``config`` (``UNet2DConditionConfig``, random weights) at batch 1 and returns the loss;
    ``parts`` holds the two UNets, the inputs and ``n_trained``."""
    import copy

    import torch
    from diffusers import UNet2DConditionModel

    d = {k: v for k, v in config.to_diffusers_dict().items() if k != "_class_name"}
    torch.manual_seed(0)
    model = UNet2DConditionModel(**d)
    model_orig = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_("attn2" in name)
        if "attn2" in name:
            trained.append(p)
    opt = torch.optim.Adam(trained, lr=lr)
    h, w, c = latent_shape
    z = torch.randn(1, c, h, w)
    emb_0, emb_p = torch.randn(2, 1, *context)
    t = torch.full((1,), timestep, dtype=torch.long)

    def call():
        with torch.no_grad():
            e_0 = model_orig(z, t, encoder_hidden_states=emb_0).sample
            e_p = model_orig(z, t, encoder_hidden_states=emb_p).sample
        e_n = model(z, t, encoder_hidden_states=emb_p).sample
        loss = torch.nn.functional.mse_loss(e_n, e_0 - eta * (e_p - e_0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    parts = {
        "model": model,
        "model_orig": model_orig,
        "z": z,
        "t": t,
        "emb_0": emb_0,
        "emb_p": emb_p,
        "n_trained": sum(p.numel() for p in trained),
    }
    return call, parts
