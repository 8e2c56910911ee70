"""Zero-shot: metrics against brute-force references, prompt specs, and the full pipeline on a model
whose answer is known by construction."""

import types

import numpy as np
import pytest
import torch
from PIL import Image

from bmclip.errors import ConfigError, DataError
from bmclip.eval import prompts
from bmclip.eval.zeroshot import (
    auroc,
    class_embeddings,
    classification_metrics,
    confusion_matrix,
    save_confusion_png,
    zeroshot_classify,
)


def brute_force_auc(y, s):
    pos = s[y == 1]
    neg = s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 200
    y = (rng.random(n) < 0.3).astype(int)
    s = np.round(rng.standard_normal(n) + y, 1)  # rounding creates many ties
    assert auroc(y, s) == pytest.approx(brute_force_auc(y, s), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    assert np.isnan(auroc([1, 1], [0.1, 0.2]))


def test_classification_metrics_hand_checked():
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 2, 2])
    scores = np.eye(3)[pred]
    m = classification_metrics(y, scores, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["per_class_recall"] == {"a": 0.75, "b": 0.5, "c": 1.0}
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["majority_baseline"] == pytest.approx(4 / 7)
    assert "auroc_ovr_macro" in m
    # Absent class: recall None, excluded from balanced accuracy.
    m2 = classification_metrics(np.array([0, 0, 1]), np.eye(3)[[0, 1, 1]], ["a", "b", "c"])
    assert m2["per_class_recall"]["c"] is None
    assert m2["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(DataError):
        confusion_matrix([0, 3], [0, 1], 3)


def test_binary_auroc_uses_score_difference():
    y = np.array([0, 1, 1, 0])
    scores = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 1.5], [0.5, 0.6]])  # diffs -1, 3, .5, .1
    assert classification_metrics(y, scores)["auroc"] == 1.0


def test_multiclass_auroc_is_one_vs_rest_on_the_softmax_probabilities():
    """Macro OvR AUROC on p(class) as scikit-learn computes it (and as a user recomputes it from predictions.csv);
    it was the mean of per-class AUROCs on the raw scores (0.6274 here, against 0.6614)."""
    rng = np.random.default_rng(0)
    n, c = 300, 3
    y = rng.integers(0, c, n)
    cos = rng.normal(0.2, 0.05, (n, c))
    cos[np.arange(n), y] += 0.03
    scores = cos * 100.0  # zero-shot's scores: cosine x logit scale
    prob = torch.softmax(torch.from_numpy(scores), dim=1).numpy()

    def pairwise_auroc(pos, val):  # P(positive > negative) + 0.5 P(tie), every pair counted
        a, b = val[pos][:, None], val[~pos][None, :]
        return ((a > b).sum() + 0.5 * (a == b).sum()) / (a.size * b.size)

    ref = np.mean([pairwise_auroc(y == k, prob[:, k]) for k in range(c)])
    got = classification_metrics(y, scores)["auroc_ovr_macro"]
    assert got == pytest.approx(ref, abs=1e-12)
    assert round(got, 4) == 0.6614  # scikit-learn 1.9.1 roc_auc_score(y, prob, multi_class="ovr", average="macro")
    assert abs(np.mean([pairwise_auroc(y == k, scores[:, k]) for k in range(c)]) - got) > 0.03  # raw scores differ


def test_confusion_png(tmp_path):
    p = save_confusion_png(np.array([[5, 1], [2, 7]]), ["normal lymph node", "lymph node metastasis"],
                           tmp_path / "cm.png", title="pcam")
    im = Image.open(p)
    assert im.format == "PNG" and im.size[0] > 100


def test_confusion_png_is_bounded(tmp_path):
    """Many classes: the figure stays at most 12 x 10.8 inches at 110 dpi (before: 0.9 inch per class and a text
    per cell; 60 classes took 2.2 GB), and beyond 100 classes no PNG is drawn at all."""
    from bmclip.eval import zeroshot

    c = 40
    cm = np.arange(c * c).reshape(c, c) % 7
    p = save_confusion_png(cm, [f"class {i}" for i in range(c)], tmp_path / "cm.png")
    w, h = Image.open(p).size
    assert w <= 12 * 110 and h <= 11 * 110
    big = zeroshot.CONFUSION_PNG_MAX_CLASSES + 1
    with pytest.raises(ConfigError, match=f"{big} classes"):
        save_confusion_png(np.zeros((big, big), int), [str(i) for i in range(big)], tmp_path / "big.png")
    assert not (tmp_path / "big.png").exists()


