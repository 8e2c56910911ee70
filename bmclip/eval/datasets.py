"""Evaluation datasets: a classification dataset yields ``(PIL image, int label)`` and has ``classes``.

``open_dataset(spec, data_root, split, task)`` resolves a dataset SPEC through two tables:

- ``BUILTIN_DATASETS``: a built-in task name (``bmclip.eval.prompts.BUILTIN_TASKS``: ``pcam``, ``lc25000_lung``,
  ``lc25000_colon``, ``tcga_til``, ``rsna_pneumonia``) with ``data_root`` pointing at the local copy is opened
  by the task's layout reader; a task without an entry is read by format from ``data_root``;
- ``DATASET_FORMATS``: any other SPEC is a path, tried against each format in order: webdataset shards
  (``*.tar``, brace patterns, globs; image member + ``cls`` member), a ``.csv``/``.tsv`` file, a PCam HDF5
  folder or ``..._split_<split>`` prefix, an ImageFolder tree, and a flat folder of images/DICOM files or a
  single image file (unlabelled, label -1, predictions only). A remote SPEC (``s3://``, ``gs://``, ``https://``
  shard URLs or patterns, ``pipe:CMD``; ``bmclip.io.fs.is_remote``) is webdataset shards, streamed by
  ``bmclip.data.tario`` (fsspec options from the environment, e.g. ``AWS_ENDPOINT_URL``).

Adding a dataset layout or file format is one entry in one of these tables. Nothing is ever downloaded.
Unreadable images are counted skips with a reason (``dataset.skipped``: (name, reason) pairs), never silent
losses; the images themselves are decoded by ``bmclip.eval.images``.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bmclip.data.shards import expand_urls
from bmclip.data.tario import iter_shard_samples
from bmclip.errors import ConfigError, DataError
from bmclip.eval.images import decode_sample_image, is_image_file, load_image
from bmclip.eval.prompts import BUILTIN_TASKS, TaskSpec
from bmclip.io.fs import is_remote

__all__ = ["BUILTIN_DATASETS", "DATASET_FORMATS", "FileListDataset", "ImageDataset", "PCamDataset",
           "ShardClassificationDataset", "csv_dataset", "image_folder", "open_dataset", "open_path", "pcam_prefix",
           "rsna_dataset", "unlabelled_images"]

# ---------------------------------------------------------------- dataset classes and readers


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


def _label_mapper(task: Any, found: Sequence[str]) -> tuple[list[str], Callable[[str], int]]:
    """(class list, name -> index) for found label names, through a task's class list/aliases if given."""
    if task is None:
        classes = sorted(found, key=_natural_key)
        return classes, classes.index
    return list(task.classes), task.class_index


def _natural_key(s: str):
    return [int(t) if i % 2 else t.lower() for i, t in enumerate(re.split(r"([0-9]+)", s))]


_INT_LABEL = re.compile(r"[+-]?[0-9]+(?:\.0*)?")  # "3", "-1", "+2", "3.0" (a float column written by pandas)
_NUM_LABEL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _integer_classes(labels: Sequence[tuple[str, str]]) -> tuple[list[str], dict[str, int]] | None:
    """(class names, {label text: class index}) when every label is a whole number: the classes are the numbers
    that occur, sorted (never ``range(max + 1)``: labels {1, 2} are two classes, {0, 10**11} two, not 10**11 + 1).
    None when the labels are names. DataError for a negative number, or for numbers that are not all whole
    (0.7 is a score or a probability, not a class id: never truncated). ``labels``: (where, text) pairs."""
    if not all(_NUM_LABEL.fullmatch(t) for _, t in labels):
        return None
    for where, t in labels:
        if not _INT_LABEL.fullmatch(t):
            raise DataError(f"{where}: label {t!r} is not a whole number; numeric labels are class ids "
                            "(integers >= 0), anything else must be a class name")
    values = {t: int(float(t)) if "." in t else int(t) for _, t in labels}
    for where, t in labels:
        if values[t] < 0:
            raise DataError(f"{where}: negative label {t!r}; integer labels are class ids >= 0")
    order = sorted(set(values.values()))
    pos = {v: i for i, v in enumerate(order)}
    return [str(v) for v in order], {t: pos[v] for t, v in values.items()}


