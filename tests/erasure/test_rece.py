"""RECE: the closed-form adversarial embedding, a round, model selection, and the experiment."""

import sys
import types

import chex
import jax
import numpy as np
import pytest

from jaxsafe.erasure import closed_form, rece


def _kernels(seed=0, d_in=6, d_outs=(4, 5, 7), scale=1.0):
    """Flax kernels K = Wᵀ (d_in, d_out) of a few projections, and perturbed 'edited' copies."""
    r = np.random.default_rng(seed)
    orig = {f"l{i}": r.standard_normal((d_in, d)).astype(np.float32) for i, d in enumerate(d_outs)}
    edited = {k: v + scale * r.standard_normal(v.shape).astype(np.float32) for k, v in orig.items()}
    return edited, orig


def _rows(seed, n, d):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


class AdversarialEmbeddingTest(chex.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_solves_its_normal_equations_and_equals_a_regularised_lstsq(self):
        K, K0 = _kernels(0)
        c = _rows(1, 3, 6)
        lam = 0.3
        c_adv = np.asarray(
            self.variant(lambda k, c_: rece.adversarial_embedding(k, K0, c_, lam))(K, c), np.float64
        )
        chex.assert_shape(c_adv, (3, 6))
        # The normal equations (Σ WᵀW + λI) c' = Σ WᵀW* c, with W = Kᵀ, in float64.
        W = {k: v.T.astype(np.float64) for k, v in K.items()}
        W0 = {k: v.T.astype(np.float64) for k, v in K0.items()}
        A = sum(W[k].T @ W[k] for k in W) + lam * np.eye(6)
        B = sum(W[k].T @ W0[k] for k in W)
        residual = c_adv @ A.T - c.astype(np.float64) @ B.T
        assert np.abs(residual).max() < 1e-4 * np.abs(c @ B.T).max()
        # Independently: argmin ‖W c' − W* c‖² + λ‖c'‖² as the least squares problem of the
        # stacked projections with √λ I appended.
        Ws = np.concatenate([W[k] for k in sorted(W)])
        W0s = np.concatenate([W0[k] for k in sorted(W)])
        M = np.concatenate([Ws, np.sqrt(lam) * np.eye(6)])
        for i in range(3):
            rhs = np.concatenate([W0s @ c[i], np.zeros(6)])
            ref = np.linalg.lstsq(M, rhs, rcond=None)[0]
            np.testing.assert_allclose(c_adv[i], ref, rtol=1e-4, atol=1e-4)

    @chex.all_variants(with_pmap=False)
    def test_unedited_projections_and_vanishing_lambda_give_back_c(self):
        _, K0 = _kernels(2)
        c = _rows(3, 4, 6)
        with jax.enable_x64(True):
            K64 = {k: v.astype(np.float64) for k, v in K0.items()}
            out = self.variant(lambda k, c_: rece.adversarial_embedding(k, k, c_, 1e-10))(
                K64, c.astype(np.float64)
            )
            np.testing.assert_allclose(out, c, atol=1e-7)

    def test_lambda_shrinks_towards_zero(self):
        K, K0 = _kernels(4)
        c = _rows(5, 2, 6)
        norms = [
            np.linalg.norm(rece.adversarial_embedding(K, K0, c, lam))
            for lam in (0.0, 1.0, 1e2, 1e6)
        ]
        assert norms[0] > norms[1] > norms[2] > norms[3] and norms[3] < 1e-3 * norms[0]


@pytest.mark.parametrize(
    "change,error",
    [
        (lambda K, K0, c: ({**K, "extra": K["l0"]}, K0, c), "must name the same projections"),
        (lambda K, K0, c: ({**K, "l1": K["l1"][:, :2]}, K0, c), "expected matching (d_in, d_out)"),
        (lambda K, K0, c: (K, K0, c[:, :5]), "c: expected (n, 6) embedding rows"),
        (lambda K, K0, c: ({}, {}, c), "kernels: expected at least one"),
    ],
)
def test_bad_arguments_are_named(change, error):
    K, K0 = _kernels(6)
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        rece.adversarial_embedding(*change(K, K0, _rows(7, 2, 6)), 0.1)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        rece.adversarial_embedding(K, K0, _rows(7, 2, 6), -1.0)


def test_a_round_is_the_uce_edit_of_the_adversarial_rows():
    K, K0 = _kernels(8)
    c_e, c_g, c_p = _rows(9, 2, 6), _rows(10, 2, 6), _rows(11, 3, 6)
    new, c_adv = rece.rece_round(K, K0, c_e, c_g, c_p, lam_emb=0.1, lam=0.1, preserve_scale=0.1)
    np.testing.assert_allclose(
        c_adv, rece.adversarial_embedding(K, K0, c_e, 0.1), rtol=1e-6, atol=1e-6
    )
    ref = closed_form.uce_edit(K, c_adv, c_g, c_p, erase_scale=1.0, preserve_scale=0.1, lam=0.1)
    for k in K:
        np.testing.assert_allclose(new[k], ref[k], rtol=1e-5, atol=1e-6)
        assert not np.allclose(new[k], K[k], atol=1e-5)


def test_select_round():
    s = [0.5, 0.3, 0.1, 0.1, 0.4]
    assert rece.select_round(s, "min") == 2  # the earliest of the tied lowest
    assert rece.select_round(s, "max") == 0
    assert rece.select_round(s, "last") == 4
    assert rece.select_round(s, "min", [True, True, False, False, True]) == 1
    # Round 0 (the starting model) is always a candidate.
    assert rece.select_round([0.2, 0.1], "min", [False, False]) == 0
    with pytest.raises(ValueError, match="mode='best'; expected one of"):
        rece.select_round(s, "best")
    with pytest.raises(ValueError, match="admissible: expected 5 flags"):
        rece.select_round(s, "min", [True])
    with pytest.raises(ValueError, match="scores: expected one score per round"):
        rece.select_round([], "min")


def _replay(K, K0, c_e, c_g, c_p, n, **kw):
    """The kernels after n rounds, computed round by round outside `iterate`."""
    out = [dict(K)]
    for _ in range(n):
        out.append(rece.rece_round(out[-1], K0, c_e, c_g, c_p, **kw)[0])
    return out


def test_iterate_keeps_the_round_the_callback_scores_best():
    K, K0 = _kernels(12)
    c_e, c_g, c_p = _rows(13, 2, 6), _rows(14, 2, 6), _rows(15, 3, 6)
    kw = dict(lam_emb=0.1, lam=0.1, erase_scale=1.0, preserve_scale=0.1)
    wanted = [0.9, 0.4, 0.2, 0.6]  # round 2 is best
    seen = []

    def score(k):
        seen.append({n: np.asarray(v) for n, v in k.items()})
        return wanted[len(seen) - 1]

    res = rece.iterate(K, K0, c_e, c_g, c_p, rounds=3, score=score, select="min", **kw)
    assert res.best_round == 2 and res.scores == pytest.approx(wanted, abs=0)  # exact: copies
    assert len(res.adversarial) == 3
    rounds = _replay(K, K0, c_e, c_g, c_p, 3, **kw)
    for n in K:
        np.testing.assert_array_equal(res.kernels[n], seen[2][n])
        # float32 rounds, jitted or not: equal to ~1e-4; other rounds differ by O(1).
        np.testing.assert_allclose(res.kernels[n], rounds[2][n], rtol=1e-3, atol=1e-3)
        assert min(np.abs(res.kernels[n] - rounds[r][n]).max() for r in (1, 3)) > 1e-2
        np.testing.assert_array_equal(seen[0][n], K[n])  # round 0 is the start, scored
    # An inadmissible best round is skipped; the last is kept in "last" mode; without a
    # callback the last round is kept.
    seen.clear()
    res = rece.iterate(
        K,
        K0,
        c_e,
        c_g,
        c_p,
        rounds=3,
        select="min",
        score=lambda k: (wanted[len(seen)], seen.append(1) or len(seen) != 3),
        **kw,
    )
    assert res.best_round == 1
    seen.clear()
    res = rece.iterate(K, K0, c_e, c_g, c_p, rounds=3, score=score, select="last", **kw)
    assert res.best_round == 3
    res = rece.iterate(K, K0, c_e, c_g, c_p, rounds=2, **kw)
    assert res.best_round == 2 and res.scores == [None] * 3
    for n in K:
        np.testing.assert_allclose(res.kernels[n], rounds[2][n], rtol=1e-3, atol=1e-3)


def test_iterate_stops_when_the_score_reaches_stop_at():
    K, K0 = _kernels(16)
    wanted = iter([0.5, 0.25, 0.0, 0.3, 0.1])
    res = rece.iterate(
        K,
        K0,
        _rows(17, 2, 6),
        _rows(18, 2, 6),
        rounds=4,
        lam_emb=0.1,
        score=lambda k: next(wanted),
        select="min",
        stop_at=0.0,
    )
    assert res.scores == [0.5, 0.25, 0.0] and res.best_round == 2


@pytest.mark.slow
def test_experiment_keeps_the_user_scorers_best_round(tiny_folder, tmp_path, monkeypatch):
    """``edit`` on the tiny test bed with a user scorer: the export holds the round it scored
    lowest, and only cross-attention keys and values differ from the source."""
    from configs.erasure import rece as rece_config
    from experiments import erase_rece
    from jaxsafe.diffusion import pipeline
    from jaxsafe.erasure import model as em

    scores, snapshots = [0.7, 0.2, 0.5], []

    def score(config, pipe):
        snapshots.append({n: np.asarray(v) for n, v in em.kernels(pipe.model).items()})
        return scores[len(snapshots) - 1]

    monkeypatch.setitem(sys.modules, "_rece_test_scorer", types.SimpleNamespace(score=score))
    c = rece_config.get_config("smoke")
    c.model.folder = tiny_folder
    c.eval.enabled = False
    c.rece.scorer = "_rece_test_scorer:score"
    out = erase_rece.edit(c, str(tmp_path))
    assert out["best_round"] == 1 and out["rounds_run"] == 2
    assert out["round_scores"] == pytest.approx(scores, abs=0)  # exact: the scorer's floats
    exported = em.kernels(pipeline.load(out["export"]).model)
    for n, v in exported.items():
        np.testing.assert_allclose(v, snapshots[1][n], rtol=1e-6, atol=1e-7)
        assert not np.allclose(v, snapshots[2][n], atol=1e-6)
    src = pipeline.load(tiny_folder).model
    from flax import nnx

    from jaxsafe.treepath import named_leaves

    before = named_leaves(nnx.state(src, nnx.Param))
    after = named_leaves(nnx.state(pipeline.load(out["export"]).model, nnx.Param))
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == set(exported)


def test_config_variants():
    from configs.erasure import rece as rece_config

    paper = rece_config.get_config()
    assert paper.concepts.erase == ("nudity",) and paper.rece.lam_emb == 0.1
    assert paper.rece.rounds == 3 and paper.rece.select == "min" and paper.uce.lam == 0.5
    style = rece_config.get_config("style")
    assert style.rece.lam_emb == 1e-3 and style.rece.select == "last"
    assert style.concepts.guide == ("art",)
    obj = rece_config.get_config("object")
    assert obj.rece.stop_at == 0.0 and obj.rece.other_tolerance == 0.1
    with pytest.raises(ValueError, match="config argument 'x'"):
        rece_config.get_config("x")


@pytest.mark.slow
def test_rece_erases_red_on_the_trained_test_bed(tmp_path):
    """The shipped test-bed model (acc(red) = 1.0 before): RECE's cpu setting drives acc(red)
    to at most 0.25 while the other colours and concepts stay close, keeping the admissible round
    with the lowest score."""
    from configs.erasure import rece as rece_config
    from experiments import run_experiment as erase

    c = rece_config.get_config("cpu")
    c.eval.update(fid_samples=0)
    out = erase(c, str(tmp_path))
    assert out["target_accuracy"] <= 0.25
    assert out["near_accuracy"] >= 0.75 and out["other_accuracy"] >= 0.45
    # The kept round scores lowest among the admissible ones (other colours within tolerance).
    admissible = [s for s, ok in zip(out["round_scores"], out["round_admissible"]) if ok]
    assert out["round_admissible"][out["best_round"]]
    assert out["round_scores"][out["best_round"]] == min(admissible)


def test_rounds_are_judged_on_every_other_concept():
    from experiments.erase_rece import other_concepts

    others = other_concepts(["square"])
    assert "square" not in others and "box" not in others  # the erased concept and its synonym
    # Not only the other shapes: colours and backgrounds are what a bad round damaged.
    assert {"circle", "ellipse", "triangle", "red", "blue", "plain", "dotted"} <= set(others)
    assert set(other_concepts(["red", "green"])) >= {"orange", "blue", "square"}
    assert not {"red", "green"} & set(other_concepts(["red", "green"]))
