"""MMDiT (SD3 / SD3.5 SD3Transformer2DModel): joint attention, q/k RMSNorm modes, dual attention and
the context_pre_only last block, on tiny random models built from config.

References: the uncompressed model's outputs (full-rank rewrites must reproduce them to float32
rounding, ~1e-7 relative here; 1e-5 is the project's contract), brute force over coordinate
subsets (selection), and the model reloaded from its compressed weights."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from slimdiff.calibration.collect import ActivationCollector
from slimdiff.core import linalg
from slimdiff.families import adapter_for
from slimdiff.families.attention import HeadwiseRMSNorm, SlimJointAttnProcessor, sdpa_backends
from slimdiff.families.units import compression_units, count_parameters
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import apply_plan_shapes_, compress_
from tasks.stages import planned_units

F64 = torch.float64


def tiny_sd3(qk_norm: str | None = "rms_norm", seed: int = 0):
    """3 joint blocks (the first with SD3.5's dual attention, the last context_pre_only), 2 heads of 8."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=10,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm=qk_norm,
    ).eval()
    with torch.no_grad():  # non-trivial norm scales, so that a wrong norm rewrite shows
        for name, p in model.named_parameters():
            if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


def inputs(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return adapter_for(model).example_inputs(model, 2, (8, 8), 5, device="cpu", generator=g)


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_sd3()
    args, kwargs = inputs(model)
    collector = ActivationCollector(model, 1)
    with collector, torch.no_grad():
        model(*args, **kwargs)
    return model, collector.stats().aggregate([1.0]), (args, kwargs)


def run(model, x):
    with torch.no_grad():
        return model(*x[0], **x[1]).sample


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_units_cover_both_streams_dual_attention_and_the_last_block():
    model = tiny_sd3()
    units = compression_units(model)
    names = set(units)
    assert "transformer_blocks.0.attn2.qk" in names and "transformer_blocks.1.attn2.qk" not in names
    assert "transformer_blocks.1.ff_context" in names and "transformer_blocks.2.ff_context" not in names
    joint = units["transformer_blocks.0.attn.vo"].layout
    assert joint.query == ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj")
    assert joint.out == ("transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out")
    last = units["transformer_blocks.2.attn.qk"].layout
    # context_pre_only: the text queries' outputs are discarded, no text output projection
    assert last.query == ("transformer_blocks.2.attn.to_q",)
    assert last.unused_query == ("transformer_blocks.2.attn.add_q_proj",)
    assert last.out == ("transformer_blocks.2.attn.to_out.0",)
    assert joint.qk_norm and units["transformer_blocks.0.attn2.qk"].layout.qk_norm
    # QK cost: per rank, a column of to_q, add_q_proj, to_k, add_k_proj per head (weights + biases)
    assert units["transformer_blocks.0.attn.qk"].cost_per_rank == 2 * 4 * (16 + 1)


@pytest.mark.parametrize("mode", ["select", "keep", "project"])
def test_full_rank_rewrite_is_exact_in_every_qk_norm_mode(calibrated, mode):
    model, covs, x = calibrated
    units = planned_units(compression_units(model), ("ffn", "qk", "vo"), mode)
    full = copy.deepcopy(model)
    compress_(full, RankPlan.from_ranks(units, {}), covs, rewrite_full_rank=True, qk_norm=mode)
    assert rel(run(full, x), run(model, x)) < 1e-5
    for name, mod in full.named_modules():
        if name.endswith((".attn", ".attn2")):
            assert isinstance(mod.processor, SlimJointAttnProcessor), name


def test_statistics_cover_the_concatenated_tokens(calibrated):
    model, covs, (args, kwargs) = calibrated
    stats_tokens = {}
    collector = ActivationCollector(model, 1)
    with collector, torch.no_grad():
        model(*args, **kwargs)
    stats = collector.stats()
    batch, image = 2, (8 // 2) ** 2  # 2x2 patches of an 8x8 latent: 16 image tokens
    text = kwargs["encoder_hidden_states"].shape[1]
    stats_tokens = {k: int(v.sum()) for k, v in stats.tokens.items()}
    assert stats_tokens["transformer_blocks.0.attn.query"] == batch * (image + text)  # both streams
    assert stats_tokens["transformer_blocks.0.attn2.query"] == batch * image  # image-only attention
    assert stats_tokens["transformer_blocks.2.attn.query"] == batch * image  # text queries unused
    assert stats_tokens["transformer_blocks.2.attn.key"] == batch * (image + text)
    assert stats_tokens["transformer_blocks.2.attn.attnout"] == batch * image  # text output dropped
    assert stats_tokens["transformer_blocks.0.attn.query_normed"] == batch * (image + text)


def test_coordinate_selection_is_greedy_exact_for_small_drops_and_its_gap_is_known():
    """The dropped set D grows greedily: each step adds the coordinate that adds least to
    1_D^T M 1_D (checked against every candidate), so the sets are nested and every rank's error is
    the dropped block of C_qn o C_kn. Greedy equals brute force over all subsets for 1- and
    2-coordinate drops on these spectra; beyond, it is a heuristic, not the best subset: here its
    3-drop is 1.2208x and its 4-drop 2.0090x the best subset's error (brute force, float64)."""
    g = torch.Generator().manual_seed(3)
    d = 6
    a = torch.randn(d, d, generator=g, dtype=F64) * torch.logspace(0, -1.5, d, dtype=F64)
    b = torch.randn(d, d, generator=g, dtype=F64) * torch.logspace(0, -1.5, d, dtype=F64)
    cq, ck = a @ a.T, b @ b.T
    m = cq * ck

    def energy(subset) -> float:
        idx = list(subset)
        return float(m[idx][:, idx].sum()) if idx else 0.0

    sel = linalg.rms_coordinate_selection(cq, ck, 3)
    assert sel.errors[d] == 0.0 and sel.errors[0] == pytest.approx(float(m.sum()), rel=1e-12)
    order = sel.drop_order.tolist()
    assert sorted(order) == list(range(d))
    assert sel.keep.tolist() == sorted(order[d - 3 :])
    # float64 sums of <= 36 terms of size <= ~1: round-off ~1e-15, so 1e-12 relative is ample
    for k in range(1, d + 1):
        dropped = order[:k]
        assert float(sel.errors[d - k]) == pytest.approx(energy(dropped), rel=1e-12, abs=1e-12)
        # the greedy step: no other single coordinate added to the previous set adds less
        step = min(energy([*order[: k - 1], i]) for i in range(d) if i not in order[: k - 1])
        assert energy(dropped) == pytest.approx(step, rel=1e-12, abs=1e-12), k
    best = {k: min(energy(s) for s in itertools.combinations(range(d), k)) for k in range(1, d)}
    assert float(sel.errors[d - 1]) == pytest.approx(best[1], rel=1e-12)
    assert float(sel.errors[d - 2]) == pytest.approx(best[2], rel=1e-12)
    # the measured greedy/optimal ratios: float64 throughout, so they hold to ~1e-14 relative
    assert float(sel.errors[d - 3]) / best[3] == pytest.approx(1.2208334800776, rel=1e-9)
    assert float(sel.errors[d - 4]) / best[4] == pytest.approx(2.0089730989060, rel=1e-9)


def test_norm_correction_is_exact_at_full_rank_and_rescales_the_kept_share():
    c = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64))
    assert linalg.rms_norm_correction(c, torch.arange(4)) == pytest.approx(1.0)
    # keep 2 of 4 coordinates holding 70% of the energy: c = r / (rho d) = 2 / (0.7 * 4)
    assert linalg.rms_norm_correction(c, torch.tensor([0, 1])) == pytest.approx(2 / (0.7 * 4))
    norm = HeadwiseRMSNorm(2, 3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]]))
        norm.eps.copy_(torch.tensor([1e-6, 1e-2]))
    x = torch.randn(1, 2, 4, 3)
    ref = torch.stack(
        [
            x[:, h] * torch.rsqrt(x[:, h].pow(2).mean(-1, keepdim=True) + norm.eps[h]) * norm.weight[h]
            for h in range(2)
        ],
        dim=1,
    )
    torch.testing.assert_close(norm(x), ref, rtol=1e-6, atol=1e-6)


