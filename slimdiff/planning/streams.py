"""The budget across token streams (MMDiT): how a plan splits the removed parameters between the
image stream and the text stream, and a plan with a fixed per-stream split to compare against.

In an MMDiT both streams have their own weights, but a joint attention's heads are shared: a QK or
VO rank applies to the image projections (``to_q``, ``to_v``, ``to_out``) and the text ones
(``add_q_proj``, ``add_v_proj``, ``to_add_out``) at once. So a unit is

* ``image``: every linear acts on image tokens (the image FFN ``ff``, the image-only ``attn2``),
* ``text``: every linear acts on text tokens (the text FFN ``ff_context``),
* ``joint``: both (joint attention).

Every linear of a unit loses a fixed number of parameters per unit of rank (a row of ``in``
weights plus bias for the projections that produce the rank dimension, a column of ``out``
weights for those consuming it); the sum over a unit's linears is its ``cost_per_rank``. Splitting
that sum by the linears' streams gives each stream's share of what a plan removes
(:func:`removed_by_stream`).

:func:`plan_per_group` is the fixed split: each group of units (image / text / joint) removes the
same fraction of its own parameters, allocated within the group by the same solver, against the
one joint allocation over all units that ``plan_ranks`` does. Families with one stream (UNets,
PixArt) have only ``image`` units, and both plans are the same. The adapters say which linears
are text-stream ones (``AttentionLayout.text_linears``, ``FFNLayout.stream``); nothing here knows
a family.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from slimdiff.families.base import FFNLayout, UnitInfo
from slimdiff.families.units import linear
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.plan import RankPlan, UnitPlan, influence_digest

STREAMS = ("image", "text")


def linear_costs(model: nn.Module, unit: UnitInfo) -> dict[str, tuple[str, int]]:
    """{linear path: (stream, parameters per unit of the unit's rank)} for every linear the unit's
    rank shapes (the counts of ``compression_units``' cost model: biases of the producing side)."""
    lay = unit.layout

    def rows(path: str, per: int = 1) -> int:  # a produced row: in_features weights + bias
        layer = linear(model, path)
        return per * (layer.in_features + (1 if layer.bias is not None else 0))

    def cols(path: str, per: int = 1) -> int:  # a consumed column: out_features weights
        return per * linear(model, path).out_features

    if isinstance(lay, FFNLayout):
        gate = 2 if lay.gated else 1  # a gated neuron owns a hidden and a gate row of proj_in
        costs = {
            lay.proj_in: (lay.stream, rows(lay.proj_in, gate)),
            lay.proj_out: (lay.stream, cols(lay.proj_out)),
        }
        if lay.gate:  # a separate gate linear (SwiGLU): a row per neuron
            costs[lay.gate] = (lay.stream, rows(lay.gate))
        return costs
    text = set(lay.text_linears)

    def stream(path: str) -> str:
        return "text" if path in text else "image"

    if unit.kind == "qk":
        return {p: (stream(p), rows(p, lay.heads)) for p in (*lay.all_query, *lay.key)}
    costs = {p: (stream(p), rows(p, lay.heads)) for p in lay.value}
    costs.update({p: (stream(p), cols(p, lay.heads)) for p in lay.out})
    return costs


def unit_stream(model: nn.Module, unit: UnitInfo) -> str:
    """``image``, ``text`` or ``joint`` (linears of both streams)."""
    streams = {s for s, _ in linear_costs(model, unit).values()}
    return streams.pop() if len(streams) == 1 else "joint"


def stream_shares(model: nn.Module, unit: UnitInfo) -> dict[str, float]:
    """Share of the unit's cost per rank that belongs to each stream (sums to 1)."""
    costs = linear_costs(model, unit).values()
    total = sum(c for _, c in costs)
    return {s: sum(c for t, c in costs if t == s) / total for s in STREAMS}


def removed_by_stream(model: nn.Module, units: Mapping[str, UnitInfo], plan: RankPlan) -> dict[str, int]:
    """Parameters the plan removes from each stream's linears (``model`` is the original; every
    plan entry must name one of ``units``)."""
    out = dict.fromkeys(STREAMS, 0)
    for name, p in plan.units.items():
        if p.rank == p.full_rank:
            continue
        for stream, per_rank in linear_costs(model, units[name]).values():
            out[stream] += (p.full_rank - p.rank) * per_rank
    return out


def stream_summary(model: nn.Module, units: Mapping[str, UnitInfo], plan: RankPlan) -> dict:
    """What a report shows: per stream, compressible parameters, removed parameters and the removed
    share of that stream; and the text stream's share of everything removed."""
    full = dict.fromkeys(STREAMS, 0)
    for u in units.values():
        for stream, per_rank in linear_costs(model, u).values():
            full[stream] += u.full_rank * per_rank
    removed = removed_by_stream(model, units, plan)
    total = sum(removed.values())
    return {
        "compressible": full,
        "removed": removed,
        "removed_fraction": {s: (removed[s] / full[s] if full[s] else 0.0) for s in STREAMS},
        "text_share_of_removed": removed["text"] / total if total else 0.0,
    }


def plan_per_group(
    model: nn.Module,
    units: Mapping[str, UnitInfo],
    fraction: float,
    **plan_kwargs,
) -> RankPlan:
    """The fixed per-stream split: units grouped by :func:`unit_stream`; each group removes
    ``fraction`` of its own compressible parameters, allocated within the group by ``plan_ranks``
    (``plan_kwargs``: mode, profiles, influence, r_min, multiple, ...). One merged plan; its
    ``solver`` records every group's budget. Raises ``InfeasibleBudgetError`` if any group cannot
    meet it."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    groups: dict[str, dict[str, UnitInfo]] = {}
    for name, u in units.items():
        groups.setdefault(unit_stream(model, u), {})[name] = u
    influence = plan_kwargs.pop("influence", None)
    merged: dict[str, UnitPlan] = {}
    solver: dict = {"split": "per-stream", "groups": {}}
    target = 0
    for group, members in sorted(groups.items()):
        removed = int(round(fraction * sum(u.full_params for u in members.values())))
        sub = plan_ranks(
            {n: influence[n] for n in members} if influence else None,
            members,
            Budget(removed_params=removed),
            **plan_kwargs,
        )
        merged.update(sub.units)
        target += sub.target_params or 0
        solver["groups"][group] = {"units": len(members), "removed_params": removed, **sub.solver}
    first = sub
    return RankPlan(
        units=merged,
        mode=first.mode,
        budget=Budget(
            removed_params=int(round(fraction * sum(u.full_params for u in units.values())))
        ).to_dict(),
        tau=first.tau,
        r_min=first.r_min,
        multiple=first.multiple,
        influence_digest=influence_digest(influence) if influence else None,
        target_params=target,
        profiles_digest=first.profiles_digest,
        solver=solver,
    )
