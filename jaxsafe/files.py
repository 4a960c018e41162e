"""Reading the small files a user hands the library (configs, settings, summaries), with errors
that name the file: a launcher prints them as its one line (docs/reliability.md)."""

from __future__ import annotations

import json
import os

__all__ = ["read_json"]


def read_json(path: str | os.PathLike, what: str = "") -> object:
    """The JSON value in ``path``. A missing file raises ``FileNotFoundError``, one that is not
    UTF-8 JSON ``ValueError``, each naming the file (``what`` says what it should be, e.g.
    "the run's config") and, for malformed JSON, the line and column."""
    path = os.fspath(path)
    about = f" ({what})" if what else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}{about} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}{about}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}{about}: not a UTF-8 text file ({e.reason} at byte {e.start})"
        ) from e
