"""Safe checkpoint reading and atomic writing.

Reading never executes code from the file: ``.safetensors`` files go through safetensors, everything
else through ``torch.load(weights_only=True)``, whose restricted unpickler refuses any global outside
torch's tensor allow-list. A refused or corrupt file raises CheckpointError.
Writing goes to a temporary file in the same folder, is fsynced, then renamed over the target, so a
crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bmclip.errors import CheckpointError

__all__ = ["atomic_writer", "load_model", "load_state_dict", "safe_torch_load", "save_model", "save_state_dict"]


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; unsafe pickles and corrupt files raise CheckpointError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only's restricted unpickler refused a global (e.g. os.system): never retry unsafely.
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain weights file (the pickle references code or "
            f"objects outside the safe tensor allow-list: {detail.strip()})"
        ) from None
    except Exception as e:  # corrupt/truncated files fail in many ways inside the unpickler
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def _strip_prefix(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_state_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a state dict {name: Tensor} from a .safetensors or torch file, never executing code.

    A training checkpoint holding ``{"state_dict": {...}}`` yields that inner dict; a ``module.``
    (DDP) or ``_orig_mod.`` (torch.compile) prefix common to every key is removed.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors is a core dependency
            raise CheckpointError(f"{path} is a .safetensors file but safetensors is not installed") from e
        try:
            sd = load_file(str(path), device=str(map_location))
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    else:
        sd = safe_torch_load(path, map_location)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict")
    for prefix in ("module.", "_orig_mod."):
        sd = _strip_prefix(sd, prefix)
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return sd


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_state_dict(sd: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically write a state dict {name: Tensor} (.safetensors by suffix, else torch.save format)."""
    import torch

    path = Path(path)
    sd = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    if _is_safetensors(path):
        from safetensors.torch import save

        # safetensors refuses tensors sharing storage: give each its own contiguous copy.
        data = save({k: v.contiguous().clone() for k, v in sd.items()})
        with atomic_writer(path) as f:
            f.write(data)
    else:
        with atomic_writer(path) as f:
            torch.save(sd, f)


def save_model(model, path: str | os.PathLike) -> None:
    """Atomically write a native bmclip checkpoint: weights + the ModelConfig needed to rebuild them."""
    path = Path(path)
    config = model.config.to_dict()
    if _is_safetensors(path):
        import json

        from safetensors.torch import save

        sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        data = save(sd, metadata={"bmclip_model_config": json.dumps(config)})
        with atomic_writer(path) as f:
            f.write(data)
    else:
        import torch

        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        with atomic_writer(path) as f:
            torch.save({"model_config": config, "state_dict": sd}, f)


def load_model(path: str | os.PathLike, map_location: Any = "cpu"):
    """Rebuild a ``BiomedCLIP`` from a checkpoint written by ``save_model`` (or any checkpoint holding
    ``model_config`` + ``state_dict``); key or shape mismatches raise CheckpointError."""
    import json

    import torch

    from bmclip.model.clip import BiomedCLIP
    from bmclip.model.config import ModelConfig

    path = Path(path)
    if _is_safetensors(path):
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            config = json.loads(meta["bmclip_model_config"])
        except KeyError:
            raise CheckpointError(f"{path} has no bmclip_model_config metadata (not a bmclip model file)") from None
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
        sd = load_state_dict(path, map_location)
    else:
        obj = safe_torch_load(path, map_location)
        if not isinstance(obj, dict) or "model_config" not in obj or "state_dict" not in obj:
            raise CheckpointError(f"{path} is not a bmclip model checkpoint (needs model_config and state_dict)")
        config = obj["model_config"]
        sd = _strip_prefix(_strip_prefix(obj["state_dict"], "module."), "_orig_mod.")
    cfg = ModelConfig.from_dict(config)
    with torch.device("meta"):
        model = BiomedCLIP(cfg)
    expected = model.state_dict()
    for k in expected:
        if k not in sd:
            raise CheckpointError(f"{path}: missing key {k!r}")
    for k, v in sd.items():
        if k not in expected:
            raise CheckpointError(f"{path}: unexpected key {k!r}")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{path}: {k!r} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
