"""The toy world's new color (slimdiff.toy.newcolor) and the committed toy LoRA (data/toy/lora):
the measurement rule on rendered ground truth, and known answers for the LoRA on the committed
toy UNet (benchmarks/bench_lora.py measures its quality on compressed models)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slimdiff.toy import data as d
from slimdiff.toy import newcolor as nc

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# the new color: captions, rendering, the measurement rule
# --------------------------------------------------------------------------------------------
def test_new_captions_split_and_parse():
    assert len(nc.new_single_captions()) == 15 and len(nc.new_two_captions()) == 312
    held, train = nc.heldout_new_captions(), nc.train_new_captions()
    assert (len(nc.heldout_new_captions("single")), len(nc.heldout_new_captions("two"))) == (4, 78)
    assert not set(held) & set(train)
    assert set(held) | set(train) == {*nc.new_single_captions(), *nc.new_two_captions()}
    assert all(nc.NEW_COLOR in c for c in held + train)
    # no new-color caption is a toy-world caption, and toy captions parse the same way
    assert not set(held + train) & {*d.all_single_captions(), *d.all_two_captions()}
    for c in d.heldout_captions():
        assert nc.parse_new_caption(c) == d.parse_caption(c)
    assert nc.parse_new_caption(f"a {nc.NEW_COLOR} square below a red circle") == (
        d.SceneObject(nc.NEW_COLOR, "square", "bottom"),
        d.SceneObject("red", "circle", "top"),
    )
    with pytest.raises(ValueError, match="not a caption"):
        nc.parse_new_caption(f"a {nc.NEW_COLOR} circle above a {nc.NEW_COLOR} circle")


def test_extended_palette_leaves_the_data_set_unchanged():
    """The renderer's palette parameter draws the same random numbers: toy captions render
    identically with the default and the extended palette."""
    caps = d.heldout_captions()[:20]
    a = np.stack([d.render(c, r) for r in [np.random.default_rng(3)] for c in caps])
    b = nc.render_many(caps, seed=3)
    np.testing.assert_array_equal(a, b)
    assert nc.NEW_COLOR not in d.COLORS and d.NUM_SLOT_CLASSES == 13


def test_rule_reads_new_color_renders_and_not_their_neighbours():
    """Accuracy 1.0 on renders of the held-out new-color captions; 0.0 on the same captions and
    draws rendered in red or yellow (the palette colors nearest to the new one)."""
    caps = nc.heldout_new_captions()
    v = nc.measurement_validity(caps, seed=11)
    assert v["new_color_renders"] == {"color": 1.0, "color_shape": 1.0, "exact": 1.0, "n": len(caps)}
    for other in ("red_renders", "yellow_renders"):
        assert v[other]["color"] == 0.0 and v[other]["exact"] == 0.0
    # the rule reads each slot's own color: red where red was rendered
    image = nc.render_many([f"a {nc.NEW_COLOR} circle above a red square"], seed=0)
    assert nc.slot_colors(image, "top") == [nc.NEW_COLOR]
    assert nc.slot_colors(image, "bottom") == ["red"]
    image = nc.render_many([f"a {nc.NEW_COLOR} square on the left"], seed=0)
    assert nc.slot_colors(image, "left") == [nc.NEW_COLOR]
    assert nc.slot_colors(image, "right") == [None]  # windows of opposite slots do not overlap
    # toy captions: every object of a render reads its color (captions without the new color)
    caps = d.heldout_captions()
    assert nc.new_color_accuracy(nc.render_many(caps, seed=2), caps)["exact"] == 1.0


# --------------------------------------------------------------------------------------------
# the committed LoRA
# --------------------------------------------------------------------------------------------
def _lora_path():
    from slimdiff.toy import toy_data_dir

    return toy_data_dir() / "lora" / "orange.safetensors"


@pytest.fixture(scope="module")
def toy():
    path = _lora_path()
    if not path.is_file():
        pytest.skip(f"{path} is not committed")
    from slimdiff.formats.lora import load_lora_file
    from slimdiff.toy import load_toy_pipeline

    pipe = load_toy_pipeline()
    state, meta = load_lora_file(path)
    # fp32 values of the fp16 file (project_lora would give fp32 factors for the fp32 model
    # anyway; the independent references below then read the same values)
    lora = {k: v.float() for k, v in state.items()}
    return pipe, lora, meta


def _inputs(pipe, seed: int, captions: list[str]):
    """Latents, timesteps and the frozen text encoder's states of real captions."""
    g = torch.Generator().manual_seed(seed)
    n = len(captions)
    sample = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.linspace(50, 950, n).round().long()
    tok = pipe.tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        text = pipe.text_encoder(tok.input_ids)[0]
    return sample, t, text


def _run(unet, x) -> torch.Tensor:
    with torch.no_grad():
        return unet(*x).sample


