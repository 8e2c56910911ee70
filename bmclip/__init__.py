"""bmclip: a performance-engineered training system for BiomedCLIP-style models.

Public entry points (imported lazily so that ``import bmclip`` stays light):

- ``bmclip.load_open_clip(path)`` / ``bmclip.export_open_clip(model, folder)``: open_clip interop.
- ``bmclip.create_model(preset_or_config)``: a native BiomedCLIP model.
- ``bmclip.kernels``: Triton fused contrastive loss and flash attention (torch + triton only).
"""

from __future__ import annotations

__version__ = "0.1.0"

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
