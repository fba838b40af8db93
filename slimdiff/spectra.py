"""Truncation-error profiles: how much of each unit's output the closed-form decompositions lose
at every rank, read off one factorisation per unit (no compression is run).

For a unit m and a rank r, ``e_m(r)`` is the decomposition's expected squared output error at
rank r divided by its error at rank 0 (the unit's output energy), under the same damped,
timestep-weighted covariances ``compress_`` uses:

* QK (whitening-SVD per head): sum over heads of the discarded S_i^2 of R_q R_k^T, over the sum
  of all S_i^2 (the attention-logit energy). Every head keeps the same r.
* VO (whitening-SVD per head): the same with the singular values of R_a W_o,h.
* FFN (Nystrom with CPQR): with K~ = A^T A, the pivoted QR A P = Q R gives K~_PP = R^T R, and
  the Nystrom residual of the first k pivots is the Schur complement sum_{i>=k} R_i^T R_i
  (rows of R). The refit's error is therefore sum_{i>=k} ||R_i B_P||^2, with B = ff.net.2's
  weight transposed and its rows permuted like the neurons: all ranks from one QR.

Why: the allocation needs a currency shared by all units. A relative error is unit-free and is
exactly what each decomposition minimises, so "error" allocation (``slimdiff.allocation``)
spends the parameter budget where it buys the largest drop in relative error per parameter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from slimdiff.adapter import UnitInfo, compression_units, describe_unet
from slimdiff.compress import out_heads
from slimdiff.linalg import cpqr, damped_cholesky
from slimdiff.stats import ATTN_OUT, KEY, QUERY, attn_key, ffn_key

F64 = torch.float64


def _relative(discarded: torch.Tensor) -> list[float]:
    """``discarded[r]`` = error at rank r (r = 0..R) -> the same divided by the rank-0 error."""
    total = float(discarded[0])
    if total <= 0.0:  # a dead unit: nothing to lose at any rank
        return [0.0] * discarded.numel()
    return [min(1.0, max(0.0, float(x) / total)) for x in discarded]


def _tail_sums(sq: torch.Tensor) -> torch.Tensor:
    """(..., R) squared values, descending importance -> (R+1,) sum over leading dims of the
    values from index r on, for r = 0..R (index R: 0)."""
    per_rank = sq.reshape(-1, sq.shape[-1]).sum(0)
    tail = torch.flip(torch.cumsum(torch.flip(per_rank, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


def qk_error_curve(cov_q: torch.Tensor, cov_k: torch.Tensor, damping: float = 1e-2) -> list[float]:
    """Relative QK error e(r), r = 0..d_h, for (H, d_h, d_h) query and key second moments."""
    sq = []
    for h in range(cov_q.shape[0]):
        fq, fk = damped_cholesky(cov_q[h], damping), damped_cholesky(cov_k[h], damping)
        sq.append(torch.linalg.svdvals(fq.upper @ fk.upper.T).square())
    return _relative(_tail_sums(torch.stack(sq)))


def vo_error_curve(cov_a: torch.Tensor, w_o: torch.Tensor, damping: float = 1e-2) -> list[float]:
    """Relative VO error e(r), r = 0..d_h; ``w_o`` is (H, d_h, d_out), each head's block of
    to_out.0 in row-vector form."""
    sq = []
    for h in range(cov_a.shape[0]):
        fa = damped_cholesky(cov_a[h], damping)
        s = torch.linalg.svdvals(fa.upper @ w_o[h].to(F64)).square()
        sq.append(torch.cat([s, s.new_zeros(w_o.shape[1] - s.numel())]))  # d_out < d_h: rank-deficient
    return _relative(_tail_sums(torch.stack(sq)))


def ffn_error_curve(
    correlation: torch.Tensor, out_weight: torch.Tensor, damping: float = 1e-2
) -> list[float]:
    """Relative Nystrom-CPQR error e(k), k = 0..inner, for ``correlation`` E[h^T h] (inner, inner)
    and ``out_weight`` (d, inner), the ff.net.2 weight. Matches ``linalg.nystrom_ffn``'s error at
    every k (same damping, same pivots)."""
    r, piv = cpqr(damped_cholesky(correlation, damping))
    b = out_weight.to(F64).T[piv]  # (inner, d), rows in pivot order
    row_err = (r @ b).square().sum(dim=1)  # ||R_i B_P||^2
    return _relative(_tail_sums(row_err))


def error_profiles(
    unet: nn.Module,
    covariances: Mapping[str, torch.Tensor],
    units: Mapping[str, UnitInfo] | None = None,
    damping: float = 1e-2,
) -> dict[str, list[float]]:
    """``{unit name: [e(0), ..., e(R)]}`` for every unit of ``unet`` (or of ``units``).

    ``covariances`` are ``ActivationStats.aggregate(weights)`` of statistics collected on this
    model, the same mapping ``compress_`` reads."""
    units = dict(units) if units is not None else compression_units(unet)
    modules = dict(unet.named_modules())
    blocks = {info.name: info for info in describe_unet(unet)}
    out: dict[str, list[float]] = {}
    for name, unit in units.items():
        block = modules[unit.block]
        if unit.kind == "ffn":
            key = ffn_key(unit.block)
            curve = ffn_error_curve(
                _need(covariances, key, name), block.ff.net[-1].weight.detach().cpu(), damping
            )
        else:
            heads = getattr(blocks[unit.block], unit.attn).heads
            attn = getattr(block, unit.attn)
            if unit.kind == "qk":
                cq = _need(covariances, attn_key(unit.block, unit.attn, QUERY), name)
                ck = _need(covariances, attn_key(unit.block, unit.attn, KEY), name)
                curve = qk_error_curve(cq, ck, damping)
            else:
                ca = _need(covariances, attn_key(unit.block, unit.attn, ATTN_OUT), name)
                curve = vo_error_curve(ca, out_heads(attn.to_out[0].weight, heads), damping)
        if len(curve) != unit.full_rank + 1:
            raise ValueError(f"{name}: error curve has {len(curve)} points, expected {unit.full_rank + 1}")
        out[name] = curve
    return out


def _need(covariances: Mapping[str, torch.Tensor], key: str, unit: str) -> torch.Tensor:
    if key not in covariances:
        raise KeyError(f"{unit}: covariance {key!r} is missing from the statistics")
    return covariances[key]


def plot_error_profiles(
    profiles: Mapping[str, list[float]],
    units: Mapping[str, UnitInfo],
    path,
    ranks: Mapping[str, int] | None = None,
):
    """Relative error e(r/R) of every unit against its kept ratio, one line per unit coloured by
    kind; ``ranks`` (a rank plan's) marks where each unit was cut. Returns the path."""
    from pathlib import Path

    from matplotlib.figure import Figure

    colors = {"ffn": "tab:blue", "qk": "tab:orange", "vo": "tab:green"}
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for name, unit in units.items():
        if name not in profiles:
            continue
        curve = profiles[name]
        x = [r / unit.full_rank for r in range(len(curve))]
        ax.plot(x, curve, color=colors[unit.kind], alpha=0.35, lw=0.9)
        if ranks is not None and name in ranks:
            ax.plot(
                [ranks[name] / unit.full_rank], [curve[ranks[name]]], "o", color=colors[unit.kind], ms=3.5
            )
    for kind, color in colors.items():
        ax.plot([], [], color=color, label=kind)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.05)
    ax.set_xlim(0, 1)
    ax.set_xlabel("kept ratio r / R")
    ax.set_ylabel("relative truncation error e(r)")
    title = "Truncation error per unit"
    ax.set_title(title + (" (dots: the rank plan's cut)" if ranks is not None else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
