"""FLUX.2 (``Flux2Transformer2DModel``): the adapter (double blocks compressed, single blocks left
whole), the packed SwiGLU FFN, RoPE pair selection with text positions, the compressed processor,
the plan's parameter count and FLOPs, statistics through a tiny ``Flux2KleinPipeline``'s own
sampler, save / load, and the refusal of other variants; on the tiny models of flux2_pipelines.py
(random weights, fixed seeds).

References and tolerances:
* rotary angles against the RoPE formula written out here (4 axes of 4 coordinates, theta 2000,
  image (0, row, column, 0), text (0, 0, 0, j)): the model's tables are float32, so 1e-5 rad;
* the compressed processor with nothing compressed, a full-rank rewrite, and selections that drop
  only pairs / neurons carrying nothing (zeroed q/k rows, zeroed up rows), against the original in
  float32: exact maths, so the tolerance is float32 rounding through 4 blocks (1e-5 relative; the
  processor swap alone reorders nothing but the SDPA layout: 1e-6);
* a global position shift (every id moved by one offset) leaves the logits unchanged in exact
  arithmetic; the tables are float32, so 1e-5 relative;
* statistics against grams of the hooked activations (float32 products summed in float64: 1e-6
  of the largest entry), token counts exactly;
* parameter counts, FLOPs, kept indices and saved / loaded latents exactly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from flux2_pipelines import FLUX2_HW, FLUX2_TEXT_LEN, tiny_flux2_transformer
from torch import nn

from slimdiff.calibration.collect import ActivationCollector
from slimdiff.families import UnsupportedModelError, adapter_for
from slimdiff.families.flux2 import SlimFlux2AttnProcessor
from slimdiff.families.units import compression_units, count_parameters
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import ServingShape, denoiser_flops, unit_flop_costs
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import apply_plan_shapes_, compress_

HW, TEXT = (8, 8), 6  # latent 8x8 -> 4x4 = 16 packed image tokens, 6 text tokens
N_IMG, D_H, INNER = 16, 16, 96
DOUBLE = ("transformer_blocks.0", "transformer_blocks.1")


def inputs(model, seed: int, batch: int = 2):
    return adapter_for(model).example_inputs(
        model, batch, HW, TEXT, device="cpu", generator=torch.Generator().manual_seed(seed)
    )


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(*x[0], **x[1]).sample


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def collect(model, xs) -> ActivationCollector:
    col = ActivationCollector(model, 1)
    with col:
        for x in xs:
            run(model, x)
    return col


def covariances(model, n: int = 4) -> dict[str, torch.Tensor]:
    return collect(model, [inputs(model, 100 + i) for i in range(n)]).stats().aggregate([1.0])


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_flux2_transformer()
    return model, covariances(model)


def ranks(units, **by_kind: int) -> RankPlan:
    return RankPlan.from_ranks(units, {n: by_kind.get(u.kind, u.full_rank) for n, u in units.items()})


# -- the adapter -----------------------------------------------------------------------------------
def test_units_layouts_and_costs():
    """Units of the double blocks only (the single blocks' fused q | k | v | gate | up projection is
    left whole); the FFNs are gated layouts of the packed linear_in; no biases anywhere (FLUX.2)."""
    model = tiny_flux2_transformer()
    adapter = adapter_for(model)
    assert adapter.family.startswith("FLUX.2")
    units = compression_units(model)
    assert {n: u.kind for n, u in units.items()} == {
        **{f"{b}.{s}": "ffn" for b in DOUBLE for s in ("ff", "ff_context")},
        **{f"{b}.attn.{k}": k for b in DOUBLE for k in ("qk", "vo")},
    }
    ff = units["transformer_blocks.0.ff_context"].layout
    assert (ff.proj_in, ff.proj_out, ff.gated, ff.stream) == (
        "transformer_blocks.0.ff_context.linear_in",
        "transformer_blocks.0.ff_context.linear_out",
        True,
        "text",
    )
    qk = units["transformer_blocks.1.attn.qk"].layout
    assert qk.rope and not qk.norms_head_major and qk.heads == 2 and qk.head_dim == D_H
    assert qk.query == ("transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.add_q_proj")
    assert qk.out == ("transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.attn.to_add_out")
    # dim 32, 2 heads x 16: QK = a head's rows of 4 linears; VO = rows of 2 value linears and columns
    # of 2 out linears; FFN = a neuron's gate row + up row (32 each) + a column of linear_out
    assert units["transformer_blocks.0.attn.qk"].cost_per_rank == 2 * 4 * 32
    assert units["transformer_blocks.0.attn.vo"].cost_per_rank == 2 * (2 * 32 + 2 * 32)
    assert units["transformer_blocks.0.ff"].cost_per_rank == 2 * 32 + 32
    assert units["transformer_blocks.0.ff"].full_rank == INNER
    assert not any("single" in s.module for s in adapter.stat_sites(model))


def test_rope_angles_are_the_models_image_and_text_positions():
    """Image token (row, column) at (0, row, column, 0), text token j at (0, 0, 0, j): angles from
    the model's own ``pos_embed`` against the formula; default serving shape 128 x 128 latents and
    512 text tokens."""
    model = tiny_flux2_transformer()
    adapter = adapter_for(model)
    h, w = 6, 8  # latent grid -> 3 x 4 packed patches
    angles = adapter.rope_angles(model, (h, w), 5)  # [text; image]
    freq = 2000.0 ** (-torch.arange(0, 4, 2, dtype=torch.float64) / 4)  # one axis: 2 pairs

    def angle(t, r, c, j):
        return torch.cat([t * freq, r * freq, c * freq, j * freq])

    ref = torch.stack(
        [angle(0, 0, 0, j) for j in range(5)]
        + [angle(0, r, c, 0) for r in range(h // 2) for c in range(w // 2)]
    )
    assert angles.shape == (5 + 12, 8)
    diff = torch.remainder(angles - ref + math.pi, 2 * math.pi) - math.pi  # angles are mod 2 pi
    assert diff.abs().max() < 1e-5
    assert adapter.sample_size(model) == (128, 128)
    assert adapter.rope_angles(model).shape == (512 + 64 * 64, 8)


def test_slim_processor_reproduces_the_stock_processor():
    """Nothing compressed: SlimFlux2AttnProcessor on the stock layers equals Flux2AttnProcessor; the
    reference-image KV cache is refused, not ignored."""
    model = tiny_flux2_transformer(seed=1)
    x = inputs(model, 2)
    ref = run(model, x)
    slim = copy.deepcopy(model)
    for block in slim.transformer_blocks:
        block.attn.set_processor(SlimFlux2AttnProcessor(scale=D_H**-0.5))
    assert rel(run(slim, x), ref) < 1e-6
    with pytest.raises(UnsupportedModelError, match="KV cache"):
        run(slim, (x[0], {**x[1], "joint_attention_kwargs": {"kv_cache_mode": "cached"}}))


# -- statistics ---------------------------------------------------------------------------------------
def test_statistics_are_the_grams_of_the_hooked_activations():
    """FFN: the input of linear_out (silu(gate) * up); QK: both streams' key outputs per head and the
    image / text query norms' outputs ((B, N, heads, d_h)); VO: both out linears' inputs. Every
    double-block statistic counts all image and text tokens."""
    model = tiny_flux2_transformer(seed=2)
    x = inputs(model, 11)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    block = model.transformer_blocks[1]
    for path in ("ff_context.linear_out", "attn.to_add_out", "attn.to_out.0"):
        handles.append(
            block.get_submodule(path).register_forward_pre_hook(lambda m, a, p=path: seen.setdefault(p, a[0]))
        )
    for path in ("attn.to_k", "attn.add_k_proj", "attn.norm_q", "attn.norm_added_q"):
        handles.append(
            block.get_submodule(path).register_forward_hook(lambda m, a, o, p=path: seen.setdefault(p, o))
        )
    stats = collect(model, [x]).stats()
    for h in handles:
        h.remove()
    n_img, n_text = 2 * N_IMG, 2 * TEXT
    tokens = {k: int(v.sum()) for k, v in stats.tokens.items()}
    for b in DOUBLE:
        assert tokens[f"{b}.ff.hidden"] == n_img and tokens[f"{b}.ff_context.hidden"] == n_text
        for which in ("query", "key", "query_normed", "key_normed", "attnout"):
            assert tokens[f"{b}.attn.{which}"] == n_img + n_text

    def head_gram(a: torch.Tensor) -> torch.Tensor:  # (..., 2 * 16) -> (2, 16, 16)
        a = a.double().reshape(-1, 2, D_H)
        return torch.einsum("mhd,mhe->hde", a, a)

    def close(key: str, ref: torch.Tensor) -> None:
        got = stats.moments[f"transformer_blocks.1.{key}"][0]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))

    hidden = seen["ff_context.linear_out"].double().flatten(0, 1)
    close("ff_context.hidden", hidden.T @ hidden)
    close("attn.key", head_gram(seen["attn.to_k"]) + head_gram(seen["attn.add_k_proj"]))
    close("attn.attnout", head_gram(seen["attn.to_out.0"]) + head_gram(seen["attn.to_add_out"]))
    assert seen["attn.norm_added_q"].shape == (2, TEXT, 2, D_H)
    close("attn.query_normed", head_gram(seen["attn.norm_q"]) + head_gram(seen["attn.norm_added_q"]))


# -- full rank, known answers, parameter count ---------------------------------------------------------
def test_full_rank_rewrite_reproduces_the_original(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, ranks(units), cov, rewrite_full_rank=True)
    assert type(slim.transformer_blocks[0].attn.processor) is SlimFlux2AttnProcessor
    assert slim.transformer_blocks[0].attn.slim_rope_index.shape == (2, D_H)
    assert type(slim.single_transformer_blocks[0].attn.processor).__name__ == "Flux2ParallelSelfAttnProcessor"
    x = inputs(model, 3)
    assert rel(run(slim, x), run(model, x)) < 1e-5


def zero_pairs(model: nn.Module, dropped: dict[int, list[int]]) -> nn.Module:
    """Zero the q/k rows of the given rotary pairs of every head, in both streams' projections of
    every double block: those pairs carry no logit, so dropping exactly them is exact."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.transformer_blocks:
            for lin in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                layer = getattr(block.attn, lin)
                for h, pairs in dropped.items():
                    for p in pairs:
                        layer.weight[h * D_H + 2 * p : h * D_H + 2 * p + 2] = 0.0
    return model


