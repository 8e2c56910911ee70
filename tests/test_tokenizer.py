"""Tokenizer: with clean=False identical ids to transformers' BertTokenizerFast / BertTokenizer on the same
vocab.txt; by default (clean=True) identical ids to open_clip's HFTokenizer, the tokenizer open_clip builds
for BiomedCLIP."""

import shutil
import xml.etree.ElementTree as ET

import pytest
import torch

from bmclip.errors import ConfigError
from bmclip.tokenizer import SPECIAL_TOKENS, Tokenizer, bundled_vocab_path, clean_text, get_tokenizer

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

# Text that open_clip's cleaning (ftfy + HTML unescape x2 + whitespace collapse) changes, or that tests it.
ADVERSARIAL_TEXTS = [
    "",
    " \u00a0 ",
    "Tukey\u2019s multiple comparisons test; Shannon\u2019s diversity index",
    "\u201cquoted\u201d and \u2018single\u2019 quotes, \u00abguillemets\u00bb",
    "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &amp;amp; more",
    "p &lt; 0.05 &amp; n &gt; 3; 5&nbsp;\u00b5m &#x3B1;-SMA &#946;",
    "<i>E. coli</i> &amp; <sub>2</sub>",
    "scale\u00a0bar\u00a0=\u00a050\u2009\u00b5m\u202fand\u2002spaces\u3000here\u2028line",
    "zero\u200bwidth\u200cjoiners\u200d and \ufeffBOM \u2060word-joiner \u00adsoft\u00adhyphen",
    "don\u00e2\u20ac\u2122t, caf\u00c3\u00a9, \u00e2\u20ac\u0153mojibake\u00e2\u20ac\u009d",
    "e\u0301cole, nai\u0308ve, A\u030angstro\u0308m (combining accents)",
    "\u03b1\u03b2 T-cells, IL-1\u03b2, TNF-\u03b1, \u0394\u03c8m, \u03a3\u03c9\u03ba\u03c1\u03ac\u03c4\u03b7\u03c2",
    "\ufb01brosis \ufb02uorescence (ligatures), \uff21\uff22\uff23\uff11\uff12 (full width)",
    "tabs\tand\nnewlines\r\n  and   runs    of spaces  ",
    "\x1b[31mANSI\x1b[0m escape and \x07bell",
    "Tukey\u2019s " * 300,  # far over 256 tokens: truncation after cleaning, [SEP] kept
    "&amp;lt; " * 300,
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


@pytest.mark.slow
@pytest.mark.parametrize("length", [16, 77, 256])
def test_bundled_vocab_matches_bert_tokenizer_fast(length, caption_root, tmp_path):
    hf = _fast(bundled_vocab_path(), tmp_path)
    assert len(hf) == get_tokenizer().vocab_size
    tok = get_tokenizer(context_length=length, clean=False)
    texts = EDGE_TEXTS + _pmc_captions(caption_root)
    assert len(texts) > 100  # fixtures: 93 captions of 8 articles
    ours = tok(texts)
    assert ours.dtype == torch.long and ours.shape == (len(texts), length)
    assert torch.equal(ours, _hf_ids(hf, texts, length))


def test_matches_slow_python_bert_tokenizer():
    # BertTokenizer is a pure-Python implementation: an independent reference for the Rust pipeline.
    slow = _slow(bundled_vocab_path())
    tok = get_tokenizer(context_length=64, clean=False)
    texts = [t for t in EDGE_TEXTS if "\x00" not in t]
    assert torch.equal(tok(texts), _hf_ids(slow, texts, 64))


def test_count_tokens_equals_slow_tokenizer_piece_count():
    # count_tokens (the dataset builder's caption-length statistic) == the pure-Python BertTokenizer's pieces
    slow = _slow(bundled_vocab_path())
    tok = get_tokenizer(clean=False)
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
    assert back.clean and tok.clean  # cleaning is the default and is saved
    hf = _fast(tmp_path / "tok" / "vocab.txt", tmp_path)
    all_texts = texts + EDGE_TEXTS + ADVERSARIAL_TEXTS
    assert torch.equal(tok(all_texts), _hf_ids(hf, [clean_text(t) for t in all_texts], 32))
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


# ------------------------------------------------------------------------------------------------ open_clip


def _open_clip_hf_tokenizer(vocab_txt, tmp_path, context_length):
    """open_clip 3.3's HFTokenizer with its defaults (clean="whitespace"), as ``open_clip.get_tokenizer`` builds it
    for BiomedCLIP, but offline: instead of the hub name "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    it gets a local folder holding ``vocab.txt`` and a hand-written ``tokenizer_config.json`` (uncased
    BertTokenizer, as the released tokenizer's), which ``AutoTokenizer.from_pretrained`` turns into the same
    BertTokenizerFast pipeline. PubMedBERT's own vocab.txt is not available offline, so the vocabulary here
    is bmclip's bundled one; the cleaning under test does not depend on the vocabulary."""
    import json

    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
    folder = tmp_path / "oc_tok"
    folder.mkdir(exist_ok=True)
    shutil.copy(vocab_txt, folder / "vocab.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True}))
    return open_clip_tokenizer.HFTokenizer(str(folder), context_length=context_length)


@pytest.mark.slow
@pytest.mark.parametrize("length", [16, 256])
def test_ids_equal_open_clip_hf_tokenizer(length, caption_root, tmp_path):
    oc = _open_clip_hf_tokenizer(bundled_vocab_path(), tmp_path, length)
    assert oc.clean_fn.__name__ == "_clean_whitespace"  # open_clip's default cleaning, the one mirrored
    tok = get_tokenizer(context_length=length)
    assert tok.clean
    texts = ADVERSARIAL_TEXTS + EDGE_TEXTS + _pmc_captions(caption_root)
    ours, ref = tok(texts), oc(texts)
    assert ref.shape == ours.shape == (len(texts), length)
    bad = [t[:60] for t, a, b in zip(texts, ours, ref) if not torch.equal(a, b)]
    assert not bad, bad
    assert [clean_text(t) for t in texts] == [oc.clean_fn(t) for t in texts]
    # The strings are adversarial for real: raw WordPiece ids differ from open_clip's on these.
    raw = get_tokenizer(context_length=length, clean=False)(ADVERSARIAL_TEXTS)
    assert sum(not torch.equal(a, b) for a, b in zip(raw, ref[: len(ADVERSARIAL_TEXTS)])) >= 8
    # Over-long captions are truncated identically: [CLS] ... [SEP] filling the context.
    long_row = ours[ADVERSARIAL_TEXTS.index("Tukey\u2019s " * 300)]
    assert long_row[-1] == tok.sep_id and (long_row != 0).all()


def test_clean_switch_and_persistence(tmp_path):
    text = "Shannon\u2019s index &amp;lt; 2"
    on, off = get_tokenizer(), get_tokenizer(clean=False)
    assert on.clean and not off.clean
    assert "\u2019" in off.tokenize(text) and "\u2019" not in on.tokenize(text)
    assert on.tokenize(text) == off.tokenize("Shannon's index < 2")
    assert on.count_tokens(text) == len(on.tokenize(text))
    assert on.encode_batch_lengths([text]) == [on.count_tokens(text) + 2]
    off.save(tmp_path / "off")
    assert not Tokenizer.from_vocab(tmp_path / "off").clean  # the saved choice is kept
    assert Tokenizer.from_vocab(tmp_path / "off", clean=True).clean  # and an explicit one wins
    assert get_tokenizer(tmp_path / "off" / "vocab.txt").clean  # a bare vocab.txt: the default, on
    with pytest.raises(ConfigError, match="clean"):
        Tokenizer(get_tokenizer().vocab, clean="yes")
    import pickle

    assert not pickle.loads(pickle.dumps(off)).clean


def test_train_config_tokenizer_clean_reaches_the_tokenizer(tmp_path):
    from bmclip.train.config import TrainConfig
    from bmclip.train.trainer import _load_tokenizer

    cfg = TrainConfig()
    assert cfg.data.tokenizer_clean is True
    assert _load_tokenizer(cfg, 32).clean
    cfg.data.tokenizer_clean = False
    assert not _load_tokenizer(cfg, 32).clean
    get_tokenizer().save(tmp_path / "tok")
    cfg.data.tokenizer = str(tmp_path / "tok")
    assert not _load_tokenizer(cfg, 32).clean
    cfg.data.tokenizer_clean = True
    assert _load_tokenizer(cfg, 32).clean


def test_vocabulary_file_checks(tmp_path):
    """A vocab.txt that does not match its bmclip_tokenizer.json, has a repeated token or starts with a UTF-8 BOM."""
    tok = get_tokenizer(context_length=32)
    tok.save(tmp_path / "tok")
    lines = tok.vocab_lines()
    vocab = tmp_path / "tok" / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in lines[:500]), encoding="utf-8")  # truncated
    with pytest.raises(ConfigError, match="vocab_size") as e:
        Tokenizer.from_vocab(tmp_path / "tok")
    assert str(vocab) in str(e.value) and "bmclip_tokenizer.json" in str(e.value)
    # A repeated token: named, with both its lines (it used to be reported as "[PAD] at id N").
    dup = tmp_path / "dup.txt"
    dup.write_text("".join(t + "\n" for t in lines + ["[PAD]"]), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"'\[PAD\]' on line {len(lines) + 1} repeats line 1"):
        Tokenizer.from_vocab(dup)
    # A BOM is not part of the first token: same ids as without it (transformers' reference on the clean file).
    bom = tmp_path / "bom" / "vocab.txt"
    bom.parent.mkdir()
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(t + "\n" for t in lines).encode("utf-8"))
    texts = ["Fluorescence micrograph of HeLa cells", "CT scan of the liver"]
    ref = _hf_ids(_fast(bundled_vocab_path(), tmp_path), texts, 32)
    assert torch.equal(Tokenizer.from_vocab(bom, context_length=32, clean=False)(texts), ref)


