"""Rank allocation under a global budget, in parameters or in FLOPs at a serving shape (METHOD.md stage 4),
and the rank-plan file.

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

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from torch import nn

from slimdiff.families.units import UnitInfo, compression_units, count_parameters, short_unit_label

logger = logging.getLogger(__name__)

PLAN_FORMAT_VERSION = 1
AllocationMode = Literal["error", "influence", "uniform", "manual"]


class InfeasibleBudgetError(ValueError):
    """The requested budget cannot be met within r_min <= r_m <= R_m."""


class PlanValidationError(ValueError):
    """A rank plan does not match the model (or is internally inconsistent)."""


# --------------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """Exactly one of:

    * ``kept_params``: parameters kept in the compressible set (the compression units);
    * ``removed_params``: parameters removed from the compressible set;
    * ``removed_fraction``: share of the compressible parameters removed, in [0, 1);
    * ``total_params``: parameters of the whole UNet after compression (needs ``model_params``
      in ``plan_ranks``: the units alone do not know the size of the rest of the UNet);
    * ``removed_flops_fraction``: share of the compressible FLOPs at a serving shape removed, in
      [0, 1) (needs ``costs`` in ``plan_ranks``: ``slimdiff.planning.flops.unit_flop_costs``);
    * ``total_flops``: FLOPs of one forward of the whole denoiser at the serving shape after
      compression (needs ``costs``);
    * ``flops_speedup``: the whole forward's FLOPs at the serving shape divided by this factor
      (> 1; 1.35 = the model runs at most 1 / 1.35 of its FLOPs: the speedup's FLOP bound), the
      same target whatever share of the model the compressible layers are (needs ``costs``);
    * ``removed_latency_fraction``: share of the compressible latency of one forward at a serving
      shape on a device removed, in [0, 1) (needs ``costs``: ``slimdiff.planning.latency.unit_latency_costs``,
      a measured latency table).

    The compressible FLOPs are those the planned units' ranks decide: the model's FLOPs minus those
    of the same model with every planned unit at rank 0 (``FlopCosts.plan_flops``). The
    compressible latency likewise: the measured forward minus the latency the table predicts with
    every planned unit at rank 0 (extrapolated linearly below the lowest grid rank: a fixed
    per-call overhead is not compressible).
    """

    kept_params: int | None = None
    removed_params: int | None = None
    removed_fraction: float | None = None
    total_params: int | None = None
    removed_flops_fraction: float | None = None
    total_flops: int | None = None
    removed_latency_fraction: float | None = None
    flops_speedup: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in asdict(self).items() if v is not None}
        if len(given) != 1:
            raise ValueError(
                "Budget needs exactly one of kept_params, removed_params, removed_fraction, total_params, "
                "removed_flops_fraction, total_flops, flops_speedup, removed_latency_fraction; got "
                f"{sorted(given) or 'none'}"
            )
        v = self.flops_speedup
        if v is not None and (isinstance(v, bool) or not math.isfinite(float(v)) or float(v) <= 1.0):
            raise ValueError(f"Budget.flops_speedup must be a finite number > 1, got {v!r}")
        for key in ("kept_params", "removed_params", "total_params", "total_flops"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"Budget.{key} must be a non-negative int, got {v!r}")
        for key in ("removed_fraction", "removed_flops_fraction", "removed_latency_fraction"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not 0.0 <= float(v) < 1.0):
                raise ValueError(f"Budget.{key} must be in [0, 1), got {v!r}")

    @property
    def in_flops(self) -> bool:
        """Whether the budget counts FLOPs at a serving shape (else parameters)."""
        return any(v is not None for v in (self.removed_flops_fraction, self.total_flops, self.flops_speedup))

    @property
    def in_latency(self) -> bool:
        """Whether the budget counts measured latency at a serving shape on a device."""
        return self.removed_latency_fraction is not None

    @property
    def in_costs(self) -> bool:
        """Whether the budget is spent in a cost model's units (FLOPs or latency), not parameters."""
        return self.in_flops or self.in_latency

    def kept(self, compressible_params: int, model_params: int | None = None) -> int:
        """Kept parameters in the compressible set this budget asks for (before feasibility). For
        a FLOP budget: kept compressible FLOPs, with the arguments in FLOPs (``model_params`` =
        the whole model's FLOPs)."""
        if self.kept_params is not None:
            return self.kept_params
        if self.removed_params is not None:
            return compressible_params - self.removed_params
        fraction = next(
            (
                getattr(self, k)
                for k in ("removed_fraction", "removed_flops_fraction", "removed_latency_fraction")
                if getattr(self, k) is not None
            ),
            None,
        )
        if fraction is not None:
            return math.floor(compressible_params * (1.0 - float(fraction)))
        if model_params is None:
            raise ValueError(
                "Budget(total_params=...) needs plan_ranks(..., model_params=<UNet parameter count>)"
                if self.total_params is not None
                else f"Budget({next(iter(self.to_dict()))}=...) needs the model's FLOPs (plan_ranks(..., costs=...))"
            )
        if self.flops_speedup is not None:
            total = math.floor(model_params / float(self.flops_speedup))
        else:
            total = self.total_params if self.total_params is not None else self.total_flops
        return total - (model_params - compressible_params)

    def describe_range(self, lo: int, hi: int, compressible_params: int, model_params: int | None) -> str:
        """The feasible range [lo, hi] of kept compressible params (FLOPs for a FLOP budget), in
        this budget's own terms."""
        if self.removed_params is not None:
            return f"removed_params in [{compressible_params - hi}, {compressible_params - lo}]"
        for key in ("removed_fraction", "removed_flops_fraction", "removed_latency_fraction"):
            if getattr(self, key) is not None:
                return f"{key} in [{1 - hi / compressible_params:.6f}, {1 - lo / compressible_params:.6f}]"
        for key in ("total_params", "total_flops"):
            if getattr(self, key) is not None and model_params is not None:
                rest = model_params - compressible_params
                return f"{key} in [{rest + lo}, {rest + hi}]"
        if self.flops_speedup is not None and model_params is not None:
            rest = model_params - compressible_params
            return (
                f"flops_speedup in [{model_params / (rest + hi):.4f}, {model_params / max(rest + lo, 1):.4f}]"
            )
        what = "kept_flops" if self.in_flops else "kept_latency_quanta" if self.in_latency else "kept_params"
        return f"{what} in [{lo}, {hi}]"

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# --------------------------------------------------------------------------------------------
# Rank plan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitPlan:
    name: str
    kind: str  # "ffn" | "qk" | "vo"
    full_rank: int
    rank: int
    cost_per_rank: int
    score: float | None = None  # influence score of the unit (None: manual plan, or none given)
    predicted_error: float | None = None  # e_m(rank), relative truncation error (mode "error")
    # FLOPs per unit of rank at the plan's serving shape (``slimdiff.planning.flops.FlopCosts.per_rank``;
    # None: the plan was made without a FLOP cost model)
    flops_per_rank: int | None = None

    @property
    def params_before(self) -> int:
        return self.full_rank * self.cost_per_rank

    @property
    def params_after(self) -> int:
        return self.rank * self.cost_per_rank

    @property
    def keep_ratio(self) -> float:
        return self.rank / self.full_rank

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["flops_per_rank"] is None:  # absent from plans without a FLOP cost model: digests stay
            del d["flops_per_rank"]
        d["params_before"] = self.params_before
        d["params_after"] = self.params_after
        return d


def _digest_json(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def influence_digest(influence: Mapping[str, float]) -> str:
    """Content digest of the influence scores (repr of floats is exact and stable)."""
    return _digest_json({k: repr(float(v)) for k, v in sorted(influence.items())})


@dataclass(frozen=True)
class RankPlan:
    """Per-unit kept ranks plus everything needed to reproduce and audit them.

    Units not listed are left at full rank by ``compress_``. The JSON file is the contract
    between allocation, compression and save/load (``slimdiff.formats.io`` rebuilds shapes from it)."""

    units: dict[str, UnitPlan]
    mode: str = "manual"
    budget: dict = field(default_factory=dict)  # Budget.to_dict() (empty for manual plans)
    tau: float | None = None
    r_min: int = 8
    multiple: int = 8
    influence_digest: str | None = None
    target_params: int | None = None  # kept compressible params the budget asked for (before rounding)
    format_version: int = PLAN_FORMAT_VERSION
    profiles_digest: str | None = None  # error profiles the plan was made from (mode "error")
    # how the ranks were found: {"method": "dp", "quantum": q, "exact": bool, "tie_qk_vo": bool}, ...
    solver: dict = field(default_factory=dict)
    # the FLOP cost model the plan was made or measured with (empty: none): {"cost": "flops" |
    # "params" (what the budget counted), "serving": the shape, "qk_norm", "flops_before",
    # "flops_after" (one forward of the whole denoiser there), "compressible_flops",
    # "target_flops" (FLOP budgets)}
    cost_model: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format_version != PLAN_FORMAT_VERSION:
            raise PlanValidationError(
                f"rank plan format_version {self.format_version} is not supported (expected {PLAN_FORMAT_VERSION}); "
                "re-run plan_ranks with this slimdiff version"
            )
        for name, u in self.units.items():
            if name != u.name:
                raise PlanValidationError(f"{name}: plan entry is keyed {name!r} but names unit {u.name!r}")
            if u.kind not in ("ffn", "qk", "vo"):
                raise PlanValidationError(f"{name}: unknown unit kind {u.kind!r} (expected ffn, qk or vo)")
            if u.full_rank < 1 or u.cost_per_rank < 1:
                raise PlanValidationError(f"{name}: full_rank and cost_per_rank must be >= 1")
            if not 1 <= u.rank <= u.full_rank:
                raise PlanValidationError(
                    f"{name}: rank {u.rank} is out of range [1, {u.full_rank}] (full rank {u.full_rank})"
                )

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_ranks(cls, units: Mapping[str, UnitInfo], ranks: Mapping[str, int]) -> RankPlan:
        """A manual plan: the given ranks, every other unit of ``units`` at full rank."""
        unknown = sorted(set(ranks) - set(units))
        if unknown:
            raise PlanValidationError(f"unknown compression units in ranks: {unknown[:5]}")
        plans = {
            name: UnitPlan(name, u.kind, u.full_rank, int(ranks.get(name, u.full_rank)), u.cost_per_rank)
            for name, u in units.items()
        }
        return cls(units=plans, mode="manual")

    # -- queries ------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        return {name: u.rank for name, u in self.units.items()}

    def compressed_units(self) -> dict[str, UnitPlan]:
        """Units whose rank is below full (the ones ``compress_`` rewrites)."""
        return {name: u for name, u in self.units.items() if u.rank < u.full_rank}

    @property
    def params_before(self) -> int:
        return sum(u.params_before for u in self.units.values())

    @property
    def params_after(self) -> int:
        return sum(u.params_after for u in self.units.values())

    @property
    def removed_params(self) -> int:
        return self.params_before - self.params_after

    @property
    def flops_before(self) -> int | None:
        """FLOPs of one forward of the uncompressed denoiser at the serving shape (None: no cost model)."""
        return self.cost_model.get("flops_before")

    @property
    def flops_after(self) -> int | None:
        """FLOPs of one forward of the compressed denoiser at the serving shape (None: no cost model)."""
        return self.cost_model.get("flops_after")

    def to_dict(self) -> dict:
        out = {
            "format_version": self.format_version,
            "mode": self.mode,
            "budget": dict(self.budget),
            "tau": self.tau,
            "r_min": self.r_min,
            "multiple": self.multiple,
            "influence_digest": self.influence_digest,
            "profiles_digest": self.profiles_digest,
            "target_params": self.target_params,
            "totals": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "removed_params": self.removed_params,
            },
            "units": {name: u.to_dict() for name, u in self.units.items()},
        }
        if self.solver:  # absent from plans made before it was recorded: their digests stay valid
            out["solver"] = dict(self.solver)
        if self.cost_model:  # likewise
            out["cost_model"] = dict(self.cost_model)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> RankPlan:
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise PlanValidationError(
                f"rank plan format_version {version!r} is not supported (expected {PLAN_FORMAT_VERSION})"
            )
        units = {}
        for name, u in data["units"].items():
            entry = UnitPlan(
                name=u["name"],
                kind=u["kind"],
                full_rank=int(u["full_rank"]),
                rank=int(u["rank"]),
                cost_per_rank=int(u["cost_per_rank"]),
                score=u.get("score"),
                predicted_error=u.get("predicted_error"),
                flops_per_rank=None if u.get("flops_per_rank") is None else int(u["flops_per_rank"]),
            )
            if name != entry.name:
                raise PlanValidationError(
                    f"{name}: plan entry is keyed {name!r} but names unit {entry.name!r}"
                )
            if "params_after" in u and int(u["params_after"]) != entry.params_after:
                raise PlanValidationError(
                    f"{name}: params_after {u['params_after']} does not equal rank x cost_per_rank = "
                    f"{entry.params_after}; the plan file was edited inconsistently"
                )
            units[name] = entry
        plan = cls(
            units=units,
            mode=data.get("mode", "manual"),
            budget=dict(data.get("budget") or {}),
            tau=data.get("tau"),
            r_min=int(data.get("r_min", 8)),
            multiple=int(data.get("multiple", 8)),
            influence_digest=data.get("influence_digest"),
            target_params=data.get("target_params"),
            format_version=version,
            profiles_digest=data.get("profiles_digest"),
            solver=dict(data.get("solver") or {}),
            cost_model=dict(data.get("cost_model") or {}),
        )
        totals = data.get("totals")
        if totals and int(totals.get("params_after", plan.params_after)) != plan.params_after:
            raise PlanValidationError(
                f"plan totals.params_after {totals['params_after']} does not match the units' sum {plan.params_after}"
            )
        return plan

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of the plan (keys sorted, no whitespace)."""
        return _digest_json(self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Human-readable JSON (indented, units in module order)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RankPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))

    # -- validation ---------------------------------------------------------------------------
    def validate_against(self, model: nn.Module | Mapping[str, UnitInfo]) -> None:
        """Raise PlanValidationError naming the unit when the plan does not fit ``model``:
        unknown units, full ranks or costs that differ from the model, ranks out of [1, R_m]."""
        units = model if isinstance(model, Mapping) else compression_units(model)
        for name, u in self.units.items():
            info = units.get(name)
            if info is None:
                close = [n for n in units if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:3]
                raise PlanValidationError(
                    f"{name}: unknown compression unit for this model (e.g. {close}); the plan was made for "
                    "another UNet"
                )
            if info.kind != u.kind or info.full_rank != u.full_rank or info.cost_per_rank != u.cost_per_rank:
                raise PlanValidationError(
                    f"{name}: plan says kind={u.kind} full_rank={u.full_rank} cost_per_rank={u.cost_per_rank}, "
                    f"the model has kind={info.kind} full_rank={info.full_rank} cost_per_rank={info.cost_per_rank}"
                )
            if not 1 <= u.rank <= info.full_rank:
                raise PlanValidationError(f"{name}: rank {u.rank} is out of range [1, {info.full_rank}]")


# --------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------
def rank_grid(full_rank: int, r_min: int, multiple: int) -> list[int]:
    """Allowed ranks of one unit: {min(r_min, R), R} u {multiples of ``multiple`` in between}."""
    lo = min(r_min, full_rank)
    first = -(-lo // multiple) * multiple
    return sorted({lo, full_rank, *range(first, full_rank + 1, multiple)})


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


def _cost_gcd(options: list[list[tuple[int, float]]]) -> int:
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
    g = _cost_gcd(options)
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


def _keep_all(options: list[list[tuple[int, float]]], full: list[int] | None = None) -> DPResult:
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
        result = _keep_all(options, full)
    elif target // _cost_gcd(options) <= max_states:
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


def feasible_range(units: Mapping[str, UnitInfo], r_min: int = 8, multiple: int = 8) -> tuple[int, int]:
    """(min, max) kept compressible parameters reachable on the rounding grid."""
    lo = sum(rank_grid(u.full_rank, r_min, multiple)[0] * u.cost_per_rank for u in units.values())
    return lo, sum(u.full_params for u in units.values())


def flop_feasible_range(
    units: Mapping[str, UnitInfo], costs, r_min: int = 8, multiple: int = 8, tie_qk_vo: bool = False
) -> tuple[int, int, int]:
    """(min, max, compressible) kept compressible FLOPs at the cost model's serving shape: min over
    the rank grids, max = compressible = every planned unit whole (``costs``:
    ``slimdiff.planning.flops.FlopCosts``)."""
    groups = _flop_groups(units, costs, r_min, multiple, tie_qk_vo)
    compressible = sum(g.costs[g.full] for g in groups)
    return sum(min(g.costs) for g in groups), compressible, compressible


def _check_cost_kind(budget: Budget | None, costs) -> None:
    """A FLOP budget is spent with FLOP costs, a latency budget with a latency table (``budget``
    None: only the type of ``costs`` is checked)."""
    kind = getattr(costs, "kind", None)
    if kind not in ("flops", "latency"):
        raise ValueError(
            f"costs must be slimdiff.planning.flops.FlopCosts or slimdiff.planning.latency.LatencyCosts, got {type(costs).__name__}"
        )
    if budget is None:
        return
    if budget.in_flops and kind != "flops":
        raise ValueError(
            f"budget {budget.to_dict()} counts FLOPs but costs is a {kind} table: pass "
            "costs=slimdiff.planning.flops.unit_flop_costs(model, ServingShape(...)), or use removed_latency_fraction"
        )
    if budget.in_latency and kind != "latency":
        raise ValueError(
            f"budget {budget.to_dict()} counts latency but costs are {kind}: pass "
            "costs=slimdiff.planning.latency.unit_latency_costs(model, ServingShape(...)) (a measured latency table), "
            "or use removed_flops_fraction"
        )


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
        _check_cost_kind(budget, costs)
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
        _check_cost_kind(budget, costs)
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
        _check_cost_kind(None, costs)
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
    return _digest_json({n: [repr(float(x)) for x in profiles[n]] for n in sorted(units)})


def plan_for_model(
    unet: nn.Module, influence: Mapping[str, float] | None, budget: Budget, **kwargs
) -> RankPlan:
    """Convenience: ``plan_ranks`` over every unit of ``unet`` with ``model_params`` filled in."""
    return plan_ranks(
        influence, compression_units(unet), budget, model_params=count_parameters(unet), **kwargs
    )


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------
def plot_rank_plan(plan: RankPlan, path: str | Path) -> Path:
    """Bar chart of the kept ratio r_m / R_m per unit, coloured by kind, in module order."""
    # the object-oriented API draws without pyplot's global figure manager or backend switching
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    colors = {"ffn": "tab:blue", "qk": "tab:orange", "vo": "tab:green"}
    names = list(plan.units)
    ratios = [plan.units[n].keep_ratio for n in names]
    fig = Figure(figsize=(max(6.0, 0.22 * len(names)), 4.0))
    ax = fig.add_subplot()
    ax.bar(range(len(names)), ratios, color=[colors[plan.units[n].kind] for n in names])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([short_unit_label(n) for n in names], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept ratio r / R")
    removed = plan.removed_params / max(1, plan.params_before)
    summary = f"{removed:.1%} of compressible parameters removed"
    if plan.flops_before and plan.flops_after:
        summary += f", FLOPs {plan.flops_before / plan.flops_after:.3f}x fewer at the serving shape"
    ax.set_title(f"SlimDiff rank plan ({plan.mode}, tau={plan.tau})\n{summary}", fontsize=9)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
