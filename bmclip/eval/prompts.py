"""Built-in zero-shot task specs (class names + prompt templates) and custom YAML task specs.

Class names and templates of the five BiomedCLIP zero-shot tasks are those of the BiomedCLIP paper,
Supplementary Table 10 ("Prompts used for zero-shot image classification") of Zhang et al., "A
Multimodal Biomedical Foundation Model Trained from Fifteen Million Image-Text Pairs", NEJM AI (2025),
DOI 10.1056/AIoa2400640 (arXiv 2303.00915). The same paper reports these results at 224 px (Supp.
Table 5): PCam 73.41, LC25000 lung 65.23, LC25000 colon 92.98, TCGA-TIL 67.04 (AUROC), RSNA 78.95.

``folder_aliases`` maps the class sub-folder / label names found in the public releases of each
dataset to the class index (LC25000 ships ``lung_aca``, ``lung_n``, ``lung_scc``, ``colon_aca``,
``colon_n``); they let an ImageFolder/CSV copy of the dataset be used without renaming.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bmclip.errors import ConfigError


def check_template(template: Any, where: str = "template") -> str:
    """``template`` if it is a prompt template with exactly one ``{}`` field (positional, automatic: no name,
    index, conversion or format spec) and no other field; else ConfigError naming ``where``. Literal braces
    are written ``{{`` and ``}}``."""
    if not isinstance(template, str):
        raise ConfigError(f"{where}: template {template!r} is not a string")
    why = "must contain exactly one '{}'"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # a single '{' or '}'
        raise ConfigError(f"{where}: template {template!r} is not a format string ({e}; write a literal brace "
                          "as '{{' or '}}')") from None
    if len(fields) != 1:
        raise ConfigError(f"{where}: template {template!r} {why}, found {len(fields)} fields")
    if fields[0] != ("", "", None):
        name, spec, conv = fields[0]
        raw = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        raise ConfigError(f"{where}: template {template!r} {why} (a bare '{{}}' without a name, index, conversion "
                          f"or format spec), found {raw!r}")
    return template


@dataclass(frozen=True)
class TaskSpec:
    """A zero-shot classification task: class names, templates with one ``{}``, and the headline metric."""

    name: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    metric: str = "accuracy"  # the number the paper reports for this task
    folder_aliases: dict[str, int] = field(default_factory=dict)
    data: str | None = None  # dataset SPEC for custom YAML tasks

    def __post_init__(self):
        if len(self.classes) < 2:
            raise ConfigError(f"task {self.name!r}: needs at least 2 classes, got {list(self.classes)}")
        for c in self.classes:
            if not isinstance(c, str) or not c.strip():
                raise ConfigError(f"task {self.name!r}: class names must be non-blank strings, got {c!r}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"task {self.name!r}: duplicate class names in {list(self.classes)}")
        if not self.templates:
            raise ConfigError(f"task {self.name!r}: needs at least one template")
        for t in self.templates:
            check_template(t, f"task {self.name!r}")

    def prompts(self, class_index: int) -> list[str]:
        """All templates filled with class ``class_index``'s name."""
        return [t.format(self.classes[class_index]) for t in self.templates]

    def class_index(self, label: str) -> int:
        """Map a folder/label name to a class index (exact class name, alias, or integer string)."""
        key = label.strip()
        if key in self.classes:
            return self.classes.index(key)
        low = key.lower()
        for alias, idx in self.folder_aliases.items():
            if alias.lower() == low:
                return idx
        if key.isascii() and key.isdigit() and int(key) < len(self.classes):
            return int(key)
        raise ConfigError(
            f"task {self.name!r}: label {label!r} is not one of {list(self.classes)} "
            f"(aliases: {sorted(self.folder_aliases)})"
        )


_T_IMAGE = ("this is an image of {}", "{} presented in image")
_T_PHOTO = ("a photo of {}", "{} presented in image")

