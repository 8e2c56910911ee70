"""A ``BiomedCLIP`` from a native model file (the layout is ``bmclip.io.model_file``'s)."""

from __future__ import annotations

import os
from typing import Any

import torch

from bmclip.errors import BmclipError, CheckpointError
from bmclip.io.model_file import read_model_file
from bmclip.model.clip import BiomedCLIP
from bmclip.model.config import ModelConfig

__all__ = ["RUNTIME_DEFAULTS", "build_model", "load_model"]


# Settings that change how a model runs, never its weights (the attention kernels, the fused LayerNorm / bias-GELU,
# gradient checkpointing): a training run's choices, some of them CUDA-only. A loaded model gets these defaults,
# so a file trained with --model.fused_ops=true or a Triton attention backend runs on any device.
RUNTIME_DEFAULTS: dict[str, Any] = {"attn_backend": "auto", "image_attn_backend": None, "text_attn_backend": None,
                                    "fused_ops": False, "grad_checkpointing": False}


def build_model(model_config: dict[str, Any], state_dict: dict[str, Any], source: str | os.PathLike) -> BiomedCLIP:
    """A ``BiomedCLIP`` (eval mode, float32) from a config dict and matching weights; ``source`` names them in errors.

    The model is built on the meta device and adopts the tensors (no random initialisation to throw
    away); a missing, unexpected or wrongly shaped key raises CheckpointError naming it. Half-precision weights
    are taken as float32, as ``load_open_clip`` takes them (a bf16 model fed float32 images failed in every
    command), and the runtime settings are ``RUNTIME_DEFAULTS`` whatever the file says (``create_model`` or
    ``model.config`` changes them on purpose).
    """
    if isinstance(model_config, dict):
        model_config = {**model_config, **RUNTIME_DEFAULTS}
    try:
        cfg = ModelConfig.from_dict(model_config)
    except BmclipError as e:
        raise CheckpointError(f"{source}: bad model_config ({e})") from None
    with torch.device("meta"):
        model = BiomedCLIP(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
    for k, v in state_dict.items():
        if k not in expected:
            raise CheckpointError(f"{source}: unexpected key {k!r}")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: {k!r} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}")
    state_dict = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def load_model(path: str | os.PathLike, map_location: Any = "cpu", *, verify: bool = True) -> BiomedCLIP:
    """Rebuild the ``BiomedCLIP`` (eval mode) saved in the model file ``path`` (``verify``: see read_model_file)."""
    config, sd = read_model_file(path, map_location, verify=verify)
    return build_model(config, sd, path)
