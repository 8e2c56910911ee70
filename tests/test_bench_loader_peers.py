"""benchmarks/loader_peers.py measures real pipelines: the anchor (webdataset + torchvision.io + v2 + DataLoader
workers) and the FFCV-style decode yield every sample once with the right shape, and the fidelity pass compares
each decoder with Pillow on the same crop windows. No timing is asserted."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

pytest.importorskip("webdataset")
pytest.importorskip("torchvision")
# torchvision 0.29 deprecates its image decoders (for TorchCodec); the anchor is what users run today
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "loader_peers.py"


@pytest.fixture(scope="module")
def lp():
    spec = importlib.util.spec_from_file_location("loader_peers", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["loader_peers"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def figures(fixtures_dir) -> list[bytes]:
    """Real figure JPEGs: the five small eLife figures and one full-size (1500 px) one."""
    small = sorted((fixtures_dir / "pmc" / "elife-32671").glob("*.jpg"))
    return [p.read_bytes() for p in small] + [(fixtures_dir / "images" / "elife-32671-fig2.jpg").read_bytes()]


@pytest.mark.parametrize("decoder", ["torchvision", "ffcv_style"])
@pytest.mark.parametrize("workers", [1, 2])
def test_anchor_yields_every_sample_once_with_the_right_shape(lp, figures, tmp_path, decoder, workers):
    shards = lp.write_shard_set("t", figures, 11, lp.shard_count([workers]), tmp_path)
    assert shards.n == 12 and len(shards.urls) == 2 * workers  # rounded up to equal shards
    loader = lp.make_anchor(shards.urls, size=40, batch=5, workers=workers, decoder=decoder)
    for _ in range(2):  # persistent workers: a second epoch yields the same samples again
        captions = []
        for images, caps in loader:
            assert images.dtype == torch.uint8
            assert tuple(images.shape[1:]) == (3, 40, 40) and 1 <= images.shape[0] <= 5
            assert len(caps) == images.shape[0]
            assert images.float().std() > 0  # decoded pixels, not a blank buffer
            captions += caps
        assert sorted(captions) == sorted(f"figure {i} of set t" for i in range(12))
    assert lp.run_epoch(loader) == 12


def test_ffcv_window_matches_pillow_on_a_whole_image(lp, figures):
    """The FFCV-style path on the whole image at its own size (no DCT scaling, area resize 1:1) is Pillow's decode."""
    im = Image.open(io.BytesIO(figures[0]))
    w, h = im.size
    side = min(w, h)
    out = lp._ffcv_window(im, (0, 0, side, side), side).permute(1, 2, 0).numpy()
    ref = np.asarray(Image.open(io.BytesIO(figures[0])).convert("RGB").crop((0, 0, side, side)))
    assert lp.psnr(out, ref) == math.inf


def test_fidelity_compares_the_same_windows(lp, figures):
    C = None
    try:
        from bmclip._ext import load_ext

        C = load_ext()
    except ImportError:
        pass
    blobs = [figures[0], figures[-1]]
    res = lp.fidelity(blobs, size=64, per_image=2, seed=5, C=C)
    expected = {"anchor", "ffcv_style"} | ({"bmclip", "bmclip_exact", "bmclip_dct1"} if C is not None else set())
    assert set(res) == expected
    for r in res.values():
        assert len(r["per_window_db"]) == 4 and r["min_db"] <= r["median_db"]
    # torchvision's antialiased bicubic on the same window is close to Pillow's; a different window would be
    # ~15-25 dB, an FFCV-style scaled decode + box filter is ~30 dB
    assert res["anchor"]["min_db"] > 40
    assert math.isfinite(res["ffcv_style"]["median_db"]) and res["ffcv_style"]["median_db"] < res["anchor"]["median_db"]
    if C is not None:
        assert res["bmclip"]["min_db"] > 40 and res["bmclip_exact"]["min_db"] > 40

    # the metric itself: the reference against itself is inf, a blurred copy is finite and below the anchor
    (i, window), = lp.crop_windows(blobs[:1], 64, 1, seed=5, C=C)
    ref = lp.pillow_crop_resize(Image.open(io.BytesIO(blobs[0])).convert("RGB"), window, (64, 64))
    blurred = np.asarray(Image.fromarray(ref).filter(ImageFilter.GaussianBlur(2)))
    assert lp.psnr(ref, ref) == math.inf
    assert math.isfinite(lp.psnr(ref, blurred)) and lp.psnr(ref, blurred) < res["anchor"]["min_db"]
    shifted = (window[0] + 8, window[1], window[2] + 8, window[3])
    moved = lp.pillow_crop_resize(Image.open(io.BytesIO(blobs[0])).convert("RGB"), shifted, (64, 64))
    assert lp.psnr(ref, moved) < 35  # a window 8 px off is visibly different: the pass depends on equal windows


