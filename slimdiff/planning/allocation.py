"""Rank allocation under a global budget, in parameters, FLOPs at a serving shape or latency (METHOD.md stage 4).
The budget is ``slimdiff.planning.budget``, the plan ``slimdiff.planning.plan``, the knapsack solvers
``slimdiff.planning.solver``.

Three modes. ``error`` (the default) spends the budget where it removes the most truncation
error; ``influence`` is METHOD.md's softmax of the spectral influence scores; ``uniform`` keeps
the same ratio everywhere.

Mode "error": with e_m(r) the unit's relative truncation error at rank r (``slimdiff.planning.spectra``:
the undamped output error of the rewrite each closed-form decomposition builds, under the
timestep-weighted covariances that spectral influence produced), minimise

    sum_m pi_m e_m(phi_m) + tau sum_m pi_m phi_m log phi_m     subject to the budget,

i.e. METHOD.md's objective with the linear utility s_m phi_m replaced by the measured loss
curve. tau = 0 is pure error-driven; tau -> inf is uniform. Why it is the default: on the toy
model, softmax-of-influence allocation lost to uniform allocation at every budget (high TRQ
marks anisotropic, i.e. the *most compressible*, units, and the softmax gives them more rank),
while the error mode beats uniform at every budget (docs/results.md, "Rank allocation";
``benchmarks/allocation_probe.py``). The choice of one grid rank per unit is a multiple-choice
knapsack; the plan is its optimum on the rank grids, or carries a proved bound on its distance to
it. The plan's ``solver`` field records which case ran (and, except for "dp", the objective, a
proved lower bound on the optimum and their gap, which are also logged):

* "keep-all": a budget that keeps every parameter keeps every unit whole. That is a rule, not a
  search: where a curve's least error lies below full rank, or tau > 0 (whose entropy term alone
  prefers phi = 1/e), the record's gap says what it gives up against the objective.
* "dp": a budget of at most ``DP_MAX_STATES`` multiples of the gcd of the costs (the toy model):
  ``dp_allocate``, dynamic programming over kept parameters, the exact optimum.
* "bounded-dp": finer budgets, i.e. every real model (SD v1.5: costs with gcd 16 against a budget
  of ~1.5e8 parameters, 9e6 states). ``bounded_allocate`` works in exact integer costs: the LP
  relaxation over each unit's convex hull gives a Lagrangian lower bound and an incumbent (its
  integral part, then every affordable improving rank change), reduced-cost fixing drops the
  options no better plan can use, and a dynamic programme over Pareto states (kept parameters,
  objective), pruned by objective + LP bound of the units still to come, finds the optimum.
  ``exact`` means the gap is at most ``OBJECTIVE_RTOL`` (1e-12) of the objective's scale; if the
  frontier or work limit (``FRONTIER_MAX_STATES``, ``FRONTIER_MAX_WORK``) drops states, the least
  bound among them still gives a proved gap. At SD v1.5, SDXL, PixArt-Sigma and SD3.5-medium
  shapes with synthetic curves it proves optimality in under 1 s on 2 CPU cores
  (``tests/test_allocation_exact.py``). The earlier solver of this regime (``dp_allocate`` on
  costs rounded up to a coarser quantum, 555 parameters at SD v1.5, then a fill that stopped at
  the first grid step that did not lower the error) missed the optimum in 18 of 475 brute-forced
  random cases at a 64-state limit; this one in none.

``tie_qk_vo`` gives the qk and vo units of each attention one shared rank (an allocation
constraint; compressed attention runs on the fused SDPA kernel either way, see
``slimdiff.families.attention``).

Budgets in FLOPs (``Budget(removed_flops_fraction=...)`` / ``Budget(total_flops=...)``, mode
"error" only): ``plan_ranks(..., costs=slimdiff.planning.flops.unit_flop_costs(model, ServingShape(...)))``
costs every option in FLOPs per denoiser forward at that serving shape instead of kept parameters;
the objective and the solver are the same (likewise ``Budget(removed_latency_fraction=...)`` with
``costs=slimdiff.planning.latency.unit_latency_costs(...)``, a measured latency table per unit and rank on a
device: both cost models implement ``slimdiff.planning.latency.CostModel``). An attention's planned qk and vo units are one group
whose options are all pairs of grid ranks (one shared rank under ``tie_qk_vo``), costed exactly
(``slimdiff.planning.flops.AttentionCost.flops``): a compressed attention runs both matmuls at one padded
width, so per-unit linear costs would misjudge them. The plan records its cost model, the FLOPs
before and after and the compressible FLOPs (``RankPlan.cost_model``).

Mode "influence": keep ratios phi_m = r_m / R_m maximise

    sum_m pi_m s_m phi_m - tau sum_m pi_m phi_m log phi_m

subject to the budget and r_min <= r_m <= R_m, with pi_m the unit's share of the compressible
parameters. The stationarity condition gives the closed form

    phi_m = clip(exp((s_m - mu) / tau), r_min / R_m, 1)

with one scalar mu, found by bisection so that the kept parameters sum_m c_m R_m phi_m equal the
budget (c_m = parameters per unit of rank). tau -> inf gives the same ratio everywhere
(uniform), tau -> 0 keeps the most influential units whole first (greedy).

Score normalisation (so that tau is unit-free): the influence scores are standardised,
s~_m = (s_m - mean(s)) / std(s) over the planned units (population std; all-equal scores become
0). tau is therefore measured in standard deviations of influence: at tau = 1 a unit one std
above the mean keeps e = 2.7x the ratio of an average unit (before clipping).

Rounding and repair of modes "influence" and "uniform" (what "exact budget" means): every rank
is rounded to the nearest point of its grid G_m = {r_min_m, R_m} u {multiples of ``multiple``
between them} (r_min_m = min(r_min, R_m)). The rounded plan is then repaired greedily, one grid
step at a time:

1. while the kept parameters exceed the budget, step down the unit whose rank exceeds its
   continuous optimum r*_m by the largest fraction of R_m ((r_m - r*_m) / R_m), ties: lower
   score, then name;
2. then, while some unit can step up without exceeding the budget, step up among those that fit
   the unit with the largest deficit (r*_m - r_m) / R_m, ties: higher score, then name.

The result never exceeds the budget and is *step-maximal*: the remaining slack is smaller than
the cost of every available single upward grid step, i.e. it is the closest achievable kept count
on the rounding grid reachable without exceeding the budget by single-step moves. (The global
closest subset sum is a knapsack problem; step-maximality is what is guaranteed and tested.)
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from torch import nn

from slimdiff.families.units import UnitInfo, compression_units, count_parameters
from slimdiff.planning.budget import Budget, InfeasibleBudgetError, check_cost_kind, feasible_range
from slimdiff.planning.plan import RankPlan, UnitPlan, digest_json, influence_digest, rank_grid
from slimdiff.planning.solver import (
    DP_MAX_STATES,
    FRONTIER_MAX_STATES,
    FRONTIER_MAX_WORK,
    DPResult,
    bounded_allocate,
    cost_gcd,
    dp_allocate,
    keep_all,
)

logger = logging.getLogger(__name__)

AllocationMode = Literal["error", "influence", "uniform", "manual"]


def normalise_scores(scores: Mapping[str, float]) -> dict[str, float]:
    """Standardise scores (mean 0, population std 1); all-equal scores map to 0."""
    values = [float(v) for v in scores.values()]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if std <= 1e-12 * max(1.0, abs(mean)):
        return dict.fromkeys(scores, 0.0)
    return {k: (float(v) - mean) / std for k, v in scores.items()}


def _continuous_ratios(
    scores: Mapping[str, float], units: Mapping[str, UnitInfo], target: int, tau: float, r_min: int
) -> dict[str, float]:
    """phi_m = clip(exp((s_m - mu)/tau), r_min_m/R_m, 1) with mu by bisection on the budget."""
    lo_ratio = {n: min(r_min, u.full_rank) / u.full_rank for n, u in units.items()}

    def ratios(mu: float) -> dict[str, float]:
        out = {}
        for n in units:
            z = (scores[n] - mu) / tau
            out[n] = min(1.0, max(lo_ratio[n], math.exp(min(z, 0.0))))  # exp(z) >= 1 clips to 1 anyway
        return out

    def kept(mu: float) -> float:
        r = ratios(mu)
        return sum(units[n].full_params * r[n] for n in units)

    s_max, s_min = max(scores.values()), min(scores.values())
    lo_mu, hi_mu = s_min, s_max + tau  # kept(s_min) = all full; widen hi_mu until kept <= target
    step = 2.0 * tau
    while kept(hi_mu) > target and step < 1e300:
        hi_mu = s_max + step
        step *= 2.0
    for _ in range(200):  # kept(mu) is continuous and non-increasing: plain bisection
        mid = 0.5 * (lo_mu + hi_mu)
        if kept(mid) > target:
            lo_mu = mid
        else:
            hi_mu = mid
        if hi_mu - lo_mu <= 1e-15 * max(1.0, abs(hi_mu)):
            break
    return ratios(hi_mu)


def _uniform_ratios(units: Mapping[str, UnitInfo], target: int, r_min: int) -> dict[str, float]:
    """One keep ratio phi for every unit (clipped at r_min_m/R_m), phi by bisection."""
    lo_ratio = {n: min(r_min, u.full_rank) / u.full_rank for n, u in units.items()}

    def kept(phi: float) -> float:
        return sum(u.full_params * max(lo_ratio[n], phi) for n, u in units.items())

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if kept(mid) > target:
            hi = mid
        else:
            lo = mid
    return {n: max(lo_ratio[n], lo) for n in units}


@dataclass(frozen=True)
class _Group:
    """Units the solver gives one joint choice: its options are rank tuples (one rank per name)
    with their integer costs; ``full`` is the option that keeps every unit whole."""

    names: tuple[str, ...]
    ranks: list[tuple[int, ...]]
    costs: list[int]
    full: int


def _param_groups(
    units: Mapping[str, UnitInfo], r_min: int, multiple: int, tied: list[list[str]] | None
) -> list[_Group]:
    """Cost = kept parameters; ``tied`` groups share one rank, every other unit is its own group."""
    grids = {n: rank_grid(u.full_rank, r_min, multiple) for n, u in units.items()}
    grouped = {n for grp in tied or [] for n in grp}
    all_groups = [list(grp) for grp in tied or []] + [[n] for n in units if n not in grouped]
    out = []
    for grp in all_groups:
        if len({tuple(grids[n]) for n in grp}) != 1:
            raise ValueError(f"tied units {grp} have different rank grids; they cannot share one rank")
        grid = grids[grp[0]]
        out.append(
            _Group(
                tuple(grp),
                [(r,) * len(grp) for r in grid],
                [sum(r * units[n].cost_per_rank for n in grp) for r in grid],
                len(grid) - 1,
            )
        )
    return out


def _cost_label(costs) -> str:
    return "FLOP" if costs.kind == "flops" else costs.kind


def _flop_groups(units: Mapping[str, UnitInfo], costs, r_min: int, multiple: int, tie: bool) -> list[_Group]:
    """Cost = the cost model's (FLOPs at the serving shape, ``slimdiff.planning.flops.FlopCosts``; latency
    quanta, ``slimdiff.planning.latency.LatencyCosts``) minus that of the group at rank 0: an FFN by
    ``costs.unit_cost``; an attention's planned qk and vo units are one group whose options are
    every pair of grid ranks (one shared rank with ``tie``), costed exactly by
    ``costs.attention_cost`` (a compressed attention runs both matmuls at one padded width)."""
    missing = [n for n in units if not costs.has_unit(n)]
    if missing:
        raise ValueError(
            f"the {_cost_label(costs)} cost model has no cost for {len(missing)} planned units, e.g. {missing[:3]}"
        )
    grids = {n: rank_grid(u.full_rank, r_min, multiple) for n, u in units.items()}
    out: list[_Group] = []
    attentions: dict[str, dict[str, str]] = {}
    for n in units:
        if n in costs.unit_attention:
            module, kind = costs.unit_attention[n]
            attentions.setdefault(module, {})[kind] = n
        else:
            zero = costs.unit_cost(n, 0)
            out.append(
                _Group(
                    (n,),
                    [(r,) for r in grids[n]],
                    [costs.unit_cost(n, r) - zero for r in grids[n]],
                    len(grids[n]) - 1,
                )
            )
    for module, members in attentions.items():
        d = costs.head_dim(module)
        names = tuple(members[k] for k in ("qk", "vo") if k in members)
        if tie and len(names) == 2:
            if grids[names[0]] != grids[names[1]]:
                raise ValueError(
                    f"tied units {list(names)} have different rank grids; they cannot share one rank"
                )
            combos = [(r, r) for r in grids[names[0]]]
        else:
            combos = list(itertools.product(*(grids[n] for n in names)))

        def flops(combo: tuple[int, ...], members=members, names=names, module=module, d=d) -> int:
            r = dict(zip(names, combo, strict=True))
            return costs.attention_cost(module, r.get(members.get("qk"), d), r.get(members.get("vo"), d))

        zero = flops((0,) * len(names))
        full = tuple(units[n].full_rank for n in names)
        out.append(_Group(names, combos, [flops(c) - zero for c in combos], combos.index(full)))
    return out


def _groups(
    units: Mapping[str, UnitInfo], r_min: int, multiple: int, tie_qk_vo: bool, costs=None
) -> list[_Group]:
    if costs is not None:
        return _flop_groups(units, costs, r_min, multiple, tie_qk_vo)
    return _param_groups(units, r_min, multiple, qk_vo_groups(units) if tie_qk_vo else None)


def _error_ranks(
    profiles: Mapping[str, list[float]],
    units: Mapping[str, UnitInfo],
    target: int,
    tau: float,
    r_min: int,
    multiple: int,
    groups: list[list[str]] | None = None,
    *,
    max_states: int | None = None,
    max_frontier: int | None = None,
    solver_groups: list[_Group] | None = None,
) -> tuple[dict[str, int], DPResult]:
    """Minimise sum_m pi_m (e_m(r_m) + tau phi_m log phi_m), phi_m = r_m / R_m, over the rank
    grids subject to sum_g cost_g <= target (mode "error", see the module docstring).

    ``groups`` ties units to one shared rank (e.g. an attention's qk and vo units, which need the
    same grid); every unit not in a group is its own group; the cost is kept parameters.
    ``solver_groups`` (``_groups``) gives the groups, their options and costs instead (FLOP
    budgets). A target that keeps every unit whole keeps every unit whole; a target within
    ``max_states`` (default ``DP_MAX_STATES``) multiples of the gcd of the costs is solved exactly
    by ``dp_allocate``; any other by ``bounded_allocate`` (frontier limit ``max_frontier``, default
    ``FRONTIER_MAX_STATES``; work limit ``FRONTIER_MAX_WORK``)."""
    max_states = DP_MAX_STATES if max_states is None else max_states
    max_frontier = FRONTIER_MAX_STATES if max_frontier is None else max_frontier
    total = sum(u.full_params for u in units.values())

    def objective(n: str, g: int) -> float:  # pi_m (e_m(phi) + tau phi log phi), phi = g / R_m
        u = units[n]
        phi = g / u.full_rank
        return u.full_params / total * (profiles[n][g] + tau * phi * math.log(phi))

    if solver_groups is None:
        solver_groups = _param_groups(units, r_min, multiple, groups)
    options = [
        [
            (c, sum(objective(n, r) for n, r in zip(grp.names, rs, strict=True)))
            for rs, c in zip(grp.ranks, grp.costs, strict=True)
        ]
        for grp in solver_groups
    ]
    full = [grp.full for grp in solver_groups]
    if target >= sum(opts[i][0] for opts, i in zip(options, full, strict=True)):
        result = keep_all(options, full)
    elif target // cost_gcd(options) <= max_states:
        result = dp_allocate(options, target, max_states)
    else:
        result = bounded_allocate(options, target, max_frontier, FRONTIER_MAX_WORK)
    ranks: dict[str, int] = {}
    for grp, i in zip(solver_groups, result.choice, strict=True):
        ranks.update(zip(grp.names, grp.ranks[i], strict=True))
    return {n: ranks[n] for n in units}, result


def _q(x: float) -> float:
    """Quantise a ratio deviation so that differences below 1e-9 (bisection noise, tau -> inf)
    count as ties and fall through to the documented tie-breaks."""
    return round(x, 9)


def _round_and_repair(
    continuous: Mapping[str, float],
    scores: Mapping[str, float],
    units: Mapping[str, UnitInfo],
    target: int,
    r_min: int,
    multiple: int,
) -> dict[str, int]:
    grids = {n: rank_grid(u.full_rank, r_min, multiple) for n, u in units.items()}
    target_rank = {n: continuous[n] * units[n].full_rank for n in units}
    idx = {}
    for n, g in grids.items():  # nearest grid point (ties: the lower one)
        idx[n] = min(range(len(g)), key=lambda i, n=n, g=g: (abs(g[i] - target_rank[n]), g[i]))

    def rank(n: str) -> int:
        return grids[n][idx[n]]

    kept = sum(rank(n) * units[n].cost_per_rank for n in units)
    while kept > target:  # 1. step down the most over-allocated unit
        movable = [n for n in units if idx[n] > 0]
        worst = max(
            movable, key=lambda n: (_q((rank(n) - target_rank[n]) / units[n].full_rank), -scores[n], n)
        )
        step = (rank(worst) - grids[worst][idx[worst] - 1]) * units[worst].cost_per_rank
        idx[worst] -= 1
        kept -= step
    while True:  # 2. fill the slack with the most under-allocated unit whose next step fits
        fits = []
        for n in units:
            if idx[n] + 1 < len(grids[n]):
                step = (grids[n][idx[n] + 1] - rank(n)) * units[n].cost_per_rank
                if kept + step <= target:
                    fits.append((n, step))
        if not fits:
            break
        n, step = max(
            fits,
            key=lambda f: (_q((target_rank[f[0]] - rank(f[0])) / units[f[0]].full_rank), scores[f[0]], f[0]),
        )
        idx[n] += 1
        kept += step
    return {n: rank(n) for n in units}


def qk_vo_groups(units: Mapping[str, UnitInfo]) -> list[list[str]]:
    """[[{block}.{attn}.qk, {block}.{attn}.vo], ...] for every attention whose two units are both
    planned: the pairs ``tie_qk_vo`` gives one shared rank."""
    by_attn: dict[tuple[str, str | None], dict[str, str]] = {}
    for n, u in units.items():
        if u.kind in ("qk", "vo"):
            by_attn.setdefault((u.block, u.attn), {})[u.kind] = n
    return [[d["qk"], d["vo"]] for d in by_attn.values() if len(d) == 2]


def smallest_params_plan(
    by_params: Callable[[int], RankPlan], units: Mapping[str, UnitInfo], meets: Callable[[RankPlan], bool]
) -> RankPlan:
    """The plan ``by_params(removed_params)`` of the smallest parameter removal whose plan ``meets``
    a condition (a cost target: FLOPs or latency at a serving shape), by bisection over the removed
    parameters. Costs fall as more parameters go, though not strictly (a rounding or an exact
    solver may trade one unit for another), so the returned plan is checked, not assumed, to meet
    the condition; removals the allocator finds infeasible count as too large.
    InfeasibleBudgetError when no removal meets it."""
    lo, hi = 0, sum(u.full_params for u in units.values()) - 1
    best = None
    while lo <= hi:  # every removal below lo fails; best (if any) meets the condition
        mid = (lo + hi) // 2
        try:
            plan = by_params(mid)
        except InfeasibleBudgetError:
            hi = mid - 1
            continue
        if meets(plan):
            best, hi = plan, mid - 1
        else:
            lo = mid + 1
    if best is None:
        raise InfeasibleBudgetError("no parameter budget of these units meets the cost target")
    return best


def _plan_by_params_to_cost(influence, units, budget, costs, **opts) -> RankPlan:
    """Modes "uniform" / "influence" under a FLOP or latency budget: their ratios are rounded under
    a parameter count, so the count is the smallest one whose plan fits the cost budget."""
    tie = opts.pop("tie_qk_vo")
    target = check_feasible(
        units, budget, opts["r_min"], opts["multiple"], opts["model_params"], costs=costs, tie_qk_vo=tie
    )
    limit = target + costs.plan_cost(dict.fromkeys(units, 0))

    def by_params(removed: int) -> RankPlan:
        return plan_ranks(
            influence, units, Budget(removed_params=removed), costs=costs, tie_qk_vo=tie, **opts
        )

    def fits(plan: RankPlan) -> bool:
        return costs.plan_cost({n: u.rank for n, u in plan.units.items()}) <= limit

    try:
        plan = smallest_params_plan(by_params, units, fits)
    except InfeasibleBudgetError as err:
        raise InfeasibleBudgetError(f"budget {budget.to_dict()}: {err}") from err
    record = dict(plan.cost_model)
    if costs.kind == "flops":
        record.update(cost="flops", target_flops=limit)
    else:
        record.update(cost="latency", target_latency_s=costs.seconds(limit))
    solver = {
        **plan.solver,
        "cost_search": "the smallest parameter budget whose plan fits the cost budget (bisection)",
        "removed_params": plan.budget.get("removed_params"),
    }
    return replace(plan, budget=budget.to_dict(), target_params=None, solver=solver, cost_model=record)


def plan_ranks(
    influence: Mapping[str, float] | None,
    units: Mapping[str, UnitInfo],
    budget: Budget,
    *,
    tau: float = 0.0,
    r_min: int = 8,
    multiple: int = 8,
    mode: AllocationMode = "error",
    model_params: int | None = None,
    profiles: Mapping[str, list[float]] | None = None,
    tie_qk_vo: bool = False,
    costs=None,
) -> RankPlan:
    """Allocate per-unit ranks under ``budget`` (see the module docstring for the exact rules).

    ``influence`` maps every unit name to its spectral influence s_m (needed for mode="influence";
    optional otherwise, where it only breaks ties and is recorded); ``profiles`` maps every unit to
    its relative error curve [e(0), ..., e(R_m)] (``slimdiff.planning.spectra.error_profiles``; needed for
    mode="error"). ``units`` comes from ``slimdiff.families.units.compression_units(unet)`` (a subset
    restricts compression to those units: e.g. only the FFN units). ``model_params`` is the
    whole UNet's parameter count, needed only for ``Budget(total_params=...)``.

    ``costs`` (``slimdiff.planning.flops.unit_flop_costs(model, ServingShape(...))``): the FLOP cost model
    at a serving shape. A FLOP budget (``removed_flops_fraction``, ``total_flops``) needs it and
    mode "error": the same exact solver then minimises the error with each option costed in
    FLOPs. With a parameter budget it only adds the FLOPs before and after to the plan's record.
    A latency budget (``removed_latency_fraction``) needs ``costs`` =
    ``slimdiff.planning.latency.unit_latency_costs(model, ServingShape(...))`` (a measured latency table,
    integer costs in quanta of 1 ps) and mode "error"; the plan records the table (device, dtype,
    ``table_digest``) and the predicted latency before and after."""
    if mode not in ("error", "influence", "uniform"):
        raise ValueError(f"mode must be 'error', 'influence' or 'uniform', got {mode!r}")
    if not units:
        raise ValueError("plan_ranks needs at least one compression unit")
    if r_min < 1 or multiple < 1:
        raise ValueError(f"r_min and multiple must be >= 1, got r_min={r_min}, multiple={multiple}")
    if budget.in_costs:
        if costs is None:
            raise ValueError(
                f"budget {budget.to_dict()} counts FLOPs: plan_ranks needs costs="
                "slimdiff.planning.flops.unit_flop_costs(model, ServingShape(...))"
                if budget.in_flops
                else f"budget {budget.to_dict()} counts latency: plan_ranks needs costs="
                "slimdiff.planning.latency.unit_latency_costs(model, ServingShape(...)) (a measured latency table)"
            )
        check_cost_kind(budget, costs)
        if mode != "error":  # ratios rounded under a parameter count: the smallest count that meets the cost
            return _plan_by_params_to_cost(
                influence,
                units,
                budget,
                costs,
                tau=tau,
                r_min=r_min,
                multiple=multiple,
                mode=mode,
                model_params=model_params,
                profiles=profiles,
                tie_qk_vo=tie_qk_vo,
            )
    if mode == "influence":
        if not tau > 0 or not math.isfinite(tau):
            raise ValueError(f"tau must be a positive finite number for mode='influence', got {tau!r}")
        _check_per_unit("influence scores", influence, units, "mode='influence' needs influence scores")
    if mode == "error":
        if not tau >= 0 or not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number >= 0 for mode='error', got {tau!r}")
        _check_per_unit("error profiles", profiles, units, "mode='error' needs error profiles")
        short = [n for n in units if len(profiles[n]) != units[n].full_rank + 1]
        if short:
            n = short[0]
            raise ValueError(
                f"error profile of {n} has {len(profiles[n])} points, expected {units[n].full_rank + 1} "
                "(ranks 0..R): the profiles were computed on another model"
            )
    if costs is not None:
        check_cost_kind(None, costs)
        missing = [n for n in units if not costs.has_unit(n)]
        if missing:
            raise ValueError(
                f"the {_cost_label(costs)} cost model has no cost for {len(missing)} planned units, e.g. "
                f"{missing[:3]}: it was made for another model"
            )
        table = getattr(costs, "full_rank", {})
        wrong = [n for n in units if n in table and table[n] != units[n].full_rank]
        if wrong:
            n = wrong[0]
            raise ValueError(
                f"the {_cost_label(costs)} cost model was made for another model: {n} has full rank "
                f"{table[n]} there, {units[n].full_rank} here"
            )

    compressible = sum(u.full_params for u in units.values())
    target = check_feasible(units, budget, r_min, multiple, model_params, costs=costs, tie_qk_vo=tie_qk_vo)

    raw = (
        {n: float(influence[n]) for n in units} if influence and all(n in influence for n in units) else None
    )
    digest = influence_digest(raw) if raw is not None else None
    if mode == "error":
        if budget.in_costs:
            ranks, dp = _error_ranks(
                profiles,
                units,
                target,
                tau,
                r_min,
                multiple,
                solver_groups=_flop_groups(units, costs, r_min, multiple, tie_qk_vo),
            )
        else:
            ranks, dp = _error_ranks(
                profiles, units, target, tau, r_min, multiple, qk_vo_groups(units) if tie_qk_vo else None
            )
        solver = _solver_record(dp, tie_qk_vo)
    else:
        solver = {"method": "closed-form+repair" if mode == "influence" else "uniform+repair"}
        if mode == "influence":
            scores = normalise_scores(raw)
            continuous = _continuous_ratios(scores, units, target, tau, r_min)
        else:
            # scores only break ties in the repair (so uniform == influence at tau -> inf, exactly)
            scores = normalise_scores(raw) if raw is not None else dict.fromkeys(units, 0.0)
            continuous = _uniform_ratios(units, target, r_min)
        ranks = _round_and_repair(continuous, scores, units, target, r_min, multiple)
    cost_model = {}
    if costs is not None and costs.kind == "flops":
        zero = costs.plan_flops(dict.fromkeys(units, 0))
        cost_model = {
            "cost": "flops" if budget.in_flops else "params",
            **costs.to_dict(),
            "flops_before": costs.total,
            "flops_after": costs.plan_flops(ranks),
            "compressible_flops": costs.total - zero,
        }
        if budget.in_flops:
            cost_model["target_flops"] = target + zero
    elif costs is not None:  # latency: predicted seconds per forward (the table's quanta, as seconds)
        zero = costs.plan_cost(dict.fromkeys(units, 0))
        cost_model = {
            "cost": "latency" if budget.in_latency else "params",
            **costs.to_dict(),
            "latency_before_s": costs.seconds(costs.total),
            "latency_after_s": costs.seconds(costs.plan_cost(ranks)),
            "compressible_latency_s": costs.seconds(costs.total - zero),
        }
        if budget.in_latency:
            cost_model["target_latency_s"] = costs.seconds(target + zero)
    plan = RankPlan(
        units={
            n: UnitPlan(
                n,
                u.kind,
                u.full_rank,
                ranks[n],
                u.cost_per_rank,
                None if raw is None else raw[n],
                None if profiles is None or n not in profiles else float(profiles[n][ranks[n]]),
                None if costs is None or costs.kind != "flops" else costs.per_rank[n],
            )
            for n, u in units.items()
        },
        mode=mode,
        budget=budget.to_dict(),
        tau=float(tau) if mode in ("error", "influence") else None,
        r_min=r_min,
        multiple=multiple,
        influence_digest=digest,
        target_params=None if budget.in_costs else target,
        profiles_digest=_profiles_digest(profiles, units) if mode == "error" else None,
        solver=solver,
        cost_model=cost_model,
    )
    if budget.in_latency:
        logger.info(
            "rank plan (%s): %.4f of %.4f ms per forward predicted at %s on %s (target %.4f ms), %d of %d units "
            "compressed",
            mode,
            1e3 * cost_model["latency_after_s"],
            1e3 * cost_model["latency_before_s"],
            costs.shape.to_dict(),
            costs.device,
            1e3 * cost_model["target_latency_s"],
            len(plan.compressed_units()),
            len(units),
        )
    elif budget.in_flops:
        logger.info(
            "rank plan (%s): %d of %d FLOPs per forward at %s (target %d, slack %d), %d of %d units compressed",
            mode,
            cost_model["flops_after"],
            costs.total,
            costs.shape.to_dict(),
            cost_model["target_flops"],
            cost_model["target_flops"] - cost_model["flops_after"],
            len(plan.compressed_units()),
            len(units),
        )
    else:
        logger.info(
            "rank plan (%s): kept %d of %d compressible params (target %d, slack %d), %d of %d units compressed",
            mode,
            plan.params_after,
            compressible,
            target,
            target - plan.params_after,
            len(plan.compressed_units()),
            len(units),
        )
    return plan


def _solver_record(result: DPResult, tie_qk_vo: bool) -> dict:
    """The plan's ``solver`` entry for mode "error"; logs the proved bound on the gap."""
    if result.method == "dp":  # exact on the gcd of the costs (the record of earlier plans)
        return {
            "method": "dp",
            "quantum": result.quantum,
            "exact": result.exact,
            "tie_qk_vo": bool(tie_qk_vo),
        }
    record = {
        "method": result.method,
        "exact": result.exact,
        "objective": result.value,
        "lower_bound": result.lower_bound,
        "gap": result.gap,
        "tolerance": result.tolerance,
    }
    if result.states is not None:
        record["states"] = result.states
    record["tie_qk_vo"] = bool(tie_qk_vo)
    if result.exact:
        note = f"optimal within {result.tolerance:.1g}"
    elif result.method == "keep-all":
        note = "the budget keeps every parameter, so every unit stays whole"
    else:
        note = "frontier limit reached: not proved optimal"
    (logger.info if result.exact or result.method == "keep-all" else logger.warning)(
        "error allocation (%s): objective %.9g, proved lower bound %.9g, gap %.3g (%s)",
        result.method,
        result.value,
        result.lower_bound,
        result.gap,
        note,
    )
    return record


