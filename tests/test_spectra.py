"""Truncation-error profiles (slimdiff.planning.spectra) and the error-driven allocation built on them.

References: the decompositions themselves (slimdiff.core.linalg computes each error explicitly, e.g.
the Nystrom Schur complement), ``compress_``'s per-unit report, and brute force over tiny grids."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from compress_helpers import capture_covariances, unet_inputs

from slimdiff.config import ConfigError, Params
from slimdiff.core import linalg
from slimdiff.families.units import UnitInfo, compression_units
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.plan import RankPlan, rank_grid
from slimdiff.planning.spectra import (
    error_profiles,
    ffn_error_curve,
    plot_error_profiles,
    qk_error_curve,
    vo_error_curve,
)
from slimdiff.surgery.compress import compress_

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


def spd(n: int, seed: int, decay: float = 0.7, rank: int | None = None) -> torch.Tensor:
    """A random SPD (or, with ``rank``, PSD rank-deficient) matrix with eigenvalues decay**i."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    eig = decay ** torch.arange(n, dtype=F64)
    if rank is not None:
        eig[rank:] = 0.0
    return (q * eig) @ q.T


# The curves are prefix-sum formulas; the references evaluate each rank's rewrite explicitly
# (slimdiff.core.linalg *_output_error under the undamped covariance). Both are float64 sums of O(n)
# terms of size <= 1, so they agree to ~1e-15; 1e-10 leaves room without hiding a wrong formula.
EXACT = 1e-10


@pytest.mark.parametrize("rank", [None, 5])
def test_ffn_curve_equals_the_undamped_error_of_the_damped_refit_at_every_rank(rank):
    corr = spd(24, 0, 0.8, rank)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(6, 24, generator=g, dtype=F64)
    curve = ffn_error_curve(corr, w_out, damping=1e-2)
    assert len(curve) == 25 and curve[0] == 1.0 and curve[-1] == pytest.approx(0.0, abs=1e-12)
    for k in range(1, 25):
        res = linalg.nystrom_ffn(corr, w_out, k, damping=1e-2)
        error, energy = linalg.ffn_output_error(corr, w_out, res.keep, res.out_weight)
        assert curve[k] == pytest.approx(error / energy, abs=EXACT), k


