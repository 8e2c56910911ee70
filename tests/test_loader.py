"""ShardLoader: splitting, shuffling, resume, skips, truncated tars, background tokenisation.

Shards are written here with Python's tarfile; every sample's image is a flat colour that encodes its
id, so after decoding we can check that each image row really belongs to the key next to it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bmclip.errors import ConfigError, DataError

pytest.importorskip("bmclip._C", reason="bmclip._C (C++ extension) not built")

from bmclip.data.loader import ShardLoader  # noqa: E402

S = 16  # output image size used by most tests (small: the tests are about bookkeeping)


def colour_of(uid: int) -> tuple[int, int, int]:
    """A flat colour identifying sample uid (channels spaced 40 apart: JPEG error is ~2)."""
    return (40 * (uid % 6) + 20, 40 * ((uid // 6) % 6) + 20, 40 * ((uid // 36) % 6) + 20)


def uid_of_image(img: np.ndarray) -> int:
    r, g, b = (int(round((float(img[..., c].mean()) - 20) / 40)) for c in range(3))
    return r + 6 * g + 36 * b


def jpeg_bytes(uid: int, size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour_of(uid)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def write_shards(folder: Path, n_shards: int, per_shard: int, *, json_meta=True, uid0=0) -> list[str]:
    """Shards shard-000000.tar ...; sample uid = global running index; key s{uid:05d}."""
    paths, uid = [], uid0
    for s in range(n_shards):
        p = folder / f"shard-{s:06d}.tar"
        with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(per_shard):
                key = f"s{uid:05d}"
                add_member(tf, f"{key}.jpg", jpeg_bytes(uid))
                add_member(tf, f"{key}.txt", f"caption of sample {uid}".encode())
                if json_meta:
                    add_member(tf, f"{key}.json", json.dumps({"uid": uid}).encode())
                uid += 1
        paths.append(str(p))
    return paths


def collect(loader, check_pixels=True) -> list[str]:
    keys = []
    for b in loader:
        img = b["image"]
        assert img.dtype == torch.uint8 and img.shape[1:] == (loader.image_size, loader.image_size, 3)
        assert img.shape[0] == len(b["key"]) == len(b["text"])
        if check_pixels:
            for row, key, text in zip(img.numpy(), b["key"], b["text"]):
                uid = int(key[1:])
                assert uid_of_image(row) == uid, key
                assert text == f"caption of sample {uid}"
        keys.extend(b["key"])
    return keys


# ---------------------------------------------------------------------------------------------------
def test_missing_shard_and_bad_config(tmp_path):
    urls = write_shards(tmp_path, 1, 2)
    with pytest.raises(DataError, match="not found"):
        ShardLoader(urls + [str(tmp_path / "nope.tar")], batch_size=2, image_size=S)
    with pytest.raises(ConfigError):
        ShardLoader(urls, batch_size=0, image_size=S)
    with pytest.raises(ConfigError):
        ShardLoader(urls, batch_size=2, image_size=S, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        ShardLoader(urls, batch_size=2, image_size=S, augment="flip")


@pytest.mark.parametrize("bad, match", [
    ({"seed": 1.5}, "seed must be an integer"),  # was truncated to 1 silently
    ({"seed": "x"}, "seed must be an integer"),  # was a ValueError from int()
    ({"epoch": -1}, "epoch must be an integer >= 0"),
    ({"num_threads": True}, "num_threads must be an integer"),  # True was one thread
    ({"shuffle_buffer": True}, "shuffle_buffer must be an integer"),
    ({"num_workers": "2", "worker_id": 0}, "num_workers must be an integer"),  # was a TypeError from <
    ({"num_workers": 2, "worker_id": 1.5}, "worker_id must be in"),  # was a TypeError at the first batch
    ({"scale": 0.5}, "scale must be a pair"),  # was "float object is not subscriptable"
    ({"ratio": None}, "ratio must be a pair"),
    ({"ratio": (1.0, float("inf"))}, "ratio must satisfy"),
    ({"image_size": 100_000}, "image_size must be an integer from 1 to 8192"),  # was a 120 GB allocation
    ({"batch_size": 10**9}, "GiB of pixels per batch, more than this machine's memory"),
])
def test_bad_options_are_one_config_error_at_construction(tmp_path, bad, match):
    urls = write_shards(tmp_path, 1, 2)
    kw = {"batch_size": 2, "image_size": S, **bad}
    with pytest.raises(ConfigError, match=match):
        ShardLoader(urls, **kw)


def test_numpy_integers_are_integers(tmp_path):
    urls = write_shards(tmp_path, 1, 4)
    ld = ShardLoader(urls, batch_size=np.int32(2), image_size=np.int64(S), seed=np.uint8(3), num_threads=1)
    assert ld.batch_size == 2 and type(ld.batch_size) is int and type(ld.seed) is int
    assert sum(len(b["key"]) for b in ld) == 4
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ConfigError, match="epoch must be an integer >= 0"):
            ld.set_epoch(bad)
    ld.set_epoch(np.int64(1))
    assert ld.epoch == 1 and sum(len(b["key"]) for b in ld) == 4


@pytest.mark.parametrize("n_shards", [5, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_every_sample_once_per_epoch(tmp_path, n_shards, world_size, num_workers):
    per_shard = 7
    urls = write_shards(tmp_path, n_shards, per_shard)
    everything = sorted(f"s{u:05d}" for u in range(n_shards * per_shard))
    for epoch in (0, 1):
        keys = []
        for rank in range(world_size):
            for w in range(num_workers):
                ld = ShardLoader(urls, batch_size=4, image_size=S, seed=5, epoch=epoch, rank=rank,
                                 world_size=world_size, num_workers=num_workers, worker_id=w,
                                 shuffle_buffer=6, num_threads=1)
                keys += collect(ld)
        assert sorted(keys) == everything


def test_dataloader_worker_processes(tmp_path):
    urls = write_shards(tmp_path, 4, 5)
    ld = ShardLoader(urls, batch_size=3, image_size=S, seed=1, num_threads=1, shuffle_buffer=4)
    dl = torch.utils.data.DataLoader(ld, batch_size=None, num_workers=2)
    keys = [k for b in dl for k in b["key"]]
    assert sorted(keys) == sorted(f"s{u:05d}" for u in range(20))


def test_order_depends_on_seed_and_epoch(tmp_path):
    urls = write_shards(tmp_path, 6, 8)

    def order(seed, epoch):
        return collect(ShardLoader(urls, batch_size=5, image_size=S, seed=seed, epoch=epoch,
                                   shuffle_buffer=10, num_threads=2), check_pixels=False)

    a = order(0, 0)
    assert a == order(0, 0)
    assert sorted(a) == sorted(order(0, 1))
    assert a != order(0, 1)
    assert a != order(1, 0)
    # without shuffling the stream is the shard order
    plain = collect(ShardLoader(urls, batch_size=5, image_size=S, shuffle=False))
    assert plain == [f"s{u:05d}" for u in range(48)]


def test_iteration_advances_epoch_and_set_epoch(tmp_path):
    urls = write_shards(tmp_path, 4, 5)
    ld = ShardLoader(urls, batch_size=4, image_size=S, seed=2, shuffle_buffer=5)
    e0 = collect(ld, check_pixels=False)
    assert ld.epoch == 1 and ld.state_dict()["epoch"] == 1
    e1 = collect(ld, check_pixels=False)
    ld.set_epoch(0)
    assert collect(ld, check_pixels=False) == e0
    assert e1 == collect(ShardLoader(urls, batch_size=4, image_size=S, seed=2, epoch=1, shuffle_buffer=5),
                         check_pixels=False)
    assert ld.stats["samples"] == 60 and ld.stats["batches"] == 15


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_resume_mid_epoch_exact(tmp_path, k, resampled):
    urls = write_shards(tmp_path, 5, 9)
    kw = dict(batch_size=4, image_size=S, seed=11, epoch=2, shuffle_buffer=7, num_threads=2,
              resampled=resampled, augment="random_resized_crop")
    n_batches = 12 if resampled else None

    def run(loader, limit):
        out = []
        for i, b in enumerate(loader):
            if limit is not None and i >= limit:
                break
            out.append((list(b["key"]), b["image"].clone()))
        return out

    full = run(ShardLoader(urls, **kw), n_batches)
    first = ShardLoader(urls, **kw)
    it = iter(first)
    head = []
    for _ in range(k):
        b = next(it)
        head.append((list(b["key"]), b["image"].clone()))
    # the producer has prefetched beyond batch k; the state must still point right after batch k
    state = json.loads(json.dumps(first.state_dict()))
    del it
    second = ShardLoader(urls, **kw)
    second.load_state_dict(state)
    tail = run(second, None if n_batches is None else n_batches - k)
    got = head + tail
    assert [g[0] for g in got] == [f[0] for f in full]
    for (_, a), (_, b) in zip(got, full):
        assert torch.equal(a, b)


def test_resume_with_the_shards_moved_elsewhere(tmp_path):
    """The same shards copied to another place (node-local scratch, another mount, an object store) resume
    exactly: the state names the shards' file names as well as their URLs. Other names or order do not."""
    import shutil

    (tmp_path / "a").mkdir()
    urls = write_shards(tmp_path / "a", 4, 6)
    kw = dict(batch_size=4, image_size=S, seed=3, shuffle_buffer=5, num_threads=2, augment="random_resized_crop")
    full = [(list(b["key"]), b["image"].clone()) for b in ShardLoader(urls, **kw)]
    first = ShardLoader(urls, **kw)
    it = iter(first)
    head = [(list(b["key"]), b["image"].clone()) for b in (next(it), next(it))]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = [str(tmp_path / "b" / Path(u).name) for u in urls]
    second = ShardLoader(moved, **kw)
    second.load_state_dict(state)
    assert second.moved_from_other_location
    got = head + [(list(b["key"]), b["image"].clone()) for b in second]
    assert [g[0] for g in got] == [f[0] for f in full]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, full))
    # what is saved from here on names the new place: a later resume there is an ordinary one
    third = ShardLoader(moved, **kw)
    third.load_state_dict(second.state_dict())
    assert not third.moved_from_other_location
    # other names, another order, or a state saved before names were recorded: refused
    (tmp_path / "c").mkdir()
    renamed = [str(shutil.copy(u, tmp_path / "c" / f"x-{i}.tar")) for i, u in enumerate(urls)]
    for other in (renamed, moved[::-1]):
        with pytest.raises(ConfigError, match="shard list.*same shard file names"):
            ShardLoader(other, **kw).load_state_dict(state)
    with pytest.raises(ConfigError, match="shard list"):
        ShardLoader(moved, **kw).load_state_dict({k: v for k, v in state.items() if k != "names_sha1"})


