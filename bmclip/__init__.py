"""bmclip: a performance-engineered training system for BiomedCLIP-style models.

Public entry points:

- ``bmclip.load_open_clip(path)`` / ``bmclip.export_open_clip(model, folder)``: open_clip interop.
- ``bmclip.create_model(preset_or_config)``: a native BiomedCLIP model.
- ``bmclip.get_tokenizer(path=None)``: the WordPiece tokenizer (the bundled vocabulary by default).
- ``bmclip.kernels``: Triton fused contrastive loss and flash attention (torch + triton only).

The four functions import their module on first call: ``import bmclip`` stays free of torch, numpy and
tokenizers, because every ``bmclip`` command and the dataset builder's pure-Python workers (which import
``bmclip.data.pmc``, and with it this package) import it.
"""

from __future__ import annotations

import importlib.util
import os

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "export_open_clip", "get_tokenizer", "load_open_clip"]


def _source_tree_kernels() -> None:
    """Make ``bmclip.kernels`` importable from a plain source checkout (PYTHONPATH=repo, no install).

    Installed (also editable) builds map the top-level ``kernels/`` folder to ``bmclip.kernels``
    through setup.py's package_dir; a bare checkout (e.g. a GPU box that cannot pip install) has no
    such mapping, so the repository root is added to this package's search path for that one name.
    """
    if importlib.util.find_spec("bmclip.kernels") is not None:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        __path__.append(root)  # noqa: F821 - module __path__ of this package


_source_tree_kernels()


def load_open_clip(*args, **kwargs):
    """``bmclip.interop.load_open_clip``: open_clip BiomedCLIP weights -> a native model in eval mode."""
    from bmclip.interop import load_open_clip as load  # start-up cost: torch (see the module docstring)

    return load(*args, **kwargs)


def export_open_clip(*args, **kwargs):
    """``bmclip.interop.export_open_clip``: write a native model as an open_clip folder."""
    from bmclip.interop import export_open_clip as export  # start-up cost: torch (see the module docstring)

    return export(*args, **kwargs)


def create_model(*args, **kwargs):
    """``bmclip.model.create_model``: a freshly initialised BiomedCLIP from a preset, config or dict."""
    from bmclip.model import create_model as create  # start-up cost: torch (see the module docstring)

    return create(*args, **kwargs)


def get_tokenizer(*args, **kwargs):
    """``bmclip.tokenizer.get_tokenizer``: a tokenizer from a vocab.txt or folder, else the bundled one."""
    from bmclip.tokenizer import get_tokenizer as get  # start-up cost: numpy and tokenizers (see above)

    return get(*args, **kwargs)
