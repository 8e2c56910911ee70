"""The one image normalisation (uint8 NHWC -> normalised float NCHW) and its constants, against float64,
torchvision's Normalize and open_clip's own mean/std."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import bmclip.model
from bmclip.data import dali
from bmclip.data.images import IMAGE_MEAN, IMAGE_STD
from bmclip.data.normalize import normalize_images
from bmclip.errors import ConfigError


def reference_normalise(x_uint8_nhwc: np.ndarray) -> np.ndarray:
    """float64 (x/255 - mean)/std, NCHW."""
    x = x_uint8_nhwc.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    return (x - np.array(IMAGE_MEAN).reshape(1, 3, 1, 1)) / np.array(IMAGE_STD).reshape(1, 3, 1, 1)


def test_mean_std_are_open_clips():
    # open_clip/constants.py loaded by path: importing the open_clip package takes ~10 s (timm, hf)
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip not installed")
    path = Path(spec.submodule_search_locations[0]) / "constants.py"
    cspec = importlib.util.spec_from_file_location("_oc_constants", path)
    consts = importlib.util.module_from_spec(cspec)
    cspec.loader.exec_module(consts)
    assert tuple(IMAGE_MEAN) == tuple(consts.OPENAI_DATASET_MEAN)
    assert tuple(IMAGE_STD) == tuple(consts.OPENAI_DATASET_STD)
    # one definition: the model package re-exports the very same objects
    assert bmclip.model.IMAGE_MEAN is IMAGE_MEAN and bmclip.model.IMAGE_STD is IMAGE_STD


def test_dali_pipeline_defaults_are_the_same_constants():
    import inspect

    params = inspect.signature(dali.build_pipeline).parameters
    assert params["mean"].default is IMAGE_MEAN and params["std"].default is IMAGE_STD


def test_normalize_images_matches_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    ref = reference_normalise(x)
    out = normalize_images(torch.from_numpy(x), "cpu", torch.float32)
    assert out.shape == (3, 3, 5, 7) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=2e-6)
    assert out.is_contiguous()
    assert torch.equal(normalize_images(torch.from_numpy(x)), out)  # device=None: stays where it is
    assert torch.equal(normalize_images(torch.from_numpy(x), torch.device("cpu")), out)
    cl = normalize_images(torch.from_numpy(x), "cpu", channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, out)
    bf = normalize_images(torch.from_numpy(x), "cpu", torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    np.testing.assert_allclose(bf.float().numpy(), ref, rtol=2**-8, atol=1e-6)
    # matches torchvision's ToTensor + Normalize (what open_clip's transform does)
    from torchvision.transforms import Normalize

    tv = Normalize(IMAGE_MEAN, IMAGE_STD)(torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255.0)
    np.testing.assert_allclose(out.numpy(), tv.numpy(), rtol=0, atol=2e-6)
    # other constants (e.g. a model that was trained with its own): the same formula
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    other = normalize_images(torch.from_numpy(x), mean=mean, std=std).double().numpy()
    want = (x.astype(np.float64).transpose(0, 3, 1, 2) / 255.0 - np.array(mean).reshape(1, 3, 1, 1)) \
        / np.array(std).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(other, want, rtol=0, atol=4e-6)


def test_normalize_images_rejects_what_it_cannot_read():
    with pytest.raises(ConfigError, match="uint8"):
        normalize_images(torch.zeros(2, 4, 4, 3), "cpu")
    with pytest.raises(ConfigError, match="uint8"):
        normalize_images(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "cpu")


@pytest.mark.gpu
def test_normalize_images_cuda():
    x = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8).pin_memory()
    for dev in ("cuda", torch.device("cuda", torch.cuda.current_device())):
        out = normalize_images(x, dev, torch.bfloat16)
        assert out.is_cuda and out.dtype == torch.bfloat16
        np.testing.assert_allclose(out.float().cpu().numpy(), reference_normalise(x.numpy()), rtol=2**-8, atol=1e-6)
