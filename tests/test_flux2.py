"""FLUX.2 (``Flux2Transformer2DModel``): the adapter (double and single blocks compressed; the
single blocks' fused ``to_qkv_mlp_proj`` addressed by row parts), the packed SwiGLU FFN, RoPE pair
selection with text positions, the compressed processors, the plan's parameter count and FLOPs,
statistics through a tiny ``Flux2KleinPipeline``'s own sampler, save / load, and the refusal of
other variants; on the tiny models of flux2_pipelines.py (random weights, fixed seeds).

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
from family_contract import collect, rel, run
from flux2_pipelines import FLUX2_HW, FLUX2_TEXT_LEN, tiny_flux2_transformer
from torch import nn

from slimdiff.calibration.collect import ActivationCollector
from slimdiff.families import UnsupportedModelError, adapter_for
from slimdiff.families.base import linear, record_row_parts, replace_module, row_part, row_parts
from slimdiff.families.flux2 import SlimFlux2AttnProcessor, SlimFlux2ParallelAttnProcessor
from slimdiff.families.units import compressible_parameter_count, compression_units, count_parameters
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import ServingShape, denoiser_flops, unit_flop_costs
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import apply_plan_shapes_, compress_

HW, TEXT = (8, 8), 6  # latent 8x8 -> 4x4 = 16 packed image tokens, 6 text tokens
N_IMG, D_H, INNER = 16, 16, 96
DOUBLE = ("transformer_blocks.0", "transformer_blocks.1")
SINGLE = ("single_transformer_blocks.0", "single_transformer_blocks.1")
WIDTH = 2 * D_H  # heads x d_h: the inner dim of q, k, v


def inputs(model, seed: int, batch: int = 2):
    return adapter_for(model).example_inputs(
        model, batch, HW, TEXT, device="cpu", generator=torch.Generator().manual_seed(seed)
    )


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
    """Units of every block: the double blocks' FFNs are gated layouts of the packed linear_in; a
    single block's QK / VO / MLP are row parts of its fused to_qkv_mlp_proj (q | k | v | [gate | up])
    with to_out's first / last columns; no biases anywhere (FLUX.2)."""
    model = tiny_flux2_transformer()
    adapter = adapter_for(model)
    assert adapter.family.startswith("FLUX.2")
    units = compression_units(model)
    assert {n: u.kind for n, u in units.items()} == {
        **{f"{b}.{s}": "ffn" for b in DOUBLE for s in ("ff", "ff_context")},
        **{f"{b}.attn.{k}": k for b in DOUBLE for k in ("qk", "vo")},
        **{f"{b}.{s}": k for b in SINGLE for s, k in (("attn.qk", "qk"), ("attn.vo", "vo"), ("mlp", "ffn"))},
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

    fused, out = "single_transformer_blocks.1.attn.to_qkv_mlp_proj", "single_transformer_blocks.1.attn.to_out"
    qk, vo = (
        units["single_transformer_blocks.1.attn.qk"].layout,
        units["single_transformer_blocks.1.attn.vo"].layout,
    )
    assert (qk.query, qk.key, qk.value, qk.out) == (
        (f"{fused}#0",),
        (f"{fused}#1",),
        (f"{fused}#2",),
        (f"{out}[0:32]",),
    )
    assert qk.rope and not qk.norms_head_major and qk is vo
    assert qk.norms_q == ("single_transformer_blocks.1.attn.norm_q",)
    mlp = units["single_transformer_blocks.1.mlp"].layout
    assert (mlp.proj_in, mlp.proj_out, mlp.gated, mlp.attention) == (
        f"{fused}#3", f"{out}[-96:]", True, "single_transformer_blocks.1.attn",
    )  # fmt: skip
    assert row_parts(model.get_submodule(fused)) == (WIDTH, WIDTH, WIDTH, 2 * INNER)
    # QK = a head's rows of q and k (32 inputs each); VO = its v rows and to_out columns (32 outputs);
    # FFN = a neuron's gate and up rows + its to_out column
    single = {k: units[f"single_transformer_blocks.0.{k}"] for k in ("attn.qk", "attn.vo", "mlp")}
    assert single["attn.qk"].cost_per_rank == 2 * 2 * 32 and single["attn.qk"].full_rank == D_H
    assert single["attn.vo"].cost_per_rank == 2 * (32 + 32)
    assert single["mlp"].cost_per_rank == 2 * 32 + 32 and single["mlp"].full_rank == INNER
    sites = {(s.key, s.module, s.kind, s.cols) for s in adapter.stat_sites(model) if "single" in s.module}
    b = "single_transformer_blocks.0"
    assert sites >= {
        (f"{b}.attn.query", f"{b}.attn.to_qkv_mlp_proj", "post", (0, 32)),
        (f"{b}.attn.key", f"{b}.attn.to_qkv_mlp_proj", "post", (32, 64)),
        (f"{b}.attn.query_normed", f"{b}.attn.norm_q", "post", None),
        (f"{b}.attn.attnout", f"{b}.attn.to_out", "pre", (0, 32)),
        (f"{b}.mlp.hidden", f"{b}.attn.to_out", "pre", (32, 128)),
    }


def test_row_parts_keep_their_addresses_in_any_order_of_rewrites():
    """The generic row-part addressing (``base.row_part``): a linear packed by rows into parts of
    recorded widths; each part is viewed (rows and bias), replaced, and keeps its address while the
    others are narrowed, whatever the order; the record follows every replacement."""
    torch.manual_seed(0)
    widths = (4, 6, 3, 5)

    def fresh():
        model = nn.Sequential(nn.Linear(7, sum(widths)))
        return model, record_row_parts(model, "0", widths)

    model, paths = fresh()
    assert paths == tuple(row_part("0", i) for i in range(4)) == ("0#0", "0#1", "0#2", "0#3")
    ref = model[0]
    view = linear(model, "0#2")
    assert torch.equal(view.weight, ref.weight[10:13]) and torch.equal(view.bias, ref.bias[10:13])
    new = {i: nn.Linear(7, w - 1 - (i % 2)) for i, w in enumerate(widths)}  # every part narrowed
    results = []
    for order in ((0, 1, 2, 3), (3, 1, 0, 2), (2, 3, 1, 0)):
        model, _ = fresh()
        model[0].load_state_dict(ref.state_dict())
        for i in order:
            replace_module(model, paths[i], new[i])
        results.append(model[0])
    want_w = torch.cat([new[i].weight for i in range(4)])
    want_b = torch.cat([new[i].bias for i in range(4)])
    for layer in results:
        assert torch.equal(layer.weight, want_w) and torch.equal(layer.bias, want_b)
        assert row_parts(layer) == tuple(new[i].out_features for i in range(4))
    with pytest.raises(UnsupportedModelError, match="expected the parts"):
        record_row_parts(nn.Sequential(nn.Linear(7, 17)), "0", widths)


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
    """Nothing compressed: SlimFlux2AttnProcessor on the stock layers equals Flux2AttnProcessor,
    SlimFlux2ParallelAttnProcessor equals Flux2ParallelSelfAttnProcessor (the stock widths when
    nothing is recorded on the fused layer); the reference-image KV cache is refused, not ignored."""
    model = tiny_flux2_transformer(seed=1)
    x = inputs(model, 2)
    ref = run(model, x)
    for blocks, proc in (
        (("transformer_blocks",), SlimFlux2AttnProcessor),
        (("single_transformer_blocks",), SlimFlux2ParallelAttnProcessor),
        (("transformer_blocks", "single_transformer_blocks"), None),
    ):
        slim = copy.deepcopy(model)
        for attr in blocks:
            for block in getattr(slim, attr):
                cls = proc or (
                    SlimFlux2AttnProcessor if attr == "transformer_blocks" else SlimFlux2ParallelAttnProcessor
                )
                block.attn.set_processor(cls(scale=D_H**-0.5))
        assert rel(run(slim, x), ref) < 1e-6
    for block in slim.single_transformer_blocks:
        assert block.attn.processor.head_widths(block.attn) == (D_H, D_H)
    with pytest.raises(UnsupportedModelError, match="KV cache"):
        run(slim, (x[0], {**x[1], "joint_attention_kwargs": {"kv_cache_mode": "cached"}}))
    single = copy.deepcopy(model)
    single.single_transformer_blocks[0].attn.set_processor(SlimFlux2ParallelAttnProcessor(scale=D_H**-0.5))
    with pytest.raises(UnsupportedModelError, match="SlimFlux2ParallelAttnProcessor.*KV cache"):
        run(single, (x[0], {**x[1], "joint_attention_kwargs": {"kv_cache_mode": "cached"}}))


# -- statistics ---------------------------------------------------------------------------------------
def test_statistics_are_the_grams_of_the_hooked_activations():
    """FFN: the input of linear_out (silu(gate) * up); QK: both streams' key outputs per head and the
    image / text query norms' outputs ((B, N, heads, d_h)); VO: both out linears' inputs. A single
    block: q / k = rows [0:32) / [32:64) of the fused to_qkv_mlp_proj's output, its norms' outputs,
    the attention output / MLP hidden = to_out's input columns [0:32) / [32:128). Every statistic
    counts all image and text tokens (the single blocks' joint sequence)."""
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
    single = model.single_transformer_blocks[0].attn
    handles.append(single.to_out.register_forward_pre_hook(lambda m, a: seen.setdefault("s.to_out", a[0])))
    for path in ("to_qkv_mlp_proj", "norm_k"):
        handles.append(
            single.get_submodule(path).register_forward_hook(
                lambda m, a, o, p=path: seen.setdefault(f"s.{p}", o)
            )
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
    for b in SINGLE:
        assert tokens[f"{b}.mlp.hidden"] == n_img + n_text
        for which in ("query", "key", "query_normed", "key_normed", "attnout"):
            assert tokens[f"{b}.attn.{which}"] == n_img + n_text

    def head_gram(a: torch.Tensor) -> torch.Tensor:  # (..., 2 * 16) -> (2, 16, 16)
        a = a.double().reshape(-1, 2, D_H)
        return torch.einsum("mhd,mhe->hde", a, a)

    def close(key: str, ref: torch.Tensor, block: str = "transformer_blocks.1") -> None:
        got = stats.moments[f"{block}.{key}"][0]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))

    hidden = seen["ff_context.linear_out"].double().flatten(0, 1)
    close("ff_context.hidden", hidden.T @ hidden)
    close("attn.key", head_gram(seen["attn.to_k"]) + head_gram(seen["attn.add_k_proj"]))
    close("attn.attnout", head_gram(seen["attn.to_out.0"]) + head_gram(seen["attn.to_add_out"]))
    assert seen["attn.norm_added_q"].shape == (2, TEXT, 2, D_H)
    close("attn.query_normed", head_gram(seen["attn.norm_q"]) + head_gram(seen["attn.norm_added_q"]))

    fused, to_out, b = seen["s.to_qkv_mlp_proj"], seen["s.to_out"], "single_transformer_blocks.0"
    assert fused.shape == (2, TEXT + N_IMG, 3 * WIDTH + 2 * INNER) and to_out.shape[-1] == WIDTH + INNER
    close("attn.query", head_gram(fused[..., :WIDTH]), b)
    close("attn.key", head_gram(fused[..., WIDTH : 2 * WIDTH]), b)
    assert seen["s.norm_k"].shape == (2, TEXT + N_IMG, 2, D_H)
    close("attn.key_normed", head_gram(seen["s.norm_k"]), b)
    close("attn.attnout", head_gram(to_out[..., :WIDTH]), b)
    mlp = to_out[..., WIDTH:].double().flatten(0, 1)
    close("mlp.hidden", mlp.T @ mlp, b)


