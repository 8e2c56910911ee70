"""benchmarks/bench_loader.py runs end to end on a tiny shard and writes its JSON (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bmclip.data.dali import dali_available

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_loader.py"


@pytest.fixture(params=["fixtures", "shared"])
def bench_data(request, fixtures_dir):
    """(--data folder, JPEGs the benchmark must find there): the repo's CC BY figures (2 full-size + 5 small, what
    a checkout without ../shared uses, so CI runs this) and the ../shared samples (skipped where absent)."""
    if request.param == "fixtures":
        return fixtures_dir, 7
    return request.getfixturevalue("pmc_samples"), 8


@pytest.mark.slow
def test_bench_loader_smoke(tmp_path, bench_data):
    pytest.importorskip("bmclip._C", reason="bmclip._C not built")
    data, min_jpegs = bench_data
    spec = importlib.util.spec_from_file_location("bench_loader", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # the trainer-path rows run the trainer's source class and normalisation (spied on in the module)
    normalised, sources = [], []
    real_norm, real_source = mod.normalize_images, mod.ShardSource

    def spy_norm(images, device, *a, **kw):
        out = real_norm(images, device, *a, **kw)
        normalised.append((tuple(out.shape), out.dtype))
        return out

    class SpySource(real_source):
        def __init__(self, loader):
            sources.append(loader)
            super().__init__(loader)

    mod.normalize_images, mod.ShardSource = spy_norm, SpySource
    methods = {"pil_decode", "ours_decode", "ours_1t", "ours_2t", "ours_train_1t"}
    if dali_available():
        methods.add("dali_cpu_1t")
    out = tmp_path / "bench.json"
    rc = mod.main(["--data", str(data), "--n", "12", "--size", "64", "--batch", "4", "--repeats", "1",
                   "--only", ",".join(sorted(methods)), "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == methods
    for r in res["results"].values():
        assert r["images"] == 12 and r["images_per_s"] > 0
    # warm-up + 1 timed run, 3 batches each: float32 NCHW as the training step takes them
    assert normalised == [((4, 3, 64, 64), torch.float32)] * 6
    assert len(sources) == 2 and all(ld.drop_last and ld.tokenizer is not None for ld in sources)
    assert "ours_2t_vs_ours_1t (wall)" in res["targets"]
    assert res["info"]["distinct_jpegs"] >= min_jpegs
