"""LoRAs for FLUX.1 projected onto compressed FLUX transformers (``slimdiff.formats.lora.project_lora``),
and the community (kohya / ai-toolkit / ComfyUI, "BFL"-named) LoRA format converter
(``FluxAdapter.convert_lora``), on the tiny FLUX of ``test_flux.py`` (inner dim 32 = 2 heads x 16,
MLP 128, 2 double + 2 single blocks; random weights, fixed seeds).

References and tolerances:
* full-rank rewrite + projected LoRA against the original + LoRA (fused independently in float64
  here): exact maths, float32 rounding of the whitened weights through 4 blocks (1e-5 relative,
  as ``test_flux``'s full-rank check of the base model; measured 1.0e-7, the LoRA's own effect
  5e-2);
* projected deltas against the compression maps applied to the original delta: the LoRA is
  float64, so the projected factors come back in float64, and both sides are float64 products of
  the same (float32-stored) maps: 1e-10 relative to the largest entry (measured 1.1e-15);
* the maps against what compression did to the weights themselves: float32 weights, maps stored in
  float32 (1e-5 relative to the largest entry; measured 7e-8);
* the converted kohya LoRA against a diffusers-format LoRA built by hand from the same tensors:
  the same float64 sums cast to float32, 1e-6 relative (measured: bit-equal), and against
  diffusers' own converter where it applies (float64 LoRA: 1e-12);
* a saved and reloaded pipeline against the in-memory model: the same maps and tensors, bit-equal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_flux import covariances, inputs, rel, run, tiny_flux
from torch import nn

from slimdiff.families import adapter_for
from slimdiff.families.base import LoraError, linear, split_path
from slimdiff.families.units import compression_units
from slimdiff.formats.lora import project_lora
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import compress_
from slimdiff.surgery.maps import LORA_MAPS_ATTRIBUTE

F64 = torch.float64
P = "transformer"
DIM, MLP, RANK = 32, 128, 2


def block_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "blocks" in n]


def make_lora(model, paths, rank=RANK, seed=0, size=0.3, dtype=torch.float32):
    """diffusers/PEFT keys ``transformer.<path>.lora_A.weight`` / ``lora_B``; each delta B A has
    ``size`` times the Frobenius norm of its layer's weight."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path in paths:
        w = model.get_submodule(path).weight.detach().to(F64)
        a = torch.randn(rank, w.shape[1], generator=g, dtype=F64) / w.shape[1] ** 0.5
        b = torch.randn(w.shape[0], rank, generator=g, dtype=F64)
        b *= size * float(w.norm()) / float((b @ a).norm())
        state[f"{P}.{path}.lora_A.weight"] = a.to(dtype)
        state[f"{P}.{path}.lora_B.weight"] = b.to(dtype)
    return state


def deltas(state) -> dict[str, torch.Tensor]:
    """{path: scale * B A} in float64 (scale alpha / rank where a ``.alpha`` key is present)."""
    out = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            path = key[len(P) + 1 : -len(".lora_A.weight")]
            a, b = state[key].to(F64), state[f"{P}.{path}.lora_B.weight"].to(F64)
            alpha = state.get(f"{P}.{path}.alpha")
            scale = 1.0 if alpha is None else float(alpha) / a.shape[0]
            out[path] = scale * (b @ a)
    return out


