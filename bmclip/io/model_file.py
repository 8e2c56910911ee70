"""Native bmclip model files: one writer, one reader, and code-free loading of torch/safetensors files.

A model file holds the weights together with the ``ModelConfig`` that rebuilds them:

- ``.pt`` (any suffix but ``.safetensors``): ``{"model": state_dict, "model_config": ModelConfig.to_dict()}``,
  the ``model.pt`` of every training checkpoint and the output of ``bmclip convert``. Files written by
  earlier ``bmclip convert`` versions, ``{"model_config", "state_dict"}``, are read as well.
- ``.safetensors``: the tensors, with the config as JSON under the metadata key ``bmclip_model_config``.

Reading never executes code from the file: ``.safetensors`` goes through safetensors, everything else
through ``torch.load(weights_only=True)``, whose restricted unpickler refuses any global outside torch's
tensor allow-list. Every problem (missing file, refused pickle, corrupt file, wrong layout, missing or
unexpected key, wrong shape) is a CheckpointError naming the file. Writing is atomic (``bmclip.io``).
Rebuilding a model from a file is ``bmclip.model.file`` (this module knows the layout, not the model classes).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save as _st_save

from bmclip.errors import CheckpointError, ConfigError
from bmclip.io.atomic import Crc32, atomic_torch_save, atomic_writer
from bmclip.io.checkpoint_dir import check_beside, file_crc32

__all__ = [
    "CONFIG_KEY",
    "SAFETENSORS_CONFIG_KEY",
    "WEIGHTS_KEY",
    "load_state_dict",
    "read_model_file",
    "safe_torch_load",
    "save_model",
    "save_model_file",
    "save_state_dict",
]

WEIGHTS_KEY = "model"  # the state dict in a .pt model file
CONFIG_KEY = "model_config"  # the ModelConfig dict in a .pt model file
OLD_WEIGHTS_KEY = "state_dict"  # where earlier ``bmclip convert`` versions kept the state dict
SAFETENSORS_CONFIG_KEY = "bmclip_model_config"  # the config (JSON) in a .safetensors file's metadata
SAFETENSORS_CRC_KEY = "bmclip_data_crc32"  # CRC32 (hex) of a .safetensors file's tensor data, in its metadata


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu", *, verify: bool = True) -> Any:
    """``torch.load(path, weights_only=True)``; unsafe pickles and corrupt files raise CheckpointError.

    ``verify``: also check the CRC32 torch.save records for each record of its zip archive, in a thread beside
    the load (torch.load itself checks none, so damaged tensor bytes load as wrong weights without a word). A
    checkpoint dir's files are checked against meta.json instead (``bmclip.io.checkpoint_dir.verifying``), and
    pass False.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK\x03\x04), older torch and pickle.dump a pickle (protocol >= 2 starts
    # with \x80); anything else (an image, a tar, random bytes) would read as an unsafe pickle op to the unpickler
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch file (neither the zip archive torch.save "
                              f"writes nor a pickle; it starts with {head!r})")
    _restore_location(map_location)  # a bad argument is refused here, not reported as a damaged file
    if not (verify and head.startswith(b"PK\x03\x04")):
        return _torch_load(path, map_location)
    return _load_checked(path, lambda: _torch_load(path, map_location), _zip_crc_damage)


def _load_checked(path: Path, load, damage_of) -> Any:
    """``load()``, with ``damage_of(path)`` (what is damaged, or None) checked beside it
    (:func:`bmclip.io.checkpoint_dir.check_beside`): damage is the error, also when the load failed on the damaged
    bytes (it explains that failure better than the loader)."""

    def check() -> None:
        detail = damage_of(path)
        if detail:
            raise CheckpointError(_damaged(path, detail))

    with check_beside(check):
        return load()


def _damaged(path: Path, detail: str) -> str:
    return f"{path} is damaged: {detail} (its bytes are not those written: a disk or copy error; use another copy)"


def _zip_crc_damage(path: Path) -> str | None:
    """Which record of the zip archive ``path`` fails the CRC32 in its header, or None. Records whose header CRC is
    0 (torch.save with its CRC option off) are not checked, and an archive Python's zipfile cannot parse is left
    to torch.load to report."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:
                    continue
                with z.open(info) as f:
                    while f.read(16 << 20):
                        pass
    except zipfile.BadZipFile as e:
        if "CRC" not in str(e):
            return None
        return f"record {str(e).partition('for file ')[2] or '?'} fails the CRC32 torch.save recorded for it"
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError):
        return None
    return None


def _torch_load(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        op = next((ln for ln in first if "Unsupported operand" in ln), None)
        if op is not None:
            # a byte that is no pickle opcode at all: the stream is damaged, not a pickle of something unsafe
            raise CheckpointError(f"cannot read checkpoint {path}: the file is damaged (its pickle holds a byte "
                                  f"that is no pickle operation: {op.strip()})") from None
        # weights_only's restricted unpickler refused a global (e.g. os.system): never retry unsafely.
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain weights file (the pickle references code or "
            f"objects outside the safe tensor allow-list: {detail.strip()})"
        ) from None
    except Exception as e:  # corrupt/truncated files fail in many ways inside the unpickler
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def _strip_prefix(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _clean_state_dict(sd: Any, path: Path) -> dict[str, torch.Tensor]:
    """Check ``sd`` is {str: Tensor}; drop a ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefix."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict")
    for prefix in ("module.", "_orig_mod."):
        sd = _strip_prefix(sd, prefix)
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return sd


