"""open_clip interop at the released size: open_clip CustomTextCLIP (timm ViT-B/16 + HF BERT, built offline
from a local BertConfig) <-> native bmclip model, both directions, fp32 max |diff| of L2-normalised
embeddings <= 1e-4; plus key-checking errors on small state dicts."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_tokenizer import ADVERSARIAL_TEXTS, _pmc_captions

from bmclip.errors import CheckpointError, ConfigError
from bmclip.interop import (
    BIOMEDBERT,
    CONFIG_NAME,
    WEIGHTS_NAME,
    export_open_clip,
    load_open_clip,
    open_clip_state_dict,
)
from bmclip.io.model_file import save_state_dict
from bmclip.model import create_model

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

# open_clip_config.json of the released microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224.
RELEASED_CONFIG = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": BIOMEDBERT,
            "hf_tokenizer_name": BIOMEDBERT,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}

TOL = 1e-4


def _bert_config():
    # BiomedBERT-base (PubMedBERT) config.json values, built locally: no hub access.
    return transformers.BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        max_position_embeddings=512,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )


def _build_open_clip(model_cfg):
    """open_clip CustomTextCLIP from an open_clip model_cfg, with AutoConfig answered locally."""
    from open_clip import hf_model
    from open_clip.model import CustomTextCLIP

    cfg = json.loads(json.dumps(model_cfg))
    cfg["text_cfg"]["hf_model_pretrained"] = False  # architecture only: never fetch weights
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_model.AutoConfig, "from_pretrained", lambda *a, **k: _bert_config())
        model = CustomTextCLIP(**cfg)
    return model.eval()


def _randomise_(module, seed):
    """Every parameter random (LayerNorm scales around 1), so no weight can be silently ignored."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "logit_scale" in name:
                p.copy_(torch.tensor(2.5).reshape(p.shape))
            elif "logit_bias" in name:
                p.copy_(torch.tensor(-3.0).reshape(p.shape))
            elif ("norm" in name.lower()) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.02 * r)


def _inputs(seed=0, b=3, image_size=224):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, image_size, image_size, generator=g)
    ids = torch.zeros(b, 256, dtype=torch.long)
    for i, n in enumerate((256, 40, 7)[:b]):
        ids[i, :n] = torch.randint(5, 30522, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 2, 3  # [CLS] ... [SEP]
    return images, ids


def _assert_same(oc_model, ours, images, ids):
    with torch.no_grad():
        oi = F.normalize(oc_model.encode_image(images), dim=-1)
        ot = F.normalize(oc_model.encode_text(ids), dim=-1)
        bi = F.normalize(ours.encode_image(images), dim=-1)
        bt = F.normalize(ours.encode_text(ids), dim=-1)
    di, dt = (oi - bi).abs().max().item(), (ot - bt).abs().max().item()
    assert di <= TOL and dt <= TOL, (di, dt)
    assert torch.allclose(oc_model.logit_scale.detach().reshape(()), ours.logit_scale.detach())
    return di, dt


@pytest.fixture(scope="module")
def oc_model():
    return _build_open_clip(RELEASED_CONFIG["model_cfg"])


@pytest.mark.slow
def test_load_released_layout_matches_open_clip(oc_model, tmp_path):
    _randomise_(oc_model, seed=1)
    sd = oc_model.state_dict()
    # The released file (older transformers) also carries the BERT pooler and the position_ids buffer.
    sd["text.transformer.pooler.dense.weight"] = torch.randn(768, 768)
    sd["text.transformer.pooler.dense.bias"] = torch.randn(768)
    sd["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]
    folder = tmp_path / "biomedclip"
    folder.mkdir()
    torch.save(sd, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(RELEASED_CONFIG))
    del sd
    ours = load_open_clip(folder)
    assert ours.config.vision.heads == 12 and ours.config.text.heads == 12
    assert ours.config.text.context_length == 256
    assert ours.num_params() == 195_902_721
    di, dt = _assert_same(oc_model, ours, *_inputs(0))
    print(f"load parity: max|diff| image {di:.2e} text {dt:.2e}")
    # The .bin path alone works too (config found beside it).
    ours2 = load_open_clip(folder / WEIGHTS_NAME)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ours2.state_dict().values()))


