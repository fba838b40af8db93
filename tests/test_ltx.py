"""LTX-Video (``LTXVideoTransformer3DModel``): the adapter, q/k RMSNorms ACROSS heads (as Wan), ONE
rotary table over all heads' coordinates (every head its own frequencies: per-head phase moments,
tables gathered at h d_h + kept index), masked T5 padding left out of the key statistics, the
compressed processor, save / load, on tiny transformers and a tiny ``LTXPipeline`` built from
config (ltx_pipelines.py: random weights, fixed seeds, a one-layer T5 encoder, a tiny LTX VAE).

References and tolerances:
* rotary angles against LTX's formula written out here (theta^(j / (F - 1)) pi / 2 (2 x - 1), x the
  position scaled by the pipeline's ``rope_interpolation_scale`` over the base size; F = 5
  frequencies per axis, one padding pair): the model's angles are float32 products of magnitude
  up to 10000 pi / 2, so 2e-6 relative to the angle plus 1e-5 rad;
* the compressed processor with nothing compressed, a full-rank rewrite, and selections that drop
  only coordinates the logits never see (zero key rows; query rows zero or copies of the other
  head's kept rows, so every token's kept share of the across-heads norm is 1 / (1 + kappa)),
  against the original in float32: exact maths, so float32 rounding through 2 blocks (1e-5
  relative; the corrections are read from float32 grams, 1e-7 relative);
* the norm corrections of those known answers as derived (c = |S| / (rho D): 2 for q, 1/2 for k),
  to 1e-5 relative (float32 grams again);
* per-head phase moments: each head's against ``rope_phase_moments`` of its own angles, bit for
  bit (the same float64 ops);
* relative-position equivariance: one common phase per rotary pair (a global position shift,
  applied to the float32 tables in float64) leaves the logits unchanged in exact arithmetic, so
  1e-5 relative; moving the first frame only must change the output by far more (> 1e-3);
* masked text: exp(-10000) is 0 in float32, so changing the padded embeddings changes nothing
  (1e-6 relative) and token counts are exact.
The whole file runs in about 6 s on one loaded core (10 s with start-up).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from family_contract import collect, qk_ranks, rel, run
from ltx_pipelines import LTX_HW, tiny_ltx_transformer
from torch import nn

from slimdiff.calibration.collect import ActivationCollector
from slimdiff.core import linalg
from slimdiff.families import UnsupportedModelError, adapter_for
from slimdiff.families.attention import AcrossHeadsRMSNorm
from slimdiff.families.ltx import LTX_FRAME_RATE, SlimLTXAttnProcessor, rope_scale
from slimdiff.families.units import compression_units, count_parameters
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import ServingShape, denoiser_flops, unit_flop_costs
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import apply_plan_shapes_, compress_

HW, TEXT, FRAMES = (16, 16), 6, 3  # 8-px units: 128 px -> 4 x 4 tokens per frame, 3 frames = 48 tokens
D_H, HEADS = 16, 2
EPS = 1e-5  # LTXAttention's q/k norm eps


def tiny(seed: int = 0) -> nn.Module:
    return tiny_ltx_transformer(seed)  # 2 blocks, 2 heads x 16, one rotary table over 32 coordinates


def inputs(model, seed: int, batch: int = 2, pad: int = 0):
    """One forward's inputs; the last ``pad`` text tokens are masked (0 in the mask), as LTXPipeline pads."""
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
        kwargs["encoder_attention_mask"][:, TEXT - pad :] = 0.0
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
    assert adapter.family.startswith("LTX-Video")
    units = compression_units(model)
    blocks = [f"transformer_blocks.{i}" for i in (0, 1)]
    assert {n: u.kind for n, u in units.items()} == {
        **{f"{b}.{a}.{k}": k for b in blocks for a in ("attn1", "attn2") for k in ("qk", "vo")},
        **{f"{b}.ff": "ffn" for b in blocks},
    }
    self_attn, cross = units[f"{blocks[0]}.attn1.qk"].layout, units[f"{blocks[0]}.attn2.qk"].layout
    assert self_attn.rope and not cross.rope  # RoPE only on the video tokens' self-attention
    assert cross.masked_keys and not self_attn.masked_keys  # padded T5 keys are masked
    for lay in (self_attn, cross):
        assert lay.norms_across_heads and not lay.norms_head_major and lay.text_mask is None
        assert lay.norms_q == (f"{lay.module}.norm_q",)
    # dim 32, 2 heads, biases everywhere: QK = a row of to_q and of to_k per head; VO = a row of
    # to_v and a column of to_out.0 per head; FFN (4 x 32 wide) = a row of net.0.proj + a column of net.2
    assert units[f"{blocks[0]}.attn2.qk"].cost_per_rank == 2 * 2 * 33
    assert units[f"{blocks[0]}.attn1.vo"].cost_per_rank == 2 * (33 + 32)
    assert units[f"{blocks[1]}.ff"].cost_per_rank == 33 + 32 and units[f"{blocks[1]}.ff"].full_rank == 128
    assert adapter.sample_size(model) == (64, 88)  # LTXPipeline's 512 x 704 px in 8-px units


