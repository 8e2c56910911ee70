"""The ``bmclip`` command: thin subcommands over the Python API.

Each subcommand lives in its own module ``bmclip/cli/<name>.py`` exposing
``register(subparsers)``; modules import heavy dependencies (torch, PIL) only inside the
functions that run the command, so ``bmclip --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version

from bmclip import __version__
from bmclip.errors import BmclipError, Terminated

# Module names under bmclip.cli, in the order `bmclip --help` lists them.
SUBCOMMAND_MODULES = (
    "demo",
    "train",
    "build_dataset",
    "eval",
    "finetune",
    "embed",
    "tokenizer",
    "convert",
)


def _version() -> str:
    """The installed distribution's version, else the package's own ``__version__`` (a source checkout)."""
    try:
        return version("bmclip")
    except PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bmclip",
        description="bmclip: train, evaluate and build data for BiomedCLIP-style models.",
    )
    parser.add_argument("--version", action="version", version=f"bmclip {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(f"bmclip.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bmclip.cli.{name}":
                continue  # subcommand not part of this build
            raise
        mod.register(sub)
    return parser


_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                                 errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.EBUSY, errno.ENAMETOOLONG,
                                 errno.ELOOP})


def _why(e: OSError) -> str:
    """The one-line reason of an OSError the environment raised."""
    if e.errno == errno.EEXIST and e.filename and os.path.isfile(e.filename):  # mkdir through a file
        return f"{e.filename} is a file, where a folder is needed"
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def _raise_terminated(signum, frame) -> None:
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def _sigterm_unwinds():
    """While a command runs, SIGTERM raises :class:`~bmclip.errors.Terminated` in the main thread.

    Python's default for SIGTERM is to die on the spot: no ``finally`` runs, a process pool's workers are
    orphaned, and the log ends without a word. Raising instead unwinds the command like Ctrl-C does (every
    write is atomic, so nothing half-written is left either way) and lets :func:`main` say what stopped it.
    Only a default handler is replaced (an embedding program's own is left alone), and ``bmclip train``
    installs its own (checkpoint, then stop) over this one while it trains.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_unwinds():
            rc = args.func(args)
    except BmclipError as e:
        print(f"bmclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # what the machine refuses (a full disk, a quota, a read-only or forbidden place, a path that does not
        # exist or runs through a file) is the operator's to fix, not a bug: one line naming it; every write is
        # atomic, so nothing half-written is left behind
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        print(f"bmclip {args.command}: error: {_why(e)} (nothing half-written is left; fix that and rerun the same "
              "command)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # 128 + the signal's number, as a shell reports a process killed by it
        if isinstance(e, Terminated):
            print(f"bmclip {args.command}: stopped by SIGTERM", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"bmclip {args.command}: interrupted (SIGINT)", file=sys.stderr)
        return 128 + signal.SIGINT
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
