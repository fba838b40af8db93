"""Helpers the family contract tests share (test_flux2, test_flux3, test_qwenimage, test_zimage,
test_wan, test_ltx): one forward, the relative error, statistics of a few forwards, a QK-only plan.
Each test file keeps what is its family's own: how its inputs are built and which tokens it pads."""

from __future__ import annotations

import torch

from slimdiff.calibration.collect import ActivationCollector
from slimdiff.planning.plan import RankPlan


def run(model, x) -> torch.Tensor:
    """The denoiser's output for ``x = (args, kwargs)`` (a model returning one sample per batch
    item, as Z-Image does, is stacked)."""
    with torch.no_grad():
        out = model(*x[0], **x[1]).sample
    return torch.stack(out) if isinstance(out, (list, tuple)) else out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def collect(model, xs) -> ActivationCollector:
    """A one-bucket collector that has seen the forwards of every input in ``xs``."""
    col = ActivationCollector(model, 1)
    with col:
        for x in xs:
            run(model, x)
    return col


def qk_ranks(units, r: int) -> RankPlan:
    """Every QK unit at rank ``r``, every other unit whole."""
    return RankPlan.from_ranks(units, {n: (r if u.kind == "qk" else u.full_rank) for n, u in units.items()})