# relative output error of the 40% error-plan of test_reduced_rank_modes_... (measured, seeded)
SEEDED_OUTPUT_ERROR = {"select": 0.0223696, "keep": 0.0098575, "project": 0.0128649}


@pytest.mark.parametrize("mode", ["select", "keep", "project"])
def test_reduced_rank_modes_count_parameters_reload_and_stay_on_the_fused_kernel(calibrated, mode):
    model, covs, x = calibrated
    units = planned_units(compression_units(model), ("ffn", "qk", "vo"), mode)
    profiles = error_profiles(model, covs, units)
    plan = plan_ranks(
        None,
        units,
        Budget(removed_fraction=0.4),
        mode="error",
        r_min=4,
        multiple=4,
        profiles=profiles,
        tau=1.0,
    )
    slim = copy.deepcopy(model)
    report = compress_(slim, plan, covs, qk_norm=mode)
    assert count_parameters(slim) == report.params_after == report.predicted_params_after
    out = run(slim, x)
    # the seeded output error of this plan (FFNs at 24 of 64, VOs at 4 of 8, "select" QKs at 4 of 8)
    # on the calibration inputs. The plan is unchanged under 1e-9 relative noise on the profiles,
    # and 1e-6 relative noise on every covariance (what an fp32 calibration forward on another
    # BLAS can change) moves the error by <= 1.4e-7: 1e-5 absolute leaves 70x
    assert rel(out, run(model, x)) == pytest.approx(SEEDED_OUTPUT_ERROR[mode], abs=1e-5)
    with torch.device("meta"):
        skeleton = type(model).from_config(model.config)
    apply_plan_shapes_(skeleton, plan, qk_norm=mode)
    skeleton.load_state_dict(slim.state_dict(), strict=True, assign=True)
    assert torch.equal(run(skeleton, x), out)
    backends = sdpa_backends(slim, *x[0], **x[1])
    assert {b for calls in backends.values() for b in calls} == {"flash"}
    if mode == "select":
        assert any(u.kind == "qk" for u in plan.compressed_units().values())
    else:
        assert not any(u.kind == "qk" and units[n].layout.qk_norm for n, u in plan.compressed_units().items())