def test_resume_state_checks(tmp_path):
    urls = write_shards(tmp_path, 3, 4)
    a = ShardLoader(urls, batch_size=2, image_size=S, seed=1)
    it = iter(a)
    next(it)
    st = a.state_dict()
    with pytest.raises(ConfigError, match="seed"):
        ShardLoader(urls, batch_size=2, image_size=S, seed=2).load_state_dict(st)
    with pytest.raises(ConfigError, match="shard list"):
        ShardLoader(urls[:2], batch_size=2, image_size=S, seed=1).load_state_dict(st)
    with pytest.raises(ConfigError, match="not a ShardLoader state"):
        ShardLoader(urls, batch_size=2, image_size=S, seed=1).load_state_dict({**st, "version": 2})
    with pytest.raises(ConfigError, match="damaged"):
        ShardLoader(urls, batch_size=2, image_size=S, seed=1).load_state_dict({**st, "buffer": [[1]]})
    other_rank = ShardLoader(urls, batch_size=2, image_size=S, seed=1, rank=1, world_size=2)
    other_rank.load_state_dict(st)
    with pytest.raises(ConfigError, match="split"):
        iter(other_rank)


@pytest.mark.parametrize("field, value", [
    ("shard", 99), ("shard_pos", 99), ("buffer", [[99, 0]]), ("buffer", [[0, -1]]), ("epoch", "x"),
    ("epoch", -1), ("sample_pos", 1.5), ("split", 5), ("rng", {"bit_generator": "MT19937"}), ("shuffle", "yes"),
    ("urls_sha1", 7),
])
def test_a_damaged_state_is_refused_at_load_not_at_the_next_batch(tmp_path, field, value):
    """Out-of-range shard indices, a string epoch or another generator's state used to load and then fail with an
    IndexError or numpy ValueError at the first batch (or silently change the stream)."""
    urls = write_shards(tmp_path, 2, 6)
    ld = ShardLoader(urls, batch_size=2, image_size=S, shuffle_buffer=4)
    it = iter(ld)
    next(it)
    st = json.loads(json.dumps(ld.state_dict()))
    st[field] = value
    fresh = ShardLoader(urls, batch_size=2, image_size=S, shuffle_buffer=4)
    with pytest.raises(ConfigError, match=f"damaged ShardLoader state.*{field}"):
        fresh.load_state_dict(st)


