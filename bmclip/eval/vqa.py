"""Medical VQA as closed-set answer classification (the BiomedCLIP paper's VQA-RAD / SLAKE protocol):
image and question encoders (frozen or fine-tuned) + a small METER-style co-attention fusion module
+ an MLP over the answer vocabulary; accuracy on open, closed and all questions.

Readers (local files only):

- VQA-RAD, official release: ``VQA_RAD Dataset Public.json`` (records with ``qid``, ``image_name``,
  ``question``, ``answer``, ``answer_type`` "OPEN"/"CLOSED", ``question_type``, ``phrase_type``, ...)
  and the ``VQA_RAD Image Folder``. The official test split is the records whose ``phrase_type``
  starts with ``test`` (``test_freeform``/``test_para``); all others are training. The common
  pre-split layout (``trainset.json``/``testset.json`` or ``train.json``/``test.json`` with the same
  fields, images in ``images/``) is read as is.
- SLAKE 1.0: ``train.json``/``validation.json``/``test.json`` (records with ``img_name`` relative to
  ``imgs/``, ``question``, ``answer``, ``answer_type``, ``q_lang``, ...); only ``q_lang == "en"`` is kept.

Answers are normalised (lower case, whitespace collapsed, trailing period dropped). The answer vocabulary
is, by default, the set of normalised *training* answers; a test question whose answer is outside it can
never be answered and counts as wrong (their number is reported as ``test_answers_not_in_vocab``).
``answer_vocab="all"`` uses train + test answers as the label space instead, as the METER/PubMedCLIP-style
set-ups behind the published VQA-RAD/SLAKE numbers do.

Fusion (after METER, Dou et al. 2022): image tokens (ViT, CLS first) and question tokens (BERT, CLS
first) are projected to ``hidden`` and pass ``layers`` co-attention layers; each layer does, per stream,
self-attention, cross-attention to the other stream, and an MLP (pre-LayerNorm, residual). The two CLS
outputs are concatenated and classified by an MLP.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bmclip.errors import ConfigError, DataError, check_int, is_int
from bmclip.eval.embed import to_model_input
from bmclip.eval.images import load_image

# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class VQASample:
    """One question: image file, question text, normalised answer, "OPEN" or "CLOSED", source id."""

    image: Path
    question: str
    answer: str
    answer_type: str
    qid: str


def normalise_answer(a: Any) -> str:
    """Canonical answer string: str, lower case, whitespace collapsed, trailing period removed."""
    s = re.sub(r"\s+", " ", str(a)).strip().lower()
    return s[:-1].rstrip() if s.endswith(".") else s


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    except (ValueError, RecursionError) as e:  # malformed, not UTF-8, or nested beyond the parser's depth
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise DataError(f"{path} is not valid JSON: {what}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of question records")
    return data


# Reasons of skipped questions start with one of these kinds ("kind: detail"); reports count them by kind.
SKIP_KINDS = ("missing_fields", "bad_field", "bad_answer_type", "image_outside_folder", "image_not_found",
              "corrupt_image")


def skip_kind(reason: str) -> str:
    """The kind of a skip reason (its text up to the first colon)."""
    return reason.split(":", 1)[0]


def _image_name_problem(name: Any, image_dir: Path, key: str) -> str | None:
    """Why ``name`` cannot name an image inside ``image_dir`` (a skip reason), or None when it can.

    The check is on the name itself (absolute, or climbing out with ``..``); symbolic links inside the image
    folder are the dataset owner's and are followed."""
    if not isinstance(name, str):
        what = "null" if name is None else f"a {type(name).__name__}, not a file name"
        return f"bad_field: {key} is {what}"
    if not name.strip():
        return f"bad_field: {key} is empty"
    if "\0" in name:
        return f"bad_field: {key} {name!r} holds a NUL character"
    if os.path.isabs(name):
        return f"image_outside_folder: {key} {name!r} is an absolute path (must be relative to {image_dir})"
    norm = os.path.normpath(name)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return f"image_outside_folder: {key} {name!r} points outside the image folder {image_dir}"
    return None


