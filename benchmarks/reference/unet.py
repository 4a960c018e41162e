"""The Stable Diffusion UNet's denoising step in PyTorch: diffusers' ``UNet2DConditionModel``
built from the same config (``UNet2DConditionConfig.to_diffusers_dict``), random weights, one
forward pass under ``torch.no_grad()`` on the classifier-free-guidance batch, attention through
``scaled_dot_product_attention`` (diffusers' default ``AttnProcessor2_0``), as the authors'
pipelines (diffusers' ``StableDiffusionPipeline``) run it.
"""


def make_forward(config, rows: int, latent_shape, context, timestep: int = 500):
    """``(call, model)``: ``call()`` runs the UNet on ``rows`` random latents of ``latent_shape``
    (H, W, C; PyTorch takes them as NCHW) and text embeddings of shape ``context`` (L, D)."""
    import torch
    from diffusers import UNet2DConditionModel

    d = {k: v for k, v in config.to_diffusers_dict().items() if k != "_class_name"}
    torch.manual_seed(0)
    model = UNet2DConditionModel(**d).eval()
    h, w, c = latent_shape
    x = torch.randn(rows, c, h, w)
    emb = torch.randn(rows, *context)
    t = torch.full((rows,), timestep, dtype=torch.long)

    def call():
        with torch.no_grad():
            return model(x, t, encoder_hidden_states=emb).sample

    return call, model