@pytest.mark.parametrize("rank", [None, 3])
def test_qk_and_vo_curves_equal_the_undamped_error_of_each_rewrite(rank):
    heads, d = 3, 8
    cq = torch.stack([spd(d, 10 + h, rank=rank) for h in range(heads)])
    ck = torch.stack([spd(d, 20 + h, rank=rank) for h in range(heads)])
    ca = torch.stack([spd(d, 30 + h, rank=rank) for h in range(heads)])
    w_o = torch.randn(heads, d, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    qk, vo = qk_error_curve(cq, ck), vo_error_curve(ca, w_o)
    for r in range(1, d + 1):
        rq = [linalg.qk_whitened_svd(cq[h], ck[h], r) for h in range(heads)]
        rv = [linalg.vo_whitened_svd(ca[h], w_o[h], r) for h in range(heads)]
        eq = [linalg.qk_logit_error(cq[h], ck[h], x.t_q, x.t_k) for h, x in enumerate(rq)]
        ev = [linalg.vo_output_error(ca[h], w_o[h], x.t_v, x.out_block) for h, x in enumerate(rv)]
        assert qk[r] == pytest.approx(sum(e for e, _ in eq) / sum(n for _, n in eq), abs=EXACT), r
        assert vo[r] == pytest.approx(sum(e for e, _ in ev) / sum(n for _, n in ev), abs=EXACT), r
    assert (
        qk[0] == vo[0] == 1.0
        and qk[d] == pytest.approx(0.0, abs=1e-12)
        and vo[d] == pytest.approx(0.0, abs=1e-12)
    )


def test_rank_deficient_keys_the_damped_error_overstates_the_true_one():
    """Cross-attention keys span a few text-token directions: once the rank covers them, the
    true logit error is ~0, while the damped covariance's isotropic floor still reads as error.
    The profile must report the truth (this was off by orders of magnitude before)."""
    d = 16
    cq, ck = spd(d, 1, 0.8)[None], spd(d, 2, 0.8, rank=4)[None]
    true = qk_error_curve(cq, ck, damping=1e-2)
    damped = [
        (x := linalg.qk_whitened_svd(cq[0], ck[0], r, 1e-2)).error / x.energy if r else 1.0
        for r in range(d + 1)
    ]
    # four key directions: rank 4 keeps all but the damping's perturbation of the basis (~5e-6)
    assert true[4] < 1e-4 and true[3] > 1e-2
    assert damped[4] > 100 * true[4]  # the damped reading: ~6.6e-3, over 1000x the truth


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


def _brute_force(units, profiles, target: int, grids, groups=()):
    """Minimum parameter-weighted error over every rank combination that fits ``target``."""
    names = list(units)
    total = sum(u.full_params for u in units.values())
    best = (math.inf, None)
    for combo in itertools.product(*(grids[n] for n in names)):
        ranks = dict(zip(names, combo, strict=True))
        if any(ranks[a] != ranks[b] for a, b in groups):
            continue
        if sum(ranks[n] * units[n].cost_per_rank for n in names) > target:
            continue
        value = sum(units[n].full_params / total * profiles[n][ranks[n]] for n in names)
        best = min(best, (value, combo), key=lambda t: t[0])
    return best[0]


@pytest.mark.parametrize("seed", range(6))
def test_error_allocation_equals_brute_force_with_unequal_costs_and_non_convex_curves(seed):
    """The dynamic programme is the constrained optimum: unequal costs per rank, curves with
    plateaus and cliffs (non-convex, where a greedy or a Lagrangian relaxation can miss), a
    target between grid sums. Reference: every combination of the rank grids."""
    g = torch.Generator().manual_seed(seed)
    units, profiles = {}, {}
    for i, (full, cost) in enumerate([(8, 7), (6, 13), (8, 5), (4, 29)]):
        n = f"u{i}"
        units[n] = UnitInfo(n, "ffn", f"b{i}", None, full, cost)
        drops = torch.rand(full, generator=g, dtype=F64) ** 3  # spiky: non-convex tails
        tail = torch.flip(torch.cumsum(torch.flip(drops, [0]), 0), [0]) / drops.sum()
        profiles[n] = [*tail.tolist(), 0.0]
    grids = {n: rank_grid(u.full_rank, 2, 2) for n, u in units.items()}
    compressible = sum(u.full_params for u in units.values())
    for fraction in (0.2, 0.35, 0.5, 0.6):  # the grid's floor (all at rank 2) is 63% removed
        target = math.floor(compressible * (1 - fraction))
        plan = plan_ranks(
            None,
            units,
            Budget(kept_params=target),
            mode="error",
            tau=0.0,
            r_min=2,
            multiple=2,
            profiles=profiles,
        )
        assert plan.params_after <= target
        assert plan.solver == {"method": "dp", "quantum": 2, "exact": True, "tie_qk_vo": False}  # costs even
        got = sum(u.params_before / compressible * profiles[n][u.rank] for n, u in plan.units.items())
        assert got == pytest.approx(_brute_force(units, profiles, target, grids), abs=1e-12)


def test_tied_allocation_gives_each_attention_one_rank_and_is_optimal_among_tied_plans():
    units, profiles = {}, {}
    for b, (qk_slope, vo_slope) in enumerate([(3.0, 0.2), (0.5, 1.5)]):
        for kind, slope, cost in (("qk", qk_slope, 11), ("vo", vo_slope, 17)):
            n = f"b{b}.attn1.{kind}"
            units[n] = UnitInfo(n, kind, f"b{b}", "attn1", 8, cost)
            profiles[n] = [math.exp(-slope * r) * (1 - r / 8) for r in range(9)]
    grids = {n: rank_grid(8, 1, 1) for n in units}
    target = 120
    free = plan_ranks(
        None, units, Budget(kept_params=target), mode="error", r_min=1, multiple=1, profiles=profiles, tau=1.0
    )
    tied = plan_ranks(
        None,
        units,
        Budget(kept_params=target),
        mode="error",
        r_min=1,
        multiple=1,
        profiles=profiles,
        tie_qk_vo=True,
        tau=1.0,
    )
    pairs = [(f"b{b}.attn1.qk", f"b{b}.attn1.vo") for b in range(2)]
    assert any(free.units[a].rank != free.units[b].rank for a, b in pairs)  # unconstrained: untied
    assert all(tied.units[a].rank == tied.units[b].rank for a, b in pairs)
    assert tied.solver["tie_qk_vo"] is True and tied.params_after <= target
    compressible = sum(u.full_params for u in units.values())
    got = sum(u.params_before / compressible * profiles[n][u.rank] for n, u in tied.units.items())
    assert got == pytest.approx(_brute_force(units, profiles, target, grids, pairs), abs=1e-12)


def _knapsack_min(options, target: int, cost=lambda c: c) -> float:
    """The least summed value of one option per group with summed ``cost(c)`` <= target: an
    independent reference for dp_allocate (plain dict DP over reachable costs, no quantum)."""
    best = {0: 0.0}
    for opts in options:
        new: dict[int, float] = {}
        for spent, v in best.items():
            for c, val in opts:
                t = spent + cost(c)
                if t <= target and v + val < new.get(t, math.inf):
                    new[t] = v + val
        best = new
    return min(best.values())


def test_dp_on_a_coarse_quantum_never_exceeds_the_budget():
    """Budgets too fine for the state limit are solved on rounded-up costs: within budget, the
    exact optimum of the rounded problem, and no worse than the exact optimum of the budget minus
    the slack the rounding can cost (n_groups * (q - 1): every plan that fits that fits rounded)."""
    from slimdiff.planning.solver import dp_allocate

    options = [[(c * 7, 1.0 / (1 + c)) for c in range(1, 30)] for _ in range(5)]
    exact = dp_allocate(options, 500)
    coarse = dp_allocate(options, 500, max_states=20)
    assert exact.exact and exact.quantum == 7 and not coarse.exact and coarse.quantum == 25
    cost = sum(options[g][i][0] for g, i in enumerate(coarse.choice))
    value = lambda r: sum(options[g][i][1] for g, i in enumerate(r.choice))  # noqa: E731
    q = coarse.quantum
    # sums of 5 float64 values in different orders: round-off ~1e-16, 1e-12 is ample
    assert value(exact) == pytest.approx(_knapsack_min(options, 500), abs=1e-12)  # 0.32917
    rounded = _knapsack_min(options, 500, cost=lambda c: -(-c // q) * q)
    assert cost <= 500 and value(coarse) == pytest.approx(rounded, abs=1e-12)  # 1/3 (cost 490)
    slack_free = _knapsack_min(options, q * (500 // q) - len(options) * (q - 1))  # budget 380: 0.42424
    assert value(exact) < value(coarse) <= slack_free + 1e-12  # coarse really is coarser here


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
