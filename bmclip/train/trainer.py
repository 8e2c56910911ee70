"""The training loop behind ``bmclip train``: ``train(cfg)``.

:class:`Trainer` builds the run's components from the config, then :meth:`Trainer.fit` runs the loop. Per step:
next batch -> (GradCache) forward/backward with the global contrastive loss (``train.losses``) -> the
non-finite guard (all ranks agree; grad-norm clip) -> AdamW step -> clamp the logit scale -> the step
boundary (all ranks agree on stop signals and the time budget) -> log (``ThroughputMeter``), validate
(``Validator``), checkpoint (``CheckpointManager``). A non-finite loss or grad norm skips the update (counted
and logged); ``fault.max_nonfinite`` in a row raise NonFiniteLossError; a checkpoint is never written from
non-finite weights. Auto-resume (``resume=auto``) restarts from the newest valid checkpoint, which is also
how ``torchrun --max-restarts`` recovers from a dead rank. The ``fault.*`` injection keys used by the tests
attach through ``train.hooks``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from bmclip.data import dali as dali_mod  # module attributes: tests replace DaliAugment / dali_available
from bmclip.data.loader import ShardLoader
from bmclip.data.normalize import normalize_images
from bmclip.data.shards import expand_urls, shards_moved, urls_digest
from bmclip.data.sources import DaliShardSource, ShardSource, SyntheticSource
from bmclip.errors import BmclipError, CheckpointError, ConfigError
from bmclip.interop import export_open_clip, open_clip_config
from bmclip.io import atomic_write_text
from bmclip.model import create_model
from bmclip.model.config import get_preset as get_model_preset
from bmclip.resolve import load_weights_into, locate_model
from bmclip.tokenizer import Tokenizer, bundled_vocab_path, get_tokenizer
from bmclip.train import checkpoint as ckpt_mod
from bmclip.train.checkpoint import CheckpointManager
from bmclip.train.config import TrainConfig, config_warnings
from bmclip.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_flag,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    full_state_dicts,
    init_distributed,
    parallel_summary,
    sync_ignored_grads,
    wrap_model,
)
from bmclip.train.gradcache import forward_backward
from bmclip.train.guard import NonFiniteGuard, NonFiniteLossError
from bmclip.train.hooks import FaultInjector, Hooks
from bmclip.train.losses import LogitScale, get_loss
from bmclip.train.metrics import (
    MetricsLogger,
    ThroughputMeter,
    peak_memory_gb,
    peak_tflops_for,
    plot_curves,
    read_jsonl,
    trim_jsonl,
)
from bmclip.train.optim import CosineSchedule, build_optimizer, check_resume_grouping
from bmclip.train.runctl import Console, DataWaitInterrupted, OutDirLock, StopSignals
from bmclip.train.runctl import resume_hint as runctl_resume_hint
from bmclip.train.validation import Validator, validate

__all__ = ["NonFiniteLossError", "Trainer", "augment_backend", "train", "validate"]


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
    """The model of ``model.preset`` with the training switches; its logit scale/bias start where the loss
    (``loss.kind``'s registry entry) says."""
    mcfg = get_model_preset(cfg.model.preset)
    overrides: dict = {
        "vision": {"patch_dropout": cfg.model.patch_dropout},
        "attn_backend": cfg.model.attn_backend,
        "image_attn_backend": cfg.model.image_attn_backend,
        "text_attn_backend": cfg.model.text_attn_backend,
        "fused_ops": cfg.model.fused_ops,
        **get_loss(cfg.loss.kind).model_overrides(),
    }
    model = create_model(mcfg, **overrides)
    if cfg.model.init_checkpoint:
        _load_init_weights(model, cfg.model.init_checkpoint)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device)


def _load_init_weights(model, path: str) -> None:
    """Weights from a model file, checkpoint dir, run dir or open_clip folder (``bmclip.resolve``)."""
    try:
        load_weights_into(model, path)
    except CheckpointError as e:
        raise CheckpointError(f"model.init_checkpoint: {e}") from None


