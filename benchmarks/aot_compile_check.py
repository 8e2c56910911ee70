#!/usr/bin/env python
"""Ahead-of-time compile every Triton kernel of bmclip.kernels for a GPU target, without a GPU.

The CPU interpreter (TRITON_INTERPRET=1) never runs Triton's compiler, so type, layout and resource errors of
the compiled path (and incompatibilities with an older/newer Triton) only show on a GPU. This script finds them
on any machine where Triton's CUDA backend imports: it calls the real public launchers (``clip_loss``,
``siglip_loss``, ``flash_attention``, ``layer_norm``, ``bias_gelu`` and their backward passes) on CPU tensors
with every kernel launch intercepted, specialises each launch exactly as Triton's JIT would on the GPU (same
binder: argument types, constexprs, 16-byte divisibility attributes, num_warps/num_stages), expands autotuned
launches over the autotuner's (pruned) config list, and compiles each with ``triton.compile`` for the target
(default sm_90: ttir -> ttgir -> llir -> ptx -> cubin with Triton's bundled ptxas; ``--ptx-only`` stops at PTX).

Prints a table kernel x case x config -> ok / ERROR (with the shared memory each compiled kernel asks for; more
than the card's per-block maximum is an error, as the launch would fail) and exits 1 on any error, 0 if all
compiled, 77 if this Triton cannot compile for the target here (reason printed). Works with Triton 3.6 to 3.9.

``--facts`` adds what the artifacts say about speed on the target, per compiled kernel: registers and spill bytes
(the ptxas -v log of triton.compile's own ptxas run), shared memory (metadata), whether the kernel has a ``tl.dot``
(TTIR), its tensor-core instruction kind from the PTX (``wgmma`` = Hopper wgmma.mma_async, ``mma.sync``, both,
or ``none``) with the fp32 FMA count, and the SASS HGMMA/HMMA/FFMA counts (in all and inside loops) from the
bundled nvdisasm; then the violations (facts_violations): a ``tl.dot`` kernel not on wgmma or with any mma.sync,
spill bytes, shared memory over the per-block limit, a compile error, a kernel of the package that no case
compiled. ``--require`` makes violations fail the run (exit 1). ``--training`` selects the cases each group marks
as the training setup, in bf16, with every kept autotune config (what the CI test and scripts/ci_triton_versions.sh
check).

    python benchmarks/aot_compile_check.py                  # default matrix (~500 compiles, see --configs)
    python benchmarks/aot_compile_check.py --quick          # one small case per kernel (the CPU test)
    python benchmarks/aot_compile_check.py --only flash --dtypes bf16 --configs all --jobs 2
    python benchmarks/aot_compile_check.py --training --require --jobs 2   # ~250 compiles: facts of training
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

# Kernels are decorated once at import; the interpreter would replace them by CPU stand-ins.
os.environ.pop("TRITON_INTERPRET", None)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a bare checkout works: bmclip resolves bmclip.kernels from the repo

from bmclip.io import atomic_write_text  # noqa: E402  (after the path set-up above; torch-free)

EXIT_CANNOT_RUN = 77  # "skip": this Triton/machine cannot AOT-compile for the target (reason printed)
H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
DTYPES = ("bf16", "fp16", "fp32")
# fp32 attention only when asked for (--dtypes ... fp32): training runs it in bf16 under autocast, and with IEEE
# fp32 dots at head dim 128 a single config takes minutes to compile (Triton 3.6) and spills ~100 KB/thread.
FLASH_DEFAULT_DTYPES = ("bf16", "fp16")


# ---------------------------------------------------------------------------------------------------
# Capturing launches
# ---------------------------------------------------------------------------------------------------
class Launch:
    """One intercepted kernel launch: the JIT function, its arguments and the configs to compile it with."""

    def __init__(self, case, fn, args, kwargs, configs, primary=True):
        self.case = case
        self.primary = primary  # a case of the training setup: every autotune config by default
        self.fn = fn
        self.args = args
        self.kwargs = kwargs  # launch kwargs (constexprs, num_warps, ...) without grid/warmup
        self.configs = configs  # list of (label, extra kwargs); [("-", {})] for a plain launch


@contextlib.contextmanager
def capture_launches(case: str, out: list, primary: bool = True):
    """Within the block, ``kernel[grid](...)`` records a Launch instead of compiling and running."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        out.append(Launch(case, self, args, dict(kwargs), [("-", {})], primary))
        return None

    def tuned_run(self, *args, **kwargs):
        launch_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)  # the launcher's own early_config_prune, as on the GPU
        finally:
            self.nargs = None
        fn = self.fn
        while not isinstance(fn, JITFunction):  # nested wrappers (heuristics) end in the JIT function
            fn = fn.fn
        labelled = [(_config_label(c), c.all_kwargs()) for c in configs]
        out.append(Launch(case, fn, args, launch_kwargs, labelled, primary))
        return None

    saved = (JITFunction.run, Autotuner.run)
    JITFunction.run, Autotuner.run = jit_run, tuned_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def _config_label(config) -> str:
    kw = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw} w{config.num_warps} s{config.num_stages}"


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ---------------------------------------------------------------------------------------------------
# The cases: what the launchers run on the GPU (shapes of BiomedCLIP training, ViT-B/16 + PubMedBERT)
# ---------------------------------------------------------------------------------------------------
def _kmod(name: str):
    # import_module, not "from bmclip.kernels import flash_attention": the package re-exports a function of
    # that name, which shadows the submodule attribute.
    import importlib

    return importlib.import_module(f"bmclip.kernels.{name}")


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _grad_of(t):
    import torch

    return torch.ones_like(t)