@pytest.mark.slow
def test_export_loads_in_open_clip_and_round_trips(oc_model, tmp_path):
    from open_clip.factory import load_checkpoint

    torch.manual_seed(0)
    ours = create_model("biomedclip-vit-b16-224").eval()
    _randomise_(ours, seed=2)
    from bmclip.tokenizer import Tokenizer, get_tokenizer

    folder = export_open_clip(ours, tmp_path / "export", tokenizer=get_tokenizer())
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["bmclip"]["tokenizer"] == {"vocab": "vocab.txt", "context_length": 256, "vocab_size": 4096}
    assert Tokenizer.from_vocab(folder).vocab == get_tokenizer().vocab
    assert cfg["model_cfg"]["vision_cfg"] == RELEASED_CONFIG["model_cfg"]["vision_cfg"]
    assert cfg["preprocess_cfg"] == RELEASED_CONFIG["preprocess_cfg"]
    # the shipped (bundled) vocabulary is the one named, not BiomedBERT's hub tokenizer
    assert cfg["model_cfg"]["text_cfg"] == {**RELEASED_CONFIG["model_cfg"]["text_cfg"], "hf_model_pretrained": False,
                                            "hf_tokenizer_name": str(folder.resolve())}
    # open_clip's own strict loader accepts the file: exactly its key set and shapes. (The exported
    # model_cfg equals the released one, so the module's open_clip model is that architecture.)
    load_checkpoint(oc_model, str(folder / WEIGHTS_NAME), strict=True)
    di, dt = _assert_same(oc_model, ours, *_inputs(1))
    print(f"export parity: max|diff| image {di:.2e} text {dt:.2e}")
    # And back into bmclip bit-exactly.
    back = load_open_clip(folder)
    sd0, sd1 = ours.state_dict(), back.state_dict()
    assert set(sd0) == set(sd1)
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def _tiny_oc_sd():
    torch.manual_seed(0)
    return open_clip_state_dict(create_model("tiny", text={"heads": 2}, vision={"heads": 2}))


def test_missing_and_unknown_keys_named(tmp_path):
    sd = _tiny_oc_sd()
    path = tmp_path / "m.bin"
    save_state_dict(sd, path)
    model = load_open_clip(path)  # no config beside it: shapes define the model, heads = width // 64
    assert not model.training
    for name, p in model.named_parameters():  # ready to fine-tune: real fp32 CPU leaf parameters
        assert p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu", name
    ref = open_clip_state_dict(model)
    assert all(torch.equal(ref[k], sd[k]) for k in sd)

    bad = dict(sd)
    del bad["text.transformer.encoder.layer.1.attention.self.key.bias"]
    save_state_dict(bad, path)
    with pytest.raises(CheckpointError, match="attention.self.key.bias"):
        load_open_clip(path)

    bad = dict(sd, **{"visual.trunk.blocks.0.attn.extra": torch.ones(1)})
    save_state_dict(bad, path)
    with pytest.raises(CheckpointError, match="visual.trunk.blocks.0.attn.extra"):
        load_open_clip(path)

    bad = dict(sd)
    bad["visual.head.proj.weight"] = torch.ones(3, 7)
    save_state_dict(bad, path)
    with pytest.raises(CheckpointError):
        load_open_clip(path)


def test_pooler_and_position_ids_tolerated(tmp_path):
    sd = _tiny_oc_sd()
    w = sd["text.transformer.embeddings.word_embeddings.weight"].shape[1]
    for extra in (
        {},
        {"text.transformer.pooler.dense.weight": torch.ones(w, w), "text.transformer.pooler.dense.bias": torch.ones(w)},
        {"text.transformer.embeddings.position_ids": torch.arange(64)[None]},
        {"text.transformer.embeddings.token_type_ids": torch.zeros(1, 64, dtype=torch.long)},
    ):
        save_state_dict({**sd, **extra}, tmp_path / "m.bin")
        model = load_open_clip(tmp_path / "m.bin")
        assert "text.transformer.pooler.dense.weight" not in model.state_dict()


def test_logit_bias_and_scalar_shapes(tmp_path):
    sd = _tiny_oc_sd()
    sd["logit_scale"] = torch.tensor([3.0])  # open_clip nonscalar_logit_scale
    sd["logit_bias"] = torch.tensor([-10.0])
    save_state_dict(sd, tmp_path / "m.bin")
    model = load_open_clip(tmp_path / "m.bin")
    assert model.logit_scale.shape == () and model.logit_scale.item() == 3.0
    assert model.logit_bias.item() == -10.0


