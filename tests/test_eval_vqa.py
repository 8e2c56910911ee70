"""VQA: readers for the VQA-RAD / SLAKE layouts, accuracy bookkeeping, and learning a synthetic VQA set
(coloured shapes) above the majority-answer baseline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from bmclip.errors import DataError
from bmclip.eval.vqa import (
    VQASample,
    build_vqa_model,
    detect_format,
    load_vqa_splits,
    normalise_answer,
    read_slake,
    read_vqa_rad,
    train_vqa,
    vqa_accuracy,
)

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (50, 60, 230)}


def make_shapes(folder, n, rng, prefix):
    """n images with one circle or square of a random colour; returns [(file name, colour, is_circle)]."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        colour = list(COLOURS)[rng.integers(0, 3)]
        circle = bool(rng.integers(0, 2))
        im = Image.new("RGB", (64, 64), (15, 15, 15))
        d = ImageDraw.Draw(im)
        r = int(rng.integers(14, 24))
        cx, cy = (int(v) for v in rng.integers(r, 64 - r, 2))
        box = (cx - r, cy - r, cx + r, cy + r)
        (d.ellipse if circle else d.rectangle)(box, fill=COLOURS[colour])
        name = f"{prefix}{i}.png"
        im.save(folder / name)
        out.append((name, colour, circle))
    return out


def records(items, key, extra):
    recs = []
    for name, colour, circle in items:
        recs.append({key: name, "question": "What colour is the shape?", "answer": colour.capitalize() + ".",
                     "answer_type": "OPEN", **extra})
        recs.append({key: name, "question": "Is there a circle?", "answer": "yes" if circle else "No",
                     "answer_type": "CLOSED ", **extra})
    for i, r in enumerate(recs):
        r["qid"] = i
    return recs


@pytest.fixture
def vqa_rad_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "vqarad"
    img = root / "VQA_RAD Image Folder"
    tr = records(make_shapes(img, 120, rng, "synpic_tr"), "image_name", {"phrase_type": "freeform"})
    te = records(make_shapes(img, 40, rng, "synpic_te"), "image_name", {"phrase_type": "test_freeform"})
    for r in te:
        r["qid"] += 10_000
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(tr + te))
    return root


def test_vqa_rad_reader(vqa_rad_dir):
    tr = read_vqa_rad(vqa_rad_dir, "train")
    te = read_vqa_rad(vqa_rad_dir / "VQA_RAD Dataset Public.json", "test")
    assert len(tr) == 240 and len(te) == 80
    assert {s.answer for s in tr} == {"red", "green", "blue", "yes", "no"}  # normalised
    assert {s.answer_type for s in te} == {"OPEN", "CLOSED"}
    assert detect_format(vqa_rad_dir) == "vqa-rad"


