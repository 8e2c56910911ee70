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