def _read_text(p: Path, what: str) -> str:
    """A text file's contents as UTF-8 (a BOM is dropped); DataError naming the file when it cannot be."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {what} {p}: {e.strerror or e}") from e
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Excel writes one)
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        hint = " (it is UTF-16: save it as UTF-8)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{what} {p} is not UTF-8 text: undecodable byte 0x{data[e.start]:02x} on line {line}"
                        f"{hint}") from None


def _csv_rows(p: Path, delimiter: str, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the non-blank rows of a CSV/TSV file; DataError naming the line on bad input."""
    reader = csv.reader(io.StringIO(_read_text(p, what), newline=""), delimiter=delimiter, strict=True)
    rows = []
    try:
        for r in reader:
            if r and any(c.strip() for c in r):
                rows.append((reader.line_num, r))
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: not valid CSV: {e}") from None
    return rows


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


def unlabelled_images(path: str | os.PathLike) -> FileListDataset:
    """Images (any PIL format or DICOM) directly in a folder, or one image file, without labels (label -1)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.iterdir() if q.is_file() and is_image_file(q))
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
        files = sorted(p for p in d.rglob("*") if p.is_file() and is_image_file(p))
        items.extend((p, idx) for p in files)
    if not items:
        raise DataError(f"{r}: no image files under the class folders")
    return FileListDataset(items, classes)


_PATH_COLS = ("path", "image", "filename", "file", "img", "image_path")
_LABEL_COLS = ("label", "class", "target", "y", "category")


def csv_dataset(path: str | os.PathLike, task: Any = None, image_root: str | os.PathLike | None = None):
    """CSV/TSV with a header naming a path column (path/image/filename/...) and a label column (label/class/...).

    Without a recognised header the first two columns are (path, label). Relative paths are relative to
    ``image_root`` or the file's folder. Labels may be names or integer class ids; with ``task`` they are
    resolved through its class list (names, aliases, or indices into it), and a label outside it is an error
    naming the row. Without ``task`` the classes are the labels that occur, sorted (integers numerically).
    An empty label, a negative or fractional numeric label, undecodable text or malformed CSV is a DataError
    naming the file and line.
    """
    p = Path(path)
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    rows = _csv_rows(p, delim, "CSV file")
    if not rows:
        raise DataError(f"{p} is empty")
    head = [h.strip().lower() for h in rows[0][1]]
    pi = next((head.index(c) for c in _PATH_COLS if c in head), None)
    li = next((head.index(c) for c in _LABEL_COLS if c in head), None)
    base = Path(image_root) if image_root else p.parent
    if pi is not None and li is not None:
        body = rows[1:]
    elif pi is None and li is None and len(rows[0][1]) >= 2 and (base / rows[0][1][0].strip()).is_file():
        pi, li, body = 0, 1, rows  # headerless: the first row already names an existing image
    else:
        raise DataError(f"{p}: header must name a path column {_PATH_COLS} and a label column {_LABEL_COLS}")
    raw = []
    for n, r in body:
        if len(r) <= max(pi, li):
            raise DataError(f"{p}:{n}: expected at least {max(pi, li) + 1} columns, got {len(r)}")
        lab = r[li].strip()
        if not lab:
            raise DataError(f"{p}:{n}: empty label for {r[pi].strip() or 'an empty path'!r}")
        raw.append((f"{p}:{n}", base / r[pi].strip(), lab))
    if not raw:
        raise DataError(f"{p}: no rows")
    if task is not None:  # the task's class list: a label outside it is an error naming the row
        items = []
        for where, q, lab in raw:
            try:
                items.append((q, task.class_index(lab)))
            except ConfigError as e:
                raise DataError(f"{where}: {e}") from None
        return FileListDataset(items, list(task.classes))
    ints = _integer_classes([(where, lab) for where, _, lab in raw])
    if ints is not None:
        classes, index = ints
        return FileListDataset([(q, index[lab]) for _, q, lab in raw], classes)
    classes, to_index = _label_mapper(None, sorted({lab for _, _, lab in raw}))
    return FileListDataset([(q, to_index(lab)) for _, q, lab in raw], classes)


class PCamDataset(ImageDataset):
    """PatchCamelyon HDF5: ``<prefix>_x.h5`` (dataset "x": (N, 96, 96, 3) uint8) and ``<prefix>_y.h5``
    ("y": (N, 1, 1, 1) label), prefix = ``.../camelyonpatch_level_2_split_<train|valid|test>``."""

    def __init__(self, prefix: str | os.PathLike, task: Any = None):
        # h5py is an optional dependency (the "eval" extra), needed only for PCam.
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
        bad = np.flatnonzero(~np.isin(y, (0, 1)))  # 0.7 is not truncated to 0, nor NaN to anything
        if len(bad):
            raise DataError(f"{self.y_path}: PCam labels must be 0 or 1, got {y[bad[0]]!r} at index {int(bad[0])} "
                            f"({len(bad)} such labels)")
        self._y = y.astype(np.int64)
        self.classes = list(task.classes) if task is not None else ["0", "1"]
        self.skipped = []
        self._fx = None

    def __len__(self) -> int:
        return len(self._y)

    def _x(self):
        import h5py  # optional dependency, see __init__

        if self._fx is None:  # opened lazily, per process, so the dataset can be pickled to workers
            self._fx = h5py.File(self.x_path, "r")
        return self._fx["x"]

    def __getitem__(self, i: int):
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
    rows = _csv_rows(labels_csv, ",", "RSNA labels file")
    head = [h.strip() for h in rows[0][1]] if rows else []
    if "patientId" not in head or "Target" not in head:
        raise DataError(f"{labels_csv}: header must name the columns patientId and Target, got {head}")
    pi, ti = head.index("patientId"), head.index("Target")
    target: dict[str, int] = {}
    for n, row in rows[1:]:
        pid = row[pi].strip() if len(row) > pi else ""
        t = row[ti].strip() if len(row) > ti else ""
        if not pid or t not in ("0", "1"):
            raise DataError(f"{labels_csv}:{n}: bad row {row}: expected a patientId and Target 0 or 1")
        target[pid] = max(target.get(pid, 0), int(t))
    if not target:
        raise DataError(f"{labels_csv}: no rows")
    items = []
    missing = []
    for pid, t in sorted(target.items()):
        q = img_dir / f"{pid}.dcm"
        if q.exists():
            items.append((q, t))
        else:
            missing.append((str(q), "listed in labels but file missing"))
    if not items:
        raise DataError(f"{labels_csv}: none of the {len(target)} patients listed has an image in {img_dir} "
                        f"(all {len(missing)} missing, e.g. {missing[0][0]})")
    classes = list(task.classes) if task is not None else ["normal", "pneumonia"]
    ds = FileListDataset(items, classes)
    ds.skipped = missing
    return ds


def _find_dir(root: Path, names: Sequence[str], must_contain: Sequence[str]) -> Path:
    for cand in [root, *[root / n for n in names]]:
        if all((cand / m).is_dir() for m in must_contain):
            return cand
    raise DataError(f"{root}: no folder containing {list(must_contain)} (looked in {[root, *names]})")


class ShardClassificationDataset(ImageDataset):
    """Labelled images in webdataset shards: an image member + a ``cls`` (integer text) member per sample.

    Samples are indexed once (kept as bytes in memory), so this is for evaluation-sized sets. Tar damage and
    samples without a usable ``cls`` are counted in ``skipped``; an undecodable image is skipped when read.
    With ``task``, ``cls`` indexes its class list (a label beyond it is an error); without, the classes are
    the labels that occur, in numeric order. A negative label is an error naming the sample.
    """

    def __init__(self, pattern: str, task: Any = None):
        self.skipped = []
        found = []
        for s in iter_shard_samples(expand_urls(pattern), self.skipped):
            if "cls" not in s:
                self.skipped.append((s["__key__"], "no cls member"))
                continue
            try:
                lab = int(s["cls"].decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                self.skipped.append((s["__key__"], f"cls is not an integer: {s['cls'][:20]!r}"))
                continue
            if lab < 0:
                raise DataError(f"sample {s['__key__']} in {s.get('__url__', pattern)}: negative class label {lab} "
                                "in its cls member; class labels are integers >= 0")
            found.append((s, lab))
        if not found:
            if self.skipped:
                why = f": {len(self.skipped)} skipped, e.g. {self.skipped[0][0]}: {self.skipped[0][1]}"
            else:
                why = ": the tar files hold no samples"
            raise DataError(f"no labelled samples (image + cls) in {pattern}{why}")
        if task is not None:  # cls is an index into the task's class list
            self.classes = list(task.classes)
            for s, lab in found:
                if lab >= len(self.classes):
                    raise DataError(f"sample {s['__key__']} in {s.get('__url__', pattern)}: class label {lab} is out "
                                    f"of range for the {len(self.classes)} classes of task {task.name!r} "
                                    f"{self.classes}")
            self.samples = found
        else:  # the labels that occur, in numeric order (never range(max + 1))
            order = sorted({lab for _, lab in found})
            pos = {v: i for i, v in enumerate(order)}
            self.classes = [str(v) for v in order]
            self.samples = [(s, pos[lab]) for s, lab in found]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s, lab = self.samples[i]
        return decode_sample_image(s), lab

    def labels(self) -> np.ndarray:
        return np.array([lab for _, lab in self.samples], dtype=np.int64)

    def name_of(self, i: int) -> str:
        return self.samples[i][0]["__key__"]


# ---------------------------------------------------------------- the registry: built-in layouts and path formats

# A reader of one dataset: (path, split, task or None) -> dataset.
DatasetReader = Callable[[Path, str, TaskSpec | None], ImageDataset]


def _is_shard_pattern(p: Path, split: str) -> bool:
    s = str(p)
    return s.endswith(".tar") or "{" in s or any(ch in s for ch in "*?[")


def _is_pcam(p: Path, split: str) -> bool:
    s = str(p)
    return (s.endswith(("_x.h5", "_y.h5")) or Path(s + "_x.h5").exists()
            or (p.is_dir() and Path(pcam_prefix(p, split) + "_x.h5").exists()))


def _has_class_folders(p: Path, split: str) -> bool:
    return p.is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir())


# Path formats, tried in order: (name, does this path have the format?, reader).
DATASET_FORMATS: tuple[tuple[str, Callable[[Path, str], bool], DatasetReader], ...] = (
    ("webdataset shards", _is_shard_pattern, lambda p, split, task: ShardClassificationDataset(str(p), task)),
    ("CSV/TSV", lambda p, split: p.suffix.lower() in (".csv", ".tsv"), lambda p, split, task: csv_dataset(p, task)),
    ("PCam HDF5", _is_pcam, lambda p, split, task: PCamDataset(pcam_prefix(p, split), task)),
    ("ImageFolder", _has_class_folders, lambda p, split, task: image_folder(p, task)),
    # a flat folder of images / DICOM files, or one image file: predictions only
    ("unlabelled images", lambda p, split: p.is_dir() or (p.is_file() and is_image_file(p)),
     lambda p, split, task: unlabelled_images(p)),
)


def open_path(path: str | os.PathLike, split: str = "test", task: TaskSpec | None = None) -> ImageDataset:
    """Open a dataset path by its format (the first entry of ``DATASET_FORMATS`` that matches)."""
    p = Path(path)
    for _, matches, read in DATASET_FORMATS:
        if matches(p, split):
            return read(p, split, task)
    raise DataError(f"dataset {str(p)!r} not found (not a path, and not one of {sorted(BUILTIN_TASKS)})")


def _lc25000(kind: str) -> DatasetReader:
    def read(root: Path, split: str, task: TaskSpec | None) -> ImageDataset:
        d = _find_dir(root, [f"{kind}_image_sets", f"lung_colon_image_set/{kind}_image_sets"],
                      [f"{kind}_aca", f"{kind}_n"])
        return image_folder(d, task)

    return read


def _rsna(root: Path, split: str, task: TaskSpec | None) -> ImageDataset:
    if (root / "stage_2_train_labels.csv").exists() or (root / "stage_1_train_labels.csv").exists():
        return rsna_dataset(root, task)
    return open_path(root, split, task)  # an ImageFolder or CSV copy, read with the task's label aliases


# Layout readers of the built-in tasks, by task name; a built-in task not listed here (tcga_til) is read
# from its data root by format (ImageFolder or CSV, with the task's label aliases).
BUILTIN_DATASETS: dict[str, DatasetReader] = {
    "pcam": lambda root, split, task: PCamDataset(pcam_prefix(root, split), task),
    "lc25000_lung": _lc25000("lung"),
    "lc25000_colon": _lc25000("colon"),
    "rsna_pneumonia": _rsna,
}


def open_dataset(spec: str, data_root: str | os.PathLike | None = None, split: str = "test",
                 task: TaskSpec | None = None) -> ImageDataset:
    """Resolve a dataset SPEC (built-in task name or path) to a classification dataset (see module docs)."""
    if spec in BUILTIN_TASKS:
        if data_root is None:
            raise ConfigError(f"built-in dataset {spec!r} needs --data-root pointing at your local copy")
        root = Path(data_root)
        if not root.exists():
            raise DataError(f"data root {root} does not exist")
        return BUILTIN_DATASETS.get(spec, open_path)(root, split, task or BUILTIN_TASKS[spec])
    if is_remote(spec):  # a Path would mangle the URL
        return ShardClassificationDataset(spec, task)
    p = Path(spec)
    if data_root is not None and not p.is_absolute() and not p.exists():
        p = Path(data_root) / spec
    return open_path(p, split, task)
