"""Atomic training checkpoints: write to a temp dir, fsync, write metadata last, rename; keep the last k.

Layout of one checkpoint (a directory ``OUT/checkpoints/step_00001000/``)::

    model.pt        {"model": state_dict (full, unwrapped), "model_config": ModelConfig.to_dict()}
    train_state.pt  {"optimizer", "scheduler", "scaler", "step", "counters", "config"}
    rank_00000.pt   per-rank {"rng": python/numpy/torch/cuda states, "loader": loader.state_dict()}
    vocab.txt ...   the tokenizer (``Tokenizer.save``), so the checkpoint is self-contained
    meta.json       {"format": "bmclip-checkpoint-v1", "step", "world_size", "files": {name: bytes}}

``model.pt`` is a native model file (``bmclip.io.model_file``: written by ``save_model_file``, read by
``read_model_file``), all that evaluation needs; every command that takes a model accepts the checkpoint
dir or the run dir (``bmclip.io.resolve``).

A checkpoint is valid only once ``meta.json`` exists and every file it lists has the recorded size (the
rules in ``bmclip.io.checkpoint_dir``, shared with the commands that load a model); it is
built as ``.step_XXXXXXXX.tmp`` and renamed into place after everything (metadata included) is fsynced,
so a process killed mid-write leaves at most a stale temp dir, which is never picked up and is removed by
the next save. All files contain only tensors and plain containers, so loading never unpickles code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bmclip.errors import CheckpointError
from bmclip.io import atomic_torch_save, atomic_write_text, fsync_dir
from bmclip.io.checkpoint_dir import (
    FORMAT,
    MODEL_FILE,
    is_valid,
    latest_valid,
    list_checkpoints,
    read_meta,
    step_dir_name,
)
from bmclip.io.model_file import read_model_file, save_model_file
from bmclip.io.model_file import safe_torch_load as safe_load

__all__ = [
    "FORMAT", "CheckpointWriter", "atomic_torch_save", "atomic_write_text", "from_safe", "fsync_dir", "is_valid",
    "latest_valid", "list_checkpoints", "load_checkpoint", "prune", "read_meta", "rng_state", "safe_load",
    "set_rng_state", "step_dir_name", "to_safe",
]


# ---------------------------------------------------------------------------------------------------
# Plain-container conversion (numpy objects -> tensors) so weights_only loading works

def to_safe(obj: Any) -> Any:
    """Recursively convert numpy arrays/scalars to tensors/python scalars (tagged, reversible)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)).clone(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_safe(v) for v in obj)
    if isinstance(obj, list):
        return [to_safe(v) for v in obj]
    return obj


def from_safe(obj: Any) -> Any:
    """Inverse of ``to_safe``."""
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__", "dtype"}:
            return obj["__ndarray__"].numpy().astype(obj["dtype"], copy=True)
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(from_safe(v) for v in obj)
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------
# RNG state

def rng_state() -> dict:
    """Python, numpy, torch CPU and (when present) CUDA generator states, as plain containers."""
    state = {
        "python": random.getstate(),
        "numpy": to_safe(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(from_safe(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# Checkpoint directories

class CheckpointWriter:
    """Writes one checkpoint in phases so every rank can add its own file (see module docstring).

    Usage (all ranks): ``w = CheckpointWriter(root, step, rank, world)``; rank 0 calls ``begin()``,
    barrier; every rank ``write_rank(state)``; rank 0 ``write_main(...)``; barrier; rank 0 ``commit()``.
    """

    def __init__(self, root: str | os.PathLike, step: int, rank: int = 0, world_size: int = 1):
        self.root = Path(root)
        self.step, self.rank, self.world_size = step, rank, world_size
        self.final = self.root / step_dir_name(step)
        self.tmp = self.root / f".{step_dir_name(step)}.tmp"

    def begin(self) -> None:
        """Rank 0: create a fresh temp dir (removing a stale one from an interrupted save)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def write_rank(self, state: dict) -> None:
        """Every rank: its RNG + loader state as ``rank_XXXXX.pt``."""
        atomic_torch_save(to_safe(state), self.tmp / f"rank_{self.rank:05d}.pt")

    def write_main(self, model_state: dict, model_config: dict, train_state: dict, tokenizer=None) -> None:
        """Rank 0: model.pt (eval-loadable), train_state.pt and the tokenizer files."""
        save_model_file(model_state, model_config, self.tmp / MODEL_FILE)
        atomic_torch_save(to_safe(train_state), self.tmp / "train_state.pt")
        if tokenizer is not None:
            tokenizer.save(self.tmp)

    def commit(self, extra_meta: dict | None = None) -> Path:
        """Rank 0: write meta.json last, fsync, rename into place; returns the final dir."""
        files = {}
        for p in sorted(self.tmp.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files[p.name] = p.stat().st_size
        missing = [f"rank_{r:05d}.pt" for r in range(self.world_size) if f"rank_{r:05d}.pt" not in files]
        if missing or "model.pt" not in files:
            raise CheckpointError(
                f"checkpoint {self.final}: incomplete before commit (missing {missing or 'model.pt'})")
        meta = {"format": FORMAT, "step": self.step, "world_size": self.world_size, "files": files,
                **(extra_meta or {})}
        atomic_write_text(json.dumps(meta, indent=1, sort_keys=True), self.tmp / "meta.json")
        fsync_dir(self.tmp)
        if self.final.exists():
            # Same step saved again (e.g. a rerun after a crash): move the old one aside first, because a
            # directory cannot be renamed onto a non-empty one.
            trash = self.root / f".{self.final.name}.old"
            if trash.exists():
                shutil.rmtree(trash)
            os.rename(self.final, trash)
            os.rename(self.tmp, self.final)
            shutil.rmtree(trash)
        else:
            os.rename(self.tmp, self.final)
        fsync_dir(self.root)
        return self.final


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` valid checkpoints (and older invalid ones); returns removed."""
    ckpts = list_checkpoints(root)
    valid = [p for _, p in ckpts if is_valid(p)]
    keep = set(valid[-keep_last:]) if keep_last > 0 else set()
    newest_kept = max((s for s, p in ckpts if p in keep), default=None)
    removed = []
    for s, p in ckpts:
        if p in keep:
            continue
        # Only delete invalid dirs older than the newest kept one: a newer invalid dir may be another
        # process's checkpoint that is being renamed right now (never true for ours: rename is last).
        if p in valid or (newest_kept is not None and s < newest_kept):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def load_checkpoint(ckpt: str | os.PathLike, rank: int = 0) -> dict:
    """Load a valid checkpoint dir: {"meta", "model", "model_config", "train_state", "rank_state" | None}."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    model_config, model_state = read_model_file(ckpt / MODEL_FILE)
    ts = from_safe(safe_load(ckpt / "train_state.pt")) if (ckpt / "train_state.pt").is_file() else None
    rank_file = ckpt / f"rank_{rank:05d}.pt"
    rs = from_safe(safe_load(rank_file)) if rank_file.is_file() else None
    return {"meta": meta, "model": model_state, "model_config": model_config, "train_state": ts,
            "rank_state": rs}
