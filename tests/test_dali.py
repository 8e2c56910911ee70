"""The DALI pipelines (CPU form in CI; GPU form with CUDA); their normalisation is bmclip's."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from bmclip.data.dali import DaliAugment, build_pipeline, dali_available
from bmclip.data.images import IMAGE_MEAN, IMAGE_STD
from bmclip.data.normalize import normalize_images
from bmclip.errors import ConfigError

S = 32
needs_dali = pytest.mark.skipif(not dali_available(),
                                reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda130)")


def reference_normalise(x_uint8_nhwc: np.ndarray) -> np.ndarray:
    """float64 (x/255 - mean)/std, NCHW."""
    x = x_uint8_nhwc.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    return (x - np.array(IMAGE_MEAN).reshape(1, 3, 1, 1)) / np.array(IMAGE_STD).reshape(1, 3, 1, 1)


def smooth_image(w: int, h: int, phase: float) -> Image.Image:
    """A smooth colour gradient (JPEG-friendly, so decoder differences stay small)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 100 * np.sin(xx / w * 3.0 + phase)
    g = 127 + 100 * np.cos(yy / h * 2.0 + phase)
    b = 127 + 80 * np.sin((xx + yy) / (w + h) * 4.0)
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8))


def encode(im: Image.Image, fmt="JPEG") -> np.ndarray:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


# ---------------------------------------------------------------------------------------------------
# DALI pipelines

@needs_dali
def test_dali_cpu_decoded_normalisation_exact():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, S, S, 3), dtype=np.uint8)
    aug = DaliAugment(batch_size=8, image_size=S, source="decoded", device_id=None)
    out = aug(torch.from_numpy(x))
    assert out.shape == (6, 3, S, S) and out.dtype == torch.float32 and out.device.type == "cpu"
    np.testing.assert_allclose(out.numpy(), reference_normalise(x), rtol=0, atol=1e-5)
    # the same numbers as the C++-loader path's normalisation (one mean/std for both)
    torch.testing.assert_close(out, normalize_images(torch.from_numpy(x)), rtol=0, atol=1e-5)


@needs_dali
def test_dali_cpu_flip():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (16, S, S, 3), dtype=np.uint8)
    out = DaliAugment(batch_size=16, image_size=S, source="decoded", flip=True, seed=3)(x).numpy()
    ref = reference_normalise(x)
    flipped = 0
    for o, r in zip(out, ref):
        if np.allclose(o, r, atol=1e-5):
            continue
        np.testing.assert_allclose(o, r[:, :, ::-1], atol=1e-5)  # otherwise exactly the mirror image
        flipped += 1
    assert 0 < flipped < 16


@needs_dali
def test_dali_cpu_encoded_center_matches_pil():
    ims = [smooth_image(96, 64, 0.0), smooth_image(50, 120, 1.0), smooth_image(64, 64, 2.0)]
    data = [encode(ims[0]), encode(ims[1], "PNG"), encode(ims[2])]
    out = DaliAugment(batch_size=4, image_size=S, source="encoded", augment="center")(data).numpy()
    assert out.shape == (3, 3, S, S)
    mean = np.array(IMAGE_MEAN).reshape(3, 1, 1)
    std = np.array(IMAGE_STD).reshape(3, 1, 1)
    for o, im in zip(out, ims):
        pix = ((o * std + mean) * 255.0).transpose(1, 2, 0)  # back to HWC 0..255
        w, h = im.size
        sc = S / min(w, h)
        r = im.resize((max(S, round(w * sc)), max(S, round(h * sc))), Image.BICUBIC)
        left, top = (r.size[0] - S) // 2, (r.size[1] - S) // 2
        ref = np.asarray(r.crop((left, top, left + S, top + S)), dtype=np.float64)
        assert psnr(pix, ref) > 30


@needs_dali
def test_dali_cpu_encoded_random_resized_crop():
    ims = [smooth_image(120, 80, p) for p in range(5)]
    pipe_kw = dict(batch_size=5, image_size=S, source="encoded", augment="random_resized_crop", seed=7)
    out = DaliAugment(**pipe_kw)([encode(im) for im in ims]).numpy()
    assert out.shape == (5, 3, S, S) and np.isfinite(out).all()
    mean = np.array(IMAGE_MEAN).reshape(1, 3, 1, 1)
    std = np.array(IMAGE_STD).reshape(1, 3, 1, 1)
    pix = (out * std + mean) * 255.0
    assert pix.min() > -3 and pix.max() < 258  # a resize of uint8 pixels, normalised
    # scale (0.9, 1): the crop covers almost all of the image, so it is close to a plain resize
    for p, im in zip(pix, ims):
        ref = np.asarray(im.resize((S, S), Image.BICUBIC), dtype=np.float64)
        assert psnr(p.transpose(1, 2, 0), ref) > 18


