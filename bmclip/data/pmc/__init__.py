"""PMC-15M-style dataset builder: JATS parsing, package readers, image pipeline, dedup, shard writer.

``parse_jats`` is pure Python (stdlib expat + dataclasses) and importable without the C++ extension.
"""

from bmclip.data.pmc.jats import Article, Figure, NotJatsError, parse_jats

__all__ = ["Article", "Figure", "NotJatsError", "parse_jats", "build_dataset", "merge_staging"]


def __getattr__(name: str):
    # The builder pulls in PIL/numpy/multiprocessing; import it only when asked for.
    if name in ("build_dataset", "merge_staging"):
        from bmclip.data.pmc import build

        return getattr(build, name)
    raise AttributeError(f"module 'bmclip.data.pmc' has no attribute {name!r}")
