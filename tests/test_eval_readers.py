"""Dataset readers on generated files of every format, plus real DICOM/skimage images bundled in packages."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmclip.data.shards import expand_urls
from bmclip.errors import ConfigError, DataError
from bmclip.eval import batching, datasets, images
from bmclip.eval.prompts import get_task

PYDICOM_FILES = None
try:
    import pydicom

    PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
except ImportError:  # pragma: no cover
    pass


def _png(path: Path, color, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_dicom(path, arr, photometric="MONOCHROME2", wc=None, ww=None, slope=None, intercept=None, signed=False):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    arr = np.asarray(arr)
    if photometric == "RGB":
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.Rows, ds.Columns = arr.shape[-3], arr.shape[-2]
        arr = arr.astype(np.uint8)
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.Rows, ds.Columns = arr.shape[-2], arr.shape[-1]
        arr = arr.astype(np.int16 if signed else np.uint16)
    if (photometric == "RGB" and arr.ndim == 4) or (photometric != "RGB" and arr.ndim == 3):
        ds.NumberOfFrames = arr.shape[0]
    ds.PixelRepresentation = 1 if signed else 0
    ds.PhotometricInterpretation = photometric
    if wc is not None:
        ds.WindowCenter, ds.WindowWidth = wc, ww
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- DICOM


def test_dicom_window_hand_checked(tmp_path):
    # Window C=100, W=51: x <= 74.5 -> 0, x > 124.5 -> 255, else ((x - 99.5) / 50 + 0.5) * 255.
    arr = np.array([[74, 75, 100, 124, 125, 0]], dtype=np.uint16)
    p = make_dicom(tmp_path / "w.dcm", arr, wc=100, ww=51)
    g = np.asarray(images.load_image(p))[:, :, 0]
    assert g.tolist() == [[0, 3, 130, 252, 255, 0]]


def test_dicom_rescale_then_window_and_monochrome1(tmp_path):
    # Stored 600 * 2 - 1000 = 200 HU, window C=200 W=401 -> the centre maps to ~128.
    arr = np.array([[0, 600, 2000]], dtype=np.uint16)  # -1000, 200, 3000 HU
    p = make_dicom(tmp_path / "r.dcm", arr, wc=200, ww=401, slope=2, intercept=-1000)
    g = np.asarray(images.load_image(p))[:, :, 0]
    assert g.tolist() == [[0, 128, 255]]
    p1 = make_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1", wc=200, ww=401, slope=2, intercept=-1000)
    g1 = np.asarray(images.load_image(p1))[:, :, 0]
    assert g1.tolist() == [[255, 127, 0]]


def test_dicom_minmax_without_window_and_multiframe(tmp_path):
    frames = np.stack([np.full((4, 5), v, dtype=np.uint16) for v in (10, 20, 30)])
    frames[:, 0, 0] = 0
    frames[:, 3, 4] = 1000
    p = make_dicom(tmp_path / "mf.dcm", frames)
    mid = np.asarray(images.dicom_to_pil(p, frame="middle"))[:, :, 0]
    first = np.asarray(images.dicom_to_pil(p, frame="first"))[:, :, 0]
    assert mid[0, 0] == 0 and mid[3, 4] == 255
    assert mid[1, 1] == round(20 / 1000 * 255)  # min 0, max 1000
    assert first[1, 1] == round(10 / 1000 * 255)
    with pytest.raises(ConfigError):
        images.dicom_to_pil(p, frame="last")


def test_dicom_rgb_and_errors(tmp_path):
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 17
    p = make_dicom(tmp_path / "c.dcm", rgb, photometric="RGB")
    out = np.asarray(images.load_image(p))
    assert out.shape == (3, 4, 3) and out[0, 0].tolist() == [200, 0, 17]
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom at all")
    with pytest.raises(DataError, match="bad.dcm"):
        images.load_image(bad)


@pytest.mark.skipif(PYDICOM_FILES is None, reason="pydicom not installed")
def test_real_bundled_dicoms():
    ct = images.load_image(PYDICOM_FILES / "CT_small.dcm")
    mr = images.load_image(PYDICOM_FILES / "MR_small.dcm")  # has WindowCenter 600 / Width 1600
    assert ct.size == (128, 128) and mr.size == (64, 64)
    for im in (ct, mr):
        a = np.asarray(im)
        assert a.std() > 10  # real anatomy, not a constant image
    pal = images.load_image(PYDICOM_FILES / "examples_palette.dcm")
    assert pal.mode == "RGB" and np.asarray(pal).std() > 1
    with pytest.raises(DataError, match="no pixel data"):
        images.load_image(PYDICOM_FILES / "waveform_ecg.dcm")


# ---------------------------------------------------------------- ImageFolder / CSV


def test_image_folder_with_task_aliases(tmp_path):
    for i in range(3):
        _png(tmp_path / "colon_aca" / f"a{i}.png", (200, 0, 0))
    _png(tmp_path / "colon_n" / "sub" / "n0.jpg", (0, 200, 0))
    (tmp_path / "colon_n" / "notes.txt").write_text("ignored")
    ds = datasets.image_folder(tmp_path, get_task("lc25000_colon"))
    assert ds.classes == ["colon adenocarcinomas", "normal colonic tissue"]
    assert ds.labels().tolist() == [0, 0, 0, 1]
    img, lab = ds[3]
    assert lab == 1 and img.mode == "RGB" and np.asarray(img)[0, 0, 1] > 150
    plain = datasets.open_dataset(str(tmp_path))
    assert plain.classes == ["colon_aca", "colon_n"]
    with pytest.raises(ConfigError, match="not one of"):
        datasets.image_folder(tmp_path, get_task("pcam"))


def test_builtin_lc25000_layout(tmp_path):
    root = tmp_path / "lung_colon_image_set" / "lung_image_sets"
    for c in ("lung_aca", "lung_n", "lung_scc"):
        _png(root / c / f"{c}1.jpeg", (10, 20, 30))
    ds = datasets.open_dataset("lc25000_lung", data_root=tmp_path)
    assert ds.labels().tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="data-root"):
        datasets.open_dataset("lc25000_lung")


def test_csv_and_tsv(tmp_path):
    _png(tmp_path / "img" / "x.png", (1, 2, 3))
    _png(tmp_path / "img" / "y.png", (4, 5, 6))
    (tmp_path / "l.csv").write_text("filename,label\nimg/x.png,tumor\nimg/y.png,normal\n")
    ds = datasets.open_dataset(str(tmp_path / "l.csv"))
    assert ds.classes == ["normal", "tumor"] and ds.labels().tolist() == [1, 0]
    (tmp_path / "l.tsv").write_text("img/x.png\t1\nimg/y.png\t0\n")  # no header, integer labels
    ds2 = datasets.open_dataset(str(tmp_path / "l.tsv"))
    assert ds2.classes == ["0", "1"] and ds2.labels().tolist() == [1, 0]
    ds3 = datasets.csv_dataset(tmp_path / "l.csv", get_task("pcam"))
    assert ds3.labels().tolist() == [1, 0]
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match="header"):
        datasets.open_dataset(str(tmp_path / "bad.csv"))


def test_integer_csv_labels_are_the_classes_that_occur(tmp_path):
    """Integer labels name the classes that occur (numeric order), never range(max + 1): {1, 2} is two classes
    (before: three, with every image predicted as the empty class "0"), {0, 10**11} two (before: an OOM kill)."""
    for i in range(3):
        _png(tmp_path / f"{i}.png", (i, i, i))
    cases = {"1,1,2": (["1", "2"], [0, 0, 1]), "0,99999999999,0": (["0", "99999999999"], [0, 1, 0]),
             "10,2,10": (["2", "10"], [1, 0, 1]), "1.0,3,3.0": (["1", "3"], [0, 1, 1])}
    for labels, (classes, idx) in cases.items():
        rows = "".join(f"{i}.png,{lab}\n" for i, lab in enumerate(labels.split(",")))
        (tmp_path / "l.csv").write_text("path,label\n" + rows)
        ds = datasets.open_dataset(str(tmp_path / "l.csv"))
        assert (ds.classes, ds.labels().tolist()) == (classes, idx), labels
    for body, where, what in (("0.png,0\n1.png,0.7\n", "l.csv:3", "not a whole number"),
                              ("0.png,-1\n1.png,1\n", "l.csv:2", "negative label"),
                              ("0.png,cat\n1.png,\n", "l.csv:3", "empty label")):
        (tmp_path / "l.csv").write_text("path,label\n" + body)
        with pytest.raises(DataError, match=f"{where}: .*{what}"):
            datasets.open_dataset(str(tmp_path / "l.csv"))


def test_csv_label_outside_the_task_classes_names_the_row(tmp_path):
    """With a task the labels index (or name) its classes; one outside them is an error naming the row."""
    _png(tmp_path / "0.png", (0, 0, 0))
    (tmp_path / "l.csv").write_text("path,label\n0.png,1\n0.png,0\n")
    ds = datasets.csv_dataset(tmp_path / "l.csv", get_task("pcam"))
    assert ds.classes == list(get_task("pcam").classes) and ds.labels().tolist() == [1, 0]
    (tmp_path / "l.csv").write_text("path,label\n0.png,1\n0.png,0\n0.png,7\n")
    with pytest.raises(DataError, match=r"l\.csv:4: .*label '7' is not one of"):
        datasets.csv_dataset(tmp_path / "l.csv", get_task("pcam"))


def test_unreadable_csv_files_are_one_line_errors(tmp_path):
    """Text that is not UTF-8, malformed CSV and oversized fields: a DataError naming the file (before:
    UnicodeDecodeError / _csv.Error tracebacks)."""
    _png(tmp_path / "0.png", (0, 0, 0))
    cases = {
        "latin1.csv": ("path,label\n0.png,caf\u00e9\n".encode("latin-1"), r"not UTF-8 text: .* line 2"),
        "utf16.csv": ("path,label\n0.png,cat\n".encode("utf-16"), "UTF-16"),
        "binary.csv": (bytes(range(128, 256)) * 4, "not UTF-8 text"),
        "quote.csv": (b'path,label\n0.png,"unterminated\n0.png,dog\n', r"quote\.csv:\d+: not valid CSV"),
        "big.csv": (b"path,label\n0.png," + b"a" * 200_000 + b"\n", r"big\.csv:2: not valid CSV: field larger"),
    }
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=msg) as e:
            datasets.open_dataset(str(tmp_path / name))
        assert name in str(e.value) and "\n" not in str(e.value)
    # A UTF-8 byte-order mark (as Excel writes) is not part of the first column's name.
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,label\n0.png,cat\n0.png,dog\n".encode())
    assert datasets.open_dataset(str(tmp_path / "bom.csv")).classes == ["cat", "dog"]


def test_iterate_batches_counts_skips_and_keeps_alignment(tmp_path):
    _png(tmp_path / "a" / "0.png", (255, 0, 0), size=(40, 20))
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG corrupt")
    _png(tmp_path / "b" / "2.png", (0, 0, 255), size=(10, 30))
    ds = datasets.open_dataset(str(tmp_path))
    batches = list(batching.iterate_batches(ds, image_size=8, batch_size=2, workers=2))
    imgs = np.concatenate([b["image"] for b in batches])
    labs = np.concatenate([b["label"] for b in batches])
    assert imgs.shape == (2, 8, 8, 3) and labs.tolist() == [0, 1]
    assert imgs[0, 4, 4].tolist() == [255, 0, 0] and imgs[1, 4, 4].tolist() == [0, 0, 255]
    assert len(ds.skipped) == 1 and "1.png" in ds.skipped[0][0]


# ---------------------------------------------------------------- PCam


def test_pcam_h5(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1, 1, 0, 1], dtype=np.uint8).reshape(5, 1, 1, 1)
    pre = tmp_path / "camelyonpatch_level_2_split_test"
    with h5py.File(str(pre) + "_x.h5", "w") as f:
        f["x"] = x
    with h5py.File(str(pre) + "_y.h5", "w") as f:
        f["y"] = y
    ds = datasets.open_dataset("pcam", data_root=tmp_path, split="test")
    assert len(ds) == 5 and ds.classes == ["normal lymph node", "lymph node metastasis"]
    img, lab = ds[2]
    assert lab == 1 and np.array_equal(np.asarray(img), x[2])
    np.testing.assert_array_equal(ds.read_block(1, 4), x[1:4])
    ds2 = datasets.open_dataset(str(pre) + "_x.h5")
    assert ds2.labels().tolist() == [0, 1, 1, 0, 1]
    import pickle

    ds3 = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(np.asarray(ds3[4][0]), x[4])
    with pytest.raises(DataError, match="not found"):
        datasets.open_dataset("pcam", data_root=tmp_path, split="valid")


def test_pcam_labels_that_are_not_0_or_1_are_refused(tmp_path):
    """A fractional label (0.7) is an error, not silently truncated to class 0."""
    import h5py

    pre = tmp_path / "camelyonpatch_level_2_split_test"
    with h5py.File(str(pre) + "_x.h5", "w") as f:
        f["x"] = np.zeros((3, 96, 96, 3), np.uint8)
    for y in ([0.0, 0.7, 1.0], [0, 1, np.nan]):
        with h5py.File(str(pre) + "_y.h5", "w") as f:
            f["y"] = np.array(y, dtype=np.float32).reshape(3, 1, 1, 1)
        with pytest.raises(DataError, match="PCam labels must be 0 or 1"):
            datasets.open_dataset(str(pre) + "_x.h5")
    with h5py.File(str(pre) + "_y.h5", "w") as f:
        f["y"] = np.array([0.0, 1.0, 1.0], dtype=np.float32).reshape(3, 1, 1, 1)
    assert datasets.open_dataset(str(pre) + "_x.h5").labels().tolist() == [0, 1, 1]


# ---------------------------------------------------------------- shards


def _tar(path: Path, samples):
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def _png_bytes(color, size=(30, 20)):
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, format="PNG")
    return b.getvalue()


def test_shard_pairs_and_brace_expansion(tmp_path):
    _tar(tmp_path / "s-000000.tar", [("a", {"png": _png_bytes((255, 0, 0)), "txt": b"red one"}),
                                      ("b", {"png": _png_bytes((0, 255, 0)), "txt": "grün".encode()})])
    _tar(tmp_path / "s-000001.tar", [("c", {"jpg": b"broken", "txt": b"bad"}),
                                      ("d", {"png": _png_bytes((0, 0, 255))}),
                                      ("dir/e", {"png": _png_bytes((9, 9, 9)), "txt": b"key with a folder"})])
    urls = expand_urls(str(tmp_path / "s-{000000..000001}.tar"))
    assert [Path(u).name for u in urls] == ["s-000000.tar", "s-000001.tar"]
    skipped = []
    batches = list(batching.iter_shard_pairs(str(tmp_path / "s-{000000..000001}.tar"), 16, batch_size=2,
                                            skipped=skipped))
    keys = [k for b in batches for k in b["key"]]
    texts = [t for b in batches for t in b["text"]]
    assert keys == ["a", "b", "dir/e"] and texts == ["red one", "grün", "key with a folder"]
    assert sorted(k for k, _ in skipped) == ["c", "d"]
    assert batches[0]["image"].shape == (2, 16, 16, 3)
    with pytest.raises(DataError):
        list(batching.iter_shard_pairs(str(tmp_path / "s-000001.tar"), 16))
    with pytest.raises(ConfigError, match="no shards"):
        expand_urls(str(tmp_path / "nothing-*.tar"))


def test_truncated_shard_is_counted(tmp_path):
    p = tmp_path / "t.tar"
    _tar(p, [(f"k{i}", {"png": _png_bytes((i, i, i)), "txt": b"x"}) for i in range(4)])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    skipped = []
    got = [k for b in batching.iter_shard_pairs(str(p), 8, skipped=skipped) for k in b["key"]]
    assert 0 < len(got) < 4 and any("truncated" in r for _, r in skipped)


def test_shard_classification(tmp_path):
    _tar(tmp_path / "c.tar", [("a", {"png": _png_bytes((1, 1, 1)), "cls": b"1"}),
                              ("b", {"png": _png_bytes((2, 2, 2)), "cls": b"0"}),
                              ("c", {"png": _png_bytes((3, 3, 3))})])
    ds = datasets.open_dataset(str(tmp_path / "c.tar"))
    assert ds.labels().tolist() == [1, 0] and ds.skipped == [("c", "no cls member")]


def test_shard_labels_are_the_classes_that_occur(tmp_path):
    """Shard ``cls`` labels {1, 2} are two classes (before: three, "0" never occurring), a huge label one class
    (before: an OOM kill), a negative label an error naming the sample, and with a task an index into its classes."""
    _tar(tmp_path / "a.tar", [("a", {"png": _png_bytes((1, 1, 1)), "cls": b"2"}),
                              ("b", {"png": _png_bytes((2, 2, 2)), "cls": b"1"}),
                              ("c", {"png": _png_bytes((3, 3, 3)), "cls": b"99999999999"})])
    ds = datasets.open_dataset(str(tmp_path / "a.tar"))
    assert ds.classes == ["1", "2", "99999999999"] and ds.labels().tolist() == [1, 0, 2]
    with pytest.raises(DataError, match=r"sample a in .*a\.tar: class label 2 is out of range for the 2 classes"):
        datasets.open_dataset(str(tmp_path / "a.tar"), task=get_task("pcam"))
    _tar(tmp_path / "n.tar", [("a", {"png": _png_bytes((1, 1, 1)), "cls": b"1"}),
                              ("neg", {"png": _png_bytes((2, 2, 2)), "cls": b"-1"})])
    with pytest.raises(DataError, match=r"sample neg in .*n\.tar: negative class label -1"):
        datasets.open_dataset(str(tmp_path / "n.tar"))


def test_rsna_bom_bad_target_and_every_image_missing(tmp_path):
    (tmp_path / "stage_2_train_images").mkdir()
    make_dicom(tmp_path / "stage_2_train_images" / "p1.dcm", np.arange(16).reshape(4, 4))
    labels = tmp_path / "stage_2_train_labels.csv"
    labels.write_bytes("\ufeffpatientId,x,y,width,height,Target\np1,,,,,1\np2,,,,,0\n".encode())
    ds = datasets.open_dataset("rsna_pneumonia", data_root=tmp_path)  # before: "bad row {'\ufeffpatientId': ...}"
    assert ds.labels().tolist() == [1] and len(ds.skipped) == 1
    labels.write_text("patientId,Target\np1,2\n")
    with pytest.raises(DataError, match=r"stage_2_train_labels\.csv:2: bad row .*Target 0 or 1"):
        datasets.open_dataset("rsna_pneumonia", data_root=tmp_path)
    labels.write_text("patientId,Target\nq1,0\nq2,1\nq3,0\n")
    with pytest.raises(DataError, match=r"none of the 3 patients listed has an image .*all 3 missing, e\.g\. "
                                        r".*q1\.dcm"):
        datasets.open_dataset("rsna_pneumonia", data_root=tmp_path)


def test_rsna_layout(tmp_path):
    (tmp_path / "stage_2_train_images").mkdir()
    for pid in ("p1", "p2"):
        make_dicom(tmp_path / "stage_2_train_images" / f"{pid}.dcm", np.arange(16).reshape(4, 4))
    (tmp_path / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\np1,,,,,0\np2,1,2,3,4,1\np2,5,6,7,8,1\np3,,,,,0\n"
    )
    ds = datasets.open_dataset("rsna_pneumonia", data_root=tmp_path)
    assert ds.labels().tolist() == [0, 1] and ds.classes == ["normal lung", "pneumonia"]
    assert len(ds.skipped) == 1 and "p3" in ds.skipped[0][0]


def test_voi_lut_functions_hand_checked():
    x = np.array([0.0, 100.0, 150.0, 200.0])
    # SIGMOID: 255 / (1 + exp(-4 (x - c) / w)), c=100, w=50 -> x=100: 127.5 -> 128; x=150: 255/(1+e^-4).
    assert images.window_to_uint8(x, 100, 50, "SIGMOID").tolist() == [0, 128, 250, 255]
    # LINEAR_EXACT: ((x - c) / w + 0.5) * 255 -> x=100: 127.5 -> 128 (round half to even gives 128).
    assert images.window_to_uint8(x, 100, 100, "LINEAR_EXACT").tolist() == [0, 128, 255, 255]
    with pytest.raises(DataError):
        images.window_to_uint8(x, 100, 50, "CUBIC")


def test_python_shard_reader_agrees_with_shard_loader(tmp_path):
    """The evaluation tar reader and bmclip.data.ShardLoader (C++) see the same pairs and near-identical
    centre-cropped pixels (resampling filters may differ slightly)."""
    try:
        from bmclip._ext import load_ext

        load_ext()
    except ImportError:
        pytest.skip("bmclip._C not built")
    from bmclip.data.loader import ShardLoader

    rng = np.random.default_rng(3)
    samples = []
    for i in range(12):
        arr = np.zeros((48, 80, 3), dtype=np.uint8)
        arr[:, : 40] = rng.integers(0, 256, 3)
        arr[:, 40:] = rng.integers(0, 256, 3)
        b = io.BytesIO()
        Image.fromarray(arr).save(b, format="PNG")
        samples.append((f"s{i:03d}", {"png": b.getvalue(), "txt": f" caption {i}\n".encode()}))
    _tar(tmp_path / "a.tar", samples)
    ours = list(batching.iter_shard_pairs(str(tmp_path / "a.tar"), 32, batch_size=5))
    theirs = list(ShardLoader(str(tmp_path / "a.tar"), batch_size=5, image_size=32, augment="center",
                              shuffle=False, num_threads=1))
    assert [k for b in ours for k in b["key"]] == [k for b in theirs for k in b["key"]]
    assert [t for b in ours for t in b["text"]] == [t for b in theirs for t in b["text"]]
    a = np.concatenate([b["image"] for b in ours]).astype(np.float64)
    c = np.concatenate([np.asarray(b["image"]) for b in theirs]).astype(np.float64)
    assert a.shape == c.shape
    assert np.abs(a - c).mean() < 3.0


def test_shard_members_in_every_pil_format_and_dicom_are_read(tmp_path):
    """Evaluation decodes every IMAGE_EXTENSIONS format with PIL (WebP, TIFF, BMP, GIF: formats training
    counts as skipped) and DICOM members; an undecodable member is a counted skip with its reason."""
    from bmclip.data.images import DECODED_EXTENSIONS, IMAGE_EXTENSIONS

    rng = np.random.default_rng(5)
    arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    samples, expect = [], {}
    for ext in IMAGE_EXTENSIONS:
        b = io.BytesIO()
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF"}.get(ext, ext.upper())
        Image.fromarray(arr).save(b, format=fmt, **({"lossless": True} if ext == "webp" else {}))
        samples.append((f"k_{ext}", {ext: b.getvalue(), "txt": ext.encode()}))
        with Image.open(io.BytesIO(b.getvalue())) as ref:  # the independent reference: PIL on the same bytes
            expect[ext] = np.asarray(ref.convert("RGB"))
    dcm = make_dicom(tmp_path / "m.dcm", np.arange(144).reshape(12, 12))
    samples.append(("k_dcm", {"dcm": dcm.read_bytes(), "txt": b"dcm"}))
    samples.append(("k_badbmp", {"bmp": b"BM not really", "txt": b"bad"}))
    _tar(tmp_path / "all.tar", samples)
    skipped: list = []
    got = {t: img for b in batching.iter_shard_pairs(str(tmp_path / "all.tar"), 12, batch_size=4, skipped=skipped)
           for t, img in zip(b["text"], b["image"])}
    assert set(got) == set(IMAGE_EXTENSIONS) | {"dcm"}
    assert set(IMAGE_EXTENSIONS) - set(DECODED_EXTENSIONS) >= {"webp", "tif", "tiff", "bmp", "gif"}
    for ext in IMAGE_EXTENSIONS:
        np.testing.assert_array_equal(got[ext], expect[ext], err_msg=ext)
    np.testing.assert_array_equal(got["dcm"][:, :, 0], np.asarray(images.load_image(dcm))[:, :, 0])
    assert len(skipped) == 1 and skipped[0][0] == "k_badbmp" and "corrupt bmp" in skipped[0][1]


def test_dataset_registry():
    from bmclip.eval.prompts import BUILTIN_TASKS

    assert set(datasets.BUILTIN_DATASETS) <= set(BUILTIN_TASKS)  # every layout reader belongs to a task
    assert [name for name, _, _ in datasets.DATASET_FORMATS] == [
        "webdataset shards", "CSV/TSV", "PCam HDF5", "ImageFolder", "unlabelled images"]


def test_builtin_task_without_layout_reader_reads_its_root_by_format(tmp_path):
    _png(tmp_path / "til_negative" / "a.png", (10, 10, 10))
    _png(tmp_path / "til_positive" / "b.png", (200, 200, 200))
    _png(tmp_path / "til_positive" / "c.png", (190, 190, 190))
    ds = datasets.open_dataset("tcga_til", data_root=tmp_path)
    assert ds.classes == ["none", "tumor infiltrating lymphocytes"] and ds.labels().tolist() == [0, 1, 1]
    with pytest.raises(DataError, match="not found"):
        datasets.open_dataset(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------------
# decompression bombs in time and memory


def _many_scans_jpeg(n_scans: int) -> bytes:
    """A small progressive JPEG whose last scan is repeated: n_scans SOS markers in all."""
    b = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 130, 140)).save(b, "JPEG", progressive=True, quality=90)
    d = b.getvalue()
    last = d.rindex(b"\xff\xda")
    have = d.count(b"\xff\xda")
    return d[:last] + d[last:-2] * (n_scans - have + 1) + d[-2:]


def test_a_jpeg_of_more_than_500_scans_is_refused_before_pillow_decodes_it(tmp_path):
    """Pillow spent 95 s on one 2 MB JPEG of 20000 scans; the C++ loader refuses more than 500 (as TurboJPEG)."""
    from bmclip.data.images import jpeg_scan_count

    ok, bomb = _many_scans_jpeg(400), _many_scans_jpeg(501)
    assert jpeg_scan_count(ok) == 400 and jpeg_scan_count(bomb) == 501
    (tmp_path / "ok.jpg").write_bytes(ok)
    (tmp_path / "bomb.jpg").write_bytes(bomb)
    assert images.load_image(tmp_path / "ok.jpg").size == (64, 48)
    with pytest.raises(DataError, match="bomb.jpg: more than 500 progressive scans"):
        images.load_image(tmp_path / "bomb.jpg")
    with pytest.raises(DataError, match="more than 500 progressive scans"):
        images.decode_sample_image({"__key__": "k", "jpg": bomb})


def test_a_dicom_larger_than_pillow_opens_is_refused_from_its_header(tmp_path, monkeypatch):
    """A 778-byte deflated 20000 x 20000 DICOM decoded to 6 GB before the error; the header's Rows x Columns x
    frames is now checked against Pillow's limit first."""
    p = make_dicom(tmp_path / "big.dcm", np.zeros((3, 40, 50), dtype=np.uint16))
    assert p.is_file()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3 x 40 x 50 = 6000 > 2 x 2000
    import pydicom

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array",
                        property(lambda self: pytest.fail("pixels decoded despite the header")))
    with pytest.raises(DataError, match="6,000 pixels .* more than the 4,000 that Pillow opens"):
        images.load_image(tmp_path / "big.dcm")


