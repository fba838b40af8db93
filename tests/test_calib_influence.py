"""Spectral influence (TRQ), timestep weights, Influence serialisation and heatmap."""

from __future__ import annotations

import math

import pytest
import torch

from slimdiff.calibration.collect import ActivationCollector
from slimdiff.core.stats import ActivationStats, attn_key, ffn_key
from slimdiff.families.units import compression_units
from slimdiff.planning.influence import (
    Influence,
    compute_influence,
    plot_influence_heatmap,
    qk_trq,
    short_unit_label,
    snr_weights,
    spectral_weights,
    timestep_weights,
    trq,
    vo_operator,
)

D = torch.float64


# ---------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------
def test_trq_is_one_for_isotropic_inputs():
    torch.manual_seed(0)
    for d_in, d_out in [(3, 5), (16, 4), (7, 7)]:
        f = torch.randn(d_in, d_out, dtype=D)
        assert float(trq(2.5 * torch.eye(d_in, dtype=D), f)) == pytest.approx(1.0, abs=1e-12)


def test_trq_hand_computed():
    # F = [[1], [0]], C = diag(3, 1): S = diag(3/4, 1/4), tr(F^T S F) = 3/4, ||F||^2 = 1 -> 2 * 3/4
    assert (
        float(trq(torch.diag(torch.tensor([3.0, 1.0], dtype=D)), torch.tensor([[1.0], [0.0]], dtype=D)))
        == 1.5
    )
    # F = [[1], [1]], C = [[2, 1], [1, 2]]: S = C / 4, F^T S F = 6/4, ||F||^2 = 2 -> 2 * 1.5 / 2
    c = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=D)
    assert float(trq(c, torch.ones(2, 1, dtype=D))) == pytest.approx(1.5, abs=1e-15)
    # weights orthogonal to the only activation direction -> 0; aligned with it -> d_in
    c = torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=D))
    assert float(trq(c, torch.tensor([[0.0], [1.0], [0.0]], dtype=D))) == 0.0
    assert float(trq(c, torch.tensor([[1.0], [0.0], [0.0]], dtype=D))) == 3.0
    # batched: (T=2, d, d) covariances with one operator
    both = torch.stack([torch.eye(2, dtype=D), torch.diag(torch.tensor([3.0, 1.0], dtype=D))])
    assert trq(both, torch.tensor([[[1.0], [0.0]]], dtype=D)).tolist() == [1.0, 1.5]


def test_qk_trq_known_answers():
    e1 = torch.diag(torch.tensor([1.0, 0.0], dtype=D))
    e2 = torch.diag(torch.tensor([0.0, 1.0], dtype=D))
    iso = torch.eye(2, dtype=D)
    assert float(qk_trq(e1, e1)) == 2.0  # both on the same direction: d_h
    assert float(qk_trq(e1, e2)) == 0.0  # queries never meet the keys' direction
    assert float(qk_trq(iso, e1)) == 1.0 and float(qk_trq(e2, 7 * iso)) == 1.0  # one side isotropic
    # hand case: S_q = [[2,1],[1,2]]/4, S_k = diag(3,1)/4 -> 2 * (6 + 2) / 16 = 1
    assert (
        float(
            qk_trq(
                torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=D), torch.diag(torch.tensor([3.0, 1.0], dtype=D))
            )
        )
        == 1.0
    )
    sq = torch.diag(torch.tensor([3.0, 1.0], dtype=D))
    assert float(qk_trq(sq, sq)) == pytest.approx(2 * (9 + 1) / 16)


def test_vo_operator_blocks():
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # (d_out=3, H*d_h = 2*2)
    ops = vo_operator(w, heads=2)
    assert ops.shape == (2, 2, 3)
    torch.testing.assert_close(ops[1], w[:, 2:4].T.to(D))


