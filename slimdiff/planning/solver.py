"""The multiple-choice knapsack solvers behind the error-driven allocation: one option (cost,
value) per group and grid rank, minimise the summed value under a cost budget.

* "keep-all": a budget that keeps every parameter keeps every unit whole (a rule, not a search).
* "dp": ``dp_allocate``, dynamic programming over kept cost in multiples of the gcd of the costs, for
  budgets of at most ``DP_MAX_STATES`` such multiples (the toy models): the exact optimum.
* "bounded-dp": ``bounded_allocate`` for finer budgets (every real model): the LP relaxation over
  each group's convex hull gives a Lagrangian lower bound and an incumbent, reduced-cost fixing
  drops options no better plan can use, and a dynamic programme over Pareto states pruned by the
  LP bound finds the optimum, or a proved gap when a frontier or work limit drops states.

``slimdiff.planning.allocation`` builds the groups and calls these; docs/METHOD.md has the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimdiff.planning.budget import InfeasibleBudgetError

#: the grid dynamic programme's state limit (kept parameters / gcd of the costs). Budgets within it
#: are solved by ``dp_allocate`` on the gcd (exact); finer budgets (SD scale) by ``bounded_allocate``
DP_MAX_STATES = 1 << 18


#: ``bounded_allocate``'s frontier limit (Pareto states kept after each group); beyond it the
#: frontier is truncated to its most promising states and the result carries a proved gap
FRONTIER_MAX_STATES = 1 << 15


#: ``bounded_allocate``'s work limit (states generated); beyond it the search stops with the best
#: plan so far and a proved gap. Real model shapes needed up to 2e6 (SD v1.5, SDXL, PixArt-Sigma,
#: SD3.5-medium, synthetic curves); degenerate ones (every curve a line of one slope) reach the
#: limit and finish in ~4-6 s on 2 busy CPU cores
FRONTIER_MAX_WORK = 1 << 25


#: ties: objectives closer than OBJECTIVE_RTOL x (sum over groups of the largest |value|) are equal.
#: Summing ~10^2-10^3 float64 terms errs by ~1e-14 of that scale; 1e-12 stays clear of it.
OBJECTIVE_RTOL = 1e-12


@dataclass(frozen=True)
class DPResult:
    choice: list[int]  # option index per group
    quantum: int  # parameters per DP state (1: exact integer costs)
    exact: bool  # the result is the constrained optimum (within ``tolerance``)
    method: str = "dp"  # "dp" (dp_allocate), "bounded-dp" (bounded_allocate) or "keep-all"
    value: float | None = None  # summed value of ``choice`` (bounded-dp, keep-all)
    lower_bound: float | None = None  # proved lower bound on the optimum (bounded-dp, keep-all)
    tolerance: float = 0.0  # objective differences below this count as ties
    states: int | None = None  # largest Pareto frontier (bounded-dp)

    @property
    def gap(self) -> float | None:
        """Proved bound on value - optimum; None where no bound was computed (method "dp")."""
        if self.value is None or self.lower_bound is None:
            return None
        return max(0.0, self.value - self.lower_bound)


def _check_options(options: list[list[tuple[int, float]]], who: str) -> None:
    if not options or any(not opts for opts in options):
        raise ValueError(f"{who} needs at least one option per group")
    if min(c for opts in options for c, _ in opts) < 0:
        raise ValueError("option costs must be >= 0")


def cost_gcd(options: list[list[tuple[int, float]]]) -> int:
    g = 0
    for opts in options:
        for c, _ in opts:
            g = math.gcd(g, c)
    return max(g, 1)


def dp_allocate(
    options: list[list[tuple[int, float]]], target: int, max_states: int = DP_MAX_STATES
) -> DPResult:
    """Pick one (cost, value) option per group minimising the summed value with summed cost <= target.

    A multiple-choice knapsack solved by dynamic programming over kept parameters. Costs are
    counted in a quantum q: the gcd of all costs when target / gcd <= ``max_states`` (then the
    result is the exact constrained optimum, ``exact=True``), else q = ceil(target / max_states)
    with every cost rounded UP to a multiple of q: the result never exceeds the budget and is
    optimal for the rounded costs only (``exact=False``; it can miss the optimum and leave up to
    n_groups * q parameters unused). ``plan_ranks`` uses this only in the exact case and
    ``bounded_allocate`` beyond it. Ties: the smaller value, then the larger total cost, then the
    larger option index."""
    import numpy as np

    _check_options(options, "dp_allocate")
    g = cost_gcd(options)
    q = g if target // g <= max_states else -(-target // max_states)
    while True:
        qcost = [[-(-c // q) for c, _ in opts] for opts in options]
        base = [min(cs) for cs in qcost]  # every group pays at least its cheapest option
        cap = target // q - sum(base)
        if cap >= 0 or q == g:
            break
        # rounding up made a budget that sits just above the cheapest plan look infeasible
        q = max(g, q // 2)
    if cap < 0:
        raise InfeasibleBudgetError(f"no choice of options fits {target}")
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    choices = np.zeros((len(options), cap + 1), dtype=np.int32)
    for gi, opts in enumerate(options):
        new = np.full(cap + 1, inf)
        ch = choices[gi]
        for oi in range(len(opts) - 1, -1, -1):  # larger index first: it wins exact ties
            c = qcost[gi][oi] - base[gi]
            if c > cap:
                continue
            cand = dp[: cap + 1 - c] + opts[oi][1]
            tail = new[c:]
            better = cand < tail
            tail[better] = cand[better]
            ch[c:][better] = oi
        dp = new
    finite = np.isfinite(dp)
    if not finite.any():
        raise InfeasibleBudgetError(f"no choice of options fits {target}")
    best = float(dp[finite].min())
    tol = 1e-12 * max(1.0, abs(best))
    s = int(np.flatnonzero(finite & (dp <= best + tol)).max())  # ties: the most kept parameters
    choice = [0] * len(options)
    for gi in range(len(options) - 1, -1, -1):
        oi = int(choices[gi, s])
        choice[gi] = oi
        s -= qcost[gi][oi] - base[gi]
    return DPResult(choice, q, q == g)


def _lower_hull(c: list[int], v: list[float]) -> tuple[list[int], list[float]]:
    """The lower convex hull of points (c, v) given with c strictly increasing: its vertex indices
    and the slopes between consecutive vertices. The slopes strictly increase *as computed* (a
    vertex is popped when the computed slopes do not), so sorting segments by slope can never
    order one group's segments against its hull, whatever the rounding of near-collinear points."""

    def slope(a: int, b: int) -> float:
        return (v[b] - v[a]) / (c[b] - c[a])

    h: list[int] = []
    for i in range(len(c)):
        while len(h) >= 2 and slope(h[-2], h[-1]) >= slope(h[-1], i):
            h.pop()
        h.append(i)
    return h, [slope(a, b) for a, b in zip(h, h[1:], strict=False)]


