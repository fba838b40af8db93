"""Contract tests of compress_ on tiny diffusers UNets: exactness at full rank, real shrinkage,
exact parameter counts, per-module-type plans, error reporting and rejection of bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_helpers import capture_covariances, linear_shapes, record_module_io, rel_err, run, unet_inputs
from conftest import make_tiny_unet
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from slimdiff.families.attention import SlimAttnProcessor
from slimdiff.families.units import compression_units, count_parameters, out_heads
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.plan import PlanValidationError, RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import CompressionError, available_methods, compress_

CONFIGS = {
    "1head": dict(heads=1),
    "2heads_crossdim24": dict(heads=2, cross_attention_dim=24),
    "4heads_2layers": dict(heads=4, transformer_layers_per_block=2, cross_attention_dim=40),
}


def calibrated(cfg: dict):
    unet = make_tiny_unet(**cfg)
    cal = [unet_inputs(unet, batch=2, size=16, seed=s) for s in (1, 2)]
    return unet, capture_covariances(unet, cal)


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_full_rank_rewrite_reproduces_every_module_and_the_unet(cfg):
    unet, covs = calibrated(CONFIGS[cfg])
    original = copy.deepcopy(unet)
    x = unet_inputs(unet, seed=7)
    ref_out = run(original, x)
    ref_io = record_module_io(original, x, (Attention, FeedForward))
    plan = RankPlan.from_ranks(compression_units(unet), {})
    report = compress_(unet, plan, covs, rewrite_full_rank=True, damping=1e-2)
    assert len(report.units) == len(plan.units)
    # every module rebuilt (new Linear objects, new processor), and each reproduces its output
    for name, (args, kwargs, out) in ref_io.items():
        mod = unet.get_submodule(name)
        if isinstance(mod, Attention):
            assert isinstance(mod.processor, SlimAttnProcessor), name
            assert mod.to_q is not original.get_submodule(name).to_q
        with torch.no_grad():
            got = mod(*args, **kwargs)
        assert rel_err(got, out) < 1e-5, name
    assert rel_err(run(unet, x), ref_out) < 1e-5
    assert count_parameters(unet) == count_parameters(original)
    for u in report.units.values():
        assert u.error == pytest.approx(0.0, abs=1e-9 * max(1.0, u.error or 0.0) + 1e-9)
        assert u.max_condition_number is not None and u.max_condition_number >= 1.0


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_compressed_layers_are_really_smaller_and_count_matches_plan(cfg):
    unet, covs = calibrated(CONFIGS[cfg])
    original = copy.deepcopy(unet)
    units = compression_units(unet)
    before = count_parameters(unet)
    scores = {n: float(i % 5) for i, n in enumerate(units)}
    plan = plan_ranks(scores, units, Budget(removed_fraction=0.45), tau=1.0, mode="influence")
    assert plan.compressed_units()
    report = compress_(unet, plan, covs)
    assert count_parameters(unet) == before - plan.removed_params == report.params_after
    shapes = linear_shapes(unet)
    for name, p in plan.compressed_units().items():
        u = units[name]
        if p.kind == "ffn":
            d = u.cost_per_rank // 3  # GEGLU: 3d + 2
            assert shapes[f"{u.block}.ff.net.0.proj"] == (2 * p.rank, d)
            assert shapes[f"{u.block}.ff.net.2"] == (d, p.rank)
        else:
            heads = getattr(unet.get_submodule(u.block), u.attn).heads
            pre = f"{u.block}.{u.attn}"
            if p.kind == "qk":
                assert shapes[f"{pre}.to_q"][0] == shapes[f"{pre}.to_k"][0] == heads * p.rank
            else:
                assert shapes[f"{pre}.to_v"][0] == heads * p.rank
                assert shapes[f"{pre}.to_out.0"][1] == heads * p.rank
    # quality reference: the activation-free baselines at the same plan; whitening must be closer
    # to the original on held-out inputs (measured here: 0.09-0.12 vs 0.11-0.18 relative error)
    x = unet_inputs(unet, seed=3)
    baseline = copy.deepcopy(original)
    compress_(baseline, plan, None, method="baseline")
    ref = run(original, x)
    assert 0 < rel_err(run(unet, x), ref) < rel_err(run(baseline, x), ref)


def test_reduced_rank_error_on_calibration_tokens_equals_report():
    """FFN: the measured output error on the calibration tokens is the reported Nystrom error
    (tiny damping, plenty of tokens), and whitening beats weight magnitude on the same data."""
    unet, covs = calibrated(CONFIGS["2heads_crossdim24"])
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    name = f"{block}.ff"
    units = compression_units(unet)
    plan = RankPlan.from_ranks(units, {name: 48})
    cal = [unet_inputs(unet, batch=2, size=16, seed=s) for s in (1, 2)]
    ref = [record_module_io(unet, x, (FeedForward,))[f"{block}.ff"] for x in cal]
    predicted = error_profiles(unet, covs, {name: units[name]}, damping=1e-8)[name][48]
    hidden = []  # the FFN's hidden activations (input of net.2) on the calibration tokens
    hook = unet.get_submodule(f"{block}.ff.net.2").register_forward_pre_hook(
        lambda m, a: hidden.append(a[0].detach().double().reshape(-1, a[0].shape[-1]))
    )
    for x in cal:
        run(unet, x)
    hook.remove()
    w_out = unet.get_submodule(f"{block}.ff.net.2").weight.detach().double()
    energy = float((torch.cat(hidden) @ w_out.T).square().sum(1).mean())
    magnitude = copy.deepcopy(unet)
    report = compress_(unet, plan, covs, damping=1e-8)
    compress_(magnitude, plan, None, method={"ffn": "magnitude"})

    def mse(model):
        ff = model.get_submodule(f"{block}.ff")
        with torch.no_grad():
            diffs = [(ff(*a, **k).double() - o.double()).reshape(-1, o.shape[-1]) for a, k, o in ref]
        d = torch.cat(diffs)
        return float(d.square().sum(1).mean())

    assert mse(unet) == pytest.approx(report.units[name].error, rel=1e-3)
    assert report.units[name].error < 0.5 * mse(magnitude)
    # the relative error is the decomposition's discarded energy: the error profile read off one
    # CPQR (float64, condition number ~700 here: 1e-9 relative is far above its round-off; measured
    # 2e-16), and the measured error over the measured output energy E||h W_2^T||^2 (fp32 forwards,
    # ~1e-6 relative; measured 7e-9)
    assert report.units[name].relative_error == pytest.approx(predicted, rel=1e-9)  # 0.15747
    assert mse(unet) / energy == pytest.approx(predicted, rel=1e-4)


@pytest.mark.parametrize("kind", ["ffn", "qk", "vo"])
def test_per_kind_plans_touch_only_their_layers(kind):
    unet, covs = calibrated(CONFIGS["2heads_crossdim24"])
    original = copy.deepcopy(unet)
    units = compression_units(unet)
    ranks = {n: 8 for n, u in units.items() if u.kind == kind}
    compress_(unet, RankPlan.from_ranks(units, ranks), covs)
    touched = {
        "ffn": ("ff.net.0.proj", "ff.net.2"),
        "qk": ("to_q", "to_k"),
        "vo": ("to_v", "to_out.0"),
    }[kind]
    new, old = linear_shapes(unet), linear_shapes(original)
    for layer, shape in old.items():
        if layer.endswith(touched) and "transformer_blocks" in layer:
            assert new[layer] != shape, layer
        else:
            assert new[layer] == shape, layer
    for name, mod in unet.named_modules():
        if isinstance(mod, Attention):
            expected = AttnProcessor2_0 if kind == "ffn" else SlimAttnProcessor
            assert isinstance(mod.processor, expected), name


def test_weight_svd_and_magnitude_baselines_need_no_statistics():
    unet = make_tiny_unet()
    units = compression_units(unet)
    plan = RankPlan.from_ranks(units, {n: 8 for n in units})
    original = copy.deepcopy(unet)
    report = compress_(unet, plan, None, method="baseline")
    assert {u.method for u in report.units.values()} == {"magnitude", "weight_svd"}
    assert all(u.error is None for u in report.units.values())  # no statistics: nothing to measure
    checked = {"ffn": 0, "qk": 0, "vo": 0}
    for name, u in units.items():
        lay, heads = u.layout, getattr(u.layout, "heads", None)

        def weight(model, path):
            return model.get_submodule(path).weight.detach().to(torch.float64)

        if u.kind == "ffn":  # magnitude: the 8 neurons of largest ||proj rows|| * ||W_2 column||, copied
            w_in, w_out, inner = weight(original, lay.proj_in), weight(original, lay.proj_out), u.full_rank
            score = torch.cat([w_in[:inner], w_in[inner:]], 1).norm(dim=1) * w_out.norm(dim=0)
            keep = torch.argsort(-score, stable=True)[:8].sort().values
            assert torch.equal(weight(unet, lay.proj_out), w_out[:, keep]), name
            assert torch.equal(weight(unet, lay.proj_in), torch.cat([w_in[:inner][keep], w_in[inner:][keep]]))
            checked["ffn"] += 1
            continue
        # weight_svd: per head, the rank-8 map of the compressed weights (W_q^T W_k for QK, W_v^T W_o
        # for VO) loses exactly the discarded singular values of the original map (Eckart-Young).
        # fp32 rounding of the new weights (~6e-8) and the 1e-8 damping move the factors within the
        # rank-8 manifold's tangent space, orthogonal to the residual, so the error moves only at
        # second order (~1e-14 relative, measured 1e-15): 1e-10 of ||M||_F^2 leaves four decades
        if u.kind == "qk":
            a = (weight(original, lay.query[0]), weight(original, lay.key[0]))
            b = (weight(unet, lay.query[0]), weight(unet, lay.key[0]))
            before = [x.view(heads, -1, x.shape[1]) for x in a]
            after = [x.view(heads, -1, x.shape[1]) for x in b]
            maps = [p.transpose(1, 2) @ k for p, k in (before, after)]
        else:
            w_v = [weight(m, lay.value[0]) for m in (original, unet)]
            w_o = [out_heads(weight(m, lay.out[0]), heads) for m in (original, unet)]
            maps = [v.view(heads, -1, v.shape[1]).transpose(1, 2) @ o for v, o in zip(w_v, w_o, strict=True)]
        for h in range(heads):
            s = torch.linalg.svdvals(maps[0][h])
            lost = float((maps[0][h] - maps[1][h]).square().sum())
            assert lost == pytest.approx(float(s[8:].square().sum()), abs=1e-10 * float(s.square().sum()))
            assert lost > 0.05 * float(s.square().sum()), (name, h)  # really cut (measured 9-38%)
        checked[u.kind] += 1
    assert all(checked.values()), checked
    x = unet_inputs(unet)
    # changed, and far closer to the original than dropping the transformer blocks' output
    assert 1e-4 < rel_err(run(unet, x), run(original, x)) < 0.5
    assert available_methods() == {
        "ffn": ["slimdiff", "magnitude"],
        "qk": ["slimdiff", "weight_svd"],
        "vo": ["slimdiff", "weight_svd"],
    }


def test_weight_svd_full_rank_is_exact():
    unet = make_tiny_unet(heads=2)
    original = copy.deepcopy(unet)
    x = unet_inputs(unet, seed=4)
    units = {n: u for n, u in compression_units(unet).items() if u.kind != "ffn"}
    compress_(unet, RankPlan.from_ranks(units, {}), None, method="weight_svd", rewrite_full_rank=True)
    assert rel_err(run(unet, x), run(original, x)) < 1e-5


def test_missing_covariance_leaves_model_untouched():
    unet, covs = calibrated(CONFIGS["1head"])
    units = compression_units(unet)
    plan = RankPlan.from_ranks(units, {n: 8 for n in units})
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.attnout"
    broken = {k: v for k, v in covs.items() if k != key}
    shapes = linear_shapes(unet)
    with pytest.raises(CompressionError, match="attn2.attnout"):
        compress_(unet, plan, broken)
    assert linear_shapes(unet) == shapes
    wrong = {**covs, key: torch.eye(3, dtype=torch.float64)[None]}
    with pytest.raises(CompressionError, match=r"attn2\.vo: covariance .* has shape \(1, 3, 3\)"):
        compress_(unet, plan, wrong)
    assert linear_shapes(unet) == shapes


def test_bad_calls_rejected():
    unet, covs = calibrated(CONFIGS["1head"])
    units = compression_units(unet)
    plan = RankPlan.from_ranks(units, {n: 8 for n in units})
    with pytest.raises(CompressionError, match="no ffn method 'weight_svd'"):
        compress_(unet, plan, covs, method="weight_svd")
    with pytest.raises(CompressionError, match="registered qk methods"):
        compress_(unet, plan, covs, method={"ffn": "slimdiff", "qk": "nope", "vo": "slimdiff"})
    with pytest.raises(NotImplementedError, match="separate"):
        compress_(unet, plan, covs, ffn_selection="separate")
    with pytest.raises(ValueError, match="ffn_selection"):
        compress_(unet, plan, covs, ffn_selection="both")
    name = next(iter(units))
    with pytest.raises(PlanValidationError, match=name):
        compress_(make_tiny_unet(block_out_channels=(16, 32)), plan, covs)
    import copy
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        quantized = quantize_dynamic(copy.deepcopy(unet), {torch.nn.Linear}, dtype=torch.qint8)
    # quantize-then-compress: refused, naming the first quantized layer and the order that works
    with pytest.raises(
        CompressionError, match=r"^time_embedding\.linear_1 is quantized .*compress the float model first"
    ):
        compress_(quantized, plan, covs)
    w8 = copy.deepcopy(unet)
    layer = w8.time_embedding.linear_1
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(CompressionError, match="is quantized"):  # integer weights in a plain nn.Linear
        compress_(w8, plan, covs)
    compress_(unet, plan, covs)
    with pytest.raises(CompressionError, match="already compressed"):
        compress_(unet, plan, covs)


def test_slim_processor_matches_stock_processor_with_all_features():
    """Uncompressed attention with group norm, cross-attention norm, residual, output rescale,
    a mask and 4-D input: SlimAttnProcessor(1/sqrt(d_h)) == AttnProcessor2_0."""
    torch.manual_seed(0)
    attn = Attention(
        query_dim=16,
        cross_attention_dim=12,
        heads=2,
        dim_head=8,
        norm_num_groups=4,
        residual_connection=True,
        rescale_output_factor=2.0,
        cross_attention_norm="layer_norm",
        bias=True,
    ).eval()
    x = torch.randn(2, 16, 3, 5)  # 4-D input (B, C, H, W)
    enc = torch.randn(2, 7, 12)
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0
    mask = (1 - mask) * -10000.0  # additive, (B, N_k) as diffusers passes encoder masks
    mask = mask[:, None, :]
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x, encoder_hidden_states=enc, attention_mask=mask)
        attn.set_processor(SlimAttnProcessor(scale=8**-0.5))
        got = attn(x, encoder_hidden_states=enc, attention_mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert SlimAttnProcessor.slimdiff_supported is True


def test_slim_processor_uses_original_scale_with_smaller_heads():
    """With to_q/to_k cut to r < d_h columns the logits must keep 1/sqrt(d_h): compare with a
    brute-force attention written out by hand."""
    torch.manual_seed(1)
    attn = Attention(query_dim=12, heads=2, dim_head=8).eval()
    attn.to_q = torch.nn.Linear(12, 2 * 3, bias=False)
    attn.to_k = torch.nn.Linear(12, 2 * 3, bias=False)
    attn.to_v = torch.nn.Linear(12, 2 * 5, bias=False)
    attn.to_out[0] = torch.nn.Linear(2 * 5, 12)
    attn.set_processor(SlimAttnProcessor(scale=8**-0.5))
    x = torch.randn(2, 6, 12)
    with torch.no_grad():
        got = attn(x)
        q = attn.to_q(x).view(2, 6, 2, 3).transpose(1, 2)
        k = attn.to_k(x).view(2, 6, 2, 3).transpose(1, 2)
        v = attn.to_v(x).view(2, 6, 2, 5).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        ref = attn.to_out[0]((p @ v).transpose(1, 2).reshape(2, 6, 10))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_whitening_beats_weight_svd_on_calibration_data():
    """In-sample (the tokens the covariances came from) the whitened QK/VO rebuild of the whole
    UNet is closer to the original than the weight-only SVD at the same ranks."""
    unet = make_tiny_unet(heads=2)
    cal = [unet_inputs(unet, batch=2, size=16, seed=s) for s in (1, 2)]
    covs = capture_covariances(unet, cal)
    units = compression_units(unet)
    plan = RankPlan.from_ranks(units, {n: 8 for n, u in units.items() if u.kind in ("qk", "vo")})
    refs = [run(unet, x) for x in cal]
    errors = {}
    for method in ("slimdiff", "weight_svd"):
        model = copy.deepcopy(unet)
        compress_(model, plan, covs, method=method)
        errors[method] = sum(rel_err(run(model, x), r) for x, r in zip(cal, refs, strict=True))
    assert errors["slimdiff"] < 0.5 * errors["weight_svd"], errors


def test_per_kind_method_overrides():
    """The params.yaml form compression.{ffn,qk,vo}_method overrides one kind of the preset."""
    unet, covs = calibrated(CONFIGS["1head"])
    units = compression_units(unet)
    plan = RankPlan.from_ranks(units, {n: 8 for n in units})
    report = compress_(unet, plan, covs, ffn_method="magnitude", vo_method="weight_svd")
    methods = {u.kind: u.method for u in report.units.values()}
    assert methods == {"ffn": "magnitude", "qk": "slimdiff", "vo": "weight_svd"}


def test_sd2_style_unet_linear_projection_and_per_level_heads():
    """SD 2.x layout: use_linear_projection, per-level head counts, upcast attention."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=40,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        layers_per_block=1,
        norm_num_groups=8,
    ).eval()
    cal = [unet_inputs(unet, batch=2, size=16, seed=1)]
    covs = capture_covariances(unet, cal)
    original = copy.deepcopy(unet)
    x = unet_inputs(unet, seed=3)
    units = compression_units(unet)
    compress_(unet, RankPlan.from_ranks(units, {}), covs, rewrite_full_rank=True)
    assert rel_err(run(unet, x), run(original, x)) < 1e-5
    slim = copy.deepcopy(original)
    plan = RankPlan.from_ranks(units, {n: 8 for n in units})
    compress_(slim, plan, covs)
    assert count_parameters(slim) == count_parameters(original) - plan.removed_params
    baseline = copy.deepcopy(original)
    compress_(baseline, plan, None, method="baseline")
    ref = run(original, x)
    assert 0 < rel_err(run(slim, x), ref) < rel_err(run(baseline, x), ref)


