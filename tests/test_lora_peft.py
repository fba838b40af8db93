"""slimdiff.formats.lora through diffusers' own LoRA loader (peft): the path ``load_lora_into`` takes by
default wherever peft is installed, i.e. for most users. The projected LoRA is loaded as a peft
adapter on the compressed layers (their shapes, their names) and must give what the fused path
gives: the same delta, only computed unfused (x W^T + s (x A^T) B^T in fp32 instead of the float64
sum W + s B A rounded once to fp32). Tolerance: 1e-5 relative to the output's largest entry (both
are fp32 evaluations of one product; measured ~1e-7), while the LoRA's own effect is ~1e-1.
Tiny models built from config (the UNet and SD3 shapes of tests/test_lora.py), fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_helpers import run, unet_inputs
from test_lora import (
    TARGETS,
    _compressed,
    _tiny_sd_pipeline,
    half_ranks,
    joint_attention_case,
    make_lora,
    relmax,
    tiny,  # noqa: F401  (the module fixture)
)

from slimdiff.families.units import compression_units
from slimdiff.formats.io import save_compressed
from slimdiff.formats.lora import load_lora_into, project_lora
from slimdiff.planning.plan import RankPlan
from slimdiff.surgery.compress import compress_

pytest.importorskip("peft")
TOL = 1e-5


def test_auto_loads_through_peft_and_matches_the_fused_path(tiny):  # noqa: F811
    unet, _ = tiny
    fused = _compressed(tiny, half_ranks(unet))
    adapted = copy.deepcopy(fused)
    lora = make_lora(unet)
    x = unet_inputs(unet, seed=5)
    base = run(adapted, x)

    load_lora_into(fused, lora, method="fuse")
    want = run(fused, x)
    handle = load_lora_into(adapted, lora)  # auto: peft is importable
    assert handle.method == "diffusers"
    # the adapter sits on the compressed layers, under the stock names
    layer = adapted.get_submodule(TARGETS[0])
    assert (
        hasattr(layer, "lora_A") and layer.lora_B["default"].weight.shape[0] == layer.base_layer.out_features
    )
    got = run(adapted, x)
    assert relmax(want, base) > 1e-2  # the LoRA really changes the output
    assert relmax(got, want) < TOL, relmax(got, want)

    handle.unfuse()  # deletes the adapter: the compressed model's own output, bit for bit
    assert torch.equal(run(adapted, x), base)


def test_adapter_scale_matches_fused_scale(tiny):  # noqa: F811
    unet, _ = tiny
    fused = _compressed(tiny, half_ranks(unet))
    adapted = copy.deepcopy(fused)
    lora = make_lora(unet, seed=3)
    x = unet_inputs(unet, seed=6)
    load_lora_into(fused, lora, method="fuse", scale=0.5)
    load_lora_into(adapted, lora, method="diffusers", scale=0.5)
    assert relmax(run(adapted, x), run(fused, x)) < TOL


def test_pipeline_load_lora_weights_on_a_folder_diffusers_loaded(tiny, tmp_path):  # noqa: F811
    """The user's path end to end: a compressed folder loaded by DiffusionPipeline.from_pretrained,
    a LoRA made for the original, ``load_lora_into(pipe, ...)`` -> ``pipe.load_lora_weights``; the
    UNet then computes what the fused projection computes, and a second adapter can be switched
    in and out as diffusers users do."""
    from diffusers import DiffusionPipeline

    import slimdiff  # noqa: F401

    unet, _ = tiny
    model = _compressed(tiny, half_ranks(unet))
    save_compressed(_tiny_sd_pipeline(model, tmp_path), tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    ref = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    x = unet_inputs(unet, seed=7)
    base = run(pipe.unet, x)

    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"  # passes through unprojected
    g = torch.Generator().manual_seed(4)
    first = {
        **make_lora(unet, seed=1),
        f"{te}.lora_A.weight": torch.randn(2, 24, generator=g),
        f"{te}.lora_B.weight": torch.randn(24, 2, generator=g),
    }
    second = make_lora(unet, seed=2)
    ids = pipe.tokenizer(["a cat"], return_tensors="pt").input_ids
    with torch.no_grad():
        te_base = pipe.text_encoder(ids)[0]
    load_lora_into(ref, first, method="fuse")
    want_first = run(ref.unet, x)
    h1 = load_lora_into(pipe, first, adapter_name="first")
    assert h1.method == "diffusers"
    assert relmax(run(pipe.unet, x), want_first) < TOL
    with torch.no_grad():
        te_want, te_got = ref.text_encoder(ids)[0], pipe.text_encoder(ids)[0]
    assert relmax(te_want, te_base) > 1e-2
    assert relmax(te_got, te_want) < TOL

    load_lora_into(pipe, second, adapter_name="second")
    pipe.set_adapters(["second"])
    ref2 = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    load_lora_into(ref2, second, method="fuse")
    assert relmax(run(pipe.unet, x), run(ref2.unet, x)) < TOL
    pipe.set_adapters(["first"])
    assert relmax(run(pipe.unet, x), want_first) < TOL
    pipe.disable_lora()
    assert relmax(run(pipe.unet, x), base) == 0.0


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_peft_adapter_on_compressed_joint_attention(qk_norm):
    """SD3-shaped tiny transformer at half rank: peft adapters on to_q / add_q_proj ... of the
    compressed joint attention (narrower q/k/v widths, per-head norms at the kept width) give the
    fused projection's output."""
    model, covs, fwd, targets = joint_attention_case(qk_norm)
    lora = make_lora(model, targets, prefix="transformer")
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(compression_units(model), half_ranks(model)), covs)
    mapped, report = project_lora(slim, lora)
    assert "identity" not in report.layers.values()
    fused, adapted = copy.deepcopy(slim), copy.deepcopy(slim)
    load_lora_into(fused, lora, method="fuse")
    handle = load_lora_into(adapted, lora)
    assert handle.method == "diffusers"
    want = fwd(fused)
    assert relmax(want, fwd(slim)) > 1e-2
    assert relmax(fwd(adapted), want) < TOL
