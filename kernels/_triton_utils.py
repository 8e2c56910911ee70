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
    "AUTOTUNE_MAX_CONFIGS_ENV",
    "BackendUnavailable",
    "HAS_TRITON",
    "DOT_HAS_INPUT_PRECISION",
    "autotune_limit",
    "interpreter_problem",
    "is_interpreted",
    "require_triton",
    "triton_available_for",
]


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend (``backend="triton"``, ``"xformers"``, ...) cannot run here.

    The one exception type every kernel family raises for that (never a silent fallback); the message says why.
    """


def is_interpreted(kernel) -> bool:
    """True when a ``@triton.jit`` kernel was decorated in interpreter mode (its launches run on CPU).

    Triton decides this once, when the decorator runs, so the kernel object is the ground truth even
    if TRITON_INTERPRET changed afterwards. Autotuner wrappers are unwrapped.
    """
    fn = kernel
    while hasattr(fn, "fn") and type(fn).__name__ == "Autotuner":
        fn = fn.fn
    return type(fn).__name__ == "InterpretedFunction"


AUTOTUNE_MAX_CONFIGS_ENV = "BMCLIP_AUTOTUNE_MAX_CONFIGS"


def autotune_limit(configs: list) -> list:
    """The first N of an (already pruned) autotune config list when BMCLIP_AUTOTUNE_MAX_CONFIGS=N, else all.

    Triton's autotuner compiles every config serially on the first call per key (~1 s each; a flash-attention
    case has 48), so a GPU correctness run that only checks numerics sets N=1 and compiles one config per
    kernel and specialisation. Unset (the default) tunes over the full list. A value that is not a positive
    integer raises ValueError rather than being ignored.
    """
    raw = os.environ.get(AUTOTUNE_MAX_CONFIGS_ENV, "").strip()
    if not raw:
        return configs
    n = int(raw) if raw.isdigit() else 0
    if n < 1:
        raise ValueError(f"{AUTOTUNE_MAX_CONFIGS_ENV} must be a positive integer, got {raw!r}")
    return configs[:n]


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


if HAS_TRITON:

    @triton.jit
    def _interpreter_probe_kernel(out_ptr, n):
        # A loop bound that is a runtime scalar argument: every kernel here has one (range(0, N, BN)).
        acc = tl.zeros((1,), dtype=tl.int32)
        for _i in range(0, n):
            acc += 1
        tl.store(out_ptr + tl.arange(0, 1), acc)


_INTERPRETER_PROBLEM: list[str | None] = []  # computed once per process


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels here, or None if it can (checked once, on CPU).

    Triton 3.6's interpreter turns a scalar kernel argument used as a loop bound into a 1-element array and
    calls int() on it, which NumPy >= 2.4 refuses (Triton 3.8 squeezes it first); such a launch would fail deep
    inside the interpreter. A tiny probe kernel finds out (feature detection, not a version table).
    """
    if not _INTERPRETER_PROBLEM:
        problem = None
        if not HAS_TRITON:
            problem = f"Triton is not importable ({TRITON_IMPORT_ERROR})"
        elif is_interpreted(_interpreter_probe_kernel):
            out = torch.zeros(1, dtype=torch.int32)
            try:
                _interpreter_probe_kernel[(1,)](out, 3)
                if int(out[0]) != 3:
                    problem = f"a probe loop of 3 iterations counted {int(out[0])}"
            except Exception as exc:  # InterpreterError wrapping numpy's TypeError, or anything else
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                import numpy  # only to name its version here: bmclip.kernels itself needs only torch and triton

                problem = (f"Triton {triton.__version__}'s CPU interpreter cannot run with NumPy {numpy.__version__} "
                           f"({problem}); use NumPy < 2.4 with this Triton, or a newer Triton (3.8 works)")
        _INTERPRETER_PROBLEM.append(problem)
    return _INTERPRETER_PROBLEM[0]


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
        problem = interpreter_problem()
        if problem is not None:
            return False, problem
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
    """Raise BackendUnavailable saying why, if ``kernel`` cannot run on ``tensors`` (never falls back)."""
    ok, reason = triton_available_for(kernel, *tensors)
    if not ok:
        raise BackendUnavailable(f"{what} cannot run here: {reason}")
