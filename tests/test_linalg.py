"""Known-answer and property tests of the stage-5 decompositions (slimdiff.core.linalg)."""

from __future__ import annotations

import math

import pytest
import torch

from slimdiff.core import linalg

F64 = torch.float64


def random_spd(n: int, seed: int, decay: float = 0.3, samples: int | None = None) -> torch.Tensor:
    """A realistic anisotropic second moment: E[x^T x] of tokens with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    samples = samples or 4 * n
    scales = torch.exp(-decay * torch.arange(n, dtype=F64))
    mix = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    x = torch.randn(samples, n, generator=g, dtype=F64) * scales @ mix.T
    return x.T @ x / samples


# -- damped Cholesky ----------------------------------------------------------------------------
def test_damped_cholesky_known_answer_diagonal():
    c = torch.diag(torch.tensor([4.0, 1.0, 1.0, 2.0], dtype=F64))  # tr/n = 2
    f = linalg.damped_cholesky(c, damping=0.5)  # adds 0.5 * 2 = 1 to the diagonal
    assert f.diagnostics.damping_abs == pytest.approx(1.0)
    assert not f.diagnostics.fallback
    torch.testing.assert_close(f.lower, torch.diag(torch.tensor([5.0, 2.0, 2.0, 3.0], dtype=F64).sqrt()))
    assert f.diagnostics.condition_number == pytest.approx(5.0 / 2.0)


def test_damped_cholesky_reconstructs_and_is_float64():
    c = random_spd(12, seed=1).to(torch.float32)
    f = linalg.damped_cholesky(c, damping=1e-2)
    assert f.lower.dtype == F64
    assert torch.equal(f.lower, torch.tril(f.lower))
    expected = c.to(F64) + 1e-2 * torch.trace(c.to(F64)) / 12 * torch.eye(12, dtype=F64)
    torch.testing.assert_close(f.lower @ f.lower.T, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.matrix, expected, rtol=1e-12, atol=1e-14)


def test_damped_cholesky_falls_back_on_indefinite_input():
    # rank-deficient with a negative eigenvalue (rounding in accumulated sums) and no damping
    v = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=F64)).Q
    eig = torch.tensor([-1e-9, 0.0, 0.0, 1.0, 2.0, 3.0], dtype=F64)
    c = (v * eig) @ v.T
    f = linalg.damped_cholesky(c, damping=0.0, eig_floor=1e-6)
    assert f.diagnostics.fallback
    assert f.diagnostics.floored == 3
    assert f.diagnostics.condition_number == pytest.approx(3.0 / 3e-6, rel=1e-6)
    assert torch.equal(f.lower, torch.tril(f.lower))
    assert (torch.diagonal(f.lower) > 0).all()
    torch.testing.assert_close(f.lower @ f.lower.T, f.matrix, rtol=1e-9, atol=1e-12)
    floored = (v * eig.clamp_min(3e-6)) @ v.T
    torch.testing.assert_close(f.matrix, floored, rtol=1e-9, atol=1e-12)


def test_damped_cholesky_zero_matrix_whitens_to_identity():
    f = linalg.damped_cholesky(torch.zeros(3, 3), damping=1e-2)
    assert f.diagnostics.fallback
    torch.testing.assert_close(f.matrix, torch.eye(3, dtype=F64))


def test_damped_cholesky_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        linalg.damped_cholesky(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        linalg.damped_cholesky(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="damping"):
        linalg.damped_cholesky(torch.eye(2), damping=-1.0)


# -- Type I: Nystrom / CPQR ---------------------------------------------------------------------
def brute_force_ffn_error(k: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, b_new: torch.Tensor) -> float:
    """E||h B - h_J B'||^2 = tr(D^T K D) with D = B - P_J B' (P_J scatters rows into J)."""
    d = b.clone()
    d[keep] -= b_new
    return float(torch.trace(d.T @ k @ d))


def test_nystrom_full_width_reproduces_original():
    k = random_spd(16, seed=2)
    w2 = torch.randn(5, 16, dtype=F64, generator=torch.Generator().manual_seed(3))  # (d, inner)
    res = linalg.nystrom_ffn(k, w2, rank=16, damping=1e-2)
    assert torch.equal(res.keep, torch.arange(16))
    torch.testing.assert_close(res.out_weight, w2, rtol=1e-9, atol=1e-10)
    assert res.error == pytest.approx(0.0, abs=1e-9 * res.energy)


def test_nystrom_error_matches_brute_force_and_is_monotone():
    n = 20
    k = random_spd(n, seed=4, decay=0.15)
    w2 = torch.randn(6, n, dtype=F64, generator=torch.Generator().manual_seed(5))
    kd = k + 1e-3 * torch.trace(k) / n * torch.eye(n, dtype=F64)
    errors = []
    for r in range(1, n + 1):
        res = linalg.nystrom_ffn(k, w2, rank=r, damping=1e-3)
        brute = brute_force_ffn_error(kd, w2.T, res.keep, res.out_weight.T)
        assert res.error == pytest.approx(brute, rel=1e-7, abs=1e-10)
        errors.append(res.error)
    assert all(b <= a + 1e-10 * errors[0] for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 10 * errors[n // 2] > 0  # keeping more neurons really helps
    assert errors[-1] == pytest.approx(0.0, abs=1e-9)


def test_nystrom_refit_is_least_squares_optimum():
    # for a fixed subset, B' minimises the error: perturbing it can only increase it
    n = 10
    k = random_spd(n, seed=6)
    w2 = torch.randn(3, n, dtype=F64, generator=torch.Generator().manual_seed(7))
    res = linalg.nystrom_ffn(k, w2, rank=4, damping=1e-2)
    kd = k + 1e-2 * torch.trace(k) / n * torch.eye(n, dtype=F64)
    base = brute_force_ffn_error(kd, w2.T, res.keep, res.out_weight.T)
    g = torch.Generator().manual_seed(8)
    for _ in range(5):
        bumped = res.out_weight.T + 1e-3 * torch.randn(4, 3, dtype=F64, generator=g)
        assert brute_force_ffn_error(kd, w2.T, res.keep, bumped) > base


def test_cpqr_picks_the_dominant_neuron_first():
    # neuron 3 carries by far the largest variance; neuron 1 is an exact copy of neuron 0
    k = torch.diag(torch.tensor([1.0, 1.0, 0.5, 9.0, 0.1], dtype=F64))
    k[0, 1] = k[1, 0] = 1.0
    order = linalg.cpqr_order(linalg.damped_cholesky(k, damping=1e-9))
    assert int(order[0]) == 3
    assert set(order[:3].tolist()) == {3, 0, 2} or set(order[:3].tolist()) == {3, 1, 2}


def test_magnitude_baseline_known_answer():
    rows = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # norms 5, 1, 2
    w2 = torch.tensor([[1.0, 10.0, 1.0]])  # column norms 1, 10, 1
    scores = linalg.magnitude_neuron_scores(rows, w2)
    torch.testing.assert_close(scores, torch.tensor([5.0, 10.0, 2.0], dtype=F64))
    assert linalg.magnitude_select(scores, 2).tolist() == [0, 1]


# -- Type II: QK --------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 3, 6, 8])
def test_qk_error_equals_discarded_singular_values(rank):
    d = 8
    cq, ck = random_spd(d, seed=10), random_spd(d, seed=11)
    res = linalg.qk_whitened_svd(cq, ck, rank, damping=1e-2)
    cqd = cq + 1e-2 * torch.trace(cq) / d * torch.eye(d, dtype=F64)
    ckd = ck + 1e-2 * torch.trace(ck) / d * torch.eye(d, dtype=F64)
    a = torch.eye(d, dtype=F64) - res.t_q @ res.t_k.T
    measured = float(torch.trace(a.T @ cqd @ a @ ckd))  # E[(q A k^T)^2] for independent q, k
    assert measured == pytest.approx(res.error, rel=1e-8, abs=1e-12)
    assert res.error == pytest.approx(float(res.singular_values[rank:].square().sum()), rel=1e-12, abs=1e-15)
    assert res.t_q.shape == res.t_k.shape == (d, rank)
    if rank == d:
        torch.testing.assert_close(res.t_q @ res.t_k.T, torch.eye(d, dtype=F64), rtol=0, atol=1e-10)


def test_qk_error_equals_the_mean_over_every_query_key_pair():
    """The same error measured on logits: the error assumes independent q and k, and the empirical
    distribution of n queries and n keys makes them independent exactly when every query meets
    every key, so the mean over all n^2 pairs of the squared logit difference is
    tr(A^T C_q A C_k) with the sample covariances the decomposition was given: equal up to float64
    round-off (sums of 1.4e5 terms, ~1e-13 relative; 1e-10 is ample)."""
    d, r, n = 6, 2, 384
    g = torch.Generator().manual_seed(12)
    lq = torch.randn(d, d, dtype=F64, generator=g)
    lk = torch.randn(d, d, dtype=F64, generator=g)
    q = torch.randn(n, d, dtype=F64, generator=g) @ lq.T
    k = torch.randn(n, d, dtype=F64, generator=g) @ lk.T
    res = linalg.qk_whitened_svd(q.T @ q / n, k.T @ k / n, r, damping=0.0)
    exact = q @ k.T  # (n, n): every query with every key
    approx = (q @ res.t_q) @ (k @ res.t_k).T
    assert float((exact - approx).square().mean()) == pytest.approx(res.error, rel=1e-10)
    assert res.error > 0.01 * res.energy  # rank 2 of 6 really loses something


def test_qk_weight_svd_is_truncated_svd_of_bilinear_form():
    g = torch.Generator().manual_seed(13)
    wq = torch.randn(4, 10, dtype=F64, generator=g)
    wk = torch.randn(4, 7, dtype=F64, generator=g)
    res = linalg.qk_weight_svd(wq, wk, rank=2, damping=0.0)
    m = wq.T @ wk  # (10, 7): logits = x M x'^T
    s = torch.linalg.svdvals(m)
    torch.testing.assert_close(res.singular_values, s[:4], rtol=1e-10, atol=1e-10)
    approx = (wq.T @ res.t_q) @ (wk.T @ res.t_k).T
    assert float((m - approx).square().sum()) == pytest.approx(float(s[2:].square().sum()), rel=1e-9)


# -- Type III: VO -------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_vo_error_equals_discarded_singular_values(rank):
    d, d_out = 8, 12
    ca = random_spd(d, seed=20)
    wo = torch.randn(d, d_out, dtype=F64, generator=torch.Generator().manual_seed(21))
    res = linalg.vo_whitened_svd(ca, wo, rank, damping=1e-2)
    cad = ca + 1e-2 * torch.trace(ca) / d * torch.eye(d, dtype=F64)
    diff = wo - res.t_v @ res.out_block  # head map error in row-vector form
    measured = float(torch.trace(diff.T @ cad @ diff))
    assert measured == pytest.approx(res.error, rel=1e-8, abs=1e-12)
    assert res.error == pytest.approx(float(res.singular_values[rank:].square().sum()), rel=1e-12, abs=1e-15)
    if rank == d:
        torch.testing.assert_close(res.t_v @ res.out_block, wo, rtol=1e-10, atol=1e-10)


def test_vo_weight_svd_is_truncated_svd_of_head_map():
    g = torch.Generator().manual_seed(22)
    wv = torch.randn(5, 9, dtype=F64, generator=g)
    wo = torch.randn(5, 11, dtype=F64, generator=g)
    res = linalg.vo_weight_svd(wv, wo, rank=3, damping=0.0)
    m = wv.T @ wo
    s = torch.linalg.svdvals(m)
    approx = wv.T @ res.t_v @ res.out_block
    assert float((m - approx).square().sum()) == pytest.approx(float(s[3:].square().sum()), rel=1e-9)


def test_whitened_beats_weight_svd_under_its_own_metric():
    # the point of whitening: under the activation covariance it is never worse than weight SVD
    d, d_out, r = 8, 8, 3
    ca = random_spd(d, seed=30, decay=0.6)
    g = torch.Generator().manual_seed(31)
    wv = torch.randn(d, 16, dtype=F64, generator=g)
    wo = torch.randn(d, d_out, dtype=F64, generator=g)
    white = linalg.vo_whitened_svd(ca, wo, r, damping=0.0)
    base = linalg.vo_weight_svd(wv, wo, r, damping=0.0)
    base_err = float(torch.trace((wo - base.t_v @ base.out_block).T @ ca @ (wo - base.t_v @ base.out_block)))
    assert white.error <= base_err * (1 + 1e-9)
    assert math.isfinite(white.error)


def test_rank_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="rank"):
        linalg.qk_whitened_svd(torch.eye(4), torch.eye(4), 5)
    with pytest.raises(ValueError, match="rank"):
        linalg.vo_whitened_svd(torch.eye(4), torch.ones(4, 3), 0)
    with pytest.raises(ValueError, match="rank"):
        linalg.nystrom_ffn(torch.eye(4), torch.ones(2, 4), 0)
