"""FLUX.1 (``FluxTransformer2DModel``): the adapter, RoPE-aware pair selection, the packed single
blocks, FLOPs and save / load, on tiny transformers built from config (random weights, fixed seeds).

References and tolerances:
* the rotary moments and the pair error form against brute force over every (query sample, key
  sample, query token, key token) combination: the formulas are exact for empirical moments, so
  the tolerance is float64 rounding (1e-9 relative);
* compressed models against the original in float32: a full-rank rewrite and a pair selection
  that drops only pairs whose q/k rows are zero are exact maths, so the tolerance is float32
  rounding through 4 blocks (1e-5 relative);
* relative-position equivariance: shifting every token's position by one constant leaves RoPE
  logits unchanged in exact arithmetic; the angles grow with the shift, so float32 cos / sin of
  larger arguments set the tolerance (1e-4 relative);
* statistics of the packed ``proj_out`` against grams of its input recorded by a hook (the
  collector forms float32 products of 44 tokens before its float64 sums: 1e-6 of the largest
  entry).
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from slimdiff.calibration.collect import ActivationCollector
from slimdiff.core import linalg
from slimdiff.families import UnsupportedModelError, adapter_for
from slimdiff.families.units import compressible_parameter_count, compression_units, count_parameters
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import ServingShape, denoiser_flops, unit_flop_costs
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import CompressionError, apply_plan_shapes_, compress_

HW, TEXT = (8, 8), 6  # latent 8x8 -> 16 packed image tokens, 6 text tokens


def tiny_flux(seed: int = 0, heads: int = 2, head_dim: int = 16) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=24,
        pooled_projection_dim=16,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def inputs(model, seed: int, batch: int = 2, shift: tuple[float, float, float] | None = None):
    args, kwargs = adapter_for(model).example_inputs(
        model, batch, HW, TEXT, device="cpu", generator=torch.Generator().manual_seed(seed)
    )
    if shift is not None:
        offset = torch.tensor(shift)
        kwargs["img_ids"] = kwargs["img_ids"] + offset
        kwargs["txt_ids"] = kwargs["txt_ids"] + offset
    return args, kwargs


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(*x[0], **x[1]).sample


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def covariances(model, n: int = 4) -> dict[str, torch.Tensor]:
    col = ActivationCollector(model, 1)
    with col:
        for i in range(n):
            run(model, inputs(model, 100 + i))
    return col.stats().aggregate([1.0])


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_flux()
    return model, covariances(model)


def test_statistics_record_the_raw_query_and_key_means():
    """Known answer: the first-moment statistics (``stats.mean_key``) are the per-head means of
    the raw q / k linear outputs over every token of both streams (double block: text and image),
    float64 sums of float32 tokens: equal to a direct hook's mean to float32 rounding (1e-6)."""
    model = tiny_flux()
    lay = compression_units(model)["transformer_blocks.0.attn.qk"].layout
    seen: dict[str, list[torch.Tensor]] = {"q": [], "k": []}
    hooks = [
        model.get_submodule(p).register_forward_hook(
            lambda m, a, out, role=role: seen[role].append(out.reshape(-1, out.shape[-1]))
        )
        for role, paths in (("q", lay.query), ("k", lay.key))
        for p in paths
    ]
    try:
        cov = covariances(model, n=2)
    finally:
        for h in hooks:
            h.remove()
    heads, d = lay.heads, lay.head_dim
    for role, key in (("q", lay.query_mean_key), ("k", lay.key_mean_key)):
        direct = torch.cat(seen[role]).double().mean(0).view(heads, d)
        torch.testing.assert_close(cov[key], direct, rtol=1e-6, atol=1e-6)
    assert lay.query_mean_key == "transformer_blocks.0.attn.query_mean"