def _make_samples(records, image_dir: Path, image_key: str, skipped: list, lang_filter: bool = False):
    out = []
    for i, r in enumerate(records):
        if lang_filter and r.get("q_lang", "en") != "en":
            continue
        qid = str(r.get("qid", i))
        missing = [k for k in (image_key, "question", "answer", "answer_type") if k not in r]
        if missing:
            skipped.append((qid, f"missing_fields: missing fields {missing}"))
            continue
        q, a = r["question"], r["answer"]
        if not isinstance(q, str):
            what = "null" if q is None else f"a {type(q).__name__}, not text"
            skipped.append((qid, f"bad_field: question is {what}"))
            continue
        if not q.strip():
            skipped.append((qid, "bad_field: question is empty"))
            continue
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            what = "null" if a is None else f"a {type(a).__name__}, not one answer"
            skipped.append((qid, f"bad_field: answer is {what}"))
            continue
        answer = normalise_answer(a)
        if not answer:
            skipped.append((qid, "bad_field: answer is empty"))
            continue
        at = str(r["answer_type"]).strip().upper()
        if at not in ("OPEN", "CLOSED"):
            skipped.append((qid, f"bad_answer_type: answer_type {r['answer_type']!r} is not OPEN/CLOSED"))
            continue
        problem = _image_name_problem(r[image_key], image_dir, image_key)
        if problem is not None:
            skipped.append((qid, problem))
            continue
        img = image_dir / r[image_key]
        if not img.is_file():
            skipped.append((qid, f"image_not_found: image {img} not found"))
            continue
        out.append(VQASample(img, q.strip(), answer, at, qid))
    return out


def _why_none(skipped: list) -> str:
    """" (N skipped: kind n, ...; e.g. question Q: reason)" for a split that kept no question."""
    if not skipped:
        return " (no records)"
    kinds: dict[str, int] = {}
    for _, r in skipped:
        kinds[skip_kind(r)] = kinds.get(skip_kind(r), 0) + 1
    by = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    return f" ({len(skipped)} skipped: {by}; e.g. question {skipped[0][0]}: {skipped[0][1]})"


def _must_exist(p: Path) -> None:
    if not p.exists():
        raise DataError(f"{p} does not exist (expected a VQA-RAD or SLAKE dataset folder)")


def _first_dir(root: Path, names) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return root


def read_vqa_rad(path: str | os.PathLike, split: str, skipped: list | None = None) -> list[VQASample]:
    """VQA-RAD questions of ``split`` ("train" or "test") from the official JSON or a pre-split folder."""
    if split not in ("train", "test"):
        raise ConfigError(f"VQA-RAD split must be train or test, got {split!r}")
    skipped = [] if skipped is None else skipped
    p = Path(path)
    _must_exist(p)
    official = p if p.is_file() else p / "VQA_RAD Dataset Public.json"
    if official.is_file():
        root = official.parent
        recs = _read_json_list(official)
        want_test = split == "test"
        recs = [r for r in recs if str(r.get("phrase_type", "")).startswith("test") == want_test]
    else:
        root = p
        names = ["trainset.json", "train.json"] if split == "train" else ["testset.json", "test.json"]
        f = next((root / n for n in names if (root / n).is_file()), None)
        if f is None:
            raise DataError(f"{p}: no 'VQA_RAD Dataset Public.json' nor {' / '.join(names)}")
        recs = _read_json_list(f)
    img_dir = _first_dir(root, ["VQA_RAD Image Folder", "images", "imgs"])
    n0 = len(skipped)
    out = _make_samples(recs, img_dir, "image_name", skipped)
    if not out:
        raise DataError(f"{p}: no usable VQA-RAD {split} questions{_why_none(skipped[n0:])}")
    return out


