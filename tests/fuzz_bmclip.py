"""Atheris fuzz harness for bmclip._C (run by tests/test_fuzz.py for a bounded time).

Usage: python tests/fuzz_bmclip.py {decode|tar} [libFuzzer flags] [corpus dirs...]
The native code is not coverage-instrumented here (mutations are guided by the seeds and Python
coverage only); csrc/fuzz/ holds the coverage-guided libFuzzer + ASan targets for clang builds.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris
import numpy as np

from bmclip import _C
from bmclip.errors import DataError

_DEC = _C.Decoder(2, max_pixels=1 << 22)
_TAR_PATH = os.path.join(tempfile.mkdtemp(prefix="bmclip_fuzz_"), "f.tar")


def fuzz_decode(data: bytes) -> None:
    if len(data) < 2:
        return
    a, b = data[0], data[1]
    img = data[2:]
    size = 1 + b % 48
    out = np.zeros((3, size, size, 3), np.uint8)
    reasons = _DEC.decode_batch(
        [img, img[: len(img) // 2], memoryview(img)[1:]],
        out,
        augment="center" if a & 1 else "random_resized_crop",
        interpolation="bilinear" if a & 2 else "bicubic",
        dct_scaling=bool(a & 4),
        dct_min_ratio=1.0 if a & 8 else 2.0,
        seed=b,
    )
    assert len(reasons) == 3 and all(r is None or (isinstance(r, str) and r) for r in reasons)
    for i, r in enumerate(reasons):
        if r is not None:
            assert not out[i].any()
    try:
        full = _DEC.decode_image(img)
        assert full.ndim == 3 and full.shape[2] == 3
    except DataError:
        pass
    try:
        w, h, fmt = _C.image_info(img)
        assert w > 0 and h > 0 and fmt in ("jpeg", "png")
    except DataError:
        pass
    tw, th = 1 + b % 64, 1 + (a >> 2) % 64
    try:
        t = _DEC.transcode_jpeg(img, tw, th, quality=1 + a % 100)
        if t is not None:
            jpeg, luma = t
            assert luma.shape == (th, tw) and jpeg[:2] == b"\xff\xd8"
    except DataError:
        pass


def fuzz_tar(data: bytes) -> None:
    with open(_TAR_PATH, "wb") as f:
        f.write(data)
    idx = _C.TarIndex(_TAR_PATH)
    assert idx.file_size == len(data)
    for key, members in idx.samples():
        assert key and members
        for off, size in members.values():
            assert 0 <= off and off + size <= len(data)
            assert idx.read(off, size).tobytes() == data[off : off + size]
    assert idx.truncated == bool(idx.truncated)
    if idx.truncated:
        assert idx.errors


def main() -> None:
    target = {"decode": fuzz_decode, "tar": fuzz_tar}[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