def test_select_profile_predicts_the_rewrite(calibrated):
    model, covs, _ = calibrated
    units = compression_units(model)
    profiles = error_profiles(model, covs)
    name = "transformer_blocks.0.attn.qk"
    slim = copy.deepcopy(model)
    report = compress_(slim, RankPlan.from_ranks(units, {name: 4}), covs, qk_norm="select")
    assert report.units[name].relative_error == pytest.approx(profiles[name][4], rel=1e-12)


def test_weight_only_qk_under_rms_norm_is_coordinate_selection_on_the_weight_grams():
    """The weight-only baseline under q/k RMSNorms (no statistics): per head, the coordinates of
    ``linalg.rms_coordinate_selection`` on the gain-scaled Grams sum_s diag(g_s) W_s W_s^T diag(g_s)
    (isotropic inputs), each kept row copied, each norm's gains g[keep] / sqrt(c) with c from the
    raw Grams. Exact at full rank (fp32 forward: 1e-5)."""
    model = tiny_sd3()
    units = compression_units(model)
    name, rank = "transformer_blocks.0.attn.qk", 3
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(units, {name: rank}), None, method="baseline")
    attn, new = model.transformer_blocks[0].attn, slim.transformer_blocks[0].attn
    heads, d = attn.heads, 8

    def head_rows(w, width=d):
        return w.detach().double().reshape(heads, width, -1)

    def gram(layers, norms=None):
        total = 0
        for i, layer in enumerate(layers):
            w = head_rows(layer.weight)
            g = w @ w.transpose(1, 2)
            if norms is not None:
                gain = norms[i].weight.detach().double()
                g = g * gain[:, None] * gain[None, :]
            total = total + g
        return total

    q_layers, k_layers = (attn.to_q, attn.add_q_proj), (attn.to_k, attn.add_k_proj)
    q_norms, k_norms = (attn.norm_q, attn.norm_added_q), (attn.norm_k, attn.norm_added_k)
    gqn, gkn = gram(q_layers, q_norms), gram(k_layers, k_norms)
    gq = gram(q_layers)
    for h in range(heads):
        keep = linalg.rms_coordinate_selection(gqn[h], gkn[h], rank).keep
        for old, cut in ((attn.to_q, new.to_q), (attn.add_k_proj, new.add_k_proj)):
            assert torch.equal(head_rows(cut.weight, rank)[h].float(), head_rows(old.weight)[h][keep].float())
        c = linalg.rms_norm_correction(gq[h], keep)
        expected = attn.norm_q.weight.detach().double()[keep] / c**0.5
        torch.testing.assert_close(
            new.norm_q.weight.detach().double().reshape(heads, rank)[h], expected, rtol=1e-6, atol=0
        )
    full = copy.deepcopy(model)
    compress_(full, RankPlan.from_ranks(units, {}), None, method="baseline", rewrite_full_rank=True)
    x = inputs(model)
    assert rel(run(full, x), run(model, x)) < 1e-5


