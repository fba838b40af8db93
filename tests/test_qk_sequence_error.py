"""Known answers for the measurement functions of benchmarks/qk_sequence_error.py.

The benchmark compares the QK error profile's pooled logit error tr(C_q M C_k M^T) / tr(C_q C_k)
(a query and a key drawn independently from all calibration tokens) with the per-sequence truth
sum_s tr(C_q^s M C_k^s M^T) / sum_s tr(C_q^s C_k^s) (attention pairs a query only with the keys of
its own sequence). References and tolerances:

* two sequences with hand-picked diagonal moments: both errors and their difference, the
  covariance term (1/S) sum_s tr(M dC_k^s M^T dC_q^s), are computed by hand (float64, 1e-10 relative);
* the moment formulas against explicit logits of random tokens (float64 rounding, 1e-10);
* iid sequences (independent isotropic Gaussian q and k, a fixed M): the difference of the two
  numerators is the sample cross-covariance D = (1/S) sum_s tr(M dK_s M^T dQ_s), mean 0, with
  E[D^2] <= (S-1)/S^2 * 2 sigma_q^4 sigma_k^4 ||M||_2^4 d(d+1)/N^2 per head (N tokens per sequence:
  E||dK||_F^2 = sigma_k^4 d(d+1)/N and Var tr(T dQ) <= 2 sigma_q^4 ||T||_F^2 / N); heads are
  independent, so variances add. The relative errors must agree within 5 of those standard
  deviations (numerator and energy), a bound derived from the token count, not fitted;
* full rank: the whitening-SVD's M vanishes up to rounding and coordinate selection keeps every
  coordinate with correction 1, so every error is <= 1e-12 of the energy.
"""

from __future__ import annotations

import math

import torch
from qk_sequence_error import (
    augmented,
    direct_error,
    grouped_error,
    grouped_pair_error,
    logit_error,
    pair_errors,
    pooled_moments,
    relative_errors,
    rewrite_maps,
    rms,
    selected,
    sequence_moments,
)

from slimdiff.core import linalg
from slimdiff.planning.spectra import qk_error_curve

F64 = torch.float64
REL = 1e-10


def close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def tokens_with_moments(diag: list[float]) -> torch.Tensor:
    """(d, d) tokens whose mean second moment is diag(diag): token i = sqrt(d * diag_i) e_i."""
    d = len(diag)
    return torch.diag(torch.tensor([math.sqrt(d * x) for x in diag], dtype=F64))


def test_two_sequences_hand_computed():
    """Self-attention-like (q and k the same tokens); sequence 1 has moments diag(1, 4), sequence 2
    diag(1, 1); M = diag(0, 1) drops the second coordinate. Per sequence: errors 4*4 = 16 and 1,
    energies 1 + 16 = 17 and 1 + 1 = 2, so e_seq = 17 / 19. Pooled moments diag(1, 2.5): error
    6.25, energy 7.25, e_pool = 25 / 29. The numerators differ by the covariance term
    (1/2) sum_s tr(M dC^s M dC^s) = 1.5^2 = 2.25 (8.5 - 6.25), the energies by 1.5^2 too (9.5 - 7.25)."""
    x = torch.stack([tokens_with_moments([1.0, 4.0]), tokens_with_moments([1.0, 1.0])])  # (S=2, N=2, d=2)
    c = sequence_moments(x, heads=1)
    assert torch.allclose(c[0, 0], torch.diag(torch.tensor([1.0, 4.0], dtype=F64)), rtol=0, atol=1e-14)
    n = torch.tensor([2, 2])
    m = torch.diag(torch.tensor([0.0, 1.0], dtype=F64))[None]
    out = relative_errors(c, c, m, n, n)
    assert close(out["sequence"], 17 / 19) and close(out["pooled"], 25 / 29)
    err_s, en_s = logit_error(c, c, m)
    assert close(float(err_s.mean()), 8.5) and close(float(en_s.mean()), 9.5)
    err_p, en_p = logit_error(pooled_moments(c, n), pooled_moments(c, n), m)
    assert close(float(err_p), 6.25) and close(float(en_p), 7.25)
    dc = c - pooled_moments(c, n)
    cov_term = float(logit_error(dc, dc, m)[0].mean())
    assert close(cov_term, 2.25) and close(float(err_s.mean()) - float(err_p), cov_term)
    # the grouped predictor interpolates: one group is the pooled error, one per sequence the truth
    assert close(grouped_error(c, c, m, [0, 0], n, n), 25 / 29)
    assert close(grouped_error(c, c, m, [0, 1], n, n), 17 / 19)
    # pair_errors: the same numbers for the energy (the bilinear form with M = I)
    pe = pair_errors(c, c, n, n)
    assert close(pe["sequence"], 9.5) and close(pe["pooled"], 7.25)


