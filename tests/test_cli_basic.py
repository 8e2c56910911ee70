"""CLI: help for every subcommand, the default embed end-to-end run, tokenizer train/encode, convert."""

import io
import re
import subprocess
import sys
import tarfile

import pytest
import torch
import torch.nn.functional as F

from bmclip.cli import build_parser, main
from bmclip.errors import ConfigError
from bmclip.model import create_model
from bmclip.tokenizer import get_tokenizer

MINE = ("demo", "embed", "tokenizer", "convert")


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in MINE:
        assert name in out
    for name in MINE:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--help"])


def _matrix(out: str, title: str) -> torch.Tensor:
    block = out.split(title + ":")[1].splitlines()[2:6]
    return torch.tensor([[float(v) for v in re.findall(r"-?\d+\.\d{4}", ln)] for ln in block])


def test_embed_default_matches_python_api(capsys):
    assert main(["embed"]) == 0
    out = capsys.readouterr().out
    sim, probs = _matrix(out, "cosine similarity"), _matrix(out, "P(caption | image)")
    assert sim.shape == (4, 4) and probs.shape == (4, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(4), atol=5e-4, rtol=0)

    # Independent recomputation through the Python API with the same seed and bundled data.
    from bmclip.cli.embed import bundled_samples
    from bmclip.model import create_model
    from bmclip.model.transforms import load_image
    from bmclip.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = create_model("tiny").eval()
    paths, caps = bundled_samples()
    pix = torch.stack([load_image(p, 64) for p in paths])
    ids = get_tokenizer(context_length=64)(caps)
    with torch.no_grad():
        ref = F.normalize(model.encode_image(pix), dim=-1) @ F.normalize(model.encode_text(ids), dim=-1).T
    torch.testing.assert_close(sim, ref, atol=6e-5, rtol=0)