def test_option_bounds_are_config_errors():
    vocab = get_tokenizer().vocab
    for bad in (1, 10**20, 65537, 2.5, True):
        with pytest.raises(ConfigError, match="context_length"):
            Tokenizer(vocab, bad)
    tok = get_tokenizer()
    with pytest.raises(ConfigError, match="context_length"):
        tok(["cells"], context_length=10**20)
    assert tok(["cells"], context_length=65536).shape == (1, 65536)
    for kw, name in (({"vocab_size": 10**20}, "vocab_size"), ({"min_frequency": -3}, "min_frequency"),
                     ({"context_length": 1}, "context_length"), ({"context_length": 10**9}, "context_length")):
        with pytest.raises(ConfigError, match=name):
            Tokenizer.train(iter(["never read"] * 3), **kw)


def test_save_never_mixes_a_new_vocab_with_an_old_config(tmp_path, monkeypatch):
    """A save that fails before bmclip_tokenizer.json is in place leaves no old json beside the new vocab.txt."""
    import json
    import os

    folder = tmp_path / "tok"
    old = Tokenizer.train(["Fluorescence micrograph of HeLa cells"] * 5, vocab_size=100, context_length=16)
    old.save(folder)
    new = get_tokenizer(context_length=48)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("bmclip_tokenizer.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        new.save(folder)
    monkeypatch.undo()
    cfg = folder / "bmclip_tokenizer.json"
    vocab_lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    if cfg.exists():  # still the old set, both files
        assert json.loads(cfg.read_text())["vocab_size"] == old.vocab_size == len(vocab_lines)
    else:  # the new vocabulary alone
        assert vocab_lines == new.vocab_lines()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temp files left


@pytest.mark.slow  # a child process that imports torch
def test_a_huge_caption_is_cut_to_what_the_context_can_hold():
    """A 40 MB caption in a shard used to take > 4 GB in cleaning and the Rust encoder and abort the process
    (SIGABRT); the text is now cut to a budget of characters that still holds every token of the context."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import resource
        from bmclip.tokenizer import get_tokenizer
        tok = get_tokenizer()
        head = "the cell nucleus stains blue " * 200  # more tokens than the context holds
        want = tok([head]).tolist()
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more, no more
        huge = head + "word " * 8_000_000  # 40 MB
        assert tok([huge]).tolist() == want
        assert tok.encode_batch_lengths([huge]) == [256]
        assert tok.count_tokens(huge) > 200_000  # counts its first MAX_TEXT_CHARS characters
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