def read_slake(path: str | os.PathLike, split: str, skipped: list | None = None) -> list[VQASample]:
    """English SLAKE questions of ``split`` ("train", "validation" or "test") from ``<path>/<split>.json``."""
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"SLAKE split must be train, validation or test, got {split!r}")
    skipped = [] if skipped is None else skipped
    root = Path(path)
    _must_exist(root)
    f = root / f"{split}.json"
    if not f.is_file():
        raise DataError(f"{root}: SLAKE {split}.json not found")
    n0 = len(skipped)
    out = _make_samples(_read_json_list(f), _first_dir(root, ["imgs"]), "img_name", skipped, lang_filter=True)
    if not out:
        raise DataError(f"{root}: no usable English SLAKE {split} questions{_why_none(skipped[n0:])}")
    return out


def detect_format(path: str | os.PathLike) -> str:
    """"vqa-rad" or "slake" from the files present (and the field names of the records)."""
    p = Path(path)
    _must_exist(p)
    if p.is_file() or (p / "VQA_RAD Dataset Public.json").is_file() or (p / "trainset.json").is_file():
        return "vqa-rad"
    f = p / "train.json"
    if f.is_file():
        recs = _read_json_list(f)
        if recs and "img_name" in recs[0]:
            return "slake"
        if recs and "image_name" in recs[0]:
            return "vqa-rad"
    raise DataError(f"{p}: not a VQA-RAD or SLAKE dataset (see bmclip.eval.vqa docs for the layouts)")


def load_vqa_splits(path: str | os.PathLike, fmt: str = "auto") -> dict[str, Any]:
    """{"format", "train": [VQASample], "test": [...], "skipped": [(qid, reason)]} for a VQA dataset folder.

    A question whose record is unusable (a missing or null field, an answer type other than OPEN/CLOSED, an
    image name that is absolute or leaves the image folder, a missing image) is skipped, with a reason that
    starts with its kind (``SKIP_KINDS``); images that do not decode are skipped later, by ``train_vqa``."""
    _must_exist(Path(path))
    fmt = detect_format(path) if fmt == "auto" else fmt
    skipped: list = []
    if fmt == "vqa-rad":
        tr, te = read_vqa_rad(path, "train", skipped), read_vqa_rad(path, "test", skipped)
    elif fmt == "slake":
        tr, te = read_slake(path, "train", skipped), read_slake(path, "test", skipped)
    else:
        raise ConfigError(f"unknown VQA format {fmt!r} (auto, vqa-rad, slake)")
    return {"format": fmt, "train": tr, "test": te, "skipped": skipped}


# ---------------------------------------------------------------- options

MAX_HIDDEN = 65536
MAX_LAYERS = 256


def check_vqa_options(*, epochs: int = 20, batch_size: int = 32, lr: float = 1e-4, encoder_lr: float = 1e-5,
                      hidden: int = 256, layers: int = 2, heads: int = 4, weight_decay: float = 0.01,
                      dropout: float = 0.1, features: str = "tokens", answer_vocab: str = "train",
                      flags: bool = False) -> None:
    """Raise ConfigError naming the first invalid option of ``train_vqa`` / ``build_vqa_model`` (cheap; call it
    before loading data or models). ``flags``: name the options as command-line flags (``--lr``)."""
    def name(n: str) -> str:
        return "--" + n.replace("_", "-") if flags else n

    def integer(n: str, v: Any, lo: int, hi: int | None = None) -> None:
        if not is_int(v) or v < lo or (hi is not None and v > hi):
            rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise ConfigError(f"{name(n)}={v!r} must be an integer {rng}")

    def number(n: str, v: Any, positive: bool) -> None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (v <= 0 if positive else v < 0):
            raise ConfigError(f"{name(n)}={v!r} must be a finite number {'> 0' if positive else '>= 0'}")

    integer("epochs", epochs, 1)
    integer("batch_size", batch_size, 1)
    number("lr", lr, True)
    number("encoder_lr", encoder_lr, True)
    number("weight_decay", weight_decay, False)
    integer("hidden", hidden, 1, MAX_HIDDEN)
    integer("layers", layers, 0, MAX_LAYERS)
    integer("heads", heads, 1, hidden)
    if hidden % heads:
        raise ConfigError(f"{name('hidden')}={hidden} is not divisible by {name('heads')}={heads} (attention "
                          "heads split the width evenly)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout={dropout!r} must be a number in [0, 1)")
    if features not in ("tokens", "pooled"):
        raise ConfigError(f"{name('features')} must be 'tokens' or 'pooled', got {features!r}")
    if answer_vocab not in ("train", "all"):
        raise ConfigError(f"{name('answer_vocab')} must be 'train' or 'all', got {answer_vocab!r}")