def _init_checkpoint_vocab(cfg: TrainConfig) -> Path | None:
    """The folder of the vocab.txt shipped with ``model.init_checkpoint`` (None: none, or no init checkpoint)."""
    if not cfg.model.init_checkpoint:
        return None
    try:
        return locate_model(cfg.model.init_checkpoint).tokenizer_dir
    except CheckpointError as e:
        raise CheckpointError(f"model.init_checkpoint: {e}") from None


def _check_tokenizer_choice(cfg: TrainConfig, is_main: bool = True) -> None:
    """Take the tokenizer shipped with ``model.init_checkpoint`` when ``data.tokenizer`` is unset (its weights were
    trained with it: the bundled vocabulary would give its embeddings other words), warn when ``data.tokenizer``
    is another vocabulary than the one shipped, and refuse the bundled small vocabulary for a model whose text
    tower expects a larger one."""
    if cfg.data.synthetic:
        return
    shipped = _init_checkpoint_vocab(cfg)
    if shipped is not None and not cfg.data.tokenizer:
        cfg.data.tokenizer = str(shipped)
        if is_main:
            print(f"[bmclip] data.tokenizer: not set, so the vocabulary shipped with model.init_checkpoint: "
                  f"{shipped / 'vocab.txt'}", file=sys.stderr, flush=True)
    elif shipped is not None and is_main:
        given = Path(cfg.data.tokenizer)
        given = given / "vocab.txt" if given.is_dir() else given
        with contextlib.suppress(OSError):
            if given.read_bytes() != (shipped / "vocab.txt").read_bytes():
                print(f"[bmclip] WARNING: data.tokenizer {given} is not the vocabulary model.init_checkpoint was "
                      f"trained with ({shipped / 'vocab.txt'}): its token embeddings will be read as other words",
                      file=sys.stderr, flush=True)
    if cfg.data.tokenizer:
        return
    want = get_model_preset(cfg.model.preset).text.vocab_size
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
    if want == "auto":
        return "dali" if device.type == "cuda" and dali_mod.dali_available() else "torch"
    if not dali_mod.dali_available():
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
    local, size = b // info.world_size, mcfg.vision.image_size
    dev = info.device
    dali = augment_backend(cfg, dev) == "dali"
    if dali:
        device_id = (dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" \
            else None

        def make_augment():
            try:
                # nvJPEG ("mixed") decode on this rank's GPU; the CPU-only graph without CUDA
                return dali_mod.DaliAugment(batch_size=local, image_size=size, source="encoded",
                                            augment=cfg.data.augment, device_id=device_id,
                                            num_threads=cfg.data.num_threads, seed=cfg.seed, host_params=True)
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
                         decode=not dali, cache_dir=cfg.data.cache_dir or None, cache_bytes=cfg.data.cache_bytes,
                         prefetch_shards=cfg.data.prefetch_shards)
    if not dali:
        return ShardSource(loader)
    # prefetch=1: DALI decodes batch n+1 in a background thread while step n trains (same batches, same
    # checkpointed state as without prefetch)
    return DaliShardSource(loader, make_augment, seed=cfg.seed, rank=info.rank, augment=cfg.data.augment,
                           scale=loader.scale, ratio=loader.ratio, prefetch=1, aug=first)


def _check_exportable(model) -> None:
    """Fail now, not after hours of training, when the architecture has no open_clip equivalent."""
    try:
        open_clip_config(model)
    except BmclipError as e:
        raise ConfigError(f"export_open_clip: {e} (set --export_open_clip=false)") from None