def contrastive_cases(quick: bool, dtypes):
    """(name, callable, primary) triples: CLIP and SigLIP forward+backward through the public functions."""
    import torch

    dtypes = dtypes or DTYPES
    C = _kmod("contrastive")
    CT = _kmod("contrastive_triton")
    _kmod("losses")  # imported so that a broken losses / contrastive_dist module shows up here

    # training shapes (bf16, B >= 4096, D = 512 / 768: every autotune config) and an unaligned batch
    # --quick: one shape per D-chunk config class (D = 512: one resident chunk; 768: two chunks / 512 + 256)
    shapes = [(512, 512), (512, 768)] if quick else [(4096, 512), (4096, 768), (3001, 768)]
    cases = []
    for dt in dtypes:
        for B, D in shapes:
            for loss in ("clip", "siglip"):
                def run(B=B, D=D, dt=dt, loss=loss):
                    I = torch.empty(B, D, dtype=_torch_dtype(dt)).normal_().requires_grad_()
                    T = torch.empty(B, D, dtype=_torch_dtype(dt)).normal_().requires_grad_()
                    s = torch.tensor(14.3, requires_grad=True)
                    b = torch.tensor(-10.0, requires_grad=True)
                    if loss == "clip":
                        out = C.clip_loss(I, T, s, backend="triton")
                    else:
                        out = C.siglip_loss(I, T, s, b, backend="triton")
                    out.backward()
                cases.append((f"{loss} {dt} B{B} D{D}", run, dt == "bf16" and B >= 4096))
        if not quick:
            # Above _COLPART_MAX_BYTES (B > ~65k) the column LSEs come from a second, transposed launch.
            def run_two_pass(dt=dt):
                I = torch.empty(4096, 512, dtype=_torch_dtype(dt)).normal_().requires_grad_()
                T = torch.empty(4096, 512, dtype=_torch_dtype(dt)).normal_().requires_grad_()
                with _patched(CT, "_COLPART_MAX_BYTES", 0):
                    C.clip_loss(I, T, torch.tensor(14.3), backend="triton").backward()
            cases.append((f"clip {dt} two-pass columns", run_two_pass, False))
            # A rank's block under torch.distributed: local rows against the gathered batch, offset positives.
            def run_block(dt=dt):
                A = torch.empty(1024, 512, dtype=_torch_dtype(dt)).normal_()
                Cm = torch.empty(4096, 512, dtype=_torch_dtype(dt)).normal_()
                s = torch.tensor(14.3)
                row, col = C.block_forward(A, Cm, s, None, 1024, C.CLIP, True, "triton")
                coef = torch.full((1024,), 1e-4)
                C.block_backward(A, Cm, s, None, 1024, C.CLIP, row, col, coef, torch.full((4096,), 1e-4), None,
                                 A.dtype, "triton")
            cases.append((f"clip {dt} rank block 1024x4096", run_block, False))
    return cases


