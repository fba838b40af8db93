"""The ablation runner on a tiny pipeline: equal budgets, shared calibration, infeasible rows, rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ablation_runner import (
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
from eval_helpers import eval_params, random_toy_judges, tiny_toy_pipeline

import slimdiff.calibration.collect as calibration
from slimdiff.calibration.embedders import PipelineTextEmbedder
from slimdiff.toy.data import heldout_captions, train_captions

EVAL_PROMPTS = heldout_captions("single")[:2] + heldout_captions("two")[:2]
POOL = train_captions()[::40]  # 13 training captions


@pytest.fixture(scope="module")
def judges():
    return random_toy_judges()


@pytest.fixture(scope="module")
def result_and_calls(judges):
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
            judges=judges,
            # every row's images, so that the test can recompute each row's metrics from them
            keep_images=[(v.name, b) for v in cfg.variants for b in (v.budgets or cfg.budgets)],
        )
    finally:
        calibration.collect_stats = real_collect
    return result, calls, pipe


def _frechet_by_nuclear_norm(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two (N, d) feature sets, computed independently of slimdiff.evaluation.metrics:
    the nonzero eigenvalues of C_a C_b are the squared singular values of A_c B_c^T / sqrt((n_a-1)
    (n_b-1)) (A_c, B_c the centred features), so tr (C_a C_b)^1/2 is that matrix's nuclear norm."""
    ac, bc = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    nuclear = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt(na * nb)
    mean = np.square(a.mean(0) - b.mean(0)).sum()
    return float(mean + np.square(ac).sum() / na + np.square(bc).sum() / nb - 2.0 * nuclear)


def _fd_tolerance(a: np.ndarray, b: np.ndarray) -> float:
    """slimdiff.evaluation.metrics takes tr (C_a^1/2 C_b C_a^1/2)^1/2 from a d x d eigendecomposition: with
    N < d most of its eigenvalues are zero up to round-off eps * ||M||, whose square roots
    (~1.5e-8 * tr C each, d of them, doubled) are the error; 1e-7 * d * (tr C_a + tr C_b) covers it."""
    return 1e-7 * a.shape[1] * float(np.var(a, 0, ddof=1).sum() + np.var(b, 0, ddof=1).sum())


def _recompute_quality(images: np.ndarray, judges) -> dict:
    """A row's quality metrics from its images, without the evaluator: exact match from the judge's
    slot predictions, FID and fd_cls against the seeded toy renders of the same captions (numpy
    default_rng(seed), in image order, as the protocol records)."""
    from slimdiff.toy.clip import encode_images
    from slimdiff.toy.data import caption_slot_labels, render

    rng = np.random.default_rng(eval_params().seed)
    real = np.stack([render(p, rng) for p in EVAL_PROMPTS])
    expected = np.stack([caption_slot_labels(p) for p in EVAL_PROMPTS])
    with torch.no_grad():
        clip = [encode_images(judges.clip_model, x).double().numpy() for x in (images, real)]
        cls = [judges.classifier.penultimate_features(x).double().numpy() for x in (images, real)]
    return {
        "exact": float((judges.classifier.predict(images) == expected).all(1).mean()),
        "clip": clip,
        "cls": cls,
    }


def _psnr_db_mean(a: np.ndarray, b: np.ndarray, cap: float = 100.0) -> float:
    mse = np.square(a.astype(np.float64) / 255 - b.astype(np.float64) / 255).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return float(np.minimum(10 * np.log10(1.0 / mse), cap).mean())


