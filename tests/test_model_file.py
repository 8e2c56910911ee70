"""Native model files and the one model resolver: safe loading (malicious pickles refused, side effect never
happens), atomic saving, and every command that takes a model (train --model.init_checkpoint, eval, embed,
convert) run as a user runs it on a real training checkpoint, its run dir, a convert output and the older
file layout, with the results checked against models rebuilt independently of the resolver."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_eval_cli import _shards

from bmclip.cli import build_parser, main
from bmclip.cli.embed import bundled_samples
from bmclip.cli.embed import embed as embed_command
from bmclip.errors import CheckpointError
from bmclip.interop import WEIGHTS_NAME, load_open_clip, open_clip_state_dict
from bmclip.io import atomic_writer
from bmclip.io.checkpoint_dir import latest_valid
from bmclip.io.model_file import load_state_dict, safe_torch_load, save_state_dict
from bmclip.model import IMAGE_MEAN, IMAGE_STD, create_model
from bmclip.model.transforms import load_image
from bmclip.tokenizer import Tokenizer, get_tokenizer
from bmclip.train.checkpoint import CheckpointWriter


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_torch_zip(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="refusing"):
        safe_torch_load(path)
    assert not marker.exists()
    # Sanity: the file really is dangerous when loaded unsafely (proves the test can fail).
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"\x1f\x8b\x08\x00 a gzip stream", b"ustar-ish junk " * 40, b""])
def test_a_file_that_is_no_torch_file_says_so(tmp_path, content):
    """Random bytes, a gzip or an empty file are not 'unsafe pickles': the error says what the file is not."""
    path = tmp_path / "junk.tar"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"not a torch file \(neither the zip archive torch.save writes nor a "
                                              r"pickle; it starts with b'"):
        safe_torch_load(path)


def test_malicious_raw_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".safetensors"])
def test_roundtrip(tmp_path, suffix):
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(5), "c": torch.tensor(1.5)}
    sd["tied"] = sd["a.weight"]  # shared storage must not break safetensors
    path = tmp_path / f"m{suffix}"
    save_state_dict(sd, path)
    back = load_state_dict(path)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_training_checkpoint_layout_and_prefixes(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module.x": torch.ones(2), "module.y": torch.zeros(1)}}, path)
    assert sorted(load_state_dict(path)) == ["x", "y"]


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.bin")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError):
        load_state_dict(junk)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError):
        load_state_dict(bad_st)
    notsd = tmp_path / "list.pt"
    torch.save([torch.ones(1)], notsd)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict(notsd)
    mixed = tmp_path / "mixed.pt"
    torch.save({"a": torch.ones(1), "step": 7}, mixed)
    with pytest.raises(CheckpointError, match="'step'"):
        load_state_dict(mixed)


def _flip(path: Path, at: float, n: int = 8) -> None:
    b = bytearray(path.read_bytes())
    i = int(len(b) * at)
    b[i:i + n] = bytes(x ^ 0xFF for x in b[i:i + n])
    path.write_bytes(bytes(b))


def test_a_damaged_model_file_is_caught_by_the_crcs_torch_save_recorded(tmp_path):
    """torch.load reads a .pt whose tensor bytes were damaged without a word (the reference below shows it: no
    error, other weights). The CRC32 torch.save stores for each zip record is checked beside the load, for bmclip
    model files and open_clip weights alike; a file written with torch's CRCs switched off still loads."""
    from bmclip.io.model_file import read_model_file, save_model_file

    torch.manual_seed(3)
    m = create_model("tiny")
    sd = m.state_dict()
    p = tmp_path / "m.pt"
    save_model_file(sd, m.config.to_dict(), p)
    _flip(p, 0.5)
    silently = torch.load(p, weights_only=True)["model"]
    assert any(not torch.equal(silently[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError,
                       match=r"m\.pt is damaged: record '[^']+' fails the CRC32 torch\.save recorded for it \(.*copy"):
        read_model_file(p)
    with pytest.raises(CheckpointError, match="is damaged"):
        load_state_dict(p)  # the path open_clip weights take
    assert main(["embed", "--checkpoint", str(p), "--captions", "x"]) == 2
    # the damage hits the pickle record: the CRC verdict, not an unpickling detail
    q = tmp_path / "q.pt"
    torch.save({"w": torch.zeros(3)}, q)
    b = bytearray(q.read_bytes())
    i = b.index(b"\x80\x02", b.index(b"data.pkl"))
    b[i + 2] = 0xFE
    q.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match=r"q\.pt is damaged: record '[^']*data\.pkl' fails the CRC32"):
        safe_torch_load(q)
    # torch's own CRCs switched off: nothing to check, no false alarm
    from torch.serialization import get_crc32_options, set_crc32_options

    old = get_crc32_options()
    set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(6.0)}, tmp_path / "nocrc.pt")
    finally:
        set_crc32_options(old)
    assert torch.equal(safe_torch_load(tmp_path / "nocrc.pt")["w"], torch.arange(6.0))


