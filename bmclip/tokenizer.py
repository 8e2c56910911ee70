"""BERT WordPiece tokenizer (lower-case, ``[CLS] ... [SEP]``, pad id 0) on the HF ``tokenizers`` library.

Loads a ``vocab.txt`` (e.g. the released PubMedBERT/BiomedBERT files) or trains a domain vocabulary from
captions, as PubMedBERT did for PubMed.

Text cleaning (``clean=True``, the default): every text first goes through ``clean_text`` — ftfy's
``fix_text`` (curly quotes to straight ones, mojibake repaired, NFC, ...), HTML entities unescaped twice
(``&amp;lt;`` -> ``<``), whitespace runs (NBSP included) collapsed to one space, ends stripped. That is the
cleaning open_clip's ``HFTokenizer`` applies by default (``clean="whitespace"``), which is the tokenizer
open_clip builds for BiomedCLIP and for any folder written by ``bmclip.interop.export_open_clip``, so with
cleaning on the ids equal open_clip's ``get_tokenizer(...)`` ids for the same vocabulary, and a caption
embeds the same in both. It is on for every vocabulary (the bundled one, PubMedBERT's, trained ones —
training cleans its texts too), because open_clip cleans whatever vocabulary an exported folder names.
``clean=False`` gives the raw WordPiece ids, equal to ``transformers.BertTokenizerFast`` built from the
same ``vocab.txt`` with ``padding="max_length", truncation=True, max_length=context_length``; with cleaning
on they equal that tokenizer applied to ``clean_text(text)``. The choice is saved by ``save``.
"""

from __future__ import annotations

import html
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from bmclip.errors import ConfigError
from bmclip.io import atomic_writer

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "clean_text", "get_tokenizer"]

# Order matters for trained vocabularies: ids 0..4 as in BERT/PubMedBERT ([PAD] = 0 is the model's pad id).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONFIG_NAME = "bmclip_tokenizer.json"
DEFAULT_CONTEXT_LENGTH = 256
ASSETS = Path(__file__).resolve().parent / "assets"