def fuse(model, state):
    """A copy of ``model`` with ``W += scale B A`` (float64 sum, cast back), independent of slimdiff."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for path, d in deltas(state).items():
            layer = model.get_submodule(path)
            layer.weight.copy_(layer.weight.to(F64) + d)
    return model


def relmax(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a.to(F64) - b.to(F64)).abs().max() / b.to(F64).abs().max())


def full_rank(model, cov):
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(
        slim,
        RankPlan.from_ranks(units, {n: u.full_rank for n, u in units.items()}),
        cov,
        rewrite_full_rank=True,
    )
    return slim


def real_plan(model, cov) -> RankPlan:
    """40% of the parameters removed by the error plan, the QKs narrowed to 8 of 16 too (at 40% the
    plan leaves them whole on random weights)."""
    units = compression_units(model)
    plan = plan_ranks(
        None,
        units,
        Budget(removed_fraction=0.4),
        r_min=4,
        multiple=2,
        profiles=error_profiles(model, cov, units),
    )
    return RankPlan.from_ranks(
        units, {n: (8 if units[n].kind == "qk" else p.rank) for n, p in plan.units.items()}
    )


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_flux()
    return model, covariances(model)


@pytest.fixture(scope="module")
def compressed(calibrated):
    model, cov = calibrated
    plan = real_plan(model, cov)
    slim = copy.deepcopy(model)
    compress_(slim, plan, cov)
    return slim, plan


# -- kohya / BFL format -----------------------------------------------------------------------------
#: BFL name -> diffusers paths (rows in order), for the tiny FLUX
DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn_proj": ["attn.to_out.0"],
    "txt_attn_proj": ["attn.to_add_out"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_mod_lin": ["norm1_context.linear"],
}
SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}
GLOBAL = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer_linear": "proj_out"}


def kohya_lora(model, rank=4, alpha=8.0, seed=1, dtype=torch.float32):
    """(kohya-format LoRA with BFL names, the equivalent diffusers-format LoRA built by hand).
    Fused linears get one A (r, in) and one B (sum of the parts' rows, r); the hand-built LoRA
    gives every part the whole A and its rows of B, in q | k | v (| MLP) order, with the scale
    alpha / rank folded into B (no alpha keys: the scale reaches the fuse by another route). The
    final layer's adaLN modulation: BFL rows (shift, scale), diffusers (scale, shift)."""
    g = torch.Generator().manual_seed(seed)
    kohya, hand = {}, {}
    names = [
        (f"double_blocks_{i}_{k}", [f"transformer_blocks.{i}.{p}" for p in v])
        for i in range(2)
        for k, v in DOUBLE.items()
    ]
    names += [
        (f"single_blocks_{i}_{k}", [f"single_transformer_blocks.{i}.{p}" for p in v])
        for i in range(2)
        for k, v in SINGLE.items()
    ]
    names += [(k, [v]) for k, v in GLOBAL.items()]
    names.append(("final_layer_adaLN_modulation_1", ["norm_out.linear"]))
    for bfl, paths in names:
        layers = [model.get_submodule(p) for p in paths]
        rows = [lay.out_features for lay in layers]
        a = torch.randn(rank, layers[0].in_features, generator=g) / layers[0].in_features ** 0.5
        b = 0.3 * torch.randn(sum(rows), rank, generator=g)
        kohya[f"lora_unet_{bfl}.lora_down.weight"] = a.to(dtype)
        kohya[f"lora_unet_{bfl}.lora_up.weight"] = b.to(dtype)
        kohya[f"lora_unet_{bfl}.alpha"] = torch.tensor(alpha)
        if bfl == "final_layer_adaLN_modulation_1":
            shift, scale = b.chunk(2)
            b = torch.cat([scale, shift])
        start = 0
        for path, n in zip(paths, rows, strict=True):
            hand[f"{P}.{path}.lora_A.weight"] = a.to(dtype)
            hand[f"{P}.{path}.lora_B.weight"] = (b[start : start + n].to(F64) * (alpha / rank)).to(dtype)
            start += n
    return kohya, hand


def comfy(kohya):
    """The same LoRA with ComfyUI's dotted BFL names (``diffusion_model.double_blocks.0.img_attn.qkv``)
    and lora_A / lora_B."""
    dotted = {
        "img_attn_": "img_attn.",
        "txt_attn_": "txt_attn.",
        "img_mlp_": "img_mlp.",
        "txt_mlp_": "txt_mlp.",
        "img_mod_": "img_mod.",
        "txt_mod_": "txt_mod.",
        "modulation_": "modulation.",
        "adaLN_modulation_": "adaLN_modulation.",
        "final_layer_": "final_layer.",
    }
    out = {}
    for key, v in kohya.items():
        mod, _, role = key.removeprefix("lora_unet_").partition(".")
        for blk in ("double_blocks_", "single_blocks_"):
            if mod.startswith(blk):
                i, _, rest = mod[len(blk) :].partition("_")
                mod = f"{blk[:-1]}.{i}.{rest}"
        for a, b in dotted.items():
            mod = mod.replace(a, b)
        role = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(role, role)
        out[f"diffusion_model.{mod}.{role}"] = v
    return out


# -- 1. full rank: compressed + projected == original + LoRA ---------------------------------------
def test_full_rank_projection_reproduces_original_plus_lora(calibrated):
    """Every unit rewritten at full rank (non-trivial whitening maps whose products are the
    identity in exact arithmetic), a rank-2 LoRA on every linear of the 4 blocks: the compressed
    model with the projected LoRA fused in computes the original model with the LoRA fused in."""
    model, cov = calibrated
    slim = full_rank(model, cov)
    lora = make_lora(model, block_linears(model))
    projected, report = project_lora(slim, lora)
    x = inputs(model, 2)
    want = run(fuse(model, lora), x)
    assert rel(run(model, x), want) > 1e-2  # the LoRA matters (measured 0.053) ...
    assert rel(run(slim, x), run(model, x)) < 1e-5  # ... the rewrite alone does not (1.2e-7)
    assert rel(run(fuse(slim, projected), x), want) < 1e-5
    assert set(report.layers) == set(block_linears(model))
    for i in (0, 1):
        assert report.layers[f"single_transformer_blocks.{i}.proj_out"] == "cols_packed"
        assert report.layers[f"single_transformer_blocks.{i}.proj_mlp"] == "rows_index"
        assert report.layers[f"transformer_blocks.{i}.attn.to_q"] == "rows_heads"
        assert report.layers[f"transformer_blocks.{i}.norm1.linear"] == "identity"


# -- 2. a real plan: the projection is the compression map of the delta -----------------------------
def test_projected_deltas_are_the_compression_maps_of_the_original_deltas(calibrated, compressed):
    model, _ = calibrated
    slim, plan = compressed
    assert {p.kind for p in plan.compressed_units().values()} == {"ffn", "qk", "vo"}
    maps = getattr(slim, LORA_MAPS_ATTRIBUTE)
    # the maps are what compression did to the weights (column blocks of proj_out included)
    for key, lm in maps.layers.items():
        base, cols = split_path(key)
        got = slim.get_submodule(base).weight.detach().to(F64)
        if cols is not None:  # the block's columns in the compressed layer: [0, c) or the last c
            c = lm.compressed[1]
            got = got[:, :c] if cols.start >= 0 else got[:, -c:]
        assert relmax(got, lm.map_weight(linear(model, key).weight)) < 1e-5, key
    paths = block_linears(model)
    lora = make_lora(model, paths, dtype=F64)  # float64 factors in -> float64 factors out
    projected, report = project_lora(slim, lora)
    original = deltas(lora)
    got = deltas(projected)
    assert set(got) == set(paths)
    packed = 0
    for path in paths:
        d = original[path]
        kind = report.layers[path]
        if kind == "identity":
            assert path not in maps.layers and torch.equal(got[path], d), path
            continue
        if kind == "cols_packed":  # [attention | MLP] columns, each block through its own map
            attn, mlp = f"{path}[0:{DIM}]", f"{path}[-{MLP}:]"
            assert {k for k in maps.layers if split_path(k)[0] == path} == {attn, mlp}
            want = torch.cat(
                [maps.layers[attn].map_weight(d[:, :DIM]), maps.layers[mlp].map_weight(d[:, DIM:])], 1
            )
            packed += 1
        else:
            want = maps.layers[path].map_weight(d)
        assert got[path].shape == slim.get_submodule(path).weight.shape
        assert relmax(got[path], want) < 1e-10, path
    assert packed == 2
    kinds = set(report.layers.values())
    assert {"rows_heads", "cols_heads", "rows_index", "cols_packed", "identity"} <= kinds

    # the compressed model with the projected LoRA is closer to original + LoRA than without it
    lora32 = make_lora(model, paths)
    projected32, _ = project_lora(slim, lora32)
    x = inputs(model, 5)
    want = run(fuse(model, lora32), x)
    with_lora = rel(run(fuse(slim, projected32), x), want)
    without = rel(run(slim, x), want)
    base = rel(run(slim, x), run(model, x))
    print(
        f"\n40% + QK 8/16: |slim+P(LoRA) - (orig+LoRA)| {with_lora:.4f}, |slim - (orig+LoRA)| {without:.4f}, "
        f"|slim - orig| {base:.4f}"
    )
    assert with_lora < without


# -- 3. the kohya / BFL converter -------------------------------------------------------------------
def test_kohya_lora_converts_to_the_hand_built_diffusers_lora(calibrated):
    model, _ = calibrated
    kohya, hand = kohya_lora(model)
    adapter = adapter_for(model)
    converted = adapter.convert_lora(model, kohya)
    # split exactly: every part has the whole A and its rows of B; alpha kept for every part
    assert {k for k in converted if not k.endswith(".alpha")} == set(hand)
    assert torch.equal(
        converted[f"{P}.single_transformer_blocks.1.proj_mlp.lora_B.weight"],
        kohya["lora_unet_single_blocks_1_linear1.lora_up.weight"][3 * DIM :],
    )
    assert torch.equal(
        converted[f"{P}.transformer_blocks.0.attn.add_k_proj.lora_A.weight"],
        kohya["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"],
    )
    assert float(converted[f"{P}.transformer_blocks.0.attn.add_k_proj.alpha"]) == 8.0
    # ComfyUI's dotted names with lora_A / lora_B convert to the same tensors
    dotted = adapter.convert_lora(model, comfy(kohya))
    assert dotted.keys() == converted.keys() and all(torch.equal(dotted[k], converted[k]) for k in converted)
    # fused into the original model: the same weights as the hand-built diffusers LoRA
    a, b = fuse(model, converted), fuse(model, hand)
    sa, sb = a.state_dict(), b.state_dict()
    changed = [k for k in sa if not torch.equal(sa[k], model.state_dict()[k])]
    assert len(changed) == len(hand) // 2
    for k in sa:
        assert relmax(sa[k], sb[k]) <= 1e-6, k
    x = inputs(model, 6)
    assert rel(run(a, x), run(b, x)) <= 1e-6
    # keys already in a parseable form pass through unchanged
    assert adapter.convert_lora(model, hand) is hand
    mixed = {**hand, "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": torch.zeros(1, DIM)}
    assert adapter.convert_lora(model, mixed) is mixed


def test_kohya_conversion_agrees_with_diffusers_where_diffusers_applies(calibrated):
    """diffusers' ``_convert_kohya_flux_lora_to_diffusers`` splits single-block ``linear1`` at
    FLUX.1-dev's hard-coded widths (3072 / 12288: it asserts on other widths) and drops the alphas
    of the final layer (its "TODO: alphas"); everywhere else its deltas (scale folded into the
    factors, block-sparse B chunked) are ours, to float64 rounding."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    model, _ = calibrated
    kohya, _ = kohya_lora(model, dtype=F64)
    kohya = {k: v.to(F64) for k, v in kohya.items() if "linear1" not in k}
    ours = deltas(adapter_for(model).convert_lora(model, kohya))
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    # (it leaves the final layer's keys without the transformer. prefix)
    theirs = deltas({k if k.startswith(f"{P}.") else f"{P}.{k}": v for k, v in converted.items()})
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 14 + 2 * 2 + 4
    for path, d in theirs.items():
        scale = 8.0 / 4 if path in ("norm_out.linear", "proj_out") else 1.0  # alpha / rank, dropped there
        assert relmax(ours[path], scale * d) < 1e-12, path


def test_kohya_lora_projects_end_to_end(calibrated, tmp_path):
    """A kohya file (safetensors, with alphas) onto the full-rank rewrite: the same known answer as
    the diffusers-format test."""
    from safetensors.torch import save_file

    model, cov = calibrated
    slim = full_rank(model, cov)
    kohya, hand = kohya_lora(model)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    projected, report = project_lora(slim, tmp_path / "kohya.safetensors")
    assert report.layers["single_transformer_blocks.0.proj_out"] == "cols_packed"
    assert report.scales["transformer_blocks.0.attn.to_q"] == 2.0  # alpha 8 / rank 4
    x = inputs(model, 2)
    want = run(fuse(model, hand), x)
    assert rel(run(model, x), want) > 0.1  # measured 0.96 (rank 4, scale 2)
    assert rel(run(fuse(slim, projected), x), want) < 1e-5  # measured 1.5e-7


def test_kohya_lora_on_a_narrowed_model_splits_at_the_original_widths(calibrated, compressed):
    """The compressed model's to_q / proj_mlp are narrowed: the fused rows split at the widths the
    maps record, and the projection equals that of the hand-built diffusers LoRA."""
    model, _ = calibrated
    slim, _ = compressed
    assert slim.single_transformer_blocks[0].proj_mlp.out_features < MLP
    kohya, hand = kohya_lora(model)
    got, _ = project_lora(slim, kohya)
    want, _ = project_lora(slim, hand)
    assert got.keys() == want.keys()
    for k in want:  # the same float32 tensors through the same float64 maps
        assert torch.equal(got[k], want[k]), k


def test_bad_kohya_keys_raise_naming_them(calibrated):
    model, _ = calibrated
    kohya, _ = kohya_lora(model)
    bad = "lora_unet_double_blocks_0_img_attn_nonsense"
    lora = {
        **kohya,
        f"{bad}.lora_down.weight": torch.zeros(4, DIM),
        f"{bad}.lora_up.weight": torch.zeros(DIM, 4),
    }
    with pytest.raises(LoraError, match=bad):
        project_lora(model, lora)
    with pytest.raises(LoraError, match=r"double_blocks\.0\.img_attn\.nonsense\.lora_A\.weight"):
        adapter_for(model).convert_lora(
            model, {"diffusion_model.double_blocks.0.img_attn.nonsense.lora_A.weight": torch.zeros(4, DIM)}
        )
    # a FLUX.1-dev-width LoRA (3072 / 12288) on the tiny model
    wide = {
        "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, DIM),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(3 * 3072 + 12288, 4),
    }
    with pytest.raises(
        LoraError, match="lora_unet_single_blocks_0_linear1.lora_up.weight: 21504 output rows"
    ):
        project_lora(model, wide)
    # a block the model does not have, a factor without the other, an unknown role
    with pytest.raises(
        LoraError, match="lora_unet_double_blocks_7_img_mlp_0.lora_down.weight: names 'transformer_blocks.7"
    ):
        project_lora(
            model,
            {
                "lora_unet_double_blocks_7_img_mlp_0.lora_down.weight": torch.zeros(4, DIM),
                "lora_unet_double_blocks_7_img_mlp_0.lora_up.weight": torch.zeros(MLP, 4),
            },
        )
    with pytest.raises(LoraError, match="lora_unet_img_in.lora_down.weight: lora_down"):
        project_lora(model, {"lora_unet_img_in.lora_down.weight": torch.zeros(4, 16)})
    with pytest.raises(LoraError, match="lora_unet_txt_in.dora_scale"):
        project_lora(model, {"lora_unet_txt_in.dora_scale": torch.zeros(1, 24)})


# -- 4. a compressed pipeline saved and loaded by diffusers -----------------------------------------
def test_reloaded_pipeline_projects_like_the_in_memory_model(tmp_path):
    from diffusers import DiffusionPipeline
    from family_pipelines import tiny_flux_pipeline

    from slimdiff.formats.io import save_compressed

    pipe = tiny_flux_pipeline(tmp_path / "build")
    model = pipe.transformer
    original = copy.deepcopy(model)
    cov = covariances(model)
    compress_(model, real_plan(model, cov), cov)
    lora = make_lora(original, block_linears(original))
    kohya, _ = kohya_lora(original)
    expected = [project_lora(model, lora)[0], project_lora(model, kohya)[0]]
    save_compressed(pipe, tmp_path / "slim")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert getattr(loaded.transformer, LORA_MAPS_ATTRIBUTE, None) is None  # read lazily, from the folder
    for want, state in zip(expected, (lora, kohya), strict=True):
        got, report = project_lora(loaded, state)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    maps = getattr(loaded.transformer, LORA_MAPS_ATTRIBUTE)
    assert maps.layers.keys() == getattr(model, LORA_MAPS_ATTRIBUTE).layers.keys()
    assert report.layers["single_transformer_blocks.1.proj_out"] == "cols_packed"