BUILTIN_TASKS: dict[str, TaskSpec] = {
    "pcam": TaskSpec(
        "pcam",
        ("normal lymph node", "lymph node metastasis"),
        _T_IMAGE,
        folder_aliases={"normal": 0, "negative": 0, "tumor": 1, "metastasis": 1, "positive": 1},
    ),
    "lc25000_lung": TaskSpec(
        "lc25000_lung",
        ("lung adenocarcinomas", "normal lung tissue", "lung squamous cell carcinomas"),
        _T_IMAGE,
        folder_aliases={"lung_aca": 0, "lung_n": 1, "lung_scc": 2},
    ),
    "lc25000_colon": TaskSpec(
        "lc25000_colon",
        ("colon adenocarcinomas", "normal colonic tissue"),
        _T_PHOTO,
        folder_aliases={"colon_aca": 0, "colon_n": 1},
    ),
    "tcga_til": TaskSpec(
        "tcga_til",
        ("none", "tumor infiltrating lymphocytes"),
        _T_PHOTO,
        metric="auroc",
        folder_aliases={
            "negative": 0, "til_negative": 0, "til-negative": 0, "neg": 0,
            "positive": 1, "til_positive": 1, "til-positive": 1, "pos": 1,
        },
    ),
    "rsna_pneumonia": TaskSpec(
        "rsna_pneumonia",
        ("normal lung", "pneumonia"),
        _T_PHOTO,
        folder_aliases={"normal": 0, "negative": 0, "positive": 1, "lung opacity": 1},
    ),
}


def get_task(name: str) -> TaskSpec:
    """A built-in task by name (see ``BUILTIN_TASKS``)."""
    try:
        return BUILTIN_TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown built-in task {name!r}; known: {sorted(BUILTIN_TASKS)}") from None


def _is_name(v: Any) -> bool:
    """A usable class / folder name in a task file: a non-blank string or an integer (not a bool or null)."""
    return (isinstance(v, str) and bool(v.strip())) or (isinstance(v, int) and not isinstance(v, bool))


def _yaml_error_line(e: Exception) -> str:
    """A YAML parser error on one line: what went wrong and where (PyYAML's message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{context + ', ' if context else ''}{problem}".split())


def load_task_yaml(path: str | os.PathLike) -> TaskSpec:
    """Read a custom task: YAML mapping with ``classes`` (list), ``templates`` (list), optional ``data``, ``name``.

    ``classes`` may also be a mapping {folder/label name: class name} to rename folders into prompts.
    """
    p = Path(path)
    try:
        doc: Any = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise ConfigError(f"cannot read task file {p}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"task file {p} is not UTF-8 text (byte {e.start}); a task file is YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"task file {p} is not valid YAML: {_yaml_error_line(e)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"task file {p}: expected a mapping with 'classes' and 'templates'")
    unknown = set(doc) - {"name", "classes", "templates", "data", "metric"}
    if unknown:
        raise ConfigError(f"task file {p}: unknown keys {sorted(unknown, key=str)}")
    classes = doc.get("classes")
    aliases: dict[str, int] = {}
    if isinstance(classes, dict):
        for k, v in classes.items():
            if not _is_name(k):
                raise ConfigError(f"task file {p}: 'classes' key {k!r} must be a folder/label name (string or integer)")
            if not _is_name(v):
                raise ConfigError(f"task file {p}: 'classes' entry {k!r}: {v!r} must be a non-blank class name "
                                  "(string or integer)")
        aliases = {str(k): i for i, k in enumerate(classes)}
        classes = [str(v) for v in classes.values()]
    if not isinstance(classes, list):
        raise ConfigError(f"task file {p}: 'classes' must be a list of names (or a mapping folder -> name)")
    for c in classes:
        if not _is_name(c):
            raise ConfigError(f"task file {p}: 'classes' entry {c!r} must be a non-blank class name (string or "
                              "integer)")
    templates = doc.get("templates", ["{}"])
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise ConfigError(f"task file {p}: 'templates' must be a list of strings with one '{{}}'")
    for t in templates:
        check_template(t, f"task file {p}")
    metric = doc.get("metric", "accuracy")
    if metric not in ("accuracy", "balanced_accuracy", "auroc"):
        raise ConfigError(f"task file {p}: 'metric' must be accuracy, balanced_accuracy or auroc")
    name = doc.get("name")
    if name is None:
        name = p.stem
    elif not _is_name(name) or any(ch in str(name) for ch in "/\\\0") or str(name).strip() in (".", ".."):
        raise ConfigError(f"task file {p}: 'name' must be a non-blank name without path separators, got {name!r}")
    data = doc.get("data")
    if data is not None:
        if not _is_name(data):
            raise ConfigError(f"task file {p}: 'data' must be a dataset path or name, got {data!r}")
        data = str(data)
        if not os.path.isabs(data):
            data = str((p.parent / data).resolve())
    return TaskSpec(
        name=str(name),
        classes=tuple(str(c) for c in classes),
        templates=tuple(templates),
        metric=metric,
        folder_aliases=aliases,
        data=data,
    )
