"""One clear line for a user's mistake: what every launcher's ``main`` wraps its work in."""

import contextlib
import sys

USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


@contextlib.contextmanager
def one_line(prog: str, debug: bool):
    """Turns the library's user-facing errors into ``<prog>: error: <message>`` on stderr and
    exit status 2; with ``debug`` the traceback is kept."""
    try:
        yield
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
