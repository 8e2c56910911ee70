"""Reading training checkpoint directories: which ones exist, which are complete, which is the newest.

A training run writes ``OUT/checkpoints/step_XXXXXXXX/`` (``bmclip.train.checkpoint`` writes them). A
checkpoint is valid only once its ``meta.json`` exists, has this module's ``FORMAT``, and every file it
lists has the recorded size; anything else (a temp dir of an interrupted save, a truncated file) is
never picked up. These rules are shared by resuming a run and by every command that loads a model.

``meta.json`` also records each file's CRC32 (checkpoints written since it did): :func:`verify_files`
recomputes them when a file is loaded (:func:`verifying` overlaps that with the load), because torch.load reads a
file whose tensor bytes were damaged on disk or in transit without a word (it checks no checksum of its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from bmclip.errors import CheckpointError

__all__ = ["FORMAT", "MODEL_FILE", "file_crc32", "is_valid", "latest_valid", "list_checkpoints", "read_meta",
           "step_dir_name", "check_beside", "verify_files", "verifying"]

FORMAT = "bmclip-checkpoint-v1"
MODEL_FILE = "model.pt"  # the model file inside a checkpoint dir (bmclip.io.model_file layout)
_STEP_RE = re.compile(r"^step_(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_valid(ckpt: str | os.PathLike) -> bool:
    """True when ``ckpt`` has a parseable meta.json and every listed file has the recorded size."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            return False
        return all((ckpt / n).is_file() and (ckpt / n).stat().st_size == s for n, s in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint-named dir under ``root`` (valid or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_valid(root: str | os.PathLike) -> Path | None:
    """Newest valid checkpoint dir under ``root`` (invalid/partial ones are skipped), or None."""
    for _, p in reversed(list_checkpoints(root)):
        if is_valid(p):
            return p
    return None


def read_meta(ckpt: str | os.PathLike) -> dict:
    """meta.json of a valid checkpoint; raises CheckpointError when it is missing or incomplete."""
    ckpt = Path(ckpt)
    if not is_valid(ckpt):
        raise CheckpointError(f"{ckpt}: not a complete bmclip checkpoint (meta.json missing or files truncated)")
    return json.loads((ckpt / "meta.json").read_text())


def file_crc32(path: str | os.PathLike, chunk: int = 16 << 20, start: int = 0) -> int:
    """CRC32 (zlib's) of a file's bytes from offset ``start`` to the end, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(start)
        while b := f.read(chunk):
            crc = zlib.crc32(b, crc)
    return crc


def verify_files(ckpt: str | os.PathLike, names: Iterable[str] | None = None, meta: dict | None = None) -> None:
    """Recompute the CRC32 of ``names`` (default: every file meta.json records one for) and raise CheckpointError
    naming the first file whose bytes are not those written. Files of a checkpoint from before the CRCs were
    recorded, or not listed, are not checked. ``meta``: the checkpoint's meta.json when the caller read it
    already (:func:`read_meta`), else it is read here."""
    ckpt = Path(ckpt)
    recorded = (meta if meta is not None else read_meta(ckpt)).get("crc32") or {}
    for name in (recorded if names is None else names):
        if name not in recorded:
            continue
        got, want = file_crc32(ckpt / name), int(recorded[name])
        if got != want:
            raise CheckpointError(f"{ckpt / name} is damaged: its CRC32 is {got:08x}, not the {want:08x} recorded "
                                  "when it was written (a disk or copy error)")


def verifying(ckpt: str | os.PathLike, names: Iterable[str] | None = None, meta: dict | None = None):
    """:func:`verify_files` run beside the body that loads the same files (see :func:`check_beside`)."""
    names = list(names) if names is not None else None
    return check_beside(lambda: verify_files(ckpt, names, meta))


@contextlib.contextmanager
def check_beside(check: Callable[[], None]) -> Iterator[None]:
    """Run ``check()`` (which raises CheckpointError naming a damaged file) in a background thread while the body
    loads the same bytes, and raise its error when the body ends: the check overlaps the load instead of adding a
    whole read before it (file reads and ``zlib.crc32`` release the GIL). A damaged file's error wins over the
    body's own, which is often a confusing unpickling error on the same damaged bytes (it is chained as the
    cause). The body's result must not be used when this raises. Ctrl-C does not wait for the check (the thread
    is a daemon)."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            check()
        except BaseException as e:  # handed to the caller's thread below
            failed.append(e)

    t = threading.Thread(target=run, name="bmclip-checkpoint-crc", daemon=True)
    t.start()
    try:
        yield
    except Exception as e:
        t.join()
        if failed and isinstance(failed[0], CheckpointError):
            raise failed[0] from e
        raise
    t.join()
    if failed:
        raise failed[0]
