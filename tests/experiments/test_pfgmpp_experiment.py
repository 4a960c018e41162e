"""The PFGM++ / EDM experiment: EDM's schedules against independent formulas, the paper configs,
a short offline training run (loss falls, FD evaluator), exact resume with the EMA, and the
sampling launcher (PNG/npz, noise injection, quantisation)."""

import importlib
import json
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import pfgmpp, run_experiment
from jaxsafe import parallel, train
from jaxsafe.diffusion import edm, image_model

# Its module fixtures train reference runs once: with `--dist loadgroup` (.ci/run) all of this
# module's tests share one worker, so they are not trained twice.
pytestmark = pytest.mark.xdist_group("pfgmpp_trained")

SETTINGS = ["cifar10_d128", "cifar10_d2048", "cifar10_edm", "cifar10_cond_d2048", "ffhq64_d128"]


def config(setting="cifar10_d128", arg="smoke"):
    return importlib.import_module(f"configs.pfgmpp.{setting}").get_config(arg)


# --- EDM's training-loop rules, against the formulas of NVlabs/edm training_loop.py ------------


def edm_beta(cur_nimg, batch, halflife_kimg, rampup_ratio):
    h = halflife_kimg * 1000
    if rampup_ratio is not None:
        h = min(h, cur_nimg * rampup_ratio)
    return 0.5 ** (batch / max(h, 1e-8))