def test_unsupported_configs_refused(tmp_path):
    save_state_dict(_tiny_oc_sd(), tmp_path / WEIGHTS_NAME)
    for section, key, value in (
        ("vision_cfg", "timm_pool", "avg"),
        ("text_cfg", "hf_pooler_type", "mean_pooler"),
        ("text_cfg", "hf_proj_type", "linear"),
    ):
        cfg = json.loads(json.dumps(RELEASED_CONFIG))
        cfg["model_cfg"][section][key] = value
        (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=key):
            load_open_clip(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_open_clip(tmp_path / "nope")
    with pytest.raises(ConfigError, match="timm"):
        export_open_clip(create_model("tiny"), tmp_path / "tiny_export")
    assert not (tmp_path / "tiny_export").exists()


def test_loaded_checkpoint_is_safe(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"logit_scale": torch.ones(()), "x": Evil()}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="refusing"):
        load_open_clip(tmp_path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", ["elife32671-fig1.jpg", "pone0056489-g001.jpg"])
def test_preprocess_matches_open_clip_val_transform(name):
    from pathlib import Path

    from PIL import Image

    pytest.importorskip("torchvision")
    from open_clip.transform import image_transform

    from bmclip.model.transforms import preprocess_image

    path = Path(__file__).resolve().parent.parent / "bmclip" / "assets" / "samples" / name
    ref_tf = image_transform(224, is_train=False, mean=RELEASED_CONFIG["preprocess_cfg"]["mean"],
                             std=RELEASED_CONFIG["preprocess_cfg"]["std"])  # fmt: skip
    with Image.open(path) as im:
        ours, ref = preprocess_image(im, 224), ref_tf(im)
    assert ours.shape == ref.shape == (3, 224, 224)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def _mode_images():
    """A real figure in every 8-bit mode an evaluation image comes in, at a size that needs resizing, with
    transparency where the mode has it (half transparent, the hidden half a saturated colour)."""
    from pathlib import Path

    from PIL import Image

    path = Path(__file__).resolve().parent.parent / "bmclip" / "assets" / "samples" / "pone0056489-g001.jpg"
    with Image.open(path) as im:
        rgb = im.convert("RGB").resize((300, 500))
    alpha = Image.new("L", rgb.size, 255)
    alpha.paste(0, (0, 0, 150, 500))
    rgba = rgb.copy()
    rgba.paste((255, 0, 0), (0, 0, 150, 500))
    rgba.putalpha(alpha)
    la = rgb.convert("L")
    la.putalpha(alpha)
    return {"RGBA": rgba, "LA": la, "P": rgb.convert("P"), "P+transparency": rgba.convert("P"),
            "1": rgb.convert("1"), "L": rgb.convert("L"), "CMYK": rgb.convert("CMYK")}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "P+transparency", "1", "L", "CMYK"])
def test_preprocess_matches_open_clip_for_every_image_mode(mode):
    """The geometry runs in the image's own mode and RGB comes last, as open_clip's transform does: Pillow resizes
    RGBA/LA with premultiplied alpha (transparent pixels go black) and P/1 with nearest neighbour. bmclip
    converted to RGB first: a transparent red half came out red (open_clip: black), a palette image bicubic."""
    pytest.importorskip("torchvision")
    from open_clip.transform import image_transform

    from bmclip.model.transforms import preprocess_image

    im = _mode_images()[mode]
    ref_tf = image_transform(224, is_train=False, mean=RELEASED_CONFIG["preprocess_cfg"]["mean"],
                             std=RELEASED_CONFIG["preprocess_cfg"]["std"])  # fmt: skip
    torch.testing.assert_close(preprocess_image(im, 224), ref_tf(im), atol=1e-5, rtol=0)


def test_eval_readers_keep_the_mode_for_the_transform(tmp_path):
    """The evaluation readers hand the transform the image in its own mode (a PNG's RGBA, a GIF's palette), so a
    file evaluates as open_clip evaluates it: bmclip.eval.images.load_image + resize_center_crop equal
    open_clip's transform of the file opened with PIL."""
    pytest.importorskip("torchvision")
    from open_clip.transform import image_transform
    from PIL import Image

    from bmclip.eval.images import load_image
    from bmclip.model.transforms import preprocess_image

    ims = _mode_images()
    ref_tf = image_transform(224, is_train=False, mean=RELEASED_CONFIG["preprocess_cfg"]["mean"],
                             std=RELEASED_CONFIG["preprocess_cfg"]["std"])  # fmt: skip
    for name, im in (("a.png", ims["RGBA"]), ("b.gif", ims["P"]), ("c.png", ims["LA"])):
        im.save(tmp_path / name)
        with Image.open(tmp_path / name) as f:
            ref = ref_tf(f)
        torch.testing.assert_close(preprocess_image(load_image(tmp_path / name), 224), ref, atol=1e-5, rtol=0,
                                   msg=name)


