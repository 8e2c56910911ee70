"""Atomic checkpoints: validity rules, newest-valid selection, pruning, RNG/numpy state round trips."""

import json
import random

import numpy as np
import pytest
import torch

from bmclip.errors import CheckpointError
from bmclip.model import create_model
from bmclip.resolve import locate_model, resolve_model
from bmclip.train import checkpoint as C


def _write(root, step, world=1, model=None, commit=True):
    w = C.CheckpointWriter(root, step, 0, world)
    w.begin()
    for r in range(world):
        C.CheckpointWriter(root, step, r, world).write_rank({"rng": C.rng_state(), "loader": {"pos": step}})
    m = model or create_model("tiny")
    w.write_main(m.state_dict(), m.config.to_dict(), {"step": step, "optimizer": {}, "scheduler": {}})
    return w.commit() if commit else w.tmp


def test_write_load_and_eval_loader(tmp_path):
    torch.manual_seed(1)
    m = create_model("tiny")
    d = _write(tmp_path, 5, model=m)
    assert d.name == "step_00000005" and C.is_valid(d)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["step"] == 5 and set(meta["files"]) == {"model.pt", "train_state.pt", "rank_00000.pt"}
    st = C.load_checkpoint(d)
    assert st["train_state"]["step"] == 5 and st["rank_state"]["loader"] == {"pos": 5}
    # model.pt alone is what evaluation needs, loadable with weights_only=True
    blob = torch.load(d / "model.pt", weights_only=True)
    assert set(blob) == {"model", "model_config"}
    loaded = resolve_model(d)
    m2 = loaded.model
    assert loaded.tokenizer_dir is None
    x, ids = torch.randn(2, 3, 64, 64), torch.randint(1, 100, (2, 64))
    m.eval()
    torch.testing.assert_close(m2(x, ids)["image_features"], m(x, ids)["image_features"], rtol=0, atol=0)
    # a run dir resolves to its newest valid checkpoint
    assert locate_model(tmp_path).path == d / "model.pt"


def test_partial_and_truncated_checkpoints_are_skipped(tmp_path):
    good = _write(tmp_path, 2)
    tmp = _write(tmp_path, 4, commit=False)  # killed before commit: only a temp dir
    assert tmp.name.startswith(".") and C.latest_valid(tmp_path) == good
    bad = _write(tmp_path, 6)
    with open(bad / "model.pt", "r+b") as f:  # truncated after the fact
        f.truncate(100)
    assert not C.is_valid(bad) and C.latest_valid(tmp_path) == good
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_model(bad)
    (bad / "meta.json").unlink()
    assert C.latest_valid(tmp_path) == good
    with pytest.raises(CheckpointError):
        C.read_meta(bad)
    with pytest.raises(CheckpointError):  # a bare model.pt that is truncated is still refused clearly
        resolve_model(bad)


def test_commit_requires_every_rank_file(tmp_path):
    w = C.CheckpointWriter(tmp_path, 1, 0, 2)
    w.begin()
    w.write_rank({"rng": C.rng_state(), "loader": {}})
    m = create_model("tiny")
    w.write_main(m.state_dict(), m.config.to_dict(), {"step": 1})
    with pytest.raises(CheckpointError, match="rank_00001"):
        w.commit()
    assert C.latest_valid(tmp_path) is None


def test_prune_keeps_last_k_and_resave_same_step(tmp_path):
    for s in (1, 2, 3, 4):
        _write(tmp_path, s)
    removed = C.prune(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step_00000001", "step_00000002"]
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [3, 4]
    _write(tmp_path, 4)  # saving an existing step again replaces it atomically
    assert C.is_valid(tmp_path / "step_00000004")


def test_rng_state_round_trip_and_safe_containers(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    st = C.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    C.atomic_torch_save(C.to_safe(st), tmp_path / "rng.pt")
    random.random(), np.random.rand(), torch.rand(1)
    C.set_rng_state(C.from_safe(C.safe_load(tmp_path / "rng.pt")))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    obj = {"a": np.arange(5, dtype=np.uint32), "b": (np.int64(3), [np.float32(1.5)])}
    back = C.from_safe(C.to_safe(obj))
    assert back["a"].dtype == np.uint32 and back["a"].tolist() == [0, 1, 2, 3, 4] and back["b"] == (3, [1.5])


def test_unsafe_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, p)
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError):
        C.safe_load(p)
    assert not marker.exists()


def _damage(path, at=0.5, n=64):
    """Flip n bytes in the middle of a file (tensor bytes of a torch zip: same size, still a valid zip)."""
    b = bytearray(path.read_bytes())
    i = int(len(b) * at)
    b[i:i + n] = bytes(x ^ 0xFF for x in b[i:i + n])
    path.write_bytes(bytes(b))


def test_damaged_checkpoint_bytes_are_caught_by_the_recorded_crc(tmp_path):
    """torch.load reads a checkpoint whose tensor bytes were damaged without a word: the CRC32s meta.json records
    at commit catch it, wherever the checkpoint is loaded (resume, or as a model for eval)."""
    torch.manual_seed(2)
    m = create_model("tiny")
    d = _write(tmp_path, 3, model=m)
    meta = json.loads((d / "meta.json").read_text())
    assert set(meta["crc32"]) == set(meta["files"])
    import zlib

    for name, crc in meta["crc32"].items():  # recorded while writing: the CRC of the bytes on disk
        assert crc == zlib.crc32((d / name).read_bytes()), name
    C.load_checkpoint(d)  # intact: loads
    _damage(d / "model.pt")
    assert C.is_valid(d)  # same sizes: the cheap validity check cannot see it
    silently = torch.load(d / "model.pt", weights_only=True)["model"]  # the independent reference: no error...
    assert any(not torch.equal(silently[k], v) for k, v in m.state_dict().items())  # ...and wrong weights
    with pytest.raises(CheckpointError, match=r"model\.pt is damaged: its CRC32 is [0-9a-f]{8}, not the"):
        C.load_checkpoint(d)
    with pytest.raises(CheckpointError, match="is damaged"):
        resolve_model(d)
    # a checkpoint from before the CRCs were recorded loads as before (sizes checked only)
    del meta["crc32"]
    (d / "meta.json").write_text(json.dumps(meta))
    C.load_checkpoint(d)


