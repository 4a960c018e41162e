r"""SFD, text version (Chen, Zhang, Zhou, ICLR 2025): a one-step generator distilled from the
text-to-image model that forgets the erased concepts (``experiments/erase_sfd.py``).

Paper setting = the authors' ``SD/run_sfd.sh`` over ``SD/train.py`` (Stable Diffusion 1.5,
celebrity "brad pitt" → "a middle aged man"): α = 1 (``--alpha``), t_init = 625, t ∈ [20, 980),
guidance 4.5 for the teacher and the fake score, lr 1e-6 (G) and 3e-6 (f_ψ), Adam β = (0, 0.999),
batch 8, all four loss weights 1.0 (``train.py`` defaults them to 0.01; the script's 1.0 produced
the results), no EMA, 100 kimg (12,500 iterations, the README's evaluated snapshot).

    python -m launch.erase --config=configs/erasure/sfd.py --config.model.folder=/path/sd-v1-5 \
        --workdir=/tmp/sfd                          # needs remaining prompts: sfd.retain_prompts
    python -m launch.erase --config=configs/erasure/sfd.py:cpu --workdir=/tmp/sfd_red

Deviations: the reference starts G from its already distilled SiD-LSG one-step generator and
trains the fake score through its guided output with 10 % of prompts dropped; here G and f_ψ
start from the teacher's UNet (as SFD's CIFAR-10 code does) and f_ψ's prompts are not dropped.
The test-bed settings (``cpu``) are listed in docs/sfd.md.
"""

from configs.erasure import common


def get_config(arg=None):
    arg = common.check_arg(arg)
    c = common.base(arg, "erase_sfd", paper_erase=("brad pitt",))
    c.concepts.guide = ("a middle aged man",) if arg == "paper" else ("",)
    c.sfd = dict(
        alpha=1.0,
        t_init=625,
        t_min=20,
        t_max=980,
        guidance=4.5,
        g_loss_scale=1.0,
        forget_weight=1.0,
        remain_weight=1.0,
        retain_prompts=(),
    )
    c.optimizer = dict(lr_g=1e-6, lr_psi=3e-6, b1=0.0, b2=0.999, eps=1e-6)
    c.train.update(batch_size=8, num_steps=12_500, checkpoint_every=500)
    if arg in ("cpu", "smoke"):
        c.sfd.guidance = c.sampling.guidance_scale  # the test bed's sampling guidance
        c.optimizer.update(lr_g=1e-4, lr_psi=1e-4, eps=1e-8)
    if arg == "cpu":
        c.train.update(num_steps=300, checkpoint_every=100)
    if arg == "smoke":
        c.train.update(batch_size=4, num_steps=2, checkpoint_every=2)
    return c