@needs_dali
def test_dali_fed_from_shardloader_raw_bytes(tmp_path):
    pytest.importorskip("bmclip._C", reason="bmclip._C not built")
    from bmclip.data.loader import ShardLoader

    p = tmp_path / "s-000.tar"
    with tarfile.open(p, "w") as tf:
        for i in range(7):
            for ext, data in (("jpg", encode(smooth_image(70 + i, 60, i)).tobytes()), ("txt", b"a caption")):
                ti = tarfile.TarInfo(f"k{i}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    ld = ShardLoader([str(p)], batch_size=4, image_size=S, decode=False, seed=0)
    aug = DaliAugment(batch_size=4, image_size=S, source="encoded", augment="center")
    sizes = []
    for b in ld:
        assert "image" not in b and len(b["image_bytes"]) == len(b["key"])
        out = aug(b)
        assert out.shape == (len(b["key"]), 3, S, S)
        sizes.append(out.shape[0])
    assert sizes == [4, 3]


@needs_dali
def test_build_pipeline_rejects_bad_args():
    with pytest.raises(ConfigError):
        build_pipeline(batch_size=2, image_size=S, source="video")
    with pytest.raises(ConfigError):
        build_pipeline(batch_size=2, image_size=S, augment="flip")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            build_pipeline(batch_size=2, image_size=S, device_id=0)


@needs_dali
@pytest.mark.gpu
def test_dali_gpu_matches_cpu_pipeline():
    ims = [smooth_image(96, 64, p) for p in range(4)]
    data = [encode(im) for im in ims]
    kw = dict(batch_size=4, image_size=S, source="encoded", augment="center")
    cpu = DaliAugment(**kw, device_id=None)(data)
    gpu = DaliAugment(**kw, device_id=0)(data)
    assert gpu.is_cuda and gpu.shape == cpu.shape
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1) * 255.0
    diff = ((gpu.cpu() - cpu) * std).abs()  # in pixel units: nvJPEG vs libjpeg IDCT differ slightly
    assert diff.mean() < 2.0


def test_raw_bytes_for_dali_are_header_checked_like_the_cpp_decoder_would_refuse(tmp_path):
    """decode=False hands encoded bytes to DALI. A 65500 x 65500 header failed the whole DALI batch, and a JPEG cut
    off mid-scan was decoded by DALI into flat grey and trained on: both are counted corrupt_image skips now, as
    are a PNG without IEND and a JPEG of more than 500 scans (the C++ decoder refuses all four)."""
    import struct

    pytest.importorskip("bmclip._C", reason="bmclip._C not built")
    from bmclip.data.loader import ShardLoader

    good_jpg = encode(smooth_image(70, 60, 0)).tobytes()
    good_png = encode(smooth_image(50, 40, 1), "PNG").tobytes()
    sof = good_jpg.index(b"\xff\xc0")
    huge = good_jpg[:sof + 5] + struct.pack(">HH", 65500, 65500) + good_jpg[sof + 9:]
    sos = good_jpg.rindex(b"\xff\xda")
    cut_jpg = good_jpg[:sos + (len(good_jpg) - sos) // 2]
    cut_png = good_png[:good_png.rindex(b"IDAT") + 40]
    b = io.BytesIO()
    smooth_image(64, 48, 2).save(b, "JPEG", progressive=True)
    prog = b.getvalue()
    last = prog.rindex(b"\xff\xda")
    scans = prog[:last] + prog[last:-2] * 600 + prog[-2:]
    members = {"ok1.jpg": good_jpg, "ok2.png": good_png, "huge.jpg": huge, "cut.jpg": cut_jpg,
               "cutp.png": cut_png, "scans.jpg": scans, "ok3.jpg": prog}
    p = tmp_path / "s-000.tar"
    with tarfile.open(p, "w") as tf:
        for name, data in members.items():
            for member, payload in ((name, data), (name.rsplit(".", 1)[0] + ".txt", b"a caption")):
                ti = tarfile.TarInfo(member)
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    ld = ShardLoader([str(p)], batch_size=8, image_size=S, decode=False, shuffle=False)
    keys = [k for batch in ld for k in batch["key"]]
    assert keys == ["ok1", "ok2", "ok3"]
    assert ld.skipped == {"corrupt_image": 4}
