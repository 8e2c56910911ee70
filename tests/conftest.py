"""Test-wide set-up: Triton runs under its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit function is first executed, so it is set
here, before test modules import bmclip.kernels.
"""

import os
import signal
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # torch missing: the tests that need it fail on import with a clear message
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored across fork and exec:
# launched that way (`bash scripts/test.sh &`, a CI runner's background step), every child these tests start
# would ignore the SIGINT they send it. A handler (unlike SIG_IGN) is reset to the default by exec, so children
# start with SIGINT as a terminal gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
SHARED = Path(os.environ.get("BMCLIP_SHARED", REPO.parent / "shared"))
PMC_SAMPLES = SHARED / "data" / "pmc_samples"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def pmc_samples() -> Path:
    """The real PMC/JATS samples in ../shared (skips when this checkout has no shared/ beside it)."""
    if not PMC_SAMPLES.is_dir():
        pytest.skip(f"{PMC_SAMPLES} not present")
    return PMC_SAMPLES


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