@pytest.mark.slow
def test_export_config_per_preset():
    from bmclip.interop import open_clip_config

    names = {
        "biomedclip-vit-b16-224": "vit_base_patch16_224",
        "biomedclip-vit-b16-384": "vit_base_patch16_384",
        "biomedclip-vit-s16-224": "vit_small_patch16_224",
    }
    for preset, timm_name in names.items():
        with torch.device("meta"):
            model = create_model(preset)
        cfg = open_clip_config(model)
        assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == timm_name
        assert cfg["model_cfg"]["vision_cfg"]["image_size"] == model.config.vision.image_size
        assert cfg["bmclip"]["model_config"] == model.config.to_dict()
    with torch.device("meta"):
        vit_m = create_model("biomedclip-vit-m16-224")  # the paper's ViT-M/16 has no timm twin
    with pytest.raises(ConfigError, match="timm"):
        open_clip_config(vit_m)


def test_timm_heads_used_without_bmclip_section():
    from bmclip.interop import config_from_open_clip, open_clip_state_dict

    with torch.device("meta"):
        small = create_model("biomedclip-vit-s16-224")
    sd = open_clip_state_dict(small)
    oc = json.loads(json.dumps(RELEASED_CONFIG))
    oc["model_cfg"]["vision_cfg"]["timm_model_name"] = "vit_small_patch16_224"
    cfg = config_from_open_clip(sd, oc)
    assert cfg == small.config


