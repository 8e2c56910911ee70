"""A ``BiomedCLIP`` from a native model file (the layout is ``bmclip.io.model_file``'s)."""

from __future__ import annotations

import os
from typing import Any

import torch

from bmclip.errors import BmclipError, CheckpointError
from bmclip.io.model_file import read_model_file
from bmclip.model.clip import BiomedCLIP
from bmclip.model.config import ModelConfig

__all__ = ["build_model", "load_model"]


def build_model(model_config: dict[str, Any], state_dict: dict[str, Any], source: str | os.PathLike) -> BiomedCLIP:
    """A ``BiomedCLIP`` (eval mode) from a config dict and matching weights; ``source`` names them in errors.

    The model is built on the meta device and adopts the tensors (no random initialisation to throw
    away); a missing, unexpected or wrongly shaped key raises CheckpointError naming it.
    """
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
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def load_model(path: str | os.PathLike, map_location: Any = "cpu", *, verify: bool = True) -> BiomedCLIP:
    """Rebuild the ``BiomedCLIP`` (eval mode) saved in the model file ``path`` (``verify``: see read_model_file)."""
    config, sd = read_model_file(path, map_location, verify=verify)
    return build_model(config, sd, path)
