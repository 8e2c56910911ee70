"""bmclip._C.Decoder against Pillow / torchvision (open_clip's transforms) and hand-built PNGs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_C = pytest.importorskip("bmclip._C", reason="C++ extension not built")

from bmclip.errors import DataError  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "images"
RRC = "random_resized_crop"


# ---------------------------------------------------------------------------------------------
# helpers


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour field + noise + a few hard edges (figure-like), uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack([128 + 100 * np.sin(x / (9 + 4 * c) + c) * np.cos(y / (13 + 3 * c) - c) for c in range(3)], -1)
    a += rng.normal(0, 10, a.shape)
    a[h // 3 : h // 3 + 3, :, :] = 0  # thin dark line
    a[:, (2 * w) // 3 :, 1] = 250  # colour step
    return np.clip(a, 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def pil_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def reference_crop(im: Image.Image, w: int, h: int, size: int, seed: int, i: int, augment: str, **kw):
    """What open_clip's transform gives for the crop decode_batch picked (Pillow, before ToTensor)."""
    window, resized, off = _C.crop_box(w, h, size, seed, i, augment, **kw)
    if augment == RRC:  # torchvision F.resized_crop: crop, then resize the crop
        assert resized == (size, size) and off == (0, 0)
        return np.asarray(im.crop(window).resize(resized, Image.BICUBIC))
    assert window == (0, 0, w, h)
    r = np.asarray(im.resize(resized, Image.BICUBIC))
    return r[off[1] : off[1] + size, off[0] : off[0] + size]


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def write_png(samples: np.ndarray, color_type: int, depth: int, interlace=False, palette=None, trns=None):
    """Minimal PNG encoder (filter 0) for any colour type / bit depth, optionally Adam7-interlaced.

    samples: [H, W] (gray, palette) or [H, W, C] integer array already in the PNG's sample range.
    """
    s = samples if samples.ndim == 3 else samples[:, :, None]
    h, w, _ = s.shape

    def raw_rows(sub: np.ndarray) -> bytes:
        out = bytearray()
        for row in sub:
            out.append(0)
            flat = row.reshape(-1).astype(np.uint32)
            if depth == 16:
                out += flat.astype(">u2").tobytes()
            elif depth == 8:
                out += flat.astype(np.uint8).tobytes()
            else:
                per = 8 // depth
                pad = (-len(flat)) % per
                v = np.concatenate([flat, np.zeros(pad, np.uint32)]).reshape(-1, per)
                shifts = np.arange(per - 1, -1, -1, dtype=np.uint32) * depth
                out += (v << shifts).sum(1).astype(np.uint8).tobytes()
        return bytes(out)

    if interlace:
        raw = b"".join(raw_rows(s[y0::dy, x0::dx]) for x0, y0, dx, dy in _ADAM7 if s[y0::dy, x0::dx].size)
    else:
        raw = raw_rows(s)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, int(interlace)))
    if palette is not None:
        png += _chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    if trns is not None:
        png += _chunk(b"tRNS", trns)
    return png + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def minmax_ref(v: np.ndarray) -> np.ndarray:
    """16-bit greyscale -> uint8, minimum at 0 and maximum at 255, in float64, rounded half to even: what every
    bmclip reader gives (Pillow's convert("RGB") clips instead)."""
    x = v.astype(np.float64)
    return np.clip(np.round((x - x.min()) / (x.max() - x.min()) * 255.0), 0, 255).astype(np.uint8)


