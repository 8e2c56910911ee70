"""Training: ``bmclip train`` (config, loop, checkpoints, distributed, metrics).

``bmclip.train.config`` is light (standard library and PyYAML); the loop and everything under it import torch,
so ``train`` imports its module on first call and ``bmclip train --print-config`` stays fast.
"""

from __future__ import annotations

from bmclip.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "train"]


def train(cfg: TrainConfig) -> dict:
    """``bmclip.train.trainer.train``: run training as configured; returns the run's summary dict."""
    from bmclip.train.trainer import train as run  # start-up cost: torch (see the module docstring)

    return run(cfg)
