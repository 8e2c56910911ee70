"""A loaded model runs wherever it is loaded: the runtime settings a training run chose (CUDA-only kernels) and a
half-precision storage dtype do not follow the weights into every command."""

from __future__ import annotations

import pytest
import torch
from test_model_file import trained  # noqa: F401  (the fixture: a real training run with its own tokenizer)

from bmclip.io.model_file import save_model
from bmclip.model import create_model
from bmclip.resolve import resolve_model

IMAGE = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
TEXT = torch.tensor([[2, 10, 11, 12, 3]])


def _embed(model):
    with torch.no_grad():
        return model.encode_image(IMAGE), model.encode_text(TEXT)


@pytest.mark.parametrize("switch", [{"fused_ops": True}, {"attn_backend": "triton"},
                                    {"text_attn_backend": "triton", "image_attn_backend": "sdpa"},
                                    {"grad_checkpointing": True}])
def test_a_model_trained_with_cuda_only_switches_loads_with_portable_ones(tmp_path, switch):
    """--model.fused_ops=true or a Triton attention backend (a GPU run's choice) was written into the model file
    and came back on load: `bmclip embed`/`eval` on the CPU then failed ("Triton backend needs CUDA tensors")."""
    torch.manual_seed(0)
    gpu_run = create_model("tiny", **switch)
    save_model(gpu_run, tmp_path / "m.pt")
    loaded = resolve_model(tmp_path / "m.pt").model
    c = loaded.config
    assert (c.fused_ops, c.attn_backend, c.image_attn_backend, c.text_attn_backend, c.grad_checkpointing) == \
        (False, "auto", None, None, False)
    torch.manual_seed(0)
    ref = create_model("tiny").eval()  # the same weights with the default settings
    for a, b in zip(_embed(loaded), _embed(ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_half_precision_model_file_loads_as_float32(tmp_path, dtype, suffix):
    """A bf16/fp16 model file gave a bf16/fp16 model, and every command fed it float32 images: a RuntimeError
    traceback. It loads as float32, as an open_clip folder's half-precision weights do."""
    torch.manual_seed(0)
    m = create_model("tiny").to(dtype)
    save_model(m, tmp_path / f"m{suffix}")
    loaded = resolve_model(tmp_path / f"m{suffix}").model
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    ref = create_model("tiny").eval()
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})  # the rounded weights, in float32
    for a, b in zip(_embed(loaded), _embed(ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_training_from_an_init_checkpoint_takes_its_tokenizer(trained, tmp_path, capsys):  # noqa: F811
    """--model.init_checkpoint of a run trained with its own vocabulary, without --data.tokenizer: the new run
    trained with the bundled vocabulary, reading the checkpoint's token embeddings as other words, with no word
    said. It now takes the vocabulary shipped with the checkpoint; another one given explicitly is warned about."""
    from test_model_file import TRAIN_SMALL

    from bmclip.cli import main
    from bmclip.io.checkpoint_dir import latest_valid
    from bmclip.tokenizer import bundled_vocab_path

    shipped = (trained["ckpt"] / "vocab.txt").read_bytes()
    args = ["train", "tiny-cpu", f"--model.init_checkpoint={trained['run']}", "--steps=1", "--data.synthetic=false",
            f"--data.train={trained['shards']}", "--export_open_clip=false", *TRAIN_SMALL]
    assert main([*args, f"--out_dir={tmp_path / 'b'}"]) == 0
    err = capsys.readouterr().err
    assert "data.tokenizer: not set, so the vocabulary shipped with model.init_checkpoint:" in err
    assert (latest_valid(tmp_path / "b" / "checkpoints") / "vocab.txt").read_bytes() == shipped
    assert main([*args, f"--out_dir={tmp_path / 'c'}", f"--data.tokenizer={bundled_vocab_path()}"]) == 0
    err = capsys.readouterr().err
    assert f"WARNING: data.tokenizer {bundled_vocab_path()} is not the vocabulary model.init_checkpoint was" in err
    assert (latest_valid(tmp_path / "c" / "checkpoints") / "vocab.txt").read_bytes() != shipped