def png_cases():
    """(name, png bytes, expected RGB uint8 [H, W, 3]) for every PNG colour type and depth."""
    rng = np.random.default_rng(7)
    h, w = 37, 53
    base = textured(h, w, 3)
    cases = []
    for interlace in (False, True):
        tag = "-adam7" if interlace else ""
        cases.append((f"rgb8{tag}", write_png(base, 2, 8, interlace), base))
        v16 = base.astype(np.uint16) * 257 + rng.integers(0, 256, base.shape).astype(np.uint16)
        cases.append((f"rgb16{tag}", write_png(v16, 2, 16, interlace), (v16 >> 8).astype(np.uint8)))
        alpha = rng.integers(0, 256, (h, w, 1))
        cases.append((f"rgba8{tag}", write_png(np.concatenate([base, alpha], 2), 6, 8, interlace), base))
        a16 = np.concatenate([v16, (alpha * 257).astype(np.uint16)], 2)
        cases.append((f"rgba16{tag}", write_png(a16, 6, 16, interlace), (v16 >> 8).astype(np.uint8)))
        g = base[:, :, 1]
        cases.append((f"gray8{tag}", write_png(g, 0, 8, interlace), np.repeat(g[:, :, None], 3, 2)))
        g16 = g.astype(np.uint16) * 257 + 100
        cases.append((f"gray16{tag}", write_png(g16, 0, 16, interlace), np.repeat(minmax_ref(g16)[:, :, None], 3, 2)))
        ties = (np.arange(h * w) % 511).reshape(h, w).astype(np.uint16) + 1000  # v / 510 * 255: half-way values
        cases.append((f"gray16-ties{tag}", write_png(ties, 0, 16, interlace),
                      np.repeat(minmax_ref(ties)[:, :, None], 3, 2)))
        for d in (1, 2, 4):
            gd = rng.integers(0, 2**d, (h, w))
            exp = (gd * 255 // (2**d - 1)).astype(np.uint8)
            cases.append((f"gray{d}{tag}", write_png(gd, 0, d, interlace), np.repeat(exp[:, :, None], 3, 2)))
        ga = np.stack([g, rng.integers(0, 256, (h, w))], 2)
        cases.append((f"graya8{tag}", write_png(ga, 4, 8, interlace), np.repeat(g[:, :, None], 3, 2)))
        for d in (2, 8):
            pal = rng.integers(0, 256, (2**d, 3))
            idx = rng.integers(0, 2**d, (h, w))
            trns = bytes(rng.integers(0, 256, 2**d).astype(np.uint8))
            cases.append(
                (f"palette{d}-trns{tag}", write_png(idx, 3, d, interlace, pal, trns), pal[idx].astype(np.uint8))
            )
    return cases


PNG_CASES = png_cases()


@pytest.fixture(scope="module")
def dec():
    return _C.Decoder(2)


@pytest.fixture(scope="module")
def jpeg_cases():
    """(name, bytes) JPEGs made with Pillow: baseline 4:2:0 / 4:4:4 / 4:2:2, progressive, gray, CMYK, odd sizes."""
    arr = textured(203, 311)
    im = Image.fromarray(arr)
    return [
        ("baseline420", encode(im, "JPEG", quality=90)),
        ("baseline444", encode(im, "JPEG", quality=95, subsampling=0)),
        ("baseline422", encode(im, "JPEG", quality=85, subsampling=1)),
        ("progressive", encode(im, "JPEG", quality=90, progressive=True)),
        ("gray", encode(im.convert("L"), "JPEG", quality=90)),
        ("gray-progressive", encode(im.convert("L"), "JPEG", progressive=True)),
        ("cmyk", encode(im.convert("CMYK"), "JPEG", quality=90)),
        ("restart", encode(im, "JPEG", quality=80, restart_marker_rows=1)),
        ("tiny1x1", encode(Image.fromarray(arr[:1, :1]), "JPEG")),
        ("odd17x9", encode(Image.fromarray(arr[:9, :17]), "JPEG", quality=90)),
        ("tall", encode(Image.fromarray(textured(700, 40, 5)), "JPEG", quality=90)),
    ]


# ---------------------------------------------------------------------------------------------
# full decode and header probe


def test_decode_image_jpeg_matches_pillow(dec, jpeg_cases):
    for name, data in jpeg_cases:
        ref = np.asarray(pil_rgb(data))
        got = dec.decode_image(data)
        assert got.dtype == np.uint8 and got.shape == ref.shape, name
        np.testing.assert_array_equal(got, ref, err_msg=name)  # same libjpeg ISLOW IDCT: bit-exact
        w, h, fmt = _C.image_info(data)
        assert (w, h, fmt) == (ref.shape[1], ref.shape[0], "jpeg")


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("name,data,expected", PNG_CASES, ids=[c[0] for c in PNG_CASES])
def test_decode_image_png(dec, name, data, expected):
    got = dec.decode_image(data)
    np.testing.assert_array_equal(got, expected)
    assert _C.image_info(data) == (expected.shape[1], expected.shape[0], "png")
    if name.startswith("gray16"):
        # Pillow's convert("RGB") clips 16-bit gray to 255 (I;16 -> L saturates); bmclip's Python readers
        # (evaluation, embed, the dataset builder) min/max scale it, and the C++ decoder gives the same pixels
        from bmclip.data.images import pil_to_rgb

        np.testing.assert_array_equal(np.asarray(pil_to_rgb(Image.open(io.BytesIO(data)))), expected)
    else:
        np.testing.assert_array_equal(np.asarray(pil_rgb(data)), expected)


def test_pillow_written_pngs(dec):
    arr = textured(41, 29, 2)
    for mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16"):
        im = (
            Image.fromarray(arr).convert(mode)
            if mode != "I;16"
            else Image.fromarray(arr[:, :, 0].astype(np.uint16) * 200)
        )
        data = encode(im, "PNG")
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if mode == "I;16":
            v = np.asarray(Image.open(io.BytesIO(data)))
            expected = np.repeat(minmax_ref(v)[:, :, None], 3, 2)
        np.testing.assert_array_equal(dec.decode_image(data), expected, err_msg=mode)


# ---------------------------------------------------------------------------------------------
# fused crop + resize


@pytest.fixture(params=["simd", "scalar"])
def simd_mode(request):
    """Runs a test with the AVX2 resampling passes (where the CPU has them) and with the scalar ones."""
    _C._set_simd(request.param == "simd")
    yield request.param
    _C._set_simd(True)


@pytest.mark.parametrize("augment", [RRC, "center"])
def test_crop_resize_bit_exact_without_dct_scaling(dec, jpeg_cases, augment, simd_mode):
    """Full-scale decode: output == open_clip's Pillow transform on the same crop, pixel for pixel."""
    size, n, seed = 64, 3, 11
    pngs = [(c[0], c[1], Image.fromarray(c[2])) for c in PNG_CASES[:8]]
    for name, data, im in [(n, d, pil_rgb(d)) for n, d in jpeg_cases] + pngs:
        out = np.full((n, size, size, 3), 7, np.uint8)
        reasons = dec.decode_batch([data] * n, out, augment=augment, seed=seed, dct_scaling=False)
        assert reasons == [None] * n, (name, reasons)
        for i in range(n):
            ref = reference_crop(im, im.width, im.height, size, seed, i, augment)
            np.testing.assert_array_equal(out[i], ref, err_msg=f"{name}[{i}]")


def test_bilinear_and_custom_ranges(dec, jpeg_cases, simd_mode):
    data = dict(jpeg_cases)["baseline444"]
    im = pil_rgb(data)
    out = np.zeros((4, 48, 48, 3), np.uint8)
    kw = dict(scale=(0.2, 0.5), ratio=(0.5, 2.0))
    assert dec.decode_batch([data] * 4, out, seed=3, interpolation="bilinear", dct_scaling=False, **kw) == [None] * 4
    for i in range(4):
        window, _, _ = _C.crop_box(im.width, im.height, 48, 3, i, RRC, **kw)
        np.testing.assert_array_equal(out[i], np.asarray(im.crop(window).resize((48, 48), Image.BILINEAR)))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_fit_resize_every_filter_length_matches_pillow(dec, interpolation, simd_mode):
    """decode_fit == Pillow's resize from the full decode, for outputs from 1.6x up to 1/12 of the input.

    Spans both AVX2 horizontal-pass forms (gather across output pixels for filters of <= 12 taps, madd
    across taps for longer ones) and odd output widths (partial 8-pixel blocks at the row end).
    """
    rng = np.random.default_rng(5)
    w, h = 203, 157
    # smooth gradients + noise: every channel and position differs, values cover 0..255
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1)
    arr = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    data = encode(Image.fromarray(arr), "PNG")
    im = Image.fromarray(arr)
    filt = Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC
    for tw in (325, 203, 141, 101, 77, 51, 37, 23, 17):
        th = max(1, round(h * tw / w))
        out = dec.decode_fit(data, tw, th, interpolation=interpolation)
        np.testing.assert_array_equal(out, np.asarray(im.resize((tw, th), filt)), err_msg=f"{tw}x{th}")


