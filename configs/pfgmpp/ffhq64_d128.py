"""PFGM++ on FFHQ 64×64, D = 128, DDPM++ (Xu et al., ICML 2023, Table 2; FID 2.43).

EDM's FFHQ-64 recipe: batch 256, lr 2e-4, dropout 0.05, augmentation p 0.15, channel_mult
(1, 2, 2, 2), 200 Mimg,
40 Heun steps (NFE 79) for sampling. Data: a folder of FFHQ PNGs (`--config.data.path=...`;
images other than 64×64 are centre-cropped and resized). `cpu`: D = 128 on the 16×16 digits.
"""

from configs.pfgmpp import common


def get_config(arg=None):
    c = common.base(arg, D=128)
    c.data.update(name="folder", resolution=64, channels=3)
    c.model.update(channel_mult=(1, 2, 2, 2), dropout=0.05)
    c.optimizer.lr = 2e-4
    c.augment.p = 0.15
    c.sampler.num_steps = 40
    c.train.batch_size = 256
    c.train.num_steps = 781_250  # 200 Mimg / 256
    return common.finish(c)
