"""Native PyTorch BiomedCLIP: configs/presets, the two towers and ``create_model``.

``IMAGE_MEAN`` / ``IMAGE_STD`` are re-exported from ``bmclip.data.images`` (their one definition).
"""

from bmclip.data.images import IMAGE_MEAN, IMAGE_STD
from bmclip.model.attention import attention, available_backends, register_backend
from bmclip.model.clip import BiomedCLIP, create_model
from bmclip.model.config import ModelConfig, TextConfig, VisionConfig, get_preset, list_presets
from bmclip.model.unpad import register_flash_backends

# "triton" and "xformers" (bmclip.kernels.flash_attention) join the attention switch beside "sdpa".
register_flash_backends()

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "BiomedCLIP",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "attention",
    "available_backends",
    "create_model",
    "get_preset",
    "list_presets",
    "register_backend",
]
