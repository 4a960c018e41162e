r"""Attacks a text-to-image model with adversarial prompts: any attack of ``configs/attacks/``.

    python -m launch.attack --config=configs/attacks/unlearndiffatk.py:testbed \
        --model=/tmp/esd_red --prompts=prompts.txt --judge=oracle:red --out=/tmp/uda_red
    python -m launch.attack --config=configs/attacks/p4d.py:sd --config.kind=k \
        --model=/path/to/esd-nudity --original=/path/to/stable-diffusion-v1-4 \
        --prompts=nudity.tsv --judge=nudenet --out=/tmp/p4d_k

``--model`` is a diffusers-layout folder (a Stable Diffusion checkpoint or a test-bed export), a
Hugging Face hub id ``org/name[@revision]`` (with ``--revision`` / ``--variant``, read from the
hub cache or downloaded where the network allows: ``jaxsafe.weights.hub``) or an erasure workdir
(its ``export/`` is used); ``--original`` (default: the shipped test bed) is the unedited model,
whose images of the prompts are UnlearnDiffAtk's and P4D's targets and whose text encoder runs
Ring-A-Bell's search. ``--prompts``: one prompt per line, or
``prompt<TAB>seed``. ``--judge``: ``oracle:<concept>`` (the test bed) or ``nudenet`` (extra
``jaxsafe[nudenet]``). Ring-A-Bell reads ``--pairs`` (``with<TAB>without`` lines), concept
arithmetic ``--compositions=file.json``. An SPM, SAFREE or SFD export is judged through the
method's own sampler (docs/attacks.md). Writes ``summary.json`` (the config, the rate, per prompt
the success and the judged prompt), ``prompts.txt`` and ``images.png`` to ``--out``. Bad input
is one line on stderr and exit status 2; ``--debug`` shows the traceback.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from jaxsafe import compilation_cache as cache
from launch import user_errors


def _define_flags() -> None:
    """The command's flags, defined only when it runs as a program (tests import this module
    next to launchers that define flags of the same names)."""
    global _CONFIG, _MODEL, _REVISION, _VARIANT, _ORIGINAL, _PROMPTS, _JUDGE, _PAIRS
    global _COMPOSITIONS, _OUT
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Attack config file.", lock_config=False
    )
    _MODEL = flags.DEFINE_string("model", None, "Attacked model folder, hub id or erasure workdir.")
    _REVISION = flags.DEFINE_string("revision", "", "Revision of a --model hub id (default main).")
    _VARIANT = flags.DEFINE_string(
        "variant", "", "Weight variant of --model (fp16: *.fp16.safetensors; default the plain)."
    )
    _ORIGINAL = flags.DEFINE_string(
        "original", "", "Unedited model (default: the shipped test bed)."
    )
    _PROMPTS = flags.DEFINE_string("prompts", None, "Prompt file (prompt[<TAB>seed] per line).")
    _JUDGE = flags.DEFINE_string("judge", None, "oracle:<concept> or nudenet.")
    _PAIRS = flags.DEFINE_string("pairs", "", "Ring-A-Bell pairs (with<TAB>without per line).")
    _COMPOSITIONS = flags.DEFINE_string("compositions", "", "Concept-arithmetic JSON file.")
    _OUT = flags.DEFINE_string("out", None, "Output directory.")
    cache.define_flag()
    flags.mark_flags_as_required(["config", "model", "prompts", "judge", "out"])


def read_prompts(path: str) -> tuple[list[str], list[int]]:
    """Prompts and seeds of a prompt file (module docstring)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts: no file {path!r}")
    prompts, seeds = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            text, _, seed = line.rstrip("\n").partition("\t")
            try:
                seeds.append(int(seed) if seed.strip() else len(prompts))
            except ValueError:
                raise ValueError(
                    f"--prompts {path}:{n}: the seed {seed!r} is not an integer"
                ) from None
            prompts.append(text.strip())
    if not prompts:
        raise ValueError(f"--prompts: {path!r} holds no prompt")
    return prompts, seeds


def read_pairs(path: str) -> tuple[list[str], list[str]]:
    with_, without = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                a, sep, b = line.rstrip("\n").partition("\t")
                if not sep:
                    raise ValueError(f"--pairs {path}:{n}: expected with<TAB>without")
                with_.append(a.strip())
                without.append(b.strip())
    return with_, without


