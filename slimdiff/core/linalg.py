"""Closed-form decompositions of SlimDiff (METHOD.md stage 5): pure math, tensors in, tensors out.

Everything here runs in float64 (inputs are converted, outputs are float64), holds no state and
does no I/O, so each function is checked by known-answer tests. Module surgery that applies the
results to a UNet lives in ``slimdiff.surgery.compress``.

Conventions (row-vector activations, as in the token-major tensors of a transformer):

* a covariance ``C = E[x^T x]`` is a symmetric PSD (n, n) matrix (uncentered second moment);
* every decomposition first *damps* it, ``C~ = C + damping * tr(C)/n * I``, so the damping is
  relative to the mean eigenvalue and unit-free; all errors are reported under ``C~``;
* a whitening factor is ``R = chol(C~)^T`` (upper triangular), so that ``C~ = R^T R`` and
  ``E||x A||^2 = ||R A||_F^2`` for any matrix ``A``.

Type I (FFN, Nystrom with CPQR): keep a neuron subset J of h (input of ff.net.2, y = h B + b with
B = W_2^T of shape (inner, d)) and refit B' = C~_JJ^-1 C~_J: B, the least-squares map from h_J to
h B under the damped correlation. (Regressing under C~ on both sides, rather than damping only
C_JJ, is what makes the full width reproduce B exactly, which METHOD.md requires.)

Type II (QK) and Type III (VO): whitened SVD per head, errors equal the discarded S_i^2.

The weight-only baselines reuse the same formulas with the activation covariance replaced by the
covariance the head would see for isotropic inputs (``W W^T``): that is exactly the truncated SVD
of the per-head weight products ``W_q,h^T W_k,h`` (QK) and ``W_v,h^T W_o,h`` (VO).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

F64 = torch.float64

#: relative eigenvalue floor of the eigh fallback: eigenvalues below floor * lambda_max are raised
EIG_FLOOR = 1e-10


# --------------------------------------------------------------------------------------------
# Damped Cholesky with an eigh fallback
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FactorDiagnostics:
    """What happened while factoring one covariance (reported per unit by ``compress_``)."""

    n: int
    damping_abs: float  # damping * tr(C)/n, added to the diagonal
    condition_number: float  # of the damped (and, on fallback, floored) matrix, lambda_max/lambda_min
    fallback: bool  # Cholesky failed; eigh with floored eigenvalues was used instead
    floored: int = 0  # number of eigenvalues raised to the floor on fallback


@dataclass(frozen=True)
class DampedFactor:
    """``matrix = C~ = lower @ lower.T`` (float64); ``upper = lower.T`` is the whitening factor R."""

    lower: torch.Tensor  # (n, n) lower triangular L
    matrix: torch.Tensor  # (n, n) the regularised covariance the factor represents
    diagnostics: FactorDiagnostics

    @property
    def upper(self) -> torch.Tensor:
        return self.lower.T


def _check_square(cov: torch.Tensor, what: str) -> torch.Tensor:
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"{what} must be a square (n, n) matrix, got shape {tuple(cov.shape)}")
    cov = cov.to(F64)
    if not torch.isfinite(cov).all():
        raise ValueError(f"{what} contains NaN or Inf; the calibration statistics are corrupt")
    return 0.5 * (cov + cov.T)  # symmetrise: accumulated sums are symmetric only up to rounding


def damped_cholesky(
    cov: torch.Tensor, damping: float = 1e-2, *, eig_floor: float = EIG_FLOOR
) -> DampedFactor:
    """Lower Cholesky factor of ``C + damping * tr(C)/n * I`` with diagnostics.

    Why the fallback: a calibration covariance can be rank deficient (dead neurons, 77 text
    tokens against a wider key space) so that even the damped matrix fails Cholesky in floating
    point; then the eigenvalues are floored at ``eig_floor * lambda_max`` and the floored matrix
    is factored through a QR of ``Lambda^1/2 V^T`` (still triangular, so callers need one code path).
    The failure is detected from ``cholesky_ex``'s ``info``, never by catching exceptions.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    c = _check_square(cov, "covariance")
    n = c.shape[0]
    damping_abs = float(damping * torch.trace(c) / n)
    damped = c + damping_abs * torch.eye(n, dtype=F64)
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return DampedFactor(
            lower, damped, FactorDiagnostics(n, damping_abs, _condition(damped, lower), False)
        )

    eigval, eigvec = torch.linalg.eigh(damped)
    top = float(eigval[-1])
    floor = eig_floor * top if top > 0 else 1.0  # an all-zero covariance whitens to the identity
    floored = int((eigval < floor).sum())
    eigval = eigval.clamp_min(floor)
    matrix = (eigvec * eigval) @ eigvec.T
    matrix = 0.5 * (matrix + matrix.T)
    # Lambda^1/2 V^T = Q R  =>  R^T R = V Lambda V^T; fix signs so that diag(R) > 0.
    r = torch.linalg.qr(eigval.sqrt()[:, None] * eigvec.T, mode="r").R
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(F64)
    r = signs[:, None] * r
    cond = float(eigval[-1] / eigval[0])
    logger.warning(
        "Cholesky of a damped %dx%d covariance failed (info=%d); used eigh with %d eigenvalues floored "
        "at %.3g (condition number %.3g)",
        n,
        n,
        int(info),
        floored,
        floor,
        cond,
    )
    return DampedFactor(r.T, matrix, FactorDiagnostics(n, damping_abs, cond, fallback=True, floored=floored))


#: above this size the condition number is LAPACK's 1-norm estimate from the Cholesky factor
#: (O(n^2)); below it the exact 2-norm ratio of eigenvalues (an eigvalsh of a 5120-wide FFN
#: correlation costs more than its whole factorisation)
EXACT_CONDITION_MAX_N = 1024


