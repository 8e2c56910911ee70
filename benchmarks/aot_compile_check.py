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
compiled, 77 if this Triton cannot compile for the target here (reason printed). Works with Triton 3.6 and 3.8.

    python benchmarks/aot_compile_check.py                  # default matrix (~500 compiles, see --configs)
    python benchmarks/aot_compile_check.py --quick          # one small case per kernel (the CPU test)
    python benchmarks/aot_compile_check.py --only flash --dtypes bf16 --configs all --jobs 2
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
    if quick:
        combos = [(64, False, "padded"), (64, False, "varlen")]
    else:
        combos = [(hd, causal, layout) for hd in (32, 64, 128) for causal in (False, True)
                  for layout in ("padded", "varlen")]
    cases = []
    for dt in dtypes:
        for hd, causal, layout in combos:
            def run(hd=hd, causal=causal, layout=layout, dt=dt, atomic=False):
                H = 768 // hd if hd <= 64 else 8  # ViT-B / BERT-base width split in heads
                kw = dict(dtype=_torch_dtype(dt))
                if layout == "padded":  # the ViT: 197 tokens (196 patches + CLS)
                    shape = (2, 197, H, hd)
                    extra = {}
                else:  # the unpadded text tower: captions of uneven length, flattened
                    lens = [256, 99, 17, 140]
                    shape = (sum(lens), H, hd)
                    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
                    extra = dict(cu_seqlens=cu, max_seqlen=max(lens))
                q, k, v = (torch.empty(shape, **kw).normal_().requires_grad_() for _ in range(3))
                mode = "atomic" if atomic else "separate"
                with _patched(FA, "_BWD_DQ_MODE", mode):
                    o = FA.flash_attention(q, k, v, causal=causal, backend="triton", **extra)
                    o.backward(_grad_of(o))
            tag = "causal" if causal else "full"
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
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(C, "require_triton", lambda *a, **k: None))
        stack.enter_context(_patched(FA, "_triton_unavailable_reason", lambda q: None))
        if hasattr(F, "triton_available_for"):
            stack.enter_context(_patched(F, "triton_available_for", lambda *a, **k: (True, "")))
        if hasattr(F, "_sm_count"):  # persistent backward grids are sized from the SM count
            stack.enter_context(_patched(F, "_sm_count", lambda device: sm_count))
        yield


def collect(groups, quick: bool, dtypes, sm_count: int, case_filter: str | None):
    """Run every case under capture; returns (launches, errors of cases whose launcher itself failed)."""
    launches, errors = [], []
    with _gpu_launch_paths(sm_count):
        for g in groups:
            for name, run, primary in GROUPS[g](quick, dtypes):
                if case_filter and not re.search(case_filter, name):
                    continue
                try:
                    with capture_launches(name, launches, primary):
                        run()
                except Exception as exc:  # a launcher that cannot even be called is a finding too
                    errors.append((name, f"{type(exc).__name__}: {exc}"))
    return launches, errors


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


def _ptxas_stats(ptx: str, arch: str) -> str:
    """'R regs, S B spill' from ptxas -v on the PTX (Triton's bundled ptxas)."""
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as d:
        p = Path(d, "k.ptx")
        p.write_text(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(p), "-o", str(Path(d, "k.cubin"))],
                             capture_output=True, text=True, timeout=600)
    log = res.stderr + res.stdout
    log = log[log.find("Compiling entry function"):]  # the kernel's own figures, not a callee's
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return f"{regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B spill"


_JOBS: list = []  # set before forking workers: jobs hold JIT functions and tensors, which do not pickle


def _compile_index(i: int):
    return compile_one(_JOBS[i])


def compile_one(job):
    """Compile one (launch, config); returns a result dict (never raises)."""
    launch, label, extra, target_spec, ptx_only, want_stats, max_shared = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget(*target_spec)
    spec = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in launch.kwargs.items()
                    if k not in extra)
    res = {"kernel": launch.fn.__name__, "case": launch.case, "spec": spec, "config": label, "status": "ok",
           "shared": None,
           "stats": "", "seconds": 0.0, "error": ""}
    t0 = time.perf_counter()
    sink = io.StringIO()
    try:
        backend = make_backend(target)
        options, signature, constexprs, attrs = specialise(launch.fn, launch.args, {**launch.kwargs, **extra},
                                                           backend)
        src = ASTSource(launch.fn, signature, constexprs, attrs)
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
        if want_stats:
            arch = re.search(r"^\.target\s+(\S+)", asm["ptx"], re.M)
            res["stats"] = _ptxas_stats(asm["ptx"], arch.group(1) if arch else f"sm_{target.arch}")
    except Exception as exc:
        res["status"] = "ERROR"
        tb = traceback.format_exception_only(type(exc), exc)
        res["error"] = ("".join(tb).strip() + ("\n" + sink.getvalue()[-2000:] if sink.getvalue() else ""))[:4000]
    res["seconds"] = time.perf_counter() - t0
    return res


