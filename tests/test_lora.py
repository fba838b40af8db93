"""slimdiff.formats.lora: a LoRA made for the original model, projected in closed form onto a compressed
model. Known-answer tests on a tiny SD-1.x-shaped UNet built from config (heads=2, d_h 16 / 32,
GEGLU FFNs), fp32 forwards, float64 references."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from compress_helpers import capture_covariances, run, unet_inputs
from conftest import make_tiny_unet

from slimdiff.families.base import LoraError
from slimdiff.families.units import compression_units
from slimdiff.formats.io import load_compressed, save_compressed
from slimdiff.formats.lora import load_lora_into, project_lora
from slimdiff.formats.sidecar import SIDECAR_NAME, CompressedModelError, read_lora_maps
from slimdiff.planning.plan import RankPlan
from slimdiff.surgery.compress import compress_
from slimdiff.surgery.maps import LORA_MAPS_NAME, LoraMapsMissingError

F64 = torch.float64
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
#: layers a LoRA targets: every kind of map (QK rows, VO rows and columns, FFN rows and refit
#: columns), self- and cross-attention, and a layer compression never touches (proj_in)
TARGETS = [
    f"{BLOCK}.attn1.to_q",
    f"{BLOCK}.attn1.to_k",
    f"{BLOCK}.attn1.to_v",
    f"{BLOCK}.attn1.to_out.0",
    f"{BLOCK}.attn2.to_q",
    f"{BLOCK}.attn2.to_k",
    f"{BLOCK}.attn2.to_v",
    f"{BLOCK}.attn2.to_out.0",
    f"{BLOCK}.ff.net.0.proj",
    f"{BLOCK}.ff.net.2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "time_embedding.linear_1",
]
ROW_LAYERS = ("to_q", "to_k", "to_v", "ff.net.0.proj")


def make_lora(model, targets=TARGETS, rank=4, seed=0, rel=0.3, alpha=None, prefix="unet"):
    """A PEFT-format LoRA (``unet.<path>.lora_A.weight`` / ``lora_B``) whose delta B A has about
    ``rel`` times the Frobenius norm of each target's weight."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path in targets:
        w = model.get_submodule(path).weight.detach()
        out_f, in_f = w.shape[0], w.shape[1]
        a = torch.randn(rank, in_f, generator=g) / in_f**0.5
        b = torch.randn(out_f, rank, generator=g)
        b *= rel * float(w.norm()) / float((b @ a).norm())
        state[f"{prefix}.{path}.lora_A.weight"] = a
        state[f"{prefix}.{path}.lora_B.weight"] = b
        if alpha is not None:
            state[f"{prefix}.{path}.alpha"] = torch.tensor(float(alpha))
    return state


def delta(state, path, scale=1.0, prefix="unet"):
    a, b = state[f"{prefix}.{path}.lora_A.weight"], state[f"{prefix}.{path}.lora_B.weight"]
    return scale * (b.to(F64) @ a.to(F64))


def fused_reference(unet, state, scale=1.0, prefix="unet"):
    """original + LoRA, fused independently of slimdiff.formats.lora: W + scale B A in float64."""
    ref = copy.deepcopy(unet)
    with torch.no_grad():
        for key in state:
            if key.endswith(".lora_A.weight"):
                path = key[len(prefix) + 1 : -len(".lora_A.weight")]
                layer = ref.get_submodule(path)
                layer.weight.copy_(layer.weight.to(F64) + delta(state, path, scale, prefix))
    return ref