def write_messy_shard(path: Path) -> dict[str, int]:
    """A shard with good samples and each kind of bad one; returns the expected skip counts."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for uid in range(30):
            key = f"s{uid:05d}"
            kind = uid % 10
            if kind == 1:  # garbage image bytes
                add_member(tf, f"{key}.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg" * 3)
            elif kind == 3:  # truncated jpeg: header only
                add_member(tf, f"{key}.jpg", jpeg_bytes(uid)[:60])
            elif kind == 5:  # no image member
                add_member(tf, f"{key}.cls", b"3")
            else:
                add_member(tf, f"{key}.jpg", jpeg_bytes(uid))
            if kind == 7:
                pass  # no caption
            elif kind == 8:
                add_member(tf, f"{key}.txt", b"caf\xe9 latin-1")
            elif kind == 9:
                add_member(tf, f"{key}.txt", b"  \n")
            else:
                add_member(tf, f"{key}.txt", f"caption of sample {uid}".encode())
    return {"corrupt_image": 6, "missing_image": 3, "missing_caption": 3, "bad_caption_encoding": 3,
            "empty_caption": 3}


def test_corrupt_samples_skipped_and_counted(tmp_path):
    p = tmp_path / "messy.tar"
    expected = write_messy_shard(p)
    ld = ShardLoader([str(p)], batch_size=4, image_size=S, seed=0, shuffle_buffer=5)
    batches = list(ld)
    keys = [k for b in batches for k in b["key"]]
    good = [f"s{u:05d}" for u in range(30) if u % 10 in (0, 2, 4, 6)]
    assert sorted(keys) == good
    # refilling keeps every batch but the last full, and rows stay aligned with their keys
    assert [len(b["key"]) for b in batches] == [4, 4, 4]
    for b in batches:
        for row, key in zip(b["image"].numpy(), b["key"]):
            assert uid_of_image(row) == int(key[1:])
    assert ld.skipped == expected
    assert ld.stats["skipped_total"] == 18 and ld.stats["samples"] == 12


def test_bad_json_members_are_counted_and_the_sample_kept(tmp_path):
    """A json member that is malformed, not UTF-8, not an object or nested 100k deep (which raised RecursionError
    out of the loader and ended training) is counted as bad_json; the sample itself is used, with json {}."""
    p = tmp_path / "json.tar"
    bad = [b"{not json", b"\xff\xfe{}", b"[1, 2]", b"[" * 100_000 + b"]" * 100_000]
    with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tf:
        for uid in range(6):
            add_member(tf, f"s{uid:05d}.jpg", jpeg_bytes(uid))
            add_member(tf, f"s{uid:05d}.txt", f"caption of sample {uid}".encode())
            add_member(tf, f"s{uid:05d}.json", bad[uid] if uid < len(bad) else b'{"uid": %d}' % uid)
    ld = ShardLoader([str(p)], batch_size=3, image_size=S, shuffle=False)
    keys = collect(ld)
    assert keys == [f"s{u:05d}" for u in range(6)]
    assert ld.stats["bad_json"] == 4


def image_bytes(uid: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), colour_of(uid)).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def test_image_format_the_decoder_does_not_read_is_a_counted_skip(tmp_path):
    """A sample whose only image is a recognised but undecoded format (WebP) is counted, never dropped
    silently; beside a decodable image the decodable one is used."""
    p = tmp_path / "webp.tar"
    with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tf:
        for uid in range(10):
            key = f"s{uid:05d}"
            if uid % 4 == 1:  # only a WebP image (upper-case extension once: extensions are case-blind)
                add_member(tf, f"{key}.{'WEBP' if uid == 5 else 'webp'}", image_bytes(uid, "WEBP"))
            elif uid % 4 == 2:  # WebP and PNG: the PNG is decoded
                add_member(tf, f"{key}.webp", image_bytes(uid, "WEBP"))
                add_member(tf, f"{key}.png", image_bytes(uid, "PNG"))
            else:
                add_member(tf, f"{key}.jpg", jpeg_bytes(uid))
            add_member(tf, f"{key}.txt", f"caption of sample {uid}".encode())
    ld = ShardLoader([str(p)], batch_size=3, image_size=S, shuffle=False)
    assert collect(ld) == [f"s{u:05d}" for u in range(10) if u % 4 != 1]  # pixels checked against the keys
    assert ld.skipped == {"unsupported_image_format": 3}
    st = ld.stats
    assert st["samples_skipped"] == 3 and st["samples"] == 7
    assert "webp" in st["example_error"] and "s00001" in st["example_error"]
    assert sum(v for k, v in st["skip_details"].items() if "webp" in k) == 3

    # a shard of WebP images only: the epoch ends with an error naming the cause, not an empty loop
    q = tmp_path / "allwebp.tar"
    with tarfile.open(q, "w", format=tarfile.USTAR_FORMAT) as tf:
        for uid in range(4):
            add_member(tf, f"w{uid}.webp", image_bytes(uid, "WEBP"))
            add_member(tf, f"w{uid}.txt", b"a caption")
    with pytest.raises(DataError, match="all 4 images in a whole epoch are in formats the loader does not decode"):
        list(ShardLoader([str(q)], batch_size=2, image_size=S))


STATE_V1 = Path(__file__).resolve().parent / "fixtures" / "loader_state_v1.json"


@pytest.mark.parametrize("case,drop_pass", [("epoch_mid", False), ("epoch_mid", True), ("resampled", False),
                                            ("worker_split", False), ("messy", False)])
def test_resume_from_a_state_saved_by_the_dict_based_loader(tmp_path, monkeypatch, case, drop_pass):
    """Checkpoints hold ``state_dict()`` as a plain dict: states written before the cursor's state became a
    dataclass (tests/fixtures/loader_state_v1.json, with the batches that followed them) resume exactly,
    and their dict form comes back unchanged (plus the shard names, recorded from then on). ``drop_pass``: a
    state from before the pass tallies."""
    fx = json.loads(STATE_V1.read_text())["cases"][case]
    monkeypatch.chdir(tmp_path)  # the fixture's urls are relative, so its shard-list digest matches
    write_shards(Path("."), 4, 9)
    write_messy_shard(Path("messy.tar"))
    state = fx["state"]
    if drop_pass:
        state = {k: v for k, v in state.items() if k != "pass"}
    ld = ShardLoader(fx["urls"], **fx["kwargs"])
    ld.load_state_dict(state)
    if not drop_pass:
        # unchanged, but for the shard file names it now records (so that a later resume may find them moved)
        again = json.loads(json.dumps(ld.state_dict()))
        assert "names_sha1" not in state and len(again.pop("names_sha1")) == 40
        assert again == state
    rest = []
    for i, b in enumerate(ld):
        if fx["after"] is not None and i >= fx["after"]:
            break
        for row, key in zip(b["image"].numpy(), b["key"]):
            assert uid_of_image(row) == int(key[1:]), key
        rest.append(list(b["key"]))
    assert rest == fx["rest"]
    if fx["after"] is None:
        stats = ld.stats
        assert {k: stats[k] for k in fx["stats_at_end"]} == fx["stats_at_end"]
        assert next(iter(ld))["key"] == fx["next_epoch"]


def test_cursor_state_copies_share_nothing(tmp_path):
    """The state handed out with each batch is a deep copy: advancing the stream afterwards (the producer
    runs ahead) must not move it. Also: the dict form is the checkpoint format and parses back equal."""
    from bmclip.data.cursor import CursorState

    urls = write_shards(tmp_path, 2, 6)
    ld = ShardLoader(urls, batch_size=2, image_size=S, seed=3, shuffle_buffer=4)
    it = iter(ld)
    next(it)
    st = ld._state
    saved = st.to_dict()
    cp = st.copy()
    cp.buffer.append((9, 9))
    cp.counters.count("missing_image", "x")
    cp.tally.reasons["missing_image"] = 1
    cp.rng["state"]["state"] += 1
    cp.epoch += 1
    assert st.to_dict() == saved and cp.to_dict() != saved
    back = CursorState.from_dict(json.loads(json.dumps(saved)))
    assert back == st and back.to_dict() == saved
    del it


def test_truncated_tar_not_fatal(tmp_path):
    urls = write_shards(tmp_path, 2, 10)
    data = Path(urls[1]).read_bytes()
    with tarfile.open(urls[1]) as tf:
        members = tf.getmembers()  # 3 per sample: jpg, txt, json
    cuts = (members[21].offset_data + 5,  # inside sample 7's image data
            members[15].offset,  # exactly at sample 5's first header (end-of-archive blocks missing)
            members[28].offset + 100,  # inside sample 9's json header
            1000)  # inside sample 0's image
    for cut, complete in zip(cuts, (7, 5, 9, 0)):
        Path(urls[1]).write_bytes(data[:cut])
        ld = ShardLoader(urls, batch_size=3, image_size=S, shuffle=False)
        keys = collect(ld)
        n_good_second = sum(1 for k in keys if int(k[1:]) >= 10)
        assert keys[:10] == [f"s{u:05d}" for u in range(10)]  # the intact shard is complete
        # samples before the damage are kept in order
        assert keys[10:] == [f"s{u:05d}" for u in range(10, 10 + n_good_second)]
        # every sample wholly before the cut survives, except that the indexer may drop the last one
        # (it cannot know whether more of its members were in the lost part)
        assert max(complete - 1, 0) <= n_good_second < 10
        assert ld.skipped.get("truncated_tar") == 1
        assert ld.stats["tar_errors"]
    # garbage instead of a tar: nothing fatal either
    Path(urls[1]).write_bytes(b"\x00garbage" * 300)
    keys = collect(ShardLoader(urls, batch_size=3, image_size=S, shuffle=False))
    assert keys == [f"s{u:05d}" for u in range(10)]


def test_json_and_drop_last_and_len(tmp_path):
    urls = write_shards(tmp_path, 3, 5)
    ld = ShardLoader(urls, batch_size=4, image_size=S, seed=0)
    assert len(ld) == 4
    batches = list(ld)
    assert len(batches) == 4 and [len(b["key"]) for b in batches] == [4, 4, 4, 3]
    for b in batches:
        assert [j["uid"] for j in b["json"]] == [int(k[1:]) for k in b["key"]]
    ld = ShardLoader(urls, batch_size=4, image_size=S, seed=0, drop_last=True)
    assert len(ld) == 3 and len(list(ld)) == 3 and ld.stats["dropped_last"] == 3
    assert len(ShardLoader(urls, batch_size=4, image_size=S, rank=1, world_size=2)) == 2  # 1 shard
    with pytest.raises(TypeError):
        len(ShardLoader(urls, batch_size=4, image_size=S, resampled=True))
    (tmp_path / "nojson").mkdir()
    nojson = write_shards(tmp_path / "nojson", 1, 2, json_meta=False, uid0=100)
    assert "json" not in next(iter(ShardLoader(nojson, batch_size=2, image_size=S)))


def test_resampled_is_infinite_with_replacement(tmp_path):
    urls = write_shards(tmp_path, 3, 4)
    ld = ShardLoader(urls, batch_size=5, image_size=S, resampled=True, seed=4, shuffle_buffer=3)
    keys = []
    for i, b in enumerate(ld):
        keys += b["key"]
        if i == 20:
            break
    assert len(keys) == 105 and set(keys) == {f"s{u:05d}" for u in range(12)}


def test_background_tokenisation_matches_direct(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.trainers import WordLevelTrainer

    urls = write_shards(tmp_path, 3, 6)
    tok = tokenizers.Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.train_from_iterator([f"caption of sample {u}" for u in range(10)],
                            WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tok.enable_padding(pad_id=0, length=8)
    tok.enable_truncation(8)
    calls = []

    def tokenize(texts):
        import threading

        calls.append(threading.current_thread().name)
        return torch.tensor([e.ids for e in tok.encode_batch(texts)], dtype=torch.long)

    ld = ShardLoader(urls, batch_size=4, image_size=S, seed=3, tokenizer=tokenize, shuffle_buffer=4)
    n = 0
    for b in ld:
        assert b["input_ids"].dtype == torch.long
        assert torch.equal(b["input_ids"], tokenize(b["text"]))
        n += 1
    assert n == 5 and any(c.startswith("ShardLoader-tokenize") for c in calls)

    with pytest.raises(DataError, match=r"\[N, L\]"):
        next(iter(ShardLoader(urls, batch_size=4, image_size=S, tokenizer=lambda t: torch.zeros(len(t)))))

    # refill after skipped samples: ids still line up with the surviving captions
    p = tmp_path / "messy.tar"
    write_messy_shard(p)
    for b in ShardLoader([str(p)], batch_size=4, image_size=S, tokenizer=tokenize, shuffle_buffer=5):
        assert torch.equal(b["input_ids"], tokenize(b["text"]))


@pytest.fixture(params=["fixtures", "shared"])
def real_figure_jpgs(request, fixtures_dir):
    """Real PMC figure JPEGs: the five CC BY eLife figures in tests/fixtures (always there, so CI runs this) and
    the ../shared sample set (skipped where this checkout has none)."""
    if request.param == "fixtures":
        jpgs = sorted((fixtures_dir / "pmc").glob("elife-32671/*.jpg"))
        assert len(jpgs) == 5
        return jpgs
    root = request.getfixturevalue("pmc_samples")
    jpgs = sorted(root.glob("elife-32671/*.jpg")) + sorted(root.glob("PMC10802347/*.jpg"))
    assert len(jpgs) >= 5
    return jpgs


def test_real_pmc_figures(tmp_path, real_figure_jpgs):
    """Real PMC figure JPEGs through the loader: eval transform vs torchvision's on PIL's decode."""
    jpgs = real_figure_jpgs
    p = tmp_path / "pmc-000000.tar"
    with tarfile.open(p, "w") as tf:
        for i, j in enumerate(jpgs):
            add_member(tf, f"fig{i:03d}.jpg", j.read_bytes())
            add_member(tf, f"fig{i:03d}.txt", f"figure {j.name}".encode())
    size = 64
    from torchvision import transforms as T

    # open_clip's eval transform (minus ToTensor/Normalize), on PIL's full decode
    eval_tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    ld = ShardLoader(str(tmp_path / "pmc-{000000..000000}.tar"), batch_size=3, image_size=size,
                     augment="center", shuffle=False)
    for b in ld:
        for row, key in zip(b["image"].numpy(), b["key"]):
            src = jpgs[int(key[3:])]
            ref = np.asarray(eval_tf(Image.open(src).convert("RGB")), dtype=np.float64)
            mse = ((row.astype(np.float64) - ref) ** 2).mean()
            psnr = 10 * np.log10(255.0**2 / max(mse, 1e-12))
            assert psnr > 38, (src.name, psnr)  # measured 41-48 dB
    assert ld.stats["samples"] == len(jpgs)


def test_decode_options_pass_through(tmp_path):
    urls = write_shards(tmp_path, 1, 4)
    with pytest.raises(ConfigError, match="seed"):
        ShardLoader(urls, batch_size=2, image_size=S, decode_options={"seed": 1})
    kw = dict(batch_size=4, image_size=S, shuffle=False, augment="center")
    a = next(iter(ShardLoader(urls, **kw)))["image"].clone()
    b = next(iter(ShardLoader(urls, **kw, decode_options={"interpolation": "bilinear"})))["image"]
    assert a.shape == b.shape
    for row, key in zip(b.numpy(), [f"s{u:05d}" for u in range(4)]):
        assert uid_of_image(row) == int(key[1:])
    with pytest.raises(TypeError):  # an option the extension does not know is its error, not ignored
        next(iter(ShardLoader(urls, **kw, decode_options={"no_such_option": 1})))


@pytest.mark.parametrize("prefetch", [1, 2])
def test_image_buffer_valid_until_batch_after_next(tmp_path, prefetch):
    """Batch k's zero-copy image survives taking batch k+1 even when the producer is far ahead."""
    import time

    urls = write_shards(tmp_path, 2, 12)
    ld = ShardLoader(urls, batch_size=2, image_size=S, prefetch=prefetch, shuffle=False)
    it = iter(ld)
    prev = next(it)
    prev_copy = prev["image"].clone()
    seen = 1
    for cur in it:
        time.sleep(0.05)  # let the producer run ahead and fill every free slot
        assert torch.equal(prev["image"], prev_copy)  # not yet reused
        for row, key in zip(cur["image"].numpy(), cur["key"]):
            assert uid_of_image(row) == int(key[1:])
        prev, prev_copy = cur, cur["image"].clone()
        seen += 1
    assert seen == 12


