"""open_clip checkpoint interop: load the released BiomedCLIP files into the native model, and export back.

The released layout is a folder with ``open_clip_pytorch_model.bin`` (open_clip ``CustomTextCLIP``:
timm ``vit_base_patch16_224`` trunk under ``visual.trunk``, linear ``visual.head.proj``, HF BERT under
``text.transformer``, MLP ``text.proj.{0,2}``, ``logit_scale``) and ``open_clip_config.json``.
Nothing is downloaded and no open_clip/timm/transformers code is needed at run time.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from bmclip.data.images import IMAGE_MEAN, IMAGE_STD
from bmclip.errors import CheckpointError, ConfigError, is_int
from bmclip.io import atomic_write_text, fsync_dir
from bmclip.io.model_file import load_state_dict, save_state_dict
from bmclip.io.owner import remove_dead_owners
from bmclip.model.clip import BiomedCLIP
from bmclip.model.config import ModelConfig, TextConfig, VisionConfig

__all__ = ["check_export_folder", "export_open_clip", "load_open_clip", "open_clip_config", "open_clip_state_dict"]

WEIGHTS_NAME = "open_clip_pytorch_model.bin"
SAFETENSORS_WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"
BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"

# timm ViTs this model can stand in for: (image_size, patch, width, layers, heads, mlp) -> name.
_TIMM_VITS = {
    (224, 16, 768, 12, 12, 3072): "vit_base_patch16_224",
    (384, 16, 768, 12, 12, 3072): "vit_base_patch16_384",
    (224, 16, 384, 12, 6, 1536): "vit_small_patch16_224",
}
_TIMM_KEYS = {name: key for key, name in _TIMM_VITS.items()}

# Keys an open_clip checkpoint may hold that carry nothing the model uses: the BERT tanh pooler
# (BiomedCLIP pools the raw [CLS] state) and the position/token-type id buffers of older transformers.
_TOLERATED = re.compile(r"text\.transformer\.(pooler\.dense\.(weight|bias)|embeddings\.(position_ids|token_type_ids))")
# Text poolers equivalent to ours (last hidden state at [CLS], no tanh pooler).
_CLS_POOLERS = ("cls_last_hidden_state_pooler", "cls_last_hidden_state")
# Hugging Face text models with BERT's layout (absolute positions from 0, token types, [PAD] = 0), by the last
# part of the name: bert-* (bert-base-uncased, google-bert/bert-large-cased, ...), BiomedBERT / PubMedBERT.
_BERT_NAMES = re.compile(r"(?i)bert[-_].*|.*(pubmed|biomed)bert.*")
# What an export folder holds (export_open_clip replaces only folders holding nothing else), and the name of
# an interrupted atomic write's temp file (bmclip.io.atomic).
_EXPORT_FILES = frozenset({WEIGHTS_NAME, CONFIG_NAME, "vocab.txt", "bmclip_tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json"})
_ATOMIC_TEMP = re.compile(r"\..+\.tmp")


def _pairs(cfg) -> list[tuple[tuple[str, ...], str]]:
    """(open_clip keys, bmclip key): one open_clip key copies; three (q, k, v) concatenate along dim 0."""
    out: list[tuple[tuple[str, ...], str]] = []
    wb = ("weight", "bias")
    t = "visual.trunk."
    out += [((t + "cls_token",), "visual.cls_token"), ((t + "pos_embed",), "visual.pos_embed")]
    out += [((f"{t}patch_embed.proj.{p}",), f"visual.patch_embed.{p}") for p in wb]
    for i in range(cfg.vision.layers):
        ob, nb = f"{t}blocks.{i}.", f"visual.blocks.{i}."
        for o, n in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.out"),
                     ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):  # fmt: skip
            out += [((f"{ob}{o}.{p}",), f"{nb}{n}.{p}") for p in wb]
    out += [((f"{t}norm.{p}",), f"visual.norm.{p}") for p in wb]
    out.append((("visual.head.proj.weight",), "visual.proj.weight"))

    e = "text.transformer.embeddings."
    for o, n in (("word_embeddings", "word"), ("position_embeddings", "position"),
                 ("token_type_embeddings", "token_type")):  # fmt: skip
        out.append(((f"{e}{o}.weight",), f"text.embeddings.{n}.weight"))
    out += [((f"{e}LayerNorm.{p}",), f"text.embeddings.norm.{p}") for p in wb]
    for i in range(cfg.text.layers):
        ob, nb = f"text.transformer.encoder.layer.{i}.", f"text.layers.{i}."
        for p in wb:
            qkv = tuple(f"{ob}attention.self.{x}.{p}" for x in ("query", "key", "value"))
            out.append((qkv, f"{nb}attn.qkv.{p}"))
            for o, n in (("attention.output.dense", "attn.out"), ("attention.output.LayerNorm", "norm1"),
                         ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"),
                         ("output.LayerNorm", "norm2")):  # fmt: skip
                out.append(((f"{ob}{o}.{p}",), f"{nb}{n}.{p}"))
    out += [(("text.proj.0.weight",), "text.proj.fc1.weight"), (("text.proj.2.weight",), "text.proj.fc2.weight")]
    out.append((("logit_scale",), "logit_scale"))
    if cfg.init_logit_bias is not None:
        out.append((("logit_bias",), "logit_bias"))
    return out


# ------------------------------------------------------------------------------------------ loading


def _locate(path: str | os.PathLike) -> tuple[Path, Path | None]:
    p = Path(path)
    if p.is_dir():
        for name in (WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME):
            if (p / name).is_file():
                cfg = p / CONFIG_NAME
                return p / name, cfg if cfg.is_file() else None
        raise CheckpointError(f"{p} holds no {WEIGHTS_NAME} (or {SAFETENSORS_WEIGHTS_NAME})")
    if p.is_file():
        cfg = p.parent / CONFIG_NAME
        return p, cfg if cfg.is_file() else None
    raise CheckpointError(f"open_clip checkpoint not found: {p}")


def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ConfigError(f"cannot read {path}: {why}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def _kind(v: Any) -> str:
    """What a JSON value is, for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(v), f"a {type(v).__name__}")


