"""The training loop behind ``bmclip train``: one readable function, ``train(cfg)``.

Per step: next batch -> normalise on device -> (GradCache) forward/backward with the global contrastive
loss -> non-finite check (all ranks agree) -> grad-norm clip -> AdamW step -> clamp logit scale -> log,
validate, checkpoint. Faults: a non-finite loss or grad norm skips the update (counted and logged);
``fault.max_nonfinite`` in a row raises NonFiniteLossError; a checkpoint is never written from
non-finite weights. Auto-resume (``resume=auto``) restarts from the newest valid checkpoint, which is
also how ``torchrun --max-restarts`` recovers from a dead rank.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bmclip.data.normalize import normalize_images
from bmclip.data.sources import DaliShardSource, ShardSource, SyntheticSource, synthetic_eval_set
from bmclip.errors import BmclipError, CheckpointError, ConfigError
from bmclip.io.resolve import load_weights_into
from bmclip.train import checkpoint as ckpt_mod
from bmclip.train.config import TrainConfig
from bmclip.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_flag,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    full_state_dicts,
    init_distributed,
    load_full_state_dicts,
    parallel_summary,
    sync_ignored_grads,
    unwrap,
    wrap_model,
)
from bmclip.train.gradcache import forward_backward
from bmclip.train.metrics import MetricsLogger, peak_tflops_for, plot_curves, read_jsonl, train_step_flops
from bmclip.train.optim import CosineSchedule, build_optimizer
from bmclip.train.runctl import Console, DataWaitInterrupted, OutDirLock, StopSignals


class NonFiniteLossError(BmclipError):
    """The loss (or gradient norm) was non-finite for ``fault.max_nonfinite`` steps in a row."""


# ---------------------------------------------------------------------------------------------------
# Set-up helpers

def _setup_determinism(cfg: TrainConfig) -> None:
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_model(cfg: TrainConfig, device: torch.device):
    from bmclip.model import create_model
    from bmclip.model.config import get_preset

    mcfg = get_preset(cfg.model.preset)
    overrides: dict = {
        "vision": {"patch_dropout": cfg.model.patch_dropout},
        "attn_backend": cfg.model.attn_backend,
        "image_attn_backend": cfg.model.image_attn_backend,
        "text_attn_backend": cfg.model.text_attn_backend,
        "fused_ops": cfg.model.fused_ops,
    }
    if cfg.loss.kind == "siglip" and mcfg.init_logit_bias is None:
        # SigLIP needs a learnable bias; the SigLIP paper initialises t' = log 10 and b = -10.
        overrides.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    model = create_model(mcfg, **overrides)
    if cfg.model.init_checkpoint:
        _load_init_weights(model, cfg.model.init_checkpoint)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device)


def _load_init_weights(model, path: str) -> None:
    """Weights from a model file, checkpoint dir, run dir or open_clip folder (``bmclip.io.resolve``)."""
    try:
        load_weights_into(model, path)
    except CheckpointError as e:
        raise CheckpointError(f"model.init_checkpoint: {e}") from None


def _build_loss(cfg: TrainConfig, info: DistInfo):
    """Callable (img, txt, scale, bias) -> scalar loss: the global loss, each rank holding its own rows."""
    try:
        from bmclip.kernels import ClipLoss, SigLipLoss
    except ImportError as e:
        raise ConfigError(f"loss: bmclip.kernels ClipLoss/SigLipLoss unavailable ({e})") from None
    common = {"rank": info.rank, "world_size": info.world_size}
    if cfg.loss.kind == "clip":
        loss = ClipLoss(local_loss=True, gather_with_grad=True, **common, **_backend_kw(ClipLoss, cfg))
        return lambda img, txt, scale, bias: loss(img, txt, scale)
    loss = SigLipLoss(**common, **_backend_kw(SigLipLoss, cfg))
    return lambda img, txt, scale, bias: loss(img, txt, scale, bias)


def _backend_kw(cls, cfg: TrainConfig) -> dict:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if "backend" in params:
        return {"backend": cfg.loss.backend}
    if cfg.loss.backend != "auto":
        raise ConfigError(f"loss.backend: {cls.__name__} takes no backend argument (got {cfg.loss.backend!r})")
    return {}


def _check_tokenizer_choice(cfg: TrainConfig) -> None:
    """Refuse the bundled small vocabulary for a model whose text tower expects a larger one."""
    if cfg.data.synthetic or cfg.data.tokenizer:
        return
    from bmclip.model.config import get_preset
    from bmclip.tokenizer import bundled_vocab_path, get_tokenizer

    want = get_preset(cfg.model.preset).text.vocab_size
    have = get_tokenizer().vocab_size
    if want > have:
        raise ConfigError(
            f"data.tokenizer: not set, and bmclip's bundled vocabulary ({bundled_vocab_path().name}, {have} tokens) "
            f"does not fit model {cfg.model.preset!r} ({want}-token text vocabulary, PubMedBERT's). Set "
            "--data.tokenizer to PubMedBERT's vocab.txt, e.g. the folder of the released BiomedCLIP model "
            "(microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) or of "
            "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract, or to a vocabulary trained with "
            "`bmclip tokenizer train`")


def _load_tokenizer(cfg: TrainConfig, context_length: int):
    from bmclip.tokenizer import Tokenizer, get_tokenizer

    if cfg.data.tokenizer:
        return Tokenizer.from_vocab(cfg.data.tokenizer, context_length=context_length, clean=cfg.data.tokenizer_clean)
    return get_tokenizer(context_length=context_length, clean=cfg.data.tokenizer_clean)


def augment_backend(cfg: TrainConfig, device: torch.device) -> str:
    """The data path ``data.augment_backend`` resolves to on ``device``: ``"torch"`` or ``"dali"``.

    ``auto``: DALI on CUDA when ``nvidia.dali`` imports, else bmclip's C++ loader + torch (also for
    synthetic data, which is generated decoded). An explicit ``dali`` without DALI is a ConfigError.
    """
    want = cfg.data.augment_backend
    if cfg.data.synthetic or want == "torch":
        return "torch"
    from bmclip.data.dali import dali_available

    if want == "auto":
        return "dali" if device.type == "cuda" and dali_available() else "torch"
    if not dali_available():
        raise ConfigError("data.augment_backend=dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130); "
                          "use data.augment_backend=torch for bmclip's C++ loader")
    return "dali"


def _build_source(cfg: TrainConfig, info: DistInfo, mcfg, tokenizer):
    b = cfg.data.batch_size
    if b % (info.world_size * cfg.data.grad_accum):
        raise ConfigError(f"data.batch_size {b} must be divisible by world_size*grad_accum "
                          f"= {info.world_size}*{cfg.data.grad_accum}")
    if cfg.data.synthetic:
        return SyntheticSource(size=cfg.data.synthetic_size, global_batch=b, image_size=mcfg.vision.image_size,
                               context_length=mcfg.text.context_length, seed=cfg.seed, rank=info.rank,
                               world_size=info.world_size)
    if not cfg.data.train:
        raise ConfigError("data.train: no training data; set data.train to a shard pattern (or data.synthetic=true)")
    from bmclip.data.loader import ShardLoader

    local, size = b // info.world_size, mcfg.vision.image_size
    dev = info.device
    dali = augment_backend(cfg, dev) == "dali"
    if dali:
        device_id = (dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" \
            else None

        def make_augment():
            from bmclip.data.dali import DaliAugment

            try:
                # nvJPEG ("mixed") decode on this rank's GPU; the CPU-only graph without CUDA
                return DaliAugment(batch_size=local, image_size=size, source="encoded", augment=cfg.data.augment,
                                   device_id=device_id, num_threads=cfg.data.num_threads, seed=cfg.seed,
                                   host_params=True)
            except Exception as e:  # any build failure is a configuration problem of this key
                raise ConfigError(f"data.augment_backend=dali: building the DALI pipeline failed ({type(e).__name__}: "
                                  f"{str(e).strip()[:300]}); use data.augment_backend=torch") from e

        try:
            first = make_augment()
        except ConfigError as e:
            if cfg.data.augment_backend == "dali":
                raise
            # auto chooses: DALI imports but cannot run here (e.g. no CUDA 13 driver) -> the C++ loader, said aloud
            print(f"[bmclip] rank {info.rank}: data.augment_backend=auto: {e}; decoding with bmclip's C++ loader "
                  "instead", file=sys.stderr, flush=True)
            dali = False
    loader = ShardLoader(cfg.data.train, batch_size=local, image_size=size,
                         num_threads=cfg.data.num_threads, augment=cfg.data.augment, shuffle=True,
                         seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                         resampled=cfg.data.resampled, shuffle_buffer=cfg.data.shuffle_buffer,
                         drop_last=True, tokenizer=tokenizer, pin_memory=dev.type == "cuda" and not dali,
                         decode=not dali)
    if not dali:
        return ShardSource(loader)
    # prefetch=1: DALI decodes batch n+1 in a background thread while step n trains (same batches, same
    # checkpointed state as without prefetch)
    return DaliShardSource(loader, make_augment, seed=cfg.seed, rank=info.rank, augment=cfg.data.augment,
                           scale=loader.scale, ratio=loader.ratio, prefetch=1, aug=first)


def _val_batches(cfg: TrainConfig, mcfg, tokenizer):
    """Held-out batches for retrieval (same every call): synthetic set or the val shards in order."""
    n_max = cfg.data.val_max_samples
    if cfg.data.synthetic:
        n = min(n_max, 512)
        ev = synthetic_eval_set(n, mcfg.vision.image_size, mcfg.text.context_length, seed=cfg.seed + 1000)
        for i in range(0, n, 128):
            yield ev["image"][i:i + 128], ev["input_ids"][i:i + 128]
        return
    from bmclip.data.loader import ShardLoader

    loader = ShardLoader(cfg.data.val, batch_size=128, image_size=mcfg.vision.image_size,
                         num_threads=cfg.data.num_threads, augment="center", shuffle=False,
                         resampled=False, drop_last=False, tokenizer=tokenizer)
    seen = 0
    for batch in loader:
        take = min(len(batch["image"]), n_max - seen)
        yield batch["image"][:take], batch["input_ids"][:take]
        seen += take
        if seen >= n_max:
            break


@torch.no_grad()
def validate(model, batches, device: torch.device, autocast) -> dict:
    """Retrieval R@1/5/10 both directions on held-out (image, input_ids) batches (model in eval mode)."""
    from bmclip.eval.retrieval import retrieval_metrics

    was_training = model.training
    model.eval()
    imgs, txts = [], []
    try:
        for im_u8, ids in batches:
            with autocast():
                imgs.append(model.encode_image(normalize_images(im_u8, device)).float().cpu())
                txts.append(model.encode_text(ids.to(device)).float().cpu())
    finally:
        model.train(was_training)
    if not imgs:
        return {}
    return retrieval_metrics(torch.cat(imgs), torch.cat(txts))


def _peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GiB: CUDA allocator peak on a GPU, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # VmHWM belongs to this address space; ru_maxrss survives exec on Linux, so a process started by a
    # bigger one (torchrun's agent, pytest) would report its parent's peak when that was higher.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB


# ---------------------------------------------------------------------------------------------------
# Checkpointing

def _save(cfg: TrainConfig, info: DistInfo, step: int, model, optimizer, sched, source, tokenizer,
          counters: dict, kill_midway: bool = False) -> Path | None:
    """Write checkpoint ``step`` (collective); never from non-finite weights."""
    bare = unwrap(model)
    model_sd, optim_sd = full_state_dicts(model, optimizer, cfg.parallel, info)
    poisoned = info.is_main and not all(bool(torch.isfinite(v).all()) for v in model_sd.values()
                                        if torch.is_tensor(v) and v.is_floating_point())
    if all_reduce_flag(poisoned, info):
        raise NonFiniteLossError(f"refusing to checkpoint step {step}: the weights contain NaN/Inf")
    root = Path(cfg.out_dir) / "checkpoints"
    w = ckpt_mod.CheckpointWriter(root, step, info.rank, info.world_size)
    if info.is_main:
        w.begin()
    barrier(info)
    w.write_rank({"rng": ckpt_mod.rng_state(), "loader": source.state_dict()})
    final = None
    if info.is_main:
        w.write_main(model_sd, bare.config.to_dict(),
                     {"optimizer": optim_sd, "scheduler": sched.state_dict(), "scaler": None, "step": step,
                      "counters": dict(counters), "config": cfg.to_dict()},
                     tokenizer=tokenizer)
        if kill_midway:  # fault injection: die with the temp dir half-written (no meta.json yet)
            os.kill(os.getpid(), signal.SIGKILL)
    barrier(info)
    if info.is_main:
        final = w.commit({"train_config": cfg.to_dict()})
        ckpt_mod.prune(root, cfg.keep_last)
    barrier(info)
    return final


def _find_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return ckpt_mod.latest_valid(Path(cfg.out_dir) / "checkpoints")
    p = Path(cfg.resume)
    if ckpt_mod.is_valid(p):
        return p
    latest = ckpt_mod.latest_valid(p / "checkpoints") or ckpt_mod.latest_valid(p)
    if latest is None:
        raise CheckpointError(f"resume: {cfg.resume} is not a valid checkpoint (or a dir containing one)")
    return latest


def _check_resume_compatible(cfg: TrainConfig, st: dict, model, resume_from: Path) -> None:
    """One-line ConfigError when the checkpoint is of another model or was trained on other data."""
    ts = st.get("train_state") or {}
    saved = ts.get("config") or st["meta"].get("train_config") or {}
    step = st["meta"].get("step", "?")
    where = (f"out_dir {cfg.out_dir} holds a checkpoint (step {step})" if cfg.resume == "auto"
             else f"resume checkpoint {resume_from} (step {step})")
    hint = ("use --resume=none to start afresh in this out_dir (its checkpoints are moved aside to "
            "checkpoints.replaced-*) or another --out_dir")
    theirs = {k: tuple(v.shape) for k, v in st["model"].items() if torch.is_tensor(v)}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if theirs != ours:
        old_preset = (saved.get("model") or {}).get("preset", "?")
        diff = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if theirs[k] != ours[k])
        k = diff[0]
        detail = (f"{k}: {theirs.get(k, 'absent')} there, {ours.get(k, 'absent')} here")
        raise ConfigError(f"{where} of a different model (model.preset {old_preset!r} there, {cfg.model.preset!r} "
                          f"here; {detail}); {hint}")
    old_data = saved.get("data") or {}
    new_data = cfg.to_dict()["data"]
    keys = ["synthetic"] + (["synthetic_size"] if cfg.data.synthetic else ["train"])
    diffs = [f"data.{k} {old_data[k]!r} there, {new_data[k]!r} here" for k in keys
             if k in old_data and old_data[k] != new_data[k]]
    if diffs:
        raise ConfigError(f"{where} trained on different data ({'; '.join(diffs)}); {hint}")


def _trim_metrics(path: Path, step: int) -> int:
    """Drop metrics.jsonl rows past ``step`` (they belong to steps this run replays); returns rows dropped."""
    if not path.is_file():
        return 0
    rows = read_jsonl(path)
    keep = [r for r in rows if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    with open(path, "rb") as f:
        torn = not f.read().endswith(b"\n") and path.stat().st_size > 0
    if len(keep) == len(rows) and not torn:
        return 0
    import json

    ckpt_mod.atomic_write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), path)
    return len(rows) - len(keep)


def _merge_data_stats(parts: list) -> dict | None:
    """Sum the per-rank ``data_stats()`` dicts (None where a source has none)."""
    parts = [p for p in parts if isinstance(p, dict)]
    if not parts:
        return None
    out = {"samples_read": 0, "samples_skipped": 0, "skipped_by_reason": {}, "tar_errors": 0, "example_error": None}
    for p in parts:
        for k in ("samples_read", "samples_skipped", "tar_errors"):
            out[k] += int(p.get(k) or 0)
        for r, n in (p.get("skipped_by_reason") or {}).items():
            out["skipped_by_reason"][r] = out["skipped_by_reason"].get(r, 0) + int(n)
        if out["example_error"] is None and p.get("example_error"):
            out["example_error"] = str(p["example_error"])
    # samples_read counts every sample taken from the shards, valid or skipped (the sources' data_stats contract)
    seen = out["samples_read"]
    out["skip_rate"] = out["samples_skipped"] / seen if seen else 0.0
    return out


def _data_stats(source, info: DistInfo) -> dict | None:
    """The loader's counters summed over ranks (a collective when the source has ``data_stats``)."""
    fn = getattr(source, "data_stats", None)
    if not callable(fn):
        return None
    return _merge_data_stats(all_gather_objects(fn(), info))