def flash_cases(quick: bool, dtypes):
    import torch

    if dtypes is None:
        dtypes = FLASH_DEFAULT_DTYPES
    FA = _kmod("flash_attention")
    if quick:  # one case per kernel: the padded one with the separate dQ kernel, the varlen one atomic
        combos = [(64, False, "padded", False), (64, False, "varlen", True)]
    else:
        combos = [(hd, causal, layout, False) for hd in (32, 64, 128) for causal in (False, True)
                  for layout in ("padded", "varlen")]
    cases = []
    for dt in dtypes:
        for hd, causal, layout, quick_atomic in combos:
            def run(hd=hd, causal=causal, layout=layout, dt=dt, atomic=quick_atomic):
                H = 768 // hd if hd <= 64 else 8  # ViT-B / BERT-base width split in heads
                kw = dict(dtype=_torch_dtype(dt))
                if layout == "padded":  # the ViT: 197 tokens (196 patches + CLS); one key loop
                    shape = (2, 197, H, hd)
                    extra = {}
                else:  # the unpadded text tower: captions of uneven length, flattened
                    # causal: one sequence past ONE_LOOP_MAX_SEQLEN, so the split (unmasked + tail) loops compile
                    lens = [256, 99, 17, 140] + ([300] if causal else [])
                    shape = (sum(lens), H, hd)
                    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
                    extra = dict(cu_seqlens=cu, max_seqlen=max(lens))
                q, k, v = (torch.empty(shape, **kw).normal_().requires_grad_() for _ in range(3))
                mode = "atomic" if atomic else "separate"
                with _patched(FA, "_BWD_DQ_MODE", mode):
                    o = FA.flash_attention(q, k, v, causal=causal, backend="triton", **extra)
                    o.backward(_grad_of(o))
            tag = ("causal" if causal else "full") + (" atomic-dQ" if quick_atomic else "")
            # ViT-B/16 and PubMedBERT: head dim 64, bidirectional, bf16 autocast
            primary = dt == "bf16" and hd == 64 and not causal
            cases.append((f"attn {dt} hd{hd} {layout} {tag}", run, primary))
            if not quick and hd == 64 and not causal:
                cases.append((f"attn {dt} hd{hd} {layout} {tag} atomic-dQ",
                              lambda hd=hd, layout=layout, dt=dt: run(hd, False, layout, dt, True), primary))
    return cases


def fused_cases(quick: bool, dtypes):
    import torch

    dtypes = dtypes or DTYPES
    F = _kmod("fused_ops")
    widths = [768] if quick else [768, 512, 1024]
    cases = []
    for dt in dtypes:
        tdt = _torch_dtype(dt)
        for N in widths:
            for residual in (False, True):
                def run_ln(N=N, residual=residual, tdt=tdt):
                    x = torch.empty(2 * 197, N, dtype=tdt).normal_().requires_grad_()
                    # fp32 parameters with bf16/fp16 activations: what autocast training hands over
                    w = torch.ones(N, requires_grad=True)
                    b = torch.zeros(N, requires_grad=True)
                    r = torch.empty_like(x).normal_().requires_grad_() if residual else None
                    out = F.layer_norm(x, w, b, 1e-12, residual=r, backend="triton")
                    if residual:
                        (out[0].float().sum() + out[1].float().sum()).backward()
                    else:
                        out.backward(_grad_of(out))
                cases.append((f"layernorm {dt} N{N}{' +residual' if residual else ''}", run_ln, True))
        hidden = [3072] if quick else [3072, 2048]
        for N in hidden:
            for approx in (("none",) if quick else ("none", "tanh")):
                def run_gelu(N=N, approx=approx, tdt=tdt):
                    x = torch.empty(2 * 197, N, dtype=tdt).normal_().requires_grad_()
                    b = torch.zeros(N, dtype=tdt, requires_grad=True)
                    y = F.bias_gelu(x, b, approximate=approx, backend="triton")
                    y.backward(_grad_of(y))
                cases.append((f"bias_gelu {dt} N{N} {approx}", run_gelu, True))
    return cases


GROUPS = {"contrastive": contrastive_cases, "flash": flash_cases, "fused": fused_cases}


@contextlib.contextmanager
def _gpu_launch_paths(sm_count: int):
    """Let backend='triton' launchers run on CPU tensors (their kernels are intercepted, never executed)."""
    C, FA, F = _kmod("contrastive"), _kmod("flash_attention"), _kmod("fused_ops")
    FT = _kmod("fused_ops_triton")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(C, "require_triton", lambda *a, **k: None))
        stack.enter_context(_patched(FA, "_triton_unavailable_reason", lambda q: None))
        stack.enter_context(_patched(F, "triton_available_for", lambda *a, **k: (True, "")))
        # persistent backward grids are sized from the SM count
        stack.enter_context(_patched(FT, "_sm_count", lambda device: sm_count))
        yield


def collect(groups, quick: bool, dtypes, sm_count: int, case_filter: str | None, training_only: bool = False):
    """Run every case under capture; returns (launches, errors of cases whose launcher itself failed).

    ``training_only``: only the cases each group marks as the training setup (its ``primary`` cases)."""
    launches, errors = [], []
    with _gpu_launch_paths(sm_count):
        for g in groups:
            for name, run, primary in GROUPS[g](quick, dtypes):
                if case_filter and not re.search(case_filter, name):
                    continue
                if training_only and not primary:
                    continue
                try:
                    with capture_launches(name, launches, primary):
                        run()
                except Exception as exc:  # a launcher that cannot even be called is a finding too
                    errors.append((name, f"{type(exc).__name__}: {exc}"))
    return launches, errors


