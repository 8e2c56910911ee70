"""PMC-15M-style dataset builder: JATS parsing, package readers, image pipeline, dedup, shard writer.

Pure Python (stdlib, PIL, numpy): importable and usable without torch and without the C++ extension
(which, when present, only speeds up JPEG resizing in :mod:`~bmclip.data.pmc.media`).
"""

from __future__ import annotations

from bmclip.data.pmc.build import build_dataset, merge_staging
from bmclip.data.pmc.jats import Article, Figure, NotJatsError, parse_jats

__all__ = ["Article", "Figure", "NotJatsError", "build_dataset", "merge_staging", "parse_jats"]
