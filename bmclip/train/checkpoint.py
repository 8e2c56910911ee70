"""Atomic training checkpoints: write to a temp dir, fsync, write metadata last, rename; keep the last k.

Layout of one checkpoint (a directory ``OUT/checkpoints/step_00001000/``)::

    model.pt        {"model": state_dict (full, unwrapped), "model_config": ModelConfig.to_dict()}
    train_state.pt  {"optimizer", "scheduler", "scaler", "step", "counters", "config"}
    rank_00000.pt   per-rank {"rng": python/numpy/torch/cuda states, "loader": loader.state_dict()}
    vocab.txt ...   the tokenizer (``Tokenizer.save``), so the checkpoint is self-contained
    meta.json       {"format": "bmclip-checkpoint-v1", "step", "world_size", "files": {name: bytes},
                     "crc32": {name: CRC32 of the bytes written}}

``model.pt`` is a native model file (``bmclip.io.model_file``: written by ``save_model_file``, read by
``read_model_file``), all that evaluation needs; every command that takes a model accepts the checkpoint
dir or the run dir (``bmclip.resolve``).

A checkpoint is valid only once ``meta.json`` exists and every file it lists has the recorded size (the
rules in ``bmclip.io.checkpoint_dir``, shared with the commands that load a model); it is
built as ``.step_XXXXXXXX.tmp`` and renamed into place after everything (metadata included) is fsynced,
so a process killed mid-write leaves at most a stale temp dir, which is never picked up and is removed by
the next save. All files contain only tensors and plain containers, so loading never unpickles code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bmclip.errors import BmclipError, CheckpointError, ConfigError
from bmclip.io import Crc32, atomic_torch_save, atomic_write_text, fsync_dir
from bmclip.io.checkpoint_dir import (
    FORMAT,
    MODEL_FILE,
    file_crc32,
    is_valid,
    latest_valid,
    list_checkpoints,
    read_meta,
    step_dir_name,
    verifying,
)
from bmclip.io.model_file import read_model_file, save_model_file
from bmclip.io.model_file import safe_torch_load as safe_load
from bmclip.train.distributed import all_reduce_flag, barrier, full_state_dicts, load_full_state_dicts, unwrap
from bmclip.train.guard import NonFiniteLossError

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
        self._crc: dict[str, Crc32] = {}  # name -> CRC32 of the bytes written (commit reads back only the others)

    def _crc_for(self, name: str) -> Crc32:
        self._crc[name] = crc = Crc32()
        return crc

    def begin(self) -> None:
        """Rank 0: create a fresh temp dir (removing a stale one from an interrupted save)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def write_rank(self, state: dict) -> None:
        """Every rank: its RNG + loader state as ``rank_XXXXX.pt``."""
        name = f"rank_{self.rank:05d}.pt"
        atomic_torch_save(to_safe(state), self.tmp / name, crc=self._crc_for(name))

    def write_main(self, model_state: dict, model_config: dict, train_state: dict, tokenizer=None) -> None:
        """Rank 0: model.pt (eval-loadable), train_state.pt and the tokenizer files."""
        save_model_file(model_state, model_config, self.tmp / MODEL_FILE, crc=self._crc_for(MODEL_FILE))
        atomic_torch_save(to_safe(train_state), self.tmp / "train_state.pt", crc=self._crc_for("train_state.pt"))
        if tokenizer is not None:
            tokenizer.save(self.tmp)

    def commit(self, extra_meta: dict | None = None) -> Path:
        """Rank 0: write meta.json last, fsync, rename into place; returns the final dir."""
        files, crcs = {}, {}
        for p in sorted(self.tmp.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files[p.name] = p.stat().st_size
                # Files this rank wrote got their CRC on the way out; the others (other ranks' rank files, the
                # tokenizer's) are read back once.
                crc = self._crc.get(p.name)
                crcs[p.name] = crc.value if crc is not None else file_crc32(p)
        missing = [f"rank_{r:05d}.pt" for r in range(self.world_size) if f"rank_{r:05d}.pt" not in files]
        if missing or "model.pt" not in files:
            raise CheckpointError(
                f"checkpoint {self.final}: incomplete before commit (missing {missing or 'model.pt'})")
        meta = {"format": FORMAT, "step": self.step, "world_size": self.world_size, "files": files, "crc32": crcs,
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


def _state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what its files take."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def _write_failure(w: CheckpointWriter, e: BaseException, needed: int) -> str:
    """The one line a failed checkpoint write reports (see CheckpointManager._writing)."""
    cause: BaseException | None = e
    seen = set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device" if cause.errno == errno.ENOSPC else "disk quota exceeded"
    else:
        why = f"{type(cause or e).__name__}: {str(cause or e)[:200]}"
    try:
        st = os.statvfs(w.root)
        free = st.f_bavail * st.f_frsize
        space = f"; {free / 1e6:.1f} MB free there, the checkpoint needs about {needed / 1e6:.1f} MB"
    except OSError:
        space = ""
    newest = latest_valid(w.root)
    then = (f"the newest complete checkpoint is {newest.name} (a rerun resumes from it)" if newest is not None
            else "there is no complete checkpoint yet")
    return (f"writing checkpoint {w.final.name} in {w.root} failed: {why}{space}; {then}. Free space there (or "
            "lower keep_last, or move out_dir) and rerun the same command")


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
    rank_file = ckpt / f"rank_{rank:05d}.pt"
    with verifying(ckpt, [MODEL_FILE, "train_state.pt", rank_file.name], meta):
        # (checked against meta.json's CRCs by ``verifying``: not a second time against the zip's)
        model_config, model_state = read_model_file(ckpt / MODEL_FILE, verify=False)
        ts_file = ckpt / "train_state.pt"
        ts = from_safe(safe_load(ts_file, verify=False)) if ts_file.is_file() else None
        rs = from_safe(safe_load(rank_file, verify=False)) if rank_file.is_file() else None
    return {"meta": meta, "model": model_state, "model_config": model_config, "train_state": ts,
            "rank_state": rs}


# ---------------------------------------------------------------------------------------------------
# The training run's checkpoints: save, resume, prune

class CheckpointManager:
    """The checkpoints of one training run in ``OUT/checkpoints``: where to resume, save (collective), prune.

    ``save`` gathers the full model and optimizer state (a collective under FSDP), refuses non-finite weights
    (NonFiniteLossError, before anything is written), writes every rank's RNG + data-loader state and rank 0's
    model / train state / tokenizer through :class:`CheckpointWriter`, commits, and prunes to ``keep_last``.
    ``hooks.fire("checkpoint_staged", step=)`` runs on rank 0 between the last file and the commit.
    ``restore`` puts a loaded checkpoint back into the model, optimizer, scheduler and data source.
    """

    def __init__(self, out_dir: str | os.PathLike, info, *, keep_last: int = 3, every: int = 0,
                 parallel: str = "ddp", train_config: dict | None = None, hooks=None):
        self.out = Path(out_dir)
        self.root = self.out / "checkpoints"
        self.info = info
        self.keep_last, self.every, self.parallel = keep_last, every, parallel
        self.train_config = train_config or {}
        self.hooks = hooks
        self.last_saved = 0  # step of the newest checkpoint of this run (the resume point; 0: none yet)

    # -- resume ------------------------------------------------------------------------------------

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint ``resume`` names: ``auto`` the newest valid one here, ``none`` None, else a checkpoint
        dir or a dir holding checkpoints (CheckpointError when it holds none)."""
        if resume == "none":
            return None
        if resume == "auto":
            return latest_valid(self.root)
        p = Path(resume)
        if is_valid(p):
            return p
        latest = latest_valid(p / "checkpoints") or latest_valid(p)
        if latest is None:
            raise CheckpointError(f"resume: {resume} is not a valid checkpoint (or a dir containing one)")
        return latest

    def set_aside(self, stamp: str) -> Path | None:
        """Rank 0, fresh start: rename an earlier run's checkpoints to ``checkpoints.replaced-<stamp>``.

        Resuming and pruning go by step number, so an old run's higher steps would win over the new run's.
        Returns the new name, or None when there was nothing to move.
        """
        if not list_checkpoints(self.root):
            return None
        aside = self.out / f"checkpoints.replaced-{stamp}"
        os.rename(self.root, aside)
        return aside

    def load(self, ckpt: str | os.PathLike) -> dict:
        """This rank's view of checkpoint ``ckpt`` (see :func:`load_checkpoint`)."""
        return load_checkpoint(ckpt, self.info.rank)

    def load_for_resume(self, first: Path, fall_back: bool, say=print) -> tuple[dict, Path]:
        """Load ``first`` (every rank calls this); with ``fall_back`` (resume=auto) a checkpoint that cannot be
        read on any rank (a damaged file, see :func:`~bmclip.io.checkpoint_dir.verify_files`) is reported, renamed
        aside to ``step_XXXXXXXX.damaged[-N]`` (so neither a later resume nor pruning counts it) and the next older
        one is tried; all ranks agree on each verdict, so they resume from one step. Returns (state, dir).
        Without ``fall_back``, or when no checkpoint is readable, the CheckpointError is raised."""
        older = [p for s, p in reversed(list_checkpoints(self.root)) if is_valid(p) and p != first] if fall_back else []
        damaged: list[Path] = []
        found = None
        for p in [first, *older]:
            try:
                st, err = self.load(p), None
            except CheckpointError as e:
                st, err = None, e
            if not all_reduce_flag(err is not None, self.info):
                found = (st, p)
                break
            if not fall_back:
                raise err or CheckpointError(f"{p}: a file of another rank is damaged")
            aside, n = p.with_name(p.name + ".damaged"), 1
            while aside.exists():  # damaged once before (and written again since)
                n += 1
                aside = p.with_name(f"{p.name}.damaged-{n}")
            damaged.append((p, aside))
            if self.info.is_main:
                say(f"[bmclip] WARNING: cannot resume from {p.name}: {err or 'a file of another rank is damaged'}; "
                    f"it is renamed to {aside.name}, trying the checkpoint before it")
        barrier(self.info)
        if self.info.is_main:
            for p, aside in damaged:
                os.rename(p, aside)
        barrier(self.info)
        if found is None:
            raise CheckpointError(f"no checkpoint in {self.root} can be read (each damaged one was renamed *.damaged); "
                                  "use --resume=none to start afresh")
        return found

    def restore(self, st: dict, where: str | os.PathLike, model, optimizer, scheduler,
                source) -> tuple[int, dict, bool]:
        """Load checkpoint ``st`` (read from ``where``) into the (wrapped) model, optimizer, scheduler and, when
        the world size is unchanged, the RNGs and the data source; every rank calls it.

        Returns (step, counters, whether the RNG and data position were restored). A data-source state that
        does not fit this run's data is a ConfigError naming the checkpoint.
        """
        ts = st["train_state"]
        load_full_state_dicts(model, optimizer, st["model"], ts["optimizer"], self.parallel, self.info)
        scheduler.load_state_dict(ts["scheduler"])
        self.last_saved = step = int(ts["step"])
        same_world = st["rank_state"] is not None and st["meta"]["world_size"] == self.info.world_size
        if same_world:
            set_rng_state(st["rank_state"]["rng"])
            try:
                source.load_state_dict(st["rank_state"]["loader"])
            except (KeyError, ValueError, TypeError, IndexError, BmclipError) as e:
                raise ConfigError(
                    f"resume from {where}: its data-loader position does not fit this run's data "
                    f"({type(e).__name__}: {str(e)[:160]}); use --resume=none or another --out_dir") from None
        return step, dict(ts.get("counters", {})), same_world

    # -- save --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, w: CheckpointWriter, model_sd: dict, optim_sd: dict):
        """A failed write of checkpoint ``w`` (a full disk, a quota, an I/O error) is one CheckpointError that says
        what failed, how much space is left and which checkpoint a rerun resumes from; the partial temp dir goes.

        torch.save reports a full disk as "unexpected pos N vs M" (a RuntimeError whose context is the OSError):
        the OSError in the chain names the cause.
        """
        try:
            yield
        except (OSError, RuntimeError) as e:
            if self.info.is_main:
                shutil.rmtree(w.tmp, ignore_errors=True)
            raise CheckpointError(_write_failure(w, e, _state_bytes(model_sd) + _state_bytes(optim_sd))) from e

    def due(self, step: int, force: bool = False) -> bool:
        """Save after step ``step``? (every ``every`` steps; ``force`` for the last step or a request)."""
        return force or bool(self.every and step % self.every == 0)

    def save(self, step: int, model, optimizer, scheduler, source, *, tokenizer=None,
             counters: dict | None = None) -> Path | None:
        """Write checkpoint ``step`` (every rank calls it); returns its dir on rank 0, None elsewhere."""
        info = self.info
        model_sd, optim_sd = full_state_dicts(model, optimizer, self.parallel, info)
        poisoned = info.is_main and not all(bool(torch.isfinite(v).all()) for v in model_sd.values()
                                            if torch.is_tensor(v) and v.is_floating_point())
        if all_reduce_flag(poisoned, info):
            raise NonFiniteLossError(f"refusing to checkpoint step {step}: the weights contain NaN/Inf")
        w = CheckpointWriter(self.root, step, info.rank, info.world_size)
        with self._writing(w, model_sd, optim_sd):
            if info.is_main:
                w.begin()
        barrier(info)
        with self._writing(w, model_sd, optim_sd):
            w.write_rank({"rng": rng_state(), "loader": source.state_dict()})
        final = None
        if info.is_main:
            with self._writing(w, model_sd, optim_sd):
                w.write_main(model_sd, unwrap(model).config.to_dict(),
                             {"optimizer": optim_sd, "scheduler": scheduler.state_dict(), "scaler": None,
                              "step": step, "counters": dict(counters or {}), "config": self.train_config},
                             tokenizer=tokenizer)
            if self.hooks is not None:
                self.hooks.fire("checkpoint_staged", step=step)
        barrier(info)
        if info.is_main:
            with self._writing(w, model_sd, optim_sd):
                final = w.commit({"train_config": self.train_config})
            prune(self.root, self.keep_last)
        barrier(info)
        self.last_saved = step
        return final