def test_commit_reads_back_only_the_files_this_writer_did_not_write(tmp_path, monkeypatch):
    """The CRC of a file rank 0 wrote is taken from the bytes on their way out (no second read of ~GBs); another
    rank's file is read back once. Both equal zlib.crc32 of the file."""
    import zlib

    read_back = []
    real = C.file_crc32
    monkeypatch.setattr(C, "file_crc32", lambda p: read_back.append(p.name) or real(p))
    w = C.CheckpointWriter(tmp_path, 4, 0, 2)  # as CheckpointManager.save on rank 0 of 2
    w.begin()
    w.write_rank({"rng": C.rng_state(), "loader": {"pos": 4}})
    C.CheckpointWriter(tmp_path, 4, 1, 2).write_rank({"rng": C.rng_state(), "loader": {"pos": 4}})  # rank 1
    m = create_model("tiny")
    w.write_main(m.state_dict(), m.config.to_dict(), {"step": 4, "optimizer": {}, "scheduler": {}})
    d = w.commit()
    assert read_back == ["rank_00001.pt"]
    meta = json.loads((d / "meta.json").read_text())
    assert sorted(meta["crc32"]) == ["model.pt", "rank_00000.pt", "rank_00001.pt", "train_state.pt"]
    for name, crc in meta["crc32"].items():
        assert crc == zlib.crc32((d / name).read_bytes()), name


def test_the_crc_verdict_wins_over_the_loaders_own_error_on_damaged_bytes(tmp_path):
    """The CRC check runs beside the load: when the damaged bytes also make unpickling fail, the user is told the
    file is damaged (CRC), with the unpickling error as the cause; an intact checkpoint's own load errors and a
    damage that unpickles fine are both still reported."""
    from bmclip.io.checkpoint_dir import verifying

    d = _write(tmp_path, 2)
    p = d / "train_state.pt"
    b = bytearray(p.read_bytes())
    i = b.index(b"\x80\x02", b.index(b"data.pkl"))
    b[i + 2] = 0xFE  # no pickle opcode: torch.load itself fails on this file
    p.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match=r"train_state\.pt is damaged: its CRC32") as e:
        C.load_checkpoint(d)
    assert isinstance(e.value.__cause__, CheckpointError) and "the file is damaged" in str(e.value.__cause__)
    d2 = _write(tmp_path, 3)
    with pytest.raises(KeyError, match="body"), verifying(d2):  # intact files: the body's error is the error
        raise KeyError("body")
    _damage(d2 / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt is damaged"), verifying(d2, ["model.pt"]):
        pass  # the body succeeded (as torch.load does on damaged tensor bytes): the CRC still raises


def test_a_damaged_pickle_is_called_damaged_not_unsafe(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(3)}, p)
    b = bytearray(p.read_bytes())
    i = b.index(b"\x80\x02", b.index(b"data.pkl"))  # the pickle stream's PROTO opcode (torch writes protocol 2)
    b[i + 2] = 0xFE  # the next opcode: a byte that is no pickle operation
    p.write_bytes(bytes(b))
    from bmclip.io.model_file import safe_torch_load

    with pytest.raises(CheckpointError, match="the file is damaged") as e:
        safe_torch_load(p, verify=False)  # the unpickler's own verdict (with the zip's CRCs: see test_model_file)
    assert "refusing" not in str(e.value)


def _train(out, *extra):
    from bmclip.train.config import load_config
    from bmclip.train.trainer import train

    over = ["--data.batch_size=8", "--num_threads=1", "--log_every=1", "--val_every=0", "--optim.warmup_steps=1",
            "--tensorboard=false", "--progress=false", "--ckpt_every=2", f"--out_dir={out}", *extra]
    return train(load_config("tiny-cpu", over))


def test_resume_auto_sets_a_damaged_checkpoint_aside_and_takes_the_one_before(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, "--steps=6", "--keep_last=5")
    ck = out / "checkpoints"
    _damage(ck / "step_00000006" / "train_state.pt")
    capsys.readouterr()
    summary = _train(out, "--steps=8", "--keep_last=5")
    err = capsys.readouterr().err
    assert "WARNING: cannot resume from step_00000006: " in err and "train_state.pt is damaged" in err, err
    assert summary["steps_this_run"] == 4  # from step 4, not 6
    # set aside under a name neither a resume nor pruning counts; step 6 written again by this run
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000002", "step_00000004", "step_00000006",
                                                     "step_00000006.damaged", "step_00000008"]
    # an explicit --resume=PATH is not second-guessed: the damage is the error
    _damage(ck / "step_00000008" / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt is damaged"):
        _train(tmp_path / "other", "--steps=10", f"--resume={ck / 'step_00000008'}")
    assert (ck / "step_00000008").is_dir()
    # nothing readable left: an error, not a silent fresh start (step 6, damaged a second time, goes aside as -2)
    for s in (2, 4, 6):
        _damage(ck / f"step_{s:08d}" / "model.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be read"):
        _train(out, "--steps=10", "--keep_last=5")
    assert {"step_00000006.damaged", "step_00000006.damaged-2"} <= {p.name for p in ck.iterdir()}
    assert "it is renamed to step_00000006.damaged-2," in capsys.readouterr().err