def test_trq_rejects_empty_bucket():
    with pytest.raises(ValueError, match="non-positive trace"):
        trq(torch.zeros(2, 2, dtype=D), torch.ones(2, 1, dtype=D))


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
def test_weightings_sum_to_one_and_known_values():
    m = torch.tensor([[1.0, 2.0, 3.0], [1.0, 4.0, 5.0]], dtype=D)  # (units, T): means 1, 3, 4
    w = spectral_weights(m)
    torch.testing.assert_close(w, torch.tensor([1 / 8, 3 / 8, 4 / 8], dtype=D))
    u = timestep_weights(m, "uniform")
    torch.testing.assert_close(u, torch.full((3,), 1 / 3, dtype=D))
    # SNR = abar / (1 - abar): 1 and 9 and (mean over two timesteps) -> log1p weights
    s = snr_weights([[0.5], [0.9], [0.5, 0.9]])
    raw = torch.tensor([math.log(2), math.log(10), (math.log(2) + math.log(10)) / 2], dtype=D)
    torch.testing.assert_close(s, raw / raw.sum())
    for v in (w, u, s):
        assert float(v.sum()) == pytest.approx(1.0, abs=1e-15) and bool((v >= 0).all())
    with pytest.raises(ValueError, match="bucket_alphas_cumprod"):
        timestep_weights(m, "snr", {})
    with pytest.raises(ValueError, match="weighting must be one of"):
        timestep_weights(m, "loss")


# ---------------------------------------------------------------------------------------------
# On a tiny UNet
# ---------------------------------------------------------------------------------------------
def empty_stats(unet, n_buckets: int) -> ActivationStats:
    return ActivationCollector(unet, n_buckets).stats()


def fill_isotropic(stats: ActivationStats, tokens: int = 10) -> None:
    for key, m in stats.moments.items():
        eye = torch.eye(m.shape[-1], dtype=D).expand_as(m[0])
        m[:] = tokens * eye
        stats.tokens[key][:] = tokens


@pytest.mark.parametrize("weighting", ["spectral", "uniform", "snr"])
def test_influence_isotropic_is_one(tiny_unet, weighting):
    stats = empty_stats(tiny_unet, 3)
    fill_isotropic(stats)
    stats.meta["bucket_alphas_cumprod"] = [[0.1, 0.2], [0.5], [0.9]]
    inf = compute_influence(stats, tiny_unet, weighting)
    assert inf.units == list(compression_units(tiny_unet))
    torch.testing.assert_close(inf.trq, torch.ones_like(inf.trq), rtol=0, atol=1e-12)
    torch.testing.assert_close(inf.scores, torch.ones_like(inf.scores), rtol=0, atol=1e-12)
    assert float(inf.weights.sum()) == pytest.approx(1.0, abs=1e-15)


