"""Resolve the MODEL argument of the evaluation commands to (model, tokenizer).

MODEL may be anything ``bmclip.resolve.resolve_model`` accepts:

- a bmclip model file (``bmclip convert`` output, a checkpoint's ``model.pt``), a training checkpoint
  directory, or a training run directory (its newest valid checkpoint);
- an open_clip folder (contains ``open_clip_config.json``, e.g. the released BiomedCLIP);

the tokenizer comes from the ``vocab.txt`` shipped with the model (in the checkpoint, the open_clip folder
or beside the model file), else the bundled default (said on stderr: bmclip cannot know which tokenizer a bare
model file was trained with; an open_clip folder without one is refused, see :func:`model_tokenizer`). MODEL may
also be a preset name
(``bmclip.model.list_presets()``): a randomly initialised model (tests, smoke runs).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bmclip.errors import CheckpointError, ConfigError
from bmclip.model import create_model, list_presets
from bmclip.resolve import ModelSource, resolve_model
from bmclip.tokenizer import Tokenizer, get_tokenizer


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


def model_tokenizer(model: Any, source: ModelSource | None, vocab: str | os.PathLike | None = None, *,
                    note: Callable[[str], None] = _note):
    """The tokenizer for ``model`` loaded from ``source`` (None: a preset): ``vocab`` (a vocab.txt or a folder with
    one) when given, else the vocab.txt shipped with the model, else the bundled one. An open_clip folder with no
    vocab.txt is refused (its tokenizer is BiomedBERT's or another the folder does not name, never the bundled
    one); the shipped tokenizer is the one ``resolve_model`` read beside the weights (``source.tokenizer``) when it
    did; for a model file or checkpoint without one, ``note`` says that the bundled tokenizer is used, since a
    wrong tokenizer gives plausible-looking but meaningless scores. A tokenizer with more ids than the model's
    embedding table is refused."""
    ctx = int(model.config.text.context_length)
    shipped = getattr(source, "tokenizer", None) if vocab is None else None
    if shipped is not None:
        # read by resolve_model beside the weights (the checkpoint may be gone by now: a pruned run dir checkpoint)
        tok = shipped if shipped.context_length == ctx else Tokenizer(shipped.vocab, ctx, clean=shipped.clean)
        return _check_fits(tok, model)
    if vocab is None and source is not None:
        vocab = source.tokenizer_dir
        if vocab is None:
            folder = source.path if source.path.is_dir() else source.path.parent
            if source.kind == "open_clip":
                raise ConfigError(f"no vocab.txt in {folder}: pass --vocab with the model's tokenizer "
                                  "(e.g. BiomedBERT's vocab.txt)")
            note(f"{source.description} ships no vocab.txt (none beside it in {folder}): using the bundled "
                 "tokenizer; if the model was trained with another, put its vocab.txt there (or pass --vocab)")
    return _check_fits(get_tokenizer(vocab, context_length=ctx), model)


def _check_fits(tok, model):
    if tok.vocab_size > model.config.text.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} ids but the model's text.vocab_size is {model.config.text.vocab_size}")
    return tok


def load_model(spec: str | os.PathLike, device: str = "cpu", seed: int = 0) -> tuple[Any, Any]:
    """MODEL spec -> (model in eval mode on ``device``, tokenizer callable texts -> LongTensor (B, L)).

    A preset name is that architecture's random initialisation drawn from ``seed`` (the same weights every time;
    the global torch random state is left as it was)."""
    if Path(spec).exists():
        resolved = resolve_model(spec)
        model = resolved.model
        return model.to(device).eval(), model_tokenizer(model, resolved.source)
    if str(spec) in list_presets():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(str(spec))
        return model.to(device).eval(), model_tokenizer(model, None)
    raise CheckpointError(
        f"MODEL {spec!r} is not an open_clip folder, a bmclip checkpoint, or a preset ({', '.join(list_presets())})"
    )