def _check_per_unit(what: str, values: Mapping | None, units: Mapping[str, UnitInfo], need: str) -> None:
    if values is None:
        raise ValueError(f"{need} (dict unit name -> value)")
    missing = sorted(set(units) - set(values))
    if missing:
        raise ValueError(f"{what} missing for {len(missing)} units, e.g. {missing[:3]}")
    extra = sorted(set(values) - set(units))
    if extra:
        logger.info("ignoring %s of %d units not being planned, e.g. %s", what, len(extra), extra[:3])
    bad = [n for n in units if not all(math.isfinite(float(v)) for v in _as_list(values[n]))]
    if bad:
        raise ValueError(f"{what} must be finite; not for {bad[:3]}")


def _as_list(v) -> list:
    return list(v) if isinstance(v, list | tuple) else [v]


def _profiles_digest(profiles: Mapping[str, list[float]], units: Mapping[str, UnitInfo]) -> str:
    return digest_json({n: [repr(float(x)) for x in profiles[n]] for n in sorted(units)})


def plan_for_model(
    unet: nn.Module, influence: Mapping[str, float] | None, budget: Budget, **kwargs
) -> RankPlan:
    """Convenience: ``plan_ranks`` over every unit of ``unet`` with ``model_params`` filled in."""
    return plan_ranks(
        influence, compression_units(unet), budget, model_params=count_parameters(unet), **kwargs
    )


