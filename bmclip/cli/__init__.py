"""The ``bmclip`` command: thin subcommands over the Python API.

Each subcommand lives in its own module ``bmclip/cli/<name>.py`` exposing
``register(subparsers)``; modules import heavy dependencies (torch, PIL) only inside the
functions that run the command, so ``bmclip --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from bmclip import __version__
from bmclip.errors import BmclipError

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except BmclipError as e:
        print(f"bmclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