def test_moment_formulas_equal_explicit_logits():
    """Random anisotropic tokens of three sequences (different lengths for q and k) and a random M:
    the within-sequence pair mean and the all-pairs mean across sequences from the moments equal
    explicit logits; the per-sequence error is the hand formula sum_s tr(C_q^s M C_k^s M^T)."""
    g = torch.Generator().manual_seed(0)
    s, nq, nk, heads, d = 3, 11, 7, 2, 5
    mix = torch.randn(s, heads * d, heads * d, generator=g, dtype=F64)  # a different mix per sequence
    q = torch.randn(s, nq, heads * d, generator=g, dtype=F64) @ mix
    k = torch.randn(s, nk, heads * d, generator=g, dtype=F64) @ mix
    m = torch.randn(heads, d, d, generator=g, dtype=F64)
    cq, ck = sequence_moments(q, heads), sequence_moments(k, heads)
    tq, tk = torch.full((s,), nq), torch.full((s,), nk)
    num = en = 0.0
    for i in range(s):
        e, n = direct_error(q[i].view(nq, heads, d), k[i].view(nk, heads, d), m)
        e2, n2 = logit_error(cq[i], ck[i], m)
        assert close(e, float(e2)) and close(n, float(n2))
        num += sum(float(torch.trace(cq[i, h] @ m[h] @ ck[i, h] @ m[h].T)) for h in range(heads))
        en += sum(float(torch.trace(cq[i, h] @ ck[i, h])) for h in range(heads))
    out = relative_errors(cq, ck, m, tq, tk)
    assert close(out["sequence"], num / en)
    e, n = direct_error(q.reshape(-1, heads, d), k.reshape(-1, heads, d), m)  # all pairs across sequences
    assert close(out["pooled"], e / n)


def test_iid_sequences_agree_within_the_sampling_tolerance():
    """Independent isotropic Gaussian q and k in every sequence: pooled and per-sequence relative
    errors estimate the same quantity; their difference stays within 5 standard deviations of the
    bound in the module docstring (computed from S, N, d, sigma and ||M||_2)."""
    s, n, heads, d = 20, 400, 2, 8
    sigma_q, sigma_k = 1.3, 0.7
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(heads, d, d, generator=g, dtype=F64)).Q
    m = torch.eye(d, dtype=F64) - basis[..., :4] @ basis[..., :4].transpose(-1, -2)  # fixed, ||M||_2 = 1
    norm = float(torch.linalg.matrix_norm(m, ord=2).max())
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        q = sigma_q * torch.randn(s, n, heads * d, generator=g, dtype=F64)
        k = sigma_k * torch.randn(s, n, heads * d, generator=g, dtype=F64)
        cq, ck = sequence_moments(q, heads), sequence_moments(k, heads)
        t = torch.full((s,), n)
        out = relative_errors(cq, ck, m, t, t)

        def sd(op_norm: float) -> float:
            per_head = (s - 1) / s**2 * 2 * sigma_q**4 * sigma_k**4 * op_norm**4 * d * (d + 1) / n**2
            return math.sqrt(heads * per_head)

        _, energy = logit_error(pooled_moments(cq, t), pooled_moments(ck, t), m)
        tol = 5 * (sd(norm) + out["pooled"] * sd(1.0)) / (float(energy) - 5 * sd(1.0))
        assert abs(out["sequence"] - out["pooled"]) <= tol, (seed, out, tol)
        # the tolerance is meaningful: about 1% of the error here
        assert tol < 0.02 * out["pooled"]