def test_unreadable_shard_is_a_counted_skip(tmp_path):
    urls = write_shards(tmp_path, 3, 4)
    ld = ShardLoader(urls, batch_size=4, image_size=S, shuffle=False)
    Path(urls[1]).unlink()  # vanishes after the loader was built (e.g. a network file system hiccup)
    keys = collect(ld)
    assert keys == [f"s{u:05d}" for u in list(range(4)) + list(range(8, 12))]
    assert ld.skipped == {"unreadable_shard": 1}


def test_resampled_splits_draw_independently(tmp_path):
    urls = write_shards(tmp_path, 6, 3)

    def first_keys(worker):
        ld = ShardLoader(urls, batch_size=6, image_size=S, resampled=True, seed=9, num_workers=2,
                         worker_id=worker, shuffle_buffer=0)
        return next(iter(ld))["key"]

    assert first_keys(0) == first_keys(0)
    assert first_keys(0) != first_keys(1)


@pytest.mark.gpu
def test_pinned_ring(tmp_path):
    urls = write_shards(tmp_path, 1, 4)
    b = next(iter(ShardLoader(urls, batch_size=4, image_size=S, pin_memory=True)))
    assert b["image"].is_pinned()
    dev = b["image"].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), b["image"])


def test_resume_at_epoch_boundary(tmp_path):
    urls = write_shards(tmp_path, 3, 5)
    kw = dict(batch_size=4, image_size=S, seed=6, shuffle_buffer=5)
    a = ShardLoader(urls, **kw)
    collect(a, check_pixels=False)
    st = a.state_dict()
    assert st["epoch"] == 1 and st["shard_pos"] == 0 and not st["buffer"]
    b = ShardLoader(urls, **kw)
    b.load_state_dict(st)
    assert collect(b, check_pixels=False) == collect(ShardLoader(urls, **kw, epoch=1), check_pixels=False)
    assert b.stats["samples"] == 30  # counters carry over through the state


