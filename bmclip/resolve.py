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
folder of a model file) is reported as ``tokenizer_dir``; ``resolve_model`` also reads that tokenizer while it
loads the weights (``ModelSource.tokenizer``), so the two come from the same checkpoint even when a running
training prunes it right after. A run dir whose newest checkpoint disappears (pruned) or stops being valid
while it is being read is located again (``RUN_DIR_ATTEMPTS`` times at most). Anything else is a
CheckpointError naming the path and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bmclip.errors import CheckpointError, ConfigError
from bmclip.interop import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_open_clip
from bmclip.io.checkpoint_dir import MODEL_FILE, is_valid, latest_valid, list_checkpoints, verify_files
from bmclip.model.clip import BiomedCLIP
from bmclip.model.file import load_model
from bmclip.tokenizer import CONFIG_NAME as TOKENIZER_CONFIG_NAME
from bmclip.tokenizer import Tokenizer

__all__ = ["ModelSource", "ResolvedModel", "load_weights_into", "locate_model", "model_input_paths", "resolve_model"]

RUN_DIR_ATTEMPTS = 5  # how often resolve_model locates a run dir's newest checkpoint when the chosen one vanishes

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
    # The tokenizer in tokenizer_dir, read by resolve_model together with the weights (at the model's context
    # length); None from locate_model, when there is none, or when it could not be read (using it reports why).
    tokenizer: Tokenizer | None = dataclasses.field(default=None, compare=False, repr=False)


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

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer shipped with the model (read from ``tokenizer_dir`` while the model was loaded), or None."""
        return self.source.tokenizer


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


def _folder_kind(p: Path) -> str:
    """How the folder ``p`` is read: "open_clip", "checkpoint", "model file" (a folder holding ``model.pt``), or
    "run" (a run dir or a run's checkpoints dir: its newest valid checkpoint, which a running training may prune
    at any moment)."""
    if _is_open_clip_dir(p):
        return "open_clip"
    if (p / "meta.json").exists():
        return "checkpoint"
    return "model file" if (p / MODEL_FILE).is_file() else "run"


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and _folder_kind(p) == "run"


def _newest_checkpoint(p: Path) -> Path | None:
    for root in (p / "checkpoints", p):
        latest = latest_valid(root)
        if latest is not None:
            return latest
    return None


def model_input_paths(path: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(folders, files) that reading the model argument ``path`` reads, or that decide what it means, as absolute
    paths (symlinks both as given and resolved), without reading any model: a command that writes (``bmclip
    convert``) must not write into one of the folders nor onto one of the files. The folders are an open_clip
    folder (weights, config, vocab.txt), a checkpoint dir, or a whole run dir (any file written in it could change
    which model it means, and the trainer prunes its checkpoints); for a model file, the file and the tokenizer
    files beside it (its own folder is not part of the model)."""
    p = Path(path)
    folders: list[Path] = []
    files: list[Path] = []
    if p.is_file():
        folder = p.parent
        files.append(p)
        in_checkpoint = p.name == MODEL_FILE and (folder / "meta.json").exists()
        if p.name in (WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME) or in_checkpoint:
            folders.append(folder)  # an open_clip folder / a checkpoint dir
        else:
            files += [folder / "vocab.txt", folder / TOKENIZER_CONFIG_NAME]
    elif p.is_dir() and _folder_kind(p) == "model file":
        files += [p / MODEL_FILE, p / "vocab.txt", p / TOKENIZER_CONFIG_NAME]
    elif p.is_dir():
        folders.append(p)
    else:
        files.append(p)

    def both(paths: list[Path]) -> list[Path]:
        out: list[Path] = []
        for q in paths:
            for v in (Path(os.path.abspath(q)), q.resolve()):
                if v not in out:
                    out.append(v)
        return out

    return both(folders), both(files)


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
    kind = _folder_kind(p)
    if kind == "open_clip":
        return ModelSource("open_clip", p, _vocab_dir(p), f"open_clip folder {p}")
    if kind == "checkpoint":
        return _checkpoint(p)
    if kind == "model file":
        return ModelSource("model file", p / MODEL_FILE, _vocab_dir(p), f"model file {p / MODEL_FILE}")
    latest = _newest_checkpoint(p)
    if latest is not None:
        return _checkpoint(latest, f"newest valid checkpoint of run {p}:")
    partial = list_checkpoints(p / "checkpoints") + list_checkpoints(p)
    if partial:
        raise CheckpointError(f"{p}: none of its {len(partial)} checkpoint dir(s) is complete (newest "
                              f"{partial[-1][1].name}: meta.json missing or files truncated by an interrupted write)")
    raise CheckpointError(f"{p}: no bmclip model found in this folder ({_EXPECTED})")


def _load(src: ModelSource, map_location: Any, chosen: Path | None) -> ResolvedModel:
    """The model of ``src`` with the tokenizer shipped beside it, read right after the weights. ``chosen``: the
    checkpoint a run dir was resolved to; a tokenizer that cannot be read because that checkpoint is going away
    raises (resolve_model then locates again), one that cannot be read otherwise is left to whoever uses it."""
    if src.kind == "open_clip":
        model = load_open_clip(src.path, map_location)
    else:  # a checkpoint dir's model.pt was checked against its meta.json by locate_model
        model = load_model(src.path, map_location, verify=src.kind != "checkpoint")
    tok = None
    if src.tokenizer_dir is not None:
        try:
            tok = Tokenizer.from_vocab(src.tokenizer_dir, context_length=int(model.config.text.context_length))
        except ConfigError:
            if chosen is not None and not is_valid(chosen):
                raise
    return ResolvedModel(model.eval(), dataclasses.replace(src, tokenizer=tok))


def resolve_model(path: str | os.PathLike, map_location: Any = "cpu") -> ResolvedModel:
    """Load the model a model argument means (see ``locate_model``) as a ``BiomedCLIP`` in eval mode, with the
    tokenizer shipped with it (``ResolvedModel.tokenizer``). ``map_location`` as for ``torch.load``, on every route
    (model files of either format, checkpoints, open_clip folders).

    A run dir means its newest valid checkpoint at the time it is read: when the checkpoint chosen disappears or
    stops being valid while it is read (a running training pruning it after committing a newer one), the newest
    is located again and read, ``RUN_DIR_ATTEMPTS`` times at most. An error on a checkpoint that is still there and
    valid (damaged bytes) is raised at once."""
    p = Path(path)
    attempts = RUN_DIR_ATTEMPTS if _is_run_dir(p) else 1
    for attempt in range(attempts):
        chosen = _newest_checkpoint(p) if attempts > 1 else None
        try:
            src = locate_model(p) if chosen is None else _checkpoint(chosen, f"newest valid checkpoint of run {p}:")
            return _load(src, map_location, chosen)
        except (CheckpointError, ConfigError, OSError):
            if chosen is None or attempt == attempts - 1 or is_valid(chosen):
                raise
    raise AssertionError("unreachable")


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
