"""Local dataset readers for evaluation (never download): ImageFolder trees, CSV/TSV, PCam HDF5, DICOM,
and webdataset shards (a plain tarfile + PIL reader for evaluation; training uses ``bmclip.data.ShardLoader``).

A classification dataset yields ``(PIL RGB image, int label)`` and has ``classes``. A dataset SPEC is
resolved by ``open_dataset``: a folder (ImageFolder; a flat folder of images/DICOM files or a single
image file gives an unlabelled set, label -1, for predictions only), a ``.csv``/``.tsv`` file, a PCam HDF5 folder or
``..._split_<split>`` prefix, a DICOM file/folder, a shard pattern (``*.tar``, ``{000..009}``), or a
built-in task name (``pcam``, ``lc25000_lung``, ``lc25000_colon``, ``tcga_til``, ``rsna_pneumonia``)
with ``data_root``. Unreadable images are counted skips with a reason (``dataset.skipped``), never
silent losses.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bmclip.errors import ConfigError, DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
DICOM_EXTS = (".dcm", ".dicom")

# ---------------------------------------------------------------- image decoding


def load_image(path: str | os.PathLike, frame: str = "middle"):
    """Read an image file (PIL formats or DICOM) as an RGB PIL image; raises DataError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if p.suffix.lower() in DICOM_EXTS or _looks_like_dicom(p):
        return dicom_to_pil(p, frame=frame)
    try:
        with Image.open(p) as im:
            im.load()
            return _pil_to_rgb(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {p}: {e}") from e


def _looks_like_dicom(p: Path) -> bool:
    if p.suffix:
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _pil_to_rgb(im):
    """PIL image of any mode -> RGB; 16-bit/float greyscale is min/max scaled to 8 bits (PIL would clip)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(_minmax_to_uint8(arr)).convert("RGB")
    return im.convert("RGB")


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.round((arr - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def window_to_uint8(arr: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT or SIGMOID) mapped to 0..255 uint8."""
    x = np.asarray(arr, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise DataError(f"DICOM window width must be > 0, got {width}")
        return np.clip(np.round(255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))), 0, 255).astype(np.uint8)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise DataError(f"DICOM window width must be > 0, got {width}")
        return np.clip(np.round(((x - center) / width + 0.5) * 255.0), 0, 255).astype(np.uint8)
    if function != "LINEAR":
        raise DataError(f"unknown DICOM VOILUTFunction {function!r}")
    if width < 1:
        raise DataError(f"DICOM window width must be >= 1, got {width}")
    if width == 1:
        return np.where(x < center - 0.5, 0, 255).astype(np.uint8)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    lo = x <= center - 0.5 - (width - 1) / 2
    hi = x > center - 0.5 + (width - 1) / 2
    y = np.where(lo, 0.0, np.where(hi, 255.0, y))
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def _first(v: Any) -> float:
    """First value of a possibly multi-valued DICOM element."""
    try:
        return float(v[0])
    except TypeError:
        return float(v)


