"""bmclip: a performance-engineered training system for BiomedCLIP-style models.

Public entry points (imported lazily so that ``import bmclip`` stays light):

- ``bmclip.load_open_clip(path)`` / ``bmclip.export_open_clip(model, folder)``: open_clip interop.
- ``bmclip.create_model(preset_or_config)``: a native BiomedCLIP model.
- ``bmclip.kernels``: Triton fused contrastive loss and flash attention (torch + triton only).
"""

from __future__ import annotations

__version__ = "0.1.0"


def _source_tree_kernels() -> None:
    """Make ``bmclip.kernels`` importable from a plain source checkout (PYTHONPATH=repo, no install).

    Installed (also editable) builds map the top-level ``kernels/`` folder to ``bmclip.kernels``
    through setup.py's package_dir; a bare checkout (e.g. a GPU box that cannot pip install) has no
    such mapping, so the repository root is added to this package's search path for that one name.
    """
    import importlib.util
    import os

    if importlib.util.find_spec("bmclip.kernels") is not None:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        __path__.append(root)  # noqa: F821 - module __path__ of this package


_source_tree_kernels()

_LAZY = {
    "load_open_clip": ("bmclip.interop", "load_open_clip"),
    "export_open_clip": ("bmclip.interop", "export_open_clip"),
    "create_model": ("bmclip.model", "create_model"),
    "get_tokenizer": ("bmclip.tokenizer", "get_tokenizer"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'bmclip' has no attribute {name!r}")
