"""Tokenizer: identical ids to transformers' BertTokenizerFast / BertTokenizer on the same vocab.txt."""

import shutil
import xml.etree.ElementTree as ET

import pytest
import torch

from bmclip.errors import ConfigError
from bmclip.tokenizer import SPECIAL_TOKENS, Tokenizer, bundled_vocab_path, get_tokenizer

transformers = pytest.importorskip("transformers")

EDGE_TEXTS = [
    "",
    "   ",
    "Immunofluorescence staining of CD31+ endothelial cells (scale bar = 50 µm).",
    "H&E-stained section; arrows: necrotic foci. ×40 magnification, n = 12, p < 0.05",
    "Café naïve RÉSUMÉ Ångström façade",  # accents stripped by uncased BERT
    "αβ T-cells, IL-1β and TNF-α; Δψm loss",
    "中文字符 mixed with English",  # CJK characters are split one per token
    "tab\tnew\nline\rcontrol\x00\x07chars",
    "supercalifragilisticexpialidocious" * 5,  # longer than max_input_chars_per_word -> [UNK]
    "(A–D) Western blots of p-ERK1/2 [see Fig. 3C] {n=3}",
    "word " * 400,  # far longer than any context length: truncated, [SEP] kept
    "😀 emoji and ∑ math ≤ ≥",
    "a literal [MASK] and [CLS] inside text",
]


def _pmc_captions(root, limit=300):
    caps = []
    for p in sorted(root.rglob("*.*xml")):
        try:
            tree = ET.parse(p)
        except ET.ParseError:
            continue
        for el in tree.getroot().iter():
            if isinstance(el.tag, str) and el.tag.rsplit("}", 1)[-1] == "caption":
                caps.append(" ".join("".join(el.itertext()).split()))
        if len(caps) >= limit:
            break
    return caps[:limit]


@pytest.fixture(params=["fixtures", "shared"])
def caption_root(request, fixtures_dir):
    """Real JATS XML to take captions from: the CC BY/CC0 copies in tests/fixtures (always there, so CI runs the
    comparison on real captions) and the larger ../shared sample set (skipped where this checkout has none)."""
    if request.param == "fixtures":
        return fixtures_dir / "pmc"
    return request.getfixturevalue("pmc_samples")


def _fast(vocab_txt, tmp_path):
    """transformers' BertTokenizerFast loaded from a folder holding only vocab.txt (v4 and v5 API)."""
    folder = tmp_path / "hf_tok"
    folder.mkdir(exist_ok=True)
    shutil.copy(vocab_txt, folder / "vocab.txt")
    return transformers.BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)


def _slow(vocab_txt):
    """The pure-Python BERT tokenizer (BertTokenizer in transformers 4, BertTokenizerLegacy in 5)."""
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow
    except ImportError:
        Slow = transformers.BertTokenizer
    return Slow(vocab_file=str(vocab_txt), do_lower_case=True)


def _hf_ids(hf, texts, length):
    enc = hf(texts, padding="max_length", truncation=True, max_length=length)
    return torch.tensor(enc["input_ids"])


@pytest.mark.parametrize("length", [16, 77, 256])
def test_bundled_vocab_matches_bert_tokenizer_fast(length, caption_root, tmp_path):
    hf = _fast(bundled_vocab_path(), tmp_path)
    assert len(hf) == get_tokenizer().vocab_size
    tok = get_tokenizer(context_length=length)
    texts = EDGE_TEXTS + _pmc_captions(caption_root)
    assert len(texts) > 100  # fixtures: 93 captions of 8 articles
    ours = tok(texts)
    assert ours.dtype == torch.long and ours.shape == (len(texts), length)
    assert torch.equal(ours, _hf_ids(hf, texts, length))


def test_matches_slow_python_bert_tokenizer():
    # BertTokenizer is a pure-Python implementation: an independent reference for the Rust pipeline.
    slow = _slow(bundled_vocab_path())
    tok = get_tokenizer(context_length=64)
    texts = [t for t in EDGE_TEXTS if "\x00" not in t]
    assert torch.equal(tok(texts), _hf_ids(slow, texts, 64))


def test_count_tokens_equals_slow_tokenizer_piece_count():
    # count_tokens (the dataset builder's caption-length statistic) == the pure-Python BertTokenizer's pieces
    slow = _slow(bundled_vocab_path())
    tok = get_tokenizer()
    texts = [t for t in EDGE_TEXTS if "\x00" not in t] + ["word " * 400]
    assert [tok.count_tokens(t) for t in texts] == [len(slow.tokenize(t)) for t in texts]
    assert tok.count_tokens("word " * 400) == len(tok.tokenize("word " * 400)) > tok.context_length  # untruncated


def test_truncation_padding_and_lengths():
    tok = get_tokenizer(context_length=10)
    ids = tok(["word " * 50, "cells", ""])
    assert ids.shape == (3, 10)
    assert ids[0, 0] == tok.cls_id and ids[0, -1] == tok.sep_id and (ids[0] != 0).all()
    assert ids[1, 0] == tok.cls_id and ids[1, 2] == tok.sep_id and (ids[1, 3:] == 0).all()
    assert ids[2].tolist()[:3] == [tok.cls_id, tok.sep_id, 0]
    assert tok.encode_batch_lengths(["word " * 50, "cells", ""]) == [10, 3, 2]
    assert tok("cells", context_length=5).shape == (1, 5)  # per-call context length
    assert tok([]).shape == (0, 10)
    assert tok.decode(ids[1]) == "cells"
    with pytest.raises(ConfigError):
        tok([b"bytes"])


def test_train_save_load_roundtrip(tmp_path, caption_root):
    texts = _pmc_captions(caption_root, limit=200)
    assert len(texts) >= 90
    tok = Tokenizer.train(texts, vocab_size=800, context_length=32, min_frequency=2)
    assert tok.vocab_size <= 800
    assert tok.vocab_lines()[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    tok.save(tmp_path / "tok")
    back = Tokenizer.from_vocab(tmp_path / "tok")
    assert back.context_length == 32 and back.vocab_size == tok.vocab_size
    assert torch.equal(back(texts), tok(texts))
    hf = _fast(tmp_path / "tok" / "vocab.txt", tmp_path)
    assert torch.equal(tok(texts + EDGE_TEXTS), _hf_ids(hf, texts + EDGE_TEXTS, 32))
    # A trained vocabulary actually learned the domain: frequent caption words are single tokens.
    assert len(tok.tokenize("cells")) == 1


def test_bad_vocabularies(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Tokenizer.from_vocab(tmp_path / "missing.txt")
    v = tmp_path / "v.txt"
    v.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ConfigError, match="PAD"):
        Tokenizer.from_vocab(v)
    v.write_text("[PAD]\n[UNK]\n[CLS]\nhello\n")
    with pytest.raises(ConfigError, match="SEP"):
        Tokenizer.from_vocab(v)
    with pytest.raises(ConfigError):
        Tokenizer.train([], vocab_size=100)


def test_bundled_vocab_fits_tiny_model():
    from bmclip.model import get_preset

    assert get_tokenizer().vocab_size <= get_preset("tiny").text.vocab_size
    assert get_tokenizer().context_length == 256


def test_pickle_roundtrip():
    import pickle

    tok = get_tokenizer(context_length=24)
    texts = ["Confocal image of the mouse retina.", "Western blot of p53"]
    first = tok(texts)
    back = pickle.loads(pickle.dumps(tok))
    assert torch.equal(back(texts), first) and back.context_length == 24