# -- the budget across token streams (slimdiff.planning.streams) ----------------------------------------------
def test_every_unit_cost_splits_exactly_into_its_linears_streams():
    """Each unit's cost per rank is the sum over its linears (integers: exact); the image FFN and
    the image-only attn2 are image units, the text FFN a text unit, joint attention both, and the
    joint VO's text share is its add_v_proj row plus its to_add_out column."""
    from slimdiff.planning.streams import linear_costs, unit_stream

    model = tiny_sd3()
    units = compression_units(model)
    for name, u in units.items():
        assert sum(c for _, c in linear_costs(model, u).values()) == u.cost_per_rank, name
    kinds = {n: unit_stream(model, u) for n, u in units.items()}
    assert kinds["transformer_blocks.0.ff"] == "image"
    assert kinds["transformer_blocks.0.ff_context"] == "text"
    assert kinds["transformer_blocks.0.attn2.qk"] == kinds["transformer_blocks.0.attn2.vo"] == "image"
    assert kinds["transformer_blocks.0.attn.qk"] == kinds["transformer_blocks.0.attn.vo"] == "joint"
    assert kinds["transformer_blocks.2.attn.qk"] == "joint"  # context_pre_only: add_q_proj unused, still text
    attn, heads = model.transformer_blocks[0].attn, 2
    text = dict(linear_costs(model, units["transformer_blocks.0.attn.vo"]).items())
    assert text["transformer_blocks.0.attn.add_v_proj"] == ("text", heads * (attn.add_v_proj.in_features + 1))
    assert text["transformer_blocks.0.attn.to_add_out"] == ("text", heads * attn.to_add_out.out_features)


def test_removed_by_stream_counts_what_the_plan_removes_from_each_streams_linears():
    from slimdiff.planning.streams import removed_by_stream, stream_summary

    model = tiny_sd3()
    units = compression_units(model)
    ranks = {"transformer_blocks.0.ff_context": 16, "transformer_blocks.1.attn.vo": 4}
    plan = RankPlan.from_ranks(units, ranks)
    got = removed_by_stream(model, units, plan)
    assert sum(got.values()) == plan.params_before - plan.params_after
    attn = model.transformer_blocks[1].attn
    ff = units["transformer_blocks.0.ff_context"]
    text_vo = 2 * 4 * ((attn.add_v_proj.in_features + 1) + attn.to_add_out.out_features)
    assert got["text"] == (ff.full_rank - 16) * ff.cost_per_rank + text_vo
    image_vo = 2 * 4 * ((attn.to_v.in_features + 1) + attn.to_out[0].out_features)
    assert got["image"] == image_vo
    # the compressed model really loses those parameters from those linears
    slim = copy.deepcopy(model)
    apply_plan_shapes_(slim, plan)
    text_names = ("add_", "to_add_out", "ff_context")
    lost = {"image": 0, "text": 0}
    for (name, a), (_, b) in zip(model.named_parameters(), slim.named_parameters(), strict=True):
        stream = "text" if any(t in name for t in text_names) else "image"
        lost[stream] += a.numel() - b.numel()
    assert lost == got
    summary = stream_summary(model, units, plan)
    assert summary["text_share_of_removed"] == pytest.approx(got["text"] / sum(got.values()), rel=1e-12)


