"""bench/gpu.py --device cpu --quick runs end to end and prints its one table (slow: ~2 min)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_quick_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--device", "cpu", "--quick"])
    table = capsys.readouterr().out
    assert table.count("\n| ") == 12 and "ratio imagegen / plain loop" in table
    assert out["sd15_img_s"] > 0 and out["plain_img_s"] > 0 and out["sdxl_s_img"] > 0
    assert out["batch_diff"] <= 2  # batch 1 vs 8 on CPU: within 2/255
    assert out["upscale"]["mps"] > 0
    if out["wh_per_image"] is None:
        assert "not measured" in table