# Module-level ``*_kernel`` JIT functions that no public launcher runs on the GPU: the interpreter probe (a
# one-element launch that checks the CPU interpreter itself).
NOT_LAUNCHED = frozenset({"_interpreter_probe_kernel"})


def _kernel_module(fn) -> str:
    """The module that defines a JIT kernel (JITFunction, InterpretedFunction or autotuner wrapper)."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__module__", "") or ""


def discover_kernels(package: str = "bmclip.kernels") -> dict[str, object]:
    """``"module:name" -> kernel`` for every module-level ``@triton.jit`` function named ``*_kernel`` that a
    module of ``package`` defines (every module, found with pkgutil; re-exports count once, where defined).

    Works with and without TRITON_INTERPRET (under it, @triton.jit gives InterpretedFunction objects)."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if not name.endswith("_kernel") or name in NOT_LAUNCHED:
                continue
            if type(obj).__name__ not in ("JITFunction", "InterpretedFunction"):
                continue
            where = _kernel_module(obj)
            if where == mod.__name__:
                found[f"{where}:{name}"] = obj
    return found


# ---------------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------------
def specialise(fn, args, kwargs, backend):
    """(options, signature, constexprs, attrs) exactly as JITFunction.run derives them on a GPU."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound_args, specialization, options)


def _compile_ptx_only(src, target, options):
    # Triton's own pipeline (triton.compile's loop) up to and including PTX, without ptxas.
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    opts = backend.parse_options(options)
    import triton

    metadata = {"hash": "aot-check", "target": target, **opts.__dict__, "triton_version": triton.__version__}
    stages = {}
    backend.add_stages(stages, opts, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    for ext, stage in stages.items():
        if ext == backend.binary_ext:
            break
        module = stage(module, metadata)
    return {"ptx": module}, metadata.get("shared")


# ---------------------------------------------------------------------------------------------------
# Compile facts: what the compiled artifacts say about a kernel's speed on the target
# ---------------------------------------------------------------------------------------------------
def _run_ptxas_v(ptx: str, arch: str) -> str:
    """The log of ``ptxas -v`` on the PTX (Triton's bundled ptxas): used when triton.compile's own ptxas run
    left no log (a cache hit under --keep-cache)."""
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as d:
        p = Path(d, "k.ptx")
        p.write_text(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(p), "-o", str(Path(d, "k.cubin"))],
                             capture_output=True, text=True, timeout=600)
    return res.stderr + res.stdout


def parse_ptxas_log(log: str, kernel: str | None = None) -> dict:
    """Registers, spill and stack bytes of the entry function from a ``ptxas -v`` log (None where absent)."""
    start = -1
    if kernel:
        start = log.find(f"Compiling entry function '{kernel}'")
    if start < 0:
        start = log.find("Compiling entry function")
    out = {"regs": None, "spill_stores": None, "spill_loads": None, "stack": None}
    if start < 0:
        return out
    log = log[start:]  # the kernel's own figures, not a callee's
    nxt = log.find("Compiling entry function", 1)
    if nxt > 0:
        log = log[:nxt]
    for key, pat in (("regs", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                     ("spill_loads", r"(\d+) bytes spill loads"), ("stack", r"(\d+) bytes stack frame")):
        m = re.search(pat, log)
        out[key] = int(m.group(1)) if m else None
    return out


# PTX: Hopper warp-group MMA, the pre-Hopper warp-level MMA, and scalar fp32 FMAs (a dot lowered to FMAs).
_PTX_WGMMA = re.compile(r"\bwgmma\.mma_async\b")
_PTX_MMA_SYNC = re.compile(r"\bmma\.sync\b")
_PTX_FMA_F32 = re.compile(r"\bfma\.rn(?:\.ftz)?\.f32\b")
# SASS opcodes (nvdisasm): HGMMA = wgmma, HMMA = mma.sync on the tensor cores, FFMA = fp32 FMA on the CUDA cores.
_SASS_OPS = ("HGMMA", "HMMA", "FFMA")
_SASS_INSN = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.[\w.]+)?\b")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_BRA = re.compile(r"\bBRA\b[^`;]*`\((\.L_x_\d+)\)")


def ptx_counts(ptx: str) -> dict:
    return {"wgmma": len(_PTX_WGMMA.findall(ptx)), "mma_sync": len(_PTX_MMA_SYNC.findall(ptx)),
            "fma_f32": len(_PTX_FMA_F32.findall(ptx))}


def _nvdisasm_path() -> str | None:
    try:
        from triton import knobs

        path = knobs.nvidia.nvdisasm.path
        return path if path and os.path.exists(path) else None
    except Exception:
        return shutil.which("nvdisasm")


def sass_counts(cubin: bytes) -> dict | None:
    """HGMMA / HMMA / FFMA counts in the cubin's SASS, in all and inside loops (code between a backward
    branch and its target: the K loop of a dot kernel), from the bundled nvdisasm; None without it."""
    tool = _nvdisasm_path()
    if tool is None or not cubin:
        return None
    with tempfile.TemporaryDirectory() as d:
        p = Path(d, "k.cubin")
        p.write_bytes(cubin)
        res = subprocess.run([tool, "-c", str(p)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        return None
    lines = res.stdout.splitlines()
    ops, labels, branches = [], {}, []
    for line in lines:
        m = _SASS_LABEL.match(line)
        if m:
            labels[m.group(1)] = len(ops)
            continue
        m = _SASS_INSN.search(line)
        if not m:
            continue
        b = _SASS_BRA.search(line)
        if b:
            branches.append((len(ops), b.group(1)))
        ops.append(m.group(1))
    in_loop = [False] * len(ops)
    for at, label in branches:
        target = labels.get(label)
        if target is not None and target <= at:  # a backward branch closes a loop
            for i in range(target, at + 1):
                in_loop[i] = True
    out = {"sass_" + op.lower(): sum(o == op for o in ops) for op in _SASS_OPS}
    out.update({"loop_" + op.lower(): sum(o == op and lp for o, lp in zip(ops, in_loop)) for op in _SASS_OPS})
    out["loops"] = sum(1 for at, label in branches if labels.get(label, at + 1) <= at)
    return out


def instruction_kind(wgmma: int, mma_sync: int) -> str:
    """'wgmma', 'mma.sync', 'wgmma+mma.sync' (both: part of the kernel fell back) or 'none'."""
    if wgmma and mma_sync:
        return "wgmma+mma.sync"
    if wgmma:
        return "wgmma"
    if mma_sync:
        return "mma.sync"
    return "none"


def compile_facts(asm: dict, shared: int | None, ptxas_log: str | None, kernel: str) -> dict:
    """The facts of one compiled kernel from its artifacts (ttir, ptx, optional cubin and ptxas -v log)."""
    ptx = asm.get("ptx") or ""
    ttir = str(asm.get("ttir") or "")
    facts = {"shared": shared, "has_dot": bool(re.search(r"\btt\.dot(?:_scaled)?\b", ttir))}
    facts.update(ptx_counts(ptx))
    facts["kind"] = instruction_kind(facts["wgmma"], facts["mma_sync"])
    facts.update(parse_ptxas_log(ptxas_log or "", kernel))
    sass = sass_counts(asm.get("cubin") or b"")
    if sass is not None:
        facts.update(sass)
        # A tensor-core kind read from the SASS too: ptxas keeps PTX wgmma as HGMMA (a mismatch is a finding).
        facts["sass_kind"] = instruction_kind(facts["sass_hgmma"], facts["sass_hmma"])
    return facts


def facts_violations(facts: dict, max_shared: int = H100_MAX_SHARED) -> list[str]:
    """What keeps a compiled kernel from the fast path on Hopper (empty: it complies).

    A kernel with a ``tl.dot`` must run it as Hopper warp-group MMA (``wgmma``) with no ``mma.sync`` fallback
    and no fp32 FMA lowering; no kernel may spill registers; shared memory within the per-block limit.
    """
    out = []
    if facts.get("has_dot"):
        if facts.get("mma_sync") or facts.get("sass_hmma"):
            where = "beside wgmma" if facts.get("wgmma") else "not wgmma"
            out.append(f"tl.dot as mma.sync ({facts.get('mma_sync')} in PTX), {where}")
        elif not facts.get("wgmma"):  # no tensor-core instruction at all: the dot runs as fp32 FMAs
            fma = facts.get("loop_ffma", facts.get("fma_f32"))
            out.append(f"tl.dot without wgmma or mma.sync ({fma} FFMA{' in loops' if 'loop_ffma' in facts else ''})")
        if facts.get("wgmma") and "sass_hgmma" in facts and not facts["sass_hgmma"]:
            out.append("PTX wgmma but no HGMMA in the SASS")
    spills = [facts.get("spill_stores"), facts.get("spill_loads")]
    if any(v is None for v in spills):
        out.append("spills unknown (no ptxas log)")
    elif any(spills):
        out.append(f"spills {spills[0]} B stores / {spills[1]} B loads")
    shared = facts.get("shared")
    if shared is None:
        out.append("shared memory unknown")
    elif shared > max_shared:
        out.append(f"shared memory {shared} B > {max_shared} B per block")
    return out


def _spec_string(launch, extra) -> str:
    """The launch's own kwargs (constexprs, num_warps, ...) that the autotune config does not set."""
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in launch.kwargs.items() if k not in extra)