def test_high_bit_depth_conversions_are_exact_in_blocks_of_rows(monkeypatch):
    from bmclip.data import images as shared

    monkeypatch.setattr(shared, "_ROW_CHUNK_ELEMENTS", 7)  # many blocks, one partial
    rng = np.random.default_rng(0)
    for a in (rng.integers(0, 4096, (23, 5)).astype(np.uint16), rng.normal(size=(9, 4, 3)).astype(np.float32),
              rng.integers(-5000, 5000, (1, 31)).astype(np.int32)):
        x = a.astype(np.float64)
        want = np.clip(np.round((x - x.min()) / (x.max() - x.min()) * 255.0), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(shared.minmax_to_uint8(a), want)
    x = rng.integers(0, 400, (17, 6)).astype(np.float64)
    for fn in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        whole = images._window(x, 200.0, 101.0, fn)
        np.testing.assert_array_equal(images.window_to_uint8(x, 200.0, 101.0, fn), whole)


def test_a_large_16_bit_png_converts_within_bounded_memory(tmp_path):
    """A 328 KB 13000 x 13000 16-bit PNG took 4.2 GB in float64 copies (x4 eval workers); a 6000 x 6000 one now
    converts within 600 MB more address space (the float64 copies alone were 4 x 288 MB)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import resource
        import numpy as np
        from PIL import Image
        from bmclip.eval.images import load_image
        a = np.zeros((6000, 6000), dtype=np.uint16)
        a[::7, ::5] = 4095
        Image.fromarray(a).save({str(tmp_path / "ct.png")!r})
        del a
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (600 << 20), resource.RLIM_INFINITY))
        g = np.asarray(load_image({str(tmp_path / "ct.png")!r}))
        assert g.shape == (6000, 6000) and g.max() == 255 and g.min() == 0  # 8-bit "L", RGB after the resize
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_dicom_rescale_without_window_is_min_max_scaled_in_blocks(tmp_path, monkeypatch):
    from bmclip.data import images as shared

    monkeypatch.setattr(shared, "_ROW_CHUNK_ELEMENTS", 2)  # a block per row
    arr = np.array([[0, 500], [1000, 250]], dtype=np.uint16)  # slope -1: 1000, 500, 0, 750 after the LUT
    p = make_dicom(tmp_path / "r.dcm", arr, slope=-1, intercept=1000)
    g = np.asarray(images.load_image(p))[:, :, 0]
    assert g.tolist() == [[255, 128], [0, 191]]  # 127.5 rounds half to even; 191.25 -> 191


def test_a_float_image_with_nan_or_inf_pixels_scales_its_finite_values(tmp_path):
    """One NaN pixel in a 32-bit float TIFF made the whole image black (min/max of NaN), with only a numpy
    warning: the range is now that of the finite values, NaN and -inf go to 0 and +inf to 255; an image without a
    finite value is a DataError (a counted skip in the readers)."""
    import warnings

    from bmclip.data.images import minmax_to_uint8
    from bmclip.eval.images import load_image

    a = np.linspace(-1.0, 3.0, 64 * 48, dtype=np.float32).reshape(48, 64)
    ref = np.asarray(load_image(_save_tiff(tmp_path / "clean.tif", a)))
    assert len(np.unique(ref)) > 200
    b = a.copy()
    b[0, 1], b[5, 5], b[7, 7] = np.nan, np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value encountered in cast"
        got = np.asarray(load_image(_save_tiff(tmp_path / "nan.tif", b)))
    keep = np.isfinite(b)
    np.testing.assert_array_equal(got[keep], ref[keep])
    assert (got[0, 1], got[5, 5], got[7, 7]) == (0, 255, 0)
    with pytest.raises(DataError, match="no finite pixel value"):
        load_image(_save_tiff(tmp_path / "all_nan.tif", np.full((4, 4), np.nan, dtype=np.float32)))
    # the shared helper, with a LUT (DICOM) as without: constant finite values stay all zeros
    assert minmax_to_uint8(np.array([[2.0, 2.0, np.inf]])).tolist() == [[0, 0, 255]]
    lut = minmax_to_uint8(np.array([[0, 1, 2]]), values=lambda x: np.where(x == 1, np.nan, x * 10.0))
    assert lut.tolist() == [[0, 0, 255]]


def _save_tiff(path, arr):
    im = Image.fromarray(arr)
    assert im.mode == "F"
    im.save(path)
    return path