def dicom_to_pil(path: str | os.PathLike, frame: str = "middle"):
    """DICOM -> RGB PIL image.

    Greyscale: modality LUT (rescale slope/intercept), then the file's first VOI window (WindowCenter/
    WindowWidth, with its VOILUTFunction; a VOI LUT Sequence is not applied) if present, else min/max,
    to 8 bits; MONOCHROME1 is inverted so that higher values are
    brighter like MONOCHROME2. Colour (RGB/YBR, converted to RGB by pydicom) is kept; PALETTE COLOR
    goes through its lookup table. Multi-frame: ``frame="middle"`` (default; the central slice of a
    series/cine is usually the most representative) or ``"first"``.
    """
    import pydicom
    from PIL import Image

    p = Path(path)
    if frame not in ("middle", "first"):
        raise ConfigError(f"frame must be 'middle' or 'first', got {frame!r}")
    try:
        ds = pydicom.dcmread(p)
    except Exception as e:  # pydicom raises several unrelated types for corrupt files
        raise DataError(f"cannot read DICOM {p}: {e}") from e
    if "PixelData" not in ds:
        raise DataError(f"DICOM {p} has no pixel data (e.g. a waveform or structured report)")
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing codec (JPEG 2000 without pylibjpeg/openjpeg), corrupt stream
        raise DataError(f"cannot decode DICOM pixels of {p} ({ds.file_meta.TransferSyntaxUID.name}): {e}") from e
    nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if nframes > 1:
        arr = arr[nframes // 2 if frame == "middle" else 0]
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        if rgb.dtype != np.uint8:  # LUT entries are 16-bit
            rgb = (rgb.astype(np.float64) / 257.0).round().astype(np.uint8)
        return Image.fromarray(rgb, "RGB")
    if spp == 3:
        if arr.dtype != np.uint8:
            arr = _minmax_to_uint8(arr)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    from pydicom.pixels import apply_rescale

    x = apply_rescale(arr, ds) if "RescaleSlope" in ds or "RescaleIntercept" in ds else arr
    x = np.asarray(x, dtype=np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        g = window_to_uint8(x, _first(ds.WindowCenter), _first(ds.WindowWidth),
                            str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR"))
    else:
        g = _minmax_to_uint8(x)
    if photometric == "MONOCHROME1":
        g = 255 - g
    return Image.fromarray(g, "L").convert("RGB")


# ---------------------------------------------------------------- classification datasets


class ImageDataset:
    """A classification dataset: ``ds[i] -> (PIL RGB image, int label)``, ``len(ds)``, ``ds.classes``."""

    classes: list[str]
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        """All labels (N,) int64 without decoding images."""
        raise NotImplementedError  # pragma: no cover

    def name_of(self, i: int) -> str:
        """A human-readable id of sample ``i`` (its path, or index)."""
        return str(i)

    def describe(self) -> dict[str, Any]:
        """Summary: kind, size, classes, per-class counts."""
        lab = self.labels()
        return {
            "kind": type(self).__name__,
            "n": len(self),
            "classes": list(self.classes),
            "counts": {c: int((lab == i).sum()) for i, c in enumerate(self.classes)},
        }


def _label_mapper(task: Any, found: Sequence[str]) -> tuple[list[str], Callable[[str], int]]:
    """(class list, name -> index) for found label names, through a task's class list/aliases if given."""
    if task is None:
        classes = sorted(found, key=_natural_key)
        return classes, classes.index
    return list(task.classes), task.class_index


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


class FileListDataset(ImageDataset):
    """Images given as (path, label index) pairs."""

    def __init__(self, items: list[tuple[Path, int]], classes: list[str], frame: str = "middle",
                 labelled: bool = True):
        if not items:
            raise DataError("dataset is empty")
        self.items = items
        self.classes = classes
        self.frame = frame
        self.labelled = labelled
        self.skipped = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return load_image(path, frame=self.frame), label

    def labels(self) -> np.ndarray:
        return np.array([lab for _, lab in self.items], dtype=np.int64)

    def name_of(self, i: int) -> str:
        return str(self.items[i][0])


def _is_image_file(p: Path) -> bool:
    s = p.suffix.lower()
    return s in IMAGE_EXTS or s in DICOM_EXTS or (s == "" and _looks_like_dicom(p))


def unlabelled_images(path: str | os.PathLike) -> FileListDataset:
    """Images (any PIL format or DICOM) directly in a folder, or one image file, without labels (label -1)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.iterdir() if q.is_file() and _is_image_file(q))
    if not files:
        raise DataError(f"{p}: no image or DICOM files")
    return FileListDataset([(q, -1) for q in files], [], labelled=False)


def image_folder(root: str | os.PathLike, task: Any = None) -> FileListDataset:
    """ImageFolder tree: ``root/<class>/**/<image>`` (class = sub-folder name, sorted naturally)."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r} is not a folder")
    subdirs = sorted([d for d in r.iterdir() if d.is_dir() and not d.name.startswith(".")], key=lambda d: d.name)
    if not subdirs:
        raise DataError(f"{r}: no class sub-folders (expected root/<class>/<image files>)")
    classes, to_index = _label_mapper(task, [d.name for d in subdirs])
    items = []
    for d in subdirs:
        idx = to_index(d.name)
        files = sorted(p for p in d.rglob("*") if p.is_file() and _is_image_file(p))
        items.extend((p, idx) for p in files)
    if not items:
        raise DataError(f"{r}: no image files under the class folders")
    return FileListDataset(items, classes)


_PATH_COLS = ("path", "image", "filename", "file", "img", "image_path")
_LABEL_COLS = ("label", "class", "target", "y", "category")


def csv_dataset(path: str | os.PathLike, task: Any = None, image_root: str | os.PathLike | None = None):
    """CSV/TSV with a header naming a path column (path/image/filename/...) and a label column (label/class/...).

    Without a recognised header the first two columns are (path, label). Relative paths are relative to
    ``image_root`` or the file's folder. Labels may be names or integer indices.
    """
    p = Path(path)
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f, delimiter=delim) if r and any(c.strip() for c in r)]
    except OSError as e:
        raise DataError(f"cannot read {p}: {e}") from e
    if not rows:
        raise DataError(f"{p} is empty")
    head = [h.strip().lower() for h in rows[0]]
    pi = next((head.index(c) for c in _PATH_COLS if c in head), None)
    li = next((head.index(c) for c in _LABEL_COLS if c in head), None)
    base = Path(image_root) if image_root else p.parent
    if pi is not None and li is not None:
        body = rows[1:]
    elif pi is None and li is None and len(rows[0]) >= 2 and (base / rows[0][0].strip()).is_file():
        pi, li, body = 0, 1, rows  # headerless: the first row already names an existing image
    else:
        raise DataError(f"{p}: header must name a path column {_PATH_COLS} and a label column {_LABEL_COLS}")
    raw = []
    for n, r in enumerate(body, start=2 if body is not rows else 1):
        if len(r) <= max(pi, li):
            raise DataError(f"{p}:{n}: expected at least {max(pi, li) + 1} columns, got {len(r)}")
        raw.append((base / r[pi].strip(), r[li].strip()))
    if not raw:
        raise DataError(f"{p}: no rows")
    names = sorted({lab for _, lab in raw}, key=_natural_key)
    if task is None and all(n.lstrip("-").isdigit() for n in names):
        ints = sorted(int(n) for n in names)
        if ints[0] < 0:
            raise DataError(f"{p}: negative label {ints[0]}")
        classes = [str(i) for i in range(ints[-1] + 1)]
        items = [(q, int(lab)) for q, lab in raw]
    else:
        classes, to_index = _label_mapper(task, names)
        items = [(q, to_index(lab)) for q, lab in raw]
    return FileListDataset(items, classes)