@pytest.mark.slow  # ~20 s: calibrates twice and samples 8 compressed variants
def test_equal_budgets_and_one_calibration_per_set(result_and_calls, judges):
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
    assert result.images["original"].shape == result.images["slimdiff@0.4"].shape == (4, 32, 32, 3)
    # every reported metric recomputed from the row's images (same seeds as the original's):
    # exact match is a count (exact), PSNR float64 (1e-12), the FDs within _fd_tolerance
    original = result.images["original"]
    ref = _recompute_quality(original, judges)
    assert result.original["accuracy"]["all"]["exact"] == ref["exact"]
    for key, feats in (("fid", ref["clip"]), ("fd_cls", ref["cls"])):
        assert result.original[key] == pytest.approx(
            _frechet_by_nuclear_norm(*feats), abs=_fd_tolerance(*feats)
        )
    for r in ok:
        images = result.images[f"{r['variant']}@{r['budget']:g}"]
        got = _recompute_quality(images, judges)
        assert r["exact_all"] == got["exact"], r
        assert r["psnr_db"] == pytest.approx(_psnr_db_mean(original, images), rel=1e-12), r
        assert not np.array_equal(images, original), r  # compressed: the images changed
        pairs = {
            "fid": got["clip"],
            "fd_cls": got["cls"],
            "fid_to_original": (got["clip"][0], ref["clip"][0]),
            "fd_cls_to_original": (got["cls"][0], ref["cls"][0]),
        }
        for key, (a, b) in pairs.items():
            assert r[key] == pytest.approx(_frechet_by_nuclear_norm(a, b), abs=_fd_tolerance(a, b)), (key, r)


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


# -- budgets in FLOPs (issue 25): rows compared at equal FLOPs ------------------------------------------
class _Costs:
    """A FLOP cost model with known answers: each unit costs ``per_rank`` FLOPs per kept rank on top
    of a fixed ``rest``."""

    def __init__(self, full: dict[str, int], per_rank: dict[str, int], rest: int):
        self.full, self.per_rank, self.rest = full, per_rank, rest
        self.total = self.plan_flops(full)

    def plan_flops(self, ranks):
        return self.rest + sum(self.per_rank[n] * int(ranks.get(n, self.full[n])) for n in self.full)


def test_plan_matching_flops_finds_the_smallest_parameter_removal_that_removes_the_flops():
    """Against brute force over every parameter removal: a uniform-ratio 'allocator' over three
    units whose FLOPs per parameter differ, so the FLOPs removed are monotone but not proportional
    to the parameters removed."""
    from types import SimpleNamespace

    from ablation_runner import plan_matching_flops, removed_flops_share

    full = {"a": 64, "b": 32, "c": 16}
    cost_per_rank = {"a": 10, "b": 40, "c": 5}  # parameters per rank
    costs = _Costs(full, per_rank={"a": 7, "b": 300, "c": 1}, rest=5000)
    units = {n: SimpleNamespace(full_params=full[n] * cost_per_rank[n]) for n in full}
    total_params = sum(u.full_params for u in units.values())

    def by_params(removed: int):
        keep = 1.0 - removed / total_params
        return SimpleNamespace(units={n: SimpleNamespace(rank=int(full[n] * keep)) for n in full})

    for share in (0.1, 0.37, 0.5, 0.9):
        got = plan_matching_flops(by_params, units, costs, share)
        brute = next(
            p for p in range(total_params) if removed_flops_share(by_params(p), units, costs) >= share
        )
        assert {n: u.rank for n, u in got.units.items()} == {
            n: u.rank for n, u in by_params(brute).units.items()
        }
        assert removed_flops_share(got, units, costs) >= share
    # every unit at rank 0 removes exactly the compressible FLOPs: share 1 is not reachable below
    # the whole compressible set
    assert (
        removed_flops_share(SimpleNamespace(units={n: SimpleNamespace(rank=0) for n in full}), units, costs)
        == 1.0
    )


