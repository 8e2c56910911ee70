"""``bmclip demo``: for now the smallest real end-to-end run (same as ``bmclip embed`` with defaults)."""

from __future__ import annotations


def register(subparsers) -> None:
    from bmclip.cli import embed

    p = subparsers.add_parser(
        "demo",
        help="end-to-end demo on built-in data (tiny model, bundled figures and captions)",
        description="Build the seeded tiny model, tokenize and embed the bundled sample captions and "
        "figures, and print their similarities.",
    )
    embed.add_arguments(p)
    p.set_defaults(func=embed.run)