def test_embed_errors_are_clean(tmp_path, capsys):
    assert main(["embed", "--images", str(tmp_path / "missing.jpg")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["embed", "--preset", "nope"]) == 2
    assert "unknown model preset" in capsys.readouterr().err
    for blank in ("  ", "\x01\x02", "\u200b"):  # blank, control or zero-width only: no token to embed
        assert main(["embed", "--captions", "a chest x-ray", blank]) == 2
        assert "--captions: caption 1 is empty after tokenization" in capsys.readouterr().err
    for dev, why in (("bogus", "not a torch device"), ("meta", "holds no data"), ("cuda:7", "CUDA")):
        assert main(["embed", "--device", dev]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"bmclip embed: error: --device {dev}") or err.startswith(
            f"bmclip embed: error: --device '{dev}'"), err
        assert why in err and len(err.splitlines()) == 1, err
    assert main(["embed", "--seed", str(2**80)]) == 2
    assert "--seed 1208925819614629174706176: out of range" in capsys.readouterr().err


def test_a_model_file_without_its_tokenizer_says_which_one_is_used(tmp_path, capsys):
    """A bare model file carries no tokenizer: embed and eval say they use the bundled one (a wrong tokenizer
    gives plausible but meaningless scores); with the model's vocab.txt beside it, it is used without a note. An
    open_clip folder without vocab.txt is refused by eval as by embed (never the bundled tokenizer)."""
    from bmclip.eval.models import load_model, model_tokenizer
    from bmclip.io.model_file import save_model
    from bmclip.resolve import ModelSource

    m = create_model("tiny")
    save_model(m, tmp_path / "m.pt")
    assert main(["embed", "--checkpoint", str(tmp_path / "m.pt")]) == 0
    err = capsys.readouterr().err
    assert "note: model file " in err and "ships no vocab.txt" in err and "using the bundled tokenizer" in err, err
    get_tokenizer().save(tmp_path)  # the model's tokenizer beside it
    load_model(str(tmp_path / "m.pt"))
    assert "note:" not in capsys.readouterr().err
    oc = tmp_path / "oc"
    oc.mkdir()
    source = ModelSource("open_clip", oc, None, f"open_clip folder {oc}")
    with pytest.raises(ConfigError, match=r"no vocab\.txt in .*oc: pass --vocab"):
        model_tokenizer(m, source)
    assert model_tokenizer(m, source, tmp_path / "vocab.txt").vocab_size == get_tokenizer().vocab_size


def _write_shard(path, captions):
    with tarfile.open(path, "w") as tf:
        for i, c in enumerate(captions):
            for ext, data in (("txt", c.encode()), ("jpg", b"\xff\xd8not really")):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_tokenizer_train_and_encode(tmp_path, capsys):
    from bmclip.tokenizer import Tokenizer

    caps = [f"Fluorescence micrograph of HeLa cells stained for tubulin, panel {i}." for i in range(50)]
    caps += ["Kaplan-Meier survival curves of patients with high and low expression."] * 20
    txt = tmp_path / "captions.txt"
    txt.write_text("\n".join(caps[:30]) + "\n\n")
    for k, part in enumerate((caps[30:50], caps[50:])):
        _write_shard(tmp_path / f"shard-{k:03d}.tar", part)
    shard = tmp_path / "shard-{000..001}.tar"  # a brace pattern, as in webdataset shard specs
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(txt), str(shard), "--vocab-size", "300",
                 "--context-length", "32", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "trained on 70 texts" in printed and "above --vocab-size" not in printed
    # a target below what the special tokens and the characters seen need: kept, and the output says why
    assert main(["tokenizer", "train", "--input", str(txt), "--vocab-size", "10", "--out", str(tmp_path / "t2")]) == 0
    n = Tokenizer.from_vocab(tmp_path / "t2").vocab_size
    assert n > 10 and f"vocabulary of {n} (above --vocab-size 10: the special tokens and the characters seen" \
        in capsys.readouterr().out

    tok = Tokenizer.from_vocab(out)
    assert tok.context_length == 32 and tok.vocab_size <= 300
    assert tok.tokenize("fluorescence micrograph") == ["fluorescence", "micrograph"]
    assert main(["tokenizer", "encode", "--vocab", str(out), "HeLa cells"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "hela cells"
    assert lines[1].split()[0] == str(tok.cls_id) and lines[1].split()[-1] == str(tok.sep_id)
    assert main(["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2


def test_convert_from_open_clip_and_refusal(tmp_path, capsys):
    from bmclip.interop import WEIGHTS_NAME, open_clip_state_dict
    from bmclip.io.model_file import save_state_dict
    from bmclip.model import create_model
    from bmclip.model.file import load_model

    torch.manual_seed(0)
    # 64-wide heads so the shapes-only open_clip file (no config json) describes it exactly.
    model = create_model("tiny", vision={"heads": 2}, text={"heads": 2}).eval()
    oc_dir = tmp_path / "oc"
    save_state_dict(open_clip_state_dict(model), oc_dir / WEIGHTS_NAME)
    for suffix in (".pt", ".safetensors"):
        ckpt = tmp_path / f"model{suffix}"
        assert main(["convert", "--from-open-clip", str(oc_dir), "--out", str(ckpt)]) == 0
        back = load_model(ckpt)
        sd0, sd1 = model.state_dict(), back.state_dict()
        assert set(sd0) == set(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    # embed runs on both kinds of checkpoint; an open_clip folder without vocab.txt needs --vocab.
    from bmclip.tokenizer import bundled_vocab_path

    assert main(["embed", "--checkpoint", str(tmp_path / "model.pt")]) == 0
    assert main(["embed", "--open-clip", str(oc_dir)]) == 2
    assert "--vocab" in capsys.readouterr().err
    assert main(["embed", "--open-clip", str(oc_dir), "--vocab", str(bundled_vocab_path())]) == 0
    # The tiny ViT is no timm model: open_clip could not build it, so export refuses cleanly.
    capsys.readouterr()
    assert main(["convert", "--to-open-clip", str(tmp_path / "model.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "timm" in capsys.readouterr().err


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "bmclip", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "embed" in r.stdout
    assert build_parser() is not None


def test_version_flag(capsys):
    from bmclip import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"bmclip {__version__}"


def _command_paths(parser, prefix=()):
    """Every (sub)command path of the CLI, nested ones included: ('eval', 'retrieval'), ..."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _command_paths(sub, (*prefix, name))


def test_every_help_text_is_plain_text(capsys):
    # The help texts come from the modules' reStructuredText docstrings: what the terminal shows carries no
    # ``literal`` quotes and no "Label::" literal-block markers.
    paths = sorted(_command_paths(build_parser()))
    assert ("build-dataset",) in paths and ("eval", "retrieval") in paths and len(paths) >= 12
    for path in [(), *paths]:
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: bmclip"), path
        assert "``" not in out and "::" not in out, (path, out)
    with pytest.raises(SystemExit):
        main(["build-dataset", "--help"])
    out = capsys.readouterr().out
    assert "bmclip build-dataset: PMC OA packages" in out and "Forms:\n" in out
    assert "    bmclip build-dataset merge STAGING... --output DIR" in out  # the indented block is kept


def test_plain_help_rules():
    from bmclip.cli._text import plain_help

    doc = '''``bmclip x``: see :mod:`~bmclip.data.pmc` and :func:`bmclip.cli.main`.

Forms::

    bmclip x A::B   # an indented "::" inside an example stays
Paragraph ending in a lone marker ::

    code
'''
    assert plain_help(doc) == (
        "bmclip x: see bmclip.data.pmc and bmclip.cli.main.\n\nForms:\n\n"
        "    bmclip x A::B   # an indented \"::\" inside an example stays\n"
        "Paragraph ending in a lone marker\n\n    code"
    )
