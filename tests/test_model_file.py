"""Safe checkpoint loading (malicious pickles refused, side effect never happens) and atomic saving."""

import os
import pickle

import pytest
import torch

from bmclip.errors import CheckpointError
from bmclip.io import atomic_writer
from bmclip.io.model_file import load_state_dict, safe_torch_load, save_state_dict


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_torch_zip(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="refusing"):
        safe_torch_load(path)
    assert not marker.exists()
    # Sanity: the file really is dangerous when loaded unsafely (proves the test can fail).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_malicious_raw_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".safetensors"])
def test_roundtrip(tmp_path, suffix):
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(5), "c": torch.tensor(1.5)}
    sd["tied"] = sd["a.weight"]  # shared storage must not break safetensors
    path = tmp_path / f"m{suffix}"
    save_state_dict(sd, path)
    back = load_state_dict(path)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_training_checkpoint_layout_and_prefixes(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module.x": torch.ones(2), "module.y": torch.zeros(1)}}, path)
    assert sorted(load_state_dict(path)) == ["x", "y"]


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.bin")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError):
        load_state_dict(junk)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError):
        load_state_dict(bad_st)
    notsd = tmp_path / "list.pt"
    torch.save([torch.ones(1)], notsd)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict(notsd)
    mixed = tmp_path / "mixed.pt"
    torch.save({"a": torch.ones(1), "step": 7}, mixed)
    with pytest.raises(CheckpointError, match="'step'"):
        load_state_dict(mixed)


def test_atomic_writer_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_model(tmp_path, suffix):
    from bmclip.io.model_file import load_model, save_model
    from bmclip.model import create_model

    torch.manual_seed(0)
    model = create_model("tiny", init_logit_bias=-5.0)
    save_model(model, tmp_path / f"m{suffix}")
    back = load_model(tmp_path / f"m{suffix}")
    assert back.config == model.config
    sd0, sd1 = model.state_dict(), back.state_dict()
    assert set(sd0) == set(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert all(p.requires_grad for p in back.parameters())
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(1, 100, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            back.eval()(images, ids)["text_features"], model.eval()(images, ids)["text_features"]
        )


def test_load_model_key_errors(tmp_path):
    from bmclip.io.model_file import load_model
    from bmclip.model import create_model

    model = create_model("tiny")
    sd = model.state_dict()
    cfg = model.config.to_dict()
    torch.save({"model_config": cfg, "state_dict": {k: v for k, v in sd.items() if k != "visual.norm.bias"}},
               tmp_path / "a.pt")  # fmt: skip
    with pytest.raises(CheckpointError, match="visual.norm.bias"):
        load_model(tmp_path / "a.pt")
    torch.save({"model_config": cfg, "state_dict": {**sd, "extra.w": torch.ones(1)}}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="extra.w"):
        load_model(tmp_path / "b.pt")
    torch.save(sd, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not a bmclip model checkpoint"):
        load_model(tmp_path / "c.pt")