def test_per_stream_split_removes_the_same_share_from_every_group(calibrated):
    """plan_per_group: image, text and joint units each remove their share (within one rank quantum
    of the group's largest unit cost, the solver's rounding); the merged plan removes their sum. The
    joint allocation over all units (plan_ranks) reaches the same total."""
    from slimdiff.planning.streams import plan_per_group, unit_stream

    model, _, _ = calibrated
    units = compression_units(model)
    fraction = 0.3  # mode "uniform": step-maximal rounding (error profiles of this 32-token
    # calibration are flat at ~1e-16 beyond the data's rank, where the DP may remove more)
    plan = plan_per_group(model, units, fraction, mode="uniform", r_min=1, multiple=1)
    groups: dict[str, list[str]] = {}
    for n, u in units.items():
        groups.setdefault(unit_stream(model, u), []).append(n)
    assert set(groups) == {"image", "text", "joint"}
    for group, names in groups.items():
        full = sum(units[n].full_params for n in names)
        removed = sum(plan.units[n].params_before - plan.units[n].params_after for n in names)
        quantum = max(units[n].cost_per_rank for n in names)
        assert abs(removed - fraction * full) <= quantum, group
        assert plan.solver["groups"][group]["units"] == len(names)
    joint = plan_ranks(None, units, Budget(removed_fraction=fraction), mode="uniform", r_min=1, multiple=1)
    total = sum(u.full_params for u in units.values())
    assert abs(joint.removed_params - fraction * total) <= max(u.cost_per_rank for u in units.values())
    assert plan.solver["split"] == "per-stream"


@pytest.mark.parametrize("mode", ["select", "project"])
def test_flops_of_a_compressed_mmdit_count_the_widths_that_run(calibrated, mode):
    """The FLOP counter traces a skeleton with the compression's new modules (per-head norms,
    post-norm projections). Known answers for block 0's joint attention (2 heads, d_h 8, VO at
    rank 4; tokens N = 16 image + 5 text): "project" logits at width 4 plus the projections
    2 B H (N_q + N_k) d_h r; "select" QK at rank 4 (CPU: padded to one width, 4 here)."""
    from slimdiff.planning.flops import denoiser_flops

    model, covs, _ = calibrated
    units = planned_units(compression_units(model), ("ffn", "qk", "vo"), mode)
    ranks = {"transformer_blocks.0.attn.vo": 4}
    if mode == "select":
        ranks["transformer_blocks.0.attn.qk"] = 4
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(units, ranks), covs, qk_norm=mode)
    report = denoiser_flops(slim, batch=1, latent_hw=(8, 8), text_len=5)
    rows = {r.module: r for r in report.rows}
    b, heads, n, d, r = 1, 2, 16 + 5, 8, 4
    assert rows["transformer_blocks.0.attn"].flops == 2 * b * heads * n * n * (r + r)
    if mode == "project":
        post = rows["transformer_blocks.0.attn.slim_qk_post"]
        assert post.flops == 2 * b * heads * (n + n) * d * r
        assert post.category == "attn1_proj"
    else:
        assert "transformer_blocks.0.attn.slim_qk_post" not in rows
    # every other attention runs at its full width
    assert rows["transformer_blocks.1.attn"].flops == 2 * b * heads * n * n * (d + d)
