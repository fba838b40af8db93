"""Budgets: what a rank plan may keep, in parameters, FLOPs at a serving shape or measured latency
(``Budget``), and the checks that a budget is feasible for a set of units before any search."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from slimdiff.families.base import UnitInfo
from slimdiff.planning.plan import rank_grid


class InfeasibleBudgetError(ValueError):
    """The requested budget cannot be met within r_min <= r_m <= R_m."""


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


def feasible_range(units: Mapping[str, UnitInfo], r_min: int = 8, multiple: int = 8) -> tuple[int, int]:
    """(min, max) kept compressible parameters reachable on the rounding grid."""
    lo = sum(rank_grid(u.full_rank, r_min, multiple)[0] * u.cost_per_rank for u in units.values())
    return lo, sum(u.full_params for u in units.values())


def check_cost_kind(budget: Budget | None, costs) -> None:
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