def test_matches_torchvision_open_clip_transforms(dec, jpeg_cases):
    """The reference itself: torchvision's functional ops, as open_clip's transforms call them."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    data = dict(jpeg_cases)["progressive"]
    im = pil_rgb(data)
    out = np.zeros((2, 56, 56, 3), np.uint8)
    dec.decode_batch([data] * 2, out, augment=RRC, seed=5, dct_scaling=False)
    (x0, y0, x1, y1), _, _ = _C.crop_box(im.width, im.height, 56, 5, 1, RRC)
    ref = tvf.resized_crop(im, y0, x0, y1 - y0, x1 - x0, [56, 56], InterpolationMode.BICUBIC)
    np.testing.assert_array_equal(out[1], np.asarray(ref))
    dec.decode_batch([data], out, augment="center", seed=0, dct_scaling=False)
    ref = tvf.center_crop(tvf.resize(im, 56, InterpolationMode.BICUBIC), 56)
    np.testing.assert_array_equal(out[0], np.asarray(ref))


@pytest.mark.parametrize("augment", [RRC, "center"])
def test_dct_scaled_decode_psnr_on_real_figures(dec, augment, simd_mode):
    """DCT-reduced decode stays >= 40 dB from Pillow's full-resolution transform (real PMC JPEGs)."""
    size, n, seed = 224, 4, 1
    paths = sorted(FIX.glob("*.jpg"))
    assert len(paths) == 2  # the two full-size eLife figures (an empty glob would pass vacuously)
    for path in paths:
        data = path.read_bytes()
        im = pil_rgb(data)
        out = np.zeros((n, size, size, 3), np.uint8)
        assert dec.decode_batch([data] * n, out, augment=augment, seed=seed) == [None] * n
        for i in range(n):
            ref = reference_crop(im, im.width, im.height, size, seed, i, augment)
            assert psnr(out[i], ref) >= 40.0, (path.name, i)


