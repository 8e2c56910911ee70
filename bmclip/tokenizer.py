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

import contextlib
import errno
import html
import json
import operator
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from bmclip.errors import ConfigError, is_int
from bmclip.io import atomic_writer
from bmclip.io.atomic import replace_as_set, temp_file_beside

__all__ = ["MAX_CONTEXT_LENGTH", "MAX_VOCAB_SIZE", "SPECIAL_TOKENS", "Tokenizer", "check_context_length",
           "check_save_folder", "check_train_options", "clean_text", "get_tokenizer"]

# Order matters for trained vocabularies: ids 0..4 as in BERT/PubMedBERT ([PAD] = 0 is the model's pad id).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONFIG_NAME = "bmclip_tokenizer.json"
DEFAULT_CONTEXT_LENGTH = 256
# Upper bounds of the integer options: far above any real use (BERT-style text towers have 512 positions, the
# model config has no hard cap), and low enough that the Rust tokenizer's usize/u32 fields never overflow and a
# padded batch of one text stays a few hundred KiB.
MAX_CONTEXT_LENGTH = 65536
MAX_VOCAB_SIZE = 1 << 24
MAX_MIN_FREQUENCY = (1 << 32) - 1
# Text is cut to a character budget before cleaning and encoding: cleaning and the Rust encoder take ~150 bytes
# of memory per character, so one 40 MB caption in a shard aborted the process. The budget,
# context_length * CHARS_PER_TOKEN_BOUND characters and at least MIN_TEXT_CHARS, keeps every token a context can
# hold (a WordPiece token spans at most 100 characters of a word, plus the space after it) unless the text holds
# whitespace runs or HTML entities of thousands of characters; untruncated counts (count_tokens, tokenize) look
# at the first MAX_TEXT_CHARS.
CHARS_PER_TOKEN_BOUND = 128
MIN_TEXT_CHARS = 1 << 16
MAX_TEXT_CHARS = 1 << 20
ASSETS = Path(__file__).resolve().parent / "assets"


def clean_text(text: str) -> str:
    """open_clip's HF-tokenizer text cleaning: ftfy.fix_text, HTML-unescape twice, collapse whitespace, strip.

    ``str.split()`` splits on every Unicode whitespace character (NBSP, thin spaces, line separators);
    zero-width characters are not whitespace and are left to the BERT normalizer.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


def check_context_length(value, what: str = "context_length") -> int:
    """``value`` as an int if it is an integer in [2, MAX_CONTEXT_LENGTH] ([CLS] and [SEP] need 2), else
    ConfigError naming ``what``."""
    n = None
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            n = operator.index(value)  # int, numpy and torch integers
    if n is None or not 2 <= n <= MAX_CONTEXT_LENGTH:
        raise ConfigError(f"{what}={value!r} must be an integer from 2 ([CLS] and [SEP]) to {MAX_CONTEXT_LENGTH}")
    return n


def check_train_options(vocab_size, min_frequency, context_length, *, prefix: str = "") -> None:
    """Validate ``Tokenizer.train``'s options (``prefix``: "--" to name them as command-line flags)."""
    def name(n: str) -> str:
        return prefix + (n.replace("_", "-") if prefix else n)

    lo = len(SPECIAL_TOKENS) + 1
    if not is_int(vocab_size) or not lo <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(f"{name('vocab_size')}={vocab_size!r} must be an integer from {lo} to {MAX_VOCAB_SIZE}")
    if not is_int(min_frequency) or not 0 <= min_frequency <= MAX_MIN_FREQUENCY:
        raise ConfigError(f"{name('min_frequency')}={min_frequency!r} must be an integer from 0 to "
                          f"{MAX_MIN_FREQUENCY}")
    check_context_length(context_length, name("context_length"))