@pytest.mark.parametrize("template", ["a {} of {x}", "a {} }", "{}{0}", "a photo of {{}}", "{0}", "{:>5}", "{!r}",
                                      "a {", "{} and {}", "{:{}}"])
def test_templates_need_exactly_one_bare_placeholder(template, tmp_path):
    """Each of these passed the old ``count("{}") == 1`` check or failed later with KeyError/IndexError, or
    (literal braces) gave every class the same prompt."""
    with pytest.raises(ConfigError, match="template"):
        prompts.TaskSpec("t", ("cat", "dog"), (template,))
    with pytest.raises(ConfigError, match="template"):
        class_embeddings(ColourModel(), colour_tokenizer, ["cat", "dog"], [template])
    (tmp_path / "t.yaml").write_text(f"classes: [cat, dog]\ntemplates: [{template!r}]\n")
    with pytest.raises(ConfigError, match="template") as e:
        prompts.load_task_yaml(tmp_path / "t.yaml")
    assert "t.yaml" in str(e.value)


def test_task_yaml_bad_files_are_one_line_config_errors(tmp_path):
    cases = {
        "binary.yaml": (bytes(range(128, 256)), "not UTF-8"),  # before: UnicodeDecodeError traceback
        "bad.yaml": (b": : :\n  - [\n", "not valid YAML: line 1"),  # before: a five-line message
        "null.yaml": (b"classes: {cat: a cat, dog: null}\n", "'dog': None"),  # before: a class named "None"
        "blank.yaml": (b"classes: ['', ' ']\n", "non-blank"),
        "nested.yaml": (b"classes: [[1, 2], dog]\n", "non-blank class name"),
        "name.yaml": (b"name: ../../x\nclasses: [cat, dog]\n", "'name'"),
    }
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=msg) as e:
            prompts.load_task_yaml(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="non-blank"):
        prompts.TaskSpec("t", ("cat", " "), ("{}",))
    # Literal braces beside the one placeholder are fine.
    t = prompts.TaskSpec("t", ("cat", "dog"), ("a {} in {{braces}}", "{}"))
    assert t.prompts(1) == ["a dog in {braces}", "dog"]


def test_builtin_prompts_are_the_papers():
    t = prompts.get_task("pcam")
    assert t.prompts(1) == ["this is an image of lymph node metastasis", "lymph node metastasis presented in image"]
    assert prompts.get_task("tcga_til").metric == "auroc"
    assert set(prompts.BUILTIN_TASKS) == {"pcam", "lc25000_lung", "lc25000_colon", "tcga_til", "rsna_pneumonia"}
    assert prompts.get_task("lc25000_lung").class_index("lung_scc") == 2
    with pytest.raises(ConfigError):
        prompts.get_task("imagenet")


def test_task_yaml(tmp_path):
    (tmp_path / "t.yaml").write_text(
        "classes: {ct: computed tomography, mr: magnetic resonance}\ntemplates: ['a {} scan', '{}']\ndata: imgs\n"
    )
    t = prompts.load_task_yaml(tmp_path / "t.yaml")
    assert t.classes == ("computed tomography", "magnetic resonance")
    assert t.class_index("mr") == 1 and t.data == str((tmp_path / "imgs").resolve())
    (tmp_path / "bad.yaml").write_text("classes: [a, b]\ntemplates: ['no placeholder']\n")
    with pytest.raises(ConfigError, match="exactly one"):
        prompts.load_task_yaml(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("classes: [a]\n")
    with pytest.raises(ConfigError, match="at least 2"):
        prompts.load_task_yaml(tmp_path / "bad2.yaml")


# ---------------------------------------------------------------- the pipeline on a model with a known answer

COLOURS = ["red", "green", "blue"]


class ColourModel(torch.nn.Module):
    """encode_image = mean RGB (after undoing normalisation); encode_text = counts of colour words.

    A red image therefore matches "a photo of red" exactly, so zero-shot accuracy must be 1.
    """

    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.25, 0.25, 0.25)

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.config = types.SimpleNamespace(vision=types.SimpleNamespace(image_size=16))
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(10.0)))

    def encode_image(self, x):
        rgb = x * 0.25 + 0.5
        return rgb.mean(dim=(2, 3)) + self.dummy

    def encode_text(self, ids):
        # ids: (B, 3) counts, built by the tokenizer below
        return ids.float() + 0.01