def flop_feasible_range(
    units: Mapping[str, UnitInfo], costs, r_min: int = 8, multiple: int = 8, tie_qk_vo: bool = False
) -> tuple[int, int, int]:
    """(min, max, compressible) kept compressible FLOPs at the cost model's serving shape: min over
    the rank grids, max = compressible = every planned unit whole (``costs``:
    ``slimdiff.planning.flops.FlopCosts``)."""
    groups = _flop_groups(units, costs, r_min, multiple, tie_qk_vo)
    compressible = sum(g.costs[g.full] for g in groups)
    return sum(min(g.costs) for g in groups), compressible, compressible


def check_feasible(
    units: Mapping[str, UnitInfo],
    budget: Budget,
    r_min: int = 8,
    multiple: int = 8,
    model_params: int | None = None,
    *,
    costs=None,
    tie_qk_vo: bool = False,
) -> int | None:
    """The kept compressible parameters ``budget`` asks for (FLOPs for a FLOP budget); raises
    InfeasibleBudgetError (with the feasible range in the budget's own terms) when no plan on the
    rank grid can meet it. A parameter budget needs only the units' shapes: callers check it before
    any model runs. A FLOP budget needs ``costs`` (``slimdiff.planning.flops.unit_flop_costs``, a meta-device
    trace at the serving shape); without them it cannot be checked here and None is returned."""
    if budget.in_costs:
        if costs is None:
            return None
        check_cost_kind(budget, costs)
        lo, hi, compressible = flop_feasible_range(units, costs, r_min, multiple, tie_qk_vo)
        target = budget.kept(compressible, costs.total)
        if not lo <= target <= hi:
            if budget.in_latency:
                ms = costs.quantum * 1e3
                raise InfeasibleBudgetError(
                    f"budget {budget.to_dict()} asks to keep {target * ms:.6g} ms of {compressible * ms:.6g} ms "
                    f"compressible latency at the serving shape {costs.shape.to_dict()} on {costs.device}; "
                    f"feasible with r_min={r_min}, multiple={multiple}: kept latency in [{lo * ms:.6g}, "
                    f"{hi * ms:.6g}] ms ({budget.describe_range(lo, hi, compressible, costs.total)})"
                )
            raise InfeasibleBudgetError(
                f"budget {budget.to_dict()} asks to keep {target} of {compressible} compressible FLOPs at the "
                f"serving shape {costs.shape.to_dict()}; feasible with r_min={r_min}, multiple={multiple}: "
                f"kept FLOPs in [{lo}, {hi}] ({budget.describe_range(lo, hi, compressible, costs.total)})"
            )
        return target
    compressible = sum(u.full_params for u in units.values())
    target = budget.kept(compressible, model_params)
    lo, hi = feasible_range(units, r_min, multiple)
    if not lo <= target <= hi:
        raise InfeasibleBudgetError(
            f"budget {budget.to_dict()} asks to keep {target} of {compressible} compressible parameters; "
            f"feasible with r_min={r_min}, multiple={multiple}: kept_params in [{lo}, {hi}] "
            f"({budget.describe_range(lo, hi, compressible, model_params)})"
        )
    return target
