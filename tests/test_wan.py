"""Wan 2.1 (``WanTransformer3DModel``): the adapter, q/k RMSNorms ACROSS heads (one norm correction
over every head's kept coordinates), RoPE-aware pair selection in the self-attention, coordinate
selection in the text cross-attention, padded text tokens as real inputs, the compressed
processor, save / load, on tiny transformers and a tiny ``WanPipeline`` built from config
(wan_pipelines.py: random weights, fixed seeds, a one-layer UMT5 encoder).

References and tolerances:
* rotary angles against the RoPE formula written out here (frame, row, column positions; axes of
  8, 4, 4 coordinates at d_h = 16; theta 10000): the model's tables are float64 products of
  float32 frequencies, so 1e-5 rad;
* the compressed processor with nothing compressed, a full-rank rewrite, and selections that drop
  only coordinates the logits do not see (zero q/k rows; or zero k rows with q rows that copy
  another head's kept rows, so every token's kept share of the across-heads norm is the same
  1 / (1 + kappa)), against the original in float32: exact maths, so float32 rounding through
  2 blocks (1e-5 relative; the statistics the corrections are read from are float32 grams, whose
  1e-7 relative rounding moves c by as much);
* the norm corrections of those known answers exactly as derived (c = |S| / (rho D): 2 for q,
  1/2 for k), to 1e-5 relative (float32 grams again);
* the across-heads formulas against their per-head versions at one head: the same float64 ops on
  the same draws, so bit for bit;
* relative-position equivariance: one common phase on every token's rotation (a global position
  shift) leaves the logits unchanged in exact arithmetic; float64 tables, float32 activations, so
  1e-5 relative; moving one frame only must change the output by far more (> 1e-3);
* token counts exactly.
The whole file runs in about 40 s on one loaded core (the pipeline test is most of it).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from family_contract import collect, qk_ranks, rel, run
from torch import nn
from wan_pipelines import WAN_HW, tiny_wan_transformer

from slimdiff.calibration.collect import ActivationCollector
from slimdiff.core import linalg
from slimdiff.families import UnsupportedModelError, adapter_for
from slimdiff.families.attention import AcrossHeadsRMSNorm, HeadwiseRMSNorm, sdpa_backends
from slimdiff.families.units import compression_units, count_parameters
from slimdiff.families.wan import SlimWanAttnProcessor
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import ServingShape, denoiser_flops, unit_flop_costs
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import apply_plan_shapes_, compress_

HW, TEXT, FRAMES = (8, 8), 6, 3  # latent 3 x 8 x 8 -> 3 x 4 x 4 = 48 video tokens, 6 text tokens
D_H, HEADS = 16, 2
EPS = 1e-6  # the blocks' eps, which their q/k norms get


def tiny(seed: int = 0) -> nn.Module:
    return tiny_wan_transformer(seed)  # 2 blocks, 2 heads x 16, RoPE axes (8, 4, 4)


def inputs(model, seed: int, batch: int = 2, pad: int = 0):
    """One forward's inputs; the last ``pad`` text tokens are zero rows, as WanPipeline pads."""
    args, kwargs = adapter_for(model).example_inputs(
        model,
        batch,
        HW,
        TEXT,
        device="cpu",
        generator=torch.Generator().manual_seed(seed),
        latent_frames=FRAMES,
    )
    if pad:
        kwargs["encoder_hidden_states"][:, TEXT - pad :] = 0.0
    return args, kwargs


def covariances(model, n: int = 3) -> dict[str, torch.Tensor]:
    return collect(model, [inputs(model, 100 + i, pad=2) for i in range(n)]).stats().aggregate([1.0])


@pytest.fixture(scope="module")
def calibrated():
    model = tiny()
    return model, covariances(model)