def test_full_rank_errors_vanish():
    g = torch.Generator().manual_seed(2)
    s, n, heads, d = 4, 30, 2, 6
    mix = torch.randn(heads * d, heads * d, generator=g, dtype=F64)
    q = torch.randn(s, n, heads * d, generator=g, dtype=F64) @ mix
    k = torch.randn(s, n, heads * d, generator=g, dtype=F64) @ mix.T
    cq, ck = sequence_moments(q, heads), sequence_moments(k, heads)
    t = torch.full((s,), n)
    m = rewrite_maps(pooled_moments(cq, t), pooled_moments(ck, t), d, damping=1e-2)
    out = relative_errors(cq, ck, m, t, t)
    assert 0.0 <= out["sequence"] <= 1e-12 and 0.0 <= out["pooled"] <= 1e-12
    assert 0.0 <= grouped_error(cq, ck, m, [0, 0, 1, 1], t, t) <= 1e-12
    assert qk_error_curve(pooled_moments(cq, t), pooled_moments(ck, t))[d] <= 1e-12
    # below full rank the maps are the library's rewrite: the pooled error is its profile
    m2 = rewrite_maps(pooled_moments(cq, t), pooled_moments(ck, t), d // 2, damping=1e-2)
    curve = qk_error_curve(pooled_moments(cq, t), pooled_moments(ck, t), damping=1e-2)
    assert close(relative_errors(cq, ck, m2, t, t)["pooled"], curve[d // 2], 1e-8)
    # coordinate selection at full rank: every coordinate kept, norm correction 1, error 0
    gains, eps = 1.0 + 0.3 * torch.randn(d, generator=g, dtype=F64), 1e-6
    xq, xk = q[..., :d], k[..., :d]  # one head
    cq0, ck0 = pooled_moments(cq, t)[0], pooled_moments(ck, t)[0]
    keep = torch.arange(d)
    c_q, c_k = linalg.rms_norm_correction(cq0, keep), linalg.rms_norm_correction(ck0, keep)
    assert abs(c_q - 1.0) <= 1e-12 and abs(c_k - 1.0) <= 1e-12
    nq, nk = rms(xq, gains, eps), rms(xk, gains, eps)
    aq = augmented(selected(xq, gains, eps, keep, c_q), nq, 1.0)
    ak = augmented(selected(xk, gains, eps, keep, c_k), nk, -1.0)
    err = pair_errors(sequence_moments(aq, 1), sequence_moments(ak, 1), t, t)
    energy = pair_errors(sequence_moments(nq, 1), sequence_moments(nk, 1), t, t)
    assert (
        abs(err["sequence"]) <= 1e-12 * energy["sequence"] and abs(err["pooled"]) <= 1e-12 * energy["pooled"]
    )


def test_augmented_tokens_give_the_selection_error_logit():
    """Below full rank: the dot products of augmented tokens are slim_q . slim_k - n_q . n_k, and
    the grouped predictor of the augmented moments equals the explicit pair means."""
    g = torch.Generator().manual_seed(3)
    s, n, d, r = 3, 9, 6, 3
    x = torch.randn(s, n, d, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64)
    y = torch.randn(s, n, d, generator=g, dtype=F64)
    gains, eps = 1.0 + 0.3 * torch.randn(d, generator=g, dtype=F64), 1e-6
    keep = torch.tensor([0, 2, 5])
    c = 1.3
    sq, sk = selected(x, gains, eps, keep, c), selected(y, gains, eps, keep, c)
    assert sq.shape == (s, n, r)
    nq, nk = rms(x, gains, eps), rms(y, gains, eps)
    aq, ak = augmented(sq, nq, 1.0), augmented(sk, nk, -1.0)
    explicit = sq[0] @ sk[0].T - nq[0] @ nk[0].T
    assert torch.allclose(aq[0] @ ak[0].T, explicit, rtol=0, atol=1e-13)
    t = torch.full((s,), n)
    ca, cb = sequence_moments(aq, 1), sequence_moments(ak, 1)
    ea, eb = sequence_moments(nq, 1), sequence_moments(nk, 1)
    num = sum(float((aq[i] @ ak[i].T).square().mean()) for i in range(s))
    den = sum(float((nq[i] @ nk[i].T).square().mean()) for i in range(s))
    assert close(grouped_pair_error(ca, cb, ea, eb, [0, 1, 2], t, t), num / den)
    all_num = float((aq.reshape(-1, d + r) @ ak.reshape(-1, d + r).T).square().mean())
    all_den = float((nq.reshape(-1, d) @ nk.reshape(-1, d).T).square().mean())
    assert close(grouped_pair_error(ca, cb, ea, eb, [0, 0, 0], t, t), all_num / all_den)
