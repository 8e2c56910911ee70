"""The one attention switch both towers call: ``attention(q, k, v, backend=..., key_padding_mask=...)``.

Backends are looked up by name in ``_BACKENDS``. Only ``"sdpa"`` (torch
``scaled_dot_product_attention``) is implemented here; other backends (Triton flash attention,
xformers) are added to the registry with ``register_backend``. Asking for a backend that is not
registered raises ConfigError: there is no silent fallback.

``"auto"`` is not a backend but a choice made per tower and device by ``resolve_backend``: on CUDA the image
tower (fixed-length ViT sequences) runs SDPA, which picks cuDNN or flash attention itself, and the text tower
runs Triton flash attention on its unpadded (packed) tokens when compiled Triton kernels can run there; on
any other device both run SDPA. An explicit name always runs that backend or raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from bmclip.errors import ConfigError

# A backend computes softmax(q k^T / sqrt(dh) + mask) v on (B, H, L, dh) tensors.
# key_padding_mask: bool (B, Lk), True where the key is a real token (attended), False for padding.
AttentionFn = Callable[..., torch.Tensor]


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    mask = None
    if key_padding_mask is not None:
        # Boolean (B, 1, 1, Lk) mask broadcast over heads and queries: True = attend.
        mask = key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


_BACKENDS: dict[str, AttentionFn] = {"sdpa": _sdpa}
AUTO = "auto"
TOWERS = ("image", "text")


def register_backend(name: str, fn: AttentionFn) -> None:
    """Make ``fn(q, k, v, *, key_padding_mask=None, dropout_p=0.0)`` available as backend ``name``."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    """Names of the attention backends registered in this process."""
    return list(_BACKENDS)


def check_backend(name: str) -> str:
    """Return ``name`` if it is a registered backend or ``"auto"``, else raise ConfigError naming it."""
    if name != AUTO and (not isinstance(name, str) or name not in _BACKENDS):
        raise ConfigError(f"attn_backend={name!r} is not available (choose {AUTO!r} or a registered backend: "
                          f"{', '.join(_BACKENDS)})")
    return name


def _auto_text_triton(device: torch.device) -> bool:
    """Whether "auto" runs the text tower through Triton on ``device``: CUDA, with compiled kernels usable."""
    if device.type != "cuda" or "triton" not in _BACKENDS:
        return False
    # start-up cost: bmclip.kernels imports Triton and torch._dynamo (~1 s); the SDPA path never needs them
    from bmclip.kernels.flash_attention import triton_usable_on

    return triton_usable_on(device)


def resolve_backend(name: str, tower: str, device: torch.device | str) -> str:
    """The registered backend that tower ``tower`` ("image" or "text") runs for setting ``name`` on ``device``.

    An explicit name is returned as is (ConfigError if not registered); ``"auto"`` gives ``"triton"`` for the
    text tower on CUDA when compiled Triton kernels can run there, ``"sdpa"`` otherwise.
    """
    if tower not in TOWERS:
        raise ConfigError(f"tower must be one of {TOWERS}, got {tower!r}")
    check_backend(name)
    if name != AUTO:
        return name
    if tower == "text" and _auto_text_triton(torch.device(device)):
        return "triton"
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "sdpa",
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    tower: str = "image",
) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, L, dh) q/k/v -> (B, H, L, dh), via the named backend.

    ``key_padding_mask`` is bool (B, Lk), True for keys that are attended (real tokens). ``backend="auto"``
    runs what ``resolve_backend("auto", tower, q.device)`` picks.
    """
    if backend == AUTO:
        backend = resolve_backend(backend, tower, q.device)
    try:
        fn = _BACKENDS[backend]
    except (KeyError, TypeError):
        check_backend(backend)  # raises ConfigError with the list of registered names
        raise
    return fn(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