def _spend_slack(costs, values, choice: list[int], target: int, *, ties: bool = False) -> list[int]:
    """Local improvement of a plan within the budget: repeatedly move one group to a costlier
    option that fits the slack, choosing the largest value decrease (ties: the larger cost increase,
    then the first group). Every costlier option of every group is considered, not only the next
    grid step, so a non-monotone curve cannot stop it. With ``ties`` it also takes moves that keep
    the value and keep more parameters (after all improving ones). Never raises the summed value."""
    import numpy as np

    choice = list(choice)
    spent = sum(int(costs[g][choice[g]]) for g in range(len(costs)))
    while True:
        slack = target - spent
        best = None
        for g, (c, v) in enumerate(zip(costs, values, strict=True)):
            i = choice[g]
            extra = c - c[i]
            cand = np.flatnonzero((extra > 0) & (extra <= slack) & (v <= v[i]))
            if cand.size == 0:
                continue
            gain = v[i] - v[cand]
            j = int(cand[np.lexsort((extra[cand], gain))[-1]])  # largest gain, then largest extra
            key = (float(v[i] - v[j]), int(extra[j]))
            if (key[0] > 0 or ties) and (best is None or key > best[0]):
                best = (key, g, j)
        if best is None:
            return choice
        _, g, j = best
        spent += int(costs[g][j] - costs[g][choice[g]])
        choice[g] = j