_JOBS: list = []  # set before forking workers: jobs hold JIT functions and tensors, which do not pickle


def _compile_index(i: int):
    return compile_one(_JOBS[i])


def compile_one(job):
    """Compile one (launch, config); returns a result dict (never raises)."""
    launch, label, extra, target_spec, ptx_only, want_stats, max_shared = job[:7]
    want_facts = job[7] if len(job) > 7 else False
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget(*target_spec)
    spec = _spec_string(launch, extra)
    res = {"kernel": launch.fn.__name__, "module": _kernel_module(launch.fn), "case": launch.case, "spec": spec,
           "config": label, "status": "ok", "shared": None, "stats": "", "seconds": 0.0, "error": ""}
    t0 = time.perf_counter()
    sink = io.StringIO()
    saved_dump = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    try:
        backend = make_backend(target)
        options, signature, constexprs, attrs = specialise(launch.fn, launch.args, {**launch.kwargs, **extra},
                                                           backend)
        src = ASTSource(launch.fn, signature, constexprs, attrs)
        # triton.compile runs ptxas -v once; with this set it prints that log (to the sink below).
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():  # a ptxas failure prints the whole PTX
            # Triton 3.8 deprecates block pointers (the contrastive kernels use them on purpose; see there).
            warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")
            if ptx_only:
                asm, shared = _compile_ptx_only(src, target, options.__dict__)
            else:
                k = triton.compile(src, target=target, options=options.__dict__)
                asm, shared = k.asm, k.metadata.shared
        if not asm.get("ptx"):
            raise RuntimeError("no PTX produced")
        if not ptx_only and not asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        res["shared"] = shared
        if shared is not None and shared > max_shared:
            res["status"] = "ERROR"
            res["error"] = f"needs {shared} B of shared memory per block > {max_shared} B on this target"
        if want_stats or want_facts:
            log = None if ptx_only else sink.getvalue()
            if log is not None and "Compiling entry function" not in log:  # cache hit: no ptxas ran
                arch = re.search(r"^\.target\s+(\S+)", asm["ptx"], re.M)
                log = _run_ptxas_v(asm["ptx"], arch.group(1) if arch else f"sm_{target.arch}")
            facts = compile_facts(asm, shared, log, launch.fn.__name__)
            if want_facts:
                res["facts"] = facts
                res["violations"] = facts_violations(facts, max_shared)
            if want_stats and facts["regs"] is not None:
                res["stats"] = f"{facts['regs']} regs, {facts['spill_stores']} B spill"
    except Exception as exc:
        res["status"] = "ERROR"
        tb = traceback.format_exception_only(type(exc), exc)
        out = sink.getvalue()
        res["error"] = ("".join(tb).strip() + ("\n" + out[-2000:] if out else ""))[:4000]
        if want_facts:
            res["violations"] = ["does not compile"]
    finally:
        if saved_dump is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = saved_dump
    res["seconds"] = time.perf_counter() - t0
    return res