# -- the adapter -----------------------------------------------------------------------------------
def test_units_layouts_and_costs():
    model = tiny()
    adapter = adapter_for(model)
    assert adapter.family.startswith("Wan 2.1")
    units = compression_units(model)
    assert {n: u.kind for n, u in units.items()} == {
        **{f"blocks.{i}.{a}.{k}": k for i in (0, 1) for a in ("attn1", "attn2") for k in ("qk", "vo")},
        **{f"blocks.{i}.ffn": "ffn" for i in (0, 1)},
    }
    self_attn, cross = units["blocks.0.attn1.qk"].layout, units["blocks.0.attn2.qk"].layout
    assert self_attn.rope and not cross.rope  # RoPE only on the video tokens' self-attention
    for lay in (self_attn, cross):
        assert lay.norms_across_heads and not lay.norms_head_major and lay.text_mask is None
        assert lay.norms_q == (f"{lay.module}.norm_q",) and not lay.masked_keys
    # dim 32, 2 heads, biases everywhere: QK = a row of to_q and of to_k per head; VO = a row of
    # to_v and a column of to_out.0 per head; FFN = a row of net.0.proj + a column of net.2
    assert units["blocks.0.attn2.qk"].cost_per_rank == 2 * 2 * 33
    assert units["blocks.0.attn1.vo"].cost_per_rank == 2 * (33 + 32)
    assert units["blocks.1.ffn"].cost_per_rank == 33 + 32 and units["blocks.1.ffn"].full_rank == 64
    assert adapter.sample_size(model) == (60, 104)  # WanPipeline's 480 x 832 px


