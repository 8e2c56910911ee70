"""open_clip checkpoint interop: load the released BiomedCLIP files into the native model, and export back.

The released layout is a folder with ``open_clip_pytorch_model.bin`` (open_clip ``CustomTextCLIP``:
timm ``vit_base_patch16_224`` trunk under ``visual.trunk``, linear ``visual.head.proj``, HF BERT under
``text.transformer``, MLP ``text.proj.{0,2}``, ``logit_scale``) and ``open_clip_config.json``.
Nothing is downloaded and no open_clip/timm/transformers code is needed at run time.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from bmclip.data.images import IMAGE_MEAN, IMAGE_STD
from bmclip.errors import CheckpointError, ConfigError
from bmclip.io import atomic_write_text
from bmclip.io.model_file import load_state_dict, save_state_dict
from bmclip.model.clip import BiomedCLIP
from bmclip.model.config import ModelConfig, TextConfig, VisionConfig

__all__ = ["export_open_clip", "load_open_clip", "open_clip_config", "open_clip_state_dict"]

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
_TIMM_HEADS = {name: key[4] for key, name in _TIMM_VITS.items()}

# Keys an open_clip checkpoint may hold that carry nothing the model uses: the BERT tanh pooler
# (BiomedCLIP pools the raw [CLS] state) and the position/token-type id buffers of older transformers.
_TOLERATED = re.compile(r"text\.transformer\.(pooler\.dense\.(weight|bias)|embeddings\.(position_ids|token_type_ids))")
# Text poolers equivalent to ours (last hidden state at [CLS], no tanh pooler).
_CLS_POOLERS = ("cls_last_hidden_state_pooler", "cls_last_hidden_state")


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
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def _check_supported(oc: dict[str, Any]) -> None:
    """Refuse open_clip configs whose architecture differs from BiomedCLIP's (ConfigError naming the key)."""
    mc = oc.get("model_cfg", oc)
    v, t = mc.get("vision_cfg", {}) or {}, mc.get("text_cfg", {}) or {}
    if v and not v.get("timm_model_name"):
        raise ConfigError("model_cfg.vision_cfg.timm_model_name missing: only timm-ViT towers are supported")
    if v.get("timm_pool", "") not in ("", "token"):
        raise ConfigError(f"model_cfg.vision_cfg.timm_pool={v['timm_pool']!r} unsupported (CLS pooling only)")
    if v.get("timm_proj", "linear") != "linear" or v.get("timm_proj_bias", False):
        raise ConfigError("model_cfg.vision_cfg.timm_proj must be 'linear' without bias")
    if t and not t.get("hf_model_name"):
        raise ConfigError("model_cfg.text_cfg.hf_model_name missing: only HF BERT text towers are supported")
    if t.get("hf_proj_type", "mlp") != "mlp":
        raise ConfigError(f"model_cfg.text_cfg.hf_proj_type={t['hf_proj_type']!r} unsupported (only 'mlp')")
    pooler = t.get("hf_pooler_type", "cls_last_hidden_state_pooler")
    if pooler not in _CLS_POOLERS:
        raise ConfigError(f"model_cfg.text_cfg.hf_pooler_type={pooler!r} unsupported (only [CLS] last hidden state)")


def _shape(sd: dict[str, Any], key: str, dim: int | None = None):
    if key not in sd:
        raise CheckpointError(f"missing key {key!r}")
    s = tuple(sd[key].shape)
    return s if dim is None else s[dim]