def _skip_warning(ds: dict, limit: float) -> str:
    top = sorted(ds["skipped_by_reason"].items(), key=lambda kv: -kv[1])[:3]
    why = ", ".join(f"{r} {n}" for r, n in top) or "reasons not reported"
    ex = f"; e.g. {ds['example_error']}" if ds.get("example_error") else ""
    return (f"[bmclip] WARNING: the data loader skipped {100 * ds['skip_rate']:.1f}% of the samples it read "
            f"({ds['samples_skipped']} of {ds['samples_read']}; data.max_skip_rate "
            f"{100 * limit:g}%): {why}{ex}")


def _banner(cfg: TrainConfig, info: DistInfo, mcfg, n_params: int, step: int, resume_from, use_bf16: bool) -> str:
    if cfg.data.synthetic:
        data = f"synthetic ({cfg.data.synthetic_size} pairs)"
    else:
        shown = cfg.data.train if len(cfg.data.train) <= 120 else cfg.data.train[:117] + "..."
        data = f"{shown} (tokenizer {cfg.data.tokenizer or 'bundled'})"
    dev = info.device
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    start = f"resuming from {resume_from} at step {step}" if resume_from is not None else "fresh start at step 0"
    return "\n".join([
        f"[bmclip] train: model {cfg.model.preset} ({n_params / 1e6:.2f}M parameters, image "
        f"{mcfg.vision.image_size}px, context {mcfg.text.context_length}), loss {cfg.loss.kind}",
        f"[bmclip] data: {data}; global batch {cfg.data.batch_size}"
        + (f" in {cfg.data.grad_accum} GradCache chunks" if cfg.data.grad_accum > 1 else ""),
        f"[bmclip] device {dev_name} ({dev.type}), world size {info.world_size}"
        + (f" ({cfg.parallel})" if info.world_size > 1 else "") + f", precision {'bf16' if use_bf16 else 'fp32'}",
        f"[bmclip] out_dir {cfg.out_dir} (config.yaml, metrics.jsonl, checkpoints/); {start}; {cfg.steps} steps",
    ])