def test_random_resized_crop_matches_torchvision(tmp_path):
    """Loader RRC = torchvision resized_crop of PIL's decode at the crop the C++ side reports for the
    loader's (seed, epoch, split, batch) seed; and the crops change with the epoch."""
    from torchvision.transforms import functional as TF

    from bmclip._C import crop_box
    from bmclip.data.cursor import mix

    yy, xx = np.mgrid[0:90, 0:120]
    p = tmp_path / "rrc-000.tar"
    srcs = []
    with tarfile.open(p, "w") as tf:
        for i in range(4):
            arr = np.stack([(xx * 2 + i * 30) % 256, (yy * 3) % 256, (xx + yy + 50 * i) % 256], -1).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")  # lossless: the reference decode is exact
            srcs.append(Image.fromarray(arr))
            add_member(tf, f"k{i}.png", buf.getvalue())
            add_member(tf, f"k{i}.txt", b"c")
    size = 40
    epochs = []
    for epoch in (0, 1):
        ld = ShardLoader([str(p)], batch_size=4, image_size=size, shuffle=False, seed=5, epoch=epoch,
                         decode_options={"dct_scaling": False})
        b = next(iter(ld))
        seed = mix(5, epoch, 0, 0, 0)  # (seed, epoch, split, batch index, refill attempt)
        for i, (row, key) in enumerate(zip(b["image"].numpy(), b["key"])):
            (x0, y0, x1, y1), _, _ = crop_box(120, 90, size, seed, i)
            ref = TF.resized_crop(srcs[int(key[1:])], y0, x0, y1 - y0, x1 - x0, [size, size],
                                  interpolation=TF.InterpolationMode.BICUBIC)
            assert np.abs(row.astype(int) - np.asarray(ref, dtype=int)).max() <= 1
        epochs.append(b["image"].clone())
    assert not torch.equal(epochs[0], epochs[1])
