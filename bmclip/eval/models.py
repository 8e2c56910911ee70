"""Resolve the MODEL argument of the evaluation commands to (model, tokenizer).

MODEL may be anything ``bmclip.resolve.resolve_model`` accepts:

- a bmclip model file (``bmclip convert`` output, a checkpoint's ``model.pt``), a training checkpoint
  directory, or a training run directory (its newest valid checkpoint);
- an open_clip folder (contains ``open_clip_config.json``, e.g. the released BiomedCLIP);

the tokenizer comes from the ``vocab.txt`` shipped with the model (in the checkpoint, the open_clip folder
or beside the model file), else the bundled default. MODEL may also be a preset name
(``bmclip.model.list_presets()``): a randomly initialised model (tests, smoke runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bmclip.errors import CheckpointError
from bmclip.model import create_model, list_presets
from bmclip.resolve import resolve_model
from bmclip.tokenizer import get_tokenizer


def _default_tokenizer(model: Any, folder: Path | None = None):
    return get_tokenizer(folder, context_length=int(model.config.text.context_length))


def load_model(spec: str | os.PathLike, device: str = "cpu") -> tuple[Any, Any]:
    """MODEL spec -> (model in eval mode on ``device``, tokenizer callable texts -> LongTensor (B, L))."""
    if Path(spec).exists():
        resolved = resolve_model(spec)
        model = resolved.model
        return model.to(device).eval(), _default_tokenizer(model, resolved.tokenizer_dir)
    if str(spec) in list_presets():
        model = create_model(str(spec))
        return model.to(device).eval(), _default_tokenizer(model)
    raise CheckpointError(
        f"MODEL {spec!r} is not an open_clip folder, a bmclip checkpoint, or a preset ({', '.join(list_presets())})"
    )