def test_influence_hand_computed_units(tiny_unet):
    """Bucket 1 puts all FFN / attention-output energy on one direction and aligns queries with
    keys; the unit TRQs then have closed forms that we compute by hand from the weights."""
    stats = empty_stats(tiny_unet, 2)
    fill_isotropic(stats)
    block = next(iter(compression_units(tiny_unet).values())).block
    # FFN: C = e_j e_j^T -> TRQ = inner * ||W2[:, j]||^2 / ||W2||_F^2
    j = 5
    w2 = tiny_unet.get_submodule(f"{block}.ff.net.2").weight.detach().to(D)  # (d, inner)
    inner = w2.shape[1]
    stats.moments[ffn_key(block)][1] = 0
    stats.moments[ffn_key(block)][1, j, j] = 4.0
    expect_ffn = inner * float(w2[:, j].square().sum() / w2.square().sum())
    # VO attn1: per head C = e_0 e_0^T -> TRQ_h = d_h * ||W_o[:, h*d_h]||^2 / ||W_o,h||_F^2, mean over heads
    attn = tiny_unet.get_submodule(f"{block}.attn1")
    wo = attn.to_out[0].weight.detach().to(D)  # (d, H * d_h)
    heads, dh = attn.heads, wo.shape[1] // attn.heads
    key = attn_key(block, "attn1", "attnout")
    stats.moments[key][1] = 0
    stats.moments[key][1, :, 0, 0] = 3.0
    expect_vo = (
        sum(
            dh * float(wo[:, h * dh].square().sum() / wo[:, h * dh : (h + 1) * dh].square().sum())
            for h in range(heads)
        )
        / heads
    )
    # QK attn2: queries and keys both on e_0 -> d_h; keys isotropic would give 1
    for which in ("query", "key"):
        k = attn_key(block, "attn2", which)
        stats.moments[k][1] = 0
        stats.moments[k][1, :, 0, 0] = 2.0
    inf = compute_influence(stats, tiny_unet, "uniform")
    row = {u: inf.trq[i].tolist() for i, u in enumerate(inf.units)}
    assert row[f"{block}.ff"][0] == pytest.approx(1.0, abs=1e-12)
    assert row[f"{block}.ff"][1] == pytest.approx(expect_ffn, rel=1e-12)
    assert row[f"{block}.attn1.vo"][1] == pytest.approx(expect_vo, rel=1e-12)
    assert row[f"{block}.attn2.qk"][1] == pytest.approx(dh, rel=1e-12)
    assert row[f"{block}.attn1.qk"] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert inf.score_of()[f"{block}.ff"] == pytest.approx(0.5 * (1.0 + expect_ffn), rel=1e-12)
    # spectral weights follow the mean TRQ: bucket 1 is anisotropic, so it weighs more
    spec = compute_influence(stats, tiny_unet, "spectral")
    torch.testing.assert_close(spec.weights, spec.trq.mean(0) / spec.trq.mean(0).sum())
    assert float(spec.weights[1]) > float(spec.weights[0])
    # aggregated second moments are the pure weighted sum of per-bucket moments
    agg = spec.aggregate(stats)
    k = ffn_key(block)
    torch.testing.assert_close(
        agg[k], spec.weights[0] * stats.second_moment(k, 0) + spec.weights[1] * stats.second_moment(k, 1)
    )


def test_influence_rejects_bucket_without_tokens(tiny_unet):
    stats = empty_stats(tiny_unet, 2)
    fill_isotropic(stats)
    key = ffn_key(next(iter(compression_units(tiny_unet).values())).block)
    stats.tokens[key][1] = 0
    stats.moments[key][1] = 0
    with pytest.raises(ValueError, match=r"buckets \[1\] saw no tokens"):
        compute_influence(stats, tiny_unet)


def test_influence_json_round_trip_digest_and_heatmap(tiny_unet, tmp_path):
    stats = empty_stats(tiny_unet, 3)
    fill_isotropic(stats)
    torch.manual_seed(0)
    for m in stats.moments.values():  # random SPD moments: non-trivial TRQ values
        a = torch.randn(*m.shape[1:-2], m.shape[-1], m.shape[-1], dtype=D)  # (..., d, d)
        m[2] = 10 * (a @ a.transpose(-1, -2))
    stats.meta["bucket_timesteps"] = [[951, 901], [651, 601], [51, 1]]
    inf = compute_influence(stats, tiny_unet)
    back = Influence.from_json(inf.to_json(tmp_path / "influence.json"))
    assert (
        torch.equal(back.trq, inf.trq)
        and torch.equal(back.weights, inf.weights)
        and torch.equal(back.scores, inf.scores)
    )
    assert back.units == inf.units and back.digest == inf.digest
    assert Influence.from_json(tmp_path / "influence.json").digest == inf.digest
    other = compute_influence(stats, tiny_unet, "uniform")
    assert other.digest != inf.digest
    png = plot_influence_heatmap(inf, tmp_path / "heatmap.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_short_unit_label():
    assert short_unit_label("down_blocks.1.attentions.0.transformer_blocks.0.attn2.qk") == "d1.a0.t0 attn2.qk"
    assert short_unit_label("mid_block.attentions.0.transformer_blocks.1.ff") == "mid.a0.t1 ff"
