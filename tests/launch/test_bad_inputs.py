"""A corpus of bad inputs for every launcher: each is one line on stderr, ``<prog>: error:
<message>``, exit status 2, no traceback, and nothing half-written in the output folders
(docs/reliability.md). Plus in-process checks of ``launch.user_errors`` itself.

Each case: (id, launcher, argv, setup, expected). ``setup(inp, out)`` builds the bad input under
``inp``; argv's ``{inp}`` / ``{out}`` are those folders; the launcher writes only under ``out``,
which is checked afterwards. ``expected`` is a substring of the error line (or a tuple of them).
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTBED = ROOT / "jaxsafe" / "data" / "assets" / "testbed_model"
GROK = "--config=configs/grokking/perp_adamw.py:smoke"
PFGMPP = "--config=configs/pfgmpp/cifar10_edm.py:smoke"
DBPM = "--config=configs/dbpm/epilepsy.py:smoke"
UCE = "--config=configs/erasure/uce.py:smoke"
ATTACK = "--config=configs/attacks/unlearndiffatk.py:smoke"
# A few steps, no evaluation: the grokking smoke run that leaves a checkpoint.
SHORT_RUN = [
    "--config.train.num_steps=2",
    "--config.train.steps_per_call=1",
    "--config.train.checkpoint_every=2",
    "--config.train.log_every=2",
    "--config.train.eval_every=0",
]


def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def launch(module, *argv, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", f"launch.{module}", *argv],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------ bad inputs


def nothing(inp, out):
    pass


def png(path, size=8):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(path)


def empty_folder(inp, out):
    (inp / "images").mkdir()


def folder_with_a_text_file(inp, out):
    for i in range(20):
        png(inp / "images" / f"{i:02d}.png")
    (inp / "images" / "notes.png").write_text("not an image")


TS_HEADER = "@problemName Epilepsy\n@univariate true\n@classLabel true a b\n@data\n"


def ts_files(inp, train_rows):
    folder = inp / "Epilepsy"
    folder.mkdir()
    (folder / "Epilepsy_TRAIN.ts").write_text(TS_HEADER + train_rows)
    (folder / "Epilepsy_TEST.ts").write_text(TS_HEADER + "1,2,3:a\n2,3,4:b\n")


def malformed_ts(inp, out):
    ts_files(inp, "1,2,3:a\n1,2,x:b\n")


def infinite_ts(inp, out):
    ts_files(inp, "1,2,3:a\n1,inf,3:b\n")


def short_grokking_run(inp, out):
    r = launch("train", GROK, f"--workdir={out / 'run'}", *SHORT_RUN)
    assert r.returncode == 0, r.stderr[-3000:]


def copy_testbed(inp):
    shutil.copytree(TESTBED, inp / "model")
    return inp / "model"


def truncated_unet(inp, out):
    f = copy_testbed(inp) / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


def tokenizer_without_files(inp, out):
    (copy_testbed(inp) / "tokenizer" / "vocab.json").unlink()


def unsupported_layout(inp, out):
    index = copy_testbed(inp) / "model_index.json"
    value = json.loads(index.read_text())
    value["unet"] = ["diffusers", "UNet2DModel"]  # an unconditional DDPM's, not SD's
    index.write_text(json.dumps(value))


def a_prompt(inp):
    (inp / "prompts.txt").write_text("a red circle\n")


def prompts_only(inp, out):
    a_prompt(inp)


def malformed_compositions(inp, out):
    a_prompt(inp)
    (inp / "compositions.json").write_text('{"bare": [["{concept}", 4.0],}')


def run_folder(inp, config):
    (inp / "run").mkdir()
    (inp / "run" / "config.json").write_text(config)


def malformed_config_json(inp, out):
    run_folder(inp, '{"experiment": "pfgmpp",\n "data": {,}}')


def grokking_config_json(inp, out):
    run_folder(inp, json.dumps({"experiment": "grokking", "variant": "smoke"}))


def junk_npz(inp, out):
    (inp / "ref.npz").write_bytes(b"not a zip archive")


def nan_stats(inp, out):
    sigma = np.eye(3)
    sigma[1, 2] = np.nan
    np.savez(inp / "ref.npz", mu=np.zeros(3), sigma=sigma)


def flipped_weights(inp, out):
    from jaxsafe.weights import convert

    f = inp / "weights.safetensors"
    convert.write_safetensors({"Conv2d_1a_3x3.conv.weight": np.ones((32, 3, 3, 3), np.float32)}, f)
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40  # a bit of the tensor's last value
    f.write_bytes(bytes(data))


def junk_pth(inp, out):
    (inp / "weights.pth").write_bytes(b"not a torch file")


def malformed_summary(inp, out):
    (inp / "seed0").mkdir()
    (inp / "seed0" / "summary.json").write_text('{"acc": 0.5')


class Case(NamedTuple):
    id: str
    launcher: str
    argv: tuple
    setup: object
    expected: str | tuple


CASES = [
    # Flags and configs: the parser's errors.
    Case(
        "misspelt_config_key",
        "train",
        (GROK, "--workdir={out}/w", "--config.train.num_stpes=3"),
        nothing,
        (
            "--config.train.num_stpes=3: the config has no field 'num_stpes'",
            'Did you mean "num_steps"',
        ),
    ),
    Case(
        "unknown_config_variant",
        "train",
        ("--config=configs/grokking/perp_adamw.py:smok", "--workdir={out}/w"),
        nothing,
        "config argument 'smok'; expected one of ('paper', 'cpu', 'smoke')",
    ),
    Case(
        "wrong_value_type",
        "train",
        (GROK, "--workdir={out}/w", "--config.train.num_steps=abc"),
        nothing,
        "--config.train.num_steps=abc: invalid literal for int()",
    ),
    Case(
        "missing_config_file",
        "train",
        ("--config={inp}/nope.py", "--workdir={out}/w"),
        nothing,
        ("--config={inp}/nope.py: cannot load the config file", "No such file"),
    ),
    Case(
        "missing_required_flag",
        "erase",
        (UCE,),
        nothing,
        "--workdir must have a value other than None",
    ),
    Case(
        "enum_flag_value",
        "grokking_demo",
        ("--workdir={out}/w", "--size=huge"),
        nothing,
        "--size=huge: value should be one of <cpu|smoke>",
    ),
    # Shapes and values that do not fit.
    Case(
        "resolution_does_not_fit_the_data",
        "train",
        (PFGMPP, "--workdir={out}/w", "--config.data.resolution=12"),
        nothing,
        "resolution must be a positive multiple of 8, got 12",
    ),
    Case(
        "unknown_study_dimension",
        "pfgmpp_study",
        ("--out={out}/s", "--D=7"),
        nothing,
        "no config for D=7",
    ),
    Case(
        "unknown_table_setting",
        "erasure_table",
        ("--out={out}/t", "--settings=bogus"),
        nothing,
        "--settings: unknown ['bogus']",
    ),
    Case(
        "unknown_attack_setting",
        "robustness_table",
        ("--table={out}/t", "--out={out}/r", "--settings=bogus"),
        nothing,
        "--settings: unknown setting 'bogus'",
    ),
    # Data files.
    Case(
        "empty_image_folder",
        "train",
        (
            PFGMPP,
            "--workdir={out}/w",
            "--config.data.name=folder",
            "--config.data.path={inp}/images",
        ),
        empty_folder,
        "no .png/.jpg/.jpeg files under '{inp}/images'",
    ),
    Case(
        "non_image_file_in_image_folder",
        "fid_stats",
        (
            "--source=folder:{inp}/images",
            "--resolution=8",
            "--out={out}/stats.npz",
            "--weights={inp}/none.safetensors",
        ),
        folder_with_a_text_file,
        "cannot read image '{inp}/images/notes.png'",
    ),
    Case(
        "malformed_ts_file",
        "train",
        (DBPM, "--workdir={out}/w", "--config.data.path={inp}/Epilepsy"),
        malformed_ts,
        "Epilepsy_TRAIN.ts:6: could not parse value 'x' as a number",
    ),
    Case(
        "infinite_value_in_ts_file",
        "train",
        (DBPM, "--workdir={out}/w", "--config.data.path={inp}/Epilepsy"),
        infinite_ts,
        "Epilepsy_TRAIN.ts:6: value 'inf' is infinite",
    ),
    Case(
        "nan_in_fid_statistics",
        "sample",
        ("--workdir={out}/w", "--fid_ref={inp}/ref.npz"),
        nan_stats,
        "ref.npz: 'sigma' holds non-finite values",
    ),
    Case(
        "malformed_fid_statistics",
        "sample",
        ("--workdir={out}/w", "--fid_ref={inp}/ref.npz"),
        junk_npz,
        "ref.npz: cannot read as .npz (not a zip archive",
    ),
    Case(
        "missing_fid_ref",
        "sample",
        ("--workdir={out}/w", "--fid_ref={inp}/missing.npz"),
        nothing,
        "FID reference statistics '{inp}/missing.npz' not found",
    ),
    Case(
        "malformed_summary_json",
        "summarize",
        ("--runs={inp}/seed*", "--keys=acc"),
        malformed_summary,
        "seed0/summary.json (a run's summary): invalid JSON at line 1",
    ),
    Case(
        "no_runs_to_summarize",
        "summarize",
        ("--runs={inp}/seed*", "--keys=acc"),
        nothing,
        "--runs={inp}/seed*: matches no directory",
    ),
    # Training: a non-finite loss, a checkpoint that does not fit the model.
    Case(
        "non_finite_loss",
        "train",
        (GROK, "--workdir={out}/w", "--config.optimizer.lr=1e38", "--config.train.eval_every=0"),
        nothing,
        ("non-finite loss = ", "at step "),
    ),
    Case(
        "checkpoint_does_not_fit_the_model",
        "train",
        (
            GROK,
            "--workdir={out}/run",
            *SHORT_RUN[1:],
            "--config.train.num_steps=4",
            "--config.model.hidden=(48,48)",
        ),
        short_grokking_run,
        ("checkpoint", "'params/layers/0/kernel'", "(46, 32)", "(46, 48)"),
    ),
    # Runs and workdirs.
    Case(
        "missing_workdir_config",
        "sample",
        ("--workdir={out}/w",),
        nothing,
        "{out}/w/config.json not found; pass --config=",
    ),
    Case(
        "malformed_run_config",
        "sample",
        ("--workdir={inp}/run", "--out={out}/samples"),
        malformed_config_json,
        "run/config.json (the run's config): invalid JSON at line 2",
    ),
    Case(
        "run_of_another_experiment",
        "sample",
        ("--workdir={inp}/run", "--out={out}/samples"),
        grokking_config_json,
        "experiment='grokking'; expected a PFGM++/EDM run",
    ),
    Case(
        "export_without_run",
        "export_testbed",
        ("--workdir={out}/w",),
        nothing,
        "config.json' not found: --workdir must be a launch.train run directory",
    ),
    # Model folders and weights.
    Case(
        "missing_model_folder",
        "attack",
        (
            ATTACK,
            "--model={inp}/nope",
            "--prompts={inp}/prompts.txt",
            "--judge=oracle:red",
            "--out={out}/a",
        ),
        prompts_only,
        "model folder '{inp}/nope' not found",
    ),
    Case(
        "unsupported_model_folder",
        "attack",
        (
            ATTACK,
            "--model={inp}/model",
            "--prompts={inp}/prompts.txt",
            "--judge=oracle:red",
            "--out={out}/a",
        ),
        lambda inp, out: (unsupported_layout(inp, out), a_prompt(inp)),
        "unet is 'UNet2DModel'; jaxsafe loads only 'UNet2DConditionModel'",
    ),
    Case(
        "truncated_safetensors_in_model",
        "erase",
        (UCE, "--workdir={out}/w", "--config.model.folder={inp}/model"),
        truncated_unet,
        (
            "unet/diffusion_pytorch_model.safetensors: cannot read safetensors file",
            "truncated or corrupted",
        ),
    ),
    Case(
        "damaged_fid_weights",
        "fid_stats",
        ("--source=digits", "--out={out}/stats.npz", "--weights={inp}/weights.safetensors"),
        flipped_weights,
        "weights.safetensors: tensor 'Conv2d_1a_3x3.conv.weight' fails its CRC-32 check",
    ),
    Case(
        "unreadable_pth",
        "convert_fid_inception",
        ("--pth={inp}/weights.pth", "--out={out}/inception.safetensors"),
        junk_pth,
        "weights.pth: cannot read as a torch state dict",
    ),
    Case(
        "tokenizer_folder_without_its_files",
        "erase",
        (UCE, "--workdir={out}/w", "--config.model.folder={inp}/model"),
        tokenizer_without_files,
        "tokenizer file '{inp}/model/tokenizer/vocab.json' not found",
    ),
    Case(
        "concept_not_in_vocabulary",
        "erase",
        (
            UCE,
            "--workdir={out}/w",
            "--config.concepts.erase=('purple',)",
            "--config.concepts.templates=('a {{}}',)",
        ),
        nothing,
        "unknown word 'purple' in 'a purple': not in the test-bed tokenizer's vocabulary",
    ),
    Case(
        "malformed_compositions_json",
        "attack",
        (
            "--config=configs/attacks/concept_arithmetic.py:smoke",
            f"--model={TESTBED}",
            "--prompts={inp}/prompts.txt",
            "--judge=oracle:red",
            "--compositions={inp}/compositions.json",
            "--out={out}/a",
        ),
        malformed_compositions,
        "compositions.json (--compositions): invalid JSON at line 1",
    ),
    Case(
        "unknown_judge",
        "attack",
        (
            ATTACK,
            f"--model={TESTBED}",
            "--prompts={inp}/prompts.txt",
            "--judge=oracle",
            "--out={out}/a",
        ),
        prompts_only,
        "--judge 'oracle': expected oracle:<concept> or nudenet",
    ),
    Case(
        "output_folder_missing",
        "train_digits_classifier",
        ("--out={out}/no/such/folder/classifier.npz",),
        nothing,
        "--out '{out}/no/such/folder/classifier.npz': no folder",
    ),
]


# ------------------------------------------------------------------- what a case must leave


def assert_nothing_half_written(folder: Path) -> None:
    """No temporary files or orbax temporary folders; every JSON, JSONL, NPZ, safetensors and
    PNG file under ``folder`` reads whole."""
    from PIL import Image

    from jaxsafe.weights import convert

    for path in sorted(folder.rglob("*")):
        name = path.name
        assert ".tmp" not in name and "orbax-checkpoint-tmp" not in name, path
        if not path.is_file():
            continue
        if name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".jsonl"):
            for line in path.read_text().splitlines():
                json.loads(line)
        elif name.endswith(".npz"):
            with np.load(path) as f:
                for key in f.files:
                    f[key]
        elif name.endswith(".safetensors"):
            convert.read_safetensors(path)
        elif name.endswith(".png"):
            with Image.open(path) as im:
                im.load()


def assert_one_line(r, prog: str, expected) -> str:
    assert r.returncode == 2, f"exit status {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    for part in (expected,) if isinstance(expected, str) else expected:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_status_2(case, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    case.setup(inp, out)
    fill = lambda s: s.format(inp=inp, out=out)  # noqa: E731
    expected = (
        fill(case.expected) if isinstance(case.expected, str) else tuple(map(fill, case.expected))
    )
    r = launch(case.launcher, *map(fill, case.argv))
    assert_one_line(r, case.launcher, expected)
    assert_nothing_half_written(out)


def test_the_corpus_covers_every_launcher():
    launchers = {p.stem for p in (ROOT / "launch").glob("*.py")} - {"__init__", "user_errors"}
    assert launchers == {c.launcher for c in CASES}
    assert len(CASES) >= 22 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.slow
def test_debug_keeps_the_traceback(tmp_path):
    r = launch("sample", f"--workdir={tmp_path}", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: ")
    assert "sample: error:" not in r.stderr
    r = launch("train", GROK, f"--workdir={tmp_path}", "--config.train.num_stpes=3", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "train: error:" not in r.stderr


# ------------------------------------------------------------- launch.user_errors in-process


@pytest.mark.parametrize(
    "error, line",
    [
        (ValueError("--judge 'x': expected nudenet"), "--judge 'x': expected nudenet"),
        (FileNotFoundError("model folder '/m' not found"), "model folder '/m' not found"),
        (NotADirectoryError(20, "Not a directory", "/a/b"), "[Errno 20] Not a directory: '/a/b'"),
        (PermissionError(13, "Permission denied", "/out"), "[Errno 13] Permission denied: '/out'"),
        (
            ImportError("the TFDS source needs `pip install tensorflow-datasets`"),
            "the TFDS source needs `pip install tensorflow-datasets`",
        ),
        (FloatingPointError("non-finite loss = nan at step 3"), "non-finite loss = nan at step 3"),
        (ValueError("first line\n  second line\n"), "first line second line"),
        (zipfile.BadZipFile("File is not a zip file"), None),  # not a user error: a bug upstream
    ],
)
def test_one_line_turns_user_errors_into_one_line(error, line, capsys):
    from launch import user_errors

    def main():
        with user_errors.one_line("fake", debug=False):
            raise error

    if line is None:
        with pytest.raises(type(error)):
            main()
        return
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"fake: error: {line}\n"


def test_library_errors_are_user_errors():
    from jaxsafe.train import CheckpointMismatchError, NonFiniteError
    from jaxsafe.weights import CheckpointError
    from launch import user_errors

    for kind in (CheckpointMismatchError, NonFiniteError, CheckpointError):
        assert issubclass(kind, user_errors.USER_ERRORS)
    assert not issubclass(KeyError, user_errors.USER_ERRORS)  # a KeyError is a bug


def test_debug_reraises():
    from launch import user_errors

    with pytest.raises(ValueError, match="bad"):
        with user_errors.one_line("fake", debug=True):
            raise ValueError("bad")


def _parse(argv, capsys):
    """``user_errors.parse_flags`` of ``argv`` on a fresh flag set with a config file flag;
    returns what it printed."""
    from absl import flags
    from ml_collections import config_flags

    from launch import user_errors

    argv = ["fake", *argv]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
    )  # where it reads --config.x.y overrides
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    flags.DEFINE_bool("debug", False, "", flag_values=fv)
    with pytest.raises(SystemExit) as exit_:
        user_errors.parse_flags("fake", fv)(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_flag_and_config_errors_are_one_line(capsys):
    grok = f"{ROOT}/configs/grokking/perp_adamw.py"
    assert _parse([f"--config={grok}:smoke", "--config.optimizer.lrr=0.1"], capsys) == (
        "fake: error: flag --config.optimizer.lrr=0.1: the config has no field 'lrr'. Did you "
        'mean "lr" instead of "lrr"?\n'
    )
    assert _parse([f"--config={grok}:huge"], capsys) == (
        f"fake: error: flag --config={grok}:huge: config argument 'huge'; expected one of "
        "('paper', 'cpu', 'smoke')\n"
    )
    assert _parse([f"--config={grok}:smoke", "--config.train.num_steps=x"], capsys) == (
        "fake: error: flag --config.train.num_steps=x: invalid literal for int() with base 10: "
        "'x'\n"
    )
    assert _parse([f"--config={ROOT}/nope.py"], capsys).startswith(
        f"fake: error: flag --config={ROOT}/nope.py: cannot load the config file ([Errno 2]"
    )
    assert _parse(["--wrokdir=/tmp"], capsys).startswith(
        "fake: error: Unknown command line flag 'wrokdir'"
    )


def test_debug_on_the_command_line_keeps_a_parse_error():
    from absl import flags

    from launch import user_errors

    fv = flags.FlagValues()
    flags.DEFINE_integer("steps", 1, "", flag_values=fv)
    flags.DEFINE_bool("debug", False, "", flag_values=fv)
    with pytest.raises(flags.IllegalFlagValueError):
        user_errors.parse_flags("fake", fv)(["fake", "--steps=x", "--debug"])
