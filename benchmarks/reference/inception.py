"""pytorch-fid's FID Inception-v3 forward in PyTorch, as plain functional calls over its state dict.

Written from mseitzer/pytorch-fid ``src/pytorch_fid/inception.py`` (``InceptionV3(output_blocks=
[3])``: torchvision's Inception3 with FIDInceptionA/C/E_1/E_2, input resized to 299×299 with
``F.interpolate(..., 'bilinear', align_corners=False)`` and scaled from [0, 1] to [-1, 1]). It
shares no code with ``jaxsafe.nn.inception``: the equivalence test
(``tests/nn/test_fid_inception.py``) and the benchmark's reference arm (``benchmarks/fid.py``)
use it. Importing this file needs no torch.
"""


def _F():
    import torch.nn.functional as F

    return F


def _cat(xs):
    import torch

    return torch.cat(xs, 1)


def _cbr(sd, name, x, stride=1, padding=0):
    x = _F().conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
    x = _F().batch_norm(
        x,
        sd[f"{name}.bn.running_mean"],
        sd[f"{name}.bn.running_var"],
        sd[f"{name}.bn.weight"],
        sd[f"{name}.bn.bias"],
        training=False,
        eps=0.001,
    )
    return _F().relu(x)


def _pool_avg(x):  # FID patch: TensorFlow's pool ignores the padding
    return _F().avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _block_a(sd, n, x):
    b1 = _cbr(sd, f"{n}.branch1x1", x)
    b5 = _cbr(sd, f"{n}.branch5x5_2", _cbr(sd, f"{n}.branch5x5_1", x), padding=2)
    b3 = _cbr(sd, f"{n}.branch3x3dbl_1", x)
    b3 = _cbr(sd, f"{n}.branch3x3dbl_2", b3, padding=1)
    b3 = _cbr(sd, f"{n}.branch3x3dbl_3", b3, padding=1)
    return _cat([b1, b5, b3, _cbr(sd, f"{n}.branch_pool", _pool_avg(x))])


def _block_b(sd, n, x):
    b3 = _cbr(sd, f"{n}.branch3x3", x, stride=2)
    d = _cbr(sd, f"{n}.branch3x3dbl_1", x)
    d = _cbr(sd, f"{n}.branch3x3dbl_2", d, padding=1)
    d = _cbr(sd, f"{n}.branch3x3dbl_3", d, stride=2)
    return _cat([b3, d, _F().max_pool2d(x, 3, stride=2)])


def _block_c(sd, n, x):
    b1 = _cbr(sd, f"{n}.branch1x1", x)
    b7 = _cbr(sd, f"{n}.branch7x7_1", x)
    b7 = _cbr(sd, f"{n}.branch7x7_2", b7, padding=(0, 3))
    b7 = _cbr(sd, f"{n}.branch7x7_3", b7, padding=(3, 0))
    d = _cbr(sd, f"{n}.branch7x7dbl_1", x)
    for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)]):
        d = _cbr(sd, f"{n}.branch7x7dbl_{i}", d, padding=pad)
    return _cat([b1, b7, d, _cbr(sd, f"{n}.branch_pool", _pool_avg(x))])


def _block_d(sd, n, x):
    b3 = _cbr(sd, f"{n}.branch3x3_2", _cbr(sd, f"{n}.branch3x3_1", x), stride=2)
    b7 = _cbr(sd, f"{n}.branch7x7x3_1", x)
    b7 = _cbr(sd, f"{n}.branch7x7x3_2", b7, padding=(0, 3))
    b7 = _cbr(sd, f"{n}.branch7x7x3_3", b7, padding=(3, 0))
    b7 = _cbr(sd, f"{n}.branch7x7x3_4", b7, stride=2)
    return _cat([b3, b7, _F().max_pool2d(x, 3, stride=2)])


def _block_e(sd, n, x, last):
    b1 = _cbr(sd, f"{n}.branch1x1", x)
    b3 = _cbr(sd, f"{n}.branch3x3_1", x)
    b3 = _cat(
        [
            _cbr(sd, f"{n}.branch3x3_2a", b3, padding=(0, 1)),
            _cbr(sd, f"{n}.branch3x3_2b", b3, padding=(1, 0)),
        ]
    )
    d = _cbr(sd, f"{n}.branch3x3dbl_2", _cbr(sd, f"{n}.branch3x3dbl_1", x), padding=1)
    d = _cat(
        [
            _cbr(sd, f"{n}.branch3x3dbl_3a", d, padding=(0, 1)),
            _cbr(sd, f"{n}.branch3x3dbl_3b", d, padding=(1, 0)),
        ]
    )
    # FIDInceptionE_2 (Mixed_7c) pools with a max pool, E_1 with the padding-free average.
    pool = _F().max_pool2d(x, 3, stride=1, padding=1) if last else _pool_avg(x)
    return _cat([b1, b3, d, _cbr(sd, f"{n}.branch_pool", pool)])


def forward(sd, images01):
    """pytorch-fid's InceptionV3(output_blocks=[3]) forward on (B, 3, H, W) images in [0, 1]."""
    x = _F().interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = _cbr(sd, "Conv2d_1a_3x3", x, stride=2)
    x = _cbr(sd, "Conv2d_2a_3x3", x)
    x = _cbr(sd, "Conv2d_2b_3x3", x, padding=1)
    x = _F().max_pool2d(x, 3, stride=2)
    x = _cbr(sd, "Conv2d_4a_3x3", _cbr(sd, "Conv2d_3b_1x1", x))
    x = _F().max_pool2d(x, 3, stride=2)
    for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _block_a(sd, n, x)
    x = _block_b(sd, "Mixed_6a", x)
    for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _block_c(sd, n, x)
    x = _block_d(sd, "Mixed_7a", x)
    x = _block_e(sd, "Mixed_7b", x, last=False)
    x = _block_e(sd, "Mixed_7c", x, last=True)
    return _F().adaptive_avg_pool2d(x, (1, 1))[:, :, 0, 0]