def test_main_writes_a_table_and_json(lp, figures, tmp_path):
    """The whole benchmark on a few samples: every row yields every sample each epoch, fidelity and targets are
    there, the markdown names the machine and versions; a figure the builder refuses is counted and left out."""
    data = tmp_path / "figs"
    data.mkdir()
    for i, b in enumerate(figures):
        (data / f"f{i}.jpg").write_bytes(b)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(data / "tiny.jpg")  # < 64 px: build-dataset refuses it
    out, md = tmp_path / "peers.json", tmp_path / "peers.md"
    rc = lp.main(["--data", str(data), "--n", "8", "--size", "32", "--batch", "4", "--repeats", "1",
                  "--workers", "1", "--fidelity-images", "2", "--fidelity-windows", "1", "--out", str(out),
                  "--md", str(md)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["sets"]) == {"builder", "full"}
    assert res["info"]["refused_by_builder"] == {str(data / "tiny.jpg"): "small_image"}
    assert res["sets"]["full"]["description"].startswith(f"{len(figures)} real figure JPEGs")
    have_c = "decode_1core" in res["sets"]["full"]["speed"]
    for s in res["sets"].values():
        ours = {"bmclip_1t", "bmclip_exact_1t", "bmclip_dct1_1t", "decode_1core"}
        rows = {"anchor_1w", "ffcv_style_1w"} | (ours if have_c else set())
        assert set(s["speed"]) == rows
        for r in s["speed"].values():
            assert r["items"] == [s["samples"]] and r["per_s_median"] > 0
        assert "anchor" in s["fidelity"]
    text = md.read_text()
    info = res["info"]
    assert info["machine"] in text and f"torchvision {info['torchvision']}" in text and "| anchor | 1w |" in text
    # builder-size figures are <= 512 px, as build-dataset stores them
    assert "≤ 512 px" in text


def test_targets_need_speed_and_equal_fidelity(lp):
    def row(*rates):
        return {"per_s": list(rates), "per_s_median": float(np.median(rates))}

    speed = {"anchor_2w": row(100, 110), "bmclip_2t": row(160, 170), "bmclip_dct1_2t": row(200, 220),
             "bmclip_exact_2t": row(120, 130), "decode_1core": row(90, 95)}
    fid = {"anchor": {"min_db": 70.0, "median_db": 75.0}, "bmclip": {"min_db": math.inf, "median_db": math.inf},
           "bmclip_exact": {"min_db": 69.5, "median_db": 80.0}, "bmclip_dct1": {"min_db": 34.0, "median_db": 37.0}}
    all_targets = lp.targets_for(speed, fid, cores=2)
    t = {x["target"].split(" / ")[0]: x for x in all_targets if "anchor_2w" in x["target"]}
    assert len(t) == 3
    assert t["bmclip_2t"]["met"] and t["bmclip_2t"]["value"] == pytest.approx(165 / 105)
    assert t["bmclip_2t"]["range"] == pytest.approx([170 / 110, 160 / 100])  # per-run ratios, min and max
    assert not t["bmclip_dct1_2t"]["met"] and t["bmclip_dct1_2t"]["equal_fidelity"] is False  # fast, 34 dB
    assert lp._status(t["bmclip_dct1_2t"]) == "missed (fidelity)"
    assert lp._status(t["bmclip_exact_2t"]) == "missed (speed)" and lp._status(t["bmclip_2t"]) == "met"
    assert not t["bmclip_exact_2t"]["met"] and t["bmclip_exact_2t"]["equal_fidelity"]  # equal, too slow
    cores = [x for x in all_targets if "decode_1core" in x["target"]]
    assert len(cores) == 1 and cores[0]["value"] == pytest.approx(165 / (2 * 92.5)) and not cores[0]["met"]
    # the default row's ceiling: cores x one core's decode rate / the anchor (2 x 92.5 / 105)
    assert t["bmclip_2t"]["ceiling"] == pytest.approx(185 / 105) and "decode ceiling ~1.76x" in t["bmclip_2t"]["note"]
    assert "ceiling" not in t["bmclip_exact_2t"]  # decode_1core decodes with the defaults, not exact


def test_remote_rows_run_on_a_tiny_set(lp, figures, tmp_path):
    """--remote: the builder set uploaded to a loopback S3 server (moto) is read by ShardLoader straight and
    through the throttled link; every row yields every sample each epoch (a remote run: REMOTE_EPOCHS epochs from a
    cold cache), and the remote targets are there."""
    pytest.importorskip("bmclip._C", reason="the remote rows time ShardLoader")
    pytest.importorskip("s3fs", reason="the remote rows need s3fs")
    pytest.importorskip("moto.server", reason="the remote rows need moto[server]")
    data = tmp_path / "figs"
    data.mkdir()
    for i, b in enumerate(figures):
        (data / f"f{i}.jpg").write_bytes(b)
    out = tmp_path / "remote.json"
    rc = lp.main(["--data", str(data), "--sets", "builder", "--remote", "--remote-mbps", "20", "--n", "8",
                  "--size", "32", "--batch", "4", "--repeats", "1", "--workers", "all",
                  "--only", "bmclip_,local_cold,remote", "--fidelity-images", "1", "--fidelity-windows", "1",
                  "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    s, c = res["sets"]["builder"], res["info"]["cores"]
    assert {f"bmclip_{c}t", f"local_cold_{c}t", f"remote_s3_{c}t", f"remote_s3_throttled_{c}t"} <= set(s["speed"])
    for name, r in s["speed"].items():
        epochs = lp.REMOTE_EPOCHS if name.startswith(("remote", "local_cold")) else 1
        assert r["items"] == [epochs * s["samples"]] and r["per_s_median"] > 0
    assert s["remote"]["link_bytes_per_s"] == 20e6
    for row in (f"remote_s3_{c}t", f"remote_s3_throttled_{c}t"):  # per timed run: bytes fetched, CPU accounting
        r = s["speed"][row]
        assert len(r["bytes_fetched"]) == len(r["cpu_s"]) == len(r["server_cpu_s"]) == 1
        # every epoch fetches every shard, less those still cached from the end of the epoch before
        assert s["remote"]["shard_bytes"] <= r["bytes_fetched"][0] <= lp.REMOTE_EPOCHS * s["remote"]["shard_bytes"]
        assert r["cpu_s"][0] > 0 and r["server_cpu_s"][0] >= 0
    assert s["remote"]["bytes_per_sample"] * s["samples"] == s["remote"]["shard_bytes"] > 0
    names = [t["target"] for t in s["targets"]]
    assert f"remote_s3_{c}t / local_cold_{c}t (link not the bottleneck)" in names  # the reference timed alike
    assert s["speed"][f"local_cold_{c}t"]["bytes_fetched"] == [0]
    assert f"remote_s3_throttled_{c}t / expected rate" in names


def test_remote_targets_pick_the_bound(lp):
    def row(*rates):
        return {"per_s": list(rates), "per_s_median": float(np.median(rates))}

    speed = {"bmclip_2t": row(1000, 1000), "remote_s3_2t": row(950, 960), "remote_s3_throttled_2t": row(480, 520)}
    t = {x["target"].split(" ")[0]: x for x in lp.remote_targets(speed, 2, 200_000, 100e6)}
    assert t["remote_s3_2t"]["value"] == pytest.approx(0.955) and t["remote_s3_2t"]["met"]
    # 100 MB/s / 200 kB per sample = 500 samples/s < local 1000: link-bound, expected 500
    assert t["remote_s3_throttled_2t"]["value"] == pytest.approx(1.0) and t["remote_s3_throttled_2t"]["met"]
    assert "link-bound" in t["remote_s3_throttled_2t"]["note"]
    # a faster link: decode-bound, expected = the local rate; 500 img/s is then a miss (too slow)
    t = {x["target"].split(" ")[0]: x for x in lp.remote_targets(speed, 2, 20_000, 100e6)}
    assert "decode" in t["remote_s3_throttled_2t"]["note"] and not t["remote_s3_throttled_2t"]["met"]
    assert lp._status(t["remote_s3_throttled_2t"]) == "missed (speed)"
    speed["remote_s3_throttled_2t"] = row(1300, 1300)  # faster than expected is a miss too (the link leaks)
    t = {x["target"].split(" ")[0]: x for x in lp.remote_targets(speed, 2, 20_000, 100e6)}
    assert not t["remote_s3_throttled_2t"]["met"]


def test_throttled_expected_rate_counts_the_bytes_really_fetched(lp):
    """A shard the cache kept across an epoch boundary does not cross the link again: the link-bound rate is the
    run's samples x link / the bytes it fetched, not / the shards' size (which would call a link-bound reader
    faster than its link)."""
    def row(rates, **kw):
        return {"per_s": list(rates), "per_s_median": float(np.median(rates)), **kw}

    # 3 epochs x 1000 samples of 100 kB shards = 300 MB; the cache kept 10 % of it, so 270 MB crossed a 100 MB/s
    # link: 3000 samples / 2.7 s = 1111 img/s is the link's rate (not 1000)
    speed = {"bmclip_2t": row([5000, 5000]),
             "remote_s3_throttled_2t": row([1100, 1120], items=[3000, 3000], bytes_fetched=[270e6, 270e6])}
    t = lp.remote_targets(speed, 2, 100_000, 100e6)[0]
    assert t["value"] == pytest.approx(1110 / (3000 * 100e6 / 270e6)) and t["met"]
    assert "link-bound" in t["note"] and "90.0 kB fetched per sample" in t["note"] and "10% not fetched" in t["note"]
    # counted from the shards' size the same run would look 11 % faster than its link: a miss
    del speed["remote_s3_throttled_2t"]["bytes_fetched"]
    t = lp.remote_targets(speed, 2, 100_000, 100e6)[0]
    assert t["value"] == pytest.approx(1.11) and not t["met"]


def test_unthrottled_note_gives_the_servers_cpu_back(lp):
    def row(rates, **kw):
        return {"per_s": list(rates), "per_s_median": float(np.median(rates)), **kw}

    speed = {"bmclip_2t": row([2000, 2000]),
             "remote_s3_2t": row([1700, 1700], wall_s=[4.0, 4.0], server_cpu_s=[0.4, 0.4], cpu_s=[7.2, 7.2])}
    t = lp.remote_targets(speed, 2, 40_000, 100e6)[0]
    assert t["value"] == pytest.approx(0.85) and not t["met"]
    # 0.1 of the 2 cores went to the server: 1700 / (2000 x 1.9 / 2) = 0.89
    assert "used 0.10 of the 2 cores" in t["note"] and f"{0.85 * 2 / 1.9:.2f}x" in t["note"]
    assert "loader's process used 1.80 cores" in t["note"]


def test_throttled_proxy_passes_bytes_at_the_link_rate():
    import os
    import socket
    import threading
    import time

    sys.path.insert(0, str(BENCH.parent))
    from bench_common import ThrottledProxy

    payload = os.urandom(300_000)
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = srv.accept()
        with conn:
            assert conn.recv(5) == b"hello"
            conn.sendall(payload)

    threading.Thread(target=serve, daemon=True).start()
    rate = 1e6
    with ThrottledProxy(srv.getsockname(), rate) as px:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", px.port)) as c:
            c.sendall(b"hello")
            got = bytearray()
            while chunk := c.recv(1 << 16):
                got += chunk
        elapsed = time.monotonic() - t0
    srv.close()
    assert bytes(got) == payload and px.bytes_down == len(payload)
    assert elapsed >= len(payload) / rate - px.burst_s - 0.01  # the link's bandwidth is a ceiling


def test_interleaved_runs_take_a_methods_own_time():
    """A method that times itself (the remote rows leave their teardown, a full garbage collection, out) is
    counted over the seconds it reports; a report longer than the call is refused."""
    import time

    sys.path.insert(0, str(BENCH.parent))
    from bench_common import interleaved_runs

    def plain():
        time.sleep(0.02)
        return 10

    def own():
        t0 = time.perf_counter()
        time.sleep(0.02)
        t = time.perf_counter() - t0
        time.sleep(0.05)  # a teardown not timed
        return 10, t

    res = interleaved_runs({"plain": plain, "own": own}, 2)
    assert res["own"]["items"] == [10, 10] and all(0.02 <= t < 0.05 for t in res["own"]["wall_s"])
    assert all(t >= 0.02 for t in res["plain"]["wall_s"])
    assert res["own"]["per_s"] == pytest.approx([10 / t for t in res["own"]["wall_s"]])
    with pytest.raises(ValueError, match="reported"):
        interleaved_runs({"liar": lambda: (10, 5.0)}, 1)
