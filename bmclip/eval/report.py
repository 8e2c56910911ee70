"""Evaluation reports: every number as JSON plus a human-readable markdown table, written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from bmclip.io import atomic_write_text


def _jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays to plain Python; non-finite floats become None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy values converted, NaN/inf written as null)."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_text(text, path)
    return Path(path)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.4f}"
    if v is None:
        return "n/a"
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Render a list of dicts as a GitHub markdown table (floats to 4 decimals, missing cells empty)."""
    if not rows:
        return ""
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) if c in r else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, name: str, result: dict[str, Any], markdown: str) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` (all numbers) and ``<out_dir>/<name>.md`` (tables), both atomically."""
    out = Path(out_dir)
    j = write_json(out / f"{name}.json", result)
    m = out / f"{name}.md"
    atomic_write_text(markdown, m)
    return {"json": j, "markdown": m}