def _dedupe(jobs, target):
    """The jobs with one compile per distinct specialisation (see _dedupe_with_cases)."""
    return _dedupe_with_cases(jobs, target)[0]


def _dedupe_with_cases(jobs, target):
    """(jobs, cases): several launches share one specialisation (e.g. the backward's two orientations, or a
    runtime size that changes no constexpr): each is compiled once; ``cases[i]`` names every case whose launch
    the i-th kept job stands for (its own first)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget(*target))
    seen, out, cases = {}, [], []
    for job in jobs:
        launch, label, extra = job[:3]
        try:
            options, signature, constexprs, attrs = specialise(launch.fn, launch.args, {**launch.kwargs, **extra},
                                                               backend)
            key = (launch.fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
                   repr(sorted(attrs.items(), key=str)), repr(sorted(options.__dict__.items(), key=str)))
        except Exception:  # let compile_one report it
            key = (id(job),)
        if key not in seen:
            seen[key] = len(out)
            out.append(job)
            cases.append([launch.case])
        elif launch.case not in cases[seen[key]]:
            cases[seen[key]].append(launch.case)
    return out, cases


def _can_compile_here(target) -> str | None:
    """None if Triton's CUDA backend can build for ``target`` on this machine, else the reason."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource  # noqa: F401
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except Exception as exc:
        return f"Triton's compiler API is not importable: {type(exc).__name__}: {exc}"
    try:
        make_backend(GPUTarget(*target))
    except Exception as exc:
        return f"Triton has no backend for {target}: {type(exc).__name__}: {exc}"
    return None