def _check_resume_compatible(cfg: TrainConfig, st: dict, model, resume_from: Path, info: DistInfo) -> None:
    """One-line ConfigError when the checkpoint is of another model or was trained on other data (every rank calls
    it: the verdict on moved shards is rank 0's, whose loader state every checkpoint holds)."""
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
    check_resume_grouping(saved, cfg.optim)  # AdamW's state fits only the weight-decay groups it was saved with
    old_data = saved.get("data") or {}
    new_data = cfg.to_dict()["data"]
    keys = ["synthetic"] + (["synthetic_size"] if cfg.data.synthetic else ["train"])
    diffs = [k for k in keys if k in old_data and old_data[k] != new_data[k]]
    # (the same on every rank: the config and the checkpoint's config are, so every rank calls the collective)
    if diffs == ["train"] and all_gather_objects(_same_shards_moved(st, cfg.data.train), info)[0]:
        # a rank the checkpoint's run did not have holds no loader state of its own: rank 0's verdict is everyone's
        if info.is_main:
            same_world = st["meta"].get("world_size") == info.world_size
            where = "resuming at the same position" if same_world else "resuming"  # (a line below says why not)
            print(f"[bmclip] data.train moved: {old_data['train']!r} there, {new_data['train']!r} here; the same "
                  f"shard file names in the same order, so {where} (if these are other shards "
                  "under the same names, stop and use --resume=none)", file=sys.stderr, flush=True)
        return
    if diffs:
        detail = "; ".join(f"data.{k} {old_data[k]!r} there, {new_data[k]!r} here" for k in diffs)
        raise ConfigError(f"{where} trained on different data ({detail}); {hint}")


