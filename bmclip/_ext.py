"""Import of the compiled extension ``bmclip._C`` with an actionable error when it is not built."""

from __future__ import annotations

from types import ModuleType

_BUILD_HINT = (
    "bmclip's C++ extension (bmclip._C) is not built or failed to load: {err}. "
    "Build it with `pip install --no-build-isolation -e .` from the repository root "
    "(needs cmake, a C++17 compiler, libjpeg-turbo and libpng development headers: "
    "`apt-get install cmake g++ libjpeg62-turbo-dev libpng-dev`)."
)


def load_ext() -> ModuleType:
    """Return the ``bmclip._C`` module; raise ImportError explaining how to build it if missing."""
    try:
        import bmclip._C as _C  # optional: the compiled extension may not be built
    except ImportError as err:
        raise ImportError(_BUILD_HINT.format(err=err)) from err
    return _C