def _dedupe(jobs, target):
    # Several launches share one specialisation (e.g. the backward's two orientations): compile it once.
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget(*target))
    seen, out = set(), []
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
            seen.add(key)
            out.append(job)
    return out


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
                    help="input dtypes (default: bf16 fp16 fp32, attention bf16 fp16; --quick: bf16)")
    ap.add_argument("--configs", choices=("auto", "all", "first"), default=None,
                    help="autotuned launches: every (pruned) config the autotuner would time ('all'), only its "
                         "first one ('first', default with --quick), or 'auto' (default): every config for the "
                         "training setup (bf16, head dim 64 bidirectional, D=512 loss), the first one elsewhere")
    ap.add_argument("--quick", action="store_true", help="one small case per kernel, bf16, first config")
    ap.add_argument("--cases", default=None, help="regex on case names (e.g. 'hd64 varlen')")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100/H200)")
    ap.add_argument("--sm-count", type=int, default=132, help="SMs of the target card (sizes persistent grids)")
    ap.add_argument("--ptx-only", action="store_true", help="stop at PTX (automatic when ptxas is missing)")
    ap.add_argument("--ptxas-stats", action="store_true", help="also run ptxas -v: registers and spill bytes")
    ap.add_argument("--jobs", type=int, default=1, help="compile in N processes (fork)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use Triton's normal cache (default: a fresh one, so that everything really compiles)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    dtypes = args.dtypes or (["bf16"] if args.quick else None)  # None: each group's defaults
    configs_mode = args.configs or ("first" if args.quick else "auto")
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

        launches, case_errors = collect(args.only, args.quick, dtypes, args.sm_count, args.cases)
        jobs = []
        for la in launches:
            every = configs_mode == "all" or (configs_mode == "auto" and la.primary)
            cfgs = la.configs if every else la.configs[:1]
            for label, extra in cfgs:
                jobs.append((la, label, extra, target, ptx_only, args.ptxas_stats, H100_MAX_SHARED))
        jobs = _dedupe(jobs, target)
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
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)

    _print_table(results, case_errors)
    n_err = sum(r["status"] != "ok" for r in results) + len(case_errors)
    print(f"\n{len(results)} compiled, {n_err} error(s), {wall:.0f} s wall")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__,
                                               "arch": args.arch, "stage": stage, "results": results,
                                               "case_errors": case_errors}, indent=1))
    return 1 if n_err else 0


def _progress(res, i, n, t0):
    # Errors as they happen and a heartbeat, so a long full run shows where it is.
    if res["status"] != "ok":
        print(f"ERROR {res['kernel']} [{res['case']}] {res['config']}: {res['error'].splitlines()[0][:200]}",
              flush=True)
    if (i + 1) % 100 == 0 or i + 1 == n:
        print(f"  {i + 1}/{n} compiled ({time.perf_counter() - t0:.0f} s)", flush=True)
    return res


def _print_table(results, case_errors):
    rows = [(r["kernel"], r["case"], r["spec"], r["config"], r["status"],
             "" if r["shared"] is None else str(r["shared"]), r["stats"], f"{r['seconds']:.1f}") for r in results]
    head = ("kernel", "case", "launch kwargs", "config", "status", "shared B", "ptxas", "s")
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*head))
    print(fmt.format(*("-" * w for w in widths)))
    for row in rows:
        print(fmt.format(*row))
    for r in results:
        if r["status"] != "ok":
            print(f"\nERROR {r['kernel']} [{r['case']}] {r['config']}:\n{r['error']}")
    for name, err in case_errors:
        print(f"\nERROR launcher [{name}]: {err}")


if __name__ == "__main__":
    sys.exit(main())
