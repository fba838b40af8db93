"""Truncation-error profiles (slimdiff.spectra) and the error-driven allocation built on them.

References: the decompositions themselves (slimdiff.linalg computes each error explicitly, e.g.
the Nystrom Schur complement), ``compress_``'s per-unit report, and brute force over tiny grids."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from compress_helpers import capture_covariances, unet_inputs

from slimdiff import linalg
from slimdiff.adapter import UnitInfo, compression_units
from slimdiff.allocation import Budget, RankPlan, plan_ranks, rank_grid
from slimdiff.compress import compress_
from slimdiff.config import ConfigError, Params
from slimdiff.spectra import (
    error_profiles,
    ffn_error_curve,
    plot_error_profiles,
    qk_error_curve,
    vo_error_curve,
)

F64 = torch.float64


def error_plan(units, profiles, fraction: float, step: int = 1) -> RankPlan:
    return plan_ranks(
        None,
        units,
        Budget(removed_fraction=fraction),
        mode="error",
        tau=0.0,
        r_min=step,
        multiple=step,
        profiles=profiles,
    )


def spd(n: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (q * decay ** torch.arange(n, dtype=F64)) @ q.T


def test_ffn_curve_equals_nystrom_refit_error_at_every_rank():
    corr = spd(24, 0, 0.8)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(6, 24, generator=g, dtype=F64)
    curve = ffn_error_curve(corr, w_out, damping=1e-2)
    assert len(curve) == 25 and curve[0] == 1.0 and curve[-1] == pytest.approx(0.0, abs=1e-12)
    for k in (1, 3, 8, 16, 23):
        res = linalg.nystrom_ffn(corr, w_out, k, damping=1e-2)  # explicit Schur complement
        assert curve[k] == pytest.approx(res.error / res.energy, rel=1e-8, abs=1e-12), k
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(curve))  # nested subsets: non-increasing


def test_qk_and_vo_curves_equal_the_discarded_singular_values():
    heads, d = 3, 8
    cq = torch.stack([spd(d, 10 + h) for h in range(heads)])
    ck = torch.stack([spd(d, 20 + h) for h in range(heads)])
    ca = torch.stack([spd(d, 30 + h) for h in range(heads)])
    w_o = torch.randn(heads, d, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    qk, vo = qk_error_curve(cq, ck), vo_error_curve(ca, w_o)
    for r in range(1, d + 1):
        rq = [linalg.qk_whitened_svd(cq[h], ck[h], r) for h in range(heads)]
        rv = [linalg.vo_whitened_svd(ca[h], w_o[h], r) for h in range(heads)]
        assert qk[r] == pytest.approx(sum(x.error for x in rq) / sum(x.energy for x in rq), abs=1e-12)
        assert vo[r] == pytest.approx(sum(x.error for x in rv) / sum(x.energy for x in rv), abs=1e-12)
    assert qk[0] == vo[0] == 1.0 and qk[d] == vo[d] == 0.0


def test_profiles_predict_compress_report_on_a_tiny_unet(tiny_unet, tmp_path):
    cov = capture_covariances(tiny_unet, [unet_inputs(tiny_unet, seed=s) for s in range(2)])
    units = compression_units(tiny_unet)
    profiles = error_profiles(tiny_unet, cov, damping=1e-2)
    assert set(profiles) == set(units)
    for n, u in units.items():
        assert len(profiles[n]) == u.full_rank + 1 and profiles[n][0] == 1.0
    plan = error_plan(units, profiles, 0.5, step=2)
    unet = copy.deepcopy(tiny_unet)
    report = compress_(unet, plan, cov, damping=1e-2)
    assert report.units, "the plan compresses something"
    for name, rep in report.units.items():
        # what the plan predicted is what the decomposition then left
        assert plan.units[name].predicted_error == pytest.approx(rep.relative_error, rel=1e-6, abs=1e-10), (
            name
        )
    assert plot_error_profiles(profiles, units, tmp_path / "p.png", plan.ranks()).stat().st_size > 5000


def convex_units(n_units: int = 3, full: int = 6, cost: int = 10):
    units = {f"u{i}": UnitInfo(f"u{i}", "ffn", f"b{i}", None, full, cost) for i in range(n_units)}
    # convex, decreasing curves with different steepness
    profiles = {
        f"u{i}": [math.exp(-(0.3 + 0.5 * i) * r) * (1 - r / full) for r in range(full + 1)]
        for i in range(n_units)
    }
    return units, profiles


@pytest.mark.parametrize("kept_ranks", [5, 8, 11, 14])
def test_error_allocation_is_optimal_on_convex_curves(kept_ranks):
    units, profiles = convex_units()
    budget = Budget(kept_params=kept_ranks * 10)
    plan = plan_ranks(None, units, budget, mode="error", tau=0.0, r_min=1, multiple=1, profiles=profiles)
    assert plan.params_after <= kept_ranks * 10
    best = min(
        (sum(profiles[n][r] for n, r in zip(units, combo, strict=True)), combo)
        for combo in itertools.product(range(1, 7), repeat=3)
        if sum(combo) <= kept_ranks
    )
    got = sum(profiles[n][u.rank] for n, u in plan.units.items())
    assert got == pytest.approx(best[0], abs=1e-12)
    assert plan.mode == "error" and plan.tau == 0.0 and plan.profiles_digest


def test_error_allocation_cuts_the_flat_curve_first_and_tau_pulls_to_uniform():
    full = 64
    units = {n: UnitInfo(n, "qk", "b", "attn1", full, 100) for n in ("flat", "steep")}
    profiles = {
        "flat": [max(0.0, 1 - r / 8) * 0.01 for r in range(full + 1)],  # loses little below rank 8
        "steep": [1 - r / full for r in range(full + 1)],
    }
    plan = plan_ranks(None, units, Budget(removed_fraction=0.4), mode="error", profiles=profiles, tau=0.0)
    assert plan.units["flat"].rank == 8 and plan.units["steep"].rank == full
    wide = plan_ranks(None, units, Budget(removed_fraction=0.4), mode="error", profiles=profiles, tau=100.0)
    assert abs(wide.units["flat"].rank - wide.units["steep"].rank) <= 8  # nearly one shared ratio
    for p in (plan, wide):
        assert p.params_after <= 0.6 * 2 * full * 100
        assert all(u.rank in rank_grid(full, 8, 8) for u in p.units.values())


@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.6])
def test_error_allocation_meets_the_budget_step_maximally_at_sd_shapes(fraction):
    from test_allocation import assert_step_maximal, sd_like_units

    units = sd_like_units()
    # decaying spectra of different speed per unit: the error curves of a whitened SVD
    profiles = {}
    for i, (n, u) in enumerate(units.items()):
        sq = [math.exp(-0.02 * (1 + 3 * (i % 4)) * 40 / u.full_rank * k) for k in range(u.full_rank)]
        tail = [sum(sq[r:]) / sum(sq) for r in range(u.full_rank)] + [0.0]
        profiles[n] = tail
    compressible = sum(u.full_params for u in units.values())
    plan = plan_ranks(
        None, units, Budget(removed_fraction=fraction), mode="error", tau=0.0, profiles=profiles
    )
    target = math.floor(compressible * (1 - fraction))
    assert_step_maximal(plan, units, target)
    assert target - plan.params_after < 1e-3 * compressible
    # a uniform plan of the same budget predicts more error than the one that minimises it
    uniform = plan_ranks(None, units, Budget(removed_fraction=fraction), mode="uniform")

    def predicted(p):
        return sum(u.params_before * profiles[n][u.rank] for n, u in p.units.items())

    assert predicted(plan) < predicted(uniform)


def test_error_mode_inputs_are_checked_and_the_plan_round_trips(tmp_path):
    units, profiles = convex_units()
    bad = {
        "needs error profiles": None,
        "computed on another model": {**profiles, "u0": [1.0, 0.0]},
        "missing for 1 units": {"u0": profiles["u0"], "u1": profiles["u1"]},
        "finite": {**profiles, "u2": [math.nan] * 7},
    }
    for message, curves in bad.items():
        with pytest.raises(ValueError, match=message):
            error_plan(units, curves, 0.3)
    plan = error_plan(units, profiles, 0.3)
    again = RankPlan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan and again.digest == plan.digest
    other = error_plan(units, {**profiles, "u0": [x * 0.5 for x in profiles["u0"]]}, 0.3)
    assert other.profiles_digest != plan.profiles_digest


def test_params_default_to_error_mode_and_influence_needs_a_positive_tau():
    p = Params()
    assert (p.allocation.mode, p.allocation.tau) == ("error", 0.0)
    with pytest.raises(ConfigError, match="allocation: .*mode 'influence' needs tau > 0"):
        p.with_overrides({"allocation.mode": "influence"})
    assert p.with_overrides({"allocation.mode": "influence", "allocation.tau": 1.0}).allocation.tau == 1.0
