"""Every float comparison under tests/ states an absolute tolerance (see tests/README.md).

A relative-only tolerance fails when the expected value is near zero, or when float32 reduction
order, FMA contraction or another BLAS moves the last bits on a CPU the suite was never run on.
np.allclose / np.isclose have an implicit atol of 1e-8, which is neither stated nor sized to the
values, so they must state it too. Exact comparisons use `np.testing.assert_array_equal`.
"""

import ast
import pathlib

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
# name -> the keyword that carries the absolute tolerance
CALLS = {
    "assert_allclose": "atol",
    "allclose": "atol",
    "isclose": "atol",
    "assert_trees_all_close": "atol",
    "assert_tree_all_close": "atol",
    "approx": "abs",
}


def offenders(source: str, filename: str = "<test>") -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if name not in CALLS:
            continue
        keywords = {k.arg for k in node.keywords}
        if CALLS[name] not in keywords and None not in keywords:  # None: **kwargs, cannot tell
            out.append(f"{filename}:{node.lineno}: {name} without {CALLS[name]}=")
    return out


def test_the_checker_finds_relative_only_comparisons():
    src = (
        "np.testing.assert_allclose(a, b, rtol=1e-6)\n"
        "assert np.allclose(a, b)\n"
        "assert x == pytest.approx(0.5, rel=1e-3)\n"
        "np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)\n"
        "assert x == pytest.approx(0.5, abs=1e-6)\n"
        "chex.assert_trees_all_close(a, b, **tol)\n"
    )
    assert offenders(src) == [
        "<test>:1: assert_allclose without atol=",
        "<test>:2: allclose without atol=",
        "<test>:3: approx without abs=",
    ]


@pytest.mark.parametrize(
    "path", sorted(TESTS.rglob("*.py")), ids=lambda p: str(p.relative_to(TESTS))
)
def test_every_float_comparison_has_an_absolute_tolerance(path):
    assert offenders(path.read_text(), str(path.relative_to(TESTS))) == []