def _condition(matrix: torch.Tensor, lower: torch.Tensor) -> float:
    if matrix.shape[0] <= EXACT_CONDITION_MAX_N:
        eig = torch.linalg.eigvalsh(matrix)
        return float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")
    from scipy.linalg.lapack import dpocon

    anorm = float(matrix.abs().sum(0).max())
    rcond, info = dpocon(np.ascontiguousarray(lower.T.numpy()), anorm, uplo="U")  # R = L^T
    return float("inf") if info != 0 or rcond <= 0 else float(1.0 / rcond)


def _solve_upper(upper: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """R^-1 rhs for upper-triangular R."""
    return torch.linalg.solve_triangular(upper, rhs, upper=True)


# --------------------------------------------------------------------------------------------
# Type I: FFN neuron selection (Nystrom with column-pivoted QR)
# --------------------------------------------------------------------------------------------
def cpqr(factor: DampedFactor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, pivots) of a column-pivoted QR of a square root of C~ (C~ = A^T A, e.g. A = L^T).

    Column j of A has squared norm C~_jj; each pivot step takes the neuron with the largest
    residual variance after projecting out the ones already chosen, so every prefix of the pivots
    is a greedy interpolative-decomposition subset, and C~[piv][:, piv] = R^T R (what
    ``slimdiff.planning.spectra`` reads the Nystrom error of every prefix from). R is (n, n) float64 upper
    triangular with a positive diagonal; pivots a permutation (int64) of range(n).

    Computed as the pivoted Cholesky factorisation of C~ itself (LAPACK ``dpstrf``): the same
    pivots and R as the QR of any square root in exact arithmetic (METHOD.md), blocked BLAS-3
    instead of the BLAS-2-bound ``geqp3``: 9 s instead of 65 s for a 5120-wide SD FFN here."""
    from scipy.linalg.lapack import dpstrf

    u, piv, rank, info = dpstrf(factor.matrix.numpy(), lower=0, tol=-1.0)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (dpstrf info={info})")
    r = np.triu(u)
    if rank < r.shape[0]:  # residual below LAPACK's tolerance: those neurons add nothing
        r[rank:, rank:] = 0.0
    return torch.from_numpy(r), torch.as_tensor(np.asarray(piv) - 1, dtype=torch.int64)


def cpqr_order(factor: DampedFactor) -> torch.Tensor:
    """Neuron order of ``cpqr``: a permutation (int64) of range(n)."""
    return cpqr(factor)[1]


@dataclass(frozen=True)
class NystromResult:
    keep: torch.Tensor  # (k,) int64 kept neuron indices, ascending
    out_weight: torch.Tensor  # (d, k) new ff.net.2 weight (= B'^T), float64
    error: float  # E||h B - h_J B'||^2 under C~ (per token)
    energy: float  # E||h B||^2 under C~: error / energy is the relative error
    diagnostics: FactorDiagnostics
    # rows of the refit map M = C~_:J C~_JJ^-1 (out_weight = W_2 M) for the neurons NOT kept, in
    # ascending neuron order, (inner - k, k); rows J of M are the identity. Only with ``with_map``
    # (what slimdiff.formats.lora needs to carry a weight delta of ff.net.2 into the compressed layer).
    refit_rest: torch.Tensor | None = None


def nystrom_refit(
    matrix: torch.Tensor, out_weight: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, float, float]:
    """B' = C_JJ^-1 C_J: B for ``out_weight = B^T`` (d, n); returns (B'^T (d, k), error, energy).

    error = tr(B^T C B) - tr(B^T C_:J C_JJ^-1 C_J: B) (the Schur complement), computed explicitly."""
    c = matrix.to(F64)
    b = out_weight.to(F64).T  # (n, d)
    c_jj = c[keep][:, keep]  # (k, k)
    c_j = c[keep]  # (k, n)
    rhs = c_j @ b  # (k, d)
    chol, info = torch.linalg.cholesky_ex(c_jj)
    if int(info) != 0:
        raise ValueError(
            f"the selected {keep.numel()}x{keep.numel()} principal block of the damped correlation is not "
            "positive definite; increase damping"
        )
    b_new = torch.cholesky_solve(rhs, chol)  # (k, d)
    energy = float(torch.einsum("nd,nm,md->", b, c, b))
    error = energy - float((rhs * b_new).sum())
    return b_new.T.contiguous(), max(error, 0.0), energy


def nystrom_refit_rest(matrix: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows of the refit map ``M = C_:J C_JJ^-1`` (n, k) for the neurons outside ``keep``:
    ``C_(J^c) J C_JJ^-1``, (n - k, k). The refit output weight is ``W_2 M`` (``nystrom_refit``);
    rows ``J`` of ``M`` are the identity, so only these rows carry information."""
    c = matrix.to(F64)
    n = c.shape[-1]
    rest = torch.ones(n, dtype=torch.bool)
    rest[keep] = False
    chol, info = torch.linalg.cholesky_ex(c[keep][:, keep])
    if int(info) != 0:
        raise ValueError("the selected principal block of the damped correlation is not positive definite")
    return torch.cholesky_solve(c[keep][:, rest], chol).T.contiguous()  # (n - k, k)


def nystrom_ffn(
    correlation: torch.Tensor,
    out_weight: torch.Tensor,
    rank: int,
    damping: float = 1e-2,
    *,
    with_map: bool = False,
) -> NystromResult:
    """Type I: keep ``rank`` neurons chosen by CPQR of a square root of the damped correlation
    ``K = E[h^T h]`` (inner, inner) and refit ``out_weight`` (ff.net.2 weight, (d, inner)).

    At rank = inner it returns ``out_weight`` (up to rounding); the error never increases with
    the rank because the CPQR subsets are nested and the refit is a least-squares projection."""
    n = correlation.shape[-1]
    if out_weight.dim() != 2 or out_weight.shape[1] != n:
        raise ValueError(
            f"out_weight must be (d, {n}) to match the correlation, got {tuple(out_weight.shape)}"
        )
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be in [1, {n}], got {rank}")
    factor = damped_cholesky(correlation, damping)
    order = cpqr_order(factor)
    keep = order[:rank].sort().values
    w, error, energy = nystrom_refit(factor.matrix, out_weight, keep)
    rest = nystrom_refit_rest(factor.matrix, keep) if with_map else None
    return NystromResult(keep, w, error, energy, factor.diagnostics, rest)


