"""Truncation-error profiles: how much of each unit's output the closed-form decompositions lose
at every rank, read off one factorisation per unit (no compression is run).

For a unit m and a rank r, ``e_m(r)`` is the expected squared output error of the rewrite that
``compress_`` builds at rank r, divided by the unit's output energy (its error at rank 0). Two
covariances are involved and kept apart:

* the rewrite is computed, as in ``compress_``, from the *damped* covariance
  C~ = C + lambda I (lambda = damping * tr(C)/n): damping is numerics and regularisation;
* its error is measured under the *undamped* timestep-weighted covariance C, i.e. on the
  activations the unit really sees. (Under C~ the error of a rank-deficient unit is dominated by
  the damping's isotropic floor: cross-attention keys come from a few dozen text tokens, and their
  damped QK error was orders of magnitude above the true one.)

All ranks come from one factorisation per unit, as prefix sums:

* QK, per head: with SVD(R~_q R~_k^T) = U S V^T, a_i = R~_q^-1 u_i s_i^1/2, b_i = R~_k^-1 v_i s_i^1/2,
  the rank-r rewrite is A_r = sum_{i<r} a_i b_i^T and its logit error over independent q, k is
  tr(C_q C_k) - 2 sum_{i<r} b_i^T C_k C_q a_i + sum_{i,j<r} (a_i^T C_q a_j)(b_i^T C_k b_j).
  Heads are separate outputs (their logits never mix), so the unit's error is the sum over heads.
* VO, per head: with SVD(R~_a W_o) = U S V^T and x_i = R~_a^-1 u_i, the rewrite is
  P_r W_o with P_r = sum_{i<r} x_i u_i^T R~_a, and since u_i^T R~_a W_o = s_i v_i^T its error is
  tr(W_o^T C_a W_o) - 2 sum_{i<r} s_i v_i^T W_o^T C_a x_i + sum_{i<r} s_i^2 x_i^T C_a x_i.
  The unit's error is the sum over heads: this ignores the cross-head terms E[e_h^T e_g] of the
  head errors, which the per-head statistics cannot see (``benchmarks/vo_cross_head.py`` measures
  them on the toy model with the full covariance).
* FFN (Nystrom with CPQR): the pivoted QR A P = Q R of a square root of C~ gives C~_PP = R^T R;
  with W = R B_P (B = ff.net.2's weight transposed, rows in pivot order), the damped Schur
  complement error of the first k pivots is sum_{i>=k} ||W_i||^2. Under C = C~ - lambda I the
  error is that minus lambda * (||B||^2 - 2 a_k + b_k), where, with G = R^-1,
  a_k = sum_{i,j<k} G_ij (B_i . W_j) and b_k = sum_{i,j<k} (G^T G)_ij (W_i . W_j): leading-block
  sums of two fixed matrices (the refit of the first k pivots is B' = G_kk W_k).

Why: the allocation needs a currency shared by all units. A relative error is unit-free and is
exactly what each decomposition minimises, so "error" allocation (``slimdiff.planning.allocation``)
spends the parameter budget where it buys the largest drop in relative error per parameter.
``slimdiff.core.linalg``'s ``*_output_error`` functions compute the same quantity for one rewrite
directly; tests check that every point of a curve equals them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from slimdiff.core.linalg import (
    cpqr,
    damped_cholesky,
    head_phases,
    rms_coordinate_selection,
    rope_pair_selection,
    selection_errors_across_heads,
)
from slimdiff.families import adapter_for
from slimdiff.families.units import UnitInfo, compression_units, linear, out_heads

F64 = torch.float64


def _relative(errors: torch.Tensor, energy: float) -> list[float]:
    """Errors at ranks 0..R -> the same over the unit's output energy, clipped to [0, 1]."""
    if energy <= 0.0:  # a dead unit: nothing to lose at any rank
        return [0.0] * errors.numel()
    # rank 0 is the zero map: its error is the energy by definition (the sums only round to it)
    return [1.0] + [min(1.0, max(0.0, float(x) / energy)) for x in errors[1:]]


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """(R,) -> (R+1,) sums of the first r values, r = 0..R."""
    return torch.cat([values.new_zeros(1), torch.cumsum(values, 0)])


def _block_prefix(matrix: torch.Tensor) -> torch.Tensor:
    """(R, R) -> (R+1,) sums of the leading r x r blocks, r = 0..R: block r adds row r-1 up to
    its diagonal and column r-1 above it."""
    increments = torch.tril(matrix).sum(1) + torch.triu(matrix, 1).sum(0)
    return _prefix(increments)


def _upper_gram(g: torch.Tensor) -> torch.Tensor:
    """G^T G for upper-triangular G (n, n), float64, with LAPACK's triangular product ``dlauum``
    (a third of a GEMM's flops): reversing rows and columns turns G into a lower-triangular L
    with G^T G = J (L^T L) J."""
    import numpy as np
    from scipy.linalg.lapack import dlauum

    flipped = np.ascontiguousarray(torch.flip(g, [0, 1]).numpy())
    prod, info = dlauum(flipped, lower=1)  # L^T L in the lower triangle
    if info != 0:
        raise ValueError(f"dlauum failed (info={info})")
    low = torch.from_numpy(np.tril(prod))
    full = low + torch.tril(low, -1).T
    return torch.flip(full, [0, 1])


