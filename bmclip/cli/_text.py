"""Plain-text help from reStructuredText docstrings (the CLI modules' docstrings double as their --help)."""

from __future__ import annotations

import re

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", re.S)
_LITERAL_BLOCK = re.compile(r"(\S)::$|\s+::$", re.M)


def plain_help(doc: str | None) -> str:
    """``doc`` as plain text: ``literal`` and :role:`x` / :role:`~x` markup dropped (the name kept whole),
    a ``Label::`` literal-block marker turned into ``Label:`` (a lone ``::`` removed); the layout (line
    breaks, indented blocks) is kept."""
    text = (doc or "").strip("\n")
    text = _ROLE.sub(lambda m: m.group(1), text)
    text = _LITERAL.sub(lambda m: m.group(1), text)
    return _LITERAL_BLOCK.sub(lambda m: (m.group(1) + ":") if m.group(1) else "", text)