def colour_tokenizer(texts):
    return torch.tensor([[t.split().count(c) for c in COLOURS] for t in texts], dtype=torch.long)


def test_class_embeddings_are_normalised_template_means():
    m = ColourModel()
    w = class_embeddings(m, colour_tokenizer, COLOURS, ["a photo of {}", "{} red stripes"])
    # Reference by hand: "green" gives (0,1,0)+.01 and "green red stripes" gives (1,1,0)+.01; each is
    # normalised, averaged, renormalised.
    a = torch.tensor([0.01, 1.01, 0.01])
    b = torch.tensor([1.01, 1.01, 0.01])
    ref = torch.nn.functional.normalize(a / a.norm() + b / b.norm(), dim=0)
    torch.testing.assert_close(w[1], ref)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(3))


def test_class_embeddings_average_prompts_over_synonyms():
    m = ColourModel()
    w = class_embeddings(m, colour_tokenizer, COLOURS, ["{}"], synonyms={"green": ["green", "green blue"]})
    # "green" -> (0,1,0)+.01, "green blue" -> (0,1,1)+.01: normalised, averaged over both names, renormalised;
    # classes without synonyms keep their own name.
    a = torch.tensor([0.01, 1.01, 0.01])
    b = torch.tensor([0.01, 1.01, 1.01])
    torch.testing.assert_close(w[1], torch.nn.functional.normalize(a / a.norm() + b / b.norm(), dim=0))
    torch.testing.assert_close(w[0], torch.nn.functional.normalize(torch.tensor([1.01, 0.01, 0.01]), dim=0))
    with pytest.raises(ConfigError, match="at least one name"):
        class_embeddings(m, colour_tokenizer, COLOURS, ["{}"], synonyms={"red": []})


def test_zeroshot_pipeline_on_known_answer_model():
    rng = np.random.default_rng(0)
    imgs, labels = [], []
    for i in range(30):
        k = i % 3
        c = [40, 40, 40]
        c[k] = 230
        arr = np.clip(np.array(c) + rng.integers(-20, 20, (24, 32, 3)), 0, 255).astype(np.uint8)
        imgs.append(Image.fromarray(arr))
        labels.append(k)
    out = zeroshot_classify(ColourModel(), colour_tokenizer, imgs, COLOURS, ["a photo of {}", "{}"],
                            labels=labels, batch_size=7)
    assert out["metrics"]["accuracy"] == 1.0
    assert out["probs"].shape == (30, 3)
    np.testing.assert_allclose(out["probs"].sum(1), 1.0)
    # Loader input (dict batches with labels) gives the same scores.
    from bmclip.model.transforms import resize_center_crop

    arrs = np.stack([np.asarray(resize_center_crop(im, 16)) for im in imgs])
    batches = [{"image": arrs[s : s + 8], "label": np.array(labels[s : s + 8])} for s in range(0, 30, 8)]
    out2 = zeroshot_classify(ColourModel(), colour_tokenizer, batches, COLOURS, ["a photo of {}", "{}"])
    np.testing.assert_allclose(out2["scores"], out["scores"], rtol=1e-6)
    assert out2["metrics"]["accuracy"] == 1.0
    with pytest.raises(DataError, match="labels"):
        zeroshot_classify(ColourModel(), colour_tokenizer, imgs, COLOURS, labels=labels[:3])


