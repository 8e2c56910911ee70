"""Evaluation reports: every number as JSON plus a human-readable markdown table, written atomically.

A command's outputs are one set: the JSON report is removed first and written last, so a ``<name>.json``
in a folder means every file of that command beside it comes from the same run (``OutputSet``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bmclip.io import atomic_write_text
from bmclip.io.atomic import replace_as_set
from bmclip.io.owner import owner_tag, remove_dead_owners


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
    """Write ``<out_dir>/<name>.json`` (all numbers) and ``<out_dir>/<name>.md`` (tables), both atomically.

    The previous JSON is removed first and the new one written last: a JSON present means the markdown beside
    it is from the same run (an interrupted write leaves no JSON rather than a new one beside an old report).
    """
    out = Path(out_dir)
    j, m = out / f"{name}.json", out / f"{name}.md"
    with contextlib.suppress(FileNotFoundError):
        j.unlink()
    atomic_write_text(markdown, m)
    write_json(j, result)
    return {"json": j, "markdown": m}


class OutputSet:
    """The files one run of a command writes into ``out_dir``, replaced as a set.

    ``with OutputSet(out, "zeroshot", owned=["predictions.csv", "confusion.png"]) as o:`` -- files are made in a
    staging folder inside ``out_dir`` (``o.stage(rel)`` gives the path to write); ``o.commit(result, markdown)``
    then removes the previous run's files of this command (``<name>.json`` first, then ``<name>.md`` and every
    ``owned`` path: only this command's files, nothing else in the folder), moves the new files in, and writes
    the markdown and, last, ``<name>.json``. Leaving the block without a commit (an error, Ctrl-C, SIGTERM)
    removes the staging folder and leaves ``out_dir`` as it was (and removes ``out_dir`` itself if this run
    made it and it is empty). Only a kill in the middle of the commit's renames can leave a partial set, and
    then without ``<name>.json``.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, owned: Sequence[str] = ()):
        self.out = Path(out_dir)
        self.name = name
        self.owned = [f"{name}.json", f"{name}.md", *owned]
        self._stage: Path | None = None
        self._created: list[Path] = []

    def __enter__(self) -> OutputSet:
        missing = [q for q in (self.out, *self.out.parents) if not q.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        self._created = missing  # innermost first: removed again (when empty) if the run fails
        # named after this process: a run killed outright (SIGKILL, power loss) leaves its staging folder, which
        # the next run of this command there removes once that process is gone
        remove_dead_owners(self.out, rf"\.{re.escape(self.name)}\.staging-(?P<host>.+)-(?P<pid>\d+)-[^-]+")
        self._stage = Path(tempfile.mkdtemp(prefix=f".{self.name}.staging-{owner_tag()}-", dir=self.out))
        return self

    def stage(self, rel: str) -> Path:
        """Where to write the new file ``rel`` (relative to ``out_dir``) before the commit."""
        if self._stage is None:
            raise RuntimeError("OutputSet.stage outside its with block")
        q = self._stage / rel
        q.parent.mkdir(parents=True, exist_ok=True)
        return q

    def final(self, rel: str) -> Path:
        """Where the file ``rel`` will be after the commit."""
        return self.out / rel

    def commit(self, result: dict[str, Any], markdown: str) -> dict[str, Path]:
        """Replace the previous outputs with the staged files plus ``<name>.md`` and ``<name>.json`` (last)."""
        if self._stage is None:
            raise RuntimeError("OutputSet.commit outside its with block")
        staged = sorted(str(q.relative_to(self._stage)) for q in self._stage.rglob("*") if q.is_file())
        report = {"markdown": f"{self.name}.md", "json": f"{self.name}.json"}
        atomic_write_text(markdown, self._stage / report["markdown"])
        write_json(self._stage / report["json"], result)
        for rel in staged:
            (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        # the previous JSON goes first and the new one lands last: no JSON while the set is mixed
        replace_as_set([(self._stage / rel, self.out / rel) for rel in [*staged, *report.values()]],
                       marker=self.out / report["json"], remove=[self.out / rel for rel in self.owned])
        self._created = []
        return {**{rel: self.out / rel for rel in staged}, **{k: self.out / rel for k, rel in report.items()}}

    def __exit__(self, *exc) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None
        for q in self._created:  # only folders this run made, and only when nothing else is in them
            try:
                q.rmdir()
            except OSError:
                break
        self._created = []