def _ptxas_available() -> bool:
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
        return bool(path) and os.path.exists(path)
    except Exception:
        return shutil.which("ptxas") is not None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(GROUPS), default=sorted(GROUPS),
                    help="kernel groups (default: all)")
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None,
                    help="input dtypes (default: bf16 fp16 fp32, attention bf16 fp16; --quick, --training: bf16)")
    ap.add_argument("--configs", choices=("auto", "all", "first"), default=None,
                    help="autotuned launches: every (pruned) config the autotuner would time ('all', default with "
                         "--training), only its first one ('first', default with --quick), or 'auto' (default): "
                         "every config for the training setup (bf16, head dim 64 bidirectional, D=512 loss), the "
                         "first one elsewhere")
    ap.add_argument("--quick", action="store_true", help="one small case per kernel, bf16, first config")
    ap.add_argument("--training", action="store_true",
                    help="only the training-setup cases of each group (bf16), every kept autotune config")
    ap.add_argument("--cases", default=None, help="regex on case names (e.g. 'hd64 varlen')")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100/H200)")
    ap.add_argument("--sm-count", type=int, default=132, help="SMs of the target card (sizes persistent grids)")
    ap.add_argument("--ptx-only", action="store_true", help="stop at PTX (automatic when ptxas is missing)")
    ap.add_argument("--ptxas-stats", action="store_true", help="also show registers and spill bytes (ptxas -v)")
    ap.add_argument("--facts", action="store_true",
                    help="compile facts per kernel/case/config: registers, spill bytes, shared memory, tensor-core "
                         "instruction kind (PTX wgmma / mma.sync / none, SASS HGMMA/HMMA/FFMA) and violations")
    ap.add_argument("--require", action="store_true",
                    help="with --facts (implied): exit 1 on any violation (a tl.dot kernel not on wgmma or with "
                         "mma.sync, spill bytes, shared memory over the per-block limit, a kernel never compiled)")
    ap.add_argument("--jobs", type=int, default=1, help="compile in N processes (fork)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use Triton's normal cache (default: a fresh one, so that everything really compiles)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.quick and args.training:
        ap.error("--quick and --training select different cases; pick one")
    want_facts = args.facts or args.require
    dtypes = args.dtypes or (["bf16"] if args.quick or args.training else None)  # None: each group's defaults
    configs_mode = args.configs or ("first" if args.quick else "all" if args.training else "auto")
    target = ("cuda", args.arch, 32)

    reason = _can_compile_here(target)
    if reason is not None:
        print(f"SKIP: {reason}")
        return EXIT_CANNOT_RUN
    ptx_only = args.ptx_only
    if not ptx_only and not _ptxas_available():
        print("ptxas not found (neither bundled with Triton nor on PATH): stopping at PTX", flush=True)
        ptx_only = True

    cache = None
    if not args.keep_cache:
        cache = tempfile.mkdtemp(prefix="bmclip-aot-cache-")
        os.environ["TRITON_CACHE_DIR"] = cache
    try:
        import torch
        import triton

        launches, case_errors = collect(args.only, args.quick, dtypes, args.sm_count, args.cases,
                                        training_only=args.training)
        jobs = []
        for la in launches:
            every = configs_mode == "all" or (configs_mode == "auto" and la.primary)
            cfgs = la.configs if every else la.configs[:1]
            for label, extra in cfgs:
                jobs.append((la, label, extra, target, ptx_only, args.ptxas_stats, H100_MAX_SHARED, want_facts))
        captured = [{"kernel": j[0].fn.__name__, "module": _kernel_module(j[0].fn), "case": j[0].case,
                     "spec": _spec_string(j[0], j[2]), "config": j[1]} for j in jobs]
        jobs, job_cases = _dedupe_with_cases(jobs, target)
        stage = "ptx" if ptx_only else "cubin"
        print(f"triton {triton.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}: "
              f"{len(jobs)} compiles for sm_{args.arch} up to {stage} ({configs_mode} configs, "
              f"{args.jobs} process{'es' if args.jobs > 1 else ''})", flush=True)
        t0 = time.perf_counter()
        if args.jobs > 1:
            import multiprocessing as mp

            _JOBS[:] = jobs
            with mp.get_context("fork").Pool(args.jobs) as pool:
                results = [_progress(r, i, len(jobs), t0) for i, r in
                           enumerate(pool.imap(_compile_index, range(len(jobs))))]
        else:
            results = [_progress(compile_one(j), i, len(jobs), t0) for i, j in enumerate(jobs)]
        wall = time.perf_counter() - t0
        for r, names in zip(results, job_cases):
            r["cases"] = names  # every case this one compile stands for
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)

    _print_table(results, case_errors)
    n_err = sum(r["status"] != "ok" for r in results) + len(case_errors)
    # Kernels of the package that no selected case compiled (a launcher that stopped using a kernel, or a new
    # kernel without a case): with every group and case selected, a violation.
    compiled = {f"{r['module']}:{r['kernel']}" for r in results}
    never = sorted(set(discover_kernels()) - compiled)
    complete = sorted(args.only) == sorted(GROUPS) and not args.cases
    n_viol = 0
    if want_facts:
        print()
        print_facts_table(results)
        n_viol = sum(bool(r.get("violations")) for r in results)
        if complete and never:
            n_viol += len(never)
            print(f"\nVIOLATION: kernels never compiled by these cases: {', '.join(never)}")
        print(f"\n{n_viol} violation(s) in {len(results)} compiled kernel(s)"
              + ("" if args.require else " (not enforced without --require)"))
    elif never and complete:
        print(f"\nnote: kernels never compiled by these cases: {', '.join(never)}")
    print(f"\n{len(results)} compiled, {n_err} error(s), {wall:.0f} s wall")
    if args.json:
        data = {"triton": triton.__version__, "torch": torch.__version__, "arch": args.arch, "stage": stage,
                "selection": "training" if args.training else "quick" if args.quick else "default",
                "configs": configs_mode, "wall_s": round(wall, 1), "results": results, "case_errors": case_errors,
                "never_compiled": never, "max_shared": H100_MAX_SHARED, "launches": captured}
        atomic_write_text(json.dumps(data, indent=1), args.json)
    return 1 if n_err or (args.require and n_viol) else 0


