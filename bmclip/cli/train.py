"""``bmclip train CONFIG [--key=value ...]``: train from a preset or a YAML config."""

from __future__ import annotations

import argparse
import json
import os
import signal

import yaml

from bmclip.train.config import load_config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (preset name or YAML config, with --key=value overrides)",
        description=(
            "Train a BiomedCLIP-style model. CONFIG is a preset (biomedclip, tiny-cpu) or a YAML file "
            "(optionally with 'preset: NAME' at the top). Override any key with --section.key=value, e.g. "
            "--optim.lr=1e-4 --data.batch_size=256 --steps=1000. Launch with torchrun for several "
            "processes (see docs/training.md)."
        ),
    )
    p.add_argument("config", help="preset name or YAML file")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key=value overrides (nested keys with dots)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    overrides = list(args.overrides)
    print_only = "--print-config" in overrides or args.print_config
    overrides = [o for o in overrides if o != "--print-config"]
    cfg = load_config(args.config, overrides)
    if print_only:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from bmclip.train.trainer import train  # start-up cost: torch and the trainer, not needed for --help

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per job, not one per rank
        print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=1, default=str))
    return exit_code(summary)


def exit_code(summary: dict) -> int:
    """0 for a finished run (or one stopped by SIGUSR1 with on_usr1=stop, or by max_seconds); 128 + the
    signal number for a run stopped by SIGINT / SIGTERM (after its checkpoint), as a shell reports it."""
    name = summary.get("stopped_by_signal")
    if not name or name == "SIGUSR1":
        return 0
    sig = getattr(signal, str(name), None)
    return 128 + int(sig) if sig is not None else 1