@pytest.mark.slow
def test_export_ships_the_training_vocabulary_and_names_it(tmp_path):
    # A model trained with its own vocabulary must not be exported under BiomedBERT's tokenizer name: the
    # folder carries that vocabulary, the config names the folder, and open_clip's own tokenizer loader
    # (local-dir) produces exactly the ids the model was trained on.
    import open_clip

    from bmclip.tokenizer import Tokenizer

    captions = ["chest x-ray showing a left lower lobe consolidation", "H&E stained liver section, 40x",
                "axial T2-weighted MRI of the brain with a ring-enhancing lesion", "kaplan-meier survival curves"]
    tok = Tokenizer.train(captions * 10, vocab_size=300, min_frequency=1, context_length=256)
    torch.manual_seed(0)
    model = create_model("biomedclip-vit-s16-224").eval()
    folder = export_open_clip(model, tmp_path / "export", tokenizer=tok)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    text_cfg = cfg["model_cfg"]["text_cfg"]
    assert text_cfg["hf_tokenizer_name"] == str(folder.resolve()) != BIOMEDBERT
    assert text_cfg["hf_model_name"] == BIOMEDBERT  # the architecture is still BiomedBERT-base
    assert cfg["bmclip"]["tokenizer"] == {"vocab": "vocab.txt", "context_length": 256, "vocab_size": tok.vocab_size}
    assert Tokenizer.from_vocab(folder).vocab == tok.vocab
    oc_tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    texts = ["A chest X-ray with consolidation.", "Survival curves (Kaplan-Meier) of 2 groups", "zebrafish"]
    assert torch.equal(oc_tok(texts), tok(texts))
    # Real captions and the strings open_clip's text cleaning changes: same ids through the exported folder.
    texts += ADVERSARIAL_TEXTS + _pmc_captions(Path(__file__).resolve().parent / "fixtures" / "pmc")
    assert len(texts) > 100
    ours, ref = tok(texts), oc_tok(texts)
    assert ref.shape == ours.shape == (len(texts), 256)
    assert [t[:60] for t, a, b in zip(texts, ours, ref) if not torch.equal(a, b)] == []
    # A tokenizer that does not clean is still exported, with a warning that open_clip's ids differ.
    raw_tok = Tokenizer.from_vocab(folder, clean=False)
    with pytest.warns(UserWarning, match="clean=False"):
        raw_folder = export_open_clip(model, tmp_path / "export_raw", tokenizer=raw_tok)
    assert not Tokenizer.from_vocab(raw_folder).clean

    bare = export_open_clip(model, tmp_path / "released", tokenizer=None)  # converted released weights
    assert json.loads((bare / CONFIG_NAME).read_text())["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == BIOMEDBERT
    assert not (bare / "vocab.txt").exists()


@pytest.mark.slow
def test_exported_model_embeds_captions_like_open_clip(tmp_path, fixtures_dir):
    # End to end through open_clip's own loaders: captions tokenized by open_clip.get_tokenizer("local-dir:...")
    # and embedded by open_clip's model holding the exported weights == bmclip's tokenizer + model.
    import open_clip
    from open_clip.factory import load_checkpoint

    from bmclip.tokenizer import get_tokenizer

    torch.manual_seed(0)
    ours = create_model("biomedclip-vit-s16-224").eval()
    _randomise_(ours, seed=3)
    tok = get_tokenizer()
    folder = export_open_clip(ours, tmp_path / "export", tokenizer=tok)
    oc_model = _build_open_clip(json.loads((folder / CONFIG_NAME).read_text())["model_cfg"])
    load_checkpoint(oc_model, str(folder / WEIGHTS_NAME), strict=True)
    oc_tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    captions = [ADVERSARIAL_TEXTS[2], ADVERSARIAL_TEXTS[4], ADVERSARIAL_TEXTS[9],
                *_pmc_captions(fixtures_dir / "pmc", limit=2)]
    ids = oc_tok(captions)
    assert torch.equal(ids, tok(captions))
    assert not torch.equal(ids, get_tokenizer(clean=False)(captions))  # the cleaning matters for these
    with torch.no_grad():
        ot = F.normalize(oc_model.encode_text(ids), dim=-1)
        bt = F.normalize(ours.encode_text(tok(captions)), dim=-1)
    dt = (ot - bt).abs().max().item()
    assert dt <= TOL, dt


# ------------------------------------------------------------------------------------------------------------
# Malformed or unsupported open_clip folders: one-line errors naming the file and key, never a traceback, never
# a silent guess. Tiny weights (the default tiny preset: 32-wide heads, which only the bmclip section can tell).

DELETE = object()


def _tiny_open_clip_config(model):
    """open_clip_config.json of a tiny model: no timm twin, so its head counts come from the bmclip section."""
    return {
        "model_cfg": {
            "embed_dim": model.config.embed_dim,
            "vision_cfg": {"timm_model_name": "vit_tiny_custom", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": model.config.vision.image_size},
            "text_cfg": {"hf_model_name": BIOMEDBERT, "hf_tokenizer_name": BIOMEDBERT, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": model.config.text.context_length},
        },
        "preprocess_cfg": json.loads(json.dumps(RELEASED_CONFIG["preprocess_cfg"])),
        "bmclip": {"model_config": model.config.to_dict()},
    }


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return create_model("tiny").eval()


def _write_folder(folder, model, edits=(), sd_edits=None):
    """An open_clip folder of ``model`` with config ``edits`` ((key path, value or DELETE), ...) applied."""
    cfg = _tiny_open_clip_config(model)
    for path, value in edits:
        d = cfg
        for k in path[:-1]:
            d = d[k]
        if value is DELETE:
            del d[path[-1]]
        else:
            d[path[-1]] = value
    sd = open_clip_state_dict(model)
    sd.update(sd_edits or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(sd, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    return folder


def test_bmclip_section_heads_and_bert_family_text_towers(tmp_path):
    model = _tiny_model()
    assert model.config.vision.heads == model.config.text.heads == 4  # not width // 64 = 2: a guess would differ
    back = load_open_clip(_write_folder(tmp_path / "oc", model))
    assert back.config == model.config
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(5, 4096, (2, 64))
    with torch.no_grad():
        assert torch.equal(back.encode_image(images), model.encode_image(images))
        assert torch.equal(back.encode_text(ids), model.encode_text(ids))
    # BERT-family text towers under their usual names (and a local BERT folder) are accepted
    local_bert = tmp_path / "my-text-model"
    local_bert.mkdir()
    (local_bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for name in ("microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract", "bert-base-uncased",
                 "google-bert/bert-base-uncased", str(local_bert)):
        folder = _write_folder(tmp_path / "names", model, [(("model_cfg", "text_cfg", "hf_model_name"), name)])
        assert load_open_clip(folder).config == model.config, name
    # other Hugging Face text models differ (RoBERTa: positions from pad_id + 1, pad id 1; DistilBERT: no token
    # types): refused by name rather than loaded as BERT
    for name in ("roberta-base", "FacebookAI/roberta-base", "distilbert-base-uncased", "xlm-roberta-base"):
        folder = _write_folder(tmp_path / "names", model, [(("model_cfg", "text_cfg", "hf_model_name"), name)])
        with pytest.raises(ConfigError, match=f"hf_model_name='{name}' is not a BERT model"):
            load_open_clip(folder)


T = ("model_cfg", "text_cfg")
V = ("model_cfg", "vision_cfg")
BAD_CONFIGS = [
    # (edits, needle): wrong JSON types (AttributeError / ValueError / TypeError tracebacks before)
    ([(("model_cfg",), "x")], "model_cfg must be a JSON object"),
    ([(V, [1])], "model_cfg.vision_cfg must be a JSON object"),
    ([(V, "x")], "model_cfg.vision_cfg must be a JSON object"),
    ([(T, 5)], "model_cfg.text_cfg must be a JSON object"),
    ([(("model_cfg", "embed_dim"), "abc")], "model_cfg.embed_dim"),
    ([(T + ("context_length",), "abc")], "model_cfg.text_cfg.context_length"),
    ([(("bmclip", "model_config"), [1])], "bmclip.model_config must be a JSON object"),
    ([(("bmclip", "model_config", "vision"), "x")], "bmclip.model_config.vision must be a JSON object"),
    ([(("bmclip", "model_config", "text", "ln_eps"), "x")], "bmclip.model_config.text.ln_eps"),
    ([(("preprocess_cfg",), [1])], "preprocess_cfg must be a JSON object"),
    # context lengths int() used to coerce (then rejected by embed), or too long for the position table
    ([(T + ("context_length",), 1.5), (("bmclip", "model_config", "text", "context_length"), DELETE)],
     "model_cfg.text_cfg.context_length=1.5"),
    ([(T + ("context_length",), True), (("bmclip", "model_config", "text", "context_length"), DELETE)],
     "model_cfg.text_cfg.context_length=true"),
    ([(T + ("context_length",), 1), (("bmclip", "model_config", "text", "context_length"), DELETE)],
     "model_cfg.text_cfg.context_length=1 must be an integer >= 2"),
    ([(T + ("context_length",), 65), (("bmclip", "model_config", "text", "context_length"), DELETE)],
     "model_cfg.text_cfg.context_length=65 exceeds"),
    # silent guesses: heads of an unknown timm ViT, a non-BERT text tower, other normalisation or image size
    ([(("bmclip",), DELETE)], "timm_model_name='vit_tiny_custom' is not a timm ViT"),
    ([(("bmclip",), DELETE), (V + ("timm_model_name",), "vit_huge_patch14_224")],
     "vit_base_patch16_224, vit_base_patch16_384, vit_small_patch16_224"),
    ([(V + ("timm_model_name",), "vit_base_patch16_224")],
     "model_cfg.vision_cfg.timm_model_name='vit_base_patch16_224' has (patch, width, layers, mlp)"),
    ([(("preprocess_cfg", "mean"), [0.5, 0.5, 0.5])], "preprocess_cfg.mean=[0.5, 0.5, 0.5] differs"),
    ([(("preprocess_cfg", "std"), [0.26862954, 0.26130258])], "preprocess_cfg.std="),
    ([(V + ("image_size",), 224)], "model_cfg.vision_cfg.image_size=224 but the weights"),
]


@pytest.mark.parametrize("edits,needle", BAD_CONFIGS, ids=[n[:40] for _, n in BAD_CONFIGS])
def test_bad_config_values_are_one_line_errors_naming_file_and_key(tmp_path, edits, needle):
    folder = _write_folder(tmp_path / "oc", _tiny_model(), edits)
    with pytest.raises(ConfigError) as e:
        load_open_clip(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder / CONFIG_NAME}: ") and needle in msg and "\n" not in msg, msg


BAD_WEIGHTS = [
    ({"visual.trunk.cls_token": torch.tensor(1.0)}, "'visual.trunk.cls_token' has shape ()"),
    ({"visual.head.proj.weight": torch.ones(64, 128, dtype=torch.long)}, "'visual.head.proj.weight' holds torch.int64"),
    ({"logit_scale": torch.tensor(3)}, "'logit_scale' holds torch.int64"),
    ({"text.transformer.encoder.layer.0.attention.self.key.weight": torch.ones(128, 7)},
     "'text.transformer.encoder.layer.0.attention.self.key.weight' (128, 7)"),
]


@pytest.mark.parametrize("sd_edits,needle", BAD_WEIGHTS, ids=[n[:30] for _, n in BAD_WEIGHTS])
def test_bad_tensors_are_one_line_errors_naming_the_key(tmp_path, sd_edits, needle):
    folder = _write_folder(tmp_path / "oc", _tiny_model(), sd_edits=sd_edits)
    with pytest.raises(CheckpointError) as e:
        load_open_clip(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder / WEIGHTS_NAME}: ") and needle in msg and "\n" not in msg, msg


def test_convert_cli_refuses_bad_arguments_before_writing(tmp_path, capsys, monkeypatch):
    from bmclip.cli import main
    from bmclip.io.model_file import save_model

    model = _tiny_model()
    oc = _write_folder(tmp_path / "oc", model)
    bad = _write_folder(tmp_path / "bad", model, [(T + ("context_length",), "abc")])
    work = tmp_path / "work"
    (work / "existing").mkdir(parents=True)
    (work / "notes").mkdir()
    (work / "notes" / "keep.txt").write_text("mine")
    save_model(model, work / "model.pt")
    monkeypatch.chdir(work)
    cases = [
        (["--from-open-clip", str(oc), "--out", "o.pt", "--vocab", "nope.txt"], "--vocab"),
        (["--from-open-clip", str(oc), "--out", "newdir/"], "names a folder"),
        (["--from-open-clip", str(oc), "--out", "existing"], "--out existing names a folder"),
        (["--from-open-clip", str(oc), "--out", "."], "names a folder"),
        (["--from-open-clip", str(oc), "--out", ""], "--out is empty"),
        (["--from-open-clip", str(bad), "--out", "o.pt"], f"{bad / CONFIG_NAME}: model_cfg.text_cfg.context_length"),
        (["--to-open-clip", "model.pt", "--out", "notes"], "notes exists and holds files that are not part of an "
                                                           "open_clip export (keep.txt)"),
        (["--to-open-clip", "model.pt", "--out", "."], "current folder"),
    ]
    before = sorted(p.name for p in work.rglob("*"))
    for argv, needle in cases:
        capsys.readouterr()
        assert main(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("bmclip convert: error: ") and needle in err and err.count("\n") == 1, (argv, err)
        assert ".tmp" not in err, err
        assert sorted(p.name for p in work.rglob("*")) == before, argv  # nothing written, nothing removed
    assert (work / "notes" / "keep.txt").read_text() == "mine"
    assert main(["convert", "--from-open-clip", str(oc), "--out", "o.pt"]) == 0  # the same, well-formed


# ------------------------------------------------------------------------------------------------------------
# Export folders: built aside and moved into place whole. The tiny model stands in for an exportable one (its
# config from _tiny_open_clip_config, which open_clip_config's own tests cover): the file handling at 1.4M
# parameters instead of 130M.


@pytest.fixture
def tiny_export(monkeypatch):
    from bmclip import interop

    monkeypatch.setattr(interop, "open_clip_config", _tiny_open_clip_config)
    return _tiny_model()


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _tokenizer(n_words, context_length=64):
    from bmclip.tokenizer import SPECIAL_TOKENS, Tokenizer

    words = [*SPECIAL_TOKENS, *(f"word{i}" for i in range(n_words))]
    return Tokenizer({w: i for i, w in enumerate(words)}, context_length)


@pytest.mark.parametrize("fail_at", ["save_state_dict", "atomic_write_text"])
def test_interrupted_export_leaves_the_old_folder_or_nothing(tiny_export, tmp_path, monkeypatch, fail_at):
    from bmclip import interop
    from bmclip.errors import Terminated

    def sigterm(*a, **k):  # what the CLI's SIGTERM handler raises, mid-export
        raise Terminated("SIGTERM")

    out = tmp_path / "export"
    with monkeypatch.context() as mp:
        mp.setattr(interop, fail_at, sigterm)
        with pytest.raises(Terminated):
            export_open_clip(tiny_export, out, tokenizer=_tokenizer(10))
    assert list(tmp_path.iterdir()) == []  # no folder, no temp folder

    export_open_clip(tiny_export, out, tokenizer=_tokenizer(10))
    old = _snapshot(out)
    assert set(old) == {WEIGHTS_NAME, CONFIG_NAME, "vocab.txt", "bmclip_tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json"}
    with monkeypatch.context() as mp:
        mp.setattr(interop, fail_at, sigterm)
        with pytest.raises(Terminated):
            export_open_clip(_tiny_model(seed=1), out, tokenizer=_tokenizer(20))
    assert _snapshot(out) == old and [p.name for p in tmp_path.iterdir()] == ["export"]


def _dead_pid():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_export_removes_the_temp_folder_of_a_killed_export(tiny_export, tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".export.export-{dead}.0badc0de.tmp"
    stale.mkdir()
    (stale / WEIGHTS_NAME).write_bytes(b"half")
    busy = tmp_path / ".export.export-1.0badc0de.tmp"  # pid 1 is alive: another export may be writing it
    busy.mkdir()
    export_open_clip(tiny_export, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "export"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_reexport_replaces_the_whole_folder(tiny_export, tmp_path, monkeypatch, exchange):
    # A second export without a tokenizer must not leave the first one's vocab.txt behind: embed and eval would
    # take it as the model's tokenizer, while the config names BiomedBERT's.
    from bmclip import interop
    from bmclip.resolve import locate_model

    if not exchange:  # systems without an atomic folder swap: rename aside, rename in
        monkeypatch.setattr(interop, "_exchange", lambda a, b: False)

    out = tmp_path / "export"
    export_open_clip(tiny_export, out, tokenizer=_tokenizer(10))
    assert locate_model(out).tokenizer_dir == out
    other = _tiny_model(seed=1)
    export_open_clip(other, out)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert locate_model(out).tokenizer_dir is None
    assert json.loads((out / CONFIG_NAME).read_text())["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == BIOMEDBERT
    back = load_open_clip(out)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), other.state_dict().values()))
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_export_refuses_to_replace_what_is_not_an_export(tiny_export, tmp_path, monkeypatch):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    tok_dir = tmp_path / "tok"
    _tokenizer(10).save(tok_dir)  # a tokenizer folder: only names an export also has, but no export config
    released = tmp_path / "released"  # a downloaded BiomedCLIP folder (its config has no bmclip section)
    released.mkdir()
    (released / CONFIG_NAME).write_text(json.dumps(RELEASED_CONFIG))
    (released / WEIGHTS_NAME).write_bytes(b"weights")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for target, needle in ((notes, "keep.txt"), (tok_dir, "no open_clip_config.json written by a bmclip export"),
                           (released, "no open_clip_config.json written by a bmclip export"),
                           (afile, "is not a folder"), (tmp_path / "afile" / "sub", "is a file")):
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        with pytest.raises(ConfigError, match=needle):
            export_open_clip(tiny_export, target)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    monkeypatch.chdir(notes)
    for target in ("", ".", ".."):
        with pytest.raises(ConfigError):
            export_open_clip(tiny_export, target)
    (tmp_path / "empty").mkdir()
    export_open_clip(tiny_export, tmp_path / "empty")  # an empty folder is filled
    assert (tmp_path / "empty" / WEIGHTS_NAME).is_file()


def test_export_refuses_a_tokenizer_larger_than_the_text_vocabulary(tiny_export, tmp_path):
    vocab = tiny_export.config.text.vocab_size  # 4096
    with pytest.raises(ConfigError, match=f"tokenizer has {vocab + 1} ids but the model's text.vocab_size is {vocab}"):
        export_open_clip(tiny_export, tmp_path / "export", tokenizer=_tokenizer(vocab + 1 - 5))
    assert list(tmp_path.iterdir()) == []
    export_open_clip(tiny_export, tmp_path / "export", tokenizer=_tokenizer(vocab - 5))  # exactly fits


def test_exported_tokenizer_length_is_the_models_context(tiny_export, tmp_path, monkeypatch):
    # The shipped tokenizer was saved with 32 tokens; the model (and open_clip, from text_cfg) uses 64.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from bmclip.tokenizer import Tokenizer, get_tokenizer

    out = export_open_clip(tiny_export, tmp_path / "export", tokenizer=get_tokenizer(context_length=32))
    assert tiny_export.config.text.context_length == 64
    assert transformers.AutoTokenizer.from_pretrained(str(out)).model_max_length == 64
    assert open_clip.get_tokenizer(f"local-dir:{out}")(["a chest x-ray"]).shape == (1, 64)
    assert Tokenizer.from_vocab(out).context_length == 64
    assert json.loads((out / CONFIG_NAME).read_text())["bmclip"]["tokenizer"]["context_length"] == 64


def test_a_config_nested_beyond_the_parser_is_one_config_error(tmp_path):
    from bmclip.interop import _read_config

    cfg = tmp_path / "open_clip_config.json"
    cfg.write_bytes(b"[" * 100_000 + b"]" * 100_000)  # raised RecursionError out of json.loads
    with pytest.raises(ConfigError, match="nested too deeply"):
        _read_config(cfg)
