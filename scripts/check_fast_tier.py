#!/usr/bin/env python
"""Check that the fast test tier still covers every module: run it under coverage and list the modules of
``bmclip/`` and ``kernels/`` that no fast test imports, or imports without running any of their functions.

    .venv/bin/python scripts/check_fast_tier.py [extra pytest args]

The fast tier is ``pytest -m "not slow"`` (what ``bash scripts/test.sh --fast`` runs). A module counts as
exercised when at least one line inside one of its function or method bodies ran, in the pytest process or
in a Python subprocess a test started (the CLI tests run ``python -m bmclip ...``); running only the
module's top level (definitions, constants) is an import, not a use. A package's ``__init__.py`` (its face)
needs only to be imported. The modules in ``EXEMPT`` are named with the reason the fast tier leaves them out.
Prints one row per module (lines run in function bodies / lines in function bodies) and exits 1 when a
module is not exercised, 2 when ``coverage`` (>= 7.10, for subprocess measurement) is not installed:
``pip install coverage``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bmclip", "kernels")
# Modules the fast tier does not exercise, and why (the full suite does, where a test exists).
EXEMPT = {
    "bmclip/assets/make_vocab.py": "a maintainer's script that regenerates the bundled vocabulary; not imported",
    "bmclip/demo.py": "runs only as the whole demo (tests/test_demo.py, slow: ~40 s of CPU)",
}


def function_body_lines(path: Path) -> set[int]:
    """Line numbers of the statements inside function and method bodies (not their def lines)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in node.body:
                for sub in ast.walk(stmt):
                    if isinstance(sub, ast.stmt):
                        lines.add(sub.lineno)
    return lines


def main(argv: list[str]) -> int:
    try:
        import coverage
    except ImportError:
        print("check_fast_tier: coverage is not installed (pip install coverage)", file=sys.stderr)
        return 2
    if tuple(int(x) for x in coverage.__version__.split(".")[:2]) < (7, 10):
        print(f"check_fast_tier: coverage {coverage.__version__} cannot follow subprocesses; need >= 7.10",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bmclip-fast-cov-") as tmp:
        rc_file = Path(tmp) / "coveragerc"
        data_file = Path(tmp) / ".coverage"
        rc_file.write_text(
            "[run]\n"
            f"source =\n    {ROOT / 'bmclip'}\n    {ROOT / 'kernels'}\n"
            "parallel = true\n"
            "patch = subprocess\n"
            f"data_file = {data_file}\n",
            encoding="utf-8",
        )
        cmd = [sys.executable, "-m", "coverage", "run", f"--rcfile={rc_file}", "-m", "pytest", "-m", "not slow",
               "-q", "-p", "no:cacheprovider", *argv]
        print("+", " ".join(cmd), flush=True)
        test_rc = subprocess.call(cmd, cwd=ROOT)
        subprocess.check_call([sys.executable, "-m", "coverage", "combine", f"--rcfile={rc_file}", "-q"], cwd=ROOT)
        data = coverage.CoverageData(basename=str(data_file))
        data.read()
        measured = {str(Path(f).resolve()): set(data.lines(f) or ()) for f in data.measured_files()}

    missing = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            body = function_body_lines(path)
            ran = measured.get(str(path.resolve()))
            face = path.name == "__init__.py"
            if ran is None:
                status = "NOT IMPORTED"
            elif not body or (face and not body & ran):
                status = "imported"
            else:
                status = f"{len(body & ran):5d} / {len(body):5d}"
            print(f"{status:>16}  {rel}" + (f"  (exempt: {EXEMPT[rel]})" if rel in EXEMPT else ""))
            exercised = ran is not None and (not body or face or bool(body & ran))
            if not exercised and rel not in EXEMPT:
                missing.append(rel)
    if test_rc != 0:
        print(f"check_fast_tier: the fast tier itself failed (pytest exit status {test_rc})", file=sys.stderr)
        return test_rc
    missing += [f"{rel} (named in EXEMPT, not found)" for rel in EXEMPT if not (ROOT / rel).is_file()]
    if missing:
        print(f"check_fast_tier: {len(missing)} module(s) not exercised by the fast tier: {', '.join(missing)}",
              file=sys.stderr)
        return 1
    print(f"check_fast_tier: every module of bmclip/ and kernels/ is exercised by the fast tier "
          f"(exempt: {', '.join(EXEMPT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
