"""Resolve the MODEL argument of the evaluation commands to (model, tokenizer).

MODEL may be:

- an open_clip folder (contains ``open_clip_config.json``, e.g. the released BiomedCLIP) -> loaded with
  ``bmclip.load_open_clip``; the tokenizer comes from the folder's ``vocab.txt``;
- a bmclip checkpoint: a checkpoint directory, a training output directory (newest valid checkpoint), or
  a ``model.pt`` file holding ``{"model": state_dict, "model_config": ModelConfig.to_dict()}`` ->
  ``bmclip.train.checkpoint.load_model_for_eval``; tokenizer from ``vocab.txt`` beside it, else the
  bundled default;
- a preset name (``bmclip.model.list_presets()``) -> a randomly initialised model (tests, smoke runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bmclip.errors import CheckpointError


def _default_tokenizer(model: Any, folder: Path | None = None):
    from bmclip.tokenizer import get_tokenizer

    ctx = int(model.config.text.context_length)
    if folder is not None and (folder / "vocab.txt").is_file():
        return get_tokenizer(folder, context_length=ctx)
    return get_tokenizer(None, context_length=ctx)


def load_model(spec: str | os.PathLike, device: str = "cpu") -> tuple[Any, Any]:
    """MODEL spec -> (model in eval mode on ``device``, tokenizer callable texts -> LongTensor (B, L))."""
    p = Path(spec)
    if p.is_dir() and (p / "open_clip_config.json").is_file():
        import bmclip

        loaded = bmclip.load_open_clip(p)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        return model.to(device).eval(), _default_tokenizer(model, p)
    if p.exists():
        from bmclip.train.checkpoint import load_model_for_eval

        model, tok = load_model_for_eval(p, device=device)
        if tok is None:
            tok = _default_tokenizer(model)
        return model.eval(), tok
    from bmclip.model import create_model, list_presets

    if str(spec) in list_presets():
        model = create_model(str(spec))
        return model.to(device).eval(), _default_tokenizer(model)
    raise CheckpointError(
        f"MODEL {spec!r} is not an open_clip folder, a bmclip checkpoint, or a preset ({', '.join(list_presets())})"
    )