def test_pairs_that_carry_nothing_are_dropped_and_the_output_is_unchanged():
    """Known answer: pairs {1, 4, 6} (head 0) and {0, 2, 7} (head 1) zeroed; a QK rank of 10 (5 of 8
    pairs) keeps the other pairs, and with the norms' scale corrected the compressed model equals
    the original."""
    model = zero_pairs(tiny_flux2_transformer(seed=3), {0: [1, 4, 6], 1: [0, 2, 7]})
    cov = covariances(model)
    slim = copy.deepcopy(model)
    compress_(slim, ranks(compression_units(model), qk=10), cov)
    for block in slim.transformer_blocks:
        idx = block.attn.slim_rope_index
        assert idx[0].tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 14, 15]
        assert idx[1].tolist() == [2, 3, 6, 7, 8, 9, 10, 11, 12, 13]
        assert block.attn.to_k.out_features == block.attn.add_q_proj.out_features == 2 * 10
    x = inputs(model, 5)
    assert rel(run(slim, x), run(model, x)) < 1e-5


def test_packed_swiglu_keeps_both_rows_of_a_neuron():
    """Known answer for the packed SwiGLU: neurons whose up row (second half of linear_in) is zero
    output nothing; an FFN rank of 96 - 20 drops exactly them, keeps row j of the gate half and row
    j of the up half of every other neuron (the generic gated rule), and the output is unchanged."""
    model = tiny_flux2_transformer(seed=4)
    dead = torch.randperm(INNER, generator=torch.Generator().manual_seed(0))[:20]
    with torch.no_grad():
        for block in model.transformer_blocks:
            for ff in (block.ff, block.ff_context):
                ff.linear_in.weight[INNER + dead] = 0.0
    cov = covariances(model)
    slim = copy.deepcopy(model)
    compress_(slim, ranks(compression_units(model), ffn=INNER - 20), cov)
    alive = sorted(set(range(INNER)) - set(dead.tolist()))
    for old, new in zip(model.transformer_blocks, slim.transformer_blocks, strict=True):
        for name in ("ff", "ff_context"):
            w_old, w_new = getattr(old, name).linear_in.weight, getattr(new, name).linear_in.weight
            assert w_new.shape == (2 * (INNER - 20), 32)
            # the kept neurons (in the rewrite's order) are the live ones, paired in both halves
            order = [int((w_old[:INNER] == w_new[k]).all(1).nonzero()) for k in range(INNER - 20)]
            assert sorted(order) == alive
            assert torch.equal(w_new[INNER - 20 :], w_old[INNER + torch.tensor(order)])
    x = inputs(model, 6)
    assert rel(run(slim, x), run(model, x)) < 1e-5