def _upper_inverse(r: torch.Tensor) -> torch.Tensor:
    """R^-1 for upper-triangular R (LAPACK ``dtrtri``, a third of a triangular solve's flops)."""
    import numpy as np
    from scipy.linalg.lapack import dtrtri

    inv, info = dtrtri(np.ascontiguousarray(r.numpy()), lower=0)
    if info != 0:
        raise ValueError(f"dtrtri failed (info={info}): singular pivoted factor")
    return torch.from_numpy(np.triu(inv))


def _sym(cov: torch.Tensor) -> torch.Tensor:
    c = cov.to(F64)
    return 0.5 * (c + c.T)


def qk_error_curve(cov_q: torch.Tensor, cov_k: torch.Tensor, damping: float = 1e-2) -> list[float]:
    """Relative QK logit error e(r), r = 0..d_h, of the damped whitening-SVD rewrite under the
    undamped (H, d_h, d_h) query and key second moments."""
    errors, energy = torch.zeros(cov_q.shape[-1] + 1, dtype=F64), 0.0
    for h in range(cov_q.shape[0]):
        cq, ck = _sym(cov_q[h]), _sym(cov_k[h])
        fq, fk = damped_cholesky(cq, damping), damped_cholesky(ck, damping)
        u, s, vh = torch.linalg.svd(fq.upper @ fk.upper.T)
        root = s.sqrt()
        a = torch.linalg.solve_triangular(fq.upper, u * root, upper=True)  # columns a_i
        b = torch.linalg.solve_triangular(fk.upper, vh.T * root, upper=True)  # columns b_i
        cross = torch.einsum("di,de,ef,fi->i", b, ck, cq, a)  # b_i^T C_k C_q a_i
        gram = (a.T @ cq @ a) * (b.T @ ck @ b)  # (a_i^T C_q a_j)(b_i^T C_k b_j)
        e0 = float(torch.trace(cq @ ck))
        errors += e0 - 2.0 * _prefix(cross) + _block_prefix(gram)
        energy += e0
    return _relative(errors, energy)


def vo_error_curve(cov_a: torch.Tensor, w_o: torch.Tensor, damping: float = 1e-2) -> list[float]:
    """Relative VO error e(r), r = 0..d_h, of the damped whitening-SVD rewrite under the undamped
    (H, d_h, d_h) attention-output second moments; ``w_o`` is (H, d_h, d_out), each head's block
    of to_out.0 in row-vector form."""
    d = cov_a.shape[-1]
    errors, energy = torch.zeros(d + 1, dtype=F64), 0.0
    for h in range(cov_a.shape[0]):
        ca, w = _sym(cov_a[h]), w_o[h].to(F64)
        fa = damped_cholesky(ca, damping)
        u, s, vh = torch.linalg.svd(fa.upper @ w, full_matrices=False)  # k = min(d_h, d_out) triplets
        x = torch.linalg.solve_triangular(fa.upper, u, upper=True)  # columns x_i
        z = ca @ x
        cross = s * ((w @ vh.T) * z).sum(0)  # s_i v_i^T W^T C_a x_i
        quad = s.square() * (x * z).sum(0)  # s_i^2 x_i^T C_a x_i
        e0 = float(torch.einsum("io,ij,jo->", w, ca, w))
        head = e0 - 2.0 * _prefix(cross) + _prefix(quad)  # ranks 0..k
        if head.numel() < d + 1:  # d_out < d_h: rank k already reproduces the head exactly
            head = torch.cat([head, head[-1:].expand(d + 1 - head.numel())])
        errors += head
        energy += e0
    return _relative(errors, energy)


def ffn_error_curve(
    correlation: torch.Tensor, out_weight: torch.Tensor, damping: float = 1e-2
) -> list[float]:
    """Relative Nystrom-CPQR error e(k), k = 0..inner, of the damped refit (``linalg.nystrom_ffn``,
    same pivots) under the undamped ``correlation`` E[h^T h] (inner, inner); ``out_weight`` is the
    ff.net.2 weight (d, inner)."""
    k_und = _sym(correlation)
    factor = damped_cholesky(k_und, damping)
    r, piv = cpqr(factor)
    b = out_weight.to(F64).T[piv]  # (inner, d), rows in pivot order
    w = r @ b  # (inner, d)
    row = w.square().sum(dim=1)
    damped = torch.flip(torch.cumsum(torch.flip(row, [0]), 0), [0])
    damped = torch.cat([damped, damped.new_zeros(1)])  # sum_{i>=k} ||W_i||^2, k = 0..inner
    lam = factor.diagnostics.damping_abs
    # tr(B^T C B) = tr(B^T C~ B) - lambda ||B||^2 = ||W||^2 - lambda ||B||^2
    energy = float(row.sum() - lam * b.square().sum())
    if lam == 0.0:
        return _relative(damped, energy)
    g = _upper_inverse(r)  # G = R^-1
    a_k = _prefix((g * (b @ w.T)).sum(0))  # sum_{i,j<k} G_ij (B_i . W_j); G upper: column sums
    b_k = _block_prefix(_upper_gram(g) * (w @ w.T))  # ||B'_k||^2, B'_k the refit of k pivots
    errors = damped - lam * (b.square().sum() - 2.0 * a_k + b_k)
    return _relative(errors, energy)


