"""The routes a model takes between its forms (open_clip folder, model file, checkpoint, run dir) and what travels
with it: ``bmclip convert`` never writes over what it reads, the tokenizer goes along with the weights both ways,
a run dir resolves to one whole checkpoint while a training run prunes it, ``map_location`` means what it means to
torch.load on every route, and ``bmclip embed`` tells images with the same file name apart."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_open_clip_interop import _tiny_open_clip_config

from bmclip import interop
from bmclip.cli import main
from bmclip.errors import CheckpointError, ConfigError
from bmclip.interop import (
    BIOMEDBERT,
    CONFIG_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_open_clip,
    open_clip_state_dict,
)
from bmclip.io.model_file import read_model_file, save_model, save_state_dict
from bmclip.model import create_model
from bmclip.tokenizer import SPECIAL_TOKENS, Tokenizer, bundled_vocab_path, get_tokenizer
from bmclip.train.checkpoint import CheckpointWriter

TEXTS = ["word3 word7 word1", "word12 and word5", "a chest x-ray"]


def _model(seed=0):
    """A tiny model with 64-wide heads: its open_clip weights alone describe it exactly."""
    torch.manual_seed(seed)
    return create_model("tiny", vision={"heads": 2}, text={"heads": 2}).eval()


def _tokenizer(n_words, context_length=64, first=0):
    words = [*SPECIAL_TOKENS, *(f"word{i}" for i in range(first, first + n_words))]
    return Tokenizer({w: i for i, w in enumerate(words)}, context_length)


def _open_clip_folder(folder, model, tok=None, weights=WEIGHTS_NAME):
    save_state_dict(open_clip_state_dict(model), folder / weights)
    if tok is not None:
        tok.save(folder)
    return folder


def _checkpoint(root, step, model, tok):
    w = CheckpointWriter(root, step)
    w.begin()
    w.write_rank({"rng": {}, "loader": {}})
    w.write_main(model.state_dict(), model.config.to_dict(), {"step": step}, tokenizer=tok)
    return w.commit()


def _snapshot(root):
    """Every path under ``root`` with its file's identity (an atomic write renames a new inode into place)."""
    def ident(p):
        st = p.stat()
        return (st.st_ino, st.st_size, st.st_mtime_ns) if p.is_file() else None

    return {str(p.relative_to(root)): ident(p) for p in sorted(root.rglob("*")) if not p.is_symlink()}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------------------
# convert never writes over what it reads