def test_parameter_count_is_what_the_plan_says(calibrated):
    """Parameters removed = the plan's removed_params (sum of (full - rank) x cost per rank); pair
    selection replaces each of the 4 q/k RMSNorms (d_h weights) of a narrowed QK by a per-head one
    (heads x r weights), which the plan's unit costs leave out. Single blocks keep their size."""
    model, cov = calibrated
    units = compression_units(model)
    plan = plan_ranks(
        None, units, Budget(removed_fraction=0.4), r_min=4, multiple=2,
        profiles=error_profiles(model, cov, units),
    )  # fmt: skip
    plan = RankPlan.from_ranks(
        units, {n: (6 if units[n].kind == "qk" else p.rank) for n, p in plan.units.items()}
    )
    assert {p.kind for p in plan.compressed_units().values()} == {"ffn", "qk", "vo"}
    slim = copy.deepcopy(model)
    report = compress_(slim, plan, cov)
    removed = sum((p.full_rank - p.rank) * units[n].cost_per_rank for n, p in plan.units.items())
    assert removed == plan.removed_params > 0
    norms = sum(4 * (2 * p.rank - D_H) for p in plan.compressed_units().values() if p.kind == "qk")
    assert count_parameters(slim) == count_parameters(model) - removed + norms == report.params_after
    assert count_parameters(slim.single_transformer_blocks) == count_parameters(
        model.single_transformer_blocks
    )
    r_ff = plan.units["transformer_blocks.0.ff"].rank
    assert slim.transformer_blocks[0].ff.linear_in.out_features == 2 * r_ff
    assert slim.transformer_blocks[0].attn.to_q.out_features == 2 * 6
    x = inputs(model, 7)
    assert rel(run(slim, x), run(model, x)) < 0.2  # a lossy plan on random weights: it runs, close