def qk_select_error_curve(
    cov_qn: torch.Tensor,
    cov_kn: torch.Tensor,
    phases: tuple[torch.Tensor, torch.Tensor] | None = None,
    cov_q: torch.Tensor | None = None,
    cov_k: torch.Tensor | None = None,
    across_heads: bool = False,
    mean_q: torch.Tensor | None = None,
    mean_k: torch.Tensor | None = None,
) -> list[float]:
    """Relative logit error e(r), r = 0..d_h, of RMSNorm-aware coordinate selection for a QK under
    per-head q/k norms, from the (H, d_h, d_h) second moments of the normalised q and k
    (``linalg.rms_coordinate_selection``: the dropped coordinates' logit energy, summed over heads)
    and, given, of the raw (pre-norm) q and k ``cov_q``, ``cov_k``: then each head's error adds
    the term of the per-token renormalisation of the kept coordinates
    (``linalg.renormalisation_term``). With ``phases`` (RoPE: ``linalg.rope_phase_moments``) whole
    rotary pairs are selected (``linalg.rope_pair_selection``; odd ranks carry the next lower even
    rank's error). ``across_heads``: the norms act across heads (Wan), one renormalisation factor
    per token for all heads (``linalg.selection_errors_across_heads``; needs ``cov_q``, ``cov_k``).
    ``mean_q``, ``mean_k`` (H, d_h): the raw tokens' per-head means where the statistics have them
    (the renormalisation term's Gaussian then has that mean; zero-mean without)."""
    d = cov_qn.shape[-1]
    errors, energy = torch.zeros(d + 1, dtype=F64), 0.0
    sels = []
    for h in range(cov_qn.shape[0]):
        if cov_q is None or cov_k is None or across_heads:
            raw = (None, None, None, None)
        else:
            raw = (cov_q[h], cov_k[h], *(None if m is None else m[h] for m in (mean_q, mean_k)))
        if phases is None:
            sel = rms_coordinate_selection(cov_qn[h], cov_kn[h], d, *raw)
        else:
            sel = rope_pair_selection(cov_qn[h], cov_kn[h], d, *head_phases(phases, h), *raw)
        errors += sel.errors
        energy += sel.energy
        sels.append(sel)
    if across_heads and cov_q is not None and cov_k is not None:
        errors = selection_errors_across_heads(sels, cov_qn, cov_kn, cov_q, cov_k, phases, mean_q, mean_k)
    return _relative(errors, energy)


def error_profiles(
    model: nn.Module,
    covariances: Mapping[str, torch.Tensor],
    units: Mapping[str, UnitInfo] | None = None,
    damping: float = 1e-2,
    rope_sequence: Mapping | None = None,
) -> dict[str, list[float]]:
    """``{unit name: [e(0), ..., e(R)]}`` for every unit of ``model`` (or of ``units``).

    ``covariances`` are ``ActivationStats.aggregate(weights)`` of statistics collected on this
    model, the same mapping ``compress_`` reads; ``rope_sequence`` the statistics'
    ``meta["rope_sequence"]``, as ``compress_`` takes it (None: the model's default shape)."""
    units = dict(units) if units is not None else compression_units(model)
    out: dict[str, list[float]] = {}
    phases = None
    for name, unit in units.items():
        lay = unit.layout
        keys = unit.stat_keys()
        if unit.kind == "ffn":
            weight = linear(model, lay.proj_out).weight.detach().cpu()
            curve = ffn_error_curve(_need(covariances, keys[0], name), weight, damping)
        elif unit.kind == "qk" and lay.qk_norm:  # under per-head RMSNorms: coordinate selection
            if lay.rope and phases is None:
                phases = adapter_for(model).rope_phases(model, rope_sequence)
            curve = qk_select_error_curve(
                _need(covariances, keys[2], name),
                _need(covariances, keys[3], name),
                phases if lay.rope else None,
                _need(covariances, keys[0], name),
                _need(covariances, keys[1], name),
                lay.norms_across_heads,
                # the raw means (RoPE only: AttentionLayout.first_moments); None where absent
                *(covariances.get(k) if k else None for k in (lay.query_mean_key, lay.key_mean_key)),
            )
        elif unit.kind == "qk":
            curve = qk_error_curve(
                _need(covariances, keys[0], name), _need(covariances, keys[1], name), damping
            )
        else:
            w_o = torch.cat([out_heads(linear(model, p).weight, lay.heads) for p in lay.out], dim=-1)
            curve = vo_error_curve(_need(covariances, keys[0], name), w_o, damping)
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