def _relmax(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _reference(unet, lora, prefix: str = "unet"):
    """original + LoRA fused independently of slimdiff.formats.lora: W + B A in float64 (scale 1)."""
    ref = copy.deepcopy(unet)
    with torch.no_grad():
        for key, a in lora.items():
            if key.endswith(".lora_A.weight"):
                path = key[len(prefix) + 1 : -len(".lora_A.weight")]
                b = lora[f"{prefix}.{path}.lora_B.weight"]
                lin = ref.get_submodule(path)
                lin.weight.copy_((lin.weight.to(F64) + b.to(F64) @ a.to(F64)).float())
    return ref


def test_committed_lora_is_small_peft_format_and_changes_the_original(toy):
    from slimdiff.formats.lora import load_lora_into

    pipe, lora, meta = toy
    assert _lora_path().stat().st_size < 200_000
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)
    assert '"unet.lora_alpha"' in meta["lora_adapter_metadata"]  # scale alpha / r = 1
    kinds = {k.split(".transformer_blocks.")[1].split(".", 1)[1].rsplit(".lora_", 1)[0] for k in lora}
    assert kinds == {
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
        "ff.net.0.proj", "ff.net.2",
    }  # fmt: skip
    unet = pipe.unet
    x = _inputs(pipe, 0, [f"a {nc.NEW_COLOR} circle on the left", "a red square above a blue circle"])
    base, ref = _run(unet, x), _run(_reference(unet, lora), x)
    model = copy.deepcopy(unet)
    handle = load_lora_into(model, lora, method="fuse")
    assert set(handle.report.layers.values()) == {"identity"}  # the original: nothing to map
    out = _run(model, x)
    assert _relmax(out, base) > 1e-2  # the LoRA changes the prediction
    assert _relmax(out, ref) < 1e-6  # and is exactly W + B A
    handle.unfuse()
    assert torch.equal(_run(model, x), base)


def test_full_rank_projection_of_the_committed_lora_reproduces_original_plus_lora(toy):
    """Every unit of the toy UNet rewritten at full rank (rewrite_full_rank: whitening maps T, S,
    M that compose to the identity in exact arithmetic), with statistics of real captions: the
    compressed model with the projected LoRA computes original + LoRA. Tolerance 1e-5 relative to
    the output's max |value| (fp32); the rewrite of the base model alone is held to the same.
    Measured: 1.9e-7 for both; the unprojected B A added to the rewritten weights is 4e-2 off,
    about the LoRA's own effect (5e-2)."""
    from compress_helpers import capture_covariances

    from slimdiff.families.units import compression_units
    from slimdiff.formats.lora import load_lora_into
    from slimdiff.planning.plan import RankPlan
    from slimdiff.surgery.compress import compress_

    pipe, lora, _ = toy
    unet = pipe.unet
    calib = [_inputs(pipe, s, list(d.train_captions()[s * 8 : s * 8 + 8])) for s in range(3)]
    covs = capture_covariances(unet, calib)
    model = copy.deepcopy(unet)
    compress_(model, RankPlan.from_ranks(compression_units(unet), {}), covs, rewrite_full_rank=True)
    x = _inputs(pipe, 9, [f"a {nc.NEW_COLOR} triangle at the top", "a green circle below a yellow square"])
    base, ref = _run(unet, x), _run(_reference(unet, lora), x)
    assert _relmax(_run(model, x), base) < 1e-5  # the rewrite alone
    naive = _reference(model, lora)  # B A on the rewritten layers, not projected: wrong
    assert _relmax(_run(naive, x), ref) > 1e-2
    handle = load_lora_into(model, lora, method="fuse")
    kinds = set(handle.report.layers.values())
    assert {"rows_heads", "cols_heads", "rows_index", "cols_nystrom"} <= kinds
    assert _relmax(_run(model, x), ref) < 1e-5
    assert _relmax(ref, base) > 1e-2


def test_committed_lora_draws_the_new_color_on_the_original():
    """Sampled with the evaluation's sampler settings: the four held-out single-object captions
    read the new color with the LoRA, and never without it."""
    path = _lora_path()
    if not path.is_file():
        pytest.skip(f"{path} is not committed")
    from slimdiff.formats.lora import load_lora_into
    from slimdiff.toy import load_toy_pipeline
    from slimdiff.toy.evaluate import sample_images

    pipe = load_toy_pipeline()
    caps = nc.heldout_new_captions("single")
    before = nc.new_color_accuracy(sample_images(pipe, caps, seed=1234), caps)
    handle = load_lora_into(pipe, path, method="fuse")
    after = nc.new_color_accuracy(sample_images(pipe, caps, seed=1234), caps)
    handle.unfuse()
    assert before["color"] == 0.0
    assert after["color"] >= 0.75, after