class PCamDataset(ImageDataset):
    """PatchCamelyon HDF5: ``<prefix>_x.h5`` (dataset "x": (N, 96, 96, 3) uint8) and ``<prefix>_y.h5``
    ("y": (N, 1, 1, 1) label), prefix = ``.../camelyonpatch_level_2_split_<train|valid|test>``."""

    def __init__(self, prefix: str | os.PathLike, task: Any = None):
        import h5py

        prefix = str(prefix)
        self.x_path, self.y_path = Path(prefix + "_x.h5"), Path(prefix + "_y.h5")
        for q in (self.x_path, self.y_path):
            if not q.exists():
                gz = Path(str(q) + ".gz")
                hint = f" (found {gz.name}: decompress it with gunzip first)" if gz.exists() else ""
                raise DataError(f"PCam file {q} not found{hint}")
        try:
            with h5py.File(self.y_path, "r") as fy:
                y = np.asarray(fy["y"]).reshape(-1)
            with h5py.File(self.x_path, "r") as fx:
                shape = fx["x"].shape
                dtype = fx["x"].dtype
        except (OSError, KeyError) as e:
            raise DataError(f"cannot read PCam HDF5 {prefix}_{{x,y}}.h5: {e}") from e
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise DataError(f"{self.x_path}: dataset 'x' must be (N, H, W, 3) uint8, got {shape} {dtype}")
        if shape[0] != len(y):
            raise DataError(f"PCam: {shape[0]} images in {self.x_path.name} but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() > 1):
            raise DataError("PCam labels must be 0 or 1")
        self._y = y.astype(np.int64)
        self.classes = list(task.classes) if task is not None else ["0", "1"]
        self.skipped = []
        self._fx = None

    def __len__(self) -> int:
        return len(self._y)

    def _x(self):
        import h5py

        if self._fx is None:  # opened lazily, per process, so the dataset can be pickled to workers
            self._fx = h5py.File(self.x_path, "r")
        return self._fx["x"]

    def __getitem__(self, i: int):
        from PIL import Image

        return Image.fromarray(np.asarray(self._x()[i])), int(self._y[i])

    def read_block(self, start: int, stop: int) -> np.ndarray:
        """uint8 (n, 96, 96, 3) contiguous block (one HDF5 read, much faster than per-item access)."""
        return np.asarray(self._x()[start:stop])

    def labels(self) -> np.ndarray:
        return self._y.copy()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fx"] = None
        return d


def pcam_prefix(spec: str | os.PathLike, split: str) -> str:
    """Resolve a PCam folder (+ split) or an explicit ``..._split_<split>`` prefix to the file prefix."""
    s = str(spec)
    if s.endswith("_x.h5") or s.endswith("_y.h5"):
        return s[:-5]
    if Path(s).is_dir():
        return str(Path(s) / f"camelyonpatch_level_2_split_{split}")
    return s


def rsna_dataset(root: str | os.PathLike, task: Any = None) -> FileListDataset:
    """RSNA Pneumonia Detection Challenge layout: ``stage_2_train_labels.csv`` (patientId, ..., Target) and
    ``stage_2_train_images/<patientId>.dcm``; a patient is positive if any of its rows has Target 1."""
    r = Path(root)
    labels_csv = next((r / n for n in ("stage_2_train_labels.csv", "stage_1_train_labels.csv") if (r / n).exists()),
                      None)
    img_dir = next((r / n for n in ("stage_2_train_images", "stage_1_train_images") if (r / n).is_dir()), None)
    if labels_csv is None or img_dir is None:
        raise DataError(f"{r}: expected stage_2_train_labels.csv and stage_2_train_images/ (RSNA layout)")
    target: dict[str, int] = {}
    with open(labels_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                pid, t = row["patientId"], int(row["Target"])
            except (KeyError, ValueError) as e:
                raise DataError(f"{labels_csv}: bad row {row}: {e}") from e
            target[pid] = max(target.get(pid, 0), t)
    items = []
    missing = []
    for pid, t in sorted(target.items()):
        q = img_dir / f"{pid}.dcm"
        if q.exists():
            items.append((q, t))
        else:
            missing.append((str(q), "listed in labels but file missing"))
    classes = list(task.classes) if task is not None else ["normal", "pneumonia"]
    ds = FileListDataset(items, classes)
    ds.skipped = missing
    return ds


def _find_dir(root: Path, names: Sequence[str], must_contain: Sequence[str]) -> Path:
    for cand in [root, *[root / n for n in names]]:
        if all((cand / m).is_dir() for m in must_contain):
            return cand
    raise DataError(f"{root}: no folder containing {list(must_contain)} (looked in {[root, *names]})")


def open_dataset(spec: str, data_root: str | os.PathLike | None = None, split: str = "test", task: Any = None):
    """Resolve a dataset SPEC (path or built-in task name) to a classification dataset (see module docs)."""
    from bmclip.eval.prompts import BUILTIN_TASKS

    if spec in BUILTIN_TASKS:
        if data_root is None:
            raise ConfigError(f"built-in dataset {spec!r} needs --data-root pointing at your local copy")
        task = task or BUILTIN_TASKS[spec]
        root = Path(data_root)
        if not root.exists():
            raise DataError(f"data root {root} does not exist")
        if spec == "pcam":
            return PCamDataset(pcam_prefix(root, split), task)
        if spec == "lc25000_lung":
            d = _find_dir(root, ["lung_image_sets", "lung_colon_image_set/lung_image_sets"], ["lung_aca", "lung_n"])
            return image_folder(d, task)
        if spec == "lc25000_colon":
            d = _find_dir(root, ["colon_image_sets", "lung_colon_image_set/colon_image_sets"], ["colon_aca", "colon_n"])
            return image_folder(d, task)
        if spec == "rsna_pneumonia" and ((root / "stage_2_train_labels.csv").exists()
                                         or (root / "stage_1_train_labels.csv").exists()):
            return rsna_dataset(root, task)
        spec = str(root)  # tcga_til / rsna as ImageFolder or CSV with the task's label aliases
    p = Path(spec)
    if data_root is not None and not p.is_absolute() and not p.exists():
        p = Path(data_root) / spec
    s = str(p)
    if s.endswith(".tar") or "{" in s or any(ch in s for ch in "*?["):
        return ShardClassificationDataset(s, task)
    if p.suffix.lower() in (".csv", ".tsv"):
        return csv_dataset(p, task)
    if s.endswith("_x.h5") or s.endswith("_y.h5") or Path(s + "_x.h5").exists():
        return PCamDataset(pcam_prefix(s, split), task)
    if p.is_dir():
        if Path(pcam_prefix(p, split) + "_x.h5").exists():
            return PCamDataset(pcam_prefix(p, split), task)
        if not any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir()):
            return unlabelled_images(p)  # a flat folder of images / DICOM files: predictions only
        return image_folder(p, task)
    if p.is_file() and _is_image_file(p):
        return unlabelled_images(p)
    raise DataError(f"dataset {spec!r} not found (not a path, and not one of {sorted(BUILTIN_TASKS)})")


# ---------------------------------------------------------------- webdataset shards


def expand_shards(pattern: str) -> list[str]:
    """Expand brace ranges (``{000000..000009}``, zero padding kept) and globs into an ordered shard list."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        a, b = m.group(1), m.group(2)
        width = len(a) if a.startswith("0") else 0
        out = []
        for i in range(int(a), int(b) + 1):
            out.extend(expand_shards(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]))
        return out
    if any(ch in pattern for ch in "*?["):
        hits = sorted(glob.glob(pattern))
        if not hits:
            raise DataError(f"no shards match {pattern!r}")
        return hits
    if not Path(pattern).exists():
        raise DataError(f"shard {pattern} not found")
    return [pattern]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first '.' of the basename, extension = the rest."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _open_shard(url: str) -> tarfile.TarFile:
    try:
        if os.path.getsize(url) == 0:
            raise DataError(f"cannot open shard {url}: empty tar file (0 bytes)")
        return tarfile.open(url, "r:*")
    except tarfile.ReadError as e:
        raise DataError(f"cannot open shard {url}: bad tar header, not a tar file ({e})") from e
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"cannot open shard {url}: {e}") from e


def _samples_after(url: str, offset: int) -> int:
    """Samples whose member headers still appear in ``url`` from ``offset`` on (512-byte aligned blocks
    that parse as tar headers with a valid checksum); they are lost when reading stops at damage."""
    n, last = 0, None
    try:
        with open(url, "rb") as f:
            pos = offset - offset % tarfile.BLOCKSIZE
            while True:
                f.seek(pos)
                block = f.read(tarfile.BLOCKSIZE)
                if len(block) < tarfile.BLOCKSIZE:
                    return n
                try:
                    ti = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
                except tarfile.HeaderError:
                    pos += tarfile.BLOCKSIZE
                    continue
                if ti.isfile():
                    key, ext = _split_key(ti.name)
                    if ext and key != last:
                        n, last = n + 1, key
                    pos += tarfile.BLOCKSIZE + -(-ti.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                else:
                    pos += tarfile.BLOCKSIZE
    except OSError:
        return n


def iter_shard_samples(urls: Sequence[str], skipped: list | None = None) -> Iterator[dict[str, Any]]:
    """Yield {"key", "__shard__", <ext>: bytes...} per sample from tar shards (members grouped by key, in order).

    With ``skipped`` (a list), tar damage is recorded there as (url, reason) instead of raised: the
    sample open at the damage, and the samples whose headers still appear after it ("lost tail").
    """
    for url in urls:
        tf = _open_shard(url)
        with tf:
            cur: dict[str, Any] | None = None
            broken = False
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    if cur is not None and cur["key"] != key:
                        yield cur
                        cur = None
                    if cur is None:
                        cur = {"key": key, "__shard__": url}
                    f = tf.extractfile(m)
                    cur[ext] = f.read() if f is not None else b""
            except (OSError, tarfile.TarError, EOFError) as e:
                if skipped is None:
                    raise DataError(f"corrupt shard {url}: {e}") from e
                skipped.append((url, f"truncated/corrupt tar after {cur['key'] if cur else 'start'}: {e}"))
                cur, broken = None, True
            if cur is not None:
                yield cur
            if not broken and not _ended_cleanly(tf):
                msg = f"shard {url} ends without the tar end-of-archive marker (truncated?) after {tf.offset} bytes"
                if skipped is None:
                    raise DataError(msg)
                skipped.append((url, "truncated: " + msg))
                broken = True
            if broken and skipped is not None:
                lost = _samples_after(url, tf.offset + tarfile.BLOCKSIZE)
                if lost:
                    skipped.append((url, f"tar_lost_tail: {lost} sample(s) after the damage at byte {tf.offset} "
                                         "not read"))


def _ended_cleanly(tf: tarfile.TarFile) -> bool:
    """True if the archive's last header position holds a zero block (Python's tarfile stops silently at
    a truncated header, so this is how a cut-off shard is told from a complete one)."""
    try:
        tf.fileobj.seek(tf.offset)
        block = tf.fileobj.read(tarfile.BLOCKSIZE)
    except (OSError, EOFError, tarfile.TarError):
        return False
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


_IMG_KEYS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")


def decode_sample_image(sample: dict[str, Any]):
    """The RGB PIL image of a shard sample (first of jpg/jpeg/png/webp/tif/bmp); DataError if none/corrupt."""
    from PIL import Image, UnidentifiedImageError

    ext = next((k for k in _IMG_KEYS if k in sample), None)
    if ext is None:
        raise DataError(f"sample {sample.get('key')} has no image member")
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            im.load()
            return _pil_to_rgb(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"sample {sample.get('key')}: corrupt {ext}: {e}") from e


def sample_text(sample: dict[str, Any]) -> str:
    """The caption of a shard sample (``txt`` member, UTF-8)."""
    if "txt" not in sample:
        raise DataError(f"sample {sample.get('key')} has no txt member")
    try:
        return sample["txt"].decode("utf-8").strip()  # as ShardLoader does
    except UnicodeDecodeError as e:
        raise DataError(f"sample {sample.get('key')}: caption is not UTF-8") from e


def iter_shard_pairs(pattern: str, image_size: int, batch_size: int = 64, skipped: list | None = None,
                     workers: int = 4) -> Iterator[dict[str, Any]]:
    """Batches {"image": uint8 (B, S, S, 3), "text": list[str], "key": list[str]} read from shards with
    tarfile + PIL (resize shorter side + centre crop to ``image_size``). Bad samples are appended to
    ``skipped`` as (key, reason) when a list is given, else raise DataError."""
    from bmclip.eval.embed import resize_center_crop

    urls = expand_shards(pattern)

    def decode(sample):
        try:
            img = np.asarray(resize_center_crop(decode_sample_image(sample), image_size), dtype=np.uint8)
            return sample["key"], img, sample_text(sample)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append((sample["key"], str(e)))
            return None

    def chunks():
        buf = []
        for s in iter_shard_samples(urls, skipped):
            buf.append(s)
            if len(buf) == batch_size:
                yield buf
                buf = []
        if buf:
            yield buf

    n_samples = n_good = 0
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        for chunk in chunks():
            n_samples += len(chunk)
            res = [r for r in pool.map(decode, chunk) if r is not None]
            if res:
                n_good += len(res)
                yield {"key": [r[0] for r in res], "image": np.stack([r[1] for r in res]), "text": [r[2] for r in res]}
    finally:  # Ctrl-C / an abandoned generator: queued decodes are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)
    if n_good == 0:
        raise DataError(_no_valid_samples(pattern, urls, n_samples, skipped))


def _no_valid_samples(pattern: str, urls: Sequence[str], n_samples: int, skipped: list | None) -> str:
    """The cause when a whole pass over shards gave no usable sample (with counts and one example)."""
    where = f"{len(urls)} shard(s) {pattern!r}"
    tar_problems = [r for _, r in (skipped or []) if r.startswith(("truncated", "tar_lost_tail"))]
    if n_samples == 0:
        if tar_problems:
            return f"no samples in {where}: {tar_problems[0]}"
        return f"no samples in {where}: the tar files hold no webdataset members (<key>.<ext>)"
    sample_skips = [(k, r) for k, r in (skipped or []) if not r.startswith(("truncated", "tar_lost_tail"))]
    example = f"; e.g. {sample_skips[0][0]}: {sample_skips[0][1]}" if sample_skips else ""
    if sample_skips and all("corrupt" in r for _, r in sample_skips):
        return f"no valid sample in {where}: all {n_samples} images are undecodable{example}"
    return f"no valid sample in {where}: all {n_samples} samples were skipped{example}"


class ShardClassificationDataset(ImageDataset):
    """Labelled images in webdataset shards: image member + ``cls`` (integer text) member per sample.

    Samples are indexed once (kept as bytes in memory), so this is for evaluation-sized sets.
    """

    def __init__(self, pattern: str, task: Any = None):
        self.skipped = []
        self.samples = []
        for s in iter_shard_samples(expand_shards(pattern), self.skipped):
            if "cls" not in s:
                self.skipped.append((s["key"], "no cls member"))
                continue
            try:
                lab = int(s["cls"].decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                self.skipped.append((s["key"], f"cls is not an integer: {s['cls'][:20]!r}"))
                continue
            self.samples.append((s, lab))
        if not self.samples:
            if self.skipped:
                why = f": {len(self.skipped)} skipped, e.g. {self.skipped[0][0]}: {self.skipped[0][1]}"
            else:
                why = ": the tar files hold no samples"
            raise DataError(f"no labelled samples (image + cls) in {pattern}{why}")
        n_cls = max(lab for _, lab in self.samples) + 1
        self.classes = list(task.classes) if task is not None else [str(i) for i in range(n_cls)]
        if n_cls > len(self.classes):
            raise DataError(f"label {n_cls - 1} out of range for {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s, lab = self.samples[i]
        return decode_sample_image(s), lab

    def labels(self) -> np.ndarray:
        return np.array([lab for _, lab in self.samples], dtype=np.int64)

    def name_of(self, i: int) -> str:
        return self.samples[i][0]["key"]


# ---------------------------------------------------------------- batching for a model


def iterate_batches(dataset: ImageDataset, image_size: int, batch_size: int = 64, workers: int = 4,
                    indices: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
    """Batches {"image": uint8 (B, S, S, 3), "label": int64 (B,), "index": (B,)} of a classification dataset.

    Images are resized (shorter side) and centre-cropped to ``image_size`` in a thread pool. Unreadable
    images are skipped and recorded in ``dataset.skipped`` as (name, reason); labels stay aligned.
    """
    from bmclip.eval.embed import resize_center_crop

    idx = list(range(len(dataset))) if indices is None else list(indices)

    def load(i):
        try:
            img, lab = dataset[i]
            return i, np.asarray(resize_center_crop(img, image_size), dtype=np.uint8), lab
        except DataError as e:
            dataset.skipped.append((dataset.name_of(i), str(e)))
            return None

    n_good = 0
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        for s in range(0, len(idx), batch_size):
            res = [r for r in pool.map(load, idx[s : s + batch_size]) if r is not None]
            if res:
                n_good += len(res)
                batch = {"index": np.array([r[0] for r in res], dtype=np.int64),
                         "image": np.stack([r[1] for r in res])}
                if getattr(dataset, "labelled", True):
                    batch["label"] = np.array([r[2] for r in res], dtype=np.int64)
                yield batch
    finally:  # Ctrl-C / an abandoned generator: queued loads are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)
    if idx and n_good == 0:
        ex = f"; e.g. {dataset.skipped[-1][0]}: {dataset.skipped[-1][1]}" if dataset.skipped else ""
        raise DataError(f"none of the {len(idx)} images could be read{ex}")