def test_plain_gelu_ffn_block():
    """A DiT block with a non-gated GELU(tanh) FFN (PixArt): proj keeps rows J only, and the
    full-rank rewrite reproduces the block."""
    from conftest import make_tiny_pixart

    model = make_tiny_pixart()
    block = "transformer_blocks.0"
    units = compression_units(model)
    ffn = units[f"{block}.ff"]
    assert ffn.cost_per_rank == 2 * 16 + 1 and ffn.full_rank == 64 and not ffn.layout.gated
    args, kwargs = pixart_inputs(model)
    captured = {}
    ff_out = model.get_submodule(f"{block}.ff.net.2")
    hook = ff_out.register_forward_pre_hook(lambda m, a: captured.update(h=a[0]))
    with torch.no_grad():
        ref = model(*args, **kwargs).sample
    hook.remove()
    hid = captured["h"].double().reshape(-1, 64)
    covs = {f"{block}.ff.hidden": hid.T @ hid / hid.shape[0]}
    full = copy.deepcopy(model)
    compress_(full, RankPlan.from_ranks({f"{block}.ff": ffn}, {}), covs, rewrite_full_rank=True)
    with torch.no_grad():
        assert rel_err(full(*args, **kwargs).sample, ref) < 1e-5
    before = count_parameters(model)
    compress_(model, RankPlan.from_ranks({f"{block}.ff": ffn}, {f"{block}.ff": 24}), covs)
    assert model.get_submodule(f"{block}.ff.net.0.proj").out_features == 24
    assert count_parameters(model) == before - (64 - 24) * ffn.cost_per_rank


def pixart_inputs(model, batch: int = 2, text_len: int = 6, seed: int = 0):
    from slimdiff.families import adapter_for

    g = torch.Generator().manual_seed(seed)
    return adapter_for(model).example_inputs(model, batch, (8, 8), text_len, device="cpu", generator=g)