# ---------------------------------------------------------------- model


def build_vqa_model(clip_model: Any, n_answers: int, hidden: int = 256, layers: int = 2, heads: int = 4,
                    dropout: float = 0.1, features: str = "tokens"):
    """A VQAModel (torch.nn.Module) on top of ``clip_model``: logits (B, n_answers) from (images, input_ids)."""
    check_vqa_options(hidden=hidden, layers=layers, heads=heads, dropout=dropout, features=features)
    n_answers = check_int(n_answers, "n_answers", 1)
    class CoAttentionLayer(nn.Module):
        """Self-attention, cross-attention to the other stream, MLP; for both streams (pre-LN, residual)."""

        def __init__(self):
            super().__init__()
            mk = lambda: nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
            self.self_v, self.self_t, self.cross_v, self.cross_t = mk(), mk(), mk(), mk()
            self.ln = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(6)])
            mlp = lambda: nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(4 * hidden, hidden))
            self.mlp_v, self.mlp_t = mlp(), mlp()

        def forward(self, v, t, v_pad, t_pad):
            a = self.ln[0](v)
            v = v + self.self_v(a, a, a, key_padding_mask=v_pad, need_weights=False)[0]
            b = self.ln[1](t)
            t = t + self.self_t(b, b, b, key_padding_mask=t_pad, need_weights=False)[0]
            a, b = self.ln[2](v), self.ln[3](t)
            v2 = v + self.cross_v(a, b, b, key_padding_mask=t_pad, need_weights=False)[0]
            t2 = t + self.cross_t(b, a, a, key_padding_mask=v_pad, need_weights=False)[0]
            return v2 + self.mlp_v(self.ln[4](v2)), t2 + self.mlp_t(self.ln[5](t2))

    class VQAModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = clip_model
            self.features = features
            if features == "tokens":
                if not (hasattr(clip_model, "visual") and hasattr(clip_model.visual, "forward_tokens")
                        and hasattr(clip_model, "text") and hasattr(clip_model.text, "forward_tokens")):
                    raise ConfigError("features='tokens' needs model.visual/text.forward_tokens; use 'pooled'")
                wv = clip_model.config.vision.width
                wt = clip_model.config.text.width
            elif features == "pooled":
                wv = wt = clip_model.config.embed_dim
            else:
                raise ConfigError(f"features must be 'tokens' or 'pooled', got {features!r}")
            self.proj_v = nn.Linear(wv, hidden)
            self.proj_t = nn.Linear(wt, hidden)
            self.type_emb = nn.Parameter(torch.zeros(2, hidden))
            self.fusion = nn.ModuleList([CoAttentionLayer() for _ in range(layers)])
            self.ln_out = nn.LayerNorm(2 * hidden)
            self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.GELU(), nn.LayerNorm(2 * hidden),
                                      nn.Linear(2 * hidden, n_answers))

        def encode_v(self, images):
            """Image tokens (B, Nv, Wv), CLS first (``pooled``: the embedding as one token)."""
            if self.features == "tokens":
                return self.clip.visual.forward_tokens(images)
            return self.clip.encode_image(images)[:, None]

        def encode_t(self, input_ids):
            """(question tokens (B, Nt, Wt), padding mask (B, Nt) True = pad)."""
            if self.features == "tokens":
                t = self.clip.text.forward_tokens(input_ids)
                return t, input_ids[:, : t.shape[1]] == 0  # forward_tokens trims all-padding columns
            t = self.clip.encode_text(input_ids)[:, None]
            return t, torch.zeros(t.shape[:2], dtype=torch.bool, device=t.device)

        def fuse(self, v, t, t_pad):
            """Fusion + classifier on encoder features -> logits (B, n_answers)."""
            v = self.proj_v(v.float()) + self.type_emb[0]
            t = self.proj_t(t.float()) + self.type_emb[1]
            for layer in self.fusion:
                v, t = layer(v, t, None, t_pad)
            return self.head(self.ln_out(torch.cat([v[:, 0], t[:, 0]], dim=-1)))

        def forward(self, images, input_ids):
            return self.fuse(self.encode_v(images), *self.encode_t(input_ids))

    return VQAModel()