def _lp_greedy(costs, values, target: int) -> tuple[float, list[int]]:
    """The LP relaxation of the knapsack over each group's convex hull, solved greedily: hull
    segments by slope (most value removed per parameter first) until one no longer fits. Returns
    the multiplier lam = -(slope of that segment) (0 when every segment fits) and an integral plan:
    the segments taken, then any later segment that still fits, skipping groups already blocked."""
    segs = []
    for g, (c, v) in enumerate(zip(costs, values, strict=True)):
        cl, vl = c.tolist(), v.tolist()
        h, slopes = _lower_hull(cl, vl)
        for k in range(len(h) - 1):
            segs.append((slopes[k], g, k, cl[h[k + 1]] - cl[h[k]], h[k + 1]))
    segs.sort(key=lambda s: s[:3])
    cap = target - sum(int(c[0]) for c in costs)
    choice = [0] * len(costs)
    lam, blocked = None, set()
    for slope, g, _, dc, b in segs:
        if g in blocked:
            continue
        if dc > cap:
            if lam is None:
                lam = -slope
            blocked.add(g)
            continue
        cap -= dc
        choice[g] = b
    return (0.0 if lam is None else float(lam)), choice


def _lp_tables(costs, values, order: list[int]):
    """For k = 0..n: the LP relaxation of the groups order[k:] as a function of their budget,
    (base cost, base value, cumulative segment costs, cumulative segment values, slopes)."""
    import numpy as np

    n = len(order)
    tables: list = [None] * (n + 1)
    tables[n] = (0, 0.0, np.zeros(1), np.zeros(1), np.zeros(1))
    dcs: list[int] = []
    dvs: list[float] = []
    sls: list[float] = []
    base_c, base_v = 0, 0.0
    for k in range(n - 1, -1, -1):
        c, v = costs[order[k]].tolist(), values[order[k]].tolist()
        h, slopes = _lower_hull(c, v)
        for a, b, s in zip(h, h[1:], slopes, strict=False):
            dcs.append(c[b] - c[a])
            dvs.append(v[b] - v[a])
            sls.append(s)
        base_c += c[0]
        base_v += v[0]
        dc, dv, sl = (np.array(x, dtype=np.float64) for x in (dcs, dvs, sls))
        o = np.argsort(sl, kind="stable")  # within a group: hull order (slopes strictly increase)
        tables[k] = (
            base_c,
            base_v,
            np.concatenate([[0.0], np.cumsum(dc[o])]),
            np.concatenate([[0.0], np.cumsum(dv[o])]),
            np.concatenate([sl[o], [0.0]]),
        )
    return tables


def _lp_value(table, budget):
    """LP relaxation value of one suffix (``_lp_tables``) at each budget (inf where infeasible)."""
    import numpy as np

    base_c, base_v, cum_c, cum_v, slope = table
    x = (budget - base_c).astype(np.float64)
    k = np.searchsorted(cum_c, x, side="right") - 1
    out = base_v + cum_v[np.maximum(k, 0)] + (x - cum_c[np.maximum(k, 0)]) * slope[np.maximum(k, 0)]
    out[k < 0] = np.inf
    return out


