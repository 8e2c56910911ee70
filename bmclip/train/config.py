"""Typed training configuration: dataclass sections, presets, YAML files and ``--key=value`` overrides.

``load_config(spec, overrides)`` is what ``bmclip train CONFIG [--key=value ...]`` calls: ``spec`` is a
preset name (``biomedclip``, ``tiny-cpu``) or a YAML file whose top level may name a ``preset`` to start
from; overrides use dotted keys (``--optim.lr=1e-4``, ``--data.batch_size=256``). Every key is checked
against the dataclass fields and every value is converted to the field's type, so a typo or a bad value
is a :class:`~bmclip.errors.ConfigError` naming the key instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bmclip.config_dict import update_from_dict
from bmclip.errors import ConfigError, DataError, check_int, check_real


@dataclass
class ModelSection:
    """Which model to train: a ``bmclip.model`` preset plus the training-time switches."""

    preset: str = "biomedclip-vit-b16-224"
    patch_dropout: float = 0.0  # FLIP: fraction of image patches dropped in training (CLS kept)
    grad_checkpointing: bool = False
    # Attention backend of both towers: auto (CUDA: SDPA for the ViT, Triton varlen for the unpadded text tower
    # when Triton can run; elsewhere SDPA) | sdpa | triton | xformers. The per-tower keys override it (None: same).
    attn_backend: str = "auto"
    image_attn_backend: str | None = None
    text_attn_backend: str | None = None
    fused_ops: bool = False  # Triton LayerNorm(+residual) and bias-GELU kernels (CUDA); same parameters
    compile: bool = False  # torch.compile the model (GPU runs; adds start-up time)
    init_checkpoint: str = ""  # start from these weights (bmclip checkpoint or open_clip folder)


@dataclass
class DataSection:
    """Where batches come from: webdataset shards (``train``/``val``) or in-memory synthetic pairs."""

    train: str = ""  # shard pattern, e.g. /data/pmc15m/train-{000000..001400}.tar
    val: str = ""  # val shards for retrieval R@K every ``train.val_every`` steps
    synthetic: bool = False  # learnable synthetic image/text pairs in memory (tests, benchmarks)
    synthetic_size: int = 4096  # number of distinct synthetic pairs (one epoch)
    batch_size: int = 4096  # GLOBAL batch per optimizer step (all ranks, all accumulation chunks)
    grad_accum: int = 1  # GradCache chunks per rank per step; the loss stays global over the batch
    num_threads: int = 4  # decoder threads per rank
    augment: str = "random_resized_crop"
    # who decodes + augments shard images: torch = bmclip's C++ loader (CPU threads) then normalisation in
    # torch; dali = raw bytes -> NVIDIA DALI (nvJPEG on the GPU under CUDA, its CPU pipeline otherwise);
    # auto = dali on CUDA when nvidia.dali imports, else torch
    augment_backend: str = "auto"
    shuffle_buffer: int = 2000
    resampled: bool = True  # infinite shard resampling (webdataset semantics); False = epochs
    # vocab.txt / tokenizer dir; "" = bmclip's bundled default (a 4,096-id vocabulary that fits small
    # models only: models with a larger text vocabulary, e.g. the biomedclip preset, require this key)
    tokenizer: str = ""
    tokenizer_clean: bool = True  # open_clip's text cleaning (ftfy, HTML unescape, whitespace) before WordPiece
    val_max_samples: int = 10000
    # warn (stderr + metrics) when the loader skips more than this fraction of the samples it reads
    max_skip_rate: float = 0.01
    # remote shards (s3://, gs://, http(s)://, pipe:CMD; file:// is local): local cache folder ("" = a temp folder),
    # its byte limit for shards fetched ahead, and how many shards each rank fetches ahead of the decoder
    cache_dir: str = ""
    cache_bytes: int = 4 << 30
    prefetch_shards: int = 2


@dataclass
class OptimSection:
    """AdamW + cosine schedule with linear warm-up (open_clip / BiomedCLIP recipe)."""

    lr: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2
    # true (open_clip_train's rule, which trained BiomedCLIP): decay every parameter of 2+ dims, embedding tables,
    # ViT position embedding and class token included (gains, biases, logit scale/bias: never); false: also exempt
    # those embeddings (timm-style)
    decay_embeddings: bool = True
    warmup_steps: int = 2000  # linear warm-up to lr over these steps (more than ``steps``: a warning, lr never reached)
    min_lr: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool = True  # fused AdamW kernel on CUDA (ignored on CPU)


@dataclass
class LossSection:
    """Contrastive loss: an entry of the ``bmclip.train.losses`` registry (CLIP InfoNCE or SigLIP, global)."""

    kind: str = "clip"  # a registered loss name: clip | siglip (the entry also sets the initial logit scale/bias)
    backend: str = "auto"  # bmclip.kernels backend: auto | triton | torch
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped to this (ln 100 on the log scale)


@dataclass
class FaultSection:
    """Fault handling, and fault injection used by the tests (never set injection keys in real runs)."""

    max_nonfinite: int = 10  # this many non-finite losses IN A ROW stop the run with an error
    nan_at_steps: list[int] = field(default_factory=list)  # inject a NaN loss at these steps
    kill_at_step: int = -1  # SIGKILL this process after finishing this step (once per out_dir)
    kill_rank: int = -1  # which rank kill_at_step kills (-1 = every rank)
    kill_in_checkpoint_at_step: int = -1  # SIGKILL halfway through writing this step's checkpoint
    step_sleep_s: float = 0.0  # sleep this long after every step (gives signal tests a window; numerics unchanged)
    data_sleep_s: float = 0.0  # sleep this long in every wait for a batch (a slow loader, for signal tests)


@dataclass
class TrainConfig:
    """A whole training run; sections are ``model``, ``data``, ``optim``, ``loss``, ``fault``."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    fault: FaultSection = field(default_factory=FaultSection)
    steps: int = 1000  # optimizer steps in total
    max_seconds: float = 0.0  # stop (with a checkpoint) after this much training wall time; 0 = no limit
    seed: int = 0  # 0 to 2**32 - 1
    out_dir: str = "runs/bmclip"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard)
    log_every: int = 10
    val_every: int = 0  # 0 = only at the end (when data.val is set)
    ckpt_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto (newest valid checkpoint in out_dir) | none | PATH
    deterministic: bool = False  # torch.use_deterministic_algorithms + fixed threads (bitwise CPU resume)
    num_threads: int = 0  # torch intra-op threads (0 = leave torch's default)
    export_open_clip: bool = True  # write out_dir/open_clip/ at the end
    progress: bool = True  # tqdm bar on the terminal (rank 0)
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    peak_tflops: float = 0.0  # override the bf16 peak used for MFU (0 = from the device table)
    # SIGUSR1: "checkpoint" = write a checkpoint at the next step boundary and continue; "stop" = checkpoint
    # and exit like SIGTERM (SIGTERM and SIGINT always checkpoint and stop)
    on_usr1: str = "checkpoint"
    break_lock: bool = False  # take over out_dir's lock even if held by another host / a live process

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-safe)."""
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Check every value's range and the cross-field constraints, and that the local ``data.val`` shards exist
        (:func:`check_local_shards`); raises ConfigError naming the key."""
        # start-up cost: torch, models and kernels load on validation, not on import (`bmclip --help` imports this)
        from bmclip.model import available_backends
        from bmclip.train.losses import get_loss

        _check(self.steps >= 1, "steps", "must be >= 1")
        _real(self.max_seconds, "max_seconds", 0, note="0 = no limit")
        _integer(self.seed, "seed", 0, 2**32 - 1)
        _check(bool(self.out_dir.strip()), "out_dir", "must not be empty (the run's folder)")
        _real(self.peak_tflops, "peak_tflops", 0, note="the bf16 peak TFLOP/s per device for MFU; 0 = from the "
              "device table")
        _check(self.data.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.data.grad_accum >= 1, "data.grad_accum", "must be >= 1")
        _check(self.precision in ("auto", "bf16", "fp32"), "precision", "must be auto, bf16 or fp32")
        _check(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        _check(self.parallel in ("ddp", "fsdp"), "parallel", "must be ddp or fsdp")
        get_loss(self.loss.kind)  # an unknown name is a ConfigError listing the registered losses
        _real(self.loss.max_logit_scale, "loss.max_logit_scale", 0, above=True)
        _check(self.loss.backend in ("auto", "triton", "torch"), "loss.backend",
               f"must be auto, triton or torch (got {self.loss.backend!r})")
        _check(0.0 <= self.model.patch_dropout < 1.0, "model.patch_dropout", "must be in [0, 1)")

        names = ["auto", *available_backends()]
        for key in ("attn_backend", "image_attn_backend", "text_attn_backend"):
            value = getattr(self.model, key)
            if key != "attn_backend" and value is None:
                continue
            _check(value in names, f"model.{key}", f"must be one of {', '.join(names)} (got {value!r})")
        o = self.optim
        _real(o.lr, "optim.lr", 0, above=True)
        _check(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr = {o.lr:g}] (the schedule's floor)")
        _real(o.weight_decay, "optim.weight_decay", 0)
        _real(o.eps, "optim.eps", 0, above=True)
        _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "betas in [0, 1)")
        _real(o.grad_clip, "optim.grad_clip", 0, note="the max global grad norm; 0 disables clipping")
        _check(self.log_every >= 1, "log_every", "must be >= 1")
        _check(self.val_every >= 0, "val_every", "must be >= 0 (0 = only at the end)")
        _check(self.num_threads >= 0, "num_threads", "must be >= 0 (0 = torch's default)")
        _check(self.data.num_threads >= 1, "data.num_threads", "must be >= 1 (decoder threads per rank)")
        _check(self.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0 (0 = no shuffle buffer)")
        _check(self.data.val_max_samples >= 1, "data.val_max_samples", "must be >= 1")
        _check(self.data.synthetic_size >= 1, "data.synthetic_size", "must be >= 1")
        _check(self.ckpt_every >= 0, "ckpt_every", "must be >= 0 (0 = only at the end)")
        _check(self.keep_last >= 1, "keep_last", "must be >= 1")
        _check(self.fault.max_nonfinite >= 1, "fault.max_nonfinite", "must be >= 1")
        _real(self.fault.step_sleep_s, "fault.step_sleep_s", 0)
        _real(self.fault.data_sleep_s, "fault.data_sleep_s", 0)
        _check(self.data.augment in ("random_resized_crop", "center"), "data.augment",
               "must be random_resized_crop or center")
        _check(self.on_usr1 in ("checkpoint", "stop"), "on_usr1", "must be checkpoint or stop")
        _check(0.0 <= self.data.max_skip_rate <= 1.0, "data.max_skip_rate", "must be in [0, 1]")
        _check(self.data.cache_bytes >= 0, "data.cache_bytes", "must be >= 0")
        _check(self.data.prefetch_shards >= 0, "data.prefetch_shards", "must be >= 0 (0 = fetch on demand)")
        _check(self.data.augment_backend in ("auto", "torch", "dali"), "data.augment_backend",
               "must be auto, torch or dali")
        _check(not (self.data.synthetic and self.data.augment_backend == "dali"), "data.augment_backend",
               "dali decodes shard images; data.synthetic pairs are generated decoded (use auto or torch)")
        shards = {k: v for k, v in (("data.train", self.data.train), ("data.val", self.data.val)) if v}
        _check(not (self.data.synthetic and shards), "data.synthetic",
               f"is true, so {' and '.join(f'{k}={v!r}' for k, v in shards.items())} would be ignored (synthetic pairs "
               "are generated in memory; the tiny-cpu preset starts synthetic): add --data.synthetic=false to read "
               "the shards")
        if self.data.val and not self.data.synthetic:
            # data.train is checked when its loader is built at start-up; the val loader is built only when the
            # first validation runs (at the end by default), too late to find a typo
            check_local_shards("data.val", self.data.val)
        return self


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Values that are valid but probably not what was meant, one line each (the trainer prints them on stderr):
    a warm-up longer than the run (allowed, as open_clip allows it: a short smoke run of a long recipe)."""
    o, out = cfg.optim, []
    if o.warmup_steps > cfg.steps:
        out.append(f"optim.warmup_steps={o.warmup_steps} is more than steps={cfg.steps}: the learning rate rises for "
                   f"the whole run and peaks at only lr*steps/warmup_steps = {o.lr * cfg.steps / o.warmup_steps:.3g} "
                   f"instead of optim.lr={o.lr:g}, with no cosine decay (e.g. --optim.warmup_steps="
                   f"{max(cfg.steps // 10, 1)}, a tenth of the run)")
    return out


def check_local_shards(key: str, pattern: str) -> None:
    """ConfigError naming ``key`` when the shard pattern does not expand or one of its local shards is missing or a
    folder (:func:`bmclip.data.shards.check_local_shards`: one stat per local shard; remote ones are not looked up)."""
    from bmclip.data import shards  # start-up cost: numpy (`bmclip --help` imports this module)

    try:
        shards.check_local_shards(shards.expand_urls(pattern), example_name=key.rsplit(".", 1)[-1])
    except (ConfigError, DataError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _real(v: Any, key: str, low: float, *, above: bool = False, note: str = "") -> None:
    """ConfigError "key: must be a finite number >= low (note), got v" unless ``v`` is one (``errors.check_real``:
    an int or float, not a bool, not inf or NaN)."""
    try:
        check_real(v, key, low, above=above)
    except ConfigError:
        extra = f" ({note})" if note else ""
        raise ConfigError(f"{key}: must be a finite number {'>' if above else '>='} {low:g}{extra}, got {v!r}") \
            from None


def _integer(v: Any, key: str, low: int, high: int) -> None:
    """ConfigError "key: must be an integer from low to high, got v" unless ``v`` is one (``errors.check_int``)."""
    try:
        check_int(v, key, low, high)
    except ConfigError:
        raise ConfigError(f"{key}: must be an integer from {low} to {high}, got {v!r}") from None


def _preset_biomedclip() -> TrainConfig:
    # BiomedCLIP (Zhang et al. 2023): ViT-B/16 224 + PubMedBERT, context 256, AdamW (0.9, 0.98, 1e-6,
    # wd 0.2), peak lr 5e-4, cosine with 2,000 warm-up steps, global batch 4,096, 32 epochs of
    # PMC-15M (15.28M pairs), bf16, gradient checkpointing, patch dropout.
    cfg = TrainConfig()
    cfg.model = ModelSection(preset="biomedclip-vit-b16-224", patch_dropout=0.5, grad_checkpointing=True)
    cfg.data.batch_size = 4096
    cfg.steps = math.ceil(32 * 15_280_000 / 4096)
    cfg.optim = OptimSection(lr=5e-4, warmup_steps=2000)
    cfg.ckpt_every = 2000
    cfg.val_every = 2000
    cfg.log_every = 20
    cfg.out_dir = "runs/biomedclip"
    return cfg


def _preset_tiny_cpu() -> TrainConfig:
    # The ``tiny`` model on synthetic pairs: a few CPU minutes; tests and the demo start from this.
    cfg = TrainConfig()
    cfg.model = ModelSection(preset="tiny")
    cfg.data = DataSection(synthetic=True, synthetic_size=2048, batch_size=64, num_threads=2,
                           resampled=False, shuffle_buffer=256, augment="random_resized_crop",
                           val_max_samples=1000)
    cfg.optim = OptimSection(lr=2e-3, warmup_steps=20, weight_decay=0.1, fused=False)
    cfg.steps = 200
    cfg.log_every = 10
    cfg.ckpt_every = 100
    cfg.keep_last = 2
    cfg.out_dir = "runs/tiny-cpu"
    cfg.device = "auto"
    cfg.export_open_clip = False
    return cfg


PRESETS = {"biomedclip": _preset_biomedclip, "tiny-cpu": _preset_tiny_cpu}


def list_presets() -> list[str]:
    """Names accepted as ``bmclip train PRESET``."""
    return sorted(PRESETS)


def get_preset(name: str) -> TrainConfig:
    """A fresh TrainConfig for a preset name; unknown names raise ConfigError."""
    if name not in PRESETS:
        raise ConfigError(f"unknown training preset {name!r}; choose one of {list_presets()} or a YAML file")
    return PRESETS[name]()




def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--optim.lr=1e-4", "--steps", "10"]`` -> ``{"optim.lr": "1e-4", "steps": "10"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ConfigError(f"override {a!r}: expected --key=value (e.g. --optim.lr=1e-4)")
        body = a[2:]
        if "=" in body:
            k, v = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            k, v = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {a!r} has no value (use --{body}=VALUE)")
        out[k.replace("-", "_")] = v
        i += 1
    return out


def load_config(spec: str, overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
    """Preset name or YAML path (+ overrides) -> validated TrainConfig; mistakes raise ConfigError."""
    if spec in PRESETS:
        cfg = get_preset(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"config {spec!r} is neither a preset ({', '.join(list_presets())}) nor a YAML file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {spec}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {spec}: top level must be a mapping")
        data = dict(data)
        base = data.pop("preset", None)
        cfg = get_preset(str(base)) if base is not None else TrainConfig()
        update_from_dict(cfg, data)
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        update_from_dict(cfg, overrides)
    return cfg.validate()


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from ``to_dict()`` output (checkpoint metadata)."""
    return update_from_dict(TrainConfig(), copy.deepcopy(d))