def test_rope_angles_are_the_models_frame_row_column_positions():
    """Token (f, r, c) of the patched grid (frame-major) has angles f w_t, r w_h, c w_w with the
    axes' frequencies theta^(-2i / axis width), axis widths d_h - 4 floor(d_h / 6) = 8 (frames),
    4 (rows), 4 (columns); read off the model's own ``rope``."""
    model = tiny()
    adapter = adapter_for(model)
    frames, h, w = 2, 6, 8  # latent grid -> 2 x 3 x 4 patches
    angles = adapter.rope_angles(model, (h, w), frames)
    freqs = [10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for d in (8, 4, 4)]
    ref = torch.stack(
        [
            torch.cat([f * freqs[0], r * freqs[1], c * freqs[2]])
            for f in range(frames)
            for r in range(h // 2)
            for c in range(w // 2)
        ]
    )
    assert angles.shape == (frames * 3 * 4, 8)
    diff = torch.remainder(angles - ref + math.pi, 2 * math.pi) - math.pi
    assert diff.abs().max() < 1e-5
    assert adapter.rope_angles(model).shape == (21 * 30 * 52, 8)  # 81 frames at 480 x 832 px


def test_slim_processor_reproduces_the_stock_processor():
    """Nothing compressed: SlimWanAttnProcessor on the stock layers (norms across heads before the
    split, RoPE in attn1, none in attn2) equals the stock WanAttnProcessor."""
    model = tiny(seed=1)
    x = inputs(model, 2, pad=2)
    ref = run(model, x)
    slim = copy.deepcopy(model)
    for block in slim.blocks:
        for attn in (block.attn1, block.attn2):
            attn.set_processor(SlimWanAttnProcessor(scale=D_H**-0.5))
    assert rel(run(slim, x), ref) < 1e-6


# -- (a) full rank, (b) parameter counts -------------------------------------------------------------
def test_full_rank_rewrite_reproduces_the_original(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    full = RankPlan.from_ranks(units, {n: u.full_rank for n, u in units.items()})
    slim = copy.deepcopy(model)
    compress_(slim, full, cov, rewrite_full_rank=True)
    block = slim.blocks[0]
    assert type(block.attn1.processor) is SlimWanAttnProcessor is type(block.attn2.processor)
    assert block.attn1.slim_rope_index.shape == (2, 16) and not hasattr(block.attn2, "slim_rope_index")
    assert type(block.attn2.norm_k) is AcrossHeadsRMSNorm and block.attn2.norm_k.weight.shape == (2, 16)
    x = inputs(model, 3, pad=2)
    assert rel(run(slim, x), run(model, x)) < 1e-5


def test_parameter_count_is_what_the_plan_says(calibrated):
    """Parameters removed = sum over units of (full rank - rank) x cost per rank, the plan's
    removed_params; each narrowed QK's two across-heads norms (32 weights each) keep H r weights."""
    model, cov = calibrated
    units = compression_units(model)
    profiles = error_profiles(model, cov, units)
    assert all(len(p) == u.full_rank + 1 for p, u in zip(profiles.values(), units.values(), strict=True))
    plan = plan_ranks(None, units, Budget(removed_fraction=0.4), r_min=4, multiple=2, profiles=profiles)
    ranks = {n: (6 if units[n].kind == "qk" else p.rank) for n, p in plan.units.items()}
    plan = RankPlan.from_ranks(units, ranks)
    assert {p.kind for p in plan.compressed_units().values()} == {"ffn", "qk", "vo"}
    slim = copy.deepcopy(model)
    report = compress_(slim, plan, cov)
    removed = sum((p.full_rank - p.rank) * units[n].cost_per_rank for n, p in plan.units.items())
    assert removed == plan.removed_params > 0
    norms = sum(
        2 * (HEADS * p.rank - HEADS * D_H) for p in plan.compressed_units().values() if p.kind == "qk"
    )
    assert count_parameters(slim) == count_parameters(model) - removed + norms == report.params_after
    block = slim.blocks[0]
    assert block.attn1.to_q.out_features == block.attn2.to_k.out_features == 2 * 6
    assert block.attn2.to_out[0].in_features == 2 * plan.units["blocks.0.attn2.vo"].rank
    assert block.ffn.net[2].in_features == plan.units["blocks.0.ffn"].rank
    # the report's predicted QK error is the profile's (across-heads renormalisation included)
    for name in ("blocks.0.attn1.qk", "blocks.1.attn2.qk"):
        assert report.units[name].relative_error == pytest.approx(profiles[name][6], rel=1e-9)
    x = inputs(model, 7, pad=2)
    assert rel(run(slim, x), run(model, x)) < 0.2  # 0.07 measured (random weights)


# -- (c) known answers ---------------------------------------------------------------------------------
KEPT = {0: [0, 2, 5, 7], 1: [1, 2, 3, 6]}  # kept rotary pairs of each head (4 of 8)
DROPPED = {h: [p for p in range(8) if p not in kept] for h, kept in KEPT.items()}


def rows(h: int, pairs: list[int]) -> list[int]:
    return [h * D_H + 2 * p + i for p in pairs for i in (0, 1)]


def edit_qk(model: nn.Module, kappa: float | None) -> nn.Module:
    """In every attention, zero the key rows (weights and biases) of each head's DROPPED pairs.
    ``kappa`` None: zero the query rows too (the dropped pairs carry nothing at all). Else the
    dropped query rows of head h are sqrt(kappa) x the kept query rows of the OTHER head: the logits
    still never see them, but they carry kappa times the kept energy of every token into the
    across-heads norm (each token's kept share is 1 / (1 + kappa), the same for all tokens)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.blocks:
            for attn in (block.attn1, block.attn2):
                for h in (0, 1):
                    attn.to_k.weight[rows(h, DROPPED[h])] = 0.0
                    attn.to_k.bias[rows(h, DROPPED[h])] = 0.0
                    src = rows(1 - h, KEPT[1 - h])
                    for t in (attn.to_q.weight, attn.to_q.bias):
                        t[rows(h, DROPPED[h])] = 0.0 if kappa is None else math.sqrt(kappa) * t[src]
    return model


@pytest.mark.parametrize("kappa", [None, 3.0])
def test_coordinates_the_logits_never_see_are_dropped_and_the_output_is_unchanged(kappa):
    """Known answer: QK rank 8 keeps the other 4 pairs of every head (attn1: whole rotary pairs;
    attn2: the same coordinates, chosen one by one), and the compressed model equals the original.
    With kappa 3 the query norm's correction is c = |S| / (rho D) = (16 / 32) / (1 / 4) = 2 (keys:
    1 / 2): the one RMSNorm over all heads' kept coordinates gets weight g_S / sqrt(c) and eps /
    c. A per-head norm with per-head corrections would NOT be exact there (each head's kept share
    varies from token to token): replacing the q norms by one shows it."""
    model = edit_qk(tiny(seed=3), kappa)
    cov = covariances(model)
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, qk_ranks(units, 8), cov)
    keep = torch.tensor([rows(h, KEPT[h]) for h in (0, 1)]) - torch.tensor([[0], [D_H]])  # (2, 8) in-head
    for block, original in zip(slim.blocks, model.blocks, strict=True):
        assert torch.equal(block.attn1.slim_rope_index, keep)
        assert block.attn2.to_q.out_features == block.attn1.to_k.out_features == 2 * 8
        for which in ("attn1", "attn2"):
            attn, orig = getattr(block, which), getattr(original, which)
            for norm, c in (("norm_q", 0.5 if kappa is None else 2.0), ("norm_k", 0.5)):
                new, old = getattr(attn, norm), getattr(orig, norm)
                assert type(new) is AcrossHeadsRMSNorm
                torch.testing.assert_close(new.eps, torch.full((2,), EPS / c), rtol=1e-5, atol=0)
                ref = old.weight.detach().view(2, D_H).gather(1, keep) / math.sqrt(c)
                torch.testing.assert_close(new.weight.detach(), ref, rtol=1e-5, atol=0)
    x = inputs(model, 5, pad=2)
    assert rel(run(slim, x), run(model, x)) < 1e-5
    if kappa is None:
        return
    per_head = copy.deepcopy(slim)  # the per-head alternative: HeadwiseRMSNorm, per-head corrections
    agg = cov["blocks.0.attn2.query"], cov["blocks.1.attn2.query"]
    for block, cq in zip(per_head.blocks, agg, strict=True):
        attn = block.attn2
        norm = HeadwiseRMSNorm(2, 8)
        c = torch.tensor([linalg.rms_norm_correction(cq[h], keep[h]) for h in (0, 1)])
        with torch.no_grad():
            norm.weight.copy_(attn.norm_q.weight * math.sqrt(2.0) / c.sqrt()[:, None])
            norm.eps.copy_(EPS / c)
        attn.norm_q = _PerHead(norm)
    assert rel(run(per_head, x), run(model, x)) > 1e-3


class _PerHead(nn.Module):
    """A per-head norm called on (B, N, heads * r) as Wan's processor calls its norms."""

    def __init__(self, norm: HeadwiseRMSNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return self.norm(x.view(b, n, 2, -1).transpose(1, 2)).transpose(1, 2).reshape(b, n, -1)


def test_across_heads_formulas_reduce_to_the_per_head_ones_at_one_head():
    """One head: the across-heads correction, kept-share moments and selection errors are the
    per-head ones, bit for bit (same float64 ops, same seeded draws)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(16, 16, generator=gen, dtype=torch.float64),
        torch.randn(16, 16, generator=gen, dtype=torch.float64),
    )
    cq, ck = a @ a.T / 16, b @ b.T / 16
    cqn, ckn = cq / cq.trace() * 16, ck / ck.trace() * 16
    phases = linalg.rope_phase_moments(torch.rand(40, 8, generator=gen, dtype=torch.float64) * 20)
    for ph in (None, phases):
        sel = (
            linalg.rms_coordinate_selection(cqn, ckn, 6, cq, ck)
            if ph is None
            else linalg.rope_pair_selection(cqn, ckn, 6, *ph, cq, ck)
        )
        bare = (
            linalg.rms_coordinate_selection(cqn, ckn, 6)
            if ph is None
            else linalg.rope_pair_selection(cqn, ckn, 6, *ph)
        )
        across = linalg.selection_errors_across_heads([bare], cqn[None], ckn[None], cq[None], ck[None], ph)
        assert torch.equal(across, sel.errors)
        assert linalg.rms_norm_correction_across_heads(
            cq[None], sel.keep[None]
        ) == linalg.rms_norm_correction(cq, sel.keep)
    order = torch.randperm(16, generator=gen)
    for x, y in zip(
        linalg.kept_share_moments_across_heads(cq[None], order[None]),
        linalg.kept_share_moments(cq, order),
        strict=True,
    ):
        assert torch.equal(x, y)
    # ... with the raw means too (under RoPE the statistics carry them): the same draws, shifted
    mean = 0.3 * torch.randn(16, generator=gen, dtype=torch.float64)
    biased = cq + torch.outer(mean, mean)
    for x, y in zip(
        linalg.kept_share_moments_across_heads(biased[None], order[None], mean=mean[None]),
        linalg.kept_share_moments(biased, order, mean=mean),
        strict=True,
    ):
        assert torch.equal(x, y)
    with_means = linalg.rope_pair_selection(cqn, ckn, 6, *phases, cq, ck, mean, -mean)
    bare = linalg.rope_pair_selection(cqn, ckn, 6, *phases)
    across = linalg.selection_errors_across_heads(
        [bare], cqn[None], ckn[None], cq[None], ck[None], phases, mean[None], -mean[None]
    )
    assert torch.equal(across, with_means.errors)


def test_across_heads_correction_pools_every_heads_energy():
    """c = |S| / (rho D) with rho over all heads: head 0 keeps 2 of 4 coordinates holding 90% of its
    energy 1, head 1 keeps 2 holding 10% of its energy 9: rho = (0.9 + 0.9) / 10 = 0.18, c = 4 /
    (0.18 x 8); the per-head corrections (1 / 1.8 and 1 / 0.2) differ from it and from each other."""
    cov = torch.zeros(2, 4, 4, dtype=torch.float64)
    cov[0].diagonal().copy_(torch.tensor([0.45, 0.45, 0.05, 0.05], dtype=torch.float64))
    cov[1].diagonal().copy_(torch.tensor([0.45, 0.45, 4.05, 4.05], dtype=torch.float64))
    keep = torch.tensor([[0, 1], [0, 1]])
    assert linalg.rms_norm_correction_across_heads(cov, keep) == pytest.approx(4 / (0.18 * 8), rel=1e-12)
    assert linalg.rms_norm_correction(cov[0], keep[0]) == pytest.approx(1 / 1.8, rel=1e-12)
    assert linalg.rms_norm_correction(cov[1], keep[1]) == pytest.approx(1 / 0.2, rel=1e-12)


# -- (d) padded text tokens ------------------------------------------------------------------------------
def test_padded_text_tokens_are_real_cross_attention_inputs():
    """WanPipeline zeroes the padded text embeddings and passes no mask: the text embedder maps a
    zero row to one non-zero constant token, every cross-attention sees it as a key, and removing
    the padded tokens changes the output. So the key statistics count all text tokens (here 6 per
    sample, 2 of them padding): nothing is masked out."""
    model = tiny(seed=2)
    x = inputs(model, 11, pad=2)
    seen = []
    handle = model.blocks[0].attn2.to_k.register_forward_hook(lambda m, a, o: seen.append(o))
    ref = run(model, x)
    handle.remove()
    (keys,) = seen
    assert torch.equal(keys[:, -1], keys[:, -2]) and float(keys[:, -1].abs().max()) > 0.1
    short = copy.deepcopy(x)
    short[1]["encoder_hidden_states"] = short[1]["encoder_hidden_states"][:, : TEXT - 2]
    assert rel(run(model, short), ref) > 1e-3
    tokens = {k: int(v.sum()) for k, v in collect(model, [x]).stats().tokens.items()}
    n_video = 2 * FRAMES * 16
    for b in (0, 1):
        assert tokens[f"blocks.{b}.attn2.key"] == tokens[f"blocks.{b}.attn2.key_normed"] == 2 * TEXT
        assert tokens[f"blocks.{b}.attn2.query"] == tokens[f"blocks.{b}.attn2.attnout"] == n_video
        assert tokens[f"blocks.{b}.attn1.key"] == tokens[f"blocks.{b}.ffn.hidden"] == n_video


# -- (e) relative positions ---------------------------------------------------------------------------
@contextmanager
def shifted_positions(model: nn.Module, offset: tuple[float, float, float], first_frame_only: bool = False):
    """Shift every token's (frame, row, column) position by ``offset``: each pair's angle plus
    offset_axis x its frequency (the angle at position 1). ``first_frame_only``: only the tokens of
    the first latent frame move."""
    rope = model.rope
    omega = torch.atan2(rope.freqs_sin[1], rope.freqs_cos[1])  # (d_h,), each pair's value twice
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor([rope.t_dim, rope.h_dim, rope.w_dim]))
    delta = omega * torch.tensor(offset, dtype=omega.dtype)[axis]
    forward = rope.forward

    def shifted(hidden_states):
        cos, sin = forward(hidden_states)  # (1, N, 1, d_h)
        d = delta.expand_as(cos).clone()
        if first_frame_only:
            per_frame = (hidden_states.shape[3] // 2) * (hidden_states.shape[4] // 2)
            d[:, per_frame:] = 0.0
        return cos * d.cos() - sin * d.sin(), sin * d.cos() + cos * d.sin()

    rope.forward = shifted
    try:
        yield
    finally:
        del rope.forward


def test_compressed_attention_keeps_relative_position_equivariance(calibrated):
    """A global position shift leaves a RoPE model's output unchanged; whole-pair selection with
    narrowed tables keeps that (QK at 8 of 16 coordinates everywhere). Moving the first frame alone
    changes both models' outputs."""
    model, cov = calibrated
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, qk_ranks(units, 8), cov)
    assert slim.blocks[1].attn1.slim_rope_index.shape == (2, 8)
    x = inputs(model, 9, pad=2)
    base = {"original": run(model, x), "compressed": run(slim, x)}
    for name, m in (("original", model), ("compressed", slim)):
        with shifted_positions(m, (3.0, 5.0, -2.0)):
            assert rel(run(m, x), base[name]) < 1e-5, name
        with shifted_positions(m, (3.0, 5.0, -2.0), first_frame_only=True):
            assert rel(run(m, x), base[name]) > 1e-3, name


# -- kernels and FLOPs --------------------------------------------------------------------------------
def test_compressed_attention_stays_on_the_fused_kernel(calibrated):
    """r_qk != r_vo (QK 6, VO 10): the processor pads to one width, so SDPA runs the original's
    backend in both attentions."""
    model, cov = calibrated
    units = compression_units(model)
    ranks = {n: {"qk": 6, "vo": 10}.get(u.kind, u.full_rank) for n, u in units.items()}
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(units, ranks), cov)
    x = inputs(model, 4)
    before, after = sdpa_backends(model, *x[0], **x[1]), sdpa_backends(slim, *x[0], **x[1])
    assert len(after) == 4 and all(calls == ["flash"] for calls in after.values()), after
    assert set(before) == set(after)


def test_plan_flops_are_the_flop_count():
    model = tiny()
    shape = ServingShape(HW, batch=2, text_len=TEXT)
    costs = unit_flop_costs(model, shape)
    assert costs.total == denoiser_flops(model, 2, HW, TEXT).total
    units = compression_units(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        ranks = {
            n: 2 * int(torch.randint(1, u.full_rank // 2 + 1, (1,), generator=gen)) for n, u in units.items()
        }
        with torch.device("meta"):
            skeleton = type(model).from_config(model.config)
        apply_plan_shapes_(skeleton, RankPlan.from_ranks(units, ranks))
        assert costs.plan_flops(ranks) == denoiser_flops(skeleton, 2, HW, TEXT).total


# -- refusals -----------------------------------------------------------------------------------------
def test_what_is_not_understood_is_refused_naming_it():
    i2v = tiny_wan_transformer(0, image_dim=8, added_kv_proj_dim=32)  # Wan 2.1 I2V's image cross-attention
    with pytest.raises(
        UnsupportedModelError, match=r"blocks\.0\.attn2: the image cross-attention.*add_k_proj"
    ):
        compression_units(i2v)
    fused = tiny()
    fused.blocks[1].attn1.fuse_projections()
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1\.attn1: fused projections"):
        compression_units(fused)
    other = tiny()
    other.blocks[0].attn2.set_processor(SimpleNamespace())
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.attn2: unknown attention processor"):
        ActivationCollector(other, 1)
    # Wan 2.2 A14B pipelines (transformer_2 with boundary_ratio) are supported: test_wan22.py
    from diffusers import WanVACETransformer3DModel

    with torch.device("meta"):
        vace = WanVACETransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, num_layers=1, vace_layers=[0]
        )
    with pytest.raises(UnsupportedModelError, match="WanVACETransformerBlock"):
        adapter_for(vace)


# -- (f) through the pipeline: calibrate with its own sampler, compress, save, load ------------------
def test_pipeline_calibrates_compresses_and_loads_with_diffusers(tmp_path):
    """A tiny WanPipeline (wan_pipelines.py): statistics come from its own flow-matching sampler
    with classifier-free guidance (two calls per step) on a few frames (17: 5 latent frames);
    every prompt is padded to 512 text tokens, all of which are cross-attention keys. The
    compressed pipeline saves and loads with ``DiffusionPipeline.from_pretrained`` to the same
    latents, bit for bit."""
    from diffusers import DiffusionPipeline
    from family_pipelines import PROMPTS
    from wan_pipelines import tiny_wan_pipeline

    from slimdiff.calibration.collect import collect_stats
    from slimdiff.formats.io import save_compressed
    from slimdiff.planning.influence import compute_influence

    pipe = tiny_wan_pipeline(tmp_path / "build")
    model = pipe.transformer
    calls: list[tuple[int, int]] = []  # (latent frames, text tokens) of every call

    def hook(module, args, kwargs):
        enc = kwargs["encoder_hidden_states"]
        calls.append((kwargs["hidden_states"].shape[2], enc.shape[0] * enc.shape[1]))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    steps, prompts = 2, [PROMPTS[0], PROMPTS[4]]  # 5 and 2 words, both padded to 512 tokens
    try:
        stats = collect_stats(
            pipe, prompts, num_inference_steps=steps, guidance_scale=5.0, n_buckets=2, batch_size=2,
            height=WAN_HW, width=WAN_HW, progress=False,
        )  # fmt: skip
    finally:
        handle.remove()
    adapter = adapter_for(model)
    assert stats.meta["cfg_branches"] == 2 and stats.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert adapter.text_len(pipe) == 512
    assert calls == [(5, 2 * 512)] * (2 * steps)  # 5 latent frames; conditional + negative calls
    n_video = 2 * steps * 2 * 5 * 4  # calls x samples x (5 frames x 2 x 2 patches)
    assert int(stats.tokens["blocks.0.attn2.key"].sum()) == 2 * steps * 2 * 512  # padding included
    assert int(stats.tokens["blocks.1.attn2.query"].sum()) == n_video
    q = stats.tokens["blocks.0.attn1.query"]
    assert int(q.sum()) == n_video and q.tolist() == [n_video // 2] * 2  # one step per bucket

    influence = compute_influence(stats, model)
    cov = influence.aggregate(stats)
    units = compression_units(model)
    plan = plan_ranks(
        influence.score_of(), units, Budget(removed_fraction=0.4), r_min=4, multiple=2,
        profiles=error_profiles(model, cov, units),
    )  # fmt: skip
    plan = RankPlan.from_ranks(
        units, {n: (8 if units[n].kind == "qk" else p.rank) for n, p in plan.units.items()}
    )  # narrow every QK too: the saved model carries across-heads norms and narrowed rotary tables
    assert {p.kind for p in plan.compressed_units().values()} == {"ffn", "qk", "vo"}
    compress_(model, plan, cov)
    save_compressed(pipe, tmp_path / "slim")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert type(loaded).__name__ == "WanPipeline"
    assert type(loaded.transformer).__name__ == "SlimWanTransformer3DModel"
    assert loaded.transformer.slimdiff_plan == plan
    lt, mt = loaded.transformer.blocks[0], model.blocks[0]
    assert torch.equal(lt.attn1.slim_rope_index, mt.attn1.slim_rope_index)
    assert type(lt.attn2.norm_q) is AcrossHeadsRMSNorm and torch.equal(
        lt.attn2.norm_q.eps, mt.attn2.norm_q.eps
    )
    for module in loaded.components.values():  # fresh allocations: mmap offsets change CPU rounding
        if isinstance(module, nn.Module):
            for t in [*module.parameters(), *module.buffers()]:
                t.data = t.data.clone()
    kw = dict(
        num_inference_steps=2, height=WAN_HW, width=WAN_HW, num_frames=5, output_type="latent",
        guidance_scale=5.0,
    )  # fmt: skip
    a = pipe(prompts, generator=torch.Generator().manual_seed(0), **kw).frames
    b = loaded(prompts, generator=torch.Generator().manual_seed(0), **kw).frames
    assert torch.equal(a, b)
