"""The rank plan: one rank per compression unit, its digest, validation, file format and plot
(``RankPlan``, written by the plan stage, read by every later one)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from slimdiff.families.units import UnitInfo, compression_units, short_unit_label

PLAN_FORMAT_VERSION = 1


class PlanValidationError(ValueError):
    """A rank plan does not match the model (or is internally inconsistent)."""


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


def digest_json(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def influence_digest(influence: Mapping[str, float]) -> str:
    """Content digest of the influence scores (repr of floats is exact and stable)."""
    return digest_json({k: repr(float(v)) for k, v in sorted(influence.items())})


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
        return digest_json(self.to_dict())

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