def _read_vocab(path: Path) -> dict[str, int]:
    # Same rule as the Rust WordPiece loader (tokenizers): one token per line, trailing whitespace
    # trimmed, id = line number. A UTF-8 byte-order mark (Windows editors write one) is not part of the first
    # token; a repeated token is refused (the loaders keep its last line, so its first id would never be produced
    # and every special token after it would move).
    vocab: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            for i, line in enumerate(f):
                tok = line.rstrip()
                if tok in vocab:
                    raise ConfigError(f"vocabulary {path}: token {tok!r} on line {i + 1} repeats line "
                                      f"{vocab[tok] + 1}; every token must appear once")
                vocab[tok] = i
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read vocabulary {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read vocabulary {path}: {e.strerror or e}") from None
    return vocab


def check_save_folder(folder: str | os.PathLike) -> Path:
    """Check that ``Tokenizer.save(folder)`` can put its files there (cheap: call it before training):
    ``FileExistsError`` (EEXIST, naming it, as ``mkdir`` would raise) when ``folder`` or a parent is a file,
    ConfigError when its ``vocab.txt`` or ``bmclip_tokenizer.json`` exists but is not a regular file."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(p))
            break
    for name in ("vocab.txt", CONFIG_NAME):
        t = folder / name
        if (t.exists() or t.is_symlink()) and not t.is_file():
            raise ConfigError(f"cannot write {t}: it exists and is not a regular file (a folder?)")
    return folder


class Tokenizer:
    """Callable: ``tok(texts) -> LongTensor (B, context_length)`` of WordPiece ids, 0-padded."""

    def __init__(self, vocab: dict[str, int], context_length: int = DEFAULT_CONTEXT_LENGTH, clean: bool = True):
        if not isinstance(clean, bool):
            raise ConfigError(f"clean={clean!r} must be True or False")
        context_length = check_context_length(context_length)
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

    def _prepare(self, texts: list[str], length: int | None = None) -> list[str]:
        """Texts cut to the character budget of ``length`` tokens (module constants), then cleaned."""
        limit = MAX_TEXT_CHARS if length is None else max(MIN_TEXT_CHARS, length * CHARS_PER_TOKEN_BOUND)
        texts = [t[:limit] for t in texts]
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
        cfg = None
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
        if "context_length" in saved and saved["context_length"] is not None:
            check_context_length(saved["context_length"], f"{cfg}: context_length")
        if "clean" in saved and not isinstance(saved["clean"], bool):
            raise ConfigError(f"{cfg}: clean={saved['clean']!r} must be true or false")
        vocab = _read_vocab(path)
        want = saved.get("vocab_size")
        if want is not None:
            if not is_int(want) or want < 1:
                raise ConfigError(f"{cfg}: vocab_size={want!r} must be a positive integer")
            if want != len(vocab):
                raise ConfigError(f"{path} has {len(vocab)} tokens but {cfg} says vocab_size {want}: the two files "
                                  "do not belong together (truncated or replaced vocab.txt?)")
        ctx = context_length if context_length is not None else (saved.get("context_length") or DEFAULT_CONTEXT_LENGTH)
        cl = clean if clean is not None else saved.get("clean", True)
        return cls(vocab, ctx, clean=cl)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 30522,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        min_frequency: int = 2,
        clean: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> Tokenizer:
        """Train an uncased WordPiece vocabulary (at most ``vocab_size`` tokens) from an iterable of texts
        (cleaned with ``clean_text`` first when ``clean``, as the returned tokenizer will clean its input).

        The options are checked before any text is read. ``texts`` is read in this process and the Rust trainer
        runs in a child process (see ``_train_in_worker``), so a KeyboardInterrupt (Ctrl-C, or bmclip's
        SIGTERM handler) stops the call at once instead of when the trainer finishes; an exception raised by
        ``texts`` propagates as it is. ``log`` (optional) is told when the texts are read and the merges start.
        """
        check_train_options(vocab_size, min_frequency, context_length)
        if not isinstance(clean, bool):
            raise ConfigError(f"clean={clean!r} must be True or False")
        vocab = _train_in_worker(texts, vocab_size, min_frequency, clean, log)
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
        length = self.context_length if context_length is None else check_context_length(context_length)
        if not texts:
            return torch.zeros(0, length, dtype=torch.long)
        encs = self._for_length(length).encode_batch(self._prepare(texts, length))
        return torch.from_numpy(np.array([e.ids for e in encs], dtype=np.int64))

    def encode_batch_lengths(self, texts: list[str], context_length: int | None = None) -> list[int]:
        """Unpadded token counts (with [CLS]/[SEP], after truncation to the context length)."""
        length = self.context_length if context_length is None else check_context_length(context_length)
        encs = self._for_length(length).encode_batch(self._prepare(list(texts), length))
        return [sum(e.attention_mask) for e in encs]

    def count_tokens(self, text: str) -> int:
        """Number of WordPiece tokens of one text (its first MAX_TEXT_CHARS characters), without special tokens or
        truncation (== len(tokenize(text)))."""
        return len(self._base.encode(self._prepare([text])[0], add_special_tokens=False))

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of one text (its first MAX_TEXT_CHARS characters), without special tokens or
        truncation."""
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
        """Write ``vocab.txt`` and ``bmclip_tokenizer.json`` (context length, casing, cleaning) into ``folder``.

        The two files are one set: both are written to temp files first (nothing is replaced when that fails),
        then the old ``bmclip_tokenizer.json`` is removed, ``vocab.txt`` renamed into place and the json renamed
        last (``bmclip.io.atomic.replace_as_set``). Whatever stops the save, the folder never holds a new vocab.txt
        beside an old json (at worst a new vocab.txt without json, which ``from_vocab`` reads as a bare vocabulary).
        """
        folder = check_save_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "bmclip-wordpiece-1",
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "lowercase": True,
            "clean": self.clean,
            "special_tokens": list(SPECIAL_TOKENS),
        }
        vocab_path, cfg_path = folder / "vocab.txt", folder / CONFIG_NAME
        vocab_text = "".join(t + "\n" for t in self.vocab_lines())
        with temp_file_beside(vocab_path, "w") as (fv, tmp_v), temp_file_beside(cfg_path, "w") as (fc, tmp_c):
            for f, text, target in ((fv, vocab_text, vocab_path), (fc, json.dumps(meta, indent=2), cfg_path)):
                try:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as e:
                    raise OSError(e.errno, e.strerror, str(target)) from None
            fv.close()
            fc.close()
            replace_as_set([(tmp_v, vocab_path), (tmp_c, cfg_path)], marker=cfg_path)

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