def test_slake_reader_filters_english_and_counts_skips(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "slake"
    items = make_shapes(root / "imgs" / "xmlab0", 3, rng, "s")
    items = [(f"xmlab0/{n}", c, k) for n, c, k in items]
    recs = records(items, "img_name", {"q_lang": "en"})
    recs.append({"img_name": items[0][0], "question": "这是什么颜色？", "answer": "红色", "answer_type": "OPEN",
                 "q_lang": "zh", "qid": 99})
    recs.append({"img_name": "xmlab9/missing.jpg", "question": "q?", "answer": "yes", "answer_type": "CLOSED",
                 "q_lang": "en", "qid": 100})
    recs.append({"img_name": items[0][0], "question": "q?", "answer": "yes", "answer_type": "MAYBE",
                 "q_lang": "en", "qid": 101})
    for split in ("train", "test"):
        (root / f"{split}.json").write_text(json.dumps(recs, ensure_ascii=False))
    skipped = []
    tr = read_slake(root, "train", skipped)
    assert len(tr) == 6 and all(s.question.isascii() for s in tr)
    assert sorted(q for q, _ in skipped) == ["100", "101"]
    assert detect_format(root) == "slake"
    assert load_vqa_splits(root)["format"] == "slake"
    with pytest.raises(DataError, match="validation.json"):
        read_slake(root, "validation")
    (root / "train.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_slake(root, "train")


def test_normalise_and_accuracy_bookkeeping():
    assert normalise_answer("  Right  Lung.") == "right lung"
    s = [VQASample(None, "q", "yes", "CLOSED", "1"), VQASample(None, "q", "no", "CLOSED", "2"),
         VQASample(None, "q", "liver", "OPEN", "3")]
    m = vqa_accuracy(["yes", "yes", "liver"], s)
    assert m["overall_accuracy"] == pytest.approx(2 / 3)
    assert m["closed_accuracy"] == 0.5 and m["open_accuracy"] == 1.0
    assert m["closed_n"] == 2 and m["open_n"] == 1


def test_fusion_respects_text_padding():
    """Padding tokens must not change the logits (the key padding mask is applied)."""
    from bmclip.model import create_model

    torch.manual_seed(0)
    clip = create_model("tiny").eval()
    m = build_vqa_model(clip, 5, hidden=32, layers=2, heads=4).eval()
    v = torch.randn(2, 9, clip.config.vision.width)
    t = torch.randn(2, 4, clip.config.text.width)
    pad = torch.tensor([[False, False, True, True], [False, False, False, True]])
    t2 = t.clone()
    t2[pad] = 1e3  # garbage in padded positions
    with torch.no_grad():
        torch.testing.assert_close(m.fuse(v, t, pad), m.fuse(v, t2, pad))


@pytest.fixture
def one_thread():
    """Small CPU training: one intra-op thread is several times faster than two on a busy machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.mark.slow
def test_vqa_learns_above_majority_baseline(vqa_rad_dir, one_thread):
    from bmclip.model import create_model
    from bmclip.tokenizer import get_tokenizer

    torch.manual_seed(0)
    clip = create_model("tiny")
    tok = get_tokenizer(context_length=clip.config.text.context_length)
    data = load_vqa_splits(vqa_rad_dir)
    res = train_vqa(clip, tok, data["train"], data["test"], epochs=6, batch_size=32, lr=1e-3, hidden=32,
                    layers=1, heads=4, seed=0)
    m = res["metrics"]
    assert m["majority_baseline"] <= 0.35  # 5 answers; the most frequent covers about a quarter
    assert m["overall_accuracy"] > m["majority_baseline"] + 0.25, m
    assert m["open_n"] == 40 and m["closed_n"] == 40
    assert m["test_answers_not_in_vocab"] == 0


def test_finetune_vqa_cli_writes_report_and_weights(vqa_rad_dir, tmp_path, one_thread):
    from bmclip.cli import main

    out = tmp_path / "vqa_out"
    rc = main(["finetune", "vqa", "tiny", "--data", str(vqa_rad_dir), "--epochs", "1", "--hidden", "32",
               "--layers", "1", "--features", "pooled", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "vqa.json").read_text())
    assert res["format"] == "vqa-rad" and res["n_train"] == 240 and res["n_test"] == 80
    assert 0 <= res["metrics"]["overall_accuracy"] <= 1 and len(res["history"]) == 1
    blob = torch.load(out / "vqa_head.pt", weights_only=True)
    assert blob["answers"] == sorted(["red", "green", "blue", "yes", "no"])
    assert any(k.startswith("head.") for k in blob["fusion"]) and "encoders" not in blob
    assert "| closed |" in (out / "vqa.md").read_text()


def test_a_preset_model_is_the_same_random_init_every_time():
    """`bmclip eval/finetune ... <preset>` drew the preset's weights from whatever the global random state was, so
    two identical finetune runs gave different accuracies (0.317 vs 0.293); it is now drawn from the seed, and the
    global state is left alone."""
    from bmclip.eval.models import load_model
    from bmclip.model import create_model

    torch.manual_seed(123)
    a, _ = load_model("tiny")
    torch.rand(7)  # any other use of the global generator in between
    b, _ = load_model("tiny")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    torch.manual_seed(0)
    ref = create_model("tiny").state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in a.state_dict().items())  # seed 0 is torch.manual_seed(0)'s init
    c, _ = load_model("tiny", seed=1)
    assert not torch.equal(c.state_dict()["visual.proj.weight"], ref["visual.proj.weight"])
    torch.manual_seed(5)
    x = torch.rand(3)
    torch.manual_seed(5)
    load_model("tiny", seed=1)
    assert torch.equal(torch.rand(3), x)  # the global generator did not move


@pytest.mark.slow
def test_finetune_vqa_on_a_preset_is_deterministic(vqa_rad_dir, tmp_path, one_thread):
    from bmclip.cli import main

    outs = []
    for run in range(2):
        torch.manual_seed(run)  # different global states: the runs must not depend on them
        out = tmp_path / f"run{run}"
        assert main(["finetune", "vqa", "tiny", "--data", str(vqa_rad_dir), "--epochs", "1", "--hidden", "32",
                     "--layers", "1", "--features", "pooled", "--device", "cpu", "--out", str(out)]) == 0
        outs.append(json.loads((out / "vqa.json").read_text())["metrics"])
    assert outs[0] == outs[1]


def test_finetune_encoders_updates_towers(vqa_rad_dir, one_thread):
    from bmclip.model import create_model
    from bmclip.tokenizer import get_tokenizer

    torch.manual_seed(0)
    clip = create_model("tiny")
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    tok = get_tokenizer(context_length=clip.config.text.context_length)
    data = load_vqa_splits(vqa_rad_dir)
    test = data["test"][:15] + [VQASample(data["test"][0].image, "What colour is the shape?", "purple", "OPEN", "x")]
    res = train_vqa(clip, tok, data["train"][:64], test, epochs=1, batch_size=32, hidden=32,
                    layers=1, finetune_encoders=True, encoder_lr=1e-3, answer_vocab="all")
    after = clip.state_dict()
    assert not torch.equal(before["visual.patch_embed.weight"], after["visual.patch_embed.weight"])
    changed_text = [k for k in after if k.startswith("text.") and not torch.equal(before[k], after[k])]
    assert changed_text
    assert res["metrics"]["overall_n"] == 16 and len(res["predictions"]) == 16
    assert "purple" in res["vocab"] and res["metrics"]["test_answers_not_in_vocab"] == 0


def test_reader_skips_null_fields_and_image_names_outside_the_folder(vqa_rad_dir, tmp_path):
    """null question/answer are skipped (not the texts "None"/"none"); an absolute image path or one climbing
    out of the image folder is refused even when the file exists; each skip names its question and kind."""
    outside = vqa_rad_dir / "outside.png"  # a real image, beside the image folder rather than in it
    Image.new("RGB", (8, 8)).save(outside)
    recs = json.loads((vqa_rad_dir / "VQA_RAD Dataset Public.json").read_text())
    train = [r for r in recs if not r["phrase_type"].startswith("test")]
    bad = {0: {"answer": None}, 1: {"question": None}, 2: {"image_name": str(outside)},
           3: {"image_name": "../outside.png"}, 4: {"answer": ["yes", "no"]}, 5: {"image_name": None},
           6: {"answer": "  "}}
    for i, change in bad.items():
        train[i].update(change)
    (vqa_rad_dir / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
    skipped = []
    tr = read_vqa_rad(vqa_rad_dir, "train", skipped)
    assert len(tr) == 240 - len(bad)
    assert sorted(q for q, _ in skipped) == sorted(str(train[i]["qid"]) for i in bad)
    reasons = {q: r for q, r in skipped}
    kinds = {i: reasons[str(train[i]["qid"])].split(":")[0] for i in bad}
    assert kinds == {0: "bad_field", 1: "bad_field", 2: "image_outside_folder", 3: "image_outside_folder",
                     4: "bad_field", 5: "bad_field", 6: "bad_field"}
    assert all(s.image.parent == vqa_rad_dir / "VQA_RAD Image Folder" for s in tr)
    assert "none" not in {s.answer for s in tr} and "None" not in {s.question for s in tr}


def test_missing_data_path_says_it_does_not_exist(tmp_path):
    for fn in (load_vqa_splits, detect_format):
        with pytest.raises(DataError, match="does not exist"):
            fn(tmp_path / "nope")
    with pytest.raises(DataError, match="does not exist"):
        read_slake(tmp_path / "nope", "train")


def _tiny_clip():
    from bmclip.model import create_model
    from bmclip.tokenizer import get_tokenizer

    torch.manual_seed(0)
    clip = create_model("tiny")
    return clip, get_tokenizer(context_length=clip.config.text.context_length)


def test_corrupt_image_is_a_counted_skip(vqa_rad_dir, one_thread):
    img = vqa_rad_dir / "VQA_RAD Image Folder"
    (img / "synpic_tr0.png").write_bytes(b"not a png")
    p = img / "synpic_te1.png"
    p.write_bytes(p.read_bytes()[:60])  # truncated
    data = load_vqa_splits(vqa_rad_dir)
    assert len(data["train"]) == 240 and len(data["test"]) == 80  # the files exist: the reader keeps them
    clip, tok = _tiny_clip()
    res = train_vqa(clip, tok, data["train"][:64], data["test"], epochs=1, batch_size=32, hidden=32, layers=1,
                    features="pooled")
    skipped = res["skipped"]
    broken = {str(img / "synpic_tr0.png"), str(img / "synpic_te1.png")}
    expect = sorted(s.qid for s in data["train"][:64] + data["test"] if str(s.image) in broken)
    assert len(expect) == 4  # two questions per image
    assert sorted(q for q, _ in skipped) == expect
    assert all(r.startswith("corrupt_image: ") for _, r in skipped)
    assert res["n_train"] == 62 and res["n_test"] == 78 and res["metrics"]["overall_n"] == 78


def test_finetune_vqa_cli_checks_options_before_loading(vqa_rad_dir, tmp_path, capsys, monkeypatch):
    import bmclip.eval.models
    import bmclip.eval.vqa
    from bmclip.cli import main

    def boom(*a, **k):
        raise AssertionError("data or model loaded before the options were checked")

    monkeypatch.setattr(bmclip.eval.models, "load_model", boom)
    monkeypatch.setattr(bmclip.eval.vqa, "load_vqa_splits", boom)
    for extra, flag in ((["--heads", "3"], "--heads"), (["--heads", "0"], "--heads"), (["--hidden", "0"], "--hidden"),
                        (["--hidden", "-8"], "--hidden"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
                        (["--lr", "-1"], "--lr"), (["--encoder-lr", "nan"], "--encoder-lr"),
                        (["--epochs", "0"], "--epochs"), (["--layers", "-1"], "--layers")):
        rc = main(["finetune", "vqa", "tiny", "--data", str(vqa_rad_dir), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and flag in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "o").exists()


def _cli(vqa_rad_dir, out, *extra):
    from bmclip.cli import main

    return main(["finetune", "vqa", "tiny", "--data", str(vqa_rad_dir), "--epochs", "1", "--hidden", "32",
                 "--layers", "1", "--features", "pooled", "--device", "cpu", "--out", str(out), *extra])


def test_finetune_vqa_cli_diverging_loss_writes_nothing(vqa_rad_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "vqa_out"
    assert _cli(vqa_rad_dir, out, "--seed", "1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _cli(vqa_rad_dir, out, "--lr", "1e30", "--epochs", "2") == 2  # finite, but the loss turns NaN
    err = capsys.readouterr().err
    assert "diverged" in err and "Traceback" not in err and err.count("\n") <= 3, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous set, untouched


def test_finetune_vqa_cli_never_leaves_a_new_head_beside_an_old_report(vqa_rad_dir, tmp_path, monkeypatch,
                                                                         one_thread):
    import errno
    import os

    out = tmp_path / "vqa_out"
    assert _cli(vqa_rad_dir, out, "--seed", "1") == 0
    real = os.replace

    def full_disk_at_the_report(src, dst):  # every atomic write ends in os.replace
        if str(dst).endswith("vqa.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk_at_the_report)
    assert _cli(vqa_rad_dir, out, "--seed", "2") == 1  # the report cannot be written
    monkeypatch.undo()
    head = torch.load(out / "vqa_head.pt", weights_only=True)
    if (out / "vqa.json").exists():
        assert json.loads((out / "vqa.json").read_text())["config"]["seed"] == head["config"]["seed"]
    else:  # the new run's files without a report: visibly incomplete, and nothing of the old run's set
        assert head["config"]["seed"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_finetune_vqa_cli_failed_head_write_keeps_the_previous_set(vqa_rad_dir, tmp_path, monkeypatch, one_thread):
    import errno
    import os

    out = tmp_path / "vqa_out"
    assert _cli(vqa_rad_dir, out, "--seed", "1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = os.replace

    def full_disk_at_the_head(src, dst):
        if str(dst).endswith("vqa_head.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk_at_the_head)
    assert _cli(vqa_rad_dir, out, "--seed", "2") == 1
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old set, whole; no staging left
    fresh = tmp_path / "new" / "vqa_out"
    monkeypatch.setattr(os, "replace", full_disk_at_the_head)
    assert _cli(vqa_rad_dir, fresh, "--seed", "2") == 1
    monkeypatch.undo()
    assert not (tmp_path / "new").exists()  # the folders this run made are gone again


@pytest.mark.parametrize("content, why", [(b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                                          (b'[{"q": "caf\xe9"}]', "utf-8")])
def test_unreadable_question_json_is_one_data_error(tmp_path, content, why):
    """A question file nested 100k deep raised RecursionError, one in Latin-1 a UnicodeDecodeError: tracebacks."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "train.json").write_bytes(content)
    with pytest.raises(DataError, match=f"not valid JSON: .*{why}"):
        read_slake(tmp_path, "train")