# -- full rank, known answers, parameter count ---------------------------------------------------------
def test_full_rank_rewrite_reproduces_the_original(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, ranks(units), cov, rewrite_full_rank=True)
    assert type(slim.transformer_blocks[0].attn.processor) is SlimFlux2AttnProcessor
    assert slim.transformer_blocks[0].attn.slim_rope_index.shape == (2, D_H)
    for block in slim.single_transformer_blocks:  # every single unit rebuilt, at the original widths
        assert type(block.attn.processor) is SlimFlux2ParallelAttnProcessor
        assert block.attn.slim_rope_index.shape == (2, D_H)
        assert row_parts(block.attn.to_qkv_mlp_proj) == (WIDTH, WIDTH, WIDTH, 2 * INNER)
        assert block.attn.to_out.in_features == WIDTH + INNER
    x = inputs(model, 3)
    assert rel(run(slim, x), run(model, x)) < 1e-5


def zero_pairs(model: nn.Module, dropped: dict[int, list[int]]) -> nn.Module:
    """Zero the q/k rows of the given rotary pairs of every head, in both streams' projections of
    every double block and in the q and k rows of every single block's fused projection: those
    pairs carry no logit, so dropping exactly them is exact."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        weights = [
            getattr(b.attn, lin).weight
            for b in model.transformer_blocks
            for lin in ("to_q", "to_k", "add_q_proj", "add_k_proj")
        ]
        for block in model.single_transformer_blocks:
            fused = block.attn.to_qkv_mlp_proj.weight
            weights += [fused[:WIDTH], fused[WIDTH : 2 * WIDTH]]  # views: q rows, k rows
        for weight in weights:
            for h, pairs in dropped.items():
                for p in pairs:
                    weight[h * D_H + 2 * p : h * D_H + 2 * p + 2] = 0.0
    return model


def test_pairs_that_carry_nothing_are_dropped_and_the_output_is_unchanged():
    """Known answer: pairs {1, 4, 6} (head 0) and {0, 2, 7} (head 1) zeroed; a QK rank of 10 (5 of 8
    pairs) keeps the other pairs, and with the norms' scale corrected the compressed model equals
    the original."""
    model = zero_pairs(tiny_flux2_transformer(seed=3), {0: [1, 4, 6], 1: [0, 2, 7]})
    cov = covariances(model)
    slim = copy.deepcopy(model)
    compress_(slim, ranks(compression_units(model), qk=10), cov)
    for block in [*slim.transformer_blocks, *slim.single_transformer_blocks]:
        idx = block.attn.slim_rope_index
        assert idx[0].tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 14, 15]
        assert idx[1].tolist() == [2, 3, 6, 7, 8, 9, 10, 11, 12, 13]
    for block in slim.transformer_blocks:
        assert block.attn.to_k.out_features == block.attn.add_q_proj.out_features == 2 * 10
    for old, new in zip(model.single_transformer_blocks, slim.single_transformer_blocks, strict=True):
        # the fused layer's q and k parts are the kept rows of the original (the norm scale moved to
        # the per-head norms); v and the MLP rows are untouched
        assert row_parts(new.attn.to_qkv_mlp_proj) == (2 * 10, 2 * 10, WIDTH, 2 * INNER)
        w_old, w_new = old.attn.to_qkv_mlp_proj.weight, new.attn.to_qkv_mlp_proj.weight
        kept = (new.attn.slim_rope_index + torch.tensor([[0], [D_H]])).flatten()
        assert torch.equal(w_new[:20], w_old[kept]) and torch.equal(w_new[20:40], w_old[WIDTH + kept])
        assert torch.equal(w_new[40:], w_old[2 * WIDTH :])
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
        for block in model.single_transformer_blocks:  # the up rows of the fused layer's MLP part
            block.attn.to_qkv_mlp_proj.weight[3 * WIDTH + INNER + dead] = 0.0
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
    for old, new in zip(model.single_transformer_blocks, slim.single_transformer_blocks, strict=True):
        fused_old, fused_new = old.attn.to_qkv_mlp_proj.weight, new.attn.to_qkv_mlp_proj.weight
        assert (
            fused_new.shape == (3 * WIDTH + 2 * (INNER - 20), 32)
            and new.attn.to_out.in_features == WIDTH + INNER - 20
        )
        assert row_parts(new.attn.to_qkv_mlp_proj) == (WIDTH, WIDTH, WIDTH, 2 * (INNER - 20))
        assert torch.equal(fused_new[: 3 * WIDTH], fused_old[: 3 * WIDTH])  # q | k | v untouched
        gate_old, gate_new = (
            fused_old[3 * WIDTH : 3 * WIDTH + INNER],
            fused_new[3 * WIDTH : 3 * WIDTH + INNER - 20],
        )
        order = [int((gate_old == gate_new[k]).all(1).nonzero()) for k in range(INNER - 20)]
        assert sorted(order) == alive
        assert torch.equal(
            fused_new[3 * WIDTH + INNER - 20 :], fused_old[3 * WIDTH + INNER + torch.tensor(order)]
        )
        # the MLP alone was narrowed: the block still needs the processor that reads the widths
        assert type(new.attn.processor) is SlimFlux2ParallelAttnProcessor
        assert torch.equal(new.attn.to_out.weight[:, :WIDTH], old.attn.to_out.weight[:, :WIDTH])
    x = inputs(model, 6)
    assert rel(run(slim, x), run(model, x)) < 1e-5


def test_parameter_count_is_what_the_plan_says(calibrated):
    """Parameters removed = the plan's removed_params (sum of (full - rank) x cost per rank); pair
    selection replaces each of the q/k RMSNorms (d_h weights; 4 in a double block, 2 in a single
    block) of a narrowed QK by a per-head one (heads x r weights), which the plan's unit costs leave
    out. A single block still has ONE input linear (the fused to_qkv_mlp_proj, rows [q' | k' | v' |
    gate' | up'] at the plan's ranks) and ONE output linear (to_out over [H r_vo | MLP])."""
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
    assert {n.rsplit(".", 1)[-1] for n in plan.compressed_units() if n.startswith("single")} == {
        "qk",
        "vo",
        "mlp",
    }
    slim = copy.deepcopy(model)
    report = compress_(slim, plan, cov)
    removed = sum((p.full_rank - p.rank) * units[n].cost_per_rank for n, p in plan.units.items())
    assert removed == plan.removed_params > 0
    # counted on the live layers: row parts at their recorded widths, to_out's column ranges once
    full = compressible_parameter_count(model, units)
    assert full == sum(u.full_params for u in units.values())
    assert compressible_parameter_count(slim, units) == full - removed
    norms = sum(
        (2 if n.startswith("single") else 4) * (2 * p.rank - D_H)
        for n, p in plan.compressed_units().items()
        if p.kind == "qk"
    )
    assert count_parameters(slim) == count_parameters(model) - removed + norms == report.params_after
    assert count_parameters(slim.single_transformer_blocks) < count_parameters(
        model.single_transformer_blocks
    )
    for b in SINGLE:
        block = slim.get_submodule(b)
        r_qk, r_vo, r_mlp = (plan.units[f"{b}.{k}"].rank for k in ("attn.qk", "attn.vo", "mlp"))
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert sorted(linears) == ["attn.to_out", "attn.to_qkv_mlp_proj"]  # one in, one out
        assert block.attn.to_qkv_mlp_proj.weight.shape == (2 * 2 * r_qk + 2 * r_vo + 2 * r_mlp, 32)
        assert block.attn.to_out.weight.shape == (32, 2 * r_vo + r_mlp)
        assert row_parts(block.attn.to_qkv_mlp_proj) == (2 * r_qk, 2 * r_qk, 2 * r_vo, 2 * r_mlp)
        assert 2 * r_vo + r_mlp < WIDTH + INNER
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


def test_plan_flops_are_the_flop_count(calibrated):
    """The FLOP cost model reproduces the counted FLOPs of any plan's skeleton and of a compressed
    model, the single blocks' units included: their share of the fused to_qkv_mlp_proj / to_out
    FLOPs per unit of rank, and their attention matmuls at the widths the compressed processor
    runs (read off the fused layer)."""
    model, cov = calibrated
    shape = ServingShape(HW, batch=2, text_len=TEXT)
    costs = unit_flop_costs(model, shape)
    assert costs.total == denoiser_flops(model, 2, HW, TEXT).total
    units = compression_units(model)
    # per unit of rank, on the 2 x 22 tokens of the joint sequence (2 FLOPs per multiply-add): QK, a
    # row of q and of k per head (2 x 2 rows of 32 inputs); VO, a v row per head and an out column
    # per head (32 outputs); MLP, a gate and an up row and an out column; plus, for QK / VO, one
    # attention matmul per unit of head width (2 B H N^2)
    tokens = 2 * (N_IMG + TEXT)
    matmul = 2 * 2 * 2 * (N_IMG + TEXT) ** 2
    assert costs.per_rank["single_transformer_blocks.0.attn.qk"] == 2 * tokens * (2 * 2 * 32) + matmul
    assert costs.per_rank["single_transformer_blocks.0.attn.vo"] == 2 * tokens * (2 * 32 + 2 * 32) + matmul
    assert costs.per_rank["single_transformer_blocks.0.mlp"] == 2 * tokens * (2 * 32 + 32)
    ranks = {n: (8 if u.kind != "ffn" else 40) for n, u in units.items() if n.startswith("single")}
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(units, {**{n: u.full_rank for n, u in units.items()}, **ranks}), cov)
    counted = denoiser_flops(slim, 2, HW, TEXT)
    assert costs.plan_flops(ranks) == counted.total < costs.total
    attn = [r for r in counted.rows if r.module == "single_transformer_blocks.0.attn"]
    assert [r.dims[-2:] for r in attn] == [(8, 8)]  # the matmuls at the compressed width
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
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
        Flux2TransformerBlock,
    )

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
    kv = copy.deepcopy(model)  # the single blocks' statistics need the stock parallel processor too
    kv.single_transformer_blocks[1].attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    with pytest.raises(
        UnsupportedModelError, match=r"single_transformer_blocks\.1\.attn.*Flux2KVParallelSelfAttnProcessor"
    ):
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
    for key in ("attn.query", "attn.key_normed", "attn.attnout", "mlp.hidden"):  # the joint sequence
        assert stats.tokens[f"single_transformer_blocks.1.{key}"].tolist() == q.tolist()
    assert set(stats.moments) == {
        k for u in compression_units(model).values() for k in (*u.stat_keys(), *u.first_moment_keys())
    }
    assert any(k.startswith("single_transformer_blocks.") for k in stats.moments)

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
    assert {n.rsplit(".", 1)[-1] for n in plan.compressed_units() if n.startswith("single")} == {
        "qk",
        "vo",
        "mlp",
    }
    compress_(model, plan, cov)
    # a LoRA of the ORIGINAL model: the delta of a narrowed fused linear is dropped with its reason
    # (row-packed linears are not projected), that of to_out (column blocks) is projected
    from slimdiff.formats.lora import project_lora

    gen, lora = torch.Generator().manual_seed(1), {}
    for layer, (n_out, n_in) in (
        ("to_qkv_mlp_proj", (3 * WIDTH + 2 * INNER, 32)),
        ("to_out", (32, WIDTH + INNER)),
    ):
        lora[f"transformer.single_transformer_blocks.0.attn.{layer}.lora_A.weight"] = torch.randn(
            4, n_in, generator=gen
        )
        lora[f"transformer.single_transformer_blocks.0.attn.{layer}.lora_B.weight"] = torch.randn(
            n_out, 4, generator=gen
        )
    with pytest.warns(UserWarning, match=r"to_qkv_mlp_proj.*packed by rows"):
        projected, _ = project_lora(model, lora)
    assert sorted(projected) == [
        f"transformer.single_transformer_blocks.0.attn.to_out.lora_{x}.weight" for x in "AB"
    ]
    assert projected["transformer.single_transformer_blocks.0.attn.to_out.lora_A.weight"].shape[1] == (
        model.single_transformer_blocks[0].attn.to_out.in_features
    )
    save_compressed(pipe, tmp_path / "slim")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert type(loaded).__name__ == "Flux2KleinPipeline"
    assert type(loaded.transformer).__name__ == "SlimFlux2Transformer2DModel"
    assert loaded.transformer.slimdiff_plan == plan
    assert torch.equal(
        loaded.transformer.transformer_blocks[1].attn.slim_rope_index,
        model.transformer_blocks[1].attn.slim_rope_index,
    )
    for new, old in zip(
        loaded.transformer.single_transformer_blocks, model.single_transformer_blocks, strict=True
    ):
        # rebuilt from the saved config's plan: the narrowed fused layers, their parts and processor
        assert type(new.attn.processor) is SlimFlux2ParallelAttnProcessor
        assert row_parts(new.attn.to_qkv_mlp_proj) == row_parts(old.attn.to_qkv_mlp_proj)
        assert torch.equal(new.attn.to_qkv_mlp_proj.weight, old.attn.to_qkv_mlp_proj.weight)
        assert torch.equal(new.attn.to_out.weight, old.attn.to_out.weight)
        assert torch.equal(new.attn.slim_rope_index, old.attn.slim_rope_index)
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