@pytest.fixture(params=["fixtures", "shared"])
def every_real_jpeg(request):
    """Every real JPEG of the repo's fixtures (7, always there) or of ../shared (skipped where absent)."""
    if request.param == "fixtures":
        files = sorted(FIX.parent.rglob("*.jpg"))
        assert len(files) == 7
        return files
    files = sorted(request.getfixturevalue("pmc_samples").rglob("*.jpg"))
    assert files
    return files


@pytest.mark.slow
def test_dct_scaled_decode_psnr_all_real_jpegs(dec, every_real_jpeg):
    files = every_real_jpeg
    for path in files:
        data = path.read_bytes()
        im = pil_rgb(data)
        for augment in (RRC, "center"):
            out = np.zeros((2, 224, 224, 3), np.uint8)
            assert dec.decode_batch([data] * 2, out, augment=augment, seed=9) == [None] * 2
            for i in range(2):
                ref = reference_crop(im, im.width, im.height, 224, 9, i, augment)
                assert psnr(out[i], ref) >= 40.0, (str(path), augment, i)


def test_dct_scaling_is_used_and_matches_at_small_outputs(dec):
    """A large synthetic JPEG at a small output size takes the reduced-DCT path (checked by speed-free
    means: the result differs from the exact full-scale one) and stays within 40 dB of it."""
    data = encode(Image.fromarray(textured(1200, 1600, 9)), "JPEG", quality=92)
    exact = np.zeros((2, 100, 100, 3), np.uint8)
    fast = np.zeros_like(exact)
    for aug in (RRC, "center"):
        dec.decode_batch([data] * 2, exact, augment=aug, seed=2, dct_scaling=False)
        dec.decode_batch([data] * 2, fast, augment=aug, seed=2)
        assert not np.array_equal(exact, fast)
        assert min(psnr(exact[i], fast[i]) for i in range(2)) >= 40.0
        dec.decode_batch([data] * 2, fast, augment=aug, seed=2, dct_min_ratio=1000.0)  # forces full scale
        np.testing.assert_array_equal(exact, fast)


# ---------------------------------------------------------------------------------------------
# determinism and crop statistics


def test_deterministic_across_thread_counts(jpeg_cases):
    datas = [d for _, d in jpeg_cases] * 3 + [b"garbage", PNG_CASES[0][1]]
    results = []
    for threads in (1, 2, 3):
        out = np.zeros((len(datas), 40, 40, 3), np.uint8)
        reasons = _C.Decoder(threads).decode_batch(datas, out, seed=123)
        results.append((out, reasons))
    for out, reasons in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        assert reasons == results[0][1]
    # different seeds give different crops (a near-square image, so draws fit); huge and negative
    # seeds are accepted
    sq = encode(Image.fromarray(textured(180, 200)), "JPEG")
    a = np.zeros((1, 40, 40, 3), np.uint8)
    b = np.zeros_like(a)
    d = _C.Decoder(1)
    d.decode_batch([sq], a, seed=2**70 + 5)
    d.decode_batch([sq], b, seed=-1)
    assert not np.array_equal(a, b)


