"""One clear line for a user's mistake, the same for every launcher.

Every launcher ends with ``user_errors.run(main)`` in place of ``absl.app.run(main)``. It defines
the ``--debug`` flag, parses the flags and the config file (with its ``--config.x.y`` overrides)
and runs ``main``; a user error on the way is one line on stderr,

    <prog>: error: <message>

and exit status 2, without a traceback (``--debug`` keeps the traceback). User errors
(``USER_ERRORS``) are what the library raises for bad input: ``ValueError`` (bad config values
and variants, malformed data files, checkpoints that do not fit the model:
``CheckpointError``, ``CheckpointMismatchError``), ``OSError`` (missing files and folders,
unwritable outputs), ``ImportError`` (an optional extra not installed), ``FloatingPointError``
(a non-finite loss: ``jaxsafe.train.NonFiniteError``) and absl's ``UsageError``; while the flags
are parsed, anything the flags library or the config file raises is one. Everything else is a
bug and keeps its traceback. Docs: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from absl import app, flags

USER_ERRORS = (
    ValueError,
    OSError,
    ImportError,
    FloatingPointError,
    app.UsageError,
    # a launcher that runs launchers (pfgmpp_study): the child printed its own line
    subprocess.CalledProcessError,
)
EXIT_STATUS = 2


def message(error: BaseException) -> str:
    """``error``'s message on one line (a ``KeyError``'s without its quotes; the exception's
    type when it has no message)."""
    arg = error.args[0] if len(error.args) == 1 else None
    while isinstance(arg, BaseException):  # ml_collections wraps KeyError in AttributeError
        error, arg = arg, arg.args[0] if len(arg.args) == 1 else None
    text = arg if isinstance(error, KeyError) and isinstance(arg, str) else str(error)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or type(error).__name__


def _fail(prog: str, text: str):
    print(f"{prog}: error: {text}", file=sys.stderr)
    sys.exit(EXIT_STATUS)


@contextlib.contextmanager
def one_line(prog: str, debug: bool):
    """Turns ``USER_ERRORS`` into ``<prog>: error: <message>`` on stderr and exit status 2;
    with ``debug`` the traceback is kept."""
    try:
        yield
    except Exception as e:
        _await_peers()
        if debug or not isinstance(e, USER_ERRORS):
            raise
        _fail(prog, message(e))


def _await_peers() -> None:
    """In a multi-process run, a failed collective (gloo raises a ``ValueError``) is usually a
    dead peer: the watchdog names it and exits (status 75) before this error is judged."""
    distributed = sys.modules.get("jaxsafe.parallel.distributed")
    if distributed is not None:
        distributed.await_peer_verdict()


def _finish() -> None:
    """In a multi-process run, every process waits for the others before exiting (see
    `jaxsafe.parallel.distributed.finish`)."""
    distributed = sys.modules.get("jaxsafe.parallel.distributed")
    if distributed is not None:
        distributed.finish()


def _root(error: BaseException) -> BaseException:
    """The first exception of a chain (``raise ... from`` or raised while handling another)."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or error.__context__
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def flag_message(error: BaseException, argv) -> str:
    """One line for an error raised while parsing ``argv``: the flag and what is wrong."""
    text = str(error)
    root = _root(error)
    if root is not error and "Error whilst parsing config file" in text:
        # ml_collections re-raises the config file's error with its traceback in the message.
        flag = text.split(": Error whilst parsing config file", 1)[0]
        return f"{flag}: {message(root)}"
    name, _, hint = message(error).partition(" ")
    if isinstance(error, AttributeError | KeyError) and name.startswith(("'", '"')):
        # ml_collections: an override --config.x.y naming no field ("'y' Did you mean ...?")
        override = next(
            (
                a
                for a in argv
                if a.startswith("--")
                and "." in a.split("=")[0]
                and name.strip("'\"") in a.split("=")[0].split(".")
            ),
            None,
        )
        where = f"flag {override}: " if override else ""
        return f"{where}the config has no field {name}" + (f". {hint}" if hint else "")
    return message(error)


def _debug_requested(argv) -> bool:
    """Whether ``--debug`` is on the command line (read before the flags parse)."""
    value = False
    for a in argv[1:]:
        if a == "--":
            break
        name, eq, v = a.lstrip("-").partition("=")
        if a.startswith("-") and name in ("debug", "nodebug"):
            value = name == "debug" and (not eq or v.lower() in ("1", "true", "t", "yes"))
    return value


def _config_load_error(flag) -> str | None:
    """The message of a config flag whose file could not be loaded (ml_collections defers
    that error to the first use of the config), or None."""
    if type(flag.value).__name__ != "_ErrorConfig":
        return None
    error = object.__getattribute__(flag.value, "_error")
    from ml_collections import config_flags

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (
        f"flag --{flag.name}={config_flags.get_config_filename(flag)}: cannot load the "
        f"config file ({lines[-1]})"
    )


def parse_flags(prog: str, flag_values: flags.FlagValues = flags.FLAGS):
    """absl's ``flags_parser`` for :func:`run`: a flag, config file or override error is one
    line and exit status 2 (absl's own parser prints "FATAL Flags parsing error", exit 1)."""

    def parse(argv):
        try:
            rest = flag_values(argv)
        except Exception as e:  # noqa: BLE001 (anything here comes from the command line)
            if _debug_requested(argv):
                raise
            _fail(prog, flag_message(e, argv))
        for name in flag_values:
            problem = _config_load_error(flag_values[name])
            if problem and not _debug_requested(argv):
                _fail(prog, problem)
        return rest

    return parse


def prog_name(main) -> str:
    """The launcher's name (``train`` for ``python -m launch.train``)."""
    module = sys.modules.get(main.__module__)
    path = getattr(module, "__file__", None) or sys.argv[0]
    return os.path.splitext(os.path.basename(path))[0]


def run(main, prog: str | None = None, argv: list[str] | None = None) -> None:
    """``absl.app.run(main, argv)`` with one-line user errors (module docstring)."""
    prog = prog or prog_name(main)
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool(
            "debug", False, "Show the traceback of a user error (bad input) instead of one line."
        )

    def main_in_one_line(argv):
        with one_line(prog, flags.FLAGS.debug):
            result = main(argv)
            _finish()
            return result

    app.run(main_in_one_line, argv=argv, flags_parser=parse_flags(prog))