class EMATest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_ema_beta_matches_edm(self):
        beta = self.variant(lambda t: edm.ema_beta(t, 512, 500.0, 0.05))
        for t in (0, 1, 10, 1000, 19_531, 100_000):
            np.testing.assert_allclose(
                beta(t), edm_beta(t * 512, 512, 500.0, 0.05), rtol=1e-6, atol=1e-9
            )
        assert float(beta(0)) == 0.0  # the first EMA value is the first updated weights
        no_rampup = self.variant(lambda t: edm.ema_beta(t, 64, 20.0, None))
        np.testing.assert_allclose(no_rampup(3), 0.5 ** (64 / 20_000), rtol=1e-6, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ema_update_is_a_lerp(self):
        ema = {"w": jnp.array([1.0, -2.0, 4.0])}
        params = {"w": jnp.array([3.0, 0.0, 4.0])}
        out = self.variant(edm.ema_update)(ema, params, 0.75)
        np.testing.assert_allclose(
            out["w"], 0.75 * np.array([1, -2, 4]) + 0.25 * np.array([3, 0, 4]), atol=0
        )  # exact: dyadic values


def test_after_update_uses_the_image_count_before_the_step():
    c = config()
    c.train.batch_size, c.ema.halflife_kimg, c.ema.rampup_ratio = 8, 1.0, 0.5
    after = pfgmpp.make_after_update(c)
    ema, params = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    for step in (1, 2, 5, 400):  # state.step already counts the update
        state = train.init_state(params, {}, optax.sgd(0.1), {"ema": ema}).replace(step=step)
        beta = edm_beta((step - 1) * 8, 8, 1.0, 0.5)
        np.testing.assert_allclose(after(state)["ema"]["w"], 1 - beta, rtol=1e-5, atol=2e-7)


class WarmupTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_lr_schedule_matches_edm(self):
        schedule = self.variant(edm.lr_schedule(1e-3, 512, 10_000.0))
        for t in (0, 1, 100, 19_531, 19_532, 50_000):
            np.testing.assert_allclose(
                schedule(t), 1e-3 * min(t * 512 / 1e7, 1), rtol=1e-6, atol=1e-10
            )


def test_optimizer_warms_up_and_cleans_gradients():
    cfg = config().optimizer
    cfg.lr, cfg.lr_rampup_kimg = 0.1, 4.0  # full lr after 4,000 images = 4 steps of 1,000
    opt = pfgmpp.make_optimizer(cfg, 1000)
    params = jnp.zeros(3)
    state = opt.init(params)
    grads = jnp.array([2.0, -3.0, 0.5])
    # Adam's bias-corrected step for a constant gradient is sign(g): the update is -lr_t sign(g).
    for t in range(6):
        updates, state = opt.update(grads, state, params)
        lr_t = 0.1 * min(t * 1000 / 4000, 1)
        np.testing.assert_allclose(updates, -lr_t * np.sign(grads), rtol=1e-4, atol=1e-7)
    nan_to_num = edm.nan_to_num_grads()
    cleaned, _ = nan_to_num.update(
        jnp.array([jnp.nan, jnp.inf, -jnp.inf, 1.5]), nan_to_num.init(None)
    )
    np.testing.assert_array_equal(cleaned, [0.0, 1e5, -1e5, 1.5])
    cfg.grad_clip = 1.0
    clipped = pfgmpp.make_optimizer(cfg, 1000)
    big = jnp.array([300.0, -400.0, 0.0])
    # Clipping runs before Adam: the clipped gradient (0.6, -0.8, 0) is what Adam's moments see.
    _, s = clipped.update(big, clipped.init(params), params)
    np.testing.assert_allclose(s[2][0].mu, 0.1 * np.array([0.6, -0.8, 0.0]), rtol=1e-6, atol=1e-8)


# --- configs --------------------------------------------------------------------------------


# Typed in from PFGM++'s train.py / EDM's training_loop.py defaults and the paper's settings.
PAPER = {
    "cifar10_d128": dict(
        D=128.0, batch=512, lr=1e-3, dropout=0.13, mult=(2, 2, 2), res=32, cond=False
    ),
    "cifar10_d2048": dict(
        D=2048.0, batch=512, lr=1e-3, dropout=0.13, mult=(2, 2, 2), res=32, cond=False
    ),
    "cifar10_edm": dict(
        D=float("inf"), batch=512, lr=1e-3, dropout=0.13, mult=(2, 2, 2), res=32, cond=False
    ),
    "cifar10_cond_d2048": dict(
        D=2048.0, batch=512, lr=1e-3, dropout=0.13, mult=(2, 2, 2), res=32, cond=True
    ),
    "ffhq64_d128": dict(
        D=128.0, batch=256, lr=2e-4, dropout=0.05, mult=(1, 2, 2, 2), res=64, cond=False
    ),
}


@pytest.mark.parametrize("setting", sorted(PAPER))
def test_paper_configs_hold_the_paper_values(setting):
    c, want = config(setting, None), PAPER[setting]
    assert c.pfgmpp.D == want["D"] and (c.pfgmpp.P_mean, c.pfgmpp.P_std, c.pfgmpp.sigma_data) == (
        -1.2,
        1.2,
        0.5,
    )
    assert c.train.batch_size == want["batch"] and c.train.num_steps * want["batch"] == 200_000_000
    o = c.optimizer
    assert (o.lr, o.b1, o.b2, o.eps, o.lr_rampup_kimg, o.grad_clip) == (
        want["lr"],
        0.9,
        0.999,
        1e-8,
        10_000,
        0,
    )
    assert (c.ema.halflife_kimg, c.ema.rampup_ratio) == (500, 0.05)
    m = c.model
    assert (m.model_channels, tuple(m.channel_mult), m.num_blocks, tuple(m.attn_resolutions)) == (
        128,
        want["mult"],
        4,
        (16,),
    )
    assert (m.dropout, m.embedding_type, tuple(m.resample_filter)) == (
        want["dropout"],
        "positional",
        (1, 1),
    )
    assert (c.data.resolution, c.data.cond, c.data.flip) == (want["res"], want["cond"], False)
    s = c.sampler
    assert (s.num_steps, s.sigma_min, s.sigma_max, s.rho) == (
        40 if setting == "ffhq64_d128" else 18,
        0.002,
        80,
        7,
    )
    small = config(setting, "cpu")
    assert (
        small.data.name == "digits"
        and small.pfgmpp.D == want["D"]
        and small.data.cond == want["cond"]
    )


def test_config_errors_are_named():
    with pytest.raises(
        ValueError, match=r"config argument 'huge'; expected one of \('paper', 'cpu', 'smoke'\)"
    ):
        config("cifar10_d128", "huge")
    c = config()
    c.data.name = "imagenet"
    with pytest.raises(
        ValueError, match=r"data.name='imagenet'; expected one of \('digits', 'tfds', 'folder'\)"
    ):
        pfgmpp.load_source(c.data)
    c = config("ffhq64_d128", None)
    with pytest.raises(ValueError, match="data.name='folder' needs data.path"):
        pfgmpp.load_source(c.data)
    c = config()
    c.pfgmpp.D = -3.0
    with pytest.raises(ValueError, match="D must be a .*positive number"):
        pfgmpp.build(c, parallel.make_mesh())
    c = config()
    c.model.dtype = "float16"
    with pytest.raises(
        ValueError, match=r"model.dtype='float16'; expected one of \('float32', 'bfloat16'\)"
    ):
        image_model.build_model(c)


# --- training end to end ----------------------------------------------------------------------


def fixed_loss(task, params, batch):
    """The loss on a fixed batch averaged over fixed keys, dropout included (smoke has none)."""
    loss = jax.jit(lambda p, k: task.loss_fn(p, task.frozen, task.extra, batch, k)[0])
    return float(np.mean([loss(params, jax.random.key(i)) for i in range(16)]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pfgmpp_smoke")
    c = config()
    c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 40, 40, 20
    # What launch.train writes; launch.sample rebuilds the model from it.
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=2, sort_keys=True))
    summary = run_experiment(c, str(workdir))
    return c, workdir, summary


@pytest.mark.slow
def test_short_run_lowers_the_loss_and_reports_fd(trained):
    c, workdir, summary = trained
    task = pfgmpp.build(c, parallel.make_mesh())
    step, tree = train.load_arrays(str(workdir / "checkpoints"))
    assert step == 40
    batch = {"image": jnp.asarray(task.train_data[0]["image"])}
    trained_params = image_model.restore_like(task.params, tree["params"])
    ema_params = image_model.restore_like(task.params, tree["extra"]["ema"])
    before = fixed_loss(task, task.params, batch)
    assert fixed_loss(task, trained_params, batch) < 0.7 * before
    assert fixed_loss(task, ema_params, batch) < before
    rows = train.read_jsonl(str(workdir / "metrics.jsonl"))
    evals = [r for r in rows if "samples/fd" in r]
    assert [r["step"] for r in evals] == [0, 40]
    assert (
        summary["fd"] == evals[-1]["samples/fd"]
        and summary["fd_real"] == evals[0]["samples/fd_real"]
    )
    assert (
        summary["fd_real"] < summary["fd"]
    )  # 32 real digits are closer to the digits than samples
    assert (workdir / "images" / "samples_samples_00000040.png").exists()


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_including_ema(trained, tmp_path):
    _, workdir, _ = trained
    for steps in (20, 40):  # stop at 20 (a checkpoint), then rerun to 40 in the same workdir
        c2 = config()
        c2.train.num_steps, c2.train.eval_every, c2.train.checkpoint_every = steps, 0, 20
        run_experiment(c2, str(tmp_path))
    _, resumed = train.load_arrays(str(tmp_path / "checkpoints"))
    _, reference = train.load_arrays(str(workdir / "checkpoints"))
    for part in ("params", "extra", "opt_state"):
        chex.assert_trees_all_equal(resumed[part], reference[part])
    assert not np.array_equal(
        *[np.asarray(jax.tree.leaves(reference[k])[0]) for k in ("params", "extra")]
    )


@pytest.mark.slow
def test_sample_launcher_writes_grids_and_probes_robustness(trained, tmp_path):
    from launch import sample

    c, workdir, _ = trained
    rows = sample.sample_workdir(
        str(workdir),
        num=16,
        batch=16,
        steps=3,
        alphas=("0", "0.5"),
        bits=("0", "2"),
        out=str(tmp_path),
    )
    assert [(r["alpha"], r["bits"]) for r in rows] == [(0.0, 0), (0.0, 2), (0.5, 0), (0.5, 2)]
    for r in rows:
        with np.load(r["npz"]) as f:
            assert f["images"].shape == (16, 8, 8, 1) and f["images"].dtype == np.uint8
        with open(r["png"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert np.isfinite(r["fd"]) and r["D"] == 128.0 and r["checkpoint_step"] == 40
    # Same seed: α = 0 and full precision reproduce exactly; the probes change the samples.
    again = sample.sample_workdir(
        str(workdir), num=16, batch=16, steps=3, out=str(tmp_path / "again")
    )
    first = {(r["alpha"], r["bits"]): np.load(r["npz"])["images"] for r in rows}
    np.testing.assert_array_equal(np.load(again[0]["npz"])["images"], first[(0.0, 0)])
    assert not np.array_equal(first[(0.5, 0)], first[(0.0, 0)])
    assert not np.array_equal(first[(0.0, 2)], first[(0.0, 0)])
    with pytest.raises(FileNotFoundError, match="no checkpoints directory"):
        sample.sample_workdir(str(tmp_path), config=c)


@pytest.mark.slow
def test_inception_evaluator_and_sample_launcher_agree_on_fid(
    trained, tmp_path, random_fid_inception
):
    """Training's evaluator and `python -m launch.sample --fid_ref` reach the same samples by
    different code: their FIDs against one statistics file must agree."""
    from jaxsafe.data import images
    from jaxsafe.diffusion import fid
    from jaxsafe.nn import inception
    from launch import sample

    c, workdir, _ = trained
    ref = str(tmp_path / "digits.npz")
    fn = fid.feature_fn(inception.load(random_fid_inception))
    fid.save_stats(
        ref, *fid.source_stats(fn, images.digits(8)["image"][:32], 32), num=32, source="digits"
    )
    c = c.copy_and_resolve_references()
    c.eval.update(feature_net="inception", fid_ref=ref, fid_weights=random_fid_inception)
    task = pfgmpp.build(c, parallel.make_mesh())
    step, tree = train.load_arrays(str(workdir / "checkpoints"))
    ema = image_model.restore_like(task.params, tree["extra"]["ema"])
    state = types.SimpleNamespace(
        step=jnp.asarray(step), extra={"ema": ema}, frozen=task.frozen, params=None
    )
    out = task.evaluators["samples"](state)
    # The launcher's own entry point, each flag parsed from its command-line string. (Not
    # FLAGS(argv): that also validates other launchers' required flags when an xdist worker
    # has imported them.)
    from absl import flags

    args = {
        "workdir": str(workdir),
        "num": str(c.eval.num_samples),
        "batch": str(c.eval.batch_size),
        "seed": str(c.eval.seed),
        "out": str(tmp_path / "s"),
        "fid_ref": ref,
        "fid_weights": random_fid_inception,
    }
    for name, text in args.items():
        flags.FLAGS[name].parse(text)
    flags.FLAGS.mark_as_parsed()
    try:
        sample.main(["sample"])
    finally:
        flags.FLAGS.unparse_flags()
    rows = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert rows[0]["checkpoint_step"] == step and rows[0]["fid"] > 1e-3
    np.testing.assert_allclose(out["fid"], rows[0]["fid"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_inception_evaluator_needs_a_statistics_file():
    c = config()
    c.eval.feature_net = "inception"
    with pytest.raises(ValueError, match="eval.feature_net='inception' needs eval.fid_ref"):
        pfgmpp.build(c, parallel.make_mesh())


def test_quantisation_selects_the_reference_tensors():
    from launch.sample import quantizable

    include = quantizable(32)
    assert include("enc/16x16_block0/conv0/kernel")
    for name in (
        "enc/32x32_conv/kernel",
        "map_layer0/kernel",
        "enc/16x16_block0/affine/kernel",
        "enc/16x16_block0/norm0/scale",
        "enc/16x16_block0/conv0/bias",
    ):
        assert not include(name)


def test_restore_like_names_the_mismatch():
    template = {"a": {"kernel": jnp.zeros((2, 3))}}
    with pytest.raises(ValueError, match=r"checkpoint lacks tensor 'a/kernel'"):
        image_model.restore_like(template, {"b": {"kernel": np.zeros((2, 3))}})
    with pytest.raises(ValueError, match=r"'a/kernel' has shape \(3, 2\), model needs \(2, 3\)"):
        image_model.restore_like(template, {"a": {"kernel": np.zeros((3, 2))}})
    out = image_model.restore_like(template, {"a": {"kernel": np.ones((2, 3))}})
    np.testing.assert_array_equal(out["a"]["kernel"], 1.0)


def test_launcher_config_round_trips_through_config_json(tmp_path):
    from jaxsafe.diffusion.image_model import load_config

    with pytest.raises(FileNotFoundError, match=r"config.json not found; pass --config"):
        load_config(str(tmp_path))
    c = config("cifar10_edm", "cpu")
    (tmp_path / "config.json").write_text(c.to_json_best_effort(indent=2, sort_keys=True))
    back = load_config(str(tmp_path))
    assert back.pfgmpp.D == float("inf") and image_model.augmentation_dim(back.pfgmpp.D) is None
    assert tuple(back.model.channel_mult) == tuple(c.model.channel_mult)
    assert back.data.data_dir is None and back.train.batch_size == c.train.batch_size


@pytest.mark.slow
def test_class_conditional_smoke_feeds_one_hot_labels():
    c = config("cifar10_cond_d2048")
    task = pfgmpp.build(c, parallel.make_mesh())
    batch = task.train_data[0]
    assert set(batch) == {"image", "label"} and batch["label"].shape == (16,)
    assert task.params["map_label"]["kernel"].shape == (10, c.model.model_channels)
    loss = jax.jit(lambda p, b: task.loss_fn(p, task.frozen, task.extra, b, jax.random.key(0))[0])
    assert np.isfinite(loss(task.params, batch))
    with pytest.raises(ValueError, match=r"class_labels: expected shape \(16, 10\)"):
        task.loss_fn(
            task.params,
            task.frozen,
            task.extra,
            {"image": batch["image"], "label": batch["label"][:8]},
            jax.random.key(0),
        )


@pytest.mark.slow  # 35 s, mostly compiling the augmented step's gradient
def test_augmentation_labels_reach_the_network():
    # augment.p > 0: a 9-label map_augment layer, and the loss depends on it (its gradient is
    # non-zero); p = 0 builds none. The smoke U-Net has no dropout-free path to compare, so the
    # check is the gradient, which is exactly 0 if the labels never reach the embedding.
    c = config("cifar10_d128")
    c.augment.p = 1.0
    task = pfgmpp.build(c, parallel.make_mesh())
    assert task.params["map_augment"]["kernel"].shape == (9, c.model.model_channels)

    def loss(params):
        return task.loss_fn(params, task.frozen, task.extra, task.train_data[0], jax.random.key(0))[
            0
        ]

    grads = jax.jit(jax.grad(loss))(task.params)  # jitted: op by op, the backward took a minute
    assert float(jnp.abs(grads["map_augment"]["kernel"]).sum()) > 0
    assert "map_augment" not in pfgmpp.build(config("cifar10_d128"), parallel.make_mesh()).params


@pytest.mark.slow
def test_unconditional_branch_of_a_conditional_model_is_zero_labels():
    """EDMPrecond semantics: labels=None on a class-conditional net means all-zero labels, so
    classifier-free guidance (which passes None for the unconditional branch) works."""
    from flax import nnx

    from jaxsafe.nn.songunet import SongUNet

    model = SongUNet(
        8,
        1,
        1,
        label_dim=3,
        model_channels=8,
        channel_mult=(1,),
        num_blocks=1,
        attn_resolutions=(),
        dropout=0.0,
        rngs=nnx.Rngs(0),
    )
    model.eval()
    denoiser = image_model.make_denoiser(model, 0.5)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    sigma = jnp.array([0.5, 2.0])
    np.testing.assert_array_equal(denoiser(x, sigma, None), denoiser(x, sigma, jnp.zeros((2, 3))))
