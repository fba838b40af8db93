"""save_compressed / load_compressed: bit-identical round trips, tamper detection."""

from __future__ import annotations

import json

import pytest
import torch
from compress_helpers import capture_covariances, run, unet_inputs
from conftest import make_tiny_unet

from slimdiff.families.attention import SlimAttnProcessor
from slimdiff.families.units import compression_units, count_parameters
from slimdiff.formats.io import load_compressed, save_compressed
from slimdiff.formats.sidecar import SIDECAR_NAME, WEIGHTS_NAME, CompressedModelError
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.plan import RankPlan
from slimdiff.surgery.compress import compress_


def compressed_tiny(**cfg):
    unet = make_tiny_unet(**cfg)
    covs = capture_covariances(unet, [unet_inputs(unet, batch=2, size=16, seed=1)])
    units = compression_units(unet)
    plan = plan_ranks(
        {n: float(i % 3) for i, n in enumerate(units)},
        units,
        Budget(removed_fraction=0.5),
        tau=0.7,
        mode="influence",
    )
    compress_(unet, plan, covs)
    return unet, plan


@pytest.mark.parametrize("cfg", [dict(heads=2), dict(heads=4, transformer_layers_per_block=2)])
def test_roundtrip_is_bit_identical(tmp_path, cfg):
    unet, plan = compressed_tiny(**cfg)
    x = unet_inputs(unet, seed=5)
    ref = run(unet, x)
    save_compressed(unet, tmp_path / "m")
    sidecar = json.loads((tmp_path / "m" / SIDECAR_NAME).read_text())
    assert sidecar["plan_digest"] == plan.digest
    assert sidecar["format_version"] == 2
    assert len(sidecar["weights_sha256"]) == 64
    assert set(sidecar["tensors"]) == set(unet.state_dict())
    loaded = load_compressed(tmp_path / "m")
    assert count_parameters(loaded) == count_parameters(unet)
    assert torch.equal(run(loaded, x), ref)
    for name, proc in unet.attn_processors.items():
        assert type(loaded.attn_processors[name]) is type(proc), name
        if isinstance(proc, SlimAttnProcessor):
            assert loaded.attn_processors[name].scale == proc.scale
    assert loaded.slimdiff_plan == plan


def test_save_needs_a_plan(tmp_path):
    with pytest.raises(CompressedModelError, match="no rank plan"):
        save_compressed(make_tiny_unet(), tmp_path / "m")


@pytest.fixture
def saved(tmp_path):
    unet, plan = compressed_tiny(heads=2)
    save_compressed(unet, tmp_path / "m")
    return tmp_path / "m", plan


def _edit_sidecar(folder, fn):
    path = folder / SIDECAR_NAME
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_config_plan(folder, fn):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    fn(data["slimdiff"])
    path.write_text(json.dumps(data))


def test_tampered_plan_rejected(saved):
    folder, plan = saved
    name, unit = next(iter(plan.compressed_units().items()))

    def bump(d):
        u = d["plan"]["units"][name]
        u["rank"] = u["rank"] + 8 if u["rank"] + 8 <= u["full_rank"] else u["rank"] - 8
        u["params_after"] = u["rank"] * u["cost_per_rank"]
        d["plan"]["totals"]["params_after"] = sum(x["params_after"] for x in d["plan"]["units"].values())

    _edit_sidecar(folder, bump)
    with pytest.raises(CompressedModelError, match="digest"):
        load_compressed(folder)


def test_tampered_plan_with_forged_digest_rejected_by_shapes(saved):
    """Even with the digest recomputed, wrong ranks cannot load: the shapes disagree."""
    folder, plan = saved
    name, unit = next(iter(plan.compressed_units().items()))
    units = dict(plan.units)
    new_rank = unit.rank + 8 if unit.rank + 8 <= unit.full_rank else unit.rank - 8
    forged = RankPlan.from_ranks(compression_units(make_tiny_unet(heads=2)), {**plan.ranks(), name: new_rank})
    assert forged.units.keys() == units.keys()

    def forge(d):
        d["plan"] = forged.to_dict()
        d["plan_digest"] = forged.digest

    _edit_sidecar(folder, forge)
    _edit_config_plan(folder, forge)  # config.json carries the plan too: forge both, consistently
    with pytest.raises(CompressedModelError, match=r"has shape .* \(wrong ranks\?\)"):
        load_compressed(folder)


def test_plan_that_does_not_fit_config_rejected(saved):
    folder, plan = saved
    other = RankPlan.from_ranks(compression_units(make_tiny_unet(heads=1)), {})

    def swap(d):
        d["plan"] = other.to_dict()
        d["plan_digest"] = other.digest

    _edit_sidecar(folder, swap)
    _edit_config_plan(folder, swap)
    with pytest.raises(CompressedModelError, match="does not fit config.json: .*attn1.qk: plan says"):
        load_compressed(folder)


def test_changed_weights_rejected(saved):
    folder, _ = saved
    weights = folder / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CompressedModelError, match="sha256"):
        load_compressed(folder)


def test_missing_or_foreign_sidecar_rejected(saved, tmp_path):
    folder, _ = saved
    _edit_sidecar(folder, lambda d: d.update(format_version=7))
    with pytest.raises(CompressedModelError, match="format_version 7"):
        load_compressed(folder)
    (folder / SIDECAR_NAME).unlink()
    with pytest.raises(
        CompressedModelError, match="slimdiff.json not found: the weights .* cannot be verified"
    ):
        load_compressed(folder)


def test_pipeline_roundtrip(tmp_path):
    """A tiny StableDiffusionPipeline: the whole pipeline is saved, the UNet is rebuilt compressed,
    and the loaded pipeline's UNet is bit-identical."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet, plan = compressed_tiny(heads=2)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "a": 4, "c": 5, "t": 6}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
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
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_compressed(pipe, tmp_path / "pipe", extra={"lineage": {"stats_digest": "abc"}})
    assert (tmp_path / "pipe" / "unet" / SIDECAR_NAME).is_file()
    top = json.loads((tmp_path / "pipe" / SIDECAR_NAME).read_text())
    assert top["kind"] == "pipeline" and top["plan_digest"] == plan.digest
    assert top["extra"]["lineage"]["stats_digest"] == "abc"
    loaded = load_compressed(tmp_path / "pipe")
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    x = unet_inputs(unet, seed=2)
    assert torch.equal(run(loaded.unet, x), run(unet, x))
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="np")
    out = loaded("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    ref = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == (1, 16, 16, 3)
    assert (out == ref).all()