def _count(sd: dict[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def config_from_open_clip(sd: dict[str, Any], oc: dict[str, Any]):
    """The ModelConfig a released-layout open_clip state dict (+ its open_clip_config.json) describes."""
    _check_supported(oc)
    mc = oc.get("model_cfg", oc)
    saved = oc.get("bmclip", {}).get("model_config") if isinstance(oc.get("bmclip"), dict) else None
    v_cfg, t_cfg = mc.get("vision_cfg", {}) or {}, mc.get("text_cfg", {}) or {}

    width = _shape(sd, "visual.trunk.cls_token", -1)
    patch = _shape(sd, "visual.trunk.patch_embed.proj.weight", -1)
    n_pos = _shape(sd, "visual.trunk.pos_embed", 1) - 1
    side = int(round(n_pos**0.5))
    if side * side != n_pos:
        raise CheckpointError(f"visual.trunk.pos_embed has {n_pos} patch positions, not a square grid")
    v_heads = _TIMM_HEADS.get(v_cfg.get("timm_model_name", ""), max(1, width // 64))
    t_width = _shape(sd, "text.transformer.embeddings.word_embeddings.weight", 1)
    t_heads = max(1, t_width // 64)  # every BERT base/large checkpoint uses 64-wide heads
    if saved:  # written by export_open_clip: the exact head counts and eps values
        v_heads = saved.get("vision", {}).get("heads", v_heads)
        t_heads = saved.get("text", {}).get("heads", t_heads)
    vision = VisionConfig(
        image_size=side * patch,
        patch_size=patch,
        width=width,
        layers=_count(sd, r"visual\.trunk\.blocks\.(\d+)\."),
        heads=v_heads,
        mlp_dim=_shape(sd, "visual.trunk.blocks.0.mlp.fc1.weight", 0),
        ln_eps=(saved or {}).get("vision", {}).get("ln_eps", 1e-6),
    )
    max_pos = _shape(sd, "text.transformer.embeddings.position_embeddings.weight", 0)
    ctx = (saved or {}).get("text", {}).get("context_length") or t_cfg.get("context_length") or 256
    text = TextConfig(
        vocab_size=_shape(sd, "text.transformer.embeddings.word_embeddings.weight", 0),
        width=t_width,
        layers=_count(sd, r"text\.transformer\.encoder\.layer\.(\d+)\."),
        heads=t_heads,
        mlp_dim=_shape(sd, "text.transformer.encoder.layer.0.intermediate.dense.weight", 0),
        max_positions=max_pos,
        type_vocab_size=_shape(sd, "text.transformer.embeddings.token_type_embeddings.weight", 0),
        context_length=min(int(ctx), max_pos),
        pad_id=(saved or {}).get("text", {}).get("pad_id", 0),
        ln_eps=(saved or {}).get("text", {}).get("ln_eps", 1e-12),
        proj_hidden=_shape(sd, "text.proj.0.weight", 0),
    )
    embed_dim = _shape(sd, "visual.head.proj.weight", 0)
    if "embed_dim" in mc and int(mc["embed_dim"]) != embed_dim:
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
        tensors = [sd[k] for k in oc_keys]
        t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        if key in ("logit_scale", "logit_bias"):
            if t.numel() != 1:
                raise CheckpointError(f"{oc_keys[0]!r} has shape {tuple(t.shape)}, expected a scalar")
            t = t.reshape(())  # open_clip may store [1] (nonscalar_logit_scale)
        out[key] = t.float() if t.is_floating_point() else t
        used.update(oc_keys)
    for k in sd:
        if k not in used and not _TOLERATED.fullmatch(k):
            raise CheckpointError(f"unexpected key {k!r} in the open_clip checkpoint (not part of BiomedCLIP)")
    return out


def load_open_clip(path: str | os.PathLike):
    """Load open_clip BiomedCLIP weights (folder with open_clip_pytorch_model.bin + open_clip_config.json,
    or the .bin itself) into a native ``BiomedCLIP`` (eval mode) with identical encode_image/encode_text
    outputs. Tolerates BERT pooler weights and position_ids buffers; any other unknown or missing key
    raises CheckpointError naming it."""
    weights, cfg_path = _locate(path)
    sd = load_state_dict(weights)
    cfg = config_from_open_clip(sd, _read_config(cfg_path))
    ours = _convert_in(sd, cfg)
    # Build on the meta device and adopt the loaded tensors: no 196M-parameter random init to throw away.
    with torch.device("meta"):
        model = BiomedCLIP(cfg)
    expected = model.state_dict()
    for k, v in ours.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{k!r}: checkpoint shape {tuple(v.shape)} != model shape {tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise CheckpointError(f"missing key {missing[0]!r} for the model")
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


def export_open_clip(model, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``open_clip_pytorch_model.bin`` + ``open_clip_config.json`` into ``folder`` so that open_clip
    loads this model with identical outputs.

    With ``tokenizer`` (the vocabulary the model was trained with) the folder also holds that tokenizer:
    ``vocab.txt`` + ``bmclip_tokenizer.json`` + the Hugging Face files that make the folder itself a BERT
    tokenizer, and the config's ``text_cfg.hf_tokenizer_name`` names this folder, so
    ``open_clip.get_tokenizer("local-dir:FOLDER")`` tokenizes with the shipped vocabulary. Without one
    (weights converted from the released BiomedCLIP) the config names BiomedBERT's hub tokenizer, the
    vocabulary those weights were trained with.

    open_clip's tokenizer always applies its text cleaning (ftfy, HTML unescape, whitespace); a tokenizer
    with ``clean=False`` is exported with a warning, since open_clip's ids then differ on text that cleaning
    changes (curly quotes, HTML entities, unusual whitespace)."""
    config = open_clip_config(model)  # validates before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and not getattr(tokenizer, "clean", True):
        warnings.warn("export_open_clip: the tokenizer has clean=False but open_clip's tokenizer always cleans "
                      "text (ftfy, HTML unescape, whitespace): ids differ on text that cleaning changes",
                      stacklevel=2)
    if tokenizer is not None:
        tokenizer.save(folder)
        tokenizer.save_hf_files(folder)
        text_cfg = config["model_cfg"]["text_cfg"]
        text_cfg["hf_tokenizer_name"] = str(folder.resolve())
        config["bmclip"]["tokenizer"] = {"vocab": "vocab.txt", "context_length": tokenizer.context_length,
                                         "vocab_size": tokenizer.vocab_size}
    save_state_dict(open_clip_state_dict(model), folder / WEIGHTS_NAME)
    atomic_write_text(json.dumps(config, indent=2), folder / CONFIG_NAME)
    return folder
