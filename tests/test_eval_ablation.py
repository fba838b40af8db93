"""The ablation runner on a tiny pipeline: equal budgets, shared calibration, infeasible rows, rendering."""

from __future__ import annotations

import math

import pytest
from eval_helpers import eval_params, random_toy_judges, tiny_toy_pipeline

import slimdiff.calibration as calibration
from slimdiff.ablation import (
    AblationConfig,
    CalibrationSet,
    Variant,
    ablation_table,
    calibration_prompts,
    default_variants,
    plot_curves,
    readme_summary,
    run_ablation,
)
from slimdiff.embedders import PipelineTextEmbedder
from slimdiff.toy.data import heldout_captions, train_captions

EVAL_PROMPTS = heldout_captions("single")[:2] + heldout_captions("two")[:2]
POOL = train_captions()[::40]  # 13 training captions


@pytest.fixture(scope="module")
def result_and_calls():
    pipe = tiny_toy_pipeline()
    calls = []
    real_collect = calibration.collect_stats

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real_collect(*args, **kwargs)

    calibration.collect_stats = counting
    try:
        cfg = AblationConfig(
            budgets=(0.2, 0.4),
            slimset_budget=0.4,
            module_budget=0.1,
            calibration_sets=(CalibrationSet("fps-6", "fps", 6), CalibrationSet("random-6", "random", 6)),
            variants=(
                Variant("slimdiff", "method", "default", "fps-6"),
                Variant("uniform-allocation", "method", "uniform", "fps-6", mode="uniform"),
                Variant("uniform-timesteps", "method", "uniform t", "fps-6", weighting="uniform"),
                Variant("vo-only", "module", "VO alone", "fps-6", modules=("vo",)),
                Variant("random-6", "slimset", "random", "random-6", budgets=(0.4,)),
            ),
            calibration_steps=2,
            n_buckets=2,
            calibration_batch_size=3,
        )
        result = run_ablation(
            pipe,
            POOL,
            EVAL_PROMPTS,
            eval_params(latency_repeats=1),
            cfg,
            embedder=PipelineTextEmbedder(pipe),
            judges=random_toy_judges(),
            keep_images=[("slimdiff", 0.4)],
        )
    finally:
        calibration.collect_stats = real_collect
    return result, calls, pipe


@pytest.mark.slow  # ~20 s: calibrates twice and samples 8 compressed variants
def test_equal_budgets_and_one_calibration_per_set(result_and_calls):
    result, calls, _ = result_and_calls
    assert calls == [6, 6]  # fps-6 and random-6 once each, reused by weightings and budgets
    ok = [r for r in result.rows if r["status"] == "ok"]
    assert {(r["variant"], r["budget"]) for r in ok} >= {
        ("slimdiff", 0.2),
        ("slimdiff", 0.4),
        ("uniform-allocation", 0.4),
    }
    compressible = result.config["compressible_params"]
    for r in ok:  # every variant removes the same share of the WHOLE compressible set (up to the rank grid)
        assert r["removed_fraction"] >= r["budget"] - 1e-9, r
        assert r["removed_fraction"] - r["budget"] < 0.05, r
        assert r["unet_params"] == result.config["unet_params"] - round(r["removed_fraction"] * compressible)
        assert 0.0 <= r["exact_all"] <= 1.0 and r["fid"] >= 0.0 and math.isfinite(r["psnr_db"])
        assert r["fd_cls"] >= 0.0 and r["fd_cls_to_original"] >= 0.0  # classifier-feature FD, reported
    assert result.images["original"].shape == result.images["slimdiff@0.4"].shape == (4, 32, 32, 3)


@pytest.mark.slow
def test_unreachable_budgets_are_reported_not_changed(result_and_calls):
    result, _, _ = result_and_calls
    vo = [r for r in result.rows if r["variant"] == "vo-only"]
    assert [r["status"] for r in vo] == ["infeasible", "infeasible"]
    assert "feasible" in vo[0]["message"] and "removed_params" in vo[0]["message"]


@pytest.mark.slow
def test_rendering(result_and_calls, tmp_path):
    result, _, _ = result_and_calls
    table = ablation_table(result)
    assert "### 40% of the compressible parameters removed: methods" in table
    assert "| **original** | 0% |" in table and "random-6 (random-6)" in table and "slimdiff (fps-6)" in table
    assert "vo-only @ 20%: budget" in table
    assert "standard error of an exact-match rate" in table
    assert "| FID | FD cls | CLIP |" in table and "FD cls (Frechet distance on the toy attribute" in table
    path = plot_curves(result, tmp_path / "curves.png")
    assert path.stat().st_size > 1000
    text = readme_summary(result)
    assert "| 40% | " in text and "| removed | slimdiff | influence-allocation | uniform-allocation |" in text
    assert "FID noise floor" in text and "vs uniform-allocation: higher exact match at" in text
    assert "Classifier-feature FD (toy attribute classifier's penultimate features" in text
    assert "lower classifier-feature FD at" in text
    assert result.to_dict()["rows"] == result.rows and "images" not in result.to_dict()


def test_random_calibration_subset_is_seeded_and_excludes_evaluation_prompts():
    pool = [*train_captions()[:30], *EVAL_PROMPTS]
    spec = CalibrationSet("random-8", "random", 8)
    a = calibration_prompts(spec, pool, EVAL_PROMPTS, embedder=None, seed=3)
    assert a == calibration_prompts(spec, pool, EVAL_PROMPTS, embedder=None, seed=3)
    assert len(a) == 8 and not set(a) & set(EVAL_PROMPTS)


def test_default_variants_cover_the_issue():
    names = {v.name for v in default_variants((0.2, 0.4, 0.6), 0.4, 0.1)}
    assert names == {
        "slimdiff",
        "influence-allocation",
        "uniform-allocation",
        "weight-svd-qk-vo",
        "magnitude-ffn",
        "uniform-timesteps",
        "ffn-only",
        "qk-only",
        "vo-only",
        "random-64",
        "slimset-16",
        "slimset-256",
    }
    AblationConfig().resolved_variants()  # every default variant names a known calibration set
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        AblationConfig(budgets=(0.0,))
