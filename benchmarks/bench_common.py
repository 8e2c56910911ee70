"""Shared by the benchmark scripts: results files written atomically (bmclip's temp-name + fsync + rename)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a plain checkout works without installing bmclip
    sys.path.insert(0, str(REPO))

from bmclip.eval.report import atomic_write_bytes  # noqa: E402


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees a half-written file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data) -> None:
    """``data`` as indented JSON (one trailing newline), written atomically."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
