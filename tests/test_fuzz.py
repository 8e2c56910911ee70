"""Bounded fuzzing of bmclip._C: deterministic mutation sweeps (always), atheris (when installed) and
coverage-guided libFuzzer + ASan/UBSan targets from csrc/fuzz (when clang is installed)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_C = pytest.importorskip("bmclip._C", reason="C++ extension not built")

from bmclip.errors import DataError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_decode import encode, textured, write_png  # noqa: E402


def image_seeds() -> dict[str, bytes]:
    arr = textured(24, 40)
    im = Image.fromarray(arr)
    return {
        "base.jpg": encode(im, "JPEG", quality=80),
        "prog.jpg": encode(im, "JPEG", progressive=True),
        "gray.jpg": encode(im.convert("L"), "JPEG"),
        "cmyk.jpg": encode(im.convert("CMYK"), "JPEG"),
        "444.jpg": encode(im, "JPEG", subsampling=0),
        "rst.jpg": encode(im, "JPEG", restart_marker_rows=1),
        "rgb.png": write_png(arr, 2, 8),
        "rgb16i.png": write_png(arr.astype(np.uint16) * 257, 2, 16, interlace=True),
        "pal.png": write_png(arr[:, :, 0] % 4, 3, 2, False, np.arange(12).reshape(4, 3), b"\x00\x80"),
        "ga.png": write_png(np.stack([arr[:, :, 0], arr[:, :, 1]], 2), 4, 8, interlace=True),
    }


def tar_seeds() -> dict[str, bytes]:
    out = {}
    for fmt, name in [(tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax"), (tarfile.USTAR_FORMAT, "ustar")]:
        b = io.BytesIO()
        with tarfile.open(fileobj=b, mode="w", format=fmt) as tf:
            for n, d in [("a.jpg", b"x" * 10), ("a.txt", b"cap"), ("d" * 110 + "/b.c.png", b"y"), ("π.json", b"{}")]:
                ti = tarfile.TarInfo(n)
                ti.size = len(d)
                tf.addfile(ti, io.BytesIO(d))
            ti = tarfile.TarInfo("dir")
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
        out[f"{name}.tar"] = b.getvalue()[:4096]
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        op = int(rng.integers(0, 5))
        if not b:
            break
        pos = int(rng.integers(0, len(b)))
        if op == 0:  # bit flip
            b[pos] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:  # interesting byte
            b[pos] = int(rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01]))
        elif op == 2:  # truncate
            del b[pos:]
        elif op == 3:  # duplicate a slice
            n = int(rng.integers(1, 64))
            b[pos:pos] = b[pos : pos + n]
        else:  # delete a slice
            del b[pos : pos + int(rng.integers(1, 64))]
    return bytes(b)


def test_decoder_mutation_sweep():
    rng = np.random.default_rng(1234)
    seeds = list(image_seeds().values())
    dec = _C.Decoder(2, max_pixels=1 << 22)
    for round_ in range(6):
        batch = [mutate(seeds[i % len(seeds)], rng) for i in range(400)]
        out = np.zeros((len(batch), 17, 17, 3), np.uint8)
        reasons = dec.decode_batch(
            batch,
            out,
            seed=round_,
            dct_scaling=bool(round_ % 2),
            augment="center" if round_ % 3 == 0 else "random_resized_crop",
        )
        assert len(reasons) == len(batch)
        for i, r in enumerate(reasons):
            assert r is None or (isinstance(r, str) and r)
            if r is not None:
                assert not out[i].any()
        for d in batch[:60]:
            try:
                dec.decode_image(d)
            except DataError:
                pass


@pytest.mark.slow
def test_tar_mutation_sweep(tmp_path):
    rng = np.random.default_rng(99)
    seeds = list(tar_seeds().values())
    p = tmp_path / "m.tar"
    for i in range(1500):
        data = mutate(seeds[i % len(seeds)], rng)
        p.write_bytes(data)
        idx = _C.TarIndex(str(p))
        for _, members in idx.samples():
            for off, size in members.values():
                assert 0 <= off and off + size <= len(data)
        assert not idx.truncated or idx.errors


def _write_corpus(d: Path, seeds: dict[str, bytes], param_bytes: bool) -> Path:
    """Seed files; the decode targets read their parameters from two leading bytes."""
    d.mkdir(parents=True, exist_ok=True)
    for i, (name, data) in enumerate(seeds.items()):
        (d / name).write_bytes((bytes([i % 16, 20 + i]) if param_bytes else b"") + data)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("target", ["decode", "tar"])
def test_atheris_bounded(tmp_path, target):
    pytest.importorskip("atheris")
    seeds = image_seeds() if target == "decode" else tar_seeds()
    corpus = _write_corpus(tmp_path / "seeds", seeds, target == "decode")
    work = tmp_path / "corpus"
    work.mkdir()
    r = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzz_bmclip.py"),
            target,
            "-max_total_time=12",
            "-timeout=20",
            "-rss_limit_mb=3072",
            str(work),
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Done" in r.stderr


@pytest.mark.slow
def test_libfuzzer_asan_bounded(tmp_path):
    """Coverage-guided fuzzing of the C++ core under ASan + UBSan (needs clang)."""
    clang, clangxx = shutil.which("clang"), shutil.which("clang++")
    if not (clang and clangxx and shutil.which("cmake")):
        pytest.skip("clang/cmake not installed (apt-get install clang)")
    pybind11 = pytest.importorskip("pybind11")
    build = tmp_path / "build"
    env = {**os.environ, "CC": clang, "CXX": clangxx}
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        [
            "cmake",
            "-S",
            str(REPO),
            "-B",
            str(build),
            *gen,
            "-DBMCLIP_FUZZERS=ON",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build / 'lib'}",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "fuzz_tar", "fuzz_decode", "--parallel", "2"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    for target, seeds in (("fuzz_decode", image_seeds()), ("fuzz_tar", tar_seeds())):
        corpus = _write_corpus(tmp_path / f"{target}_seeds", seeds, target == "fuzz_decode")
        work = tmp_path / f"{target}_corpus"
        work.mkdir()
        r = subprocess.run(
            [str(build / target), "-max_total_time=15", "-timeout=20", "-rss_limit_mb=3072", str(work), str(corpus)],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr[-4000:]
        assert "Done" in r.stderr
