"""MODEL resolution for the eval commands: preset, open_clip folder, bmclip checkpoint file/dir."""

import pytest
import torch

from bmclip.errors import CheckpointError
from bmclip.eval.models import load_model


@pytest.fixture(scope="module")
def tiny():
    from bmclip.model import create_model

    torch.manual_seed(0)
    return create_model("tiny").eval()


def _outputs(model, tok):
    torch.manual_seed(1)
    s = model.config.vision.image_size
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(tok(["ct of the chest", "h&e stain"]))


def test_preset_gives_model_and_tokenizer():
    m, tok = load_model("tiny")
    ids = tok(["a chest x-ray"])
    assert ids.shape == (1, m.config.text.context_length) and not m.training


def test_checkpoint_file_and_dir_roundtrip(tiny, tmp_path):
    from bmclip.tokenizer import get_tokenizer

    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save({"model": tiny.state_dict(), "model_config": tiny.config.to_dict()}, d / "model.pt")
    tok = get_tokenizer(context_length=tiny.config.text.context_length)
    ref = _outputs(tiny, tok)
    for spec in (d / "model.pt", d):
        m, t = load_model(spec)
        got = _outputs(m, t)
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_open_clip_folder(tmp_path):
    """An exported open_clip folder (smallest exportable preset: ViT-S/16 + PubMedBERT-base) loads
    through ``load_model`` with identical outputs and its own vocab.txt."""
    from bmclip.interop import export_open_clip
    from bmclip.model import create_model
    from bmclip.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = create_model("biomedclip-vit-s16-224").eval()
    tok = get_tokenizer(context_length=model.config.text.context_length)
    export_open_clip(model, tmp_path / "oc", tokenizer=tok)
    assert (tmp_path / "oc" / "open_clip_config.json").is_file()
    m, t = load_model(tmp_path / "oc")
    for a, b in zip(_outputs(model, tok), _outputs(m, t)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not an open_clip folder"):
        load_model("no-such-preset")
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_model(bad)
