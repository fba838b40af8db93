"""The markdown report and the side-by-side comparison table, on hand-written metric dicts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from slimdiff.evaluation.report import (
    REPORT_NAME,
    compare_table,
    comparison_grid,
    metrics_table,
    tile_images,
    write_report,
)


def _side(exact: float, fid: float, params: int, latency: float) -> dict:
    acc = {"object": 1.0, "color": 0.9, "shape": 0.8, "position": 0.95, "exact": exact, "n": 10}
    return {
        "unet_params": params,
        "compressible_params": params // 2,
        "unet_flops": 2.0e9 * params / 1000,
        "unet_latency_ms": latency,
        "accuracy": {"single": dict(acc), "two": dict(acc), "all": dict(acc)},
        "fid": fid,
        "clip_score": 25.0,
        "sample_time_s": 3.0,
    }


def _metrics(exact_c: float = 0.70, fid_c: float = 0.30, passed: bool = True) -> dict:
    reasons = [] if passed else ["exact_match_drop 10 points exceeds the limit 3 points"]
    return {
        "original": _side(0.80, 0.25, 1000, 10.0),
        "compressed": _side(exact_c, fid_c, 800, 8.0),
        "summary": {
            "unet_params_ratio": 0.8,
            "compressible_removed_fraction": 0.4,
            "flops_ratio": 0.8,
            "latency_ratio": 0.8,
            "speedup": 1.25,
            "exact_match_drop": 100 * (0.80 - exact_c),
            "fid_increase": fid_c - 0.25,
            "fidelity": {"psnr_db_mean": 30.0, "ssim_mean": 0.95, "fid_to_original": 0.01},
            "gate_passed": passed,
            "gate_reasons": reasons,
            "gate_checks": [
                {"name": "exact_match_drop", "passed": passed, "reason": reasons[0] if reasons else "ok"}
            ],
        },
        "protocol": {
            "path": "toy",
            "prompts_sha256": "abc",
            "seed": 1,
            "num_inference_steps": 20,
            "fid_real_vs_real": 0.01,
        },
    }


def test_metrics_table_rows_and_deltas():
    table = metrics_table(_metrics())
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert (
        lines["UNet parameters (lower is better)"]
        == "| UNet parameters (lower is better) | 1,000 | 800 | -200 |"
    )
    assert (
        lines["exact match, all (higher is better)"]
        == "| exact match, all (higher is better) | 80.0% | 70.0% | -10.0 pts |"
    )
    assert "| FID vs real (lower is better) | 0.2500 | 0.3000 | +0.0500 |" in table
    assert "| PSNR to original (dB) (higher is better) | - | 30.00 | - |" in table
    assert "calibration time" not in table  # rows without any value are left out


def test_write_report_is_self_contained(tmp_path):
    plots = tmp_path / "plots"
    plots.mkdir()
    Image.new("RGB", (4, 4)).save(plots / "rank_plan.png")
    Image.new("RGB", (4, 4)).save(plots / "curves.png")
    out = tmp_path / "report"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "grid_compare.png")
    m = _metrics(passed=False)
    m["grids"] = {"compare": "grid_compare.png"}
    baseline = copy.deepcopy(m)
    baseline["protocol"]["seed"] = 2
    path = write_report(
        m,
        out,
        plan_plot=plots / "rank_plan.png",
        curves=plots / "curves.png",
        baselines={"uniform": baseline},
    )
    text = path.read_text()
    assert path.name == REPORT_NAME
    assert text.splitlines()[2].startswith("**Quality gate: FAILED.** Reasons: exact_match_drop 10 points")
    assert "UNet 1,000 -> 800 parameters (20.0% fewer; 40.0% of the compressible set removed)" in text
    assert "FID 0.2500 -> 0.3000 (+0.0500; two real render sets differ by 0.0100)." in text
    assert "![grid_compare](grid_compare.png)" in text and "![Rank plan](rank_plan.png)" in text
    assert (out / "rank_plan.png").is_file() and (out / "curves.png").is_file()
    assert "| metric | original | compressed | delta | uniform |" in text
    assert "baseline `uniform` was measured under a different protocol (seed)" in text
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report(m, out, heatmap=tmp_path / "missing.png")


def test_compare_table_and_protocol_differences():
    a, b = _metrics(exact_c=0.70), _metrics(exact_c=0.75, fid_c=0.28)
    table = compare_table(a, b)
    assert "| exact match, all (higher is better) | 70.0% | 75.0% | +5.0 pts |" in table
    assert "| FID increase | 0.0500 | 0.0300 | -0.0200 |" in table
    assert "| quality gate | passed | passed | |" in table
    assert "Note" not in table
    b["protocol"]["num_inference_steps"] = 25
    assert "protocols differ in num_inference_steps" in compare_table(a, b)


def test_grids_tile_same_seed_rows():
    a = np.zeros((3, 32, 32, 3), np.uint8)
    b = np.full((3, 32, 32, 3), 255, np.uint8)
    grid = comparison_grid(a, b, columns=2)
    # 32 px tiles are shown at 96 px (nearest); 2 row pairs of original + compressed
    assert grid.height == 2 * (2 * (96 + 4) + 12) + 4
    assert grid.width == 84 + 2 * (96 + 4) + 4
    assert tile_images(a, columns=3).size == (3 * 100 + 4, 104)
    with pytest.raises(ValueError, match="differ"):
        comparison_grid(a, b[:2])