# ---------------------------------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns a summary dict (steps, seconds, samples/s, last loss, ...)."""
    cfg.validate()
    # Process-wide torch settings are restored afterwards (train() is also called in-process by the demo
    # and the tests).
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    _setup_determinism(cfg)
    info = init_distributed(cfg.device)
    # closers registered by _train (progress bar, signal handlers, out_dir lock, DALI prefetch thread),
    # run in reverse order however it ends
    cleanup: list = []
    try:
        return _train(cfg, info, cleanup)
    finally:
        for close in reversed(cleanup):
            close()
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        if info.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, info: DistInfo, cleanup: list) -> dict:
    device = info.device
    out = Path(cfg.out_dir)
    _check_tokenizer_choice(cfg)
    lock_error = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        lock = OutDirLock(out, break_lock=cfg.break_lock)
        try:
            lock.acquire()
            cleanup.append(lock.release)
            if lock.note:
                print(f"[bmclip] out_dir lock: {lock.note}", file=sys.stderr, flush=True)
        except ConfigError as e:
            lock_error = e
    if all_reduce_flag(lock_error is not None, info):
        raise lock_error or ConfigError(f"out_dir {out}: rank 0 could not lock it (its message says why)")
    if info.is_main and cfg.resume == "none" and ckpt_mod.list_checkpoints(out / "checkpoints"):
        # A fresh start must not mix with an earlier run's checkpoints (auto-resume and pruning go by step
        # number, so the old run's higher steps would win): they are kept, renamed aside.
        aside = out / time.strftime("checkpoints.replaced-%Y%m%dT%H%M%S", time.gmtime())
        os.rename(out / "checkpoints", aside)
        print(f"[bmclip] resume=none: moved the earlier run's checkpoints to {aside}", file=sys.stderr, flush=True)
    signals = StopSignals(cfg.on_usr1, info.rank)
    signals.interrupt_data_wait = info.world_size == 1
    if signals.install():
        cleanup.append(signals.restore)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    _seed_all(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = _build_model(cfg, device)
    mcfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = None if cfg.data.synthetic else _load_tokenizer(cfg, mcfg.text.context_length)
    if tokenizer is not None and tokenizer.vocab_size > mcfg.text.vocab_size:
        raise ConfigError(f"data.tokenizer: vocabulary of {tokenizer.vocab_size} tokens exceeds the model's "
                          f"text.vocab_size {mcfg.text.vocab_size}")
    if cfg.export_open_clip:
        # Fail now, not after hours of training, when the architecture has no open_clip equivalent.
        from bmclip.interop import open_clip_config

        try:
            open_clip_config(model)
        except BmclipError as e:
            raise ConfigError(f"export_open_clip: {e} (set --export_open_clip=false)") from None
    # Read (and check) the checkpoint before anything is wrapped: a checkpoint of another model or other
    # data is a one-line error, not a state-dict traceback.
    step = 0
    counters = {"nonfinite_skipped": 0, "samples": 0}
    resume_from = _find_resume(cfg)
    st = None
    if resume_from is not None:
        st = ckpt_mod.load_checkpoint(resume_from, info.rank)
        _check_resume_compatible(cfg, st, model, resume_from)
    fwd_model = torch.compile(model) if cfg.model.compile else model
    fwd_model = wrap_model(fwd_model, info, cfg.parallel, mixed_bf16=use_bf16)
    if info.initialized and info.is_main:
        print(f"[bmclip] parallel over {info.world_size} ranks: {parallel_summary(fwd_model)}", flush=True)
    optimizer = build_optimizer(model if cfg.parallel != "fsdp" else fwd_model, cfg.optim, device.type)
    sched = CosineSchedule(optimizer, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                           total_steps=cfg.steps, min_lr=cfg.optim.min_lr)
    loss_fn = _build_loss(cfg, info)
    source = _build_source(cfg, info, mcfg, tokenizer)
    if isinstance(source, DaliShardSource):
        cleanup.append(source.close)
    # Per-rank RNG stream for patch dropout / augmentation: distinct across ranks, fixed per seed.
    _seed_all(cfg.seed * 1000 + 17 + info.rank)

    if st is not None:
        ts = st["train_state"]
        load_full_state_dicts(fwd_model, optimizer, st["model"], ts["optimizer"], cfg.parallel, info)
        sched.load_state_dict(ts["scheduler"])
        step = int(ts["step"])
        counters.update(ts.get("counters", {}))
        if st["rank_state"] is not None and st["meta"]["world_size"] == info.world_size:
            ckpt_mod.set_rng_state(st["rank_state"]["rng"])
            try:
                source.load_state_dict(st["rank_state"]["loader"])
            except (KeyError, ValueError, TypeError, IndexError, BmclipError) as e:
                raise ConfigError(
                    f"resume from {resume_from}: its data-loader position does not fit this run's data "
                    f"({type(e).__name__}: {str(e)[:160]}); use --resume=none or another --out_dir") from None
        elif info.is_main:
            print(f"[bmclip] resume: world size changed ({st['meta']['world_size']} -> {info.world_size}); "
                  "data order and RNG restart from the seed", flush=True)
        if info.is_main:
            print(f"[bmclip] resumed from {resume_from} at step {step}", flush=True)
        del st

    if info.is_main:
        dropped = _trim_metrics(out / "metrics.jsonl", step)
        if dropped:
            print(f"[bmclip] metrics.jsonl: dropped {dropped} rows past step {step} (replayed by this run)",
                  flush=True)
        import yaml

        ckpt_mod.atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), out / "config.yaml")
        print(_banner(cfg, info, mcfg, n_params, step, resume_from, use_bf16), flush=True)
    logger = MetricsLogger(out, enabled=info.is_main, tensorboard=cfg.tensorboard)
    cleanup.append(logger.close)
    peak = cfg.peak_tflops or (peak_tflops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    console = Console(info.is_main, cfg.progress, total=cfg.steps, initial=step)
    cleanup.append(console.close)

    pad_id = mcfg.text.pad_id
    chunks = cfg.data.grad_accum
    max_log_scale = math.log(cfg.loss.max_logit_scale)
    consecutive_bad = 0
    win = {"t0": time.perf_counter(), "data": 0.0, "loss": 0.0, "n": 0, "flops": 0.0, "samples": 0}
    last_loss = float("nan")
    t_start = time.perf_counter()
    steps_run = 0
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    stop_early = stop_signal = False
    stop_signum = 0
    last_saved = step  # the step of the newest checkpoint (the resume point, or 0: nothing to save yet)
    data_stats = None
    skip_warned = False
    while step < cfg.steps and not (stop_early or stop_signal):
        signals.step = step
        t_data = time.perf_counter()
        bad_before = getattr(source, "bad_batches", 0)
        try:
            with signals.data_wait():
                if cfg.fault.data_sleep_s:
                    time.sleep(cfg.fault.data_sleep_s)
                batch = next(source)
        except DataWaitInterrupted:
            # A single-process run stopped while waiting for data: checkpoint the last finished step (the
            # source's state is that of the batches it handed out) unless it is already saved.
            stop_signal, stop_signum = True, signals.stop_signum()
            if step > last_saved:
                _save(cfg, info, step, fwd_model, optimizer, sched, source, tokenizer, counters)
            break
        ids_cpu = batch["input_ids"]
        if "images" in batch:  # DALI: already decoded, augmented and normalised (on this GPU under CUDA)
            images = batch["images"].to(device, non_blocking=True)
        else:
            images = normalize_images(batch["image"], device)
        input_ids = ids_cpu.to(device, non_blocking=True)
        win["data"] += time.perf_counter() - t_data
        if getattr(source, "bad_batches", 0) != bad_before:
            # an image that passed the loader's header check failed to decode in DALI: its batch was
            # skipped (and replaced by the next one); counted in the checkpointed source state
            logger.log({"step": step + 1, "kind": "data_skip", "rank": info.rank, "reason": source.last_error,
                        "bad_batches": source.bad_batches, "bad_samples": source.bad_samples})
            msg = (f"[bmclip] rank {info.rank}: skipped an undecodable batch ({source.last_error}); "
                   f"{source.bad_batches} so far")
            if info.is_main:
                console.say(msg, err=True)
            else:
                print(msg, file=sys.stderr, flush=True)

        lr = sched.set_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(fwd_model, images, input_ids, loss_fn, chunks=chunks, autocast=autocast,
                                inject_nan=step in cfg.fault.nan_at_steps)
        sync_ignored_grads(fwd_model, info)  # FSDP2: replicated scalar params (no-op otherwise)
        loss_val = float(loss)
        bad = not math.isfinite(loss_val)
        grad_norm = float("nan")
        if not all_reduce_flag(bad, info):
            params = [p for p in fwd_model.parameters() if p.grad is not None]
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            bad = not math.isfinite(grad_norm)
        bad = all_reduce_flag(bad, info)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            counters["nonfinite_skipped"] += 1
            consecutive_bad += 1
            if info.is_main:
                logger.log({"step": step + 1, "kind": "skip", "reason": "non-finite loss or grad norm",
                            "loss": loss_val, "nonfinite_skipped": counters["nonfinite_skipped"]})
            if consecutive_bad >= cfg.fault.max_nonfinite:
                raise NonFiniteLossError(
                    f"{consecutive_bad} non-finite losses in a row (step {step + 1}); stopping. Lower "
                    f"optim.lr or check the data; the last good checkpoint is in {out / 'checkpoints'}")
        else:
            consecutive_bad = 0
            optimizer.step()
            with torch.no_grad():  # CLIP: clamp the learned temperature at 100 (ln 100 on the log scale)
                unwrap(model).logit_scale.clamp_(0, max_log_scale)
            last_loss = loss_val
            win["loss"] += loss_val
            win["n"] += 1
        step += 1
        steps_run += 1
        signals.step = step
        counters["samples"] += cfg.data.batch_size
        win["samples"] += cfg.data.batch_size
        # Model FLOPs of this rank's rows (its text tokens, its image rows vs all columns of the logits).
        counts = (ids_cpu != pad_id).sum(1).tolist()
        win["flops"] += train_step_flops(mcfg, batch=len(counts), text_token_counts=counts,
                                         patch_dropout=cfg.model.patch_dropout,
                                         logit_columns=cfg.data.batch_size)
        if cfg.fault.step_sleep_s:
            time.sleep(cfg.fault.step_sleep_s)
        # Step boundary: every rank agrees (one collective) on the wall-clock budget (e.g. the demo's),
        # a stop signal (SIGTERM / SIGINT / SIGUSR1=stop) and a SIGUSR1 checkpoint request received by any
        # rank, so all ranks stop or checkpoint at this same step.
        over_budget = bool(cfg.max_seconds) and time.perf_counter() - t_start > cfg.max_seconds
        over_budget, stop_signum, ckpt_request = all_reduce_max(
            [over_budget, signals.stop_signum(), signals.take_checkpoint_request()], info)
        stop_early, stop_signal, ckpt_request = over_budget > 0, stop_signum > 0, ckpt_request > 0
        final = step == cfg.steps or stop_early or stop_signal
        console.update(1, loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")

        if step % cfg.log_every == 0 or final:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - win["t0"]
            mean_loss = all_reduce_mean(win["loss"] / max(win["n"], 1), info) if win["n"] else float("nan")
            sps = win["samples"] / dt
            rec = {"step": step, "kind": "train", "loss": mean_loss, "lr": lr,
                   "logit_scale": float(unwrap(model).logit_scale.detach().exp()),
                   "grad_norm": grad_norm, "samples_per_s": sps, "samples_per_s_per_gpu": sps / info.world_size,
                   "data_wait_frac": win["data"] / dt, "peak_mem_gb": _peak_memory_gb(device),
                   "tflops_per_gpu": win["flops"] / dt / 1e12,
                   "mfu": (win["flops"] / dt / (peak * 1e12)) if peak else None,
                   "nonfinite_skipped": counters["nonfinite_skipped"], "world_size": info.world_size}
            if isinstance(source, DaliShardSource):
                rec["data_bad_batches"] = source.bad_batches  # rank 0's count (each rank skips its own)
            data_stats = _data_stats(source, info)
            if data_stats is not None:
                over = data_stats["skip_rate"] > cfg.data.max_skip_rate
                rec.update({"data_samples_read": data_stats["samples_read"],
                            "data_samples_skipped": data_stats["samples_skipped"],
                            "data_skip_rate": data_stats["skip_rate"], "data_tar_errors": data_stats["tar_errors"],
                            "data_skipped_by_reason": data_stats["skipped_by_reason"],
                            "data_skip_rate_exceeded": over})
                if over and not skip_warned and info.is_main:
                    console.say(_skip_warning(data_stats, cfg.data.max_skip_rate), err=True)
                    skip_warned = True
            logger.log(rec)
            elapsed = time.perf_counter() - t_start
            console.step_line(step, mean_loss, lr, sps, (cfg.steps - step) * elapsed / max(steps_run, 1))
            win = {"t0": time.perf_counter(), "data": 0.0, "loss": 0.0, "n": 0, "flops": 0.0, "samples": 0}

        # A signal stop skips validation (a scheduler's grace period is for the checkpoint).
        do_val = (cfg.data.synthetic or cfg.data.val) and not (stop_signal and step < cfg.steps) and (
            (cfg.val_every and step % cfg.val_every == 0) or final)
        if do_val:
            t_val = time.perf_counter()
            metrics = _run_val(cfg, info, fwd_model, model, mcfg, tokenizer, device, autocast)
            if info.is_main and metrics:
                logger.log({"step": step, "kind": "val", **metrics})
            win["t0"] += time.perf_counter() - t_val  # validation time is not training throughput

        if cfg.fault.kill_at_step == step and cfg.fault.kill_rank in (-1, info.rank):
            # One-shot: a marker in out_dir keeps a restarted job (torchrun --max-restarts) from dying again.
            marker = out / f".fault_killed_step{step}_rank{info.rank}"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or final or ckpt_request:
            t_ck = time.perf_counter()
            path = _save(cfg, info, step, fwd_model, optimizer, sched, source, tokenizer, counters,
                         kill_midway=cfg.fault.kill_in_checkpoint_at_step == step)
            last_saved = step
            if ckpt_request and info.is_main:
                console.say(f"[bmclip] SIGUSR1: checkpoint {path} written; continuing", err=True)
            win["t0"] += time.perf_counter() - t_ck

    seconds = time.perf_counter() - t_start
    stop_signal = stop_signal and step < cfg.steps  # a signal at the very last step: the run is complete
    console.close()
    logger.close()
    summary = {"steps": step, "steps_this_run": steps_run, "seconds": seconds, "stopped_early": stop_early,
               "samples_per_s": steps_run * cfg.data.batch_size / seconds if seconds > 0 else None,
               "last_loss": last_loss, "nonfinite_skipped": counters["nonfinite_skipped"],
               "augment_backend": "dali" if isinstance(source, DaliShardSource) else "torch",
               "data_bad_batches": getattr(source, "bad_batches", 0), "out_dir": str(out)}
    if data_stats is not None:
        summary["data"] = {**data_stats, "skip_rate_exceeded": data_stats["skip_rate"] > cfg.data.max_skip_rate}
    if stop_signal:
        # the signal received (by any rank: the highest number when ranks got different ones)
        summary["stopped_by_signal"] = signal.Signals(int(stop_signum)).name
        if info.is_main:
            where = (f"checkpoint {out / 'checkpoints' / ckpt_mod.step_dir_name(step)}" if step else
                     "no step had finished, nothing to checkpoint")
            print(f"[bmclip] stopped by {summary['stopped_by_signal']} at step {step} of {cfg.steps}; {where}; "
                  "rerun the same command to resume", file=sys.stderr, flush=True)
    if info.is_main:
        records = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
        summary["curves"] = [str(p) for p in plot_curves(records, out)]
        vals = [r for r in records if r.get("kind") == "val"]
        if vals:
            summary["val"] = {k: v for k, v in vals[-1].items() if k not in ("kind",)}
    # An interrupted run is not finished: no open_clip export (the checkpoint has everything).
    if cfg.export_open_clip and not stop_signal:
        if info.is_main:
            from bmclip.interop import export_open_clip

            export_open_clip(unwrap(model) if cfg.parallel != "fsdp" else _gathered_copy(fwd_model, optimizer, cfg,
                                                                                      info, mcfg),
                             out / "open_clip", tokenizer=tokenizer)
            summary["open_clip"] = str(out / "open_clip")
        elif cfg.parallel == "fsdp":
            _gathered_copy(fwd_model, optimizer, cfg, info, mcfg)  # collective: every rank takes part
    barrier(info)
    return summary


def _gathered_copy(fwd_model, optimizer, cfg, info, mcfg):
    """Full (unsharded) CPU copy of an FSDP model for export (a collective: all ranks call it)."""
    from bmclip.model import create_model

    sd, _ = full_state_dicts(fwd_model, optimizer, cfg.parallel, info)
    m = create_model(mcfg)
    m.load_state_dict(sd)
    return m


def _run_val(cfg, info, fwd_model, model, mcfg, tokenizer, device, autocast) -> dict:
    if cfg.parallel == "fsdp" and info.initialized:
        # Sharded parameters: every rank runs the same forward (all-gathers are collective).
        return validate(fwd_model, _val_batches(cfg, mcfg, tokenizer), device, autocast)
    metrics = {}
    if info.is_main:
        metrics = validate(model, _val_batches(cfg, mcfg, tokenizer), device, autocast)
    barrier(info)
    return metrics