def _show(v: Any, limit: int = 40) -> str:
    """A config value as JSON (as the file spells it), shortened."""
    return json.dumps(v, default=repr)[:limit]


def _obj(d: dict[str, Any], key: str, where: str, *, null_ok: bool = True) -> dict[str, Any]:
    """``d[key]`` as a JSON object ({} when absent, or null where ``null_ok``); ConfigError naming the key."""
    v = d.get(key)
    if v is None and (null_ok or key not in d):
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}{key} must be a JSON object, got {_kind(v)} ({_show(v)})")
    return v


def _int(v: Any, key: str, minimum: int = 1) -> int:
    if not is_int(v) or v < minimum:
        raise ConfigError(f"{key}={_show(v)} must be an integer >= {minimum}")
    return int(v)


def _eps(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ConfigError(f"{key}={_show(v)} must be a number in (0, 1)")
    return float(v)


def _str(v: Any, key: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{key}={_show(v)} must be a string")
    return v


def _is_bert_name(name: str) -> bool:
    """A Hugging Face model name (or local folder) of a BERT-architecture model (BiomedBERT, PubMedBERT, bert-*)."""
    if _BERT_NAMES.fullmatch(name.rstrip("/").rsplit("/", 1)[-1]):
        return True
    cfg = Path(name) / "config.json"  # a local Hugging Face model folder: its declared architecture
    try:
        return cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "bert"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def _sections(oc: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
    """(model_cfg, vision_cfg, text_cfg, preprocess_cfg, bmclip model_config) of an open_clip_config, each
    checked to be a JSON object (ConfigError naming the key otherwise); absent ones are {}."""
    mc = _obj(oc, "model_cfg", "", null_ok=False) if "model_cfg" in oc else oc
    where = "model_cfg." if "model_cfg" in oc else ""
    v, t = _obj(mc, "vision_cfg", where), _obj(mc, "text_cfg", where)
    pre = _obj(oc, "preprocess_cfg", "")
    saved = _obj(_obj(oc, "bmclip", ""), "model_config", "bmclip.")
    for tower in ("vision", "text"):
        _obj(saved, tower, "bmclip.model_config.")
    return mc, v, t, pre, saved


def _check_supported(oc: dict[str, Any]) -> None:
    """Refuse open_clip configs whose architecture differs from BiomedCLIP's (ConfigError naming the key)."""
    _mc, v, t, pre, _saved = _sections(oc)
    if v and not v.get("timm_model_name"):
        raise ConfigError("model_cfg.vision_cfg.timm_model_name missing: only timm-ViT towers are supported")
    if v.get("timm_pool", "") not in ("", "token"):
        raise ConfigError(f"model_cfg.vision_cfg.timm_pool={v['timm_pool']!r} unsupported (CLS pooling only)")
    if v.get("timm_proj", "linear") != "linear" or v.get("timm_proj_bias", False):
        raise ConfigError("model_cfg.vision_cfg.timm_proj must be 'linear' without bias")
    if t and not t.get("hf_model_name"):
        raise ConfigError("model_cfg.text_cfg.hf_model_name missing: only HF BERT text towers are supported")
    if t:
        name = _str(t["hf_model_name"], "model_cfg.text_cfg.hf_model_name")
        if not _is_bert_name(name):
            raise ConfigError(
                f"model_cfg.text_cfg.hf_model_name={name!r} is not a BERT model: only BERT text towers are "
                f"supported (e.g. {BIOMEDBERT}, microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract, "
                "bert-base-uncased; RoBERTa and others differ in position ids and padding)")
    if t.get("hf_proj_type", "mlp") != "mlp":
        raise ConfigError(f"model_cfg.text_cfg.hf_proj_type={t['hf_proj_type']!r} unsupported (only 'mlp')")
    pooler = t.get("hf_pooler_type", "cls_last_hidden_state_pooler")
    if pooler not in _CLS_POOLERS:
        raise ConfigError(f"model_cfg.text_cfg.hf_pooler_type={pooler!r} unsupported (only [CLS] last hidden state)")
    # bmclip preprocesses images one way (bmclip.model.transforms): a config asking for another would get
    # inputs the model was not trained on, without a word.
    for key, want in (("mean", IMAGE_MEAN), ("std", IMAGE_STD)):
        got = pre.get(key, want)
        ok = (isinstance(got, (list, tuple)) and len(got) == len(want)
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x - w) <= 1e-6
                      for x, w in zip(got, want)))
        if not (ok or got is want):
            raise ConfigError(f"preprocess_cfg.{key}={_show(got, 80)} differs from the image normalisation "
                              f"bmclip applies ({list(want)}): the model would get wrongly normalised images")
    for key, want in (("interpolation", "bicubic"), ("resize_mode", "shortest"), ("mode", "RGB")):
        if pre.get(key, want) != want:
            raise ConfigError(f"preprocess_cfg.{key}={_show(pre[key])} unsupported: bmclip preprocesses "
                              f"with {key} {want!r}")


def _shape(sd: dict[str, Any], key: str, ndim: int, dim: int | None = None):
    if key not in sd:
        raise CheckpointError(f"missing key {key!r}")
    s = tuple(sd[key].shape)
    if len(s) != ndim:
        raise CheckpointError(f"{key!r} has shape {s}, expected a {ndim}-D tensor")
    return s if dim is None else s[dim]


def _count(sd: dict[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _image_size(v_cfg: dict[str, Any], weights_size: int) -> None:
    """vision_cfg.image_size (an int or [h, w]) must be the size the weights' position table is for."""
    if "image_size" not in v_cfg:
        return
    size = v_cfg["image_size"]
    key = "model_cfg.vision_cfg.image_size"
    sides = list(size) if isinstance(size, (list, tuple)) else [size]
    if not 1 <= len(sides) <= 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in sides):
        raise ConfigError(f"{key}={_show(size)} must be an integer (or [height, width])")
    if any(x != weights_size for x in sides):
        raise ConfigError(f"{key}={_show(size)} but the weights (visual.trunk.pos_embed) are for "
                          f"{weights_size}x{weights_size} images: the model would get wrongly sized inputs")


def _vision_heads(v_cfg: dict[str, Any], saved_v: dict[str, Any], patch: int, width: int, layers: int,
                  mlp: int) -> int:
    """The image tower's head count: timm's for a known timm ViT, else the bmclip section's; without any
    config (bare weights) width // 64, as every timm ViT-S/B/L has."""
    key = "model_cfg.vision_cfg.timm_model_name"
    saved = _int(saved_v["heads"], "bmclip.model_config.vision.heads") if "heads" in saved_v else None
    if "timm_model_name" not in v_cfg:
        return saved if saved is not None else max(1, width // 64)
    name = _str(v_cfg["timm_model_name"], key)
    known = _TIMM_KEYS.get(name)
    if known is None:
        if saved is None:
            raise ConfigError(
                f"{key}={name!r} is not a timm ViT bmclip knows (supported: {', '.join(_TIMM_VITS.values())}) and "
                "the config has no bmclip section giving its head count")
        return saved
    if (patch, width, layers, mlp) != known[1:4] + known[5:]:
        raise ConfigError(f"{key}={name!r} has (patch, width, layers, mlp)={known[1:4] + known[5:]} but the weights "
                          f"have {(patch, width, layers, mlp)}")
    if saved is not None and saved != known[4]:
        raise ConfigError(f"bmclip.model_config.vision.heads={saved} but {name} has {known[4]} heads")
    return known[4]


def config_from_open_clip(sd: dict[str, Any], oc: dict[str, Any]):
    """The ModelConfig a released-layout open_clip state dict (+ its open_clip_config.json) describes.

    ConfigError (a bad or unsupported config value) or CheckpointError (a tensor of the wrong shape or a
    missing key) names the key."""
    _check_supported(oc)
    mc, v_cfg, t_cfg, _pre, saved = _sections(oc)
    saved_v, saved_t = _obj(saved, "vision", ""), _obj(saved, "text", "")

    width = _shape(sd, "visual.trunk.cls_token", 3, -1)
    patch = _shape(sd, "visual.trunk.patch_embed.proj.weight", 4, -1)
    n_pos = _shape(sd, "visual.trunk.pos_embed", 3, 1) - 1
    side = int(round(max(n_pos, 0) ** 0.5))
    if n_pos < 1 or side * side != n_pos:
        raise CheckpointError(f"visual.trunk.pos_embed has {n_pos} patch positions, not a square grid")
    _image_size(v_cfg, side * patch)
    layers = _count(sd, r"visual\.trunk\.blocks\.(\d+)\.")
    mlp = _shape(sd, "visual.trunk.blocks.0.mlp.fc1.weight", 2, 0)
    v_heads = _vision_heads(v_cfg, saved_v, patch, width, layers, mlp)
    t_width = _shape(sd, "text.transformer.embeddings.word_embeddings.weight", 2, 1)
    t_heads = max(1, t_width // 64)  # every BERT base/large checkpoint uses 64-wide heads
    if "heads" in saved_t:  # written by export_open_clip: the exact head counts and eps values
        t_heads = _int(saved_t["heads"], "bmclip.model_config.text.heads")
    vision = VisionConfig(
        image_size=side * patch,
        patch_size=patch,
        width=width,
        layers=layers,
        heads=v_heads,
        mlp_dim=mlp,
        ln_eps=_eps(saved_v.get("ln_eps", 1e-6), "bmclip.model_config.vision.ln_eps"),
    )
    max_pos = _shape(sd, "text.transformer.embeddings.position_embeddings.weight", 2, 0)
    ctx_key = "model_cfg.text_cfg.context_length"
    ctx = _int(t_cfg["context_length"], ctx_key, 2) if "context_length" in t_cfg else None
    if "context_length" in saved_t:
        saved_ctx = _int(saved_t["context_length"], "bmclip.model_config.text.context_length", 2)
        if ctx is not None and ctx != saved_ctx:
            raise ConfigError(f"{ctx_key}={ctx} but bmclip.model_config.text.context_length={saved_ctx}")
        ctx = saved_ctx
    if ctx is not None and ctx > max_pos:
        raise ConfigError(f"{ctx_key}={ctx} exceeds the {max_pos} position embeddings of the weights")
    text = TextConfig(
        vocab_size=_shape(sd, "text.transformer.embeddings.word_embeddings.weight", 2, 0),
        width=t_width,
        layers=_count(sd, r"text\.transformer\.encoder\.layer\.(\d+)\."),
        heads=t_heads,
        mlp_dim=_shape(sd, "text.transformer.encoder.layer.0.intermediate.dense.weight", 2, 0),
        max_positions=max_pos,
        type_vocab_size=_shape(sd, "text.transformer.embeddings.token_type_embeddings.weight", 2, 0),
        context_length=ctx if ctx is not None else min(256, max_pos),
        pad_id=_int(saved_t.get("pad_id", 0), "bmclip.model_config.text.pad_id", 0),
        ln_eps=_eps(saved_t.get("ln_eps", 1e-12), "bmclip.model_config.text.ln_eps"),
        proj_hidden=_shape(sd, "text.proj.0.weight", 2, 0),
    )
    embed_dim = _shape(sd, "visual.head.proj.weight", 2, 0)
    if "embed_dim" in mc and _int(mc["embed_dim"], "model_cfg.embed_dim") != embed_dim:
        raise CheckpointError(f"open_clip_config embed_dim={mc['embed_dim']} but visual.head.proj has {embed_dim}")
    cfg = ModelConfig(
        embed_dim=embed_dim,
        vision=vision,
        text=text,
        init_logit_bias=0.0 if "logit_bias" in sd else None,
    )
    cfg.validate()
    return cfg


def _convert_in(sd: dict[str, Any], cfg) -> dict[str, Any]:
    pairs = _pairs(cfg)
    used: set[str] = set()
    out: dict[str, Any] = {}
    for oc_keys, key in pairs:
        for k in oc_keys:
            if k not in sd:
                raise CheckpointError(f"missing key {k!r} in the open_clip checkpoint")
            if not sd[k].is_floating_point():
                raise CheckpointError(f"{k!r} holds {sd[k].dtype} values, expected a floating-point tensor")
        tensors = [sd[k] for k in oc_keys]
        if len(tensors) > 1 and (tensors[0].dim() == 0 or any(x.shape != tensors[0].shape for x in tensors)):
            shapes = ", ".join(f"{k!r} {tuple(x.shape)}" for k, x in zip(oc_keys, tensors))
            raise CheckpointError(f"query/key/value shapes differ or are scalars: {shapes}")
        t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        if key in ("logit_scale", "logit_bias"):
            if t.numel() != 1:
                raise CheckpointError(f"{oc_keys[0]!r} has shape {tuple(t.shape)}, expected a scalar")
            t = t.reshape(())  # open_clip may store [1] (nonscalar_logit_scale)
        out[key] = t.float()
        used.update(oc_keys)
    for k in sd:
        if k not in used and not _TOLERATED.fullmatch(k):
            raise CheckpointError(f"unexpected key {k!r} in the open_clip checkpoint (not part of BiomedCLIP)")
    return out


def load_open_clip(path: str | os.PathLike, map_location: Any = "cpu"):
    """Load open_clip BiomedCLIP weights (folder with open_clip_pytorch_model.bin + open_clip_config.json,
    or the .bin itself) into a native ``BiomedCLIP`` (eval mode) with identical encode_image/encode_text
    outputs. Tolerates BERT pooler weights and position_ids buffers; any other unknown or missing key
    raises CheckpointError naming it, a bad or unsupported config value ConfigError naming the file and key.
    ``map_location``: where the weights go, as for ``torch.load`` (also for a ``.safetensors`` weights file)."""
    weights, cfg_path = _locate(path)
    sd = load_state_dict(weights, map_location)
    oc = _read_config(cfg_path)
    try:
        cfg = config_from_open_clip(sd, oc)
        ours = _convert_in(sd, cfg)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path or weights}: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    # Build on the meta device and adopt the loaded tensors: no 196M-parameter random init to throw away.
    with torch.device("meta"):
        model = BiomedCLIP(cfg)
    expected = model.state_dict()
    for k, v in ours.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{weights}: {k!r}: checkpoint shape {tuple(v.shape)} != model shape "
                                  f"{tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise CheckpointError(f"{weights}: missing key {missing[0]!r} for the model")
    model.load_state_dict({k: v.contiguous() for k, v in ours.items()}, strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------------ export


def open_clip_state_dict(model) -> dict[str, Any]:
    """The model's weights under open_clip ``CustomTextCLIP`` key names (q/k/v split back out)."""
    sd = model.state_dict()
    out: dict[str, Any] = {}
    for oc_keys, key in _pairs(model.config):
        t = sd[key].detach()
        t = t if t.is_meta else t.cpu()  # meta: shapes only (config inspection without weights)
        if len(oc_keys) == 1:
            out[oc_keys[0]] = t.clone()
        else:
            for k, part in zip(oc_keys, t.chunk(3, dim=0)):
                out[k] = part.clone()
    return out


def open_clip_config(model) -> dict[str, Any]:
    """open_clip_config.json contents for this model (released BiomedCLIP format + a ``bmclip`` section)."""
    cfg = model.config
    v, t = cfg.vision, cfg.text
    key = (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_dim)
    timm_name = _TIMM_VITS.get(key)
    if timm_name is None:
        raise ConfigError(
            f"vision tower (image_size, patch, width, layers, heads, mlp)={key} matches no timm ViT that "
            f"open_clip can build (supported: {', '.join(_TIMM_VITS.values())})"
        )
    bert_base = (30522, 768, 12, 12, 3072, 512, 2)
    got = (t.vocab_size, t.width, t.layers, t.heads, t.mlp_dim, t.max_positions, t.type_vocab_size)
    if got != bert_base or v.ln_eps != 1e-6 or t.ln_eps != 1e-12 or t.pad_id != 0:
        raise ConfigError(
            f"text tower (vocab, width, layers, heads, mlp, max_positions, type_vocab)={got} is not "
            f"BiomedBERT-base {bert_base}: open_clip would build a different model from {BIOMEDBERT}"
        )
    if t.proj_hidden != (t.width + cfg.embed_dim) // 2:
        raise ConfigError(
            f"text.proj_hidden={t.proj_hidden}: open_clip's MLP projection uses (width + embed_dim) // 2 = "
            f"{(t.width + cfg.embed_dim) // 2}"
        )
    model_cfg: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "timm_model_name": timm_name,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": v.image_size,
        },
        "text_cfg": {
            "hf_model_name": BIOMEDBERT,
            "hf_tokenizer_name": BIOMEDBERT,
            # The weights come from this file: open_clip need not fetch BiomedBERT's pretrained weights.
            "hf_model_pretrained": False,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": t.context_length,
        },
    }
    if cfg.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    return {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
        "bmclip": {"model_config": cfg.to_dict()},
    }


def _not_an_export(folder: Path) -> str | None:
    """Why the existing folder ``folder`` is not an earlier export (holding nothing else, so safe to replace as a
    whole), or None when it is one (or empty)."""
    names = sorted(n for n in os.listdir(folder) if not _ATOMIC_TEMP.fullmatch(n))  # skip interrupted writes
    if not names:
        return None
    foreign = [n for n in names if n not in _EXPORT_FILES or (folder / n).is_symlink() or not (folder / n).is_file()]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        return f"holds files that are not part of an open_clip export ({shown})"
    try:
        d = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        d = None
    if not (isinstance(d, dict) and isinstance(d.get("bmclip"), dict) and "model_config" in d["bmclip"]):
        return f"has no {CONFIG_NAME} written by a bmclip export (an interrupted or foreign export?)"
    return None


def check_export_folder(folder: str | os.PathLike) -> Path:
    """The absolute folder ``export_open_clip(model, folder)`` would write; ConfigError when it may not: the
    path is empty, the current folder or one above it, an existing file, or an existing folder that is not
    an earlier export (``export_open_clip`` replaces a folder as a whole, and never deletes other files)."""
    if not str(folder):
        raise ConfigError("the export folder is an empty path: name the folder to write")
    target = Path(folder).resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise ConfigError(f"{folder}: refusing to export into the current folder or one above it (an export "
                          "replaces the whole folder): name a new folder")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{folder} exists and is not a folder: name a new folder (or an earlier export)")
    if target.is_dir() and (why := _not_an_export(target)):
        raise ConfigError(f"{folder} exists and {why}: refusing to replace it; name a new folder or remove it")
    above = target.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"{folder}: {above} is a file, not a folder")
    return target


def _remove_stale_temps(target: Path) -> None:
    """Remove hidden temp dirs of ``target``'s earlier exports whose process is gone (killed mid-export)."""
    remove_dead_owners(target.parent, rf"\.{re.escape(target.name)}\.export-(?P<pid>\d+)\..+\.tmp")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(new: Path, target: Path) -> Path | None:
    """Put folder ``new`` at ``target`` (both in one parent folder), replacing what is there in one step where
    the system can swap folders; returns the path that now holds the replaced folder (to delete), or None."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return None
    if _exchange(new, target):
        return new
    old = new.with_name(new.name[: -len(".tmp")] + ".old.tmp")  # still matched by _remove_stale_temps
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def export_open_clip(model, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``open_clip_pytorch_model.bin`` + ``open_clip_config.json`` into ``folder`` so that open_clip
    loads this model with identical outputs.

    With ``tokenizer`` (the vocabulary the model was trained with) the folder also holds that tokenizer:
    ``vocab.txt`` + ``bmclip_tokenizer.json`` + the Hugging Face files that make the folder itself a BERT
    tokenizer (its length that of the model's ``text.context_length``), and the config's
    ``text_cfg.hf_tokenizer_name`` names this folder, so ``open_clip.get_tokenizer("local-dir:FOLDER")``
    tokenizes with the shipped vocabulary. Without one (weights converted from the released BiomedCLIP) the
    config names BiomedBERT's hub tokenizer, the vocabulary those weights were trained with.

    The folder is built as a hidden temp folder beside ``folder`` and moved into place at the end: an
    interrupted export leaves the earlier folder (or nothing) at ``folder``, and the next export removes the
    temp folder. An existing ``folder`` is replaced only when it is an earlier export (or empty); anything
    else is a ConfigError (see ``check_export_folder``), as is a tokenizer with more ids than the model's
    text vocabulary.

    open_clip's tokenizer always applies its text cleaning (ftfy, HTML unescape, whitespace); a tokenizer
    with ``clean=False`` is exported with a warning, since open_clip's ids then differ on text that cleaning
    changes (curly quotes, HTML entities, unusual whitespace)."""
    config = open_clip_config(model)  # validates before anything is written
    text = model.config.text
    if tokenizer is not None:
        if tokenizer.vocab_size > text.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but the model's text.vocab_size is "
                              f"{text.vocab_size}: ids past {text.vocab_size - 1} have no embedding")
        if not getattr(tokenizer, "clean", True):
            warnings.warn("export_open_clip: the tokenizer has clean=False but open_clip's tokenizer always "
                          "cleans text (ftfy, HTML unescape, whitespace): ids differ on text that cleaning "
                          "changes", stacklevel=2)
        if tokenizer.context_length != text.context_length:  # open_clip tokenizes to text_cfg.context_length
            from bmclip.tokenizer import Tokenizer

            tokenizer = Tokenizer(tokenizer.vocab, text.context_length, clean=tokenizer.clean)
    target = check_export_folder(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    while True:  # a hidden temp folder beside the target (mkdir's permissions, unlike mkdtemp's 0700)
        tmp = target.parent / f".{target.name}.export-{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    leftover: Path | None = tmp
    try:
        if tokenizer is not None:
            tokenizer.save(tmp)
            tokenizer.save_hf_files(tmp)
            config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = str(target)
            config["bmclip"]["tokenizer"] = {"vocab": "vocab.txt", "context_length": tokenizer.context_length,
                                             "vocab_size": tokenizer.vocab_size}
        save_state_dict(open_clip_state_dict(model), tmp / WEIGHTS_NAME)
        atomic_write_text(json.dumps(config, indent=2), tmp / CONFIG_NAME)
        fsync_dir(tmp)
        check_export_folder(folder)  # again: the folder may have changed while the weights were written
        leftover = _replace_dir(tmp, target)
        fsync_dir(target.parent)
    finally:
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)
    return Path(folder)