# --------------------------------------------------------------------------------------------
# the committed MMDiT LoRA (data/toy-mmdit/lora, benchmarks/bench_lora.py --source toy-mmdit)
# --------------------------------------------------------------------------------------------
def _mmdit_lora_path():
    from slimdiff.formats.models import toy_mmdit_pipeline_dir

    return toy_mmdit_pipeline_dir().parent / "lora" / "orange.safetensors"


@pytest.fixture(scope="module")
def toy_mmdit():
    path = _mmdit_lora_path()
    if not path.is_file():
        pytest.skip(f"{path} is not committed")
    from slimdiff.formats.lora import load_lora_file
    from slimdiff.formats.models import load_pipeline

    pipe = load_pipeline("toy-mmdit")
    state, meta = load_lora_file(path)
    return pipe, {k: v.float() for k, v in state.items()}, meta


def _mmdit_inputs(pipe, seed: int, captions: list[str]):
    """The transformer's inputs as the pipeline builds them: latents, both frozen CLIPs' states
    zero-padded to joint_attention_dim with the 256 zero T5 tokens appended, pooled embeddings,
    timesteps (1000 sigma)."""
    from slimdiff.toy.mmdit import encode_prompt_ids

    g = torch.Generator().manual_seed(seed)
    n = len(captions)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    tok = pipe.tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states, pooled = encode_prompt_ids(
            pipe.text_encoder, pipe.text_encoder_2, tok.input_ids, pipe.transformer.config.joint_attention_dim
        )
    states = torch.cat([states, states.new_zeros(n, 256, states.shape[-1])], dim=1)
    return latents, states, pooled, torch.linspace(50, 950, n)


def _mmdit_run(transformer, x) -> torch.Tensor:
    with torch.no_grad():
        return transformer(*x).sample


def test_committed_mmdit_lora_is_small_and_targets_every_rewritten_linear(toy_mmdit):
    pipe, lora, meta = toy_mmdit
    assert _mmdit_lora_path().stat().st_size < 200_000
    assert all(k.startswith("transformer.transformer_blocks.") for k in lora)
    assert '"transformer.lora_alpha"' in meta["lora_adapter_metadata"]  # scale alpha / r = 1
    blocks = pipe.transformer.transformer_blocks
    want = set()
    for i, block in enumerate(blocks):
        names = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"]
        names += ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
        if not block.context_pre_only:
            names += ["attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"]
        if block.attn2 is not None:
            names += ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
        want |= {f"transformer_blocks.{i}.{n}" for n in names}
    got = {k[len("transformer.") :].rsplit(".lora_", 1)[0] for k in lora}
    assert got == want


def test_full_rank_projection_of_the_committed_mmdit_lora_reproduces_original_plus_lora(toy_mmdit):
    """The toy MMDiT with every unit rewritten at full rank (rewrite_full_rank; QK under the q/k
    RMSNorms by the default coordinate selection, whose full-rank norm correction is 1), with
    statistics of real captions: with the projected LoRA it computes original + LoRA. Tolerance
    1e-5 relative to the output's max |value| (fp32), the rewrite of the base model alone held to
    the same. Measured: 3.5e-6 for the rewrite, 2.4e-6 with the projected LoRA; the LoRA's own
    effect is 0.10 and the unprojected B A added to the rewritten weights is 0.17 off."""
    from slimdiff.calibration.collect import ActivationCollector
    from slimdiff.families.units import compression_units
    from slimdiff.formats.lora import load_lora_into
    from slimdiff.planning.plan import RankPlan
    from slimdiff.surgery.compress import compress_

    pipe, lora, _ = toy_mmdit
    tr = pipe.transformer
    collector = ActivationCollector(tr, 1)
    with collector, torch.no_grad():
        for s in range(2):
            tr(*_mmdit_inputs(pipe, s, list(d.train_captions()[s * 8 : s * 8 + 8])))
    covs = collector.stats().aggregate([1.0])
    model = copy.deepcopy(tr)
    compress_(model, RankPlan.from_ranks(compression_units(tr), {}), covs, rewrite_full_rank=True)
    x = _mmdit_inputs(
        pipe, 9, [f"a {nc.NEW_COLOR} triangle at the top", "a green circle below a yellow square"]
    )
    base, ref = _mmdit_run(tr, x), _mmdit_run(_reference(tr, lora, "transformer"), x)
    assert _relmax(_mmdit_run(model, x), base) < 1e-5  # the rewrite alone
    assert _relmax(ref, base) > 1e-2  # the LoRA changes the prediction
    naive = _reference(model, lora, "transformer")  # B A on the rewritten layers, not projected: wrong
    assert _relmax(_mmdit_run(naive, x), ref) > 1e-2
    handle = load_lora_into(model, lora, method="fuse")
    assert not handle.report.dropped
    assert {"rows_heads", "cols_heads", "rows_index", "cols_nystrom"} <= set(handle.report.layers.values())
    assert _relmax(_mmdit_run(model, x), ref) < 1e-5
    handle.unfuse()
    assert _relmax(_mmdit_run(model, x), base) < 1e-5