def _optim_changes(st: dict, cfg: TrainConfig) -> str:
    """The ``optim`` settings that differ from the checkpoint's run, as "optim.k a -> b, ..." ('' if none)."""
    ts = st.get("train_state") or {}
    saved = ((ts.get("config") or st["meta"].get("train_config") or {}).get("optim")) or {}
    now = cfg.to_dict()["optim"]
    return ", ".join(f"optim.{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k])


def _same_shards_moved(st: dict, train: str) -> bool:
    """The checkpoint's loader read shards with the same file names, in the same order, as ``train`` names now
    (the data set copied to another place: node-local scratch, another mount, an object store)."""
    state = ((st.get("rank_state") or {}).get("loader") or {}).get("loader") or {}
    if not isinstance(state, dict):
        return False
    try:
        urls = expand_urls(train)
    except BmclipError:
        return False
    urls_sha1 = str(state.get("urls_sha1") or "")
    # the same URLs spelled another way (a brace pattern for a "::" list) are the same shards, not moved ones
    return urls_sha1 == urls_digest(urls) or shards_moved(urls_sha1, str(state.get("names_sha1") or ""), urls)


def _merge_data_stats(parts: list) -> dict | None:
    """Sum the per-rank ``data_stats()`` dicts (None where a source has none)."""
    parts = [p for p in parts if isinstance(p, dict)]
    if not parts:
        return None
    out = {"samples_read": 0, "samples_skipped": 0, "skipped_by_reason": {}, "tar_errors": 0, "example_error": None,
           "bytes_fetched": 0, "shards_fetch_failed": 0, "fetch_wait_s": 0.0}
    for p in parts:
        for k in ("samples_read", "samples_skipped", "tar_errors", "bytes_fetched", "shards_fetch_failed"):
            out[k] += int(p.get(k) or 0)
        for k in ("bad_batches", "bad_samples"):  # DALI: batches that failed to decode, on every rank
            if k in p:
                out[k] = out.get(k, 0) + int(p[k] or 0)
        # remote shards: the rank that waited longest for downloads is the one that held the others back
        out["fetch_wait_s"] = max(out["fetch_wait_s"], float(p.get("fetch_wait_s") or 0.0))
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
# The run

# A first step at least this slow gets a line of its own (Trainer._note_slow_first_step).
FIRST_STEP_NOTE_S = 20.0


def train(cfg: TrainConfig, *, resume_hint: str | None = None) -> dict:
    """Run training as configured; returns a summary dict (steps, seconds, samples/s, last loss, ...).

    ``resume_hint`` replaces what a run stopped by a signal tells the operator to do next (by default, from
    ``cfg.resume``: :func:`bmclip.train.runctl.resume_hint`); a program that drives the trainer itself, like
    the demo, says how *it* goes on.
    """
    cfg.validate()
    # Process-wide torch settings are restored afterwards (train() is also called in-process by the demo
    # and the tests).
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    _setup_determinism(cfg)
    info = init_distributed(cfg.device)
    # closers registered while setting up (progress bar, signal handlers, out_dir lock, DALI prefetch thread,
    # metrics files), run in reverse order however the run ends
    cleanup: list = []
    try:
        return Trainer(cfg, info, cleanup, resume_hint).fit()
    finally:
        for close in reversed(cleanup):
            close()
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        if info.initialized:
            dist.destroy_process_group()


class Trainer:
    """One training run: ``__init__`` builds the components (and resumes), ``fit()`` runs the loop.

    ``cleanup`` collects closers for the caller to run in reverse order however the run ends.
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo, cleanup: list, resume_hint: str | None = None):
        self.cfg, self.info = cfg, info
        self.resume_hint = resume_hint or runctl_resume_hint(cfg.resume)
        self.device = device = info.device
        self.out = out = Path(cfg.out_dir)
        _check_tokenizer_choice(cfg, info.is_main)
        self._lock_out_dir(cleanup)
        self.hooks = FaultInjector(cfg.fault, out, info.rank).install(Hooks())
        self.ckpt = CheckpointManager(out, info, keep_last=cfg.keep_last, every=cfg.ckpt_every,
                                      parallel=cfg.parallel, train_config=cfg.to_dict(), hooks=self.hooks)
        if info.is_main and cfg.resume == "none":
            aside = self.ckpt.set_aside(time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
            if aside is not None:
                print(f"[bmclip] resume=none: moved the earlier run's checkpoints to {aside}", file=sys.stderr,
                      flush=True)
        self.signals = StopSignals(cfg.on_usr1, info.rank, self.resume_hint)
        self.signals.interrupt_data_wait = info.world_size == 1
        if self.signals.install():
            cleanup.append(self.signals.restore)
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16
                         else contextlib.nullcontext)

        _seed_all(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        self.model = model = _build_model(cfg, device)
        self.mcfg = mcfg = model.config
        n_params = sum(p.numel() for p in model.parameters())
        self.tokenizer = tokenizer = None if cfg.data.synthetic else _load_tokenizer(cfg, mcfg.text.context_length)
        if tokenizer is not None and tokenizer.vocab_size > mcfg.text.vocab_size:
            raise ConfigError(f"data.tokenizer: vocabulary of {tokenizer.vocab_size} tokens exceeds the model's "
                              f"text.vocab_size {mcfg.text.vocab_size}")
        if cfg.export_open_clip:
            _check_exportable(model)
        # Read (and check) the checkpoint before anything is wrapped: a checkpoint of another model or other
        # data is a one-line error, not a state-dict traceback.
        resume_from = self.ckpt.find_resume(cfg.resume)
        st = None
        if resume_from is not None:
            st, resume_from = self.ckpt.load_for_resume(
                resume_from, cfg.resume == "auto", say=lambda m: print(m, file=sys.stderr, flush=True))
            _check_resume_compatible(cfg, st, model, resume_from, info)
        fwd = torch.compile(model) if cfg.model.compile else model
        self.fwd_model = fwd = wrap_model(fwd, info, cfg.parallel, mixed_bf16=use_bf16)
        if info.initialized and info.is_main:
            print(f"[bmclip] parallel over {info.world_size} ranks: {parallel_summary(fwd)}", flush=True)
        self.optimizer = build_optimizer(model if cfg.parallel != "fsdp" else fwd, cfg.optim, device.type)
        self.sched = CosineSchedule(self.optimizer, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                                    total_steps=cfg.steps, min_lr=cfg.optim.min_lr)
        self.loss_fn = get_loss(cfg.loss.kind).build(rank=info.rank, world_size=info.world_size,
                                                     backend=cfg.loss.backend)
        self.logit_scale = LogitScale(cfg.loss.max_logit_scale)
        self.source = _build_source(cfg, info, mcfg, tokenizer)
        if isinstance(self.source, DaliShardSource):
            cleanup.append(self.source.close)
        # Per-rank RNG stream for patch dropout / augmentation: distinct across ranks, fixed per seed.
        _seed_all(cfg.seed * 1000 + 17 + info.rank)

        self.step, self.counters = 0, {"nonfinite_skipped": 0, "samples": 0}
        if st is not None:
            # the optimizer's state (moments, step counts) comes from the checkpoint, its settings from this run's
            # config: load_state_dict would bring back the saved run's weight decay, betas and eps, while
            # config.yaml says otherwise (the learning rate is the schedule's, rebuilt from this config)
            fresh = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                     for g in self.optimizer.param_groups]
            self.step, counters, same_world = self.ckpt.restore(st, resume_from, fwd, self.optimizer, self.sched,
                                                                self.source)
            changed = _optim_changes(st, cfg)
            for g, f in zip(self.optimizer.param_groups, fresh):
                g.update(f)
            if info.is_main and changed:
                print(f"[bmclip] resume: {changed} (this run's config applies; the optimizer's moments are the "
                      "checkpoint's)", file=sys.stderr, flush=True)
            self.counters.update(counters)
            if info.is_main and not same_world:
                print(f"[bmclip] resume: world size changed ({st['meta']['world_size']} -> {info.world_size}); "
                      "data order and RNG restart from the seed", flush=True)
            if info.is_main:
                print(f"[bmclip] resumed from {resume_from} at step {self.step}", flush=True)
            del st
        if info.is_main:
            dropped = trim_jsonl(out / "metrics.jsonl", self.step)
            if dropped:
                print(f"[bmclip] metrics.jsonl: dropped {dropped} rows past step {self.step} (replayed by this "
                      "run)", flush=True)
            atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), out / "config.yaml")
            print(_banner(cfg, info, mcfg, n_params, self.step, resume_from, use_bf16), flush=True)
            for w in config_warnings(cfg):
                print(f"[bmclip] WARNING: {w}", file=sys.stderr, flush=True)

        self.logger = MetricsLogger(out, enabled=info.is_main, tensorboard=cfg.tensorboard)
        cleanup.append(self.logger.close)
        self.console = Console(info.is_main, cfg.progress, total=cfg.steps, initial=self.step)
        cleanup.append(self.console.close)
        self.guard = NonFiniteGuard(info, max_in_a_row=cfg.fault.max_nonfinite, grad_clip=cfg.optim.grad_clip,
                                    skipped=self.counters["nonfinite_skipped"], on_skip=self.logger.log,
                                    hint=f"; the last good checkpoint is in {out / 'checkpoints'}")
        peak = cfg.peak_tflops or (peak_tflops_for(torch.cuda.get_device_name(device)) if device.type == "cuda"
                                   else None)
        self.meter = ThroughputMeter(mcfg, global_batch=cfg.data.batch_size, world_size=info.world_size,
                                     patch_dropout=cfg.model.patch_dropout, peak_tflops=peak)
        self.validator = Validator(cfg, info, mcfg, tokenizer, self.autocast)
        self.pad_id = mcfg.text.pad_id
        self.steps_run, self.last_loss = 0, float("nan")
        self.stop_early, self.stop_signum = False, 0  # time budget spent; the stop signal all ranks agreed on
        self.data_stats, self.skip_warned = None, False
        self.skip_rows: list[dict] = []  # this rank's data_skip rows since the last log (rank 0 writes every rank's)

    @property
    def stopping(self) -> bool:
        return self.stop_early or self.stop_signum > 0

    def fit(self) -> dict:
        """Train from ``self.step`` to ``train.steps`` (or a stop); returns the run's summary."""
        cfg, model = self.cfg, self.fwd_model
        model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t_start = time.perf_counter()
        self.meter.reset()
        while self.step < cfg.steps and not self.stopping:
            try:
                images, input_ids, ids_cpu = self._next_batch()
            except DataWaitInterrupted:
                # one process stopped while waiting for data: checkpoint the last finished step (the source's
                # state is that of the batches it handed out) unless it is saved already
                self.stop_signum = self.signals.stop_signum()
                if self.step > self.ckpt.last_saved:
                    self._save()
                break
            lr = self.sched.set_step(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(model, images, input_ids, self._loss, chunks=cfg.data.grad_accum,
                                    autocast=self.autocast)
            sync_ignored_grads(model, self.info)  # FSDP2: replicated scalar params (no-op otherwise)
            loss_val = float(loss)
            if self.guard.check(self.step + 1, loss_val, model.parameters()):
                self.optimizer.step()
                self.logit_scale.clamp_(self.model)
                self.meter.add_loss(loss_val)
                self.last_loss = loss_val
            else:
                self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.steps_run += 1
            self.counters["samples"] += cfg.data.batch_size
            self.meter.add_step((ids_cpu != self.pad_id).sum(1).tolist())
            self.hooks.fire("step_end", step=self.step)
            ckpt_request = self._agree_at_step_boundary()
            final = self.step == cfg.steps or self.stopping
            self.console.update(1, loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
            if self.step % cfg.log_every == 0 or final:
                self._log_train(lr)
            elif self.steps_run == 1:
                self._note_slow_first_step()
            if self.validator.due(self.step, final, stopped_by_signal=self.stop_signum > 0):
                with self.meter.paused():  # validation time is not training throughput
                    self._validate()
            self.hooks.fire("before_checkpoint", step=self.step)
            if self.ckpt.due(self.step, force=final or ckpt_request):
                with self.meter.paused():
                    path = self._save()
                if ckpt_request and self.info.is_main:
                    self.console.say(f"[bmclip] SIGUSR1: checkpoint {path} written; continuing", err=True)
        return self._finish()

    # -- the loop's parts ------------------------------------------------------------------------------

    def _loss(self, img, txt, scale, bias):
        """The configured loss, through the ``loss`` hooks (fault injection)."""
        return self.hooks.filter("loss", self.loss_fn(img, txt, scale, bias), step=self.step)

    def _next_batch(self):
        """(images normalised on the device, input_ids on the device, input_ids on the CPU) of the next batch."""
        self.signals.step = self.step
        t0 = time.perf_counter()
        bad_before = getattr(self.source, "bad_batches", 0)
        with self.signals.data_wait():
            self.hooks.fire("data_wait", step=self.step)
            batch = next(self.source)
        ids_cpu = batch["input_ids"]
        if "images" in batch:  # DALI: already decoded, augmented and normalised (on this GPU under CUDA)
            images = batch["images"].to(self.device, non_blocking=True)
        else:
            images = normalize_images(batch["image"], self.device)
        input_ids = ids_cpu.to(self.device, non_blocking=True)
        self.meter.add_data_wait(time.perf_counter() - t0)
        if getattr(self.source, "bad_batches", 0) != bad_before:
            self._report_skipped_batch()
        return images, input_ids, ids_cpu

    def _report_skipped_batch(self) -> None:
        # an image that passed the loader's header check failed to decode in DALI: its batch was skipped (and
        # replaced by the next one); counted in the checkpointed source state
        src, rank = self.source, self.info.rank
        self.skip_rows.append({"step": self.step + 1, "kind": "data_skip", "rank": rank, "reason": src.last_error,
                               "bad_batches": src.bad_batches, "bad_samples": src.bad_samples})
        msg = f"[bmclip] rank {rank}: skipped an undecodable batch ({src.last_error}); {src.bad_batches} so far"
        if self.info.is_main:
            self.console.say(msg, err=True)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _agree_at_step_boundary(self) -> bool:
        """Every rank agrees (one collective) on the time budget (e.g. the demo's), a stop signal (SIGTERM /
        SIGINT / SIGUSR1=stop) and a SIGUSR1 checkpoint request received by any rank, so all ranks stop or
        checkpoint at this same step. Returns whether a checkpoint was requested."""
        self.signals.step = self.step
        over_budget = bool(self.cfg.max_seconds) and time.perf_counter() - self.t_start > self.cfg.max_seconds
        over_budget, signum, ckpt_request = all_reduce_max(
            [over_budget, self.signals.stop_signum(), self.signals.take_checkpoint_request()], self.info)
        self.stop_early, self.stop_signum = over_budget > 0, int(signum)
        return ckpt_request > 0

    def _note_slow_first_step(self) -> None:
        """One line after a slow first step, so that the minutes before the first ``step N/`` line (kernel
        compilation and autotuning on a GPU, the loader's first shards) do not read as a hung run."""
        took = time.perf_counter() - self.t_start
        if self.info.is_main and took >= FIRST_STEP_NOTE_S:
            self.console.say(f"[bmclip] step {self.step}: the first step took {took:.0f}s (kernel compilation and "
                             f"autotuning, the data pipeline's start); later steps are faster, a line every "
                             f"{self.cfg.log_every} steps")

    def _log_train(self, lr: float) -> None:
        cfg, info = self.cfg, self.info
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        window_loss = self.meter.mean_loss
        rates = self.meter.read()
        mean_loss = all_reduce_mean(window_loss, info) if window_loss is not None else float("nan")
        rec = {"step": self.step, "kind": "train", "loss": mean_loss, "lr": lr,
               **self.logit_scale.readout(self.model), "grad_norm": self.guard.grad_norm, **rates,
               "peak_mem_gb": peak_memory_gb(self.device), "nonfinite_skipped": self.guard.skipped,
               "world_size": info.world_size}
        self.data_stats = ds = _data_stats(self.source, info)
        if isinstance(self.source, DaliShardSource):  # the same source type on every rank: collectives match
            # every rank's skipped batches: rank 0 writes the data_skip rows of all ranks, in step order
            rows = [r for part in all_gather_objects(self.skip_rows, info) for r in part]
            self.skip_rows = []
            for r in sorted(rows, key=lambda r: (r["step"], r["rank"])):
                self.logger.log(r)
            rec["data_bad_batches"] = ds["bad_batches"]  # summed over ranks (each rank skips its own)
        if ds is not None:
            over = ds["skip_rate"] > cfg.data.max_skip_rate
            rec.update({"data_samples_read": ds["samples_read"], "data_samples_skipped": ds["samples_skipped"],
                        "data_skip_rate": ds["skip_rate"], "data_tar_errors": ds["tar_errors"],
                        "data_skipped_by_reason": ds["skipped_by_reason"], "data_skip_rate_exceeded": over,
                        "data_fetch_wait_s": ds["fetch_wait_s"], "data_bytes_fetched": ds["bytes_fetched"],
                        "data_shards_fetch_failed": ds["shards_fetch_failed"]})
            if over and not self.skip_warned and info.is_main:
                self.console.say(_skip_warning(ds, cfg.data.max_skip_rate), err=True)
                self.skip_warned = True
        self.logger.log(rec)
        elapsed = time.perf_counter() - self.t_start
        self.console.step_line(self.step, mean_loss, lr, rates["samples_per_s"],
                               (cfg.steps - self.step) * elapsed / max(self.steps_run, 1),
                               data_wait_frac=rates["data_wait_frac"],
                               fetch_wait_s=ds["fetch_wait_s"] if ds is not None else 0.0)

    def _validate(self) -> None:
        metrics = self.validator.run(self.fwd_model, self.model)
        if self.info.is_main and metrics:
            self.logger.log({"step": self.step, "kind": "val", **metrics})

    def _save(self) -> Path | None:
        counters = {**self.counters, "nonfinite_skipped": self.guard.skipped}
        return self.ckpt.save(self.step, self.fwd_model, self.optimizer, self.sched, self.source,
                              tokenizer=self.tokenizer, counters=counters)

    # -- set-up and the end --------------------------------------------------------------------------

    def _lock_out_dir(self, cleanup: list) -> None:
        """Rank 0 takes ``out_dir``'s lock; every rank fails when it cannot."""
        info, out = self.info, self.out
        lock_error = None
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            lock = OutDirLock(out, break_lock=self.cfg.break_lock)
            try:
                lock.acquire()
                cleanup.append(lock.release)
                if lock.note:
                    print(f"[bmclip] out_dir lock: {lock.note}", file=sys.stderr, flush=True)
            except ConfigError as e:
                lock_error = e
        if all_reduce_flag(lock_error is not None, info):
            raise lock_error or ConfigError(f"out_dir {out}: rank 0 could not lock it (its message says why)")

    def _finish(self) -> dict:
        cfg, info, out, step = self.cfg, self.info, self.out, self.step
        seconds = time.perf_counter() - self.t_start
        stop_signal = self.stop_signum > 0 and step < cfg.steps  # a signal at the very last step: run complete
        self.console.close()
        self.logger.close()
        summary = {"steps": step, "steps_this_run": self.steps_run, "seconds": seconds,
                   "stopped_early": self.stop_early,
                   "samples_per_s": self.steps_run * cfg.data.batch_size / seconds if seconds > 0 else None,
                   # the train lines' rate over the whole run: validation and checkpoint time left out
                   "train_seconds": self.meter.total_s,
                   "train_samples_per_s": (self.meter.total_samples / self.meter.total_s
                                           if self.meter.total_s > 0 else None),
                   "last_loss": self.last_loss, "nonfinite_skipped": self.guard.skipped,
                   "augment_backend": "dali" if isinstance(self.source, DaliShardSource) else "torch",
                   "data_bad_batches": getattr(self.source, "bad_batches", 0), "out_dir": str(out)}
        if self.data_stats is not None and "bad_batches" in self.data_stats:  # every rank's (DALI)
            summary["data_bad_batches"] = self.data_stats["bad_batches"]
        ds = self.data_stats
        if ds is not None:
            summary["data"] = {**ds, "skip_rate_exceeded": ds["skip_rate"] > cfg.data.max_skip_rate}
        if stop_signal:
            # the signal received (by any rank: the highest number when ranks got different ones)
            summary["stopped_by_signal"] = signal.Signals(self.stop_signum).name
            if info.is_main:
                where = (f"checkpoint {out / 'checkpoints' / ckpt_mod.step_dir_name(step)}" if step else
                         "no step had finished, nothing to checkpoint")
                print(f"[bmclip] stopped by {summary['stopped_by_signal']} at step {step} of {cfg.steps}; {where}; "
                      f"{self.resume_hint}", file=sys.stderr, flush=True)
        if info.is_main:
            records = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
            summary["curves"] = [str(p) for p in plot_curves(records, out)]
            vals = [r for r in records if r.get("kind") == "val"]
            if vals:
                summary["val"] = {k: v for k, v in vals[-1].items() if k not in ("kind",)}
        # An interrupted run is not finished: no open_clip export (the checkpoint has everything).
        if cfg.export_open_clip and not stop_signal:
            if cfg.parallel == "fsdp":
                exported = _gathered_copy(self.fwd_model, self.optimizer, cfg, info, self.mcfg)  # every rank
            else:
                exported = self.model
            if info.is_main:
                export_open_clip(exported, out / "open_clip", tokenizer=self.tokenizer)
                summary["open_clip"] = str(out / "open_clip")
        barrier(info)
        return summary


def _gathered_copy(fwd_model, optimizer, cfg, info, mcfg):
    """Full (unsharded) CPU copy of an FSDP model for export (a collective: all ranks call it)."""
    sd, _ = full_state_dicts(fwd_model, optimizer, cfg.parallel, info)
    m = create_model(mcfg)
    m.load_state_dict(sd)
    return m


