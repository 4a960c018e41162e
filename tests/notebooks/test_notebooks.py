"""The notebooks: committed as generated from notebooks/cells/, executed with their outputs, and
runnable top to bottom at the smoke size (their cells assert the numerics they show)."""

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "make_notebooks", REPO / "notebooks" / "make_notebooks.py"
)
make_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_notebooks)
NAMES = make_notebooks.NAMES


def _committed(name):
    return nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)


def _images(nb):
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_the_generated_one_with_outputs(name):
    assert not make_notebooks.stale(name), (
        f"notebooks/{name}.ipynb differs from notebooks/cells/{name}.py: run "
        f"`python notebooks/make_notebooks.py --execute --only={name}`"
    )
    assert _images(_committed(name)), "committed without outputs: run make_notebooks.py --execute"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_smoke_size(name, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAXSAFE_NOTEBOOK_SIZE", "smoke")
    nb = make_notebooks.execute(make_notebooks.build(name), timeout=600)
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    assert _images(nb), "the notebook should display its plots"


@pytest.mark.parametrize("name", NAMES)
def test_readme_links_every_notebook_and_its_gallery_image(name):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert (
        f"colab.research.google.com/github/jaxsafe/jaxsafe/blob/main/notebooks/{name}.ipynb"
        in readme
    )
    assert f"docs/images/gallery_{name}.png" in readme
    assert (REPO / "docs" / "images" / f"gallery_{name}.png").read_bytes()[:4] == b"\x89PNG"