def _bounded_dp(costs, values, target: int, threshold: float, max_states: int, max_work: int):
    """Dynamic programme over Pareto states (kept params, value), one group at a time, keeping only
    states whose bound (value + LP relaxation of the remaining groups at the remaining budget) is
    below ``threshold``. Beyond ``max_states`` states only those with the least bound are kept.
    Once ``max_work`` states have been generated, the frontier narrows to a beam that finishes
    within max_work / 4 more. Returns (choice of the best complete state or None, largest frontier,
    least bound of a state dropped by either limit (inf if none))."""
    import numpy as np

    n = len(costs)
    order = sorted(range(n), key=lambda g: (len(costs[g]), g))
    tables = _lp_tables(costs, values, order)
    remaining = [0] * (n + 1)  # options of the groups order[k:]
    for k in range(n - 1, -1, -1):
        remaining[k] = remaining[k + 1] + len(costs[order[k]])
    dropped, width = math.inf, max_states

    def truncate(nb):  # indices of the ``width`` states with the least bound, in their order
        nonlocal dropped
        if len(nb) <= width:
            return None
        o = np.argsort(nb, kind="stable")
        dropped = min(dropped, float(nb[o[width:]].min()))
        return np.sort(o[:width])

    def consolidate(parts):
        nc, nv, nb, par, opt = (np.concatenate([p[i] for p in parts]) for i in range(5))
        o = np.lexsort((nv, nc))  # kept parameters up, then value up
        nc, nv, nb, par, opt = nc[o], nv[o], nb[o], par[o], opt[o]
        ok = np.ones(len(nv), dtype=bool)
        ok[1:] = nv[1:] < np.minimum.accumulate(nv)[:-1]  # Pareto: strictly less value for more params
        nc, nv, nb, par, opt = nc[ok], nv[ok], nb[ok], par[ok], opt[ok]
        keep = truncate(nb)
        if keep is not None:
            nc, nv, nb, par, opt = nc[keep], nv[keep], nb[keep], par[keep], opt[keep]
        return nc, nv, nb, par, opt

    cost, value = np.zeros(1, dtype=np.int64), np.zeros(1)
    bound = value + _lp_value(tables[0], target - cost)
    layers, peak, work = [], 1, 0
    for k, g in enumerate(order):
        if width == max_states and work + len(cost) * len(costs[g]) > max_work:
            width = max(1, min(max_states, max_work // (4 * remaining[k])))
            keep = truncate(bound)
            if keep is not None:
                cost, value, bound = cost[keep], value[keep], bound[keep]
                layers[-1] = (layers[-1][0][keep], layers[-1][1][keep])
        work += len(cost) * len(costs[g])
        parts, count = [], 0
        for o, (c, v) in enumerate(zip(costs[g].tolist(), values[g].tolist(), strict=True)):
            nc, nv = cost + c, value + v
            nb = nv + _lp_value(tables[k + 1], target - nc)
            sel = np.flatnonzero(nb < threshold)
            if sel.size:
                parts.append((nc[sel], nv[sel], nb[sel], sel, np.full(sel.size, o)))
                count += sel.size
            if count > 16 * width:  # bound the memory of one layer
                parts = [consolidate(parts)]
                count = len(parts[0][0])
        if not parts:
            return None, peak, dropped
        cost, value, bound, par, opt = consolidate(parts)
        layers.append((par.astype(np.int32), opt.astype(np.int32)))
        peak = max(peak, len(cost))
    s = len(cost) - 1  # the least value (Pareto order), which is also the most kept parameters
    choice = [0] * n
    for k in range(n - 1, -1, -1):
        par, opt = layers[k]
        choice[order[k]] = int(opt[s])
        s = int(par[s])
    return choice, peak, dropped


def bounded_allocate(
    options: list[list[tuple[int, float]]],
    target: int,
    max_states: int = FRONTIER_MAX_STATES,
    max_work: int = FRONTIER_MAX_WORK,
) -> DPResult:
    """``dp_allocate``'s problem in exact integer costs, for budgets too fine for its grid: a
    branch-and-bound dynamic programme with a proved lower bound.

    1. Every group keeps its Pareto options (more cost only for strictly less value): a dominated
       option can be swapped for its dominator in any plan without loss.
    2. Lagrangian bound: for any lam >= 0 and any plan within the budget,
       sum_g v_g >= sum_g min_o (v_go + lam c_go) - lam * target =: LB(lam); lam is the multiplier
       of the LP relaxation (``_lp_greedy``), which maximises LB.
    3. Incumbent U: the LP's integral part, then ``_spend_slack`` (every affordable improving move).
    4. Reduced-cost fixing: with w_go = v_go + lam c_go - min_o (v_go + lam c_go) >= 0, every plan
       within the budget has value >= LB(lam) + sum_g w_g, so an option with w_go > U - LB(lam)
       is in no plan better than U and is dropped.
    5. ``_bounded_dp``: Pareto states (kept params, value) over the remaining options, group by
       group, pruned when value + LP bound of the remaining groups at the remaining budget is not
       below U - tol. A state dominated by another (no fewer params left, no less value) is
       dropped: any completion of it completes the other no worse. So every plan better than
       U - tol reaches the end, unless a state on its way was dropped by the frontier limit
       ``max_states`` or by the beam the work limit ``max_work`` (states generated) narrows to;
       the bound of such a state is <= that plan's value. Hence
       optimum >= min(U - tol, best found, least such bound), and ``lower_bound`` is the larger
       of that and LB(lam).
    6. ``_spend_slack`` with ties: leftover budget goes to options of equal value and more cost.

    ``gap = value - lower_bound`` is the proved distance to the optimum; ``exact`` means
    gap <= tol, tol = ``OBJECTIVE_RTOL`` x the sum of every group's largest |value|: always when
    neither limit dropped a state, and often still when one did (the dropped bounds are checked)."""
    import numpy as np

    _check_options(options, "bounded_allocate")
    if max_states < 1 or max_work < 1:
        raise ValueError(f"max_states and max_work must be >= 1, got {max_states}, {max_work}")
    n = len(options)
    pareto, costs, values = [], [], []
    for opts in options:
        kept, best = [], math.inf
        for i in sorted(range(len(opts)), key=lambda i, o=opts: (o[i][0], o[i][1], -i)):
            if opts[i][1] < best:
                kept.append(i)
                best = opts[i][1]
        pareto.append(kept)
        costs.append(np.array([opts[i][0] for i in kept], dtype=np.int64))
        values.append(np.array([float(opts[i][1]) for i in kept]))
    if sum(int(c[0]) for c in costs) > target:
        raise InfeasibleBudgetError(f"no choice of options fits {target}")
    tol = OBJECTIVE_RTOL * sum(float(np.abs(v).max()) for v in values)

    lam, choice = _lp_greedy(costs, values, target)
    lagrangian = sum(float(np.min(v + lam * c)) for c, v in zip(costs, values, strict=True)) - lam * target
    if sum(int(costs[g][choice[g]]) for g in range(n)) > target:  # cannot happen; never trust it
        choice = [0] * n
    choice = _spend_slack(costs, values, choice, target)
    incumbent = sum(float(values[g][choice[g]]) for g in range(n))

    allowed = []
    for c, v in zip(costs, values, strict=True):
        r = v + lam * c
        allowed.append(np.flatnonzero(r - r.min() <= incumbent - lagrangian + tol))
    found, peak, dropped = _bounded_dp(
        [costs[g][allowed[g]] for g in range(n)],
        [values[g][allowed[g]] for g in range(n)],
        target,
        incumbent - tol,
        max_states,
        max_work,
    )
    if found is not None:
        choice = [int(allowed[g][found[g]]) for g in range(n)]
    value = sum(float(values[g][choice[g]]) for g in range(n))
    # step 5's bound (a plan found is below U - tol); LB(lam) holds regardless
    lower = min(incumbent - tol, dropped, value if found is not None else math.inf)
    lower = min(value, max(lagrangian, lower))

    # back to the caller's option indices; spend leftover budget on no-worse options
    full_costs = [np.array([c for c, _ in opts], dtype=np.int64) for opts in options]
    full_values = [np.array([float(v) for _, v in opts]) for opts in options]
    choice = _spend_slack(
        full_costs, full_values, [pareto[g][choice[g]] for g in range(n)], target, ties=True
    )
    value = sum(float(full_values[g][choice[g]]) for g in range(n))
    lower = min(lower, value)
    return DPResult(
        choice,
        1,
        math.isinf(dropped) or value - lower <= tol,  # the first: gap = tol up to rounding
        method="bounded-dp",
        value=value,
        lower_bound=lower,
        tolerance=tol,
        states=peak,
    )


def keep_all(options: list[list[tuple[int, float]]], full: list[int] | None = None) -> DPResult:
    """The budget keeps every parameter (FLOP): every group takes its full-rank option (``full``:
    its index per group; default the costliest, which it is under parameter costs). Its value is
    compared with the unconstrained optimum (each group's least value), which is the constrained
    one too, since the budget does not bind."""
    if full is None:
        full = [max(range(len(opts)), key=lambda i, o=opts: (o[i][0], i)) for opts in options]
    choice = list(full)
    value = sum(float(opts[i][1]) for opts, i in zip(options, choice, strict=True))
    optimum = sum(min(float(v) for _, v in opts) for opts in options)
    tol = OBJECTIVE_RTOL * sum(max(abs(float(v)) for _, v in opts) for opts in options)
    return DPResult(
        choice, 1, value - optimum <= tol, method="keep-all", value=value, lower_bound=optimum, tolerance=tol
    )
