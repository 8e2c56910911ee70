"""Shared Triton helpers: is Triton importable, is it interpreting, can it run on given tensors.

Imports only the standard library, torch and (optionally) triton, so that ``bmclip.kernels`` can be
lifted into other projects as a folder.
"""

from __future__ import annotations

import inspect
import os

import torch

try:  # Triton is optional: the torch backends work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install raising at import
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = [
    "HAS_TRITON",
    "DOT_HAS_INPUT_PRECISION",
    "interpret_env",
    "is_interpreted",
    "require_triton",
    "triton_available_for",
]


def interpret_env() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter (same truth values Triton accepts)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_interpreted(kernel) -> bool:
    """True when a ``@triton.jit`` kernel was decorated in interpreter mode (its launches run on CPU).

    Triton decides this once, when the decorator runs, so the kernel object is the ground truth even
    if TRITON_INTERPRET changed afterwards. Autotuner wrappers are unwrapped.
    """
    fn = kernel
    while hasattr(fn, "fn") and type(fn).__name__ == "Autotuner":
        fn = fn.fn
    return type(fn).__name__ == "InterpretedFunction"


def _dot_has_input_precision() -> bool:
    if not HAS_TRITON:
        return False
    try:
        return "input_precision" in inspect.signature(tl.dot).parameters
    except (TypeError, ValueError):  # builtins without a signature: assume the modern kwarg
        return True


# Triton >= 3.0 spells "no TF32 for fp32 operands" as input_precision="ieee"; older ones as
# allow_tf32=False. Kernels pick the spelling through a constexpr so the other one is never compiled.
DOT_HAS_INPUT_PRECISION: bool = _dot_has_input_precision()


def triton_available_for(kernel, *tensors: torch.Tensor) -> tuple[bool, str]:
    """Whether ``kernel`` can run on ``tensors`` here; returns (ok, reason-if-not)."""
    if not HAS_TRITON:
        return False, f"Triton is not importable ({TRITON_IMPORT_ERROR}); install the 'triton' extra"
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return False, f"inputs are on several devices {sorted(map(str, devices))}; put them on one"
    (device,) = devices
    if is_interpreted(kernel):
        if device.type != "cpu":
            return False, (
                "Triton kernels were compiled in interpreter mode (TRITON_INTERPRET=1 at import); "
                f"the interpreter runs on CPU tensors, got tensors on {device}"
            )
        return True, ""
    if device.type != "cuda":
        return False, (
            f"the Triton backend needs CUDA tensors (got {device}); on CPU either use backend='torch' "
            "or set TRITON_INTERPRET=1 before importing bmclip.kernels to run Triton's interpreter"
        )
    if not torch.cuda.is_available():
        return False, "torch reports no usable CUDA device"
    return True, ""


def require_triton(kernel, *tensors: torch.Tensor, what: str = "backend='triton'") -> None:
    """Raise RuntimeError saying why, if ``kernel`` cannot run on ``tensors`` (never falls back)."""
    ok, reason = triton_available_for(kernel, *tensors)
    if not ok:
        raise RuntimeError(f"{what} cannot run here: {reason}")
