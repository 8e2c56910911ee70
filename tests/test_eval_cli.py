"""End-to-end ``bmclip eval`` commands on generated data with the tiny preset (random init)."""

import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from bmclip.cli import main


def _png_bytes(color, size=(40, 30)):
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, format="PNG")
    return b.getvalue()


def _shards(tmp_path, n=24, per_shard=10):
    """Shards of n (flat-colour PNG, caption) pairs; returns [(colour, caption)] in shard order."""
    rng = np.random.default_rng(0)
    pairs = []
    for s in range(0, n, per_shard):
        with tarfile.open(tmp_path / f"shard-{s // per_shard:06d}.tar", "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                c = tuple(int(v) for v in rng.integers(0, 256, 3))
                pairs.append((c, f"figure {i} colour {c}"))
                for ext, data in (("png", _png_bytes(c)), ("txt", pairs[-1][1].encode())):
                    ti = tarfile.TarInfo(f"k{i:04d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    return pairs


def _ext_loads():
    try:
        from bmclip._ext import load_ext

        load_ext()
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("reader", ["python", "auto", "loader"])
def test_eval_retrieval_cli(tmp_path, reader, capsys):
    if reader == "loader" and not _ext_loads():
        pytest.skip("bmclip._C not built")
    import torch

    pairs = _shards(tmp_path)
    out = tmp_path / "out"
    torch.manual_seed(0)  # the preset's random init, rebuilt below for the reference
    rc = main(["eval", "retrieval", "tiny", "--shards", str(tmp_path / "shard-{000000..000002}.tar"),
               "--out", str(out), "--batch-size", "8", "--block", "5", "--reader", reader, "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "retrieval.json").read_text())
    assert res["n"] == 24 and res["chance_R@1"] == pytest.approx(1 / 24)
    for k in ("image_to_text_R@1", "text_to_image_R@10"):
        assert 0.0 <= res[k] <= 1.0
    # The report must agree with the metric recomputed from the stored embeddings.
    from bmclip.eval.retrieval import retrieval_metrics

    img = np.load(out / "embeddings" / "image_emb.npy")
    txt = np.load(out / "embeddings" / "text_emb.npy")
    assert img.shape[0] == 24 and img.dtype == np.float16
    ref = retrieval_metrics(img, txt)
    assert ref["image_to_text_R@5"] == res["image_to_text_R@5"]
    assert "| chance |" in (out / "retrieval.md").read_text()
    # Row i of each file is pair i's own embedding, whatever the reader: the same model on caption i and on
    # image i (a flat colour, which resizing and cropping leave exact), in shard order. (The metrics alone
    # cannot tell: a random-init model scores near chance whether or not images and captions line up.)
    from bmclip.eval.models import load_model
    from bmclip.model import IMAGE_MEAN, IMAGE_STD

    torch.manual_seed(0)
    model, tok = load_model("tiny")
    s = model.config.vision.image_size
    colours = torch.tensor([c for c, _ in pairs], dtype=torch.float64) / 255.0
    x = (colours - torch.tensor(IMAGE_MEAN, dtype=torch.float64)) / torch.tensor(IMAGE_STD, dtype=torch.float64)
    x = x.float()[:, :, None, None].expand(-1, -1, s, s).contiguous()
    with torch.no_grad():
        want_img = model.encode_image(x).numpy()
        want_txt = model.encode_text(tok([t for _, t in pairs])).numpy()
    for got, want in ((img, want_img), (txt, want_txt)):
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=0, atol=2e-3 * np.abs(want).max())


def _image_folder(root, n_per=6):
    rng = np.random.default_rng(1)
    for cls, base in (("red_things", (220, 30, 30)), ("blue_things", (30, 30, 220))):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(n_per):
            arr = np.clip(np.array(base) + rng.integers(-25, 25, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")


def test_eval_zeroshot_cli_with_yaml(tmp_path):
    _image_folder(tmp_path / "imgs")
    (tmp_path / "task.yaml").write_text(
        "name: colours\nclasses: {red_things: red object, blue_things: blue object}\n"
        "templates: ['a photo of a {}', '{}']\ndata: imgs\n"
    )
    out = tmp_path / "zs"
    rc = main(["eval", "zeroshot", "tiny", "--task", str(tmp_path / "task.yaml"), "--out", str(out),
               "--device", "cpu", "--batch-size", "5"])
    assert rc == 0
    res = json.loads((out / "zeroshot.json").read_text())
    m = res["metrics"]
    assert m["n"] == 12 and sum(m["support"].values()) == 12
    assert res["classes"] == ["red object", "blue object"]
    assert sum(map(sum, m["confusion_matrix"])) == 12 and 0 <= m["auroc"] <= 1
    assert (out / "confusion.png").stat().st_size > 1000


def test_eval_zeroshot_cli_errors(tmp_path, capsys):
    rc = main(["eval", "zeroshot", "tiny", "--dataset", "pcam", "--device", "cpu"])
    assert rc == 2 and "data-root" in capsys.readouterr().err
    rc = main(["eval", "zeroshot", "no-such-model", "--dataset", str(tmp_path), "--device", "cpu"])
    assert rc == 2


def test_eval_linear_probe_cli(tmp_path):
    _image_folder(tmp_path / "train", n_per=10)
    _image_folder(tmp_path / "test", n_per=4)
    out = tmp_path / "lp"
    rc = main(["eval", "linear-probe", "tiny", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
               "--fraction", "0.5", "1.0", "--seeds", "2", "--l2", "1e-3", "1e-1", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "linear_probe.json").read_text())
    assert set(res["fractions"]) == {"0.5", "1"}
    # Red vs blue images are linearly separable even in random-init ViT features.
    assert res["fractions"]["1"]["accuracy_mean"] >= 0.75
    assert "fraction" in (out / "linear_probe.md").read_text()


def test_eval_zeroshot_predictions_csv_skips_and_unlabelled_dicom_folder(tmp_path):
    import csv
    import shutil
    from pathlib import Path

    pydicom = pytest.importorskip("pydicom")
    _image_folder(tmp_path / "imgs", n_per=3)
    (tmp_path / "imgs" / "red_things" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "zs"
    rc = main(["eval", "zeroshot", "tiny", "--dataset", str(tmp_path / "imgs"), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "zeroshot.json").read_text())
    assert res["metrics"]["n"] == 6 and res["skipped"]["count"] == 1
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 6 and not any("broken" in r["sample"] for r in rows)
    assert {r["label"] for r in rows} == {"red_things", "blue_things"}  # labels stay aligned with files
    assert all(r["label"] in r["sample"] for r in rows)

    # A flat folder of real DICOM files: no labels, predictions only, classes from a YAML task.
    base = Path(pydicom.__file__).parent / "data" / "test_files"
    flat = tmp_path / "dicoms"
    flat.mkdir()
    for n in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(base / n, flat / n)
    (tmp_path / "t.yaml").write_text("classes: [CT scan, MRI scan]\ntemplates: ['a {}']\n")
    out2 = tmp_path / "zs2"
    rc = main(["eval", "zeroshot", "tiny", "--dataset", str(flat), "--task", str(tmp_path / "t.yaml"),
               "--out", str(out2), "--device", "cpu"])
    assert rc == 0
    res2 = json.loads((out2 / "zeroshot.json").read_text())
    assert res2["n"] == 2 and "metrics" not in res2 and sum(res2["predicted_counts"].values()) == 2
    rows2 = list(csv.DictReader(open(out2 / "predictions.csv")))
    assert [Path(r["sample"]).name for r in rows2] == ["CT_small.dcm", "MR_small.dcm"]
    assert all(r["label"] == "" and r["prediction"] in ("CT scan", "MRI scan") for r in rows2)
    # Without classes an unlabelled folder is a clear error.
    assert main(["eval", "zeroshot", "tiny", "--dataset", str(flat), "--device", "cpu", "--out", str(out2)]) == 2


def test_eval_retrieval_max_pairs_and_float32(tmp_path, capsys):
    _shards(tmp_path, n=20)
    out = tmp_path / "o"
    argv = ["eval", "retrieval", "tiny", "--shards", str(tmp_path / "shard-*.tar"), "--out", str(out),
            "--batch-size", "6", "--storage-dtype", "float32", "--ks", "1", "3", "--reader", "python",
            "--device", "cpu"]
    rc = main([*argv, "--max-pairs", "15"])
    assert rc == 0
    res = json.loads((out / "retrieval.json").read_text())
    assert res["n"] == 15 and res["chance_R@3"] == pytest.approx(3 / 15) and "image_to_text_R@3" in res
    assert np.load(out / "embeddings" / "text_emb.npy").dtype == np.float32
    # stderr is not a terminal here (as in a batch job's log): one plain progress line at the end, counting up
    # to the maximum and no further
    err = capsys.readouterr().err
    assert re.search(r"^\d\d:\d\d:\d\d embed pairs: 15/15 pairs \(100%\), .*, done$", err, re.M), err
    assert "\r" not in err
    for bad in ("0", "-3"):  # before: -3 evaluated all but the last 3 pairs of the first batch
        assert main([*argv, "--max-pairs", bad]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"bmclip eval: error: max_pairs must be an integer >= 1, got {bad}"], err
    assert main([*argv, "--max-pairs", "15", "--no-progress"]) == 0
    assert "embed pairs" not in capsys.readouterr().err


def test_embedding_reads_no_batch_past_max_pairs(tmp_path):
    """The pairs embedder stops reading at max_pairs: no batch is decoded only to be thrown away."""
    from bmclip.eval.embed import embed_pairs_to_disk
    from bmclip.eval.models import load_model

    model, tok = load_model("tiny")
    s = model.config.vision.image_size
    read = []

    def batches():
        for i in range(5):
            read.append(i)
            yield {"image": np.zeros((4, s, s, 3), np.uint8), "text": [f"caption {i} {j}" for j in range(4)]}

    r = embed_pairs_to_disk(model, tok, batches(), tmp_path, max_pairs=6)
    assert r["n"] == 6 and read == [0, 1]
    r = embed_pairs_to_disk(model, tok, batches(), tmp_path, max_pairs=8)
    assert r["n"] == 8 and read == [0, 1, 0, 1]


def test_eval_loader_reader_needs_a_decode_thread(tmp_path, capsys):
    if not _ext_loads():
        pytest.skip("bmclip._C not built")
    _shards(tmp_path, n=4)
    rc = main(["eval", "retrieval", "tiny", "--shards", str(tmp_path / "shard-000000.tar"), "--reader", "loader",
               "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == ("bmclip eval: error: --workers must be >= 1 with the loader reader "
                                               "(its decode threads), got 0")


def test_failed_embedding_leaves_no_folder_it_made(tmp_path):
    """A run that fails mid-embedding removes its temp files and the embeddings folder it created; a folder that
    was there before (with the user's files) is left as it was."""
    from bmclip.eval.embed import embed_pairs_to_disk
    from bmclip.eval.models import load_model

    model, tok = load_model("tiny")
    s = model.config.vision.image_size

    def batches():
        yield {"image": np.zeros((4, s, s, 3), np.uint8), "text": [f"caption {j}" for j in range(4)]}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        embed_pairs_to_disk(model, tok, batches(), tmp_path / "run" / "embeddings")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    with pytest.raises(OSError, match="No space left"):
        embed_pairs_to_disk(model, tok, batches(), keep)
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- argument checks and output sets


def _no_model(monkeypatch):
    import bmclip.eval.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(bmclip.eval.models, "load_model", refuse)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bmclip eval: error: "), err
    return err[0]


@pytest.mark.parametrize("extra, msg", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),  # before: ValueError traceback
    (["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),  # before: "none of the 12 images could be read"
    (["--max-samples", "-1"], "--max-samples must be >= 1, got -1"),  # before: ValueError traceback
    (["--workers", "-2"], "--workers must be >= 0"),
    (["--task", "T:a {} of {x}"], "template 'a {} of {x}'"),  # before: KeyError after the embedding
    (["--task", "T:a photo of {{}}"], "found 0 fields"),  # before: every class had the same prompt, rc 0
    (["--task", "T:{}{0}"], "found 2 fields"),
])
def test_zeroshot_bad_arguments_fail_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, msg):
    _image_folder(tmp_path / "imgs", n_per=1)
    if extra[0] == "--task":
        (tmp_path / "t.yaml").write_text("classes: {red_things: red, blue_things: blue}\n"
                                         f"templates: [{extra[1][2:]!r}]\n")
        extra = ["--task", str(tmp_path / "t.yaml")]
    _no_model(monkeypatch)
    rc = main(["eval", "zeroshot", "tiny", "--dataset", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"),
               "--device", "cpu", *extra])
    assert rc == 2 and msg in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, msg", [
    (["--seeds", "0"], "--seeds must be >= 1"),  # before: a NaN error after the embedding
    (["--seeds", "-1"], "--seeds must be >= 1"),
    (["--l2", "nan"], "--l2 values must be finite and >= 0, got nan"),  # before: chance accuracy, rc 0
    (["--l2", "1e-3", "inf"], "--l2 values must be finite and >= 0, got inf"),
    (["--fraction", "0.5", "0"], "--fraction values must be in (0, 1], got 0.0"),
    (["--val-fraction", "1"], "--val-fraction must be in (0, 1), got 1.0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["FLAT"], "--train"),  # folders of unlabelled images; before: TypeError on None labels
])
def test_linear_probe_bad_arguments_fail_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, msg):
    _image_folder(tmp_path / "train", n_per=2)
    _image_folder(tmp_path / "test", n_per=1)
    train, test = str(tmp_path / "train"), str(tmp_path / "test")
    if extra == ["FLAT"]:
        (tmp_path / "flat").mkdir()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "flat" / "a.png")
        train = test = str(tmp_path / "flat")
        extra = []
    _no_model(monkeypatch)
    rc = main(["eval", "linear-probe", "tiny", "--train", train, "--test", test, "--out", str(tmp_path / "o"),
               "--device", "cpu", *extra])
    assert rc == 2 and msg in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, msg", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--ks", "0"], "--ks must be integers >= 1"),
    (["--block", "0"], "--block must be >= 1"),
    (["--max-pairs", "0"], "max_pairs must be an integer >= 1, got 0"),
])
def test_retrieval_bad_arguments_fail_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, msg):
    _shards(tmp_path, n=2)
    _no_model(monkeypatch)
    rc = main(["eval", "retrieval", "tiny", "--shards", str(tmp_path / "shard-000000.tar"), "--reader", "python",
               "--out", str(tmp_path / "o"), "--device", "cpu", *extra])
    assert rc == 2 and msg in _one_error_line(capsys)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_zeroshot_outputs_are_replaced_as_one_set(tmp_path, monkeypatch):
    """A run stopped while writing its outputs leaves the previous run's files as they were (before: a new
    predictions.csv beside the old zeroshot.json); a complete run removes this command's files it does not
    write again (an old confusion.png beside an unlabelled run's report), and nothing else."""
    import bmclip.eval.zeroshot
    from bmclip.errors import Terminated

    _image_folder(tmp_path / "imgs", n_per=3)
    out = tmp_path / "zs"
    argv = ["eval", "zeroshot", "tiny", "--dataset", str(tmp_path / "imgs"), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    assert set(before) == {"predictions.csv", "confusion.png", "zeroshot.json", "zeroshot.md", "notes.txt"}

    def stopped(*a, **k):
        raise Terminated()

    with monkeypatch.context() as m:
        m.setattr(bmclip.eval.zeroshot, "save_confusion_png", stopped)
        assert main([*argv, "--max-samples", "2"]) == 143
    assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)

    # An unlabelled folder with a task into the same folder: no confusion matrix this time.
    (tmp_path / "flat").mkdir()
    for i in range(2):
        Image.new("RGB", (12, 12), (200, 10 * i, 10)).save(tmp_path / "flat" / f"{i}.png")
    (tmp_path / "t.yaml").write_text("classes: [red, blue]\n")
    assert main(["eval", "zeroshot", "tiny", "--dataset", str(tmp_path / "flat"), "--task", str(tmp_path / "t.yaml"),
                 "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "predictions.csv", "zeroshot.json", "zeroshot.md"]
    res = json.loads((out / "zeroshot.json").read_text())
    assert res["n"] == 2 and (out / "notes.txt").read_text() == "mine"


def test_zeroshot_integer_labels_and_many_classes(tmp_path):
    """One-based integer labels 1..101: 101 classes named by the labels (before: 102, with a class "0" that no
    image has), no confusion PNG (a note says where the matrix is), and the previous run's PNG is gone."""
    _image_folder(tmp_path / "imgs", n_per=1)
    out = tmp_path / "zs"
    assert main(["eval", "zeroshot", "tiny", "--dataset", str(tmp_path / "imgs"), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert (out / "confusion.png").exists()
    Image.new("RGB", (12, 12), (9, 9, 9)).save(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("path,label\n" + "".join(f"a.png,{i}\n" for i in range(1, 102)))
    assert main(["eval", "zeroshot", "tiny", "--dataset", str(tmp_path / "l.csv"), "--out", str(out),
                 "--device", "cpu"]) == 0
    res = json.loads((out / "zeroshot.json").read_text())
    assert res["classes"] == [str(i) for i in range(1, 102)]
    cm = np.array(res["metrics"]["confusion_matrix"])
    assert cm.shape == (101, 101) and (cm.sum(axis=1) == 1).all()
    assert res["confusion_png"] is None and "101 classes" in res["confusion_png_note"]
    assert not (out / "confusion.png").exists() and "not drawn for 101 classes" in (out / "zeroshot.md").read_text()


def test_retrieval_stopped_after_embedding_keeps_the_previous_set(tmp_path, monkeypatch):
    """The embeddings are written to a staging folder: a run stopped before its report leaves the previous
    embeddings and report together (before: new embeddings beside the old retrieval.json)."""
    import bmclip.eval.retrieval

    _shards(tmp_path, n=12)
    out = tmp_path / "o"
    argv = ["eval", "retrieval", "tiny", "--shards", str(tmp_path / "shard-*.tar"), "--out", str(out),
            "--reader", "python", "--device", "cpu"]
    assert main(argv) == 0
    before = _snapshot(out)
    assert set(before) == {"retrieval.json", "retrieval.md", "embeddings/image_emb.npy", "embeddings/text_emb.npy"}

    def stopped(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(bmclip.eval.retrieval, "retrieval_metrics", stopped)
        assert main([*argv, "--max-pairs", "6"]) == 130
    assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["embeddings", "retrieval.json",
                                                                                  "retrieval.md"]
    assert main([*argv, "--max-pairs", "6"]) == 0
    res = json.loads((out / "retrieval.json").read_text())
    assert res["n"] == 6 and np.load(res["embeddings"]["image"]).shape[0] == 6
    assert res["embeddings"]["image"] == str(out / "embeddings" / "image_emb.npy")


def test_skips_are_counted_by_reason_not_by_file(tmp_path):
    """``skipped.by_reason`` groups skips of one kind (before: one entry per file path, as the text up to the
    first ':' was the path)."""
    _image_folder(tmp_path / "imgs", n_per=2)
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "imgs" / "red_things" / name).write_bytes(b"not a png")
    (tmp_path / "imgs" / "blue_things" / "t.png").write_bytes(_png_bytes((1, 2, 3))[:60])
    out = tmp_path / "zs"
    assert main(["eval", "zeroshot", "tiny", "--dataset", str(tmp_path / "imgs"), "--out", str(out),
                 "--device", "cpu"]) == 0
    skipped = json.loads((out / "zeroshot.json").read_text())["skipped"]
    assert skipped["count"] == 4 and len(skipped["examples"]) == 4
    by = skipped["by_reason"]
    assert sum(by.values()) == 4 and by.get("cannot read image: cannot identify image file") == 3, by
    assert not any("imgs" in k for k in by), by


def test_linear_probe_test_set_may_lack_a_training_class(tmp_path):
    """Test labels are mapped onto the training classes by name: a test set without one of the training classes
    is scored (before: "train classes ... differ from test classes"); one with a class the training set lacks is
    an error before the model loads."""
    rng = np.random.default_rng(2)
    colours = {"blue_things": (30, 30, 220), "green_things": (30, 220, 30), "red_things": (220, 30, 30)}
    for split, n, names in (("train", 8, list(colours)), ("test", 4, ["blue_things", "red_things"])):
        for cls in names:
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(colours[cls]) + rng.integers(-25, 25, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    out = tmp_path / "lp"
    argv = ["eval", "linear-probe", "tiny", "--fraction", "1.0", "--seeds", "1", "--l2", "1e-3", "--out", str(out),
            "--device", "cpu"]
    assert main([*argv, "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test")]) == 0
    res = json.loads((out / "linear_probe.json").read_text())
    assert res["classes"] == list(colours) and res["n_test"] == 8
    # red test images scored as red (index 2 of the training classes), not as green (index 1 of the test folders)
    assert res["fractions"]["1"]["accuracy_mean"] >= 0.75
    assert main([*argv, "--train", str(tmp_path / "test"), "--test", str(tmp_path / "train")]) == 2


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path):
    """A run killed outright (SIGKILL, power loss) cleans up nothing: its hidden staging folder stays in --out.
    The next run of that command there removes it once its process is gone; a live process's folder, another
    host's (whose processes cannot be judged from here) and another command's are left alone."""
    import socket
    import subprocess
    import sys

    from bmclip.eval.report import OutputSet

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    names = {"dead": f".zeroshot.staging-{host}-{dead.pid}-k2j4x9q1", "live": f".zeroshot.staging-{host}-{live.pid}-a1",
             "other host": f".zeroshot.staging-elsewhere-{dead.pid}-b2", "other command": f".retrieval.staging-{host}-"
             f"{dead.pid}-c3"}
    try:
        for n in names.values():
            (tmp_path / n).mkdir()
            (tmp_path / n / "predictions.csv").write_text("x")
        with OutputSet(tmp_path, "zeroshot") as o:
            o.stage("predictions.csv").write_text("new")
            o.commit({"accuracy": 1.0}, "# done\n")
        left = {p.name for p in tmp_path.iterdir()}
        assert names["dead"] not in left
        assert {names["live"], names["other host"], names["other command"]} <= left
        assert left - set(names.values()) == {"predictions.csv", "zeroshot.json", "zeroshot.md"}
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("rule", ["competitor", "match"])
def test_eval_retrieval_counts_duplicates_and_can_take_them_as_matches(tmp_path, rule):
    """12 images, each stored with 2 captions, one caption text used twice: the report counts the repeats, and
    --duplicates=match scores a copy of the ground truth as a right answer (recomputed here from the stored
    embeddings with the groups the test knows)."""
    from bmclip.eval.retrieval import retrieval_metrics

    colours = [(20 * i, 255 - 20 * i, 90) for i in range(12)]
    captions = [f"panel {j} of figure {i}" for i in range(12) for j in range(2)]
    captions[5] = captions[16]
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tf:
        for k, cap in enumerate(captions):
            for ext, data in (("png", _png_bytes(colours[k // 2])), ("txt", cap.encode())):
                ti = tarfile.TarInfo(f"k{k:04d}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    out = tmp_path / "out"
    rc = main(["eval", "retrieval", "tiny", "--shards", str(tmp_path / "shard-000000.tar"), "--out", str(out),
               "--batch-size", "5", "--block", "7", "--reader", "python", "--device", "cpu", "--duplicates", rule,
               "--storage-dtype", "float32", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "retrieval.json").read_text())
    assert (res["n"], res["duplicate_images"], res["duplicate_texts"], res["duplicates"]) == (24, 12, 1, rule)
    md = (out / "retrieval.md").read_text()
    assert "12 image(s) and 1 caption(s) repeat an earlier one" in md
    img = np.load(out / "embeddings" / "image_emb.npy")
    txt = np.load(out / "embeddings" / "text_emb.npy")
    groups = {}
    if rule == "match":
        tg = np.arange(24)
        tg[5] = 16
        groups = {"image_groups": np.arange(24) // 2, "text_groups": tg}
    ref = retrieval_metrics(img, txt, **groups)
    for k in ("image_to_text_R@1", "text_to_image_R@1", "text_to_image_R@5", "image_to_text_median_rank"):
        assert res[k] == ref[k], k
    if rule == "competitor":  # each image ties with its own copy, which is ranked above it: never R@1
        assert res["text_to_image_R@1"] == 0.0