# ---------------------------------------------------------------- training / evaluation


def vqa_accuracy(pred: list[str], samples: list[VQASample]) -> dict[str, Any]:
    """Exact-match accuracy (normalised answers) overall and for OPEN / CLOSED questions, with counts."""
    if len(pred) != len(samples):
        raise DataError(f"{len(pred)} predictions for {len(samples)} questions")
    out: dict[str, Any] = {}
    for name, keep in (("overall", None), ("open", "OPEN"), ("closed", "CLOSED")):
        idx = [i for i, s in enumerate(samples) if keep is None or s.answer_type == keep]
        out[f"{name}_n"] = len(idx)
        out[f"{name}_accuracy"] = (float(np.mean([pred[i] == samples[i].answer for i in idx])) if idx
                                   else float("nan"))
    return out


def _load_images(model: Any, paths: list[Path], bad: dict[Path, str] | None = None):
    """Model input of the images at ``paths`` (float NCHW on the CPU); an image that does not decode is left out
    and its reason recorded in ``bad`` (raised as DataError when ``bad`` is None). None when none decodes."""
    images = []
    for p in paths:
        try:
            images.append(load_image(p))
        except DataError as e:
            if bad is None:
                raise
            bad[p] = str(e)
    return to_model_input(images, model, device="cpu") if images else None


