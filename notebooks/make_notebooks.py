"""Writes the Colab notebooks from their cell sources in ``notebooks/cells/<name>.py``.

    python notebooks/make_notebooks.py                # sources only (outputs dropped)
    python notebooks/make_notebooks.py --execute      # and run them, keeping the outputs
    python notebooks/make_notebooks.py --check        # exit 1 if a committed one is stale

``--execute`` runs every notebook top to bottom at the size ``JAXSAFE_NOTEBOOK_SIZE`` (default
``cpu``: the few-minute demo whose outputs are committed, so they render on the repository page;
``smoke``: seconds, what CI runs), and saves each notebook's last figure as the README's
gallery image ``docs/images/gallery_<name>.png``. ``--only=name,...`` restricts the set.
"""

import argparse
import base64
import importlib
import os
import sys

import nbformat
from nbformat.v4 import new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NAMES = ("grokking", "pfgmpp", "dbpm", "t2i_testbed", "erasure", "attacks", "sid_sfd", "oms")


def build(name: str):
    """The notebook ``name`` from ``notebooks/cells/<name>.py`` (no outputs)."""
    sys.path.insert(0, HERE)
    try:
        cells = importlib.import_module(f"cells.{name}").CELLS
    finally:
        sys.path.remove(HERE)
    return new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "colab": {"provenance": []},
        },
    )


def stale(name: str) -> bool:
    """Whether ``notebooks/<name>.ipynb`` differs from its cells' sources (outputs ignored)."""
    committed = nbformat.read(os.path.join(HERE, f"{name}.ipynb"), as_version=4)
    sources = lambda nb: [(c.cell_type, c.source) for c in nb.cells]
    return sources(committed) != sources(build(name))


def execute(nb, timeout: int = 1800):
    import nbclient

    nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": REPO}}
    ).execute()
    return nb


def save_gallery(nb, name: str) -> str | None:
    """Writes the notebook's last PNG output to docs/images/gallery_<name>.png."""
    pngs = [
        o["data"]["image/png"]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    if not pngs:
        return None
    path = os.path.join(REPO, "docs", "images", f"gallery_{name}.png")
    with open(path, "wb") as f:
        f.write(base64.b64decode(pngs[-1]))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true")
    parser.add_argument("--only", default=",".join(NAMES))
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    names = args.only.split(",")
    for name in names:
        if name not in NAMES:
            parser.error(f"--only: unknown notebook {name!r}; known: {', '.join(NAMES)}")
    if args.check:
        bad = [name for name in names if stale(name)]
        for name in bad:
            print(
                f"notebooks/{name}.ipynb differs from notebooks/cells/{name}.py: run "
                f"`python notebooks/make_notebooks.py --execute --only={name}`",
                file=sys.stderr,
            )
        sys.exit(1 if bad else 0)
    for name in names:
        nb = build(name)
        if args.execute:
            execute(nb)
            save_gallery(nb, name)
        path = os.path.join(HERE, f"{name}.ipynb")
        nbformat.write(nb, path + ".tmp")
        os.replace(path + ".tmp", path)
        print("wrote", path)


if __name__ == "__main__":
    main()
