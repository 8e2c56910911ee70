"""`bmclip tokenizer train`: bad inputs and options are one-line errors or counted skips, checked before training;
the saved vocab.txt / bmclip_tokenizer.json stay one set; an interrupt stops training at once."""

import gzip
import io
import os
import queue
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from bmclip.cli import main

CAPTIONS = [f"Fluorescence micrograph of HeLa cells stained for tubulin, panel {i}." for i in range(40)]


def _train(capsys, *args):
    rc = main(["tokenizer", "train", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _text_file(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_save_target_that_is_a_folder_keeps_the_old_set_and_names_the_path(tmp_path, capsys):
    out = tmp_path / "tok"
    txt = _text_file(tmp_path / "c.txt", CAPTIONS)
    assert _train(capsys, "--input", txt, "--vocab-size", "200", "--out", out)[0] == 0
    old_vocab = (out / "vocab.txt").read_bytes()
    (out / "bmclip_tokenizer.json").unlink()
    (out / "bmclip_tokenizer.json").mkdir()
    other = _text_file(tmp_path / "d.txt", ["completely different words: kidney biopsy glomeruli"] * 30)
    rc, _, err = _train(capsys, "--input", other, "--vocab-size", "100", "--out", out)
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{out / 'bmclip_tokenizer.json'}" in err and ".tmp" not in err, err
    assert (out / "vocab.txt").read_bytes() == old_vocab  # the old vocabulary is not replaced
    assert sorted(p.name for p in out.iterdir()) == ["bmclip_tokenizer.json", "vocab.txt"]  # no temp files


def test_compressed_and_binary_inputs_are_refused_and_bad_lines_counted(tmp_path, capsys):
    txt = _text_file(tmp_path / "c.txt", CAPTIONS)
    gz = tmp_path / "c.txt.gz"
    gz.write_bytes(gzip.compress(txt.read_bytes()))
    out = tmp_path / "tok"
    rc, _, err = _train(capsys, "--input", gz, "--out", out)
    assert rc == 2 and "gzip" in err and str(gz) in err, err
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 20)
    rc, _, err = _train(capsys, "--input", binary, "--out", out)
    assert rc == 2 and "binary" in err and str(binary) in err, err
    assert not out.exists()

    # A text file with a few Latin-1 lines: those are skipped and counted, the UTF-8 ones trained on.
    lines = [c.encode() for c in CAPTIONS] + ["caf\xe9 na\xefve".encode("latin-1")] * 3
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"\n".join(lines) + b"\n")
    good = sum(1 for b in lines if _decodes(b))
    assert good == len(CAPTIONS)
    rc, printed, _ = _train(capsys, "--input", mixed, "--vocab-size", "200", "--out", out)
    assert rc == 0
    assert f"trained on {good} texts" in printed and "skipped_not_utf8=3" in printed, printed
    # A file that is mostly not UTF-8 is refused, not trained on as mojibake.
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"\n".join(["r\xe9sum\xe9 d'\xe9t\xe9 n\xb0 %d".encode("latin-1") % i for i in range(50)]))
    rc, _, err = _train(capsys, "--input", latin, "--out", tmp_path / "tok2")
    assert rc == 2 and "not UTF-8" in err and str(latin) in err, err


def _decodes(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_truncated_shard_is_reported_by_name(tmp_path, capsys):
    shard = tmp_path / "shard-000.tar"
    caps = [f"Panel {i}: immunostaining of cortical neurons in section {i}." for i in range(64)]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, c in enumerate(caps):
            for ext, data in (("txt", c.encode()), ("jpg", os.urandom(900))):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tf:
        first_header = {}  # sample index -> offset of its first member's header
        for m in tf:
            first_header.setdefault(int(m.name[1:5]), m.offset)
    cut = shard.stat().st_size // 2
    with open(shard, "r+b") as f:
        f.truncate(cut)
    # Independent count: a sample is complete when the header of the next sample lies wholly before the cut.
    complete = sum(1 for i in range(63) if first_header[i + 1] + 512 <= cut)
    assert 20 < complete < 40
    rc, printed, err = _train(capsys, "--input", shard, "--vocab-size", "200", "--out", tmp_path / "tok")
    assert rc == 0
    assert f"trained on {complete} texts" in printed and "truncated=1" in printed, printed
    assert str(shard) in err and "truncated" in err, err


def test_bad_options_and_inputs_fail_before_training(tmp_path, capsys, monkeypatch):
    from bmclip.tokenizer import Tokenizer

    def no_training(*a, **k):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(Tokenizer, "train", no_training)
    txt = _text_file(tmp_path / "c.txt", CAPTIONS)
    out = tmp_path / "tok"
    cases = [
        (["--context-length", "1"], "--context-length"),
        (["--context-length", str(10**20)], "--context-length"),
        (["--context-length", str(10**9)], "--context-length"),
        (["--vocab-size", str(10**20)], "--vocab-size"),
        (["--vocab-size", "3"], "--vocab-size"),
        (["--min-frequency", "-3"], "--min-frequency"),
    ]
    for extra, flag in cases:
        rc, _, err = _train(capsys, "--input", txt, "--out", out, *extra)
        assert rc == 2 and flag in err and err.count("\n") == 1, (extra, err)
    rc, _, err = _train(capsys, "--input", tmp_path, "--out", out)
    assert rc == 2 and "is a folder" in err and "not found" not in err, err
    rc, _, err = _train(capsys, "--input", txt, tmp_path / "nope.txt", "--out", out)
    assert rc == 2 and "nope.txt" in err, err
    assert not out.exists()
    # The encode side bounds the context length too (it used to overflow or panic in Rust).
    assert main(["tokenizer", "encode", "--context-length", str(10**20), "cells"]) == 2
    assert "--context-length" in capsys.readouterr().err


def _slow_corpus(path: Path, lines: int = 60000) -> None:
    r = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(" ".join("".join(r.choices(letters, k=r.randint(4, 12))) for _ in range(12)) + "\n")


@pytest.mark.slow  # ~3.5 s each: several seconds of reading and merges before the signal
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_stops_training_promptly_and_writes_nothing(tmp_path, sig):
    corpus = tmp_path / "rand.txt"
    _slow_corpus(corpus)  # many distinct words: several seconds of Rust merges for a 30000 vocabulary
    out = tmp_path / "tok"
    p = subprocess.Popen([sys.executable, "-m", "bmclip", "tokenizer", "train", "--input", str(corpus),
                          "--vocab-size", "30000", "--min-frequency", "0", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in p.stderr], daemon=True)
    reader.start()
    seen = []
    while not any("training a WordPiece vocabulary" in x for x in seen):  # the Rust merges have started
        try:
            seen.append(lines.get(timeout=60))
        except queue.Empty:
            p.kill()
            raise AssertionError(f"no 'training' line within 60 s: {seen}") from None
    time.sleep(0.5)
    assert p.poll() is None, "training ended before the signal: this test needs a slower corpus"
    p.send_signal(sig)
    t0 = time.monotonic()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    waited = time.monotonic() - t0
    reader.join(10)
    err = "".join(seen) + "".join(lines.queue)
    assert p.returncode == 128 + sig, err
    assert waited < 1.5, f"exited {waited:.1f}s after the signal"
    assert "Traceback" not in err and "FATAL" not in err, err
    assert not out.exists()