def test_rope_angles_are_the_models_frame_row_column_positions():
    """Token (f, r, c) (frame-major) has, at global pair 1 + 3 j + axis, the angle w_j pi / 2 (2 x - 1)
    with w_j = 10000^(j / 4) and x = (f s_t / 20, r 32 / 2048, c 32 / 2048), s_t = 8 / 25 (the 8x
    temporal VAE at 25 fps); pair 0 is padding (angle 0). Pairs 0-7 are head 0's, 8-15 head 1's."""
    model = tiny()
    adapter = adapter_for(model)
    frames, hw = 2, (12, 8)  # 8-px units -> 2 x 3 x 2 tokens
    angles = adapter.rope_angles(model, hw, frames)
    w = 10000.0 ** (torch.arange(5, dtype=torch.float64) / 4) * math.pi / 2
    scale = rope_scale(LTX_FRAME_RATE)
    ref = []
    for f in range(frames):
        for r in range(3):
            for c in range(2):
                x = torch.tensor(
                    [f * scale[0] / 20, r * scale[1] / 2048, c * scale[2] / 2048], dtype=torch.float64
                )
                ref.append(
                    torch.cat([torch.zeros(1, dtype=torch.float64), (w[:, None] * (2 * x - 1)).reshape(-1)])
                )
    ref = torch.stack(ref).view(-1, HEADS, D_H // 2)
    assert angles.shape == (frames * 3 * 2, HEADS, D_H // 2)
    diff = torch.remainder(angles - ref + math.pi, 2 * math.pi) - math.pi
    assert (diff.abs() <= 2e-6 * ref.abs() + 1e-5).all()
    assert adapter.rope_angles(model).shape == (21 * 16 * 22, HEADS, D_H // 2)  # 161 frames at 512 x 704 px
    c, s = adapter.rope_phases(model)
    full = adapter.rope_angles(model)
    for h in range(HEADS):
        ch, sh = linalg.rope_phase_moments(full[:, h])
        assert torch.equal(c[h], ch) and torch.equal(s[h], sh)
        assert linalg.head_phases((c, s), h)[0] is not None
    assert not torch.allclose(c[0], c[1])  # the heads' frequencies differ: per-head moments matter


def test_slim_processor_reproduces_the_stock_processor():
    """Nothing compressed: SlimLTXAttnProcessor on the stock layers (norms across heads and RoPE
    before the split in attn1, the masked text in attn2) equals the stock LTXVideoAttnProcessor."""
    model = tiny(seed=1)
    x = inputs(model, 2, pad=2)
    ref = run(model, x)
    slim = copy.deepcopy(model)
    for block in slim.transformer_blocks:
        for attn in (block.attn1, block.attn2):
            attn.set_processor(SlimLTXAttnProcessor(scale=D_H**-0.5, head_dim=D_H))
    assert rel(run(slim, x), ref) < 1e-6


# -- (a) full rank, (b) parameter counts -------------------------------------------------------------
def test_full_rank_rewrite_reproduces_the_original(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    full = RankPlan.from_ranks(units, {n: u.full_rank for n, u in units.items()})
    slim = copy.deepcopy(model)
    compress_(slim, full, cov, rewrite_full_rank=True)
    block = slim.transformer_blocks[0]
    assert type(block.attn1.processor) is SlimLTXAttnProcessor is type(block.attn2.processor)
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
    block = slim.transformer_blocks[0]
    assert block.attn1.to_q.out_features == block.attn2.to_k.out_features == 2 * 6
    assert block.attn2.to_out[0].in_features == 2 * plan.units["transformer_blocks.0.attn2.vo"].rank
    assert block.ff.net[2].in_features == plan.units["transformer_blocks.0.ff"].rank
    # the report's predicted QK error is the profile's (per-head phases, across-heads renormalisation)
    for name in ("transformer_blocks.0.attn1.qk", "transformer_blocks.1.attn2.qk"):
        assert report.units[name].relative_error == pytest.approx(profiles[name][6], rel=1e-9)
    x = inputs(model, 7, pad=2)
    assert rel(run(slim, x), run(model, x)) < 0.2  # 0.043 measured (random weights)


# -- (c) known answers ---------------------------------------------------------------------------------
KEPT = {
    0: [0, 2, 5, 7],
    1: [1, 2, 3, 6],
}  # kept rotary pairs of each head (4 of 8); head 0's pair 0 is padding
DROPPED = {h: [p for p in range(8) if p not in kept] for h, kept in KEPT.items()}


def rows(h: int, pairs: list[int]) -> list[int]:
    return [h * D_H + 2 * p + i for p in pairs for i in (0, 1)]


def edit_qk(model: nn.Module, kappa: float | None) -> nn.Module:
    """In every attention, zero the key rows (weights and biases) of each head's DROPPED pairs.
    ``kappa`` None: zero the query rows too. Else the dropped query rows of head h are sqrt(kappa) x
    the kept query rows of the OTHER head: the logits never see them (the keys' pairs are zero, and
    a rotated zero pair stays zero), but they carry kappa times the kept energy of every token into
    the across-heads norm (each token's kept share is 1 / (1 + kappa), the same for all tokens)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.transformer_blocks:
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
    """Known answer: QK rank 8 keeps the other 4 pairs of every head (attn1: whole rotary pairs,
    each head under its own frequencies; attn2: the same coordinates one by one), and the compressed
    model equals the original. With kappa 3 the query norm's correction is c = |S| / (rho D) =
    (16 / 32) / (1 / 4) = 2 (keys: 1 / 2): one RMSNorm over all heads' kept coordinates with weight
    g_S / sqrt(c) and eps / c. The rotary tables are gathered at h d_h + kept index: gathering at the
    in-head index alone (head 1 under head 0's frequencies) would change the output."""
    model = edit_qk(tiny(seed=3), kappa)
    cov = covariances(model)
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, qk_ranks(units, 8), cov)
    keep = torch.tensor([rows(h, KEPT[h]) for h in (0, 1)]) - torch.tensor([[0], [D_H]])  # (2, 8) in-head
    for block, original in zip(slim.transformer_blocks, model.transformer_blocks, strict=True):
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
    wrong = copy.deepcopy(slim)  # every head under head 0's table: what a shared-table processor does
    for block in wrong.transformer_blocks:
        block.attn1.processor.head_dim = 0
    assert rel(run(wrong, x), run(model, x)) > 1e-3


# -- (d) padded text tokens ------------------------------------------------------------------------------
def test_masked_text_tokens_never_enter_the_statistics():
    """The transformer turns the 0/1 text mask into a -10000 bias: padded keys get no attention
    weight (changing their embeddings changes nothing), and the key statistics (raw and normed)
    count only real tokens: 4 of 6 per sample here."""
    model = tiny(seed=2)
    x = inputs(model, 11, pad=2)
    ref = run(model, x)
    other = copy.deepcopy(x)
    other[1]["encoder_hidden_states"][:, TEXT - 2 :] = torch.randn(
        2, 2, 16, generator=torch.Generator().manual_seed(1)
    )
    assert rel(run(model, other), ref) < 1e-6
    tokens = {k: int(v.sum()) for k, v in collect(model, [x]).stats().tokens.items()}
    n_video = 2 * FRAMES * 16
    for b in (0, 1):
        p = f"transformer_blocks.{b}"
        assert tokens[f"{p}.attn2.key"] == tokens[f"{p}.attn2.key_normed"] == 2 * (TEXT - 2)
        assert tokens[f"{p}.attn2.query"] == tokens[f"{p}.attn2.attnout"] == n_video
        assert tokens[f"{p}.attn1.key"] == tokens[f"{p}.ff.hidden"] == n_video


# -- (e) relative positions ---------------------------------------------------------------------------
@contextmanager
def shifted_positions(model: nn.Module, offset: tuple[float, float, float], first_frame_only: bool = False):
    """Shift every token's (frame, row, column) grid position by ``offset``: pair 1 + 3 j + axis
    gets the extra angle w_j pi / 2 x 2 offset_axis scale_axis / base_axis (float64), applied to the
    model's float32 tables. ``first_frame_only``: only the tokens of the first frame move."""
    rope = model.rope
    dim = rope.dim
    w = rope.theta ** torch.linspace(0.0, 1.0, dim // 6, dtype=torch.float64) * math.pi / 2
    per_axis = (
        torch.tensor(offset, dtype=torch.float64)
        * torch.tensor(rope_scale())
        / torch.tensor([20.0, 2048.0, 2048.0])
    )
    delta = torch.cat(
        [torch.zeros((dim % 6) // 2, dtype=torch.float64), (w[:, None] * 2 * per_axis).reshape(-1)]
    )
    delta = delta.repeat_interleave(2)  # (dim,): each pair's value twice
    forward = rope.forward

    def shifted(hidden_states, num_frames=None, height=None, width=None, *args, **kwargs):
        cos, sin = forward(hidden_states, num_frames, height, width, *args, **kwargs)  # (B, N, dim)
        d = delta.expand(cos.shape).clone()
        if first_frame_only:
            d[:, height * width :] = 0.0
        c, s = cos.double(), sin.double()
        return (c * d.cos() - s * d.sin()).float(), (s * d.cos() + c * d.sin()).float()

    rope.forward = shifted
    try:
        yield
    finally:
        del rope.forward


def test_compressed_attention_keeps_relative_position_equivariance(calibrated):
    """A global position shift leaves an LTX model's output unchanged; whole-pair selection with the
    tables gathered per head keeps that (QK at 8 of 16 coordinates everywhere). Moving the first
    frame alone changes both models' outputs."""
    model, cov = calibrated
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, qk_ranks(units, 8), cov)
    assert slim.transformer_blocks[1].attn1.slim_rope_index.shape == (2, 8)
    x = inputs(model, 9, pad=2)
    base = {"original": run(model, x), "compressed": run(slim, x)}
    for name, m in (("original", model), ("compressed", slim)):
        with shifted_positions(m, (3.0, 5.0, -2.0)):
            assert rel(run(m, x), base[name]) < 1e-5, name
        with shifted_positions(m, (3.0, 5.0, -2.0), first_frame_only=True):
            assert rel(run(m, x), base[name]) > 1e-3, name


# -- FLOPs and refusals --------------------------------------------------------------------------------
def test_plan_flops_are_the_flop_count():
    model = tiny()
    shape = ServingShape(HW, batch=2, text_len=TEXT)
    costs = unit_flop_costs(model, shape)
    assert costs.total == denoiser_flops(model, 2, HW, TEXT).total
    units = compression_units(model)
    gen = torch.Generator().manual_seed(0)
    ranks = {
        n: 2 * int(torch.randint(1, u.full_rank // 2 + 1, (1,), generator=gen)) for n, u in units.items()
    }
    with torch.device("meta"):
        skeleton = type(model).from_config(model.config)
    apply_plan_shapes_(skeleton, RankPlan.from_ranks(units, ranks))
    assert costs.plan_flops(ranks) == denoiser_flops(skeleton, 2, HW, TEXT).total


def test_what_is_not_understood_is_refused_naming_it():
    fused = tiny()
    fused.transformer_blocks[1].attn1.fuse_projections()
    with pytest.raises(UnsupportedModelError, match=r"transformer_blocks\.1\.attn1: fused projections"):
        compression_units(fused)
    other = tiny()
    other.transformer_blocks[0].attn2.set_processor(SimpleNamespace())
    with pytest.raises(
        UnsupportedModelError, match=r"transformer_blocks\.0\.attn2: unknown attention processor"
    ):
        ActivationCollector(other, 1)


# -- (f) through the pipeline: calibrate with its own sampler, compress, save, load ------------------
def test_pipeline_calibrates_compresses_and_loads_with_diffusers(tmp_path):
    """A tiny LTXPipeline (ltx_pipelines.py): statistics come from its own flow-matching sampler
    with classifier-free guidance (two calls per step) on a few frames (17: 3 latent frames);
    every prompt is padded to 128 T5 tokens and masked, so only the real tokens (words + EOS; the
    empty negative prompt: EOS alone) are keys. The compressed pipeline saves and loads with
    ``DiffusionPipeline.from_pretrained`` to the same latents, bit for bit."""
    from diffusers import DiffusionPipeline
    from family_pipelines import PROMPTS
    from ltx_pipelines import tiny_ltx_pipeline

    from slimdiff.calibration.collect import collect_stats
    from slimdiff.formats.io import save_compressed
    from slimdiff.planning.influence import compute_influence

    pipe = tiny_ltx_pipeline(tmp_path / "build")
    model = pipe.transformer
    calls: list[tuple[int, int, int]] = []  # (video tokens, text tokens, real text tokens) per call

    def hook(module, args, kwargs):
        mask = kwargs["encoder_attention_mask"]
        calls.append((kwargs["hidden_states"].shape[1], mask.numel(), int(mask.sum())))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    steps, prompts = 2, [PROMPTS[0], PROMPTS[4]]  # 5 and 2 words, padded to 128 tokens
    try:
        stats = collect_stats(
            pipe, prompts, num_inference_steps=steps, guidance_scale=3.0, n_buckets=2, batch_size=2,
            height=LTX_HW, width=LTX_HW, progress=False,
        )  # fmt: skip
    finally:
        handle.remove()
    adapter = adapter_for(model)
    assert stats.meta["cfg_branches"] == 2 and stats.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert adapter.text_len(pipe) == 128
    real = 1 + 1 + 6 + 3  # negative "" x 2 (EOS), then 5 + 1 and 2 + 1 tokens
    assert calls == [(3 * 4, 4 * 128, real)] * steps  # 3 latent frames x 2 x 2; [negative; conditional]
    n_video = steps * 4 * 3 * 4  # calls x (2 CFG branches x 2 samples) x tokens
    assert int(stats.tokens["transformer_blocks.0.attn2.key"].sum()) == steps * real  # padding left out
    assert int(stats.tokens["transformer_blocks.1.attn2.key_normed"].sum()) == steps * real
    assert int(stats.tokens["transformer_blocks.1.attn2.query"].sum()) == n_video
    q = stats.tokens["transformer_blocks.0.attn1.query"]
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
    )
    assert {p.kind for p in plan.compressed_units().values()} == {"ffn", "qk", "vo"}
    compress_(model, plan, cov)
    save_compressed(pipe, tmp_path / "slim")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert type(loaded).__name__ == "LTXPipeline"
    assert type(loaded.transformer).__name__ == "SlimLTXVideoTransformer3DModel"
    assert loaded.transformer.slimdiff_plan == plan
    lt, mt = loaded.transformer.transformer_blocks[0], model.transformer_blocks[0]
    assert torch.equal(lt.attn1.slim_rope_index, mt.attn1.slim_rope_index)
    assert type(lt.attn1.processor) is SlimLTXAttnProcessor and lt.attn1.processor.head_dim == D_H
    assert type(lt.attn2.norm_q) is AcrossHeadsRMSNorm and torch.equal(
        lt.attn2.norm_q.eps, mt.attn2.norm_q.eps
    )
    for module in loaded.components.values():  # fresh allocations: mmap offsets change CPU rounding
        if isinstance(module, nn.Module):
            for t in [*module.parameters(), *module.buffers()]:
                t.data = t.data.clone()
    kw = dict(
        num_inference_steps=2,
        height=LTX_HW,
        width=LTX_HW,
        num_frames=9,
        output_type="latent",
        guidance_scale=3.0,
    )
    a = pipe(prompts, generator=torch.Generator().manual_seed(0), **kw).frames
    b = loaded(prompts, generator=torch.Generator().manual_seed(0), **kw).frames
    assert torch.equal(a, b)