def test_random_resized_crop_box_statistics():
    w, h, size = 640, 480, 224
    areas, ratios, xs = [], [], []
    for i in range(4000):
        (x0, y0, x1, y1), resized, off = _C.crop_box(w, h, size, 77, i)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and resized == (size, size) and off == (0, 0)
        cw, ch = x1 - x0, y1 - y0
        areas.append(cw * ch / (w * h))
        ratios.append(cw / ch)
        xs.append(x0 / max(1, w - cw))
    areas, ratios = np.array(areas), np.array(ratios)
    # scale ~ U(0.9, 1.0) and log-ratio ~ U(log 3/4, log 4/3), up to integer rounding of w, h;
    # draws that do not fit are retried (torchvision's 10 attempts), so accepted crops skew small.
    assert areas.min() >= 0.9 - 0.01 and areas.max() <= 1.0
    assert ratios.min() >= 0.75 - 0.01 and ratios.max() <= 4 / 3 + 0.01
    assert 0.9 < areas.mean() < 0.96
    assert 0.2 < np.mean(np.array(xs) < 0.5) < 0.8  # offsets spread over the free range


def test_random_resized_crop_fallback_matches_torchvision():
    # A 10:1 strip: no scale/ratio draw fits, so torchvision falls back to the centre crop of the
    # clamped ratio: h = H, w = round(h * 4/3), centred.
    (x0, y0, x1, y1), _, _ = _C.crop_box(1000, 100, 64, 0, 0)
    assert (x1 - x0, y1 - y0) == (133, 100) and x0 == (1000 - 133) // 2 and y0 == 0
    (x0, y0, x1, y1), _, _ = _C.crop_box(100, 1000, 64, 0, 0)
    assert (x1 - x0, y1 - y0) == (100, 133) and y0 == (1000 - 133) // 2


def test_center_geometry_matches_torchvision():
    # Resize(224): shorter side 224, longer int(224 * long / short); CenterCrop rounds half to even.
    assert _C.crop_box(640, 480, 224, 0, 0, "center") == ((0, 0, 640, 480), (298, 224), (37, 0))
    assert _C.crop_box(225, 500, 224, 0, 0, "center") == ((0, 0, 225, 500), (224, 497), (0, 136))
    assert _C.crop_box(225, 226, 224, 0, 0, "center") == ((0, 0, 225, 226), (224, 224), (0, 0))
    assert _C.crop_box(300, 227, 224, 0, 0, "center")[1:] == ((296, 224), (36, 0))


# ---------------------------------------------------------------------------------------------
# bad input