def train_vqa(
    clip_model: Any,
    tokenizer: Any,
    train: list[VQASample],
    test: list[VQASample],
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-4,
    encoder_lr: float = 1e-5,
    finetune_encoders: bool = False,
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    features: str = "tokens",
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str = "cpu",
    log: Any = None,
    answer_vocab: str = "train",
    *,
    skipped: list | None = None,
) -> dict[str, Any]:
    """Train answer classification on ``train`` and score ``test``. Returns metrics, history, the model, vocab,
    predictions, the questions used (``n_train``/``n_test``) and the questions skipped (``skipped``).

    With frozen encoders the encoder features are computed once per distinct image / question and cached
    (identical results, much faster); with ``finetune_encoders`` both towers train at ``encoder_lr``.
    The options are checked first (ConfigError). A question whose image does not decode is skipped with a
    ``corrupt_image`` reason, appended to ``skipped`` when a list is given and returned as ``skipped``. A
    training loss that is not finite (NaN/inf: a learning rate far too high) stops with ConfigError.
    """
    check_vqa_options(epochs=epochs, batch_size=batch_size, lr=lr, encoder_lr=encoder_lr, hidden=hidden,
                      layers=layers, heads=heads, weight_decay=weight_decay, features=features,
                      answer_vocab=answer_vocab)
    if not train or not test:
        raise DataError("VQA needs non-empty train and test sets")
    skipped = [] if skipped is None else skipped
    n_skipped_before = len(skipped)

    # Decode every distinct image once; a question whose image does not decode is a counted skip.
    img_paths = sorted({s.image for s in train + test})
    bad: dict[Path, str] = {}
    chunks = [_load_images(clip_model, img_paths[s : s + 64], bad) for s in range(0, len(img_paths), 64)]
    if bad:
        for s in train + test:
            if s.image in bad:
                skipped.append((s.qid, f"corrupt_image: {bad[s.image]}"))
        img_paths = [p for p in img_paths if p not in bad]
        train = [s for s in train if s.image not in bad]
        test = [s for s in test if s.image not in bad]
        if not train or not test:
            which = "training" if not train else "test"
            raise DataError(f"no usable VQA {which} questions: the images of all of them do not decode "
                            f"({len(bad)} corrupt image(s), e.g. {next(iter(bad.values()))})")
    pixels = torch.cat([c for c in chunks if c is not None])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    # "all" = train + test answers as the label space (the usual VQA-RAD/SLAKE classification set-up in
    # the METER / PubMedCLIP line of work; it reveals which answers exist in test, not which is right).
    vocab = sorted({s.answer for s in (train + test if answer_vocab == "all" else train)})
    a2i = {a: i for i, a in enumerate(vocab)}
    y_train = torch.tensor([a2i[s.answer] for s in train])
    clip_model.to(device)
    model = build_vqa_model(clip_model, len(vocab), hidden, layers, heads, features=features).to(device)
    for p in clip_model.parameters():
        p.requires_grad_(finetune_encoders)
    fusion_params = [p for n, p in model.named_parameters() if not n.startswith("clip.")]
    groups = [{"params": fusion_params, "lr": lr}]
    if finetune_encoders:
        groups.append({"params": list(clip_model.parameters()), "lr": encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)

    img_index = {p: i for i, p in enumerate(img_paths)}
    questions = sorted({s.question for s in train + test})
    q_index = {q: i for i, q in enumerate(questions)}
    ids = tokenizer(questions).long()

    cache = None
    if not finetune_encoders:
        # Frozen towers: encode every distinct image and question once.
        clip_model.eval()
        with torch.no_grad():
            vs = [model.encode_v(pixels[s : s + 64].to(device)).cpu() for s in range(0, len(pixels), 64)]
            ts = [model.encode_t(ids[s : s + 256].to(device)) for s in range(0, len(ids), 256)]
        width = max(t[0].shape[1] for t in ts)
        t_feat = torch.cat([F.pad(t[0].cpu(), (0, 0, 0, width - t[0].shape[1])) for t in ts])
        t_pad = torch.cat([F.pad(t[1].cpu(), (0, width - t[1].shape[1]), value=True) for t in ts])
        cache = (torch.cat(vs), t_feat, t_pad)

    def logits_for(batch: list[VQASample]):
        ii = torch.tensor([img_index[s.image] for s in batch])
        qi = torch.tensor([q_index[s.question] for s in batch])
        if cache is not None:
            return model.fuse(cache[0][ii].to(device), cache[1][qi].to(device), cache[2][qi].to(device))
        return model(pixels[ii].to(device), ids[qi].to(device))

    history = []
    for ep in range(epochs):
        model.train()
        if cache is not None:
            clip_model.eval()
        order = rng.permutation(len(train))
        tot, nb = 0.0, 0
        for s in range(0, len(order), batch_size):
            bi = order[s : s + batch_size]
            loss = F.cross_entropy(logits_for([train[i] for i in bi]), y_train[bi].to(device))
            if not torch.isfinite(loss.detach()).item():
                raise ConfigError(f"VQA training diverged: the loss is {float(loss.detach())} at epoch {ep + 1}, "
                                  f"batch {nb + 1} (lr={lr}{f', encoder_lr={encoder_lr}' if finetune_encoders else ''}"
                                  "); lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            nb += 1
        history.append({"epoch": ep + 1, "train_loss": tot / nb})
        if log is not None:
            log(f"epoch {ep + 1}/{epochs}: train loss {tot / nb:.4f}")

    model.eval()
    preds: list[str] = []
    with torch.no_grad():
        for s in range(0, len(test), 128):
            preds += [vocab[int(k)] for k in logits_for(test[s : s + 128]).argmax(dim=1)]
    metrics = vqa_accuracy(preds, test)
    counts: dict[str, int] = {}
    for s in train:
        counts[s.answer] = counts.get(s.answer, 0) + 1
    majority = max(counts, key=counts.get)
    metrics["majority_answer"] = majority
    metrics["majority_baseline"] = vqa_accuracy([majority] * len(test), test)["overall_accuracy"]
    metrics["n_answers"] = len(vocab)
    metrics["answer_vocab"] = answer_vocab
    metrics["test_answers_not_in_vocab"] = sum(s.answer not in a2i for s in test)
    return {"metrics": metrics, "history": history, "model": model, "vocab": vocab, "predictions": preds,
            "n_train": len(train), "n_test": len(test), "skipped": skipped[n_skipped_before:]}
