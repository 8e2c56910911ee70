"""THE resolver of a model argument: every command that takes a model (``train --model.init_checkpoint``,
``eval``, ``embed``, ``convert``, ``finetune``, the demo) goes through ``resolve_model``.

A model argument may be:

- a model file (``.pt`` / ``.safetensors``, ``bmclip.io.model_file``), e.g. a ``bmclip convert`` output;
- a training checkpoint dir (``OUT/checkpoints/step_XXXXXXXX/``): its ``model.pt``, refused when the
  checkpoint is incomplete;
- a run dir (``OUT/``): its newest valid checkpoint (the validity rules of ``bmclip.io.checkpoint_dir``);
- an open_clip folder (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``, e.g. the released
  BiomedCLIP) or its weights file, loaded by ``bmclip.interop.load_open_clip``.

A folder's ``vocab.txt`` (a training checkpoint holds its tokenizer; so may an open_clip folder or the
folder of a model file) is reported as ``tokenizer_dir``. Anything else is a CheckpointError naming the
path and what was expected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bmclip.errors import CheckpointError
from bmclip.interop import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_open_clip
from bmclip.io.checkpoint_dir import MODEL_FILE, is_valid, latest_valid, list_checkpoints, verify_files
from bmclip.model.clip import BiomedCLIP
from bmclip.model.file import load_model

__all__ = ["ModelSource", "ResolvedModel", "load_weights_into", "locate_model", "resolve_model"]

_EXPECTED = (
    "expected a model file (.pt/.safetensors from bmclip train or bmclip convert), a training checkpoint dir "
    "(checkpoints/step_XXXXXXXX/ with model.pt and meta.json), a training run dir (holding checkpoints/step_*) "
    f"or an open_clip folder ({CONFIG_NAME} + {WEIGHTS_NAME})"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model argument points, before anything is loaded."""

    kind: str  # "model file", "checkpoint" or "open_clip"
    path: Path  # the file that is read (model file, model.pt), or the open_clip folder / weights file
    tokenizer_dir: Path | None  # a folder with the vocab.txt shipped with the model, if any
    description: str  # one line for logs and reports, e.g. "checkpoint OUT/checkpoints/step_00000100 (step 100)"


@dataclass(frozen=True)
class ResolvedModel:
    """A loaded model (``BiomedCLIP`` in eval mode, on the CPU unless ``map_location`` said otherwise)."""

    model: BiomedCLIP
    source: ModelSource

    @property
    def description(self) -> str:
        return self.source.description

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.source.tokenizer_dir


def _vocab_dir(folder: Path) -> Path | None:
    return folder if (folder / "vocab.txt").is_file() else None


def _step(ckpt: Path) -> str:
    try:
        return f" (step {json.loads((ckpt / 'meta.json').read_text())['step']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _checkpoint(ckpt: Path, how: str = "checkpoint") -> ModelSource:
    """The model of the checkpoint dir ``ckpt`` (one with a meta.json); refused when it is incomplete."""
    if not (ckpt / MODEL_FILE).is_file():
        raise CheckpointError(f"{ckpt}: checkpoint is incomplete: it has a meta.json but no {MODEL_FILE}")
    if not is_valid(ckpt):
        raise CheckpointError(f"{ckpt}: checkpoint is incomplete (interrupted write): meta.json is missing files "
                              "or lists sizes that differ; use another checkpoint")
    # damaged bytes would load without a word (meta.json passed is_valid just now: read, not checked again)
    verify_files(ckpt, [MODEL_FILE], json.loads((ckpt / "meta.json").read_text()))
    return ModelSource("checkpoint", ckpt / MODEL_FILE, _vocab_dir(ckpt), f"{how} {ckpt}{_step(ckpt)}")


def _is_open_clip_dir(p: Path) -> bool:
    return any((p / n).is_file() for n in (CONFIG_NAME, WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME))


def locate_model(path: str | os.PathLike) -> ModelSource:
    """Which file a model argument means (see the module docstring); CheckpointError when none fits."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model not found: {p} does not exist ({_EXPECTED})")
    if p.is_file():
        folder = p.parent
        if p.name in (WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME):
            return ModelSource("open_clip", p, _vocab_dir(folder), f"open_clip weights {p}")
        if p.name == MODEL_FILE and (folder / "meta.json").exists():
            return _checkpoint(folder)
        return ModelSource("model file", p, _vocab_dir(folder), f"model file {p}")
    if not p.is_dir():
        raise CheckpointError(f"{p} is neither a file nor a folder ({_EXPECTED})")
    if _is_open_clip_dir(p):
        return ModelSource("open_clip", p, _vocab_dir(p), f"open_clip folder {p}")
    if (p / "meta.json").exists():
        return _checkpoint(p)
    if (p / MODEL_FILE).is_file():
        return ModelSource("model file", p / MODEL_FILE, _vocab_dir(p), f"model file {p / MODEL_FILE}")
    for root in (p / "checkpoints", p):
        latest = latest_valid(root)
        if latest is not None:
            return _checkpoint(latest, f"newest valid checkpoint of run {p}:")
    partial = list_checkpoints(p / "checkpoints") + list_checkpoints(p)
    if partial:
        raise CheckpointError(f"{p}: none of its {len(partial)} checkpoint dir(s) is complete (newest "
                              f"{partial[-1][1].name}: meta.json missing or files truncated by an interrupted write)")
    raise CheckpointError(f"{p}: no bmclip model found in this folder ({_EXPECTED})")


def resolve_model(path: str | os.PathLike, map_location: Any = "cpu") -> ResolvedModel:
    """Load the model a model argument means (see ``locate_model``) as a ``BiomedCLIP`` in eval mode."""
    src = locate_model(path)
    if src.kind == "open_clip":
        model = load_open_clip(src.path)
    else:  # a checkpoint dir's model.pt was checked against its meta.json by locate_model
        model = load_model(src.path, map_location, verify=src.kind != "checkpoint")
    return ResolvedModel(model.eval(), src)


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike) -> ModelSource:
    """Copy the weights of the model at ``path`` (any model argument) into ``model``; returns the source.

    Every parameter must match by name and shape (CheckpointError naming the first that does not).
    """
    loaded = resolve_model(path)
    sd, own = loaded.model.state_dict(), model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{loaded.description} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{loaded.description} does not fit the model: {k!r} has shape "
                                  f"{tuple(v.shape)}, the model {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=True)
    return loaded.source