def test_corrupt_and_truncated_inputs_are_reasons(dec, jpeg_cases):
    jpg = dict(jpeg_cases)["baseline420"]
    prog = dict(jpeg_cases)["progressive"]
    png = PNG_CASES[0][1]
    gif = encode(Image.fromarray(textured(8, 8)), "GIF")
    bad_crc = bytearray(png)
    bad_crc[60] ^= 0xFF  # inside the IDAT data: the CRC check fails
    cases = {
        "empty": (b"", "unknown image format"),
        "garbage": (b"\x00\x01\x02" * 50, "unknown image format"),
        "gif": (gif, "unsupported image format: gif"),
        "jpeg-cut-in-scan": (jpg[: len(jpg) * 2 // 3], "jpeg: premature end of data"),
        "progressive-cut": (prog[: len(prog) // 2], "jpeg: premature end of data"),
        "jpeg-header-only": (jpg[:30], "jpeg:"),
        "png-cut": (png[: len(png) // 2], "png:"),
        "png-bad-crc": (bytes(bad_crc), "png:"),
        "png-sig-only": (png[:8], "png:"),
    }
    datas = [d for d, _ in cases.values()] + [jpg]
    out = np.full((len(datas), 32, 32, 3), 9, np.uint8)
    reasons = dec.decode_batch(datas, out, seed=0)
    for (name, (_, expect)), r in zip(cases.items(), reasons):
        assert r is not None and r.startswith(expect), (name, r)
    assert reasons[-1] is None
    assert not out[:-1].any()  # failed slots are zeroed, never left stale
    for name, (data, _) in cases.items():
        with pytest.raises(DataError):
            dec.decode_image(data)
        if name in ("empty", "garbage", "gif", "jpeg-header-only", "png-sig-only"):
            with pytest.raises(DataError):
                _C.image_info(data)
        else:  # header intact: the probe answers without decoding pixels
            assert _C.image_info(data)[:2] in ((311, 203), (53, 37))


def test_truncation_sweep_never_crashes(dec, jpeg_cases):
    data = dict(jpeg_cases)["baseline420"] + b""
    png = PNG_CASES[1][1]
    cuts = [data[:k] for k in range(0, len(data), max(1, len(data) // 60))]
    cuts += [png[:k] for k in range(0, len(png), max(1, len(png) // 60))]
    out = np.zeros((len(cuts), 24, 24, 3), np.uint8)
    reasons = dec.decode_batch(cuts, out, seed=1)
    assert all(r is not None for r in reasons)


def test_decompression_bomb_guard(jpeg_cases):
    small = _C.Decoder(1, max_pixels=1000)
    assert small.max_pixels == 1000
    data = dict(jpeg_cases)["baseline420"]
    out = np.zeros((2, 16, 16, 3), np.uint8)
    reasons = small.decode_batch([data, PNG_CASES[0][1]], out)
    assert reasons[0].startswith("image too large: 311x203") and reasons[1].startswith("image too large")
    with pytest.raises(DataError, match="too large"):
        small.decode_image(data)
    # a PNG header claiming 100000 x 100000 pixels is refused before any allocation
    bomb = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
    bomb += _chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _chunk(b"IEND", b"")
    assert _C.Decoder(1).decode_batch([bomb], out)[0].startswith("image too large")


def test_argument_validation(dec):
    # each refusal names its own reason: a bare ValueError/TypeError would also accept an unrelated error
    data = PNG_CASES[0][1]
    out1 = lambda: np.zeros((1, 8, 8, 3), np.uint8)  # noqa: E731
    with pytest.raises(TypeError, match="numpy uint8 array"):
        dec.decode_batch([data], np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \[N, S, S, 3\]"):
        dec.decode_batch([data], np.zeros((1, 8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="C-contiguous"):
        dec.decode_batch([data], out1()[:, ::-1])
    with pytest.raises(ValueError, match="room for 1 images, got 2"):
        dec.decode_batch([data, data], out1())
    ro = out1()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        dec.decode_batch([data], ro)
    with pytest.raises(ValueError, match="augment must be"):
        dec.decode_batch([data], out1(), augment="flip")
    with pytest.raises(ValueError, match="scale must satisfy"):
        dec.decode_batch([data], out1(), scale=(0.5, 1.5))
    for bad, msg in [(dict(ratio=(2.0, 1.0)), "ratio must satisfy"), (dict(dct_min_ratio=0.5), "dct_min_ratio"),
                     (dict(interpolation="lanczos"), "interpolation must be")]:
        with pytest.raises(ValueError, match=msg):
            dec.decode_batch([data], out1(), **bad)
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        _C.Decoder(1, max_pixels=0)
    with pytest.raises(ValueError, match="sizes must be positive"):
        _C.crop_box(0, 10, 8, 0, 0)
    with pytest.raises(TypeError, match="buffer protocol"):
        dec.decode_batch([42], out1())
    with pytest.raises(TypeError, match="numpy.ndarray"):  # a list would be converted to a temporary copy: refused
        dec.decode_batch([data], out1().tolist())
    # any buffer: bytes, memoryview, bytearray, numpy views (e.g. TarIndex.read results)
    out = np.zeros((4, 8, 8, 3), np.uint8)
    bufs = [data, memoryview(data), bytearray(data), np.frombuffer(data, np.uint8)]
    assert dec.decode_batch(bufs, out) == [None] * 4
    assert (out == out[0]).all()
    assert dec.decode_batch([], out) == []


def test_decode_from_tar_views(tmp_path, jpeg_cases):
    import tarfile

    p = tmp_path / "s.tar"
    with tarfile.open(p, "w") as tf:
        for i, (_, data) in enumerate(jpeg_cases[:4]):
            ti = tarfile.TarInfo(f"s{i}.jpg")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    idx = _C.TarIndex(str(p))
    views = [idx.read(*idx.sample(i)["jpg"]) for i in range(len(idx))]
    out = np.zeros((4, 32, 32, 3), np.uint8)
    ref = np.zeros_like(out)
    dec = _C.Decoder(2)
    assert dec.decode_batch(views, out, seed=4) == [None] * 4
    dec.decode_batch([d for _, d in jpeg_cases[:4]], ref, seed=4)
    np.testing.assert_array_equal(out, ref)


def test_decoder_survives_fork(jpeg_cases):
    """A Decoder made before fork() (e.g. DataLoader workers) restarts its threads in the child."""
    import multiprocessing as mp

    global _FORK_DECODER
    dec = _FORK_DECODER = _C.Decoder(3)
    datas = [d for _, d in jpeg_cases] * 2
    ref = np.zeros((len(datas), 24, 24, 3), np.uint8)
    dec.decode_batch(datas, ref, seed=8)
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_decode_in_child, (datas,)).get(timeout=120)
    np.testing.assert_array_equal(got, ref)


_FORK_DECODER = None


def _decode_in_child(datas):
    out = np.zeros((len(datas), 24, 24, 3), np.uint8)
    _FORK_DECODER.decode_batch(datas, out, seed=8)
    return out


# ---------------------------------------------------------------------------------------------
# damaged real images: the verdict matches Pillow's refusals and does not depend on the crop


def _entropy_start(data: bytes) -> int:
    """Offset of the first byte after the first SOS segment (start of the entropy-coded data)."""
    i = 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:
            return i + 2 + length
        i += 2 + length


def _jpeg_damages(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    import random

    rng = random.Random(seed)
    s = _entropy_start(data)
    out = []
    for k in range(10):
        b = bytearray(data)
        pos = rng.randrange(s, len(data) - 80)
        kind = ("random16", "zero64", "delete", "marker")[k % 4]
        if kind == "random16":
            b[pos : pos + 16] = bytes(rng.randrange(256) for _ in range(16))
        elif kind == "zero64":
            b[pos : pos + 64] = bytes(64)
        elif kind == "delete":
            del b[pos : pos + rng.randrange(1, 5)]
        else:  # a byte pair that reads as an unknown marker inside the scan
            b[pos : pos + 2] = b"\xff\xc8"
        out.append((f"{kind}@{pos}", bytes(b)))
    for frac in (0.5, 0.9, 0.99):
        out.append((f"cut@{frac}", data[: int(len(data) * frac)]))
    return out


def _pillow_refuses(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (OSError, SyntaxError, ValueError):
        return True
    return False


def _our_verdicts(dec, data: bytes) -> list[str | None]:
    """The reason (None = decoded) of the fused crop (two seeds), the eval transform and the full decode."""
    out = np.zeros((1, 64, 64, 3), np.uint8)
    verdicts = [dec.decode_batch([data], out, augment=RRC, seed=s)[0] for s in (0, 7)]
    verdicts.append(dec.decode_batch([data], out, augment="center", seed=0)[0])
    try:
        dec.decode_image(data)
        verdicts.append(None)
    except DataError as e:
        verdicts.append(str(e))
    return verdicts


def test_damaged_real_jpegs_fail_where_pillow_refuses(dec):
    """Real figures damaged in the entropy-coded data or cut short: every file Pillow refuses fails
    here too, whatever the crop; a file refused only here is one libjpeg reported as corrupt data
    (Pillow ignores those warnings and hands out grey/garbage blocks)."""
    files = sorted(FIX.parent.rglob("*.jpg"))
    assert len(files) == 7
    tallies = {"pillow_refuses": 0, "corrupt_warning_only": 0, "both_accept": 0}
    for fi, path in enumerate(files):
        for name, data in _jpeg_damages(path.read_bytes(), fi):
            v = _our_verdicts(dec, data)
            ours_fail = [r is not None for r in v]
            assert len(set(ours_fail)) == 1, (path.name, name, v)  # the crop does not change the verdict
            if _pillow_refuses(data):
                tallies["pillow_refuses"] += 1
                assert ours_fail[0], (path.name, name)
            elif ours_fail[0]:
                tallies["corrupt_warning_only"] += 1
                assert "Corrupt JPEG data" in v[0], (path.name, name, v[0])
            else:
                tallies["both_accept"] += 1
    # both rules were exercised (truncations and in-scan markers: Pillow refuses; a desynchronised scan
    # that libjpeg only warns about: refused here alone)
    assert tallies["pillow_refuses"] >= 21 and tallies["corrupt_warning_only"] >= 5, tallies


def test_every_real_jpeg_still_decodes_in_every_mode(dec, every_real_jpeg):
    for path in every_real_jpeg:
        assert _our_verdicts(dec, path.read_bytes()) == [None] * 4, str(path)


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset of the length field, data length) of every chunk."""
    i, out = 8, []
    while i < len(data):
        n = struct.unpack(">I", data[i : i + 4])[0]
        out.append((data[i + 4 : i + 8], i, n))
        i += 12 + n
    return out


def _chunk_bytes(tag: bytes, payload: bytes, crc_ok: bool = True) -> bytes:
    crc = zlib.crc32(tag + payload) ^ (0 if crc_ok else 1)
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc & 0xFFFFFFFF)


def _png_damages(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    import random

    rng = random.Random(seed)
    chunks = _png_chunks(data)
    idats = [c for c in chunks if c[0] == b"IDAT"]
    first_idat = idats[0][1]
    iend = [c for c in chunks if c[0] == b"IEND"][0][1]
    out = []
    for k in range(3):  # a flipped byte in the compressed data, CRC recomputed (only zlib can notice)
        _, off, n = rng.choice(idats)
        b = bytearray(data)
        b[off + 8 + rng.randrange(n)] ^= 0xFF
        b[off + 8 + n : off + 12 + n] = struct.pack(">I", zlib.crc32(bytes(b[off + 4 : off + 8 + n])))
        out.append((f"idat-byte-{k}", bytes(b)))
    _, off, n = idats[-1]  # the Adler-32 checksum after the last row
    b = bytearray(data)
    b[off + 8 + n - 1] ^= 0x01
    b[off + 8 + n : off + 12 + n] = struct.pack(">I", zlib.crc32(bytes(b[off + 4 : off + 8 + n])))
    out.append(("adler32", bytes(b)))
    b = bytearray(data)  # IDAT CRC wrong (Pillow does not check it; libpng does: corrupt data)
    b[off + 8 + n + 3] ^= 0x01
    out.append(("idat-crc", bytes(b)))
    text = _chunk_bytes(b"tEXt", b"Comment\x00damaged", crc_ok=False)
    out.append(("text-crc-before-idat", data[:first_idat] + text + data[first_idat:]))
    out.append(("text-crc-after-idat", data[:iend] + text + data[iend:]))
    b = bytearray(data)
    b[-1] ^= 0x01
    out.append(("iend-crc", bytes(b)))
    for frac in (0.3, 0.8, 0.98):
        out.append((f"cut@{frac}", data[: int(len(data) * frac)]))
    return out


@pytest.mark.parametrize("interlace", [False, True])
def test_damaged_real_pngs_fail_where_pillow_refuses(dec, interlace):
    """A real figure as PNG, damaged: every file Pillow refuses fails here too, whatever the crop;
    damage Pillow ignores (a bad CRC on a chunk after the image data or on IEND) does not reject it,
    and one refused only here is a CRC failure of the image data (libpng checks IDAT CRCs, Pillow not)."""
    im = Image.open(FIX / "elife-32671-fig5.jpg").convert("RGB")
    im = im.resize((im.width // 4, im.height // 4))
    buf = io.BytesIO()
    im.save(buf, "PNG", interlace=interlace)
    data = buf.getvalue()
    assert _our_verdicts(dec, data) == [None] * 4
    refused = accepted = 0
    for name, bad in _png_damages(data, int(interlace)):
        v = _our_verdicts(dec, bad)
        ours_fail = [r is not None for r in v]
        assert len(set(ours_fail)) == 1, (name, v)
        if _pillow_refuses(bad):
            refused += 1
            assert ours_fail[0], name
        elif ours_fail[0]:
            assert name == "idat-crc" and "CRC error" in v[0], (name, v)
        else:
            accepted += 1
    assert refused >= 7 and accepted >= 2, (refused, accepted)
