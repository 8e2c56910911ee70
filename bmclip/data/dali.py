"""Image augmentation + normalisation after ``ShardLoader``: NVIDIA DALI pipelines and a plain-torch path.

Two ways to get from shards to the normalised float ``[N, 3, S, S]`` batch the model wants:

1. **C++ loader + torch** (always available; the trainer's default): ``ShardLoader`` decodes and does
   the random resized crop on the CPU in ``bmclip._C`` (libjpeg-turbo with DCT-domain downscaling and
   cropped decoding), handing out uint8 NHWC; :func:`bmclip.data.normalize.normalize_images` then moves
   the uint8 batch to the GPU (4x fewer bytes over PCIe than float32) and converts/normalises it there
   in one fused elementwise pass.
2. **DALI** (``pip install nvidia-dali-cuda130``): :func:`build_pipeline` with ``source="encoded"``
   takes the raw JPEG/PNG bytes from ``ShardLoader(decode=False)`` via ``fn.external_source`` and does
   decode (``mixed`` = nvJPEG on the GPU when ``device_id`` is set), random resized crop, optional
   flip and normalisation in DALI (with the same ``bmclip.data.images`` mean/std), returning CUDA
   tensors. ``source="decoded"`` takes the loader's uint8 NHWC batch and does flip + normalisation in
   DALI (useful only for the flip).
   ``device_id=None`` builds the CPU-only form of the same graph (what CI tests).
   With ``host_params=True`` the random crop windows (and flips) are not drawn by DALI's internal
   generator but given per batch by the caller (:func:`random_resized_crop_windows`, torchvision's
   ``RandomResizedCrop`` rule on the header sizes): the pixels are then a function of the caller's seed,
   so a resumed run reproduces them exactly. This is what the trainer uses
   (``data.augment_backend=dali``, ``bmclip.data.sources.DaliShardSource``).

Which is preferred where (CPU numbers: ``benchmarks/bench_loader.py``; GPU numbers still to be measured
on an H100 node and recorded in ``benchmarks/RESULTS.md``):

- CPU-only machines, and GPU nodes with enough cores per GPU (the C++ loader reaches its throughput
  target per core): path 1. It needs nothing beyond torch, its crop is bitwise deterministic per
  (seed, epoch, batch) and resumable, and bad images are counted skips. Measured on the 2-core dev box
  (real PMC figures, 224 px, per CPU-second): DALI CPU pipeline 127 img/s vs ours 297 (432 with
  ``decode_options={"dct_min_ratio": 1.0}``) vs open_clip's transform 101 - so never DALI on CPU.
- GPU nodes that are CPU-starved (few cores per H100 at ViT-B/16 speeds, >1,500 img/s/GPU needed):
  path 2 with ``device_id`` set moves decoding to nvJPEG, leaving the CPU only tar reading. Its
  caveat: a corrupt image that passes the loader's header check (e.g. a truncated JPEG) fails the whole
  DALI batch (DALI raises and the pipeline object is no longer valid); the trainer counts and skips
  that batch and rebuilds the pipeline, but shards should be validated (the dataset builder does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bmclip.data.images import IMAGE_MEAN, IMAGE_STD
from bmclip.errors import ConfigError

__all__ = ["dali_available", "build_pipeline", "DaliAugment", "random_resized_crop_windows"]


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):  # OSError: the wheel is there but its CUDA libraries do not load
        return False
    return True


def random_resized_crop_windows(
    sizes: Sequence[tuple[int, int]],
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """float32 ``[N, 4]`` crop windows ``(x0, y0, w, h)`` normalised to [0, 1], one per ``(width, height)``.

    torchvision's ``RandomResizedCrop.get_params``: up to 10 draws of an area fraction in ``scale`` and a
    log-uniform aspect ratio in ``ratio`` until the (rounded) window fits, else a centre crop with the
    aspect clamped to ``ratio``. Windows are computed in pixels and then normalised, so
    ``fn.decoders.image_slice`` cuts the same pixel window out of the decoded image.
    """
    out = np.empty((len(sizes), 4), dtype=np.float32)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for k, (width, height) in enumerate(sizes):
        W, H = int(width), int(height)
        if W < 1 or H < 1:
            raise ConfigError(f"image {k}: size {W}x{H} has no pixels")
        area = W * H
        for _ in range(10):
            target = area * rng.uniform(scale[0], scale[1])
            aspect = math.exp(rng.uniform(log_r[0], log_r[1]))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= W and 0 < h <= H:
                i = int(rng.integers(0, H - h + 1))
                j = int(rng.integers(0, W - w + 1))
                break
        else:
            in_ratio = W / H
            if in_ratio < min(ratio):
                w, h = W, int(round(W / min(ratio)))
            elif in_ratio > max(ratio):
                w, h = int(round(H * max(ratio))), H
            else:
                w, h = W, H
            w, h = max(1, min(w, W)), max(1, min(h, H))
            i, j = (H - h) // 2, (W - w) // 2
        out[k] = (j / W, i / H, w / W, h / H)
    return out


def _dali():
    try:  # optional dependency: NVIDIA DALI (CUDA only)
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as e:
        raise ImportError(
            "bmclip.data.dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
            "(or use the C++ loader + bmclip.data.normalize)"
        ) from e
    return dali, fn, types


def build_pipeline(
    *,
    batch_size: int,
    image_size: int,
    source: str = "encoded",
    augment: str = "random_resized_crop",
    flip: bool = False,
    device_id: int | None = None,
    num_threads: int = 2,
    seed: int = 0,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
    fp16: bool = False,
    prefetch_queue_depth: int = 1,
    host_params: bool = False,
):
    """A built DALI pipeline: external_source ``"images"`` -> float ``[N, 3, S, S]`` normalised output.

    ``source="encoded"``: input is a list of uint8 1-D arrays (JPEG/PNG bytes); decode + (random resized
    crop | resize shorter side + centre crop) with antialiased bicubic resampling, then optional flip
    and normalisation. ``source="decoded"``: input is a uint8 ``[N, S, S, 3]`` batch (from ShardLoader);
    optional flip + normalisation only. ``device_id=None`` is the CPU-only pipeline; otherwise the
    decoder is ``mixed`` (nvJPEG) and the other operators run on GPU ``device_id``.

    ``host_params=True``: the pipeline draws nothing itself; each run takes the crop windows (external
    sources ``"crop_anchor"``/``"crop_shape"``: float32 ``[2]`` per image, normalised ``(x, y)`` and
    ``(w, h)``, only for ``source="encoded"`` with ``random_resized_crop``) and, with ``flip``, the
    mirror flags (``"mirror"``: int32 scalar per image) from the caller, so the output is a pure
    function of the inputs.
    """
    dali, fn, types = _dali()
    if source not in ("encoded", "decoded"):
        raise ConfigError(f"source must be 'encoded' or 'decoded', got {source!r}")
    if augment not in ("random_resized_crop", "center"):
        raise ConfigError(f"augment must be 'random_resized_crop' or 'center', got {augment!r}")
    if batch_size < 1 or image_size < 1:
        raise ConfigError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")
    if device_id is not None and not torch.cuda.is_available():
        raise ConfigError(f"device_id={device_id} needs CUDA; use device_id=None for the CPU pipeline")
    gpu = device_id is not None
    dev = "gpu" if gpu else "cpu"
    S = int(image_size)
    mean255 = [255.0 * m for m in mean]
    std255 = [255.0 * s for s in std]
    out_dtype = types.FLOAT16 if fp16 else types.FLOAT

    pipe = dali.Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch_queue_depth,
        exec_dynamic=True,
    )
    with pipe:
        if source == "encoded":
            data = fn.external_source(name="images", dtype=types.UINT8, device="cpu")
            dec_dev = "mixed" if gpu else "cpu"
            if augment == "random_resized_crop" and host_params:
                # caller-given windows: ROI decode of exactly that window (nvJPEG decodes only the ROI)
                anchor = fn.external_source(name="crop_anchor", dtype=types.FLOAT, device="cpu")
                shape = fn.external_source(name="crop_shape", dtype=types.FLOAT, device="cpu")
                imgs = fn.decoders.image_slice(data, anchor, shape, device=dec_dev, output_type=types.RGB,
                                               normalized_anchor=True, normalized_shape=True)
                imgs = fn.resize(imgs, device=dev, size=[S, S], interp_type=types.INTERP_CUBIC, antialias=True)
                crop = None
            elif augment == "random_resized_crop":
                # torchvision semantics: area fraction in `scale`, aspect in `ratio`, 10 attempts
                imgs = fn.decoders.image_random_crop(
                    data, device=dec_dev, output_type=types.RGB, random_area=list(scale),
                    random_aspect_ratio=list(ratio), num_attempts=10,
                )
                imgs = fn.resize(imgs, device=dev, size=[S, S], interp_type=types.INTERP_CUBIC, antialias=True)
                crop = None
            else:
                imgs = fn.decoders.image(data, device=dec_dev, output_type=types.RGB)
                imgs = fn.resize(imgs, device=dev, resize_shorter=S, interp_type=types.INTERP_CUBIC,
                                 antialias=True)
                crop = [S, S]
        else:
            imgs = fn.external_source(name="images", dtype=types.UINT8, layout="HWC", device=dev)
            crop = None
        if flip and host_params:
            mirror = fn.external_source(name="mirror", dtype=types.INT32, device="cpu")
        else:
            mirror = fn.random.coin_flip(probability=0.5) if flip else 0
        kw: dict[str, Any] = {"crop": crop} if crop is not None else {}
        out = fn.crop_mirror_normalize(
            imgs, device=dev, dtype=out_dtype, output_layout="CHW", mean=mean255, std=std255, mirror=mirror, **kw
        )
        pipe.set_outputs(out)
    pipe.build()
    return pipe


class DaliAugment:
    """Runs a :func:`build_pipeline` pipeline on ShardLoader batches -> float ``[N, 3, S, S]`` torch tensor."""

    def __init__(self, **pipeline_kwargs):
        self.source = pipeline_kwargs.get("source", "encoded")
        self.device_id = pipeline_kwargs.get("device_id")
        self.fp16 = pipeline_kwargs.get("fp16", False)
        self.max_batch = pipeline_kwargs["batch_size"]
        host = bool(pipeline_kwargs.get("host_params", False))
        self.needs_windows = (host and self.source == "encoded"
                              and pipeline_kwargs.get("augment", "random_resized_crop") == "random_resized_crop")
        self.needs_mirror = host and bool(pipeline_kwargs.get("flip", False))
        self.pipe = build_pipeline(**pipeline_kwargs)

    def __call__(self, batch: dict[str, Any] | Sequence[np.ndarray] | torch.Tensor,
                 windows: np.ndarray | None = None, mirror: np.ndarray | None = None) -> torch.Tensor:
        """Augment one batch: a ShardLoader batch dict, a list of encoded images, or uint8 NHWC.

        ``windows``: float ``[N, 4]`` normalised ``(x0, y0, w, h)`` crops and ``mirror``: ``[N]`` 0/1 flags,
        required exactly when the pipeline was built with ``host_params=True`` (and flip, for mirror).
        """
        if isinstance(batch, dict):
            data = batch["image_bytes"] if self.source == "encoded" else batch["image"]
        else:
            data = batch
        if self.source == "decoded":
            data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
            n = data.shape[0]
        else:
            data = [np.asarray(b, dtype=np.uint8) for b in data]
            n = len(data)
        if not 0 < n <= self.max_batch:
            raise ConfigError(f"batch of {n} does not fit the pipeline's batch_size {self.max_batch}")
        if (windows is not None) != self.needs_windows or (mirror is not None) != self.needs_mirror:
            raise ConfigError(f"this pipeline takes windows={'yes' if self.needs_windows else 'no'} and "
                              f"mirror={'yes' if self.needs_mirror else 'no'} per batch (host_params)")
        self.pipe.feed_input("images", data)
        if windows is not None:
            w = np.asarray(windows, dtype=np.float32)
            if w.shape != (n, 4):
                raise ConfigError(f"windows must be [{n}, 4] (x0, y0, w, h), got {w.shape}")
            self.pipe.feed_input("crop_anchor", [np.ascontiguousarray(r[:2]) for r in w])
            self.pipe.feed_input("crop_shape", [np.ascontiguousarray(r[2:]) for r in w])
        if mirror is not None:
            m = np.asarray(mirror, dtype=np.int32).reshape(-1)
            if m.shape != (n,):
                raise ConfigError(f"mirror must have {n} flags, got {m.shape}")
            self.pipe.feed_input("mirror", [np.array(v, dtype=np.int32) for v in m])
        (out,) = self.pipe.run()
        return _to_torch(out, self.device_id, self.fp16)


_COPY_STREAMS: dict[int, Any] = {}


def _to_torch(out, device_id: int | None, fp16: bool) -> torch.Tensor:
    """DALI output TensorList -> torch tensor (CPU, or complete on GPU ``device_id`` for the caller's stream)."""
    dtype = torch.float16 if fp16 else torch.float32
    if device_id is None:
        return torch.from_numpy(np.ascontiguousarray(out.as_array()))
    from nvidia.dali.plugin.pytorch import feed_ndarray  # DALI is optional: imported on its GPU path only

    t = out.as_tensor()
    dev = torch.device("cuda", device_id)
    consumer = torch.cuda.current_stream(dev)
    side = _COPY_STREAMS.get(device_id)
    if side is None:
        side = _COPY_STREAMS[device_id] = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        res = torch.empty(tuple(t.shape()), dtype=dtype, device=dev)
    feed_ndarray(t, res, cuda_stream=side)
    # Wait (on the host, GIL released) for DALI's work and the copy: this may run in a prefetch thread
    # while the consumer trains, and afterwards DALI may recycle its output buffer on the next run().
    side.synchronize()
    # `res` came from the side stream's pool and the consumer stream reads it: the caching allocator must
    # not reuse the block for the side stream before the consumer's work on it has finished.
    res.record_stream(consumer)
    return res
