"""The compiled (GPU) path of every Triton kernel, checked on CPU: ahead-of-time builds for sm_90.

The interpreter that runs the kernel tests on CPU never invokes Triton's compiler, so a kernel that only fails
to compile (types, layouts, shared memory, an API that differs between Triton 3.6 and 3.8) would first show on
the GPU box. ``benchmarks/aot_compile_check.py`` compiles every launch the public functions make, as the JIT
would specialise it on the GPU; here a small subset runs (one case per kernel, first autotune config).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bmclip.kernels import _triton_utils as TU
from bmclip.kernels._triton_utils import HAS_TRITON

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "aot_compile_check.py"
EXIT_CANNOT_RUN = 77


def _launched_kernels() -> set[str]:
    """Names of the module-level @triton.jit kernels of bmclip.kernels that launchers call (``*_kernel``)."""
    from triton.runtime.jit import JITFunction

    names = set()
    for mod in ("contrastive_triton", "flash_attention", "fused_ops"):
        m = importlib.import_module(f"bmclip.kernels.{mod}")
        for name, obj in vars(m).items():
            # under TRITON_INTERPRET=1 (CPU test runs) @triton.jit gives InterpretedFunction objects
            if name.endswith("_kernel") and (isinstance(obj, JITFunction)
                                             or type(obj).__name__ == "InterpretedFunction"):
                names.add(name)
    return names


@pytest.mark.slow  # ~20 compiles with ptxas: 15-50 s on 2 shared cores
def test_every_kernel_compiles_for_sm90(tmp_path):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    out = tmp_path / "aot.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True,
                         text=True, timeout=900, cwd=REPO)
    if res.returncode == EXIT_CANNOT_RUN:
        pytest.skip(f"Triton cannot compile for sm_90 here: {res.stdout.strip()[-500:]}")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["case_errors"] == []
    results = data["results"]
    assert results and all(r["status"] == "ok" for r in results)
    # Every launched kernel was built, down to a cubin when ptxas is there (Triton's wheels bundle it).
    assert {r["kernel"] for r in results} == _launched_kernels()
    assert data["stage"] in ("cubin", "ptx")
    assert all(r["shared"] is not None and 0 <= r["shared"] <= 232448 for r in results)
    # Both CLIP backward orientations (REDUCE on/off) and both losses were specialised separately.
    bwd = {r["spec"] for r in results if r["kernel"] == "_bwd_kernel"}
    assert {s for s in bwd if "REDUCE=1" in s} and {s for s in bwd if "REDUCE=0" in s}
    assert "ok" in res.stdout and "0 error(s)" in res.stdout


def test_aot_script_help_runs():
    # The GPU session runs it from a bare checkout: argument parsing must not need a GPU or an install.
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "--ptx-only" in res.stdout and "--configs" in res.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_probe_agrees_with_a_real_launch():
    # The probe must not cry wolf: where it says the interpreter works, a real kernel runs and is right.
    if not TU.is_interpreted(TU._interpreter_probe_kernel):
        pytest.skip("kernels are compiled here (CUDA): no interpreter to probe")
    problem = TU.interpreter_problem()
    from bmclip.kernels import clip_loss

    x = torch.randn(9, 16, dtype=torch.float32)
    y = torch.randn(9, 16, dtype=torch.float32)
    if problem is None:
        got = clip_loss(x, y, 3.0, backend="triton")
        want = clip_loss(x, y, 3.0, backend="torch")
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    else:  # e.g. Triton 3.6 with NumPy >= 2.4: a clear refusal, not an interpreter traceback
        with pytest.raises(RuntimeError, match="interpreter cannot run"):
            clip_loss(x, y, 3.0, backend="triton")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_problem_is_reported_by_every_backend(monkeypatch):
    # Simulate the broken interpreter (a probe launch that raises like Triton 3.6 under NumPy 2.4): each
    # backend='triton' entry point must refuse with that reason instead of failing inside a kernel.
    if not TU.is_interpreted(TU._interpreter_probe_kernel):
        pytest.skip("kernels are compiled here (CUDA): no interpreter to probe")

    class BrokenProbe:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    real_is_interpreted = TU.is_interpreted
    monkeypatch.setattr(TU, "_interpreter_probe_kernel", BrokenProbe())
    monkeypatch.setattr(TU, "is_interpreted", lambda k: isinstance(k, BrokenProbe) or real_is_interpreted(k))
    monkeypatch.setattr(TU, "_INTERPRETER_PROBLEM", [])
    problem = TU.interpreter_problem()
    assert problem is not None and "0-dimensional" in problem and "NumPy" in problem

    from bmclip.kernels import bias_gelu, clip_loss, flash_attention, layer_norm
    from bmclip.kernels.flash_attention import FlashAttentionUnavailable
    from bmclip.kernels.fused_ops import FusedOpsUnavailable

    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="0-dimensional"):
        clip_loss(x, x, 2.0, backend="triton")
    with pytest.raises(FusedOpsUnavailable, match="0-dimensional"):
        layer_norm(x, None, None, backend="triton")
    with pytest.raises(FusedOpsUnavailable, match="0-dimensional"):
        bias_gelu(x, torch.zeros(16), backend="triton")
    q = torch.randn(1, 5, 2, 16)
    with pytest.raises(FlashAttentionUnavailable, match="0-dimensional"):
        flash_attention(q, q, q, backend="triton")
