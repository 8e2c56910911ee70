"""Native PyTorch BiomedCLIP: configs/presets, the two towers and ``create_model``."""

from bmclip.model.attention import attention, available_backends, register_backend
from bmclip.model.clip import BiomedCLIP, create_model
from bmclip.model.config import ModelConfig, TextConfig, VisionConfig, get_preset, list_presets
from bmclip.model.unpad import register_flash_backends

# "triton" and "xformers" (bmclip.kernels.flash_attention) join the attention switch beside "sdpa".
register_flash_backends()

# Image normalisation of BiomedCLIP (open_clip's OpenAI CLIP mean/std), per RGB channel.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

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