def _progress(res, i, n, t0):
    # Errors as they happen and a heartbeat, so a long full run shows where it is.
    if res["status"] != "ok":
        print(f"ERROR {res['kernel']} [{res['case']}] {res['config']}: {res['error'].splitlines()[0][:200]}",
              flush=True)
    if (i + 1) % 100 == 0 or i + 1 == n:
        print(f"  {i + 1}/{n} compiled ({time.perf_counter() - t0:.0f} s)", flush=True)
    return res


def _table(head, rows) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row).rstrip() for row in rows]
    return "\n".join(lines)


def _print_table(results, case_errors):
    rows = [(r["kernel"], r["case"], r["spec"], r["config"], r["status"],
             "" if r["shared"] is None else str(r["shared"]), r["stats"], f"{r['seconds']:.1f}") for r in results]
    head = ("kernel", "case", "launch kwargs", "config", "status", "shared B", "ptxas", "s")
    print(_table(head, rows))
    for r in results:
        if r["status"] != "ok":
            print(f"\nERROR {r['kernel']} [{r['case']}] {r['config']}:\n{r['error']}")
    for name, err in case_errors:
        print(f"\nERROR launcher [{name}]: {err}")


def _fmt(v) -> str:
    return "?" if v is None else str(v)


def facts_table(results) -> str:
    """kernel x case x config -> regs, spills, smem, instruction kind, FMA counts, violations (text)."""
    head = ("kernel", "case", "config", "regs", "spill B st/ld", "smem B", "dot", "kind", "SASS HGMMA/HMMA/FFMA",
            "loop FFMA", "PTX fma.f32", "violations")
    rows = []
    for r in results:
        f = r.get("facts") or {}
        sass = "/".join(_fmt(f.get(k)) for k in ("sass_hgmma", "sass_hmma", "sass_ffma")) if "sass_hgmma" in f else "-"
        more = len(r.get("cases") or [r["case"]]) - 1
        rows.append((r["kernel"], r["case"] + (f" (+{more})" if more else ""), r["config"], _fmt(f.get("regs")),
                     f"{_fmt(f.get('spill_stores'))}/{_fmt(f.get('spill_loads'))}", _fmt(r.get("shared")),
                     "yes" if f.get("has_dot") else "no", f.get("kind", "-"), sass, _fmt(f.get("loop_ffma")),
                     _fmt(f.get("fma_f32")), "; ".join(r.get("violations") or []) or "-"))
    return _table(head, rows)


def print_facts_table(results):
    print(facts_table(results))


if __name__ == "__main__":
    sys.exit(main())