def relmax(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def tiny():
    unet = make_tiny_unet(heads=2)
    covs = capture_covariances(unet, [unet_inputs(unet, batch=2, size=16, seed=1)])
    return unet, covs


def half_ranks(model):
    return {n: u.full_rank // 2 for n, u in compression_units(model).items()}


def _compressed(tiny, ranks, **kw):
    unet, covs = tiny
    model = copy.deepcopy(unet)
    compress_(model, RankPlan.from_ranks(compression_units(unet), ranks), covs, **kw)
    return model


# --------------------------------------------------------------------------------------------
# (a) full rank: compressed + projected LoRA == original + LoRA
# --------------------------------------------------------------------------------------------
def test_full_rank_projection_reproduces_original_plus_lora(tiny, tmp_path):
    """Every unit rewritten at full rank (rewrite_full_rank: T, S, M are non-trivial whitening
    maps, but T_q T_k^T = I, T_v S^T = I, M = I in exact arithmetic). Tolerance: the rewrite of
    the base model alone already differs from the original by fp32 rounding of the transformed
    weights amplified by the condition numbers of the whitening maps (measured ~1e-6 relative on
    this model); the LoRA must add no more than that, so both are held to 1e-5 relative to the
    output's max |value|, and the LoRA's own effect (~0.1 relative) is 4 orders larger."""
    unet, _ = tiny
    model = _compressed(tiny, {}, rewrite_full_rank=True)
    lora = make_lora(unet)
    x = unet_inputs(unet, seed=5)
    base_ref, lora_ref = run(unet, x), run(fused_reference(unet, lora), x)
    floor = relmax(run(model, x), base_ref)
    assert floor < 1e-5
    assert relmax(lora_ref, base_ref) > 1e-2  # the LoRA really changes the output

    mapped, report = project_lora(model, lora)
    assert {report.layers[t] for t in TARGETS[:-1]} <= {
        "rows_heads",
        "cols_heads",
        "rows_index",
        "cols_nystrom",
    }
    assert report.layers["time_embedding.linear_1"] == "identity"
    handle = load_lora_into(model, lora, method="fuse")
    err = relmax(run(model, x), lora_ref)
    assert err < 1e-5, err

    # the same through a saved folder: the maps come from slimdiff_lora_maps.safetensors
    handle.unfuse()
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    mapped2, _ = project_lora(loaded, lora)
    assert mapped2.keys() == mapped.keys()
    for k in mapped:  # maps are stored in float32: the projected LoRA agrees to fp32 rounding
        assert torch.allclose(mapped2[k], mapped[k], rtol=1e-5, atol=1e-7), k
    load_lora_into(loaded, lora, method="fuse")
    assert relmax(run(loaded, x), lora_ref) < 1e-5


# --------------------------------------------------------------------------------------------
# (b) units the plan leaves at full rank map to themselves
# --------------------------------------------------------------------------------------------
def test_lora_on_uncompressed_unit_maps_to_itself(tiny):
    unet, _ = tiny
    units = compression_units(unet)
    ranks = {n: u.full_rank // 2 for n, u in units.items() if n.startswith("up_blocks")}
    model = _compressed(tiny, ranks)
    lora = make_lora(unet)
    mapped, report = project_lora(model, lora)
    for path in TARGETS:
        if path.startswith("up_blocks"):
            assert report.layers[path] != "identity"
            continue
        assert report.layers[path] == "identity", path
        for ab in ("lora_A", "lora_B"):
            key = f"unet.{path}.{ab}.weight"
            assert torch.equal(mapped[key], lora[key]), key


# --------------------------------------------------------------------------------------------
# (c) reduced rank: the projected delta is the exact image T dW, computed independently
# --------------------------------------------------------------------------------------------
def test_reduced_rank_delta_is_exact_projection(tiny):
    """Row layers (to_q/k/v, ff.net.0.proj): their maps do not depend on their own weights
    (QK: T from the q/k statistics; VO: T_v from the attention-output statistics and W_o; FFN: J
    from the statistics), so compressing original+LoRA with the same statistics must change the
    compressed weight by exactly the projected delta. Column layers (to_out.0, ff.net.2): S_h
    recovered by least squares from the compressed to_out weight (W_o' block h = W_o[:, h] S_h),
    M from the Nystrom formula C~_:J C~_JJ^-1 with J read off the compressed proj rows.
    Tolerance: 1e-5 relative to the largest entry of the reference (measured 3e-8 to 2e-7:
    fp32 weights in the differences and the least squares, maps stored in float32)."""
    unet, covs = tiny
    units = compression_units(unet)
    ranks = {n: max(1, u.full_rank // 2 - 3) for n, u in units.items()}
    plan = RankPlan.from_ranks(units, ranks)
    lora = make_lora(unet)
    c1 = copy.deepcopy(unet)
    compress_(c1, plan, covs)
    mapped, _ = project_lora(c1, lora)

    rows = [t for t in TARGETS if t.endswith(ROW_LAYERS)]
    with_lora = fused_reference(unet, {k: v for k, v in lora.items() if any(f".{t}." in k for t in rows)})
    c2 = copy.deepcopy(with_lora)
    compress_(c2, plan, covs)
    for path in rows:
        got = mapped[f"unet.{path}.lora_B.weight"].to(F64) @ mapped[f"unet.{path}.lora_A.weight"].to(F64)
        want = c2.get_submodule(path).weight.to(F64) - c1.get_submodule(path).weight.to(F64)
        assert got.shape == c1.get_submodule(path).weight.shape
        assert relmax(got, want) < 1e-5, path

    for path in (t for t in TARGETS if t.endswith("to_out.0")):
        attn = path[: -len(".to_out.0")]
        heads = unet.get_submodule(attn).heads
        w_o = unet.get_submodule(path).weight.to(F64)  # (d_out, H d_h)
        w_new = c1.get_submodule(path).weight.to(F64)  # (d_out, H r)
        d_h, r = w_o.shape[1] // heads, w_new.shape[1] // heads
        s = torch.block_diag(
            *[
                torch.linalg.lstsq(w_o[:, h * d_h : (h + 1) * d_h], w_new[:, h * r : (h + 1) * r]).solution
                for h in range(heads)
            ]
        )
        got = mapped[f"unet.{path}.lora_B.weight"].to(F64) @ mapped[f"unet.{path}.lora_A.weight"].to(F64)
        assert relmax(got, delta(lora, path) @ s) < 1e-5, path

    for path in (t for t in TARGETS if t.endswith("ff.net.2")):
        block = path[: -len(".ff.net.2")]
        w1 = unet.get_submodule(f"{block}.ff.net.0.proj").weight
        w1_new = c1.get_submodule(f"{block}.ff.net.0.proj").weight
        inner = w1.shape[0] // 2
        k = w1_new.shape[0] // 2
        j = torch.tensor([int((w1[:inner] == row).all(dim=1).nonzero()) for row in w1_new[:k]])
        c = covs[f"{block}.ff.hidden"].to(F64)
        c = c + 1e-2 * torch.trace(c) / c.shape[0] * torch.eye(c.shape[0], dtype=F64)  # damping 1e-2
        m = c[:, j] @ torch.linalg.inv(c[j][:, j])
        got = mapped[f"unet.{path}.lora_B.weight"].to(F64) @ mapped[f"unet.{path}.lora_A.weight"].to(F64)
        assert relmax(got, delta(lora, path) @ m) < 1e-5, path
        # and the map is the one compression applied to the weight itself
        assert (
            relmax(c1.get_submodule(path).weight.to(F64), unet.get_submodule(path).weight.to(F64) @ m) < 1e-5
        )


def test_alpha_scale_is_folded_into_lora_b(tiny):
    unet, _ = tiny
    model = _compressed(tiny, {})
    lora = make_lora(unet, rank=4, alpha=2.0)  # scale alpha / r = 0.5
    mapped, report = project_lora(model, lora)
    path = TARGETS[0]
    assert report.scales[path] == 0.5
    assert torch.allclose(mapped[f"unet.{path}.lora_B.weight"], 0.5 * lora[f"unet.{path}.lora_B.weight"])
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    lora_plain = {k: v for k, v in lora.items() if not k.endswith(".alpha")}
    _, report = project_lora(model, lora_plain, metadata=meta)
    assert report.scales[path] == 2.0


def test_fp16_lora_is_projected_in_full_precision(tiny):
    """An fp16 LoRA file onto the full-rank rewrite (non-trivial whitening maps): the projection
    runs in float64 and is rounded once, to the more precise of the file's and the layer's dtype.
    fp32 model: fp32 factors identical to those of the same values given as fp32 (no fp16
    rounding of the projected factors, which was ~1e-3 relative before). fp16 model: fp16 factors
    equal to the fp32 projection cast to fp16 within fp16 rounding of the final factors: at most
    one fp16 ulp (|x| 2^-10; the f64 -> f32 -> f16 double rounding of the reference can move a
    value by one ulp, the direct f64 -> f16 rounding not), atol 2^-24 (the smallest fp16
    subnormal)."""
    unet, _ = tiny
    model = _compressed(tiny, {}, rewrite_full_rank=True)
    lora16 = {k: v.half() for k, v in make_lora(unet).items()}
    ref32, _ = project_lora(model, {k: v.float() for k, v in lora16.items()})
    got, report = project_lora(model, lora16)
    assert "rows_heads" in report.layers.values() and "cols_nystrom" in report.layers.values()
    assert got.keys() == ref32.keys()
    for k in ref32:
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], ref32[k]), k

    half = copy.deepcopy(model).half()
    got16, _ = project_lora(half, lora16)
    for k in ref32:
        want = ref32[k].half()
        assert got16[k].dtype == torch.float16, k
        err = (got16[k].float() - want.float()).abs()
        assert bool((err <= want.float().abs() * 2**-10 + 2**-24).all()), k
    # an fp32 LoRA on the fp16 model keeps fp32 factors (fusing rounds once, to the layer's dtype)
    got32, _ = project_lora(half, {k: v.float() for k, v in lora16.items()})
    assert all(got32[k].dtype == torch.float32 and torch.equal(got32[k], ref32[k]) for k in ref32)


def test_other_key_formats_give_the_same_projection(tiny):
    """lora.down/up, kohya lora_unet_* with underscores, and old attention-processor keys."""
    unet, _ = tiny
    model = _compressed(tiny, half_ranks(unet))
    lora = make_lora(unet)
    ref, _ = project_lora(model, lora)
    path = TARGETS[0]
    a, b = lora[f"unet.{path}.lora_A.weight"], lora[f"unet.{path}.lora_B.weight"]
    kohya = "lora_unet_" + path.replace(".", "_")
    attn, lin = path.rsplit(".", 1)
    for fmt in (
        {f"{path}.lora.down.weight": a, f"{path}.lora.up.weight": b},
        {f"{kohya}.lora_down.weight": a, f"{kohya}.lora_up.weight": b, f"{kohya}.alpha": torch.tensor(4.0)},
        {
            f"unet.{attn}.processor.{lin}_lora.down.weight": a,
            f"unet.{attn}.processor.{lin}_lora.up.weight": b,
        },
    ):
        got, _ = project_lora(model, fmt)
        for ab in ("lora_A", "lora_B"):
            assert torch.equal(got[f"unet.{path}.{ab}.weight"], ref[f"unet.{path}.{ab}.weight"])


def test_fuse_and_unfuse_restore_weights_exactly(tiny):
    unet, _ = tiny
    model = _compressed(tiny, half_ranks(unet))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = load_lora_into(model, make_lora(unet), method="fuse")
    assert handle.method == "fuse" and handle.fused
    assert not torch.equal(model.get_submodule(TARGETS[0]).weight, before[f"{TARGETS[0]}.weight"])
    handle.unfuse()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_auto_without_peft_falls_back_to_fuse(tiny, monkeypatch):
    """Without peft (simulated: the dev install has it, see tests/test_lora_peft.py for that path)
    auto fuses, and asking for the diffusers path says what is missing."""
    import slimdiff.formats.lora as lora_mod

    monkeypatch.setattr(lora_mod, "_peft_available", lambda: False)
    unet, _ = tiny
    model = _compressed(tiny, {})
    assert load_lora_into(model, make_lora(unet)).method == "fuse"
    with pytest.raises(LoraError, match="needs peft"):
        load_lora_into(model, make_lora(unet), method="diffusers")


# --------------------------------------------------------------------------------------------
# (d) bad LoRA files: one error naming the layer
# --------------------------------------------------------------------------------------------
def test_bad_lora_files_raise_one_error_naming_the_layer(tiny):
    unet, _ = tiny
    model = _compressed(tiny, half_ranks(unet))
    good = make_lora(unet)
    path = f"{BLOCK}.attn1.to_q"

    wrong = dict(good)
    wrong[f"unet.{path}.lora_A.weight"] = torch.randn(4, 7)  # to_q takes 32 inputs
    with pytest.raises(
        LoraError, match=rf"{path}: the LoRA's delta is \[32, 7\].*original layer is \[32, 32\]"
    ):
        project_lora(model, wrong)

    wrong = dict(good)
    wrong[f"unet.{path}.lora_B.weight"] = torch.randn(32, 3)  # rank 4 vs 3
    with pytest.raises(LoraError, match=rf"{path}: lora_A has rank 4 but lora_B"):
        project_lora(model, wrong)

    unknown = {**good, f"unet.{BLOCK}.attn1.to_zz.lora_A.weight": torch.randn(4, 32)}
    with pytest.raises(LoraError, match=rf"no layer '{BLOCK}.attn1.to_zz'"):
        project_lora(model, unknown)

    half = {k: v for k, v in good.items() if k != f"unet.{path}.lora_B.weight"}
    with pytest.raises(LoraError, match=rf"{path}: has lora_A \(down\) but not the other"):
        project_lora(model, half)

    # a LoRA made for another base model (text width 32 instead of 24): the cross-attention keys
    other = make_tiny_unet(heads=2, cross_attention_dim=32)
    foreign = make_lora(other)
    with pytest.raises(LoraError, match=rf"{BLOCK}.attn2.to_k: the LoRA's delta is \[32, 32\].*\[32, 24\]"):
        project_lora(model, foreign)


# --------------------------------------------------------------------------------------------
# (e) folders saved without maps
# --------------------------------------------------------------------------------------------
def test_folder_without_maps_gives_a_clear_error(tiny, tmp_path):
    unet, _ = tiny
    model = _compressed(tiny, half_ranks(unet))
    folder = save_compressed(model, tmp_path / "m")
    assert (folder / LORA_MAPS_NAME).is_file()
    assert read_lora_maps(folder).layers  # written and verified

    # an older folder: no maps file, no sidecar entry
    (folder / LORA_MAPS_NAME).unlink()
    sidecar = json.loads((folder / SIDECAR_NAME).read_text())
    sidecar.pop("lora_maps")
    (folder / SIDECAR_NAME).write_text(json.dumps(sidecar))
    loaded = load_compressed(folder)  # still loads as a model
    with pytest.raises(LoraMapsMissingError, match="saved without LoRA maps"):
        project_lora(loaded, make_lora(unet))

    # compressed in memory without maps
    bare = _compressed(tiny, half_ranks(unet), lora_maps=False)
    with pytest.raises(LoraMapsMissingError, match="carries no LoRA maps"):
        project_lora(bare, make_lora(unet))


def test_maps_file_is_covered_by_the_folder_digests(tiny, tmp_path):
    unet, _ = tiny
    model = _compressed(tiny, half_ranks(unet))
    folder = save_compressed(model, tmp_path / "m")
    data = bytearray((folder / LORA_MAPS_NAME).read_bytes())
    data[-1] ^= 1
    (folder / LORA_MAPS_NAME).write_bytes(bytes(data))
    with pytest.raises(CompressedModelError, match="LoRA maps were changed"):
        load_compressed(folder)
    (folder / LORA_MAPS_NAME).unlink()
    with pytest.raises(CompressedModelError, match=f"{LORA_MAPS_NAME} not found"):
        load_compressed(folder)


# --------------------------------------------------------------------------------------------
# (f) unmappable targets are listed in a warning, never silently dropped
# --------------------------------------------------------------------------------------------
def test_unmappable_targets_are_warned(tiny):
    unet, _ = tiny
    model = _compressed(tiny, half_ranks(unet))
    lora = make_lora(unet)
    dora, bias = f"{BLOCK}.attn1.to_v", f"{BLOCK}.ff.net.2"
    lora[f"unet.{dora}.lora_magnitude_vector"] = torch.ones(32)
    lora[f"unet.{bias}.lora_B.bias"] = torch.zeros(32)
    with pytest.warns(UserWarning, match="2 LoRA target") as rec:
        mapped, report = project_lora(model, lora)
    msg = str(rec[0].message)
    assert dora in msg and "DoRA" in msg and bias in msg and "LoRA bias" in msg
    assert set(report.dropped) == {dora, bias}
    assert not any(k.startswith((f"unet.{dora}.", f"unet.{bias}.")) for k in mapped)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean LoRA warns nothing
        project_lora(model, make_lora(unet))


# --------------------------------------------------------------------------------------------
# two token streams (SD3 MMDiT): one per-head map for several linears, ungated FFNs
# --------------------------------------------------------------------------------------------
def joint_attention_case(qk_norm):
    """The tiny SD3 transformer of tests/test_mmdit.py, its covariances from one forward, a
    no-grad forward of it, and LoRA targets covering every map of a joint attention and both
    streams' FFNs."""
    from test_mmdit import inputs, tiny_sd3

    from slimdiff.calibration.collect import ActivationCollector

    model = tiny_sd3(qk_norm=qk_norm)
    x = inputs(model)
    collector = ActivationCollector(model, 1)
    with collector, torch.no_grad():
        model(*x[0], **x[1])
    covs = collector.stats().aggregate([1.0])

    def fwd(m):
        with torch.no_grad():
            return m(*x[0], **x[1]).sample

    attn = "transformer_blocks.0.attn"
    targets = [
        *(f"{attn}.{n}" for n in ("to_q", "add_q_proj", "to_k", "add_k_proj", "to_v", "add_v_proj")),
        f"{attn}.to_out.0",
        f"{attn}.to_add_out",
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.1.ff_context.net.2",
    ]
    return model, covs, fwd, targets


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_full_rank_projection_on_joint_attention(qk_norm, tmp_path):
    """SD3-shaped tiny transformer (3 joint blocks, 2 heads of 8): the QK map of a joint attention
    covers to_q and add_q_proj (and the keys), the VO map to_v / add_v_proj and to_out.0 /
    to_add_out; the FFNs are GELU (rows J of one half). With RMSNorms on q/k the QK map is the
    coordinate selection (one-hot T). Same tolerance and reason as the UNet test (1e-5)."""
    model, covs, fwd, targets = joint_attention_case(qk_norm)
    targets.append("transformer_blocks.2.attn.add_q_proj")  # queries the last block discards: still mapped
    lora = make_lora(model, targets, prefix="transformer")
    ref = fwd(fused_reference(model, lora, prefix="transformer"))
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(compression_units(model), {}), covs, rewrite_full_rank=True)
    mapped, report = project_lora(slim, lora)
    assert set(report.layers) == set(targets)
    assert "identity" not in report.layers.values()
    assert all(k.startswith("transformer.") for k in mapped)
    # the maps survive a save (an ungated FFN's row and column maps share one index)
    again, _ = project_lora(slim, lora, maps=save_compressed(slim, tmp_path / "m"))
    assert all(torch.equal(again[k], mapped[k]) for k in mapped)
    load_lora_into(slim, lora, method="fuse")
    assert relmax(fwd(slim), ref) < 1e-5
    assert relmax(fwd(model), ref) > 1e-2  # the LoRA really changes the output


# --------------------------------------------------------------------------------------------
# pipelines: maps found from the folder diffusers loaded; text-encoder keys pass through
# --------------------------------------------------------------------------------------------
def _tiny_sd_pipeline(unet, tmp_path):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "a": 4, "c": 5, "t": 6}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77),
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_pipeline_loaded_by_diffusers_finds_its_maps(tiny, tmp_path):
    from diffusers import DiffusionPipeline

    import slimdiff  # noqa: F401  (what a loading process needs for the Slim* classes)

    unet, _ = tiny
    model = _compressed(tiny, half_ranks(unet))
    expected, _ = project_lora(model, make_lora(unet))
    save_compressed(_tiny_sd_pipeline(model, tmp_path), tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    lora = {
        **make_lora(unet),
        f"{te}.lora_A.weight": torch.randn(2, 24),
        f"{te}.lora_B.weight": torch.randn(24, 2),
    }
    mapped, report = project_lora(pipe, lora)
    assert report.passthrough == [f"{te}.lora_A.weight", f"{te}.lora_B.weight"]
    for k in expected:  # the maps read from the folder are the ones compress_ recorded
        assert torch.equal(mapped[k], expected[k]), k
    q = pipe.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")  # no text_model level here
    before = q.weight.detach().clone()
    handle = load_lora_into(pipe, lora, method="fuse")
    want = before.to(F64) + lora[f"{te}.lora_B.weight"].to(F64) @ lora[f"{te}.lora_A.weight"].to(F64)
    assert torch.allclose(q.weight.to(F64), want, atol=1e-6)
    handle.unfuse()
    assert torch.equal(q.weight, before)