def test_convert_refuses_to_write_over_or_into_its_input(tmp_path, capsys):
    """An --out that is the input, its tokenizer, or lies inside the open_clip folder / checkpoint dir / run dir
    being read is refused in one line before anything is loaded or written (it used to replace the open_clip
    weights with a bmclip model file, exit 0); so is a model file written into another checkpoint dir or open_clip
    folder, and an export folder that is or contains the input. A model file beside another is fine."""
    m, tok = _model(), _tokenizer(20, first=0)
    oc = _open_clip_folder(tmp_path / "oc", m, tok)
    oc_st = _open_clip_folder(tmp_path / "oc_st", m, tok, weights=SAFETENSORS_WEIGHTS_NAME)
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints", 3, m, tok)
    run = tmp_path / "run"
    other = _checkpoint(tmp_path / "other" / "checkpoints", 1, m, tok)
    mf = tmp_path / "mf"
    mf.mkdir()
    save_model(m, mf / "m.pt")
    tok.save(mf)
    mf2 = tmp_path / "mf2"  # a folder holding a model.pt (and no meta.json): that model file
    mf2.mkdir()
    save_model(m, mf2 / "model.pt")
    (tmp_path / "link").symlink_to(oc)
    export = tmp_path / "export"  # an earlier export (what check_export_folder lets an export replace)
    save_state_dict(open_clip_state_dict(m), export / WEIGHTS_NAME)
    (export / CONFIG_NAME).write_text(json.dumps({"model_cfg": {}, "bmclip": {"model_config": m.config.to_dict()}}))
    cases = [
        (["--from-open-clip", oc, "--out", oc / WEIGHTS_NAME], "inside"),
        (["--from-open-clip", oc, "--out", oc / "model.pt"], "inside"),
        (["--from-open-clip", oc, "--out", oc / "vocab.txt"], "inside"),
        (["--from-open-clip", oc, "--out", oc / "sub" / "m.pt"], "inside"),
        (["--from-open-clip", oc / WEIGHTS_NAME, "--out", oc / WEIGHTS_NAME], "the input"),
        (["--from-open-clip", oc_st, "--out", oc_st / SAFETENSORS_WEIGHTS_NAME], "inside"),
        (["--from-open-clip", oc, "--out", tmp_path / "link" / WEIGHTS_NAME], "inside"),
        (["--from-open-clip", tmp_path / "link", "--out", oc / "m.safetensors"], "inside"),
        (["--from-open-clip", ckpt, "--out", ckpt / "model.pt"], "inside"),
        (["--from-open-clip", ckpt / "model.pt", "--out", ckpt / "model.pt"], "the input"),
        (["--from-open-clip", run, "--out", run / "model.pt"], "inside"),
        (["--from-open-clip", run, "--out", ckpt / "model.pt"], "inside"),
        (["--from-open-clip", mf / "m.pt", "--out", mf / "m.pt"], "the input"),
        (["--from-open-clip", mf2, "--out", mf2 / "model.pt"], "the input"),
        (["--from-open-clip", mf2, "--out", mf2 / "bmclip_tokenizer.json"], "the tokenizer (bmclip_tokenizer.json)"),
        (["--from-open-clip", mf / "m.pt", "--out", mf / "vocab.txt"], "the tokenizer (vocab.txt) of the input"),
        (["--from-open-clip", mf / "m.pt", "--out", other / "model.pt"], "a training checkpoint dir"),
        (["--from-open-clip", mf / "m.pt", "--out", oc_st / "m.pt"], "an open_clip folder"),
        (["--to-open-clip", export, "--out", export], "is the input"),
        (["--to-open-clip", export / WEIGHTS_NAME, "--out", export], "contains the input"),
    ]
    before = _snapshot(tmp_path)
    for argv, needle in cases:
        argv = [str(a) for a in argv]
        capsys.readouterr()
        assert main(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("bmclip convert: error: --out ") and needle in err and err.count("\n") == 1, (argv, err)
        assert _snapshot(tmp_path) == before, argv  # nothing written, nothing removed
    assert _same_weights(load_open_clip(oc), m) and _same_weights(load_open_clip(oc_st), m)

    # a model file input: another file in its folder is fine, and its tokenizer (the same) is left as it is
    assert main(["convert", "--from-open-clip", str(mf / "m.pt"), "--out", str(mf / "m.safetensors")]) == 0
    assert sorted(p.name for p in mf.iterdir()) == ["bmclip_tokenizer.json", "m.pt", "m.safetensors", "vocab.txt"]
    assert _snapshot(mf)["vocab.txt"] == before["mf/vocab.txt"]
    _, sd = read_model_file(mf / "m.safetensors")
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


# ------------------------------------------------------------------------------------------------------------
# the tokenizer travels with the weights


def test_from_open_clip_writes_the_tokenizer_where_the_model_file_route_finds_it(tmp_path, capsys):
    """open_clip folder with its own vocabulary -> model file -> every command reads the model file with that
    vocabulary (it used to fall back to the bundled one, whose ids mean other words)."""
    from bmclip.eval.models import load_model as eval_load_model

    m, tok = _model(), _tokenizer(30, context_length=40)
    oc = _open_clip_folder(tmp_path / "oc", m, tok)
    out = tmp_path / "m" / "model.pt"
    assert main(["convert", "--from-open-clip", str(oc), "--out", str(out)]) == 0
    assert (out.parent / "vocab.txt").read_text() == (oc / "vocab.txt").read_text()
    ctx = m.config.text.context_length
    want = tok(TEXTS, context_length=ctx)  # the source's tokenizer, at the model's context length
    assert not torch.equal(want, get_tokenizer(None, context_length=ctx)(TEXTS))  # the bundled one differs
    model, got = eval_load_model(out)
    assert _same_weights(model, m) and torch.equal(got(TEXTS), want)
    capsys.readouterr()
    assert main(["embed", "--checkpoint", str(out), "--captions", *TEXTS]) == 0
    assert "bundled" not in capsys.readouterr().err  # no fallback note: the tokenizer is there

    # the same tokenizer already there (a second format into the same folder): left as it is
    before = (out.parent / "vocab.txt").stat().st_mtime_ns
    assert main(["convert", "--from-open-clip", str(oc), "--out", str(out.parent / "model.safetensors")]) == 0
    assert (out.parent / "vocab.txt").stat().st_mtime_ns == before

    # --vocab ships that tokenizer instead (it used to be refused with --from-open-clip)
    assert main(["convert", "--from-open-clip", str(oc), "--out", str(tmp_path / "v" / "m.pt"), "--vocab",
                 str(bundled_vocab_path())]) == 0
    assert (tmp_path / "v" / "vocab.txt").read_text() == bundled_vocab_path().read_text()


def test_from_open_clip_refuses_to_put_a_model_beside_another_tokenizer(tmp_path, capsys):
    m = _model()
    oc = _open_clip_folder(tmp_path / "oc", m, _tokenizer(30))
    bare = _open_clip_folder(tmp_path / "bare", m)  # no vocab.txt
    theirs = tmp_path / "theirs"
    _tokenizer(30, first=100).save(theirs)  # as many tokens, other words
    cleanless = tmp_path / "cleanless"
    Tokenizer(_tokenizer(30).vocab, 64, clean=False).save(cleanless)
    cases = [(oc, theirs, "another tokenizer than the model's (other tokens)"),
             (oc, cleanless, "(clean=False, not True)"),
             (bare, theirs, "ships none: pass --vocab")]
    for src, folder, needle in cases:
        before = _snapshot(tmp_path)
        capsys.readouterr()
        assert main(["convert", "--from-open-clip", str(src), "--out", str(folder / "model.pt")]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert _snapshot(tmp_path) == before

    # no tokenizer anywhere: the model file is written alone, and stderr says so
    capsys.readouterr()
    assert main(["convert", "--from-open-clip", str(bare), "--out", str(tmp_path / "new" / "m.pt")]) == 0
    assert "ships no tokenizer" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["m.pt"]


def test_a_model_file_that_cannot_be_written_leaves_no_tokenizer_behind(tmp_path, monkeypatch):
    from bmclip.io import model_file

    m = _model()
    oc = _open_clip_folder(tmp_path / "oc", m, _tokenizer(30))

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_file, "atomic_torch_save", fail)
    assert main(["convert", "--from-open-clip", str(oc), "--out", str(tmp_path / "out" / "m.pt")]) == 1
    assert list((tmp_path / "out").iterdir()) == []


@pytest.fixture
def tiny_exportable(monkeypatch):
    """open_clip cannot build the tiny model: a config like an exportable model's stands in (as in
    test_open_clip_interop), for the file handling at 1.4M parameters instead of 130M."""
    monkeypatch.setattr(interop, "open_clip_config", _tiny_open_clip_config)


def test_to_open_clip_ships_the_tokenizer_or_refuses(tmp_path, capsys, tiny_exportable):
    """open_clip A (own vocabulary) -> model file -> open_clip B: B ships A's vocabulary and names it (it used to
    ship none and name BiomedBERT's). A model with no tokenizer is not exported under a guessed one."""
    m, tok = _model(), _tokenizer(30)
    a = _open_clip_folder(tmp_path / "A", m, tok)
    mfile = tmp_path / "m" / "model.pt"
    b = tmp_path / "B"
    assert main(["convert", "--from-open-clip", str(a), "--out", str(mfile)]) == 0
    assert main(["convert", "--to-open-clip", str(mfile), "--out", str(b)]) == 0
    assert (b / "vocab.txt").read_text() == (a / "vocab.txt").read_text()
    assert json.loads((b / CONFIG_NAME).read_text())["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == str(b.resolve())
    from bmclip.resolve import resolve_model

    back = resolve_model(b)
    assert _same_weights(back.model, m) and back.tokenizer.vocab == tok.vocab

    bare = tmp_path / "bare" / "m.pt"  # a model file with nothing beside it
    bare.parent.mkdir()
    save_model(m, bare)
    capsys.readouterr()
    assert main(["convert", "--to-open-clip", str(bare), "--out", str(tmp_path / "C")]) == 2
    err = capsys.readouterr().err
    assert "ships no tokenizer" in err and "--vocab" in err and err.count("\n") == 1, err
    assert not (tmp_path / "C").exists()
    assert main(["convert", "--to-open-clip", str(bare), "--out", str(tmp_path / "C"), "--vocab",
                 str(bundled_vocab_path())]) == 0
    cfg = json.loads((tmp_path / "C" / CONFIG_NAME).read_text())
    assert cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] != BIOMEDBERT
    assert (tmp_path / "C" / "vocab.txt").read_text() == bundled_vocab_path().read_text()


# ------------------------------------------------------------------------------------------------------------
# a run dir while its training prunes checkpoints


@pytest.fixture
def pruned_run(tmp_path):
    """A run dir holding step 1 of model 1 with tokenizer 1, and ``commit_and_prune()``: what the trainer does next
    with keep_last=1 (commit step 2, model 2 with tokenizer 2, then delete step 1)."""
    root = tmp_path / "run" / "checkpoints"
    models, toks = {1: _model(1), 2: _model(2)}, {1: _tokenizer(20, first=0), 2: _tokenizer(25, first=50)}
    _checkpoint(root, 1, models[1], toks[1])

    def commit_and_prune():
        _checkpoint(root, 2, models[2], toks[2])
        shutil.rmtree(root / "step_00000001")

    return {"run": tmp_path / "run", "models": models, "toks": toks, "commit_and_prune": commit_and_prune}


def test_a_run_dir_resolves_again_when_its_checkpoint_is_pruned_while_loading(pruned_run, monkeypatch):
    from bmclip import resolve

    real, calls = resolve.load_model, []

    def load_model(path, *a, **k):
        calls.append(Path(path).parent.name)
        if len(calls) == 1:  # the trainer commits step 2 and prunes step 1 just after step 1 was chosen
            pruned_run["commit_and_prune"]()
        return real(path, *a, **k)

    monkeypatch.setattr(resolve, "load_model", load_model)
    got = resolve.resolve_model(pruned_run["run"])
    assert calls == ["step_00000001", "step_00000002"]
    assert _same_weights(got.model, pruned_run["models"][2]) and "step 2" in got.description
    assert got.tokenizer.vocab == pruned_run["toks"][2].vocab  # the tokenizer of the same checkpoint


def test_the_tokenizer_comes_from_the_checkpoint_the_weights_came_from(pruned_run, monkeypatch):
    """Pruned between reading the weights and reading its vocab.txt: read again whole from the newest (it used to
    give step 1's weights with a tokenizer_dir that no longer exists, so every command failed)."""
    from bmclip import resolve

    real, calls = Tokenizer.from_vocab, []

    def from_vocab(path, *a, **k):
        calls.append(Path(path).name)
        if len(calls) == 1:
            pruned_run["commit_and_prune"]()
        return real(path, *a, **k)

    monkeypatch.setattr(Tokenizer, "from_vocab", staticmethod(from_vocab))
    got = resolve.resolve_model(pruned_run["run"])
    assert calls == ["step_00000001", "step_00000002"]
    assert _same_weights(got.model, pruned_run["models"][2]) and got.tokenizer.vocab == pruned_run["toks"][2].vocab


def test_a_resolved_checkpoint_keeps_its_tokenizer_after_it_is_pruned(pruned_run):
    """Pruned after resolve_model returned: the commands still tokenize with the checkpoint's tokenizer, read while
    the weights were (they used to read its vocab.txt later, from a folder that was gone)."""
    from bmclip.eval.models import model_tokenizer
    from bmclip.resolve import resolve_model

    got = resolve_model(pruned_run["run"])
    pruned_run["commit_and_prune"]()
    tok = model_tokenizer(got.model, got.source)
    ctx = got.model.config.text.context_length
    assert _same_weights(got.model, pruned_run["models"][1])
    assert torch.equal(tok(TEXTS), pruned_run["toks"][1](TEXTS, context_length=ctx))


def test_resolving_again_is_bounded_and_damage_is_reported_at_once(pruned_run, monkeypatch, tmp_path):
    from bmclip import resolve

    real, calls = resolve.load_model, []
    root = pruned_run["run"] / "checkpoints"

    def always_pruned(path, *a, **k):  # every newest checkpoint is pruned as it is read
        calls.append(path)
        step = int(Path(path).parent.name[5:])
        _checkpoint(root, step + 1, pruned_run["models"][1], pruned_run["toks"][1])
        shutil.rmtree(Path(path).parent)
        return real(path, *a, **k)

    monkeypatch.setattr(resolve, "load_model", always_pruned)
    with pytest.raises(CheckpointError) as e:
        resolve.resolve_model(pruned_run["run"])
    assert len(calls) == resolve.RUN_DIR_ATTEMPTS and "\n" not in str(e.value)

    calls.clear()
    monkeypatch.setattr(resolve, "load_model", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    newest = sorted(root.iterdir())[-1]
    raw = bytearray((newest / "model.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # damaged, same size: still "valid", its CRC32 is not
    (newest / "model.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        resolve.resolve_model(pruned_run["run"])
    assert calls == []  # refused by the CRC check before any load, once: no second attempt


# ------------------------------------------------------------------------------------------------------------
# map_location


def _forms():
    seen = []

    def record(storage, location):
        seen.append(location)
        return storage

    return [
        ("None", None), ("cpu", "cpu"), ("device", torch.device("cpu")), ("meta", "meta"),
        ("dict-other", {"cuda:0": "cpu"}), ("dict-meta", {"cpu": "meta"}),
        ("callable-None", lambda s, loc: None), ("callable-same", record), ("callable-clone", lambda s, loc: s.clone()),
    ], seen


def test_map_location_means_what_torch_load_makes_of_it_for_safetensors_too(tmp_path):
    """A .safetensors model file used to take only a device string (a dict, callable or 'meta' was reported as a
    bad file). Reference: torch.load of the same weights saved as .pt, with the same map_location."""
    m = create_model("tiny")
    save_model(m, tmp_path / "m.pt")
    save_model(m, tmp_path / "m.safetensors")
    forms, seen = _forms()
    for name, ml in forms:
        ref = torch.load(tmp_path / "m.pt", map_location=ml, weights_only=True)["model"]
        n_ref = len(seen)
        _, got = read_model_file(tmp_path / "m.safetensors", ml)
        assert set(got) == set(ref), name
        for k in ref:
            assert got[k].device == ref[k].device and got[k].dtype == ref[k].dtype, (name, k)
            assert got[k].shape == ref[k].shape, (name, k)
            if not ref[k].is_meta:
                assert torch.equal(got[k], ref[k]), (name, k)
        if name == "callable-same":
            assert set(seen) == {"cpu"} and len(seen) - n_ref == len(got)  # one call per tensor, tagged "cpu"


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_bad_map_location_is_an_argument_error_not_a_bad_file(tmp_path, suffix):
    from bmclip.model.file import load_model

    save_model(create_model("tiny"), tmp_path / f"m{suffix}")
    for ml, needle in (("nonsense", "is not a device"), (3.5, "or a callable), not a float"),
                       ({"cpu": 7}, "is not a device name")):
        with pytest.raises(ConfigError, match="map_location=") as e:
            load_model(tmp_path / f"m{suffix}", map_location=ml)
        assert needle in str(e.value) and "cannot read" not in str(e.value) and str(tmp_path) not in str(e.value)


def test_every_route_loads_onto_map_location(tmp_path):
    """resolve_model(..., map_location='meta') gave a CPU model for an open_clip folder (not passed on)."""
    from bmclip.resolve import resolve_model

    m = _model()
    save_model(m, tmp_path / "m.pt")
    save_model(m, tmp_path / "m.safetensors")
    _open_clip_folder(tmp_path / "oc", m)
    _open_clip_folder(tmp_path / "oc_st", m, weights=SAFETENSORS_WEIGHTS_NAME)
    for arg in ("m.pt", "m.safetensors", "oc", "oc_st", f"oc/{WEIGHTS_NAME}"):
        for ml, device in (("meta", "meta"), ({"cpu": "meta"}, "meta"), (None, "cpu")):
            got = resolve_model(tmp_path / arg, map_location=ml).model
            assert {p.device.type for p in got.state_dict().values()} == {device}, (arg, ml)
        assert _same_weights(resolve_model(tmp_path / arg, map_location=lambda s, loc: s.clone()).model, m)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_model_on_the_meta_device_is_not_saved(tmp_path, suffix):
    with torch.device("meta"):
        m = create_model("tiny")
    with pytest.raises(ConfigError, match="meta device"):
        save_model(m, tmp_path / f"m{suffix}")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------
# embed row labels


def _reference_labels(paths):
    """Brute force: for each path the fewest trailing components no other (different) path ends with."""
    parts = [Path(p).parts for p in paths]
    out = []
    for ps in parts:
        k = 1
        while k < len(ps) and any(q != ps and q[-k:] == ps[-k:] for q in parts):
            k += 1
        out.append(str(Path(*ps[-k:])))
    return out


def test_embed_labels_images_by_their_shortest_unique_path_suffix(tmp_path, capsys):
    from bmclip.cli.embed import bundled_samples

    sample = bundled_samples()[0][0]
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(sample, tmp_path / d / "fig1.png")
    capsys.readouterr()
    assert main(["embed", "--images", str(tmp_path / "a" / "fig1.png"), str(tmp_path / "b" / "fig1.png"),
                 "--captions", "one", "two"]) == 0
    rows = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ") and "fig1" in ln]
    assert rows == ["a/fig1.png", "b/fig1.png"] * 2  # similarity and probability tables (both were "fig1.png")

    from bmclip.cli.embed import row_labels

    cases = [["a/fig1.png", "b/fig1.png", "c.png"], ["x/a/f.png", "y/a/f.png", "b/f.png", "/r/y/a/f.png"],
             ["f.png", "f.png", "d/f.png"], ["one.png"], ["/abs/p/q.png", "q.png"]]
    for paths in cases:
        labels = row_labels(paths)
        assert labels == _reference_labels(paths), paths
        assert len(set(labels)) == len(set(map(os.path.normpath, paths))), paths