# -- the rotary moments and the pair error form --------------------------------------------------
def test_rope_phase_moments_against_brute_force():
    torch.manual_seed(0)
    angles = torch.rand(7, 4, dtype=torch.float64) * 6.0  # 7 tokens, 4 pairs
    c, s = linalg.rope_phase_moments(angles)
    alpha = angles[:, None, :] - angles[None, :, :]  # (m, n, p)
    cc = torch.einsum("mnp,mnq->pq", alpha.cos(), alpha.cos()) / 49
    ss = torch.einsum("mnp,mnq->pq", alpha.sin(), alpha.sin()) / 49
    cs = torch.einsum("mnp,mnq->pq", alpha.cos(), alpha.sin()) / 49
    torch.testing.assert_close(c, cc, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s, ss, rtol=1e-9, atol=1e-12)
    assert cs.abs().max() < 1e-12  # the cross moment the form leaves out is exactly zero
    # no rotation at all (every token at one position): c = 1, s = 0
    c0, s0 = linalg.rope_phase_moments(torch.zeros(5, 3, dtype=torch.float64))
    torch.testing.assert_close(c0, torch.ones(3, 3, dtype=torch.float64))
    assert s0.abs().max() < 1e-15


def rotate(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of x (..., d) by angles a (..., d / 2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a.cos() * x0 - a.sin() * x1
    out[..., 1::2] = a.sin() * x0 + a.cos() * x1
    return out


def test_pair_error_form_is_the_mean_square_dropped_logit():
    """1_D^T M 1_D = the mean over every (q sample, k sample, query token m, key token n) of the
    squared logit carried by the pairs D after RoPE, with M from the empirical moments."""
    torch.manual_seed(1)
    d, n_tok = 8, 5
    q = torch.randn(6, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)
    k = torch.randn(7, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)
    angles = torch.rand(n_tok, d // 2, dtype=torch.float64) * 4.0
    c, s = linalg.rope_phase_moments(angles)
    m = linalg.rope_pair_error_matrix(q.T @ q / len(q), k.T @ k / len(k), c, s)
    for dropped in ([0], [1, 3], [0, 2, 3]):
        mask = torch.zeros(d, dtype=torch.float64)
        for p in dropped:
            mask[2 * p : 2 * p + 2] = 1.0
        total = 0.0
        for mi, ni in itertools.product(range(n_tok), repeat=2):
            qr, kr = rotate(q, angles[mi]), rotate(k, angles[ni])
            total += float(((qr * mask) @ (kr * mask).T).square().mean())
        brute = total / n_tok**2
        one = torch.zeros(d // 2, dtype=torch.float64)
        one[dropped] = 1.0
        assert math.isclose(float(one @ m @ one), brute, rel_tol=1e-9)


def test_pair_selection_keeps_whole_pairs_and_its_errors_are_the_form():
    torch.manual_seed(2)
    d = 16
    a = torch.randn(d, d, dtype=torch.float64)
    cq, ck = a @ a.T, (a @ a.T).flip(0).flip(1)
    c, s = linalg.rope_phase_moments(torch.rand(9, d // 2, dtype=torch.float64) * 3)
    m = linalg.rope_pair_error_matrix(cq, ck, c, s)
    for r in (2, 6, 10, 16):
        sel = linalg.rope_pair_selection(cq, ck, r, c, s)
        pairs = sel.keep.view(-1, 2)
        assert torch.equal(pairs[:, 1], pairs[:, 0] + 1) and bool((pairs[:, 0] % 2 == 0).all())
        dropped = torch.ones(d // 2, dtype=torch.float64)
        dropped[pairs[:, 0] // 2] = 0.0
        assert math.isclose(float(sel.errors[r]), float(dropped @ m @ dropped), rel_tol=1e-9, abs_tol=1e-12)
    with pytest.raises(ValueError, match="even"):
        linalg.rope_pair_selection(cq, ck, 5, c, s)


# -- the adapter ---------------------------------------------------------------------------------
def test_units_cover_double_and_single_blocks_with_exact_costs():
    model = tiny_flux()
    units = compression_units(model)
    kinds = {n: u.kind for n, u in units.items()}
    assert kinds == {
        **{f"transformer_blocks.{i}.{s}": "ffn" for i in (0, 1) for s in ("ff", "ff_context")},
        **{f"transformer_blocks.{i}.attn.{k}": k for i in (0, 1) for k in ("qk", "vo")},
        **{f"single_transformer_blocks.{i}.attn.{k}": k for i in (0, 1) for k in ("qk", "vo")},
        **{f"single_transformer_blocks.{i}.mlp": "ffn" for i in (0, 1)},
    }
    single_vo = units["single_transformer_blocks.0.attn.vo"].layout
    assert single_vo.out == ("single_transformer_blocks.0.proj_out[0:32]",)
    assert (
        units["single_transformer_blocks.0.mlp"].layout.proj_out
        == "single_transformer_blocks.0.proj_out[-128:]"
    )
    # cost per rank (dim 32, 2 heads): single VO = to_v rows (33 with bias) + proj_out columns (32)
    assert units["single_transformer_blocks.0.attn.vo"].cost_per_rank == 2 * (33 + 32)
    assert units["single_transformer_blocks.0.mlp"].cost_per_rank == 33 + 32
    # double QK: to_q, to_k, add_q_proj, add_k_proj rows
    assert units["transformer_blocks.0.attn.qk"].cost_per_rank == 2 * 4 * 33


def test_plan_removes_exactly_the_planned_parameters_and_proj_out_stays_one_matmul(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    plan = plan_ranks(
        None,
        units,
        Budget(removed_fraction=0.4),
        r_min=4,
        multiple=2,
        profiles=error_profiles(model, cov, units),
    )
    slim = copy.deepcopy(model)
    compress_(slim, plan, cov)
    removed = sum((p.full_rank - p.rank) * units[n].cost_per_rank for n, p in plan.units.items())
    assert count_parameters(model) - count_parameters(slim) == removed > 0
    # the compressible set counted on the live layers: the packed proj_out's two column ranges are
    # in the original's widths and overlapped on the narrowed layer (counted 2x the overlap before)
    full = compressible_parameter_count(model, units)
    assert full == sum(u.full_params for u in units.values())
    assert compressible_parameter_count(slim, units) == full - removed
    for i in (0, 1):
        block = slim.single_transformer_blocks[i]
        r_vo = plan.units[f"single_transformer_blocks.{i}.attn.vo"].rank
        r_mlp = plan.units[f"single_transformer_blocks.{i}.mlp"].rank
        assert isinstance(block.proj_out, nn.Linear)
        assert block.proj_out.in_features == 2 * r_vo + r_mlp
    assert rel(run(slim, inputs(model, 7)), run(model, inputs(model, 7))) < 0.1


def test_full_rank_rewrite_reproduces_the_original(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    full = RankPlan.from_ranks(units, {n: u.full_rank for n, u in units.items()})
    slim = copy.deepcopy(model)
    compress_(slim, full, cov, rewrite_full_rank=True)
    x = inputs(model, 3)
    assert rel(run(slim, x), run(model, x)) < 1e-5
    assert slim.transformer_blocks[0].attn.slim_rope_index.shape == (2, 16)


def test_statistics_of_the_packed_proj_out_are_its_column_blocks():
    model = tiny_flux()
    block = model.single_transformer_blocks[0]
    seen = []
    handle = block.proj_out.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    col = ActivationCollector(model, 1)
    with col:
        run(model, inputs(model, 11))
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    stats = col.stats()
    tokens = stats.tokens["single_transformer_blocks.0.mlp.hidden"][0]
    assert int(tokens) == x.shape[0] == 2 * (16 + TEXT)
    hidden = stats.moments["single_transformer_blocks.0.mlp.hidden"][0]
    ref = x[:, 32:].T @ x[:, 32:]
    torch.testing.assert_close(hidden, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    attn = stats.moments["single_transformer_blocks.0.attn.attnout"][0]  # (H, d, d)
    a = x[:, :32].view(-1, 2, 16)
    ref = torch.einsum("nhd,nhe->hde", a, a)
    torch.testing.assert_close(attn, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def zero_pairs(model: nn.Module, dropped: dict[int, list[int]], d: int = 16) -> nn.Module:
    """Zero the q/k rows (weights and biases) of the given rotary pairs of every head in every
    attention: those pairs carry no logit, so a selection that drops exactly them is exact."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not name.endswith("attn"):
                continue
            for lin in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                layer = getattr(mod, lin, None)
                if layer is None:
                    continue
                for h, pairs in dropped.items():
                    for p in pairs:
                        rows = slice(h * d + 2 * p, h * d + 2 * p + 2)
                        layer.weight[rows] = 0.0
                        layer.bias[rows] = 0.0
    return model


def test_pair_selection_is_exact_when_the_dropped_pairs_carry_nothing():
    """Known answer: q/k rows of pairs {1, 4, 6} (head 0) and {0, 2, 7} (head 1) zeroed; a QK
    rank of 10 (5 of 8 pairs) must select the other pairs, and with the norm's scale corrected
    (the whole energy is kept: c = r / d) the compressed model equals the original."""
    model = zero_pairs(tiny_flux(seed=3), {0: [1, 4, 6], 1: [0, 2, 7]})
    cov = covariances(model)
    units = compression_units(model)
    ranks = {n: (10 if u.kind == "qk" else u.full_rank) for n, u in units.items()}
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(units, ranks), cov)
    idx = slim.transformer_blocks[0].attn.slim_rope_index
    assert idx[0].tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 14, 15]
    assert idx[1].tolist() == [2, 3, 6, 7, 8, 9, 10, 11, 12, 13]
    x = inputs(model, 5)
    assert rel(run(slim, x), run(model, x)) < 1e-5


def test_compressed_attention_keeps_relative_position_equivariance(calibrated):
    """Shifting every token's position by one constant leaves a RoPE model's output unchanged;
    whole-pair selection keeps that (QK at 8 of 16 coordinates everywhere)."""
    model, cov = calibrated
    units = compression_units(model)
    ranks = {n: (8 if u.kind == "qk" else u.full_rank) for n, u in units.items()}
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(units, ranks), cov)
    base, shifted = run(slim, inputs(model, 9)), run(slim, inputs(model, 9, shift=(3.0, 5.0, -2.0)))
    assert rel(shifted, base) < 1e-4
    assert rel(run(model, inputs(model, 9, shift=(3.0, 5.0, -2.0))), run(model, inputs(model, 9))) < 1e-4


def test_saved_model_loads_to_the_same_outputs(calibrated, tmp_path):
    from slimdiff.formats.io import load_compressed, save_compressed

    model, cov = calibrated
    units = compression_units(model)
    plan = plan_ranks(
        None,
        units,
        Budget(removed_fraction=0.4),
        r_min=4,
        multiple=2,
        profiles=error_profiles(model, cov, units),
    )
    slim = copy.deepcopy(model)
    compress_(slim, plan, cov)
    save_compressed(slim, tmp_path / "flux")
    loaded = load_compressed(tmp_path / "flux")
    x = inputs(model, 4)
    assert torch.equal(run(loaded, x), run(slim, x))


def test_a_loaded_model_with_narrowed_rope_qk_counts_its_flops(calibrated, tmp_path):
    """Counting a loaded Slim model's FLOPs builds a meta copy of its class, the narrowed rotary
    index included (that copy once failed moving the meta index to the CPU): the count is the
    plan's, exactly."""
    from slimdiff.formats.io import load_compressed, save_compressed

    model, cov = calibrated
    units = compression_units(model)
    ranks = {n: u.full_rank // 2 if u.kind == "qk" else u.full_rank for n, u in units.items()}
    plan = RankPlan.from_ranks(units, ranks)
    slim = copy.deepcopy(model)
    compress_(slim, plan, cov)
    save_compressed(slim, tmp_path / "flux")
    loaded = load_compressed(tmp_path / "flux")
    costs = unit_flop_costs(model, ServingShape(HW, batch=2, text_len=TEXT))
    assert denoiser_flops(loaded, 2, HW, TEXT).total == costs.plan_flops(ranks) < costs.total


def test_plan_flops_are_the_flop_count():
    model = tiny_flux()
    shape = ServingShape(HW, batch=2, text_len=TEXT)
    costs = unit_flop_costs(model, shape)
    assert costs.total == denoiser_flops(model, 2, HW, TEXT).total
    units = compression_units(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        ranks = {
            n: 2 * int(torch.randint(1, u.full_rank // 2 + 1, (1,), generator=gen)) for n, u in units.items()
        }
        with torch.device("meta"):
            skeleton = type(model).from_config(model.config)
        apply_plan_shapes_(skeleton, RankPlan.from_ranks(units, ranks))
        assert costs.plan_flops(ranks) == denoiser_flops(skeleton, 2, HW, TEXT).total


# -- refusals ------------------------------------------------------------------------------------
def test_project_mode_and_odd_ranks_are_refused(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    ranks = {n: (7 if u.kind == "qk" else u.full_rank) for n, u in units.items()}
    with pytest.raises(CompressionError, match="odd"):
        compress_(copy.deepcopy(model), RankPlan.from_ranks(units, ranks), cov)
    full = RankPlan.from_ranks(units, {n: u.full_rank for n, u in units.items()})
    with pytest.raises(CompressionError, match="not exact under rotary"):
        compress_(copy.deepcopy(model), full, cov, qk_norm="project")


def test_auto_qk_option_keeps_rope_qks_whole_and_selects_the_sd3_ones(calibrated):
    """``compression.qk_norm: auto`` (the default): every FLUX QK (q/k RMSNorms + RoPE) leaves the
    plan, VO and FFN stay; an SD3 QK (norms, no RoPE) is planned as under "select"."""
    from test_mmdit import tiny_sd3

    from slimdiff.families.units import planned_units, qk_left_whole

    model, cov = calibrated
    units = compression_units(model)
    planned = planned_units(units, ("ffn", "qk", "vo"), "auto")
    assert {n for n, u in units.items() if u.kind == "qk"} and not any(
        u.kind == "qk" for u in planned.values()
    )
    assert {n for n, u in planned.items()} == {n for n, u in units.items() if u.kind != "qk"}
    assert all(qk_left_whole(u, "auto") == (u.kind == "qk") for u in units.values())
    sd3 = compression_units(tiny_sd3())
    assert (
        planned_units(sd3, ("ffn", "qk", "vo"), "auto").keys()
        == planned_units(sd3, ("ffn", "qk", "vo"), "select").keys()
    )
    assert any(u.kind == "qk" and u.layout.qk_norm for u in sd3.values())
    # compress_ carries out the plan it is given: a plan cutting a FLUX QK (made under "select") is
    # cut by pair selection under "auto" too, bit for bit; "keep" refuses it
    ranks = {n: (8 if u.kind == "qk" else u.full_rank) for n, u in units.items()}
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    compress_(a, RankPlan.from_ranks(units, ranks), cov, qk_norm="auto")
    compress_(b, RankPlan.from_ranks(units, ranks), cov, qk_norm="select")
    x = inputs(model, seed=3)
    assert torch.equal(run(a, x), run(b, x)) and count_parameters(a) < count_parameters(model)
    with pytest.raises(CompressionError, match="must stay at full rank"):
        compress_(copy.deepcopy(model), RankPlan.from_ranks(units, ranks), cov, qk_norm="keep")


def test_fused_projections_are_refused_and_flux2_is_not_flux1():
    model = tiny_flux()
    model.fuse_qkv_projections()
    with pytest.raises(UnsupportedModelError, match="unfuse_qkv_projections"):
        compression_units(model)
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    flux2 = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        axes_dims_rope=(4, 4, 4, 4),
    )
    # FLUX.2 has its own adapter (slimdiff/arch/flux2.py, tests/test_flux2.py), not FLUX.1's
    assert adapter_for(flux2).family.startswith("FLUX.2")


# -- through the pipeline: calibrate with its own sampler, compress, save, load --------------------
def test_pipeline_calibrates_compresses_and_loads_with_diffusers(tmp_path):
    """A tiny FluxPipeline (family_pipelines.py): statistics come from its own flow-matching sampler
    (the transformer gets t / 1000; buckets from the scheduler's schedule), with true classifier-free
    guidance (2 branches) at the text length its T5 tokenizer has (32 here, below FluxPipeline's
    default 512); every token the transformer attends to is counted (FLUX passes no mask: its T5
    tokens, padding included, are real inputs of every attention). The compressed pipeline saves
    and loads with ``DiffusionPipeline.from_pretrained`` to the same images."""
    from diffusers import DiffusionPipeline
    from family_pipelines import FLUX_HW, FLUX_TEXT_LEN, PROMPTS, tiny_flux_pipeline

    from slimdiff.calibration.collect import collect_stats
    from slimdiff.formats.io import save_compressed
    from slimdiff.planning.influence import compute_influence

    pipe = tiny_flux_pipeline(tmp_path / "build")
    steps, prompts = 4, PROMPTS[:2]
    stats = collect_stats(
        pipe, prompts, num_inference_steps=steps, guidance_scale=4.0, n_buckets=2, batch_size=2,
        height=FLUX_HW, width=FLUX_HW, progress=False,
    )  # fmt: skip
    model = pipe.transformer
    assert stats.meta["cfg_branches"] == 2 and stats.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    n_img, n_text = (FLUX_HW // 2) ** 2, FLUX_TEXT_LEN
    per_call = len(prompts) * 2 * (n_img + n_text)  # both guidance branches, joint sequence
    q = stats.tokens["transformer_blocks.0.attn.query"]
    assert q.tolist() == [steps // 2 * per_call] * 2  # 2 steps per bucket
    assert int(stats.tokens["transformer_blocks.0.ff.hidden"].sum()) == steps * len(prompts) * 2 * n_img
    # the sequence the statistics came from, and the phase moments pair selection takes from it:
    # those of the rotary table the sampler's own pos_embed built (known answer, float64 rounding)
    sequence = stats.meta["rope_sequence"]
    assert sequence == {"latent_hw": [FLUX_HW, FLUX_HW], "text_len": n_text}  # one-level VAE: latent = px
    tables = []
    hook = model.pos_embed.register_forward_hook(lambda m, a, out: tables.append(out))
    try:
        pipe(PROMPTS[:1], num_inference_steps=1, height=FLUX_HW, width=FLUX_HW, max_sequence_length=n_text)
    finally:
        hook.remove()
    cos, sin = tables[0]
    seen = linalg.rope_phase_moments(torch.atan2(sin[:, 0::2].double(), cos[:, 0::2].double()))
    ours = adapter_for(model).rope_phases(model, sequence)
    for x, y in zip(ours, seen, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    influence = compute_influence(stats, model)
    cov = influence.aggregate(stats)
    units = compression_units(model)
    plan = plan_ranks(
        influence.score_of(), units, Budget(removed_fraction=0.4), r_min=4, multiple=2,
        profiles=error_profiles(model, cov, units, rope_sequence=sequence),
    )  # fmt: skip
    # random weights: the error plan leaves the QKs whole at 40%; narrow them too, so the saved model
    # carries narrowed rotary tables
    ranks = {n: (8 if units[n].kind == "qk" else p.rank) for n, p in plan.units.items()}
    plan = RankPlan.from_ranks(units, ranks)
    assert {p.kind for p in plan.compressed_units().values()} == {"ffn", "qk", "vo"}
    compress_(model, plan, cov, rope_sequence=sequence)
    save_compressed(pipe, tmp_path / "slim")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert type(loaded).__name__ == "FluxPipeline"
    assert type(loaded.transformer).__name__ == "SlimFluxTransformer2DModel"
    assert loaded.transformer.slimdiff_plan == plan
    for (
        tensor
    ) in loaded.transformer.state_dict().values():  # fresh allocations: mmap offsets change CPU rounding
        tensor.data = tensor.data.clone()
    kw = dict(
        num_inference_steps=2,
        height=FLUX_HW,
        width=FLUX_HW,
        output_type="latent",
        max_sequence_length=FLUX_TEXT_LEN,
    )
    a = pipe(prompts, generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded(prompts, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)