def test_compressed_model_keeps_relative_position_equivariance(calibrated):
    """Shifting every token's position ids by one offset leaves a RoPE model unchanged; whole-pair
    selection with narrowed tables keeps that (QK 8 of 16). Moving the text alone changes it."""
    model, cov = calibrated
    slim = copy.deepcopy(model)
    compress_(slim, ranks(compression_units(model), qk=8), cov)
    x = inputs(model, 9)
    offset = torch.tensor([3.0, 5.0, -2.0, 7.0])
    moved = (x[0], {**x[1], "img_ids": x[1]["img_ids"] + offset, "txt_ids": x[1]["txt_ids"] + offset})
    text_only = (x[0], {**x[1], "txt_ids": x[1]["txt_ids"] + offset})
    for m in (model, slim):
        base = run(m, x)
        assert rel(run(m, moved), base) < 1e-5
        assert rel(run(m, text_only), base) > 1e-3


def test_plan_flops_are_the_flop_count():
    """The FLOP cost model reproduces the counted FLOPs of any plan's skeleton (the single blocks'
    fused attention counted at its full width)."""
    model = tiny_flux2_transformer()
    costs = unit_flop_costs(model, ServingShape(HW, batch=2, text_len=TEXT))
    assert costs.total == denoiser_flops(model, 2, HW, TEXT).total
    units = compression_units(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        plan = {
            n: 2 * int(torch.randint(1, u.full_rank // 2 + 1, (1,), generator=gen)) for n, u in units.items()
        }
        with torch.device("meta"):
            skeleton = type(model).from_config(model.config)
        apply_plan_shapes_(skeleton, RankPlan.from_ranks(units, plan))
        assert costs.plan_flops(plan) == denoiser_flops(skeleton, 2, HW, TEXT).total


# -- refused --------------------------------------------------------------------------------------------
def test_other_variants_are_refused_naming_the_block_type():
    from diffusers import Flux3Transformer2DModel
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2TransformerBlock

    with torch.device("meta"):
        flux3 = Flux3Transformer2DModel(
            in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, timestep_channels=16, axes_dims_rope=(2, 2, 2, 2),
        )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="Flux3ModeTransformerBlock") as err:
        compression_units(flux3)
    assert "FLUX.2" in str(err.value)  # the supported families are listed

    class Flux2VariantBlock(Flux2TransformerBlock):
        pass

    model = tiny_flux2_transformer()
    variant = copy.deepcopy(model)
    variant.transformer_blocks[1].__class__ = Flux2VariantBlock
    with pytest.raises(UnsupportedModelError, match=r"transformer_blocks\.1: block type Flux2VariantBlock"):
        compression_units(variant)

    fused = copy.deepcopy(model)
    fused.transformer_blocks[0].attn.fuse_projections()
    with pytest.raises(UnsupportedModelError, match="unfuse_qkv_projections"):
        compression_units(fused)

    kv = copy.deepcopy(model)
    kv.transformer_blocks[0].attn.set_processor(Flux2KVAttnProcessor())
    with pytest.raises(UnsupportedModelError, match="Flux2KVAttnProcessor"):
        ActivationCollector(kv, 1)


# -- through the pipeline: calibrate with its own sampler, compress, save, load ------------------------
def test_pipeline_calibrates_compresses_and_loads_with_diffusers(tmp_path):
    """A tiny Flux2KleinPipeline: statistics come from its own flow-matching sampler (the transformer
    gets t / 1000) with true classifier-free guidance (its own empty negative prompt: two calls per
    step) at the tokenizer's 32 text tokens; the compressed pipeline saves with ``save_compressed``
    and loads with ``DiffusionPipeline.from_pretrained`` to bit-identical latents."""
    from diffusers import DiffusionPipeline
    from family_pipelines import PROMPTS
    from flux2_pipelines import tiny_flux2_pipeline

    from slimdiff.calibration.collect import collect_stats
    from slimdiff.formats.io import save_compressed
    from slimdiff.planning.influence import compute_influence

    pipe = tiny_flux2_pipeline(tmp_path / "build")
    model = pipe.transformer
    calls: list[tuple[int, int]] = []  # (text tokens, image tokens) of every call
    handle = model.register_forward_pre_hook(
        lambda m, a, k: calls.append((k["encoder_hidden_states"].shape[1], k["hidden_states"].shape[1])),
        with_kwargs=True,
    )
    steps, prompts = 4, PROMPTS[:2]
    try:
        stats = collect_stats(
            pipe, prompts, num_inference_steps=steps, guidance_scale=4.0, n_buckets=2, batch_size=2,
            height=FLUX2_HW, width=FLUX2_HW, progress=False,
        )  # fmt: skip
    finally:
        handle.remove()
    assert stats.meta["cfg_branches"] == 2 and stats.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert adapter_for(model).text_len(pipe) == FLUX2_TEXT_LEN
    n_img = (FLUX2_HW // 2) ** 2
    assert calls == [(FLUX2_TEXT_LEN, n_img)] * (2 * steps)  # conditional and negative-prompt calls
    q = stats.tokens["transformer_blocks.0.attn.query"]
    assert q.tolist() == [2 * 2 * 2 * (n_img + FLUX2_TEXT_LEN)] * 2  # 2 steps x 2 branches x 2 prompts
    assert set(stats.moments) == {k for u in compression_units(model).values() for k in u.stat_keys()}

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
    assert type(loaded).__name__ == "Flux2KleinPipeline"
    assert type(loaded.transformer).__name__ == "SlimFlux2Transformer2DModel"
    assert loaded.transformer.slimdiff_plan == plan
    assert torch.equal(
        loaded.transformer.transformer_blocks[1].attn.slim_rope_index,
        model.transformer_blocks[1].attn.slim_rope_index,
    )
    for module in loaded.components.values():  # fresh allocations: mmap offsets change CPU rounding
        if isinstance(module, nn.Module):
            for t in [*module.parameters(), *module.buffers()]:
                t.data = t.data.clone()
    kw = dict(
        num_inference_steps=2, height=FLUX2_HW, width=FLUX2_HW, output_type="latent", guidance_scale=4.0,
        max_sequence_length=FLUX2_TEXT_LEN,
    )  # fmt: skip
    a = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded(prompt=prompts, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)
