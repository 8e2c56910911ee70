"""Training: ``bmclip train`` (config, loop, checkpoints, distributed, metrics).

Heavy modules (torch) are imported by the submodules, not here, so ``bmclip.train.config`` stays light.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "load_config", "train"]


def __getattr__(name: str):
    if name in ("TrainConfig", "load_config"):
        from bmclip.train import config

        return getattr(config, name)
    if name == "train":
        from bmclip.train.trainer import train

        return train
    raise AttributeError(f"module 'bmclip.train' has no attribute {name!r}")