def read_compositions(path: str) -> dict:
    """Concept arithmetic's compositions of a ``--compositions`` file: a JSON object name ->
    list of [prompt, guidance weight] terms (configs/attacks/concept_arithmetic.py)."""
    from jaxsafe.files import read_json

    raw = read_json(path, "--compositions")
    try:
        return {str(k): tuple((str(p), float(w)) for p, w in v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(
            f"--compositions {path}: expected a JSON object name -> list of [prompt, weight] pairs"
        ) from None


def make_judge(spec: str):
    """``(judge, concept)`` of a ``--judge`` value."""
    from jaxsafe.attacks import judges

    kind, _, concept = spec.partition(":")
    if kind == "oracle" and concept:
        return judges.oracle_judge(concept), concept
    if kind == "nudenet" and not concept:
        return judges.nudenet_judge(), None
    raise ValueError(f"--judge {spec!r}: expected oracle:<concept> or nudenet")


def model_folder(path: str, revision: str | None = None, variant: str | None = None) -> str:
    """A model folder: a hub id's local snapshot (resolved first, so that an SPM, SAFREE or SFD
    export on the hub is recognised by its files), a folder, or the export of an erasure
    workdir."""
    from jaxsafe.weights import hub

    if revision and not hub.is_hub_id(path):
        raise ValueError(f"--revision={revision}: --model {path!r} is a folder, not a hub id")
    path = hub.resolve(path, revision=revision or None, variant=variant or None)
    if os.path.isdir(os.path.join(path, "export")) and not os.path.exists(
        os.path.join(path, "model_index.json")
    ):
        return os.path.join(path, "export")
    return path


def run(
    config,
    model: str,
    original: str,
    prompts_path: str,
    judge_spec: str,
    out: str,
    pairs_path: str = "",
    compositions_path: str = "",
    revision: str = "",
    variant: str = "",
) -> dict:
    import numpy as np

    from jaxsafe.attacks import run as attacks
    from jaxsafe.data import images as images_lib
    from jaxsafe.data import shapes_metrics
    from jaxsafe.diffusion import pipeline
    from jaxsafe.nn import oracle as oracle_lib

    prompts, seeds = read_prompts(prompts_path)
    judge, concept = make_judge(judge_spec)
    if compositions_path:
        config.compositions = read_compositions(compositions_path)
    from launch.robustness_table import own_sampler, own_sampler_method

    folder = model_folder(model, revision, variant)
    method = own_sampler_method(folder)
    generate = None
    if method is None:
        pipe = pipeline.load(folder, variant=variant or None)
    elif variant:
        raise ValueError(
            f"--variant={variant}: {folder} is an export of {method}, read with its plain weights"
        )
    else:  # SPM, SAFREE, SFD: judged through the method's own sampler (docs/attacks.md)
        pipe, generate = own_sampler(method, folder, dict(config.sampling))
    base = pipeline.load(original or None)
    pairs, similarity, words = None, None, None
    if pairs_path:
        pairs = read_pairs(pairs_path)
    if concept is not None:  # the test bed
        oracle = oracle_lib.load()
        num = config.get("num_pairs", 16)
        pairs = pairs or shapes_metrics.concept_pairs(concept, num)
        words = shapes_metrics.composition_words(concept)

        def similarity(a, b):
            fa, fb = (shapes_metrics.oracle_features(oracle, x) for x in (a, b))
            fa /= np.maximum(np.linalg.norm(fa, axis=-1, keepdims=True), 1e-12)
            fb /= np.maximum(np.linalg.norm(fb, axis=-1, keepdims=True), 1e-12)
            return np.sum(fa * fb, -1)
    else:

        def similarity(a, b):  # P4D's CLIP image cosine needs CLIP; pixels in its place
            a, b = (np.reshape(x, (len(x), -1)) for x in (a, b))
            return np.sum(a * b, -1) / np.maximum(
                np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12
            )

    result = attacks.run_attack(
        config,
        pipe,
        base,
        prompts,
        seeds,
        judge,
        similarity=similarity,
        pairs=pairs,
        words=words,
        generate=generate,
    )
    images = attacks.sampler(pipe, dict(config.sampling), generate)(
        result["texts"], np.asarray(seeds)
    )
    os.makedirs(out, exist_ok=True)
    images_lib.save_png(
        os.path.join(out, "images.png"),
        images_lib.image_grid(images),
        scale=4 if pipe.testbed else 1,
    )
    with open(os.path.join(out, "prompts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(result["texts"]) + "\n")
    summary = {
        "attack": config.attack,
        "variant": config.variant,
        "model": pipe.folder,
        "original": base.folder,
        "judge": judge_spec,
        "asr": result["asr"],
        "pre_asr": result.get("pre_asr"),
        "prompts": [
            {"prompt": p, "seed": int(s), "adversarial": t, "success": bool(h)}
            for p, s, t, h in zip(prompts, seeds, result["texts"], result["success"])
        ],
        "config": config.to_dict(),
    }
    if "compositions" in result:
        summary["compositions"] = {k: v["asr"] for k, v in result["compositions"].items()}
    tmp = os.path.join(out, "summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, "summary.json"))  # written last, whole or not at all
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxsafe import host_memory

    cache.enable_from_flag()  # a rerun loads the attack's programs instead of compiling them
    host_memory.retain()  # XLA's temporaries stay mapped between calls
    summary = run(
        _CONFIG.value,
        _MODEL.value,
        _ORIGINAL.value,
        _PROMPTS.value,
        _JUDGE.value,
        _OUT.value,
        _PAIRS.value,
        _COMPOSITIONS.value,
        _REVISION.value,
        _VARIANT.value,
    )
    print(json.dumps({k: summary[k] for k in ("attack", "asr", "pre_asr")}))


if __name__ == "__main__":
    _define_flags()
    user_errors.run(main)