def clean_text(text: str) -> str:
    """open_clip's HF-tokenizer text cleaning: ftfy.fix_text, HTML-unescape twice, collapse whitespace, strip.

    ``str.split()`` splits on every Unicode whitespace character (NBSP, thin spaces, line separators);
    zero-width characters are not whitespace and are left to the BERT normalizer.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


def _read_vocab(path: Path) -> dict[str, int]:
    # Same rule as the Rust WordPiece loader (tokenizers): one token per line, trailing whitespace
    # trimmed, id = line number.
    vocab: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                vocab[line.rstrip()] = i
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read vocabulary {path}: {e}") from None
    return vocab


class Tokenizer:
    """Callable: ``tok(texts) -> LongTensor (B, context_length)`` of WordPiece ids, 0-padded."""

    def __init__(self, vocab: dict[str, int], context_length: int = DEFAULT_CONTEXT_LENGTH, clean: bool = True):
        if not isinstance(clean, bool):
            raise ConfigError(f"clean={clean!r} must be True or False")
        if not isinstance(context_length, int) or context_length < 2:
            raise ConfigError(f"context_length={context_length!r} must be an integer >= 2 ([CLS] and [SEP])")
        for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if t not in vocab:
                raise ConfigError(f"vocabulary has no {t} token")
        if vocab["[PAD]"] != 0:
            raise ConfigError(f"vocabulary has [PAD] at id {vocab['[PAD]']}; bmclip models pad with id 0")
        self.vocab = dict(vocab)
        self.context_length = context_length
        self.clean = clean
        self.pad_id = 0
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.unk_id = vocab["[UNK]"]
        self._base = self._build(self.vocab)
        self._per_length: dict[int, object] = {}
        self._lock = threading.Lock()

    def _build(self, vocab: dict[str, int]):
        hf = HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        # BERT uncased: clean control chars, split CJK chars, lower-case and strip accents.
        hf.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.post_processor = processors.BertProcessing(("[SEP]", self.sep_id), ("[CLS]", self.cls_id))
        hf.decoder = decoders.WordPiece(prefix="##")
        # Registered as special (as BertTokenizerFast does): matched whole in the raw text, never split,
        # and dropped by decode(skip_special_tokens=True).
        hf.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
        return hf

    def _for_length(self, length: int):
        # One configured HF tokenizer per context length (truncation/padding live on the object).
        hf = self._per_length.get(length)
        if hf is None:
            with self._lock:
                hf = self._per_length.get(length)
                if hf is None:
                    hf = HFTokenizer.from_str(self._base.to_str())
                    # Truncation counts the special tokens, so [SEP] stays the last real token.
                    hf.enable_truncation(max_length=length)
                    hf.enable_padding(pad_id=0, pad_token="[PAD]", length=length)
                    self._per_length[length] = hf
        return hf

    def _prepare(self, texts: list[str]) -> list[str]:
        return [clean_text(t) for t in texts] if self.clean else texts

    def __getstate__(self):  # picklable for DataLoader workers: the lock and per-length cache are rebuilt
        d = dict(self.__dict__)
        d["_lock"] = None
        d["_per_length"] = {}
        return d

    def __setstate__(self, d):
        d.setdefault("clean", False)  # pickled before cleaning existed: those tokenizers did not clean
        self.__dict__.update(d)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ construct

    @classmethod
    def from_vocab(cls, path: str | os.PathLike, context_length: int | None = None,
                   clean: bool | None = None) -> Tokenizer:
        """Load ``vocab.txt`` (or a folder holding it, e.g. a released HF tokenizer or ``save`` output).

        ``context_length`` defaults to the saved one (folders written by ``save``), else 256; ``clean``
        (text cleaning, see the module docstring) to the saved one, else True.
        """
        path = Path(path)
        saved = {}
        if path.is_dir():
            cfg = path / CONFIG_NAME
            if cfg.is_file():
                try:
                    saved = json.loads(cfg.read_text(encoding="utf-8"))
                    if not isinstance(saved, dict):
                        raise ValueError("not a JSON object")
                except (OSError, ValueError) as e:
                    raise ConfigError(f"cannot read {cfg}: {e}") from None
            path = path / "vocab.txt"
        if not path.is_file():
            raise ConfigError(f"vocabulary file not found: {path}")
        ctx = context_length if context_length is not None else (saved.get("context_length") or DEFAULT_CONTEXT_LENGTH)
        cl = clean if clean is not None else saved.get("clean", True)
        return cls(_read_vocab(path), ctx, clean=cl)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 30522,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        min_frequency: int = 2,
        clean: bool = True,
    ) -> Tokenizer:
        """Train an uncased WordPiece vocabulary (at most ``vocab_size`` tokens) from an iterable of texts
        (cleaned with ``clean_text`` first when ``clean``, as the returned tokenizer will clean its input)."""
        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ConfigError(f"vocab_size={vocab_size} is too small")
        hf = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
        hf.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            continuing_subword_prefix="##",
            show_progress=False,
        )
        strs = (t for t in texts if isinstance(t, str))
        if clean:
            strs = (clean_text(t) for t in strs)
        hf.train_from_iterator((t for t in strs if t.strip()), trainer)
        vocab = hf.get_vocab()
        if len(vocab) <= len(SPECIAL_TOKENS):
            raise ConfigError("tokenizer training saw no text")
        return cls(vocab, context_length, clean=clean)

    # ------------------------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        """Number of ids (max id + 1); the model's text.vocab_size must be at least this."""
        return max(self.vocab.values()) + 1

    def __call__(self, texts: str | list[str], context_length: int | None = None):
        """texts -> torch.LongTensor (B, L), L = context_length: [CLS] ids [SEP] then 0-padding (texts cleaned
        first when ``self.clean``)."""
        import torch  # start-up cost: the dataset builder's pure-Python workers count tokens without torch

        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ConfigError(f"text {i} is a {type(t).__name__}, not a str")
        length = self.context_length if context_length is None else int(context_length)
        if length < 2:
            raise ConfigError(f"context_length={length} must be >= 2")
        if not texts:
            return torch.zeros(0, length, dtype=torch.long)
        encs = self._for_length(length).encode_batch(self._prepare(texts))
        return torch.from_numpy(np.array([e.ids for e in encs], dtype=np.int64))

    def encode_batch_lengths(self, texts: list[str], context_length: int | None = None) -> list[int]:
        """Unpadded token counts (with [CLS]/[SEP], after truncation to the context length)."""
        length = self.context_length if context_length is None else int(context_length)
        encs = self._for_length(length).encode_batch(self._prepare(list(texts)))
        return [sum(e.attention_mask) for e in encs]

    def count_tokens(self, text: str) -> int:
        """Number of WordPiece tokens of one text, without special tokens or truncation (== len(tokenize(text)))."""
        return len(self._base.encode(self._prepare([text])[0], add_special_tokens=False))

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of one text, without special tokens or truncation."""
        return self._base.encode(self._prepare([text])[0], add_special_tokens=False).tokens

    def decode(self, ids) -> str:
        """Ids (list or 1-D tensor) -> text, special tokens dropped, word pieces joined."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._base.decode([int(i) for i in ids], skip_special_tokens=True)

    # ------------------------------------------------------------------------------------ save

    def vocab_lines(self) -> list[str]:
        """Tokens in id order (the lines of vocab.txt)."""
        by_id = sorted(self.vocab.items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ConfigError("vocabulary ids are not contiguous; cannot write vocab.txt")
        return [t for t, _ in by_id]

    def save_vocab(self, path: str | os.PathLike) -> None:
        """Write the vocab.txt file alone (atomically)."""
        with atomic_writer(path, "w") as f:
            f.write("".join(t + "\n" for t in self.vocab_lines()))

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``vocab.txt`` and ``bmclip_tokenizer.json`` (context length, casing, cleaning) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_vocab(folder / "vocab.txt")
        meta = {
            "format": "bmclip-wordpiece-1",
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "lowercase": True,
            "clean": self.clean,
            "special_tokens": list(SPECIAL_TOKENS),
        }
        with atomic_writer(folder / CONFIG_NAME, "w") as f:
            json.dump(meta, f, indent=2)

    def save_hf_files(self, folder: str | os.PathLike) -> None:
        """Write ``tokenizer_config.json`` + ``special_tokens_map.json`` beside ``vocab.txt`` (call ``save`` too),
        so ``transformers.AutoTokenizer.from_pretrained(folder)`` builds this tokenizer (uncased BERT WordPiece)
        from the folder alone, e.g. for open_clip's ``get_tokenizer("local-dir:FOLDER")``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]"}
        if "[MASK]" in self.vocab:
            special["mask_token"] = "[MASK]"
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
                  "strip_accents": None, "model_max_length": self.context_length, **special}
        with atomic_writer(folder / "tokenizer_config.json", "w") as f:
            json.dump(config, f, indent=2)
        with atomic_writer(folder / "special_tokens_map.json", "w") as f:
            json.dump(special, f, indent=2)


def bundled_vocab_path() -> Path:
    """The vocab-*.txt shipped in bmclip/assets (trained from CC BY/CC0 PMC text; see its README)."""
    found = sorted(ASSETS.glob("vocab-*.txt"))
    if not found:
        raise ConfigError(f"no bundled vocabulary in {ASSETS}")
    return found[0]


def get_tokenizer(path: str | os.PathLike | None = None, context_length: int | None = None,
                  clean: bool | None = None) -> Tokenizer:
    """Tokenizer from ``path`` (vocab.txt or folder) or, when None, the bundled default vocabulary.

    ``clean``: open_clip's text cleaning before WordPiece (see the module docstring); None = the folder's
    saved choice, else True.
    """
    return Tokenizer.from_vocab(bundled_vocab_path() if path is None else path, context_length, clean=clean)
