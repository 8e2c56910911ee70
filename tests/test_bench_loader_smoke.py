"""benchmarks/bench_loader.py runs end to end on a tiny shard and writes its JSON (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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
    out = tmp_path / "bench.json"
    rc = mod.main(["--data", str(data), "--n", "12", "--size", "64", "--batch", "4", "--repeats", "1",
                   "--only", "pil_decode,ours_decode,ours_1t,ours_2t", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"pil_decode", "ours_decode", "ours_1t", "ours_2t"}
    for r in res["results"].values():
        assert r["images"] == 12 and r["images_per_s"] > 0
    assert "ours_2t_vs_ours_1t (wall)" in res["targets"]
    assert res["info"]["distinct_jpegs"] >= min_jpegs