def _flop_rows_at_40(pipe, variants, prompts, judges) -> tuple[dict, AblationConfig]:
    """run_ablation at 40% of the compressible FLOPs, 6 calibration prompts, 2 steps: (rows by
    name, the config)."""
    cfg = AblationConfig(
        budgets=(0.4,),
        calibration_sets=(CalibrationSet("fps-6", "fps", 6),),
        variants=tuple(variants),
        calibration_steps=2,
        n_buckets=2,
        calibration_batch_size=3,
        budget_kind="flops",
    )
    result = run_ablation(
        pipe,
        POOL,
        prompts,
        eval_params(latency_repeats=1),
        cfg,
        embedder=PipelineTextEmbedder(pipe),
        judges=judges,
    )
    return {r["variant"]: r for r in result.rows}, cfg


def test_equal_flops_rows_remove_the_same_flops(judges):
    """budget_kind="flops" on the tiny pipeline: every row removes at least the budget's share of the
    compressible FLOPs at the serving shape, and the FLOP-spending row overshoots by less than one
    rank step (``multiple`` ranks) of the unit whose step costs the most FLOPs."""
    from ablation_runner import cost_variants

    pipe = tiny_toy_pipeline()
    variants = [
        Variant(v.name, v.group, v.description, "fps-6", mode=v.mode, spend=v.spend) for v in cost_variants()
    ]
    rows, cfg = _flop_rows_at_40(pipe, variants, EVAL_PROMPTS, judges)
    assert set(rows) == {"error-flops", "error-params", "uniform-allocation"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["flops_removed_share"] >= 0.4 - 1e-12
    from slimdiff.families.units import compression_units, denoiser_of
    from slimdiff.planning.flops import serving_shape, unit_flop_costs

    model = denoiser_of(pipe)
    units = compression_units(model)
    costs = unit_flop_costs(model, serving_shape(pipe), "select", units)
    compressible = costs.total - costs.plan_flops({n: 0 for n in units})
    step = max(cfg.multiple * costs.per_rank[n] for n in units if n in costs.per_rank) / compressible
    assert rows["error-flops"]["flops_removed_share"] < 0.4 + step


@pytest.mark.slow
def test_qk_select_row_removes_the_default_rows_flops(judges):
    """The toy FLUX's QK comparison at equal FLOPs: the default row (`qk_norm: auto`, FLUX's QKs
    whole) and the `error-flops-qk-select` row (QKs planned by pair selection) remove as many FLOPs
    (both shares counted against the default's compressible FLOPs), overshooting by less than one
    rank step of the costliest unit."""
    from ablation_runner import cost_variants

    from slimdiff.families.units import compression_units, denoiser_of, planned_units
    from slimdiff.planning.flops import serving_shape, unit_flop_costs
    from slimdiff.toy import load_toy_flux_pipeline

    pipe = load_toy_flux_pipeline()
    variants = [v for v in cost_variants(qk_select=True) if v.spend == "budget" and v.mode is None]
    assert [v.qk_norm for v in variants] == ["auto", "select"]
    variants = [Variant(v.name, v.group, v.description, "fps-6", qk_norm=v.qk_norm) for v in variants]
    rows, cfg = _flop_rows_at_40(pipe, variants, EVAL_PROMPTS[:2], judges)
    assert set(rows) == {"error-flops", "error-flops-qk-select"}
    model = denoiser_of(pipe)
    units = compression_units(model)
    units = planned_units(units, ("ffn", "qk", "vo"), "auto")
    costs = unit_flop_costs(model, serving_shape(pipe), "auto", units)
    compressible = costs.total - costs.plan_flops({n: 0 for n in units})
    every = compression_units(model)  # the select row's steps (its QKs) count too
    all_costs = unit_flop_costs(model, serving_shape(pipe), "select", every)
    step = max(cfg.multiple * all_costs.per_rank[n] for n in every if n in all_costs.per_rank) / compressible
    assert not any(u.kind == "qk" for u in units.values())  # FLUX: every QK under norms + RoPE whole
    for r in rows.values():
        assert r["status"] == "ok", r
        assert 0.4 - 1e-12 <= r["flops_removed_share"] < 0.4 + step, r["variant"]