def test_zeroshot_on_real_bundled_images_matches_manual_reference(tmp_path):
    """Real DICOM (pydicom CT/MR) and skimage microscopy images through open_dataset -> iterate_batches ->
    zeroshot_classify with the tiny model, checked against a hand-written numpy/torch reference."""
    import shutil
    from pathlib import Path

    pydicom = pytest.importorskip("pydicom")
    skdata = pytest.importorskip("skimage.data")
    from bmclip.eval.batching import iterate_batches
    from bmclip.eval.datasets import open_dataset
    from bmclip.model import IMAGE_MEAN, IMAGE_STD, create_model
    from bmclip.tokenizer import get_tokenizer

    base = Path(pydicom.__file__).parent / "data" / "test_files"
    (tmp_path / "radiology").mkdir()
    (tmp_path / "microscopy").mkdir()
    shutil.copy(base / "CT_small.dcm", tmp_path / "radiology" / "ct.dcm")
    shutil.copy(base / "MR_small.dcm", tmp_path / "radiology" / "mr.dcm")
    Image.fromarray(skdata.immunohistochemistry()).save(tmp_path / "microscopy" / "ihc.png")
    Image.fromarray(skdata.cell()).save(tmp_path / "microscopy" / "cell.png")

    torch.manual_seed(0)
    model = create_model("tiny").eval()
    tok = get_tokenizer(context_length=model.config.text.context_length)
    ds = open_dataset(str(tmp_path))
    size = model.config.vision.image_size
    classes = ["microscopy image", "radiology scan"]
    templates = ["a {}", "this is a {}"]
    out = zeroshot_classify(model, tok, iterate_batches(ds, size, batch_size=3), classes, templates)
    assert out["metrics"]["n"] == 4 and ds.skipped == []

    # Reference: PIL resize/crop by hand, numpy normalisation, per-template normalised text means.
    from bmclip.eval.images import load_image

    rows = []
    for i in range(len(ds)):
        im = load_image(ds.name_of(i))
        w, h = im.size  # torchvision Resize(size) + CenterCrop(size) arithmetic
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
        # open_clip's order: the geometry in the image's own mode, RGB last
        a = np.asarray(im.crop((left, top, left + size, top + size)).convert("RGB"), dtype=np.float64) / 255.0
        a = (a - np.array(IMAGE_MEAN)) / np.array(IMAGE_STD)
        rows.append(a.transpose(2, 0, 1))
    with torch.no_grad():
        f = torch.nn.functional.normalize(model.encode_image(torch.tensor(np.stack(rows), dtype=torch.float32)), dim=-1)
        cls = []
        for c in classes:
            e = torch.nn.functional.normalize(model.encode_text(tok([t.format(c) for t in templates])), dim=-1)
            cls.append(torch.nn.functional.normalize(e.mean(0), dim=0))
        ref = (f @ torch.stack(cls).T * model.logit_scale.exp()).numpy()
    np.testing.assert_allclose(out["scores"], ref, rtol=1e-4, atol=1e-4)


def test_preprocessing_matches_open_clip_eval_transform():
    """to_model_input(list of PIL) == open_clip's image_transform(is_train=False) for RGB images."""
    transform_mod = pytest.importorskip("open_clip.transform")
    from bmclip.eval.embed import to_model_input

    model = ColourModel()
    size = model.config.vision.image_size
    t = transform_mod.image_transform(size, is_train=False, mean=model.image_mean, std=model.image_std)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in ((16, 16), (23, 57), (61, 18), (17, 40), (100, 33), (9, 12))]
    ours = to_model_input(imgs, model)
    ref = torch.stack([t(im) for im in imgs])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_eval_batches_and_preprocess_image_are_one_transform():
    """Evaluation's batched input and bmclip.model.transforms.preprocess_image (bmclip embed) give the same
    tensor bit for bit: one transform, not two copies."""
    from bmclip.eval.embed import to_model_input
    from bmclip.model.transforms import preprocess_image

    model = ColourModel()
    size = model.config.vision.image_size
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((23, 57), (61, 18))]
    ref = torch.stack([preprocess_image(im, size, model.image_mean, model.image_std) for im in imgs])
    assert torch.equal(to_model_input(imgs, model), ref)