def _new_trainer(vocab_size: int, min_frequency: int):
    """(untrained HF WordPiece tokenizer, its WordPieceTrainer) with the BERT-uncased pipeline."""
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
    return hf, trainer


def _train_worker_main(result_fd: int) -> None:
    """The training worker process (started by ``_train_in_worker``): reads the pickled options, then pickled
    lists of texts up to ``None`` from stdin, trains, and writes ``{"vocab": ...}`` or ``{"error": ...}`` as
    JSON to ``result_fd``. It runs in its own session and ignores SIGINT: the parent handles Ctrl-C and SIGTERM
    and kills this process; if the parent dies, its end of the pipes closes and this process ends."""
    import pickle
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp = sys.stdin.buffer
    try:
        opts = pickle.load(inp)
        hf, trainer = _new_trainer(opts["vocab_size"], opts["min_frequency"])

        def texts():
            while (chunk := pickle.load(inp)) is not None:
                for t in chunk:
                    if opts["clean"]:
                        t = clean_text(t)
                    if t.strip():
                        yield t

        hf.train_from_iterator(texts(), trainer)
        res = {"vocab": hf.get_vocab()}
    except BaseException as e:  # reported to the parent, which raises
        res = {"error": f"{type(e).__name__}: {e}"}
    with os.fdopen(result_fd, "w", encoding="utf-8") as f:
        json.dump(res, f)


# The worker imports this very bmclip (argv[2], its parent folder, first on sys.path; not the current directory).
_WORKER_CODE = ("import sys; sys.path[:] = [sys.argv[2]] + [p for p in sys.path if p]; "
                "from bmclip.tokenizer import _train_worker_main; _train_worker_main(int(sys.argv[1]))")
_CHUNK_TEXTS = 1024


def _train_in_worker(texts: Iterable[str], vocab_size: int, min_frequency: int, clean: bool,
                     log: Callable[[str], None] | None = None) -> dict[str, int]:
    """Train in a child process fed through a pipe; returns the vocabulary.

    The Rust trainer does not return to Python until it is done, so in this process a Ctrl-C or SIGTERM would
    wait for it (seconds to minutes); and a thread running it cannot be abandoned safely (at interpreter exit
    the thread is torn down inside Rust code and the process aborts). In a child process it is simply killed:
    a KeyboardInterrupt (or bmclip's Terminated) raised here while texts are read or the result is awaited
    kills the worker and propagates at once. The texts are read here (an exception from ``texts`` propagates
    the same way) and cleaned in the worker, in parallel with the reading.
    """
    import pickle
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    r, w = os.pipe()
    try:
        # Its own session: a Ctrl-C at the terminal reaches only this process, which kills the worker.
        proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE, str(w), root], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, pass_fds=(w,), start_new_session=True)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        with os.fdopen(r, "rb") as result:
            try:
                pickle.dump({"vocab_size": vocab_size, "min_frequency": min_frequency, "clean": clean}, proc.stdin)
                chunk: list[str] = []
                n = 0
                for t in texts:
                    if isinstance(t, str):
                        n += 1
                        chunk.append(t)
                        if len(chunk) >= _CHUNK_TEXTS:
                            pickle.dump(chunk, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                            chunk = []
                if chunk:
                    pickle.dump(chunk, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                pickle.dump(None, proc.stdin)
                proc.stdin.close()
                if log is not None:
                    log(f"read {n} texts; training a WordPiece vocabulary of up to {vocab_size} tokens")
            except BrokenPipeError:
                pass  # the worker is gone: its result, or its exit status, says why
            data = result.read()
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        res = json.loads(data) if data else {}
    except ValueError:
        res = {}
    if "vocab" in res:
        return res["vocab"]
    why = res.get("error") or f"the worker process ended with exit status {rc} and no result"
    raise ConfigError(f"tokenizer training failed: {why}")


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