def magnitude_neuron_scores(in_weight_rows: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
    """Weight-magnitude baseline: score_j = ||W_2[:, j]|| * ||proj rows of neuron j||.

    ``in_weight_rows`` is (inner, m): for GEGLU the hidden and gate rows of neuron j concatenated
    (m = 2d), for GELU the single proj row. Needs no activations (a pruning baseline)."""
    if in_weight_rows.shape[0] != out_weight.shape[1]:
        raise ValueError(
            f"in_weight_rows has {in_weight_rows.shape[0]} neurons, out_weight has {out_weight.shape[1]} columns"
        )
    return in_weight_rows.to(F64).norm(dim=1) * out_weight.to(F64).norm(dim=0)


def magnitude_select(scores: torch.Tensor, rank: int) -> torch.Tensor:
    """Indices (ascending) of the ``rank`` largest scores; ties broken by lower index."""
    n = scores.numel()
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be in [1, {n}], got {rank}")
    order = torch.argsort(-scores.to(F64), stable=True)
    return order[:rank].sort().values


# --------------------------------------------------------------------------------------------
# Type II: QK whitening-SVD per head
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QKResult:
    t_q: torch.Tensor  # (d_h, r): new query head = q_h @ t_q
    t_k: torch.Tensor  # (d_h, r): new key head = k_h @ t_k
    singular_values: torch.Tensor  # (d_h,) of R_q R_k^T, descending
    error: float  # sum of the discarded S_i^2 = E||q (I - T_q T_k^T) k^T||^2, q, k independent
    energy: float  # sum of all S_i^2
    diagnostics_q: FactorDiagnostics
    diagnostics_k: FactorDiagnostics


def qk_whitened_svd(cov_q: torch.Tensor, cov_k: torch.Tensor, rank: int, damping: float = 1e-2) -> QKResult:
    """Type II: T_q = R_q^-1 U_r S_r^1/2, T_k = R_k^-1 V_r S_r^1/2 from SVD(R_q R_k^T) = U S V^T.

    Why: the attention logits of one head are q k^T; replacing them by (q T_q)(k T_k)^T has
    expected squared error ||R_q (I - T_q T_k^T) R_k^T||_F^2 over independent q, k, which the
    truncated SVD minimises (Eckart-Young) with value sum_{i>r} S_i^2. At r = d_h, T_q T_k^T = I."""
    d = cov_q.shape[-1]
    if cov_k.shape[-1] != d:
        raise ValueError(
            f"query and key covariances differ in size: {tuple(cov_q.shape)} vs {tuple(cov_k.shape)}"
        )
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in [1, {d}], got {rank}")
    fq, fk = damped_cholesky(cov_q, damping), damped_cholesky(cov_k, damping)
    u, s, vh = torch.linalg.svd(fq.upper @ fk.upper.T)  # (d, d), (d,), (d, d)
    root = s[:rank].sqrt()
    t_q = _solve_upper(fq.upper, u[:, :rank] * root)  # (d, r)
    t_k = _solve_upper(fk.upper, vh[:rank].T * root)  # (d, r)
    sq = s.square()
    return QKResult(t_q, t_k, s, float(sq[rank:].sum()), float(sq.sum()), fq.diagnostics, fk.diagnostics)


def qk_weight_svd(w_q: torch.Tensor, w_k: torch.Tensor, rank: int, damping: float = 1e-8) -> QKResult:
    """Weight-only baseline: truncated SVD of the head's bilinear form ``W_q,h^T W_k,h``.

    ``w_q`` (d_h, d_q_in) and ``w_k`` (d_h, d_kv_in) are the head's rows of to_q / to_k. Equals
    ``qk_whitened_svd`` with the covariances of q and k for isotropic inputs, W W^T."""
    w_q, w_k = w_q.to(F64), w_k.to(F64)
    return qk_whitened_svd(w_q @ w_q.T, w_k @ w_k.T, rank, damping)


# --------------------------------------------------------------------------------------------
# Type III: VO whitening-SVD per head
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VOResult:
    t_v: torch.Tensor  # (d_h, r): new value head = v_h @ t_v
    out_block: torch.Tensor  # (r, d_out): new head block of to_out.0 (= S_r V_r^T), row-vector form
    singular_values: torch.Tensor  # (d_h,) of R_a W_o,h
    error: float  # sum of discarded S_i^2 = E||a_h W_o,h - a_h T out_block||^2
    energy: float
    diagnostics: FactorDiagnostics
    # (d_h, r) input map of the head's out block: out_block = s_out^T w_o (= U_r^T R_a W_o,h), so
    # the new out linear's column block is W_o[:, head] @ s_out (slimdiff.formats.lora maps deltas with it)
    s_out: torch.Tensor | None = None


def vo_whitened_svd(cov_a: torch.Tensor, w_o: torch.Tensor, rank: int, damping: float = 1e-2) -> VOResult:
    """Type III: SVD(R_a W_o,h) = U S V^T, T = R_a^-1 U_r, new output block S_r V_r^T.

    ``w_o`` is the head's block of to_out.0 in row-vector form, (d_h, d_out) = weight[:, head].T.
    The attention output of the head is a_h = P v_h, so v_h T gives a_h T exactly and the head's
    contribution a_h W_o,h becomes a_h T S_r V_r^T = a_h R_a^-1 U_r U_r^T R_a W_o,h."""
    d = cov_a.shape[-1]
    if w_o.dim() != 2 or w_o.shape[0] != d:
        raise ValueError(f"w_o must be (d_h={d}, d_out), got {tuple(w_o.shape)}")
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in [1, {d}], got {rank}")
    fa = damped_cholesky(cov_a, damping)
    u, s, vh = torch.linalg.svd(fa.upper @ w_o.to(F64), full_matrices=False)  # (d, d), (d,), (d, d_out)
    t_v = _solve_upper(fa.upper, u[:, :rank])  # (d, r)
    out_block = s[:rank, None] * vh[:rank]  # (r, d_out)
    s_out = fa.upper.T @ u[:, :rank]  # (d, r): U_r^T R_a W_o = s_out^T W_o
    sq = s.square()
    return VOResult(t_v, out_block, s, float(sq[rank:].sum()), float(sq.sum()), fa.diagnostics, s_out)


def vo_weight_svd(w_v: torch.Tensor, w_o: torch.Tensor, rank: int, damping: float = 1e-8) -> VOResult:
    """Weight-only baseline: truncated SVD of the head's map ``W_v,h^T W_o,h`` (d_kv_in -> d_out).

    ``w_v`` is the head's rows of to_v, (d_h, d_kv_in). Equals ``vo_whitened_svd`` with the
    covariance of v for isotropic inputs (attention probabilities aside), W_v,h W_v,h^T."""
    w_v = w_v.to(F64)
    return vo_whitened_svd(w_v @ w_v.T, w_o, rank, damping)


# --------------------------------------------------------------------------------------------
# Output errors of a rewrite under a covariance (the truth the error profiles must match)
# --------------------------------------------------------------------------------------------
# Every decomposition above is computed under the *damped* covariance (damping is numerics and
# regularisation); these functions measure what a rewrite really loses, under whatever covariance
# is given (normally the undamped, timestep-weighted one). Each returns (error, energy), with
# energy the error of the zero map, so error / energy is the relative error.


def _sym(cov: torch.Tensor) -> torch.Tensor:
    return _check_square(cov, "covariance")


def ffn_output_error(
    correlation: torch.Tensor, out_weight: torch.Tensor, keep: torch.Tensor, new_out_weight: torch.Tensor
) -> tuple[float, float]:
    """E||h B - h_J B'||^2 and E||h B||^2 under ``correlation`` K = E[h^T h] (inner, inner).

    ``out_weight`` (d, inner) is the original ff.net.2 weight (B = out_weight^T), ``keep`` the kept
    neurons J (k,), ``new_out_weight`` (d, k) the rebuilt ff.net.2 weight (B' = new_out_weight^T)."""
    k = _sym(correlation)
    b = out_weight.to(F64).T  # (inner, d)
    delta = b.clone()
    delta[keep] -= new_out_weight.to(F64).T  # rows J: B_J - B'; others: B_i (dropped neurons)
    return float(torch.einsum("nd,nm,md->", delta, k, delta)), float(torch.einsum("nd,nm,md->", b, k, b))


def qk_logit_error(
    cov_q: torch.Tensor, cov_k: torch.Tensor, t_q: torch.Tensor, t_k: torch.Tensor
) -> tuple[float, float]:
    """E||q (I - T_q T_k^T) k^T||^2 and E||q k^T||^2 for independent q, k with second moments
    ``cov_q``, ``cov_k`` (d_h, d_h); ``t_q``, ``t_k`` are (d_h, r). Summed over every (query, key)
    token pair of one sequence, the independence assumption is exact: sum_ij (q_i M k_j^T)^2 =
    tr(S_q M S_k M^T) with S the token sums."""
    cq, ck = _sym(cov_q), _sym(cov_k)
    m = torch.eye(cq.shape[0], dtype=F64) - t_q.to(F64) @ t_k.to(F64).T
    return float(torch.trace(cq @ m @ ck @ m.T)), float(torch.trace(cq @ ck))


def vo_output_error(
    cov_a: torch.Tensor, w_o: torch.Tensor, t_v: torch.Tensor, out_block: torch.Tensor
) -> tuple[float, float]:
    """E||a W_o - a T O||^2 and E||a W_o||^2 for one head: ``cov_a`` (d_h, d_h) second moment of
    the head's attention output, ``w_o`` (d_h, d_out) its block of to_out.0, ``t_v`` (d_h, r) and
    ``out_block`` (r, d_out) the rewrite."""
    ca = _sym(cov_a)
    w = w_o.to(F64)
    delta = w - t_v.to(F64) @ out_block.to(F64)
    return float(torch.einsum("io,ij,jo->", delta, ca, delta)), float(torch.einsum("io,ij,jo->", w, ca, w))


# --------------------------------------------------------------------------------------------
# QK under a per-head RMSNorm (MMDiT qk_norm): RMSNorm-aware coordinate selection
# --------------------------------------------------------------------------------------------
#: Monte Carlo samples and seed of the renormalisation term (``kept_share_moments``). It needs only
#: E[rho] and E[sqrt(rho)] of a kept share rho in [0, 1] (no heavy tails): at 2048 samples the
#: term's seed-to-seed standard deviation is 2-3% of it (d = 32, ranks 4..24), about 1% of the
#: predicted error or less, well below its modelling error (METHOD.md, MMDiT)
RENORM_SAMPLES = 2048
RENORM_SEED = 0


@dataclass(frozen=True)
class CoordinateSelection:
    keep: torch.Tensor  # (r,) int64 kept coordinates of the head, ascending
    drop_order: (
        torch.Tensor
    )  # (d,) int64 coordinates in the order they are dropped (rank d-k keeps order[k:])
    errors: torch.Tensor  # (d+1,) float64 predicted mean square logit error at ranks 0..d (errors[d] = 0)
    energy: float  # E[(n(q) . n(k))^2], the logit energy (errors[0])
    # (d+1,) the dropped logit energy 1_D^T M 1_D alone; ``errors`` adds the renormalisation term
    # when the raw (pre-norm) moments are given, else equals it
    dropped: torch.Tensor | None = None


def gaussian_tokens(
    cov_pre: torch.Tensor, mean: torch.Tensor | None, samples: int, gen: torch.Generator
) -> torch.Tensor:
    """(samples, d) draws of the Gaussian the kept-share model takes for a head's raw tokens: mean
    ``mean`` (d,) and covariance C - mu mu^T, so its second moment is ``cov_pre`` C (d, d); zero-mean
    with covariance C when ``mean`` is None. Any square root of a singular covariance will do."""
    c = _sym(cov_pre)
    if mean is not None:
        mu = mean.to(F64)
        c = c - torch.outer(mu, mu)
    root, info = torch.linalg.cholesky_ex(c)  # C = root root^T
    if int(info) != 0:  # singular (a rank-deficient weight Gram; a covariance of a few tokens)
        evals, evecs = torch.linalg.eigh(c)
        root = evecs * evals.clamp_min(0.0).sqrt()
    x = torch.randn(samples, c.shape[0], generator=gen, dtype=F64) @ root.T
    return x if mean is None else x + mu


def kept_share_moments(
    cov_pre: torch.Tensor,
    kept_order: torch.Tensor,
    samples: int = RENORM_SAMPLES,
    seed: int = RENORM_SEED,
    mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept-share-weighted moments of the renormalisation factor, at every nested rank.

    The rewrite renormalises the kept coordinates S of a token x with the mean correction
    (``rms_norm_correction``), so its normalised kept coordinates are n_S(x) s(x), with
    s = sqrt(rho_bar / rho(x)), rho(x) = ||x_S||^2 / ||x||^2 the token's kept share and
    rho_bar = E||x_S||^2 / E||x||^2 (eps neglected). s is large exactly where n_S is small
    (||n_S||^2 = d rho for unit gains), so its moments are taken weighted by rho:
    mu1 = E[s rho] / E[rho] = sqrt(rho_bar) E[sqrt(rho)] / E[rho], mu2 = E[s^2 rho] / E[rho] =
    rho_bar / E[rho] (bounded; the unweighted E[s^2] = rho_bar E[1/rho] is infinite for Gaussian
    tokens at r <= 2). Tokens are modelled as Gaussian with the raw second moment ``cov_pre`` (d, d)
    and the raw mean ``mean`` (d,) when the statistics have it (``gaussian_tokens``; zero-mean
    without). The mean matters: where every token shares a large common component (biased q/k
    projections; FLUX), the kept share barely varies from token to token, and a zero-mean Gaussian
    with the same second moment spreads it far too wide (benchmarks/results/qk_select_error_flux.md).
    ``samples`` draws from a seeded generator (deterministic), all ranks at once by a cumulative sum
    along ``kept_order`` (d,) (rank r keeps kept_order[:r]). Returns (mu1, mu2), each (d+1,) float64,
    at r = 0..d; both are exactly 1 at r = d (and set to 1 at r = 0 and where the kept coordinates
    carry no raw energy)."""
    c = _sym(cov_pre)
    d = c.shape[0]
    ones = torch.ones(d + 1, dtype=F64)
    diag = torch.diagonal(c)[kept_order].clamp_min(0.0)
    if float(diag.sum()) <= 0.0:
        return ones, ones.clone()
    x = gaussian_tokens(c, mean, samples, torch.Generator().manual_seed(seed))
    rho = x[:, kept_order].square_().cumsum(1)  # (N, d): ||x_S||^2 at r = 1..d
    rho /= rho[:, -1:].clamp_min(torch.finfo(F64).tiny).clone()  # kept shares; exactly 1 at r = d
    zero = rho.new_zeros(1)
    mean_rho = torch.cat([zero, rho.mean(0)])  # (d+1,) from here on: r = 0..d
    mean_sqrt = torch.cat([zero, rho.sqrt_().mean(0)])
    dcum = torch.cat([zero, diag.cumsum(0)])
    rho_bar = dcum / dcum[-1]  # exactly 1 at r = d
    live = mean_rho > 0
    safe = torch.where(live, mean_rho, ones)
    mu1 = torch.where(live, rho_bar.sqrt() * mean_sqrt / safe, ones)
    mu2 = torch.where(live, rho_bar / safe, ones)
    mu1[0] = mu2[0] = 1.0
    mu1[d] = mu2[d] = 1.0
    return mu1, mu2


def kept_energy_prefix(m: torch.Tensor, kept_order: torch.Tensor) -> torch.Tensor:
    """(n+1,) 1_S^T M 1_S for the nested kept sets S = kept_order[:k], k = 0..n (item k adds
    M_ii + 2 sum_{j in S} M_ij)."""
    mp = _sym(m)[kept_order][:, kept_order]
    inc = torch.diagonal(mp) + 2.0 * torch.tril(mp, -1).sum(1)
    return torch.cat([inc.new_zeros(1), inc.cumsum(0)])


def renormalisation_term(
    m: torch.Tensor,
    drop_order: torch.Tensor,
    cov_q: torch.Tensor,
    cov_k: torch.Tensor,
    coords: torch.Tensor | None = None,
    mean_q: torch.Tensor | None = None,
    mean_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n+1,) the error the per-token renormalisation adds to the dropped logit energy, at every
    nested rank k = 0..n of the items (coordinates, or rotary pairs) dropped in ``drop_order``.

    The compressed logit is s(q) s(k) l_S for an original n(q) . n(k) = l_S + l_D, so the error is
    e = (s_q s_k - 1) l_S - l_D and E[e^2] = E[l_D^2] + E[(s_q s_k - 1)^2 l_S^2]
    - 2 E[(s_q s_k - 1) l_S l_D]. The second term is modelled as K(S) V(S): K = E[l_S^2] =
    1_S^T M 1_S (exact, ``m`` the selection's error form) and, for q and k independent,
    V = mu2_q mu2_k - 2 mu1_q mu1_k + 1 >= (mu1_q mu1_k - 1)^2 >= 0 with the kept-share-weighted
    moments of s (``kept_share_moments`` on the raw moments ``cov_q``, ``cov_k`` and, where given,
    the raw means ``mean_q``, ``mean_k``). Exact for
    isotropic Gaussian tokens; it neglects the cross term (third), any dependence of s on the
    direction of n_S, and the tokens' departure from a Gaussian
    (benchmarks/results/qk_select_error.md measures each). ``coords`` (n, w) maps item i to its
    coordinates (a rotary pair: w = 2); None: items are coordinates. 0 at k = 0 and k = n."""
    n = m.shape[0]
    kept_items = drop_order.flip(0)
    if coords is None:
        kept_coords, width = kept_items, 1
    else:
        kept_coords, width = coords[kept_items].reshape(-1), coords.shape[1]
    mq1, mq2 = kept_share_moments(cov_q, kept_coords, seed=RENORM_SEED, mean=mean_q)
    mk1, mk2 = kept_share_moments(cov_k, kept_coords, seed=RENORM_SEED + 1, mean=mean_k)
    at = torch.arange(n + 1) * width  # coordinate count of k kept items
    v = (mq2[at] * mk2[at] - 2.0 * mq1[at] * mk1[at] + 1.0).clamp_min(0.0)
    term = kept_energy_prefix(m, kept_items) * v
    term[0] = term[n] = 0.0
    return term


def _raw_given(cov_q: torch.Tensor | None, cov_k: torch.Tensor | None) -> bool:
    if (cov_q is None) != (cov_k is None):
        raise ValueError("give both raw second moments (cov_q and cov_k) or neither")
    return cov_q is not None


def rms_coordinate_selection(
    cov_qn: torch.Tensor,
    cov_kn: torch.Tensor,
    rank: int,
    cov_q: torch.Tensor | None = None,
    cov_k: torch.Tensor | None = None,
    mean_q: torch.Tensor | None = None,
    mean_k: torch.Tensor | None = None,
) -> CoordinateSelection:
    """Which of a head's d coordinates to keep after its q/k RMSNorms, for rank ``rank``.

    ``cov_qn``, ``cov_kn`` (d, d): second moments of the *normalised* query and key (the norm
    outputs, learned scale included). Dropping a set D of coordinates changes the logit
    n(q) . n(k) by sum_{i in D} n(q)_i n(k)_i; for independent q and k its mean square is
    1_D^T M 1_D with M = C_qn o C_kn (elementwise; PSD by the Schur product theorem). D is grown
    greedily, one coordinate at a time, by the one that adds least to that sum (M_ii + 2 sum_{j in D}
    M_ij), so the kept sets are nested and every rank's error is read off one pass.

    The rewrite keeps those coordinates' rows of the q/k projections and replaces each norm by
    an RMSNorm over the kept coordinates with its scale corrected (``rms_norm_correction``). The
    correction is right on average only: the kept share of ||q||^2 varies from token to token.
    With the raw (pre-norm) second moments ``cov_q``, ``cov_k`` (d, d) the errors add that
    variation's term (``renormalisation_term``, with the raw means ``mean_q``, ``mean_k`` (d,)
    where the statistics have them; the greedy order stays the dropped energy's); without them,
    ``errors`` is the dropped energy alone (an underestimate)."""
    m = _sym(cov_qn) * _sym(cov_kn)  # (d, d)
    d = m.shape[0]
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in [1, {d}], got {rank}")
    order, dropped = greedy_drop_order(m)
    keep = order[d - rank :].sort().values
    errors = dropped
    if _raw_given(cov_q, cov_k):
        errors = dropped + renormalisation_term(m, order, cov_q, cov_k, mean_q=mean_q, mean_k=mean_k)
    return CoordinateSelection(keep, order, errors, float(dropped[0]), dropped)


def greedy_drop_order(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy removal for a PSD error form: items (coordinates or rotary pairs) are dropped one at
    a time, each the one adding least to 1_D^T M 1_D (cost M_ii + 2 sum_{j in D} M_ij), so the
    kept sets are nested. Returns (drop order (n,), errors (n+1,)): errors[k] is the error with
    k items kept (errors[n] = 0; errors[0] = 1^T M 1, the whole energy)."""
    n = m.shape[0]
    dropped = torch.zeros(n, dtype=torch.bool)
    acc = torch.zeros(n, dtype=F64)  # sum_{j in D} M_ij
    order, errors = [], [0.0]
    for _ in range(n):
        cost = torch.diagonal(m) + 2.0 * acc
        cost[dropped] = torch.inf
        i = int(torch.argmin(cost))  # ties: the lowest index
        order.append(i)
        errors.append(errors[-1] + float(cost[i]))
        dropped[i] = True
        acc += m[:, i]
    # errors[k] so far = energy dropped with k items gone = the error with n - k kept
    return torch.tensor(order, dtype=torch.int64), torch.tensor(errors[::-1], dtype=F64)


def rope_phase_moments(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position moments of rotary pairs over all (query, key) token pairs of a sequence.

    ``angles`` (N, P): the rotary angle theta_p(m) of pair p at token m. With alpha_p = theta_p(m)
    - theta_p(n) over all N^2 token pairs (m, n) uniformly, returns (c, s), each (P, P):
    c_pq = E[cos alpha_p cos alpha_q] = (|a-_pq|^2 + |a+_pq|^2) / 2 and s_pq = E[sin alpha_p
    sin alpha_q] = (|a-_pq|^2 - |a+_pq|^2) / 2, where a+-_pq = mean_m exp(i (theta_p +- theta_q)(m))
    (product-to-sum; E[cos alpha_p sin alpha_q] = 0 because the pairs (m, n) and (n, m) cancel)."""
    e = torch.exp(1j * angles.to(F64))  # (N, P)
    n = e.shape[0]
    a_minus = (e.T @ e.conj()) / n  # (P, P): mean_m e^{i theta_p} e^{-i theta_q}
    a_plus = (e.T @ e) / n
    am, ap = a_minus.abs() ** 2, a_plus.abs() ** 2
    return 0.5 * (am + ap), 0.5 * (am - ap)


def head_phases(
    phases: tuple[torch.Tensor, torch.Tensor] | None, head: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (c, s) phase moments (``rope_phase_moments``) of head ``head``: ``phases`` shared by every
    head ((P, P) each: FLUX, Wan, whose heads share one rotary table) or per head ((H, P, P) each:
    LTX-Video, whose rotary table spans all heads' coordinates, so every head has its own
    frequencies). None stays None."""
    if phases is None:
        return None
    c, s = phases
    return (c, s) if c.ndim == 2 else (c[head], s[head])


def rope_pair_error_matrix(
    cov_qn: torch.Tensor, cov_kn: torch.Tensor, c: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """M (P, P) with 1_D^T M 1_D = E[(sum_{p in D} n(q)_p^T R(alpha_p) n(k)_p)^2], the mean square
    logit change when the rotary pairs D are dropped from a head (q, k independent of each other
    and of the positions; alpha from ``rope_phase_moments``). R(alpha) = cos(alpha) I + sin(alpha) J
    with J the 90-degree rotation, so M_pq = c_pq tr(K_pq Q_qp) + s_pq tr(J K_pq J^T Q_qp) with
    Q, K the 2x2 blocks of the normalised second moments. Without rotation (c = 1, s = 0) it is
    the block sum of C_qn o C_kn, the coordinate selection's form. PSD: a Gram of the pairs'
    logit contributions."""
    d = cov_qn.shape[0]
    p = d // 2
    q4 = _sym(cov_qn).reshape(p, 2, p, 2)
    k4 = _sym(cov_kn).reshape(p, 2, p, 2)
    j = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    kj = torch.einsum("ik,akbl,jl->aibj", j, k4, j)  # J K_pq J^T
    t1 = torch.einsum("aibj,aibj->ab", k4, q4)
    t2 = torch.einsum("aibj,aibj->ab", kj, q4)
    return c.to(F64) * t1 + s.to(F64) * t2


def rope_pair_selection(
    cov_qn: torch.Tensor,
    cov_kn: torch.Tensor,
    rank: int,
    c: torch.Tensor,
    s: torch.Tensor,
    cov_q: torch.Tensor | None = None,
    cov_k: torch.Tensor | None = None,
    mean_q: torch.Tensor | None = None,
    mean_k: torch.Tensor | None = None,
) -> CoordinateSelection:
    """RoPE-aware selection for a head of width d under q/k RMSNorms: keep ``rank`` / 2 whole
    rotary pairs (coordinates 2i, 2i+1), the same pairs in q and k, chosen greedily on
    ``rope_pair_error_matrix``. Keeping whole pairs commutes with the rotation, so the kept logits
    are exactly the original ones restricted to those pairs, at every relative position. Returns
    the kept coordinates (both of every kept pair) and the error at every even rank (odd ranks
    carry the error of the next lower even rank: they are not allowed).

    With the raw (pre-norm, pre-rotation) second moments ``cov_q``, ``cov_k`` (d, d) (and means
    ``mean_q``, ``mean_k`` where the statistics have them) the errors add
    the renormalisation term of ``renormalisation_term`` over pairs (the rotation keeps norms, so
    s(x) is the same as without RoPE and multiplies the rotated kept logit, whose energy is
    1_S^T M 1_S); without them, ``errors`` is the dropped energy alone."""
    d = cov_qn.shape[0]
    if d % 2 or not (2 <= rank <= d) or rank % 2:
        raise ValueError(f"RoPE QK rank must be even and in [2, {d}] (whole rotary pairs), got {rank}")
    m = rope_pair_error_matrix(cov_qn, cov_kn, c, s)
    p = d // 2
    pair_order, pair_dropped = greedy_drop_order(m)
    pair_errors = pair_dropped
    if _raw_given(cov_q, cov_k):
        coords = torch.arange(d).view(p, 2)
        pair_errors = pair_dropped + renormalisation_term(m, pair_order, cov_q, cov_k, coords, mean_q, mean_k)
    keep_pairs = pair_order[p - rank // 2 :].sort().values
    keep = torch.stack([2 * keep_pairs, 2 * keep_pairs + 1], dim=1).reshape(-1)
    order = torch.stack([2 * pair_order, 2 * pair_order + 1], dim=1).reshape(-1)
    # by_rank[2k] = by_rank[2k+1] = error with k pairs
    by_rank = pair_errors.repeat_interleave(2)[: d + 1]
    dropped = pair_dropped.repeat_interleave(2)[: d + 1]
    return CoordinateSelection(keep, order, by_rank, float(by_rank[0]), dropped)


def rms_norm_correction(cov_pre: torch.Tensor, keep: torch.Tensor) -> float:
    """c = r / (rho d) with rho = E||x_S||^2 / E||x||^2 from the pre-norm second moment (d, d):
    RMSNorm over the kept coordinates S reads mean_S(x^2); mean_d(x^2) ~ mean_S(x^2) * c, so
    x_S / sqrt(c mean_S(x^2) + eps) = c^-1/2 x_S / sqrt(mean_S(x^2) + eps / c): the same stock
    RMSNorm over r coordinates with eps / c and weight / sqrt(c). Exact at r = d (c = 1)."""
    diag = torch.diagonal(_sym(cov_pre))
    total = float(diag.sum())
    rho = float(diag[keep].sum()) / total if total > 0 else keep.numel() / diag.numel()
    return keep.numel() / (max(rho, 1e-12) * diag.numel())


# --------------------------------------------------------------------------------------------
# q/k RMSNorm ACROSS heads (Wan: one norm over all H heads' coordinates, before the head split)
# --------------------------------------------------------------------------------------------
def rms_norm_correction_across_heads(cov_pre: torch.Tensor, keep: torch.Tensor) -> float:
    """``rms_norm_correction`` for ONE RMSNorm over all H heads' d coordinates together (D = H d)
    when head h keeps coordinates ``keep[h]`` (``keep`` (H, r), |S| = H r): c = |S| / (rho D) with
    rho = sum_h E||x_{h,S_h}||^2 / sum_h E||x_h||^2 from the per-head pre-norm second moments
    ``cov_pre`` (H, d, d) (only their diagonals are read). The norm reads mean_D(x^2) ~ c mean_S(x^2),
    so it becomes one RMSNorm over the H r kept coordinates with weight g_S / sqrt(c) and eps / c:
    one c per norm, shared by every head. Exact at r = d, and when every token's kept share is
    rho; H = 1 is ``rms_norm_correction``."""
    diag = torch.diagonal(cov_pre.to(F64), dim1=-2, dim2=-1)  # (H, d)
    total = float(diag.sum())
    kept = float(diag.gather(1, keep.to(torch.int64)).sum())
    rho = kept / total if total > 0 else keep.numel() / diag.numel()
    return keep.numel() / (max(rho, 1e-12) * diag.numel())


def kept_share_moments_across_heads(
    cov_pre: torch.Tensor,
    kept_orders: torch.Tensor,
    samples: int = RENORM_SAMPLES,
    seed: int = RENORM_SEED,
    mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kept_share_moments`` for one norm across heads: rho(x) = sum_h ||x_{h,S_h}||^2 /
    sum_h ||x_h||^2, every head keeping the first k of its own ``kept_orders[h]`` ((H, d)) at
    k = 0..d. Heads are sampled independently, head h ~ N(0, cov_pre[h]) (the statistics hold only
    per-head blocks, so cross-head correlations are not modelled). Returns (mu1, mu2), each (d+1,);
    H = 1 gives ``kept_share_moments`` bit for bit (same draws)."""
    heads, d = kept_orders.shape
    ones = torch.ones(d + 1, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    zero = torch.zeros(1, dtype=F64)
    total, dcum = None, torch.zeros(d + 1, dtype=F64)
    for h in range(heads):
        c = _sym(cov_pre[h])
        diag = torch.diagonal(c)[kept_orders[h]].clamp_min(0.0)
        dcum = dcum + torch.cat([zero, diag.cumsum(0)])
        x = gaussian_tokens(c, None if mean is None else mean[h], samples, gen)
        cum = x[:, kept_orders[h]].square_().cumsum(1)  # (N, d)
        total = cum if total is None else total + cum
    if float(dcum[-1]) <= 0.0:
        return ones, ones.clone()
    rho = total / total[:, -1:].clamp_min(torch.finfo(F64).tiny)
    mean_rho = torch.cat([zero, rho.mean(0)])
    mean_sqrt = torch.cat([zero, rho.sqrt_().mean(0)])
    rho_bar = dcum / dcum[-1]
    live = mean_rho > 0
    safe = torch.where(live, mean_rho, ones)
    mu1 = torch.where(live, rho_bar.sqrt() * mean_sqrt / safe, ones)
    mu2 = torch.where(live, rho_bar / safe, ones)
    mu1[0] = mu2[0] = 1.0
    mu1[d] = mu2[d] = 1.0
    return mu1, mu2


def selection_errors_across_heads(
    selections: list[CoordinateSelection],
    cov_qn: torch.Tensor,
    cov_kn: torch.Tensor,
    cov_q: torch.Tensor,
    cov_k: torch.Tensor,
    phases: tuple[torch.Tensor, torch.Tensor] | None = None,
    mean_q: torch.Tensor | None = None,
    mean_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """(d+1,) predicted logit error, summed over the H heads, at every rank of per-head selections
    (``rms_coordinate_selection`` / ``rope_pair_selection`` of each head, made without raw moments)
    whose q and k norms act ACROSS heads: sum_h 1_D^T M_h 1_D plus the renormalisation term with
    ONE factor s(x) = sqrt(rho_bar / rho(x)) per token shared by every head (rho over all heads'
    kept coordinates): sum_h K_h(S_h) V(S), V from ``kept_share_moments_across_heads`` of the raw
    (H, d, d) moments ``cov_q`` / ``cov_k``. Odd ranks under RoPE carry the next lower even rank's
    value. H = 1 equals the per-head errors."""
    heads, d = cov_qn.shape[0], cov_qn.shape[-1]
    dropped = sum(sel.dropped for sel in selections)
    if phases is None:
        ms = [_sym(cov_qn[h]) * _sym(cov_kn[h]) for h in range(heads)]
        orders = torch.stack([sel.drop_order for sel in selections])  # (H, d) coordinates
        coords, width = None, 1
    else:
        ms = [rope_pair_error_matrix(cov_qn[h], cov_kn[h], *head_phases(phases, h)) for h in range(heads)]
        orders = torch.stack([sel.drop_order[0::2] // 2 for sel in selections])  # (H, d/2) pairs
        coords, width = torch.arange(d).view(d // 2, 2), 2
    n = orders.shape[1]
    kept_items = orders.flip(1)
    kept_coords = kept_items if coords is None else coords[kept_items].reshape(heads, -1)
    mq1, mq2 = kept_share_moments_across_heads(cov_q, kept_coords, seed=RENORM_SEED, mean=mean_q)
    mk1, mk2 = kept_share_moments_across_heads(cov_k, kept_coords, seed=RENORM_SEED + 1, mean=mean_k)
    at = torch.arange(n + 1) * width
    v = (mq2[at] * mk2[at] - 2.0 * mq1[at] * mk1[at] + 1.0).clamp_min(0.0)
    term = sum(kept_energy_prefix(ms[h], kept_items[h]) for h in range(heads)) * v
    term[0] = term[n] = 0.0
    if width > 1:
        term = term.repeat_interleave(width)[: d + 1]
    return dropped + term