def _restore_location(map_location: Any) -> Any:
    """``map_location`` as torch.load reads it, for tensors whose saved location is ``"cpu"`` (safetensors records
    no device: every tensor loads on the CPU first): None (leave them there), a ``torch.device``, or a callable
    ``(storage, "cpu") -> storage | None``. ConfigError for a form torch.load does not take (a bad argument, not a
    bad file)."""
    if map_location is None:
        return None
    if isinstance(map_location, dict):  # {saved location: new location}; a safetensors tensor's is "cpu"
        target = map_location.get("cpu", "cpu")
        if not isinstance(target, str):
            raise ConfigError(f"map_location={map_location!r}: the location {target!r} it maps 'cpu' to is not a "
                              "device name (str)")
        return _restore_location(target)
    if isinstance(map_location, (str, bytes, torch.device)):
        name = map_location.decode() if isinstance(map_location, bytes) else map_location
        try:
            return torch.device(name)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ConfigError(f"map_location={map_location!r} is not a device: {str(e).splitlines()[0]}") from None
    if callable(map_location):
        return map_location
    raise ConfigError(f"map_location={map_location!r}: expected what torch.load takes (a device name, a "
                      f"torch.device, a dict of locations or a callable), not a {type(map_location).__name__}")


def _map_tensors(sd: dict[str, torch.Tensor], map_location: Any) -> dict[str, torch.Tensor]:
    """Apply ``map_location`` (see :func:`_restore_location`) to CPU tensors as torch.load would: a device moves
    every tensor there; a callable is given each tensor's storage with the location ``"cpu"`` and returns the
    storage to use (None: keep it on the CPU)."""
    restore = _restore_location(map_location)
    if restore is None or (isinstance(restore, torch.device) and restore.type == "cpu"):
        return sd
    try:
        if isinstance(restore, torch.device):
            return {k: v.to(restore) for k, v in sd.items()}
        out = {}
        for k, v in sd.items():
            got = restore(v.untyped_storage(), "cpu")
            if got is None:
                out[k] = v
                continue
            if isinstance(got, torch.TypedStorage):
                got = got.untyped()
            if not isinstance(got, torch.UntypedStorage):
                raise ConfigError(f"map_location={map_location!r} returned a {type(got).__name__}, not a storage")
            out[k] = torch.empty(0, dtype=v.dtype, device=got.device).set_(got, v.storage_offset(), v.size(),
                                                                            v.stride())
        return out
    except (RuntimeError, AssertionError) as e:  # e.g. a CUDA device on a machine without one
        raise ConfigError(f"map_location={map_location!r}: cannot put the tensors there: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def _load_safetensors(path: Path, map_location: Any, verify: bool = True) -> dict[str, torch.Tensor]:
    _restore_location(map_location)  # a bad argument is refused before the file is read, and never blames it

    def load() -> dict[str, torch.Tensor]:
        try:
            return _st_load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None

    return _map_tensors(_load_checked(path, load, _safetensors_damage) if verify else load(), map_location)


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(data offset, header dict) of a safetensors file; (0, {}) when the header cannot be read (the loader
    reports that)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 << 20:
                return 0, {}
            header = json.loads(f.read(n))
        return 8 + n, header if isinstance(header, dict) else {}
    except (OSError, ValueError):
        return 0, {}


def _safetensors_damage(path: Path) -> str | None:
    """Whether the tensor data of a safetensors file fails the CRC32 bmclip recorded in its metadata (files written
    by bmclip since it does; safetensors itself records no checksum), or None."""
    start, header = _safetensors_header(path)
    want = (header.get("__metadata__") or {}).get(SAFETENSORS_CRC_KEY) if start else None
    if not isinstance(want, str):
        return None
    try:
        crc = file_crc32(path, start=start)
    except OSError:
        return None
    if f"{crc:08x}" == want:
        return None
    return f"its tensor data has CRC32 {crc:08x}, not the {want} recorded in its metadata when it was written"


def load_state_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict {name: Tensor} from a .safetensors or torch file, never executing code.

    A file holding ``{"state_dict": {...}}`` (a training checkpoint of another tool, or an older bmclip
    model file) or a bmclip model file yields the inner state dict; a ``module.`` (DDP) or ``_orig_mod.``
    (torch.compile) prefix common to every key is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        sd = _load_safetensors(path, map_location)
    else:
        sd = safe_torch_load(path, map_location)
    if isinstance(sd, dict) and isinstance(sd.get(OLD_WEIGHTS_KEY), dict):
        sd = sd[OLD_WEIGHTS_KEY]
    elif isinstance(sd, dict) and isinstance(sd.get(WEIGHTS_KEY), dict) and isinstance(sd.get(CONFIG_KEY), dict):
        sd = sd[WEIGHTS_KEY]
    return _clean_state_dict(sd, path)


def _check_has_data(sd: dict[str, Any], path: Path) -> None:
    """A meta-device tensor has a shape but no values: refuse it before anything is written."""
    meta = next((k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_meta), None)
    if meta is not None:
        raise ConfigError(f"cannot write {path}: {meta!r} is on the meta device (a shape without values): load or "
                          "initialise the weights before saving them")


def _cpu_copy(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def _write_safetensors(sd: dict[str, Any], path: Path, metadata: dict[str, str] | None = None, *,
                       crc: Crc32 | None = None) -> int:
    """Write ``sd`` as safetensors atomically, with the CRC32 of its tensor data in the metadata
    (``SAFETENSORS_CRC_KEY``: the format has no checksum of its own); returns bytes."""
    # safetensors refuses tensors sharing storage: give each its own contiguous copy.
    raw = _st_save({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    header["__metadata__"] = {**(header.get("__metadata__") or {}), SAFETENSORS_CRC_KEY: f"{zlib.crc32(data):08x}"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads its header with spaces to 8 bytes
    with atomic_writer(path, "wb", crc=crc) as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        f.write(data)
    return 8 + len(head) + len(data)


def save_state_dict(sd: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically write a state dict {name: Tensor} (.safetensors by suffix, else torch.save format)."""
    path = Path(path)
    _check_has_data(sd, path)
    if _is_safetensors(path):
        _write_safetensors(sd, path)
    else:
        atomic_torch_save(_cpu_copy(sd), path)


def save_model_file(state_dict: dict[str, Any], model_config: dict[str, Any], path: str | os.PathLike, *,
                    crc: Crc32 | None = None) -> int:
    """THE model-file writer: weights + the ModelConfig dict that rebuilds them, atomically; returns bytes.

    ``.safetensors`` by suffix (config in the metadata), else ``{"model", "model_config"}`` via torch.save.
    ``crc``: a :class:`bmclip.io.Crc32` given the CRC32 of the bytes written.
    """
    path = Path(path)
    if not isinstance(model_config, dict):
        raise TypeError(f"model_config must be a dict (ModelConfig.to_dict()), got {type(model_config).__name__}")
    _check_has_data(state_dict, path)
    if _is_safetensors(path):
        meta = {SAFETENSORS_CONFIG_KEY: json.dumps(model_config)}
        return _write_safetensors(state_dict, path, meta, crc=crc)
    return atomic_torch_save({WEIGHTS_KEY: _cpu_copy(state_dict), CONFIG_KEY: model_config}, path, crc=crc)


def save_model(model: Any, path: str | os.PathLike) -> int:
    """Atomically write ``model`` (a ``BiomedCLIP``) as a native model file (``.pt`` or ``.safetensors``); returns
    bytes."""
    return save_model_file(model.state_dict(), model.config.to_dict(), path)


def read_model_file(path: str | os.PathLike, map_location: Any = "cpu", *,
                    verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """THE model-file reader: ``(model_config dict, state_dict)`` from a file ``save_model_file`` wrote
    (or the older ``{"model_config", "state_dict"}`` layout); anything else raises CheckpointError. ``verify``:
    check the CRC32s torch.save recorded (see safe_torch_load), or for a .safetensors file the one bmclip records in
    its metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
        if SAFETENSORS_CONFIG_KEY not in meta:
            raise CheckpointError(
                f"{path} has no {SAFETENSORS_CONFIG_KEY} metadata: a plain safetensors state dict, not a bmclip "
                "model file (bmclip convert or bmclip train write those)")
        try:
            config = json.loads(meta[SAFETENSORS_CONFIG_KEY])
        except ValueError as e:
            raise CheckpointError(f"{path}: the {SAFETENSORS_CONFIG_KEY} metadata is not JSON ({e})") from None
        return config, _clean_state_dict(_load_safetensors(path, map_location, verify), path)
    obj = safe_torch_load(path, map_location, verify=verify)
    if isinstance(obj, dict) and CONFIG_KEY in obj:
        for key in (WEIGHTS_KEY, OLD_WEIGHTS_KEY):
            if key in obj:
                return obj[CONFIG_KEY], _clean_state_dict(obj[key], path)
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")
        found = f"a dict with keys [{shown}]"
    else:
        found = f"a {type(obj).__name__}"
    raise CheckpointError(
        f"{path} is not a bmclip model checkpoint: expected a model file, a dict with '{WEIGHTS_KEY}' (the state "
        f"dict) and '{CONFIG_KEY}' (written by bmclip train / bmclip convert), found {found}")