def test_a_damaged_safetensors_model_file_is_caught_by_the_crc_in_its_metadata(tmp_path):
    """safetensors records no checksum, and its loader reads damaged tensor bytes without a word (the reference
    below). bmclip writes the CRC32 of the tensor data into the metadata and checks it on load; a safetensors file
    written by anyone else (no such key) loads as before."""
    import json
    import zlib

    from safetensors.torch import load_file, save_file

    from bmclip.io.model_file import SAFETENSORS_CRC_KEY, read_model_file, save_model_file

    torch.manual_seed(4)
    m = create_model("tiny")
    sd = m.state_dict()
    p = tmp_path / "m.safetensors"
    save_model_file(sd, m.config.to_dict(), p)
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    assert meta[SAFETENSORS_CRC_KEY] == f"{zlib.crc32(raw[8 + n:]):08x}"  # the CRC of the data section
    config, got = read_model_file(p)
    assert config == m.config.to_dict() and all(torch.equal(got[k], v) for k, v in sd.items())
    _flip(p, 0.6)
    silently = load_file(str(p))
    assert any(not torch.equal(silently[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match=r"m\.safetensors is damaged: its tensor data has CRC32 [0-9a-f]{8}, "
                                              r"not the [0-9a-f]{8} recorded in its metadata"):
        read_model_file(p)
    with pytest.raises(CheckpointError, match="is damaged"):
        load_state_dict(p)
    save_file({"w": torch.arange(4.0)}, str(tmp_path / "plain.safetensors"))  # no CRC key: nothing to check
    assert torch.equal(load_state_dict(tmp_path / "plain.safetensors")["w"], torch.arange(4.0))


def test_atomic_writer_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_model(tmp_path, suffix):
    from bmclip.io.model_file import save_model
    from bmclip.model import create_model
    from bmclip.model.file import load_model

    torch.manual_seed(0)
    model = create_model("tiny", init_logit_bias=-5.0)
    save_model(model, tmp_path / f"m{suffix}")
    back = load_model(tmp_path / f"m{suffix}")
    assert back.config == model.config
    sd0, sd1 = model.state_dict(), back.state_dict()
    assert set(sd0) == set(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert all(p.requires_grad for p in back.parameters())
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(1, 100, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            back.eval()(images, ids)["text_features"], model.eval()(images, ids)["text_features"]
        )


def test_load_model_key_errors(tmp_path):
    from bmclip.model import create_model
    from bmclip.model.file import load_model

    model = create_model("tiny")
    sd = model.state_dict()
    cfg = model.config.to_dict()
    torch.save({"model_config": cfg, "state_dict": {k: v for k, v in sd.items() if k != "visual.norm.bias"}},
               tmp_path / "a.pt")  # fmt: skip
    with pytest.raises(CheckpointError, match="visual.norm.bias"):
        load_model(tmp_path / "a.pt")
    torch.save({"model_config": cfg, "state_dict": {**sd, "extra.w": torch.ones(1)}}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="extra.w"):
        load_model(tmp_path / "b.pt")
    torch.save(sd, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not a bmclip model checkpoint"):
        load_model(tmp_path / "c.pt")


# ------------------------------------------------------------------------------------------------------
# One model file, one resolver: every command that takes a model, run as a user runs it.

TRAIN_SMALL = ["--progress=false", "--data.batch_size=8", "--val_every=0", "--num_threads=1", "--data.num_threads=1",
               "--log_every=1"]


def _independent_model(model_pt):
    """The model in a model file, rebuilt with plain torch.load + create_model (not the code under test)."""
    blob = torch.load(model_pt, map_location="cpu", weights_only=True)
    model = create_model(blob["model_config"])
    model.load_state_dict(blob["model"] if "model" in blob else blob["state_dict"], strict=True)
    return model.eval()


def _embed_similarity(*argv):
    return embed_command(build_parser().parse_args(["embed", *argv]))["similarity"]


def _reference_similarity(model, tok):
    paths, caps = bundled_samples()
    pix = torch.stack([load_image(p, model.config.vision.image_size) for p in paths])
    with torch.no_grad():
        img = F.normalize(model.encode_image(pix), dim=-1)
        return img @ F.normalize(model.encode_text(tok(caps)), dim=-1).T


def _eval_embeddings(model_arg, run, out):
    """``bmclip eval retrieval MODEL`` on the run's shards; the stored (image, text) embeddings."""
    rc = main(["eval", "retrieval", str(model_arg), "--shards", run["shards"], "--out", str(out), "--reader",
               "python", "--device", "cpu", "--batch-size", "8", "--storage-dtype", "float32"])
    assert rc == 0
    return np.load(out / "embeddings" / "image_emb.npy"), np.load(out / "embeddings" / "text_emb.npy")


def _reference_embeddings(model, tok, pairs):
    """Pair i's embeddings computed directly: flat-colour image i (exact through resizing) and caption i."""
    s = model.config.vision.image_size
    colours = torch.tensor([c for c, _ in pairs], dtype=torch.float64) / 255.0
    x = (colours - torch.tensor(IMAGE_MEAN, dtype=torch.float64)) / torch.tensor(IMAGE_STD, dtype=torch.float64)
    x = x.float()[:, :, None, None].expand(-1, -1, s, s).contiguous()
    with torch.no_grad():
        return model.encode_image(x).numpy(), model.encode_text(tok([t for _, t in pairs])).numpy()


def _assert_embeddings(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * np.abs(w).max())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real ``bmclip train`` run on webdataset shards with its own tokenizer (2 steps, a checkpoint each)."""
    root = tmp_path_factory.mktemp("trained")
    pairs = _shards(root, n=24, per_shard=10)
    tok = Tokenizer.train([c for _, c in pairs] * 3, vocab_size=200, context_length=32)
    tok.save(root / "tok")
    run = root / "run"
    shards = str(root / "shard-{000000..000002}.tar")
    rc = main(["train", "tiny-cpu", f"--out_dir={run}", "--steps=2", "--ckpt_every=1", "--keep_last=5",
               f"--data.train={shards}", "--data.synthetic=false", f"--data.tokenizer={root / 'tok'}", *TRAIN_SMALL])
    assert rc == 0
    ckpt = run / "checkpoints" / "step_00000002"
    assert latest_valid(run / "checkpoints") == ckpt and (ckpt / "vocab.txt").is_file()
    return {"run": run, "ckpt": ckpt, "pairs": pairs, "shards": shards, "tok_dir": root / "tok"}


def test_training_checkpoint_through_embed_eval_and_convert(trained, tmp_path, capsys):
    run, ckpt = trained["run"], trained["ckpt"]
    model = _independent_model(ckpt / "model.pt")
    ctx = model.config.text.context_length
    tok = get_tokenizer(trained["tok_dir"], context_length=ctx)  # the tokenizer the run was trained with
    want = _reference_similarity(model, tok)
    # The checkpoint's own tokenizer is what makes the numbers right: the bundled one gives others.
    assert not torch.allclose(want, _reference_similarity(model, get_tokenizer(None, context_length=ctx)), atol=1e-3)
    for arg in (run, ckpt, ckpt / "model.pt"):
        torch.testing.assert_close(_embed_similarity("--checkpoint", str(arg)), want, rtol=0, atol=1e-5)
    assert main(["embed", "--checkpoint", str(run)]) == 0
    assert "cosine similarity" in capsys.readouterr().out

    want_emb = _reference_embeddings(model, tok, trained["pairs"])
    for i, arg in enumerate((run, ckpt)):
        _assert_embeddings(_eval_embeddings(arg, trained, tmp_path / f"eval{i}"), want_emb)

    # The tiny ViT has no timm twin, so open_clip could not build it: the export refuses, naming why; the
    # checkpoint itself was read (it is not rejected as "not a bmclip model").
    capsys.readouterr()
    assert main(["convert", "--to-open-clip", str(run), "--out", str(tmp_path / "oc")]) == 2
    err = capsys.readouterr().err
    assert "timm" in err and "not a bmclip" not in err


def _open_clip_folder(tmp_path, seed=3):
    """An open_clip-layout folder of a tiny model (64-wide heads: the shapes alone describe it exactly)."""
    torch.manual_seed(seed)
    src = create_model("tiny", vision={"heads": 2}, text={"heads": 2}).eval()
    save_state_dict(open_clip_state_dict(src), tmp_path / "oc" / WEIGHTS_NAME)
    return src, tmp_path / "oc"


def _init_checkpoint_run(model_arg, out, capsys):
    rc = main(["train", "tiny-cpu", f"--out_dir={out}", f"--model.init_checkpoint={model_arg}", "--steps=1",
               "--optim.lr=1e-12", "--data.synthetic_size=64", *TRAIN_SMALL])
    assert rc == 0, capsys.readouterr().err[-2000:]
    return torch.load(latest_valid(out / "checkpoints") / "model.pt", weights_only=True)["model"]


def _assert_started_from(sd, src):
    # One step at lr 1e-12 moves no weight by more than ~1e-12: the run started from ``src``'s weights,
    # which are far from a fresh initialisation.
    ref = src.state_dict()
    assert set(sd) == set(ref)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=1e-6, msg=k)
    fresh = create_model("tiny").state_dict()
    assert max((fresh[k] - ref[k]).abs().max().item() for k in ref) > 1e-2


def test_convert_output_through_init_checkpoint_and_eval(trained, tmp_path, capsys):
    src, oc = _open_clip_folder(tmp_path)
    for suffix in (".pt", ".safetensors"):
        assert main(["convert", "--from-open-clip", str(oc), "--out", str(tmp_path / f"m{suffix}")]) == 0
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(blob) == {"model", "model_config"}  # the one layout, the same as a training checkpoint's model.pt

    _assert_started_from(_init_checkpoint_run(tmp_path / "m.pt", tmp_path / "run_pt", capsys), src)

    tok = get_tokenizer(None, context_length=src.config.text.context_length)  # no vocab.txt beside the files
    want = _reference_embeddings(src, tok, trained["pairs"])
    _assert_embeddings(_eval_embeddings(tmp_path / "m.safetensors", trained, tmp_path / "eval_st"), want)


def test_older_layout_still_reads(tmp_path, capsys):
    # What ``bmclip convert`` wrote before there was one layout: {"model_config", "state_dict"}.
    torch.manual_seed(5)
    src = create_model("tiny").eval()
    old = tmp_path / "old" / "model.pt"
    old.parent.mkdir()
    torch.save({"model_config": src.config.to_dict(), "state_dict": src.state_dict()}, old)
    _assert_started_from(_init_checkpoint_run(old, tmp_path / "run", capsys), src)
    want = _reference_similarity(src, get_tokenizer(None, context_length=src.config.text.context_length))
    for arg in (old, old.parent):
        torch.testing.assert_close(_embed_similarity("--checkpoint", str(arg)), want, rtol=0, atol=1e-5)


def test_wrong_model_argument_is_a_clear_checkpoint_error(trained, tmp_path, capsys):
    model = create_model("tiny")
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)  # weights without the config that rebuilds them
    bare_st = tmp_path / "bare.safetensors"
    save_state_dict(model.state_dict(), bare_st)
    other = tmp_path / "other.pt"
    torch.save({"model": create_model("tiny", embed_dim=48).state_dict(),
                "model_config": create_model("tiny", embed_dim=48).config.to_dict()}, other)
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken_run" / "checkpoints" / "step_00000001"
    broken.mkdir(parents=True)
    (broken / "model.pt").write_bytes((trained["ckpt"] / "model.pt").read_bytes()[:1000])
    (broken / "meta.json").write_text((trained["ckpt"] / "meta.json").read_text())
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / "meta.json").write_text((trained["ckpt"] / "meta.json").read_text())
    cases = [
        (["eval", "retrieval", str(plain), "--shards", trained["shards"]],
         [str(plain), "not a bmclip model checkpoint", "'model'", "'model_config'", "found a dict with keys"]),
        (["embed", "--checkpoint", str(bare_st)], [str(bare_st), "bmclip_model_config"]),
        (["embed", "--checkpoint", str(tmp_path / "empty")], [str(tmp_path / "empty"), "no bmclip model found",
                                                              "checkpoint dir", "open_clip folder"]),
        (["convert", "--to-open-clip", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
         [str(tmp_path / "nope"), "does not exist"]),
        (["eval", "retrieval", str(broken.parent.parent), "--shards", trained["shards"]],
         [str(broken.parent.parent), "none of its 1 checkpoint dir(s) is complete"]),
        (["embed", "--checkpoint", str(broken)], [str(broken), "incomplete"]),
        (["embed", "--checkpoint", str(no_model)], [str(no_model), "incomplete", "no model.pt"]),
        (["train", "tiny-cpu", f"--out_dir={tmp_path / 'r1'}", f"--model.init_checkpoint={plain}", *TRAIN_SMALL],
         ["model.init_checkpoint: ", str(plain), "not a bmclip model checkpoint"]),
        (["train", "tiny-cpu", f"--out_dir={tmp_path / 'r2'}", f"--model.init_checkpoint={other}", *TRAIN_SMALL],
         ["model.init_checkpoint: ", str(other), "does not fit the model", "has shape"]),
    ]
    for argv, needles in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and "KeyError" not in err, err
        for needle in needles:
            assert needle in err, (argv, needle, err)


@pytest.mark.slow
def test_training_checkpoint_exports_to_open_clip_with_its_tokenizer(tmp_path, capsys):
    """``convert --to-open-clip RUN_DIR`` on a checkpoint of an exportable model (ViT-S/16 + BERT-base, the
    smallest open_clip can build) writes the released layout, with the checkpoint's tokenizer shipped."""
    torch.manual_seed(0)
    model = create_model("biomedclip-vit-s16-224").eval()
    tok = get_tokenizer(context_length=model.config.text.context_length)
    w = CheckpointWriter(tmp_path / "run" / "checkpoints", 7)
    w.begin()
    w.write_rank({"rng": {}, "loader": {}})
    w.write_main(model.state_dict(), model.config.to_dict(), {"step": 7}, tokenizer=tok)
    w.commit()
    out = tmp_path / "export"
    assert main(["convert", "--to-open-clip", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "step 7" in capsys.readouterr().out
    assert (out / "vocab.txt").read_text() == Path(tmp_path / "run" / "checkpoints" / "step_00000007" /
                                                   "vocab.txt").read_text()
    back = load_open_clip(out)
    sd0, sd1 = model.state_dict(), back.state_dict()
    assert set(sd0) == set(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_a_strip_image_is_cropped_before_it_is_resized(tmp_path):
    """A 1 x 120000 px PNG (under 1 KB) used to be resized whole to 224 x 26.9M px (18 GB) before the centre crop.
    Beyond an aspect ratio of 16 only the crop's box of the source is resampled: the pixels agree with the whole
    resize + crop (Pillow, the reference, on a strip small enough to resize whole) within a few grey levels, and
    up to 16 they are exactly those of the whole resize + crop (torchvision's Resize + CenterCrop arithmetic)."""
    import resource

    from PIL import Image

    from bmclip.model.transforms import resize_center_crop

    def reference(im, size):
        w, h = im.size
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        r = im.resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
        return np.asarray(r.crop((left, top, left + size, top + size)), dtype=np.int64)

    rng = np.random.default_rng(5)
    smooth = np.cumsum(rng.integers(-3, 4, (1, 4000, 3)), axis=1)
    strip = Image.fromarray(np.clip(128 + smooth, 0, 255).astype(np.uint8).repeat(60, axis=0))  # 4000 x 60
    got = np.asarray(resize_center_crop(strip, 32), dtype=np.int64)
    assert got.shape == (32, 32, 3) and np.abs(got - reference(strip, 32)).max() <= 3
    normal = Image.fromarray(rng.integers(0, 256, (50, 700, 3), dtype=np.uint8))  # aspect 14: the exact path
    assert np.array_equal(np.asarray(resize_center_crop(normal, 32), dtype=np.int64), reference(normal, 32))
    Image.new("RGB", (1, 120000), (200, 10, 10)).save(tmp_path / "tall.png")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = load_image(tmp_path / "tall.png", 224)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: not the 18 GB of before
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit greyscale PNG (CT, microscopy) used to go through PIL's convert('RGB'), which clips every value
    above 255: on a 0..4095 ramp 94 % of the pixels came out white. Every model-side loader (bmclip embed's,
    model.transforms.load_image, the evaluation readers) scales the used range to 0..255 instead; reference:
    the same ramp scaled in float64."""
    from PIL import Image

    from bmclip.eval.images import load_image as eval_load_image

    ramp = (np.arange(64 * 64, dtype=np.float64).reshape(64, 64) * 4095 / (64 * 64 - 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ct.png")
    assert Image.open(tmp_path / "ct.png").mode.startswith("I")
    grey = np.round(ramp.astype(np.float64) / 4095 * 255) / 255
    mean, std = np.array(IMAGE_MEAN)[:, None, None], np.array(IMAGE_STD)[:, None, None]
    want = (np.repeat(grey[None], 3, 0) - mean) / std
    from bmclip.model.transforms import preprocess_image

    for got in (load_image(tmp_path / "ct.png", 64), preprocess_image(eval_load_image(tmp_path / "ct.png"), 64)):
        np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)
    assert main(["embed", "--images", str(tmp_path / "ct.png"), "--captions", "a CT slice"]) == 0
