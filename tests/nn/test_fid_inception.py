"""The FID Inception-v3 against a PyTorch transcription of pytorch-fid's network
(``benchmarks/reference/inception.py``: plain ``torch.nn.functional`` calls over the state dict,
no code shared with the NNX network), on random weights that go through the .pth ->
safetensors converter."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.reference import inception as reference  # noqa: E402
from jaxsafe.nn import inception  # noqa: E402
from jaxsafe.weights import convert  # noqa: E402


def random_state_dict(seed=0):
    """Every tensor the network needs, in torch names and layouts, He-scaled so activations stay
    O(1) through the 94 layers, plus the head and step counters a real .pth carries."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, leaf in convert.model_params(inception.abstract()).items():
        key = convert.torch_key(path)
        shape = convert.torch_shape(path, leaf.shape)
        if key.endswith("conv.weight"):
            t = torch.randn(shape, generator=g) * (2.0 / np.prod(shape[1:])) ** 0.5
        elif key.endswith(("bn.weight", "running_var")):
            t = 0.8 + 0.4 * torch.rand(shape, generator=g)
        else:  # bn.bias, running_mean
            t = 0.1 * torch.randn(shape, generator=g)
        sd[key] = t
        if key.endswith("running_var"):
            sd[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g)
    sd["fc.bias"] = torch.zeros(1008)
    return sd


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from launch.convert_fid_inception import convert_file

    d = tmp_path_factory.mktemp("fid")
    sd = random_state_dict()
    torch.save(sd, d / "pt_inception.pth")
    out = d / "fid_inception.safetensors"
    n = convert_file(str(d / "pt_inception.pth"), str(out))
    return sd, out, n


def test_converter_keeps_the_network_and_drops_head_and_counters(converted):
    sd, out, n = converted
    written = convert.read_safetensors(out)
    kept = {k for k in sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(written) == kept and n == len(kept)
    # 94 conv + BN layers, 5 tensors each.
    assert len(kept) == 94 * 5
    for k in kept:
        np.testing.assert_array_equal(written[k], sd[k].numpy())


@pytest.mark.slow
def test_matches_pytorch_fid_inception_on_random_weights(converted):
    sd, out, _ = converted
    net = inception.load(str(out))
    rng = np.random.default_rng(0)
    images01 = rng.random((2, 32, 32, 3), dtype=np.float32)  # CIFAR-sized: the resize is tested too
    ours = np.asarray(net(2.0 * images01 - 1.0))
    with torch.no_grad():
        ref = reference.forward(sd, torch.from_numpy(images01).permute(0, 3, 1, 2)).numpy()
    assert ours.shape == ref.shape == (2, 2048)
    assert 0.05 < np.abs(ref).mean() < 50  # activations neither vanished nor exploded
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_grey_images_are_the_grey_rgb_image(converted):
    _, out, _ = converted
    net = inception.load(str(out))
    grey = np.random.default_rng(1).uniform(-1, 1, (1, 299, 299, 1)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(net(grey)), np.asarray(net(np.repeat(grey, 3, -1))), rtol=0, atol=1e-6
    )


def test_converter_refuses_a_file_that_is_not_the_fid_inception(tmp_path):
    from launch.convert_fid_inception import convert_file

    sd = random_state_dict()
    del sd["Mixed_6b.branch7x7_2.conv.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    out = tmp_path / "out.safetensors"
    with pytest.raises(
        convert.CheckpointError, match=r"missing tensor\(s\) 'Mixed_6b\.branch7x7_2\.conv\.weight'"
    ):
        convert_file(str(tmp_path / "bad.pth"), str(out))
    assert not out.exists() and not (tmp_path / "out.safetensors.tmp").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pth: cannot read as a torch state dict"):
        convert_file(str(tmp_path / "junk.pth"), str(out))


def test_missing_weights_name_the_variable_and_the_converter(monkeypatch, tmp_path):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(
        FileNotFoundError,
        match=r"no FID Inception weights given.*"
        r"JAXSAFE_FID_INCEPTION.*launch\.convert_fid_inception",
    ):
        inception.load()
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=f"FID Inception weights '{missing}' not found"):
        inception.load(missing)
