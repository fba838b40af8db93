"""Qwen-Image (``QwenImageTransformer2DModel``): the adapter, RoPE-aware pair selection with text
positions, padded text tokens kept out of the statistics, the compressed processor, save / load,
on tiny transformers and a tiny ``QwenImagePipeline`` built from config (family_pipelines.py:
random weights, fixed seeds, a one-layer Qwen2.5-VL text encoder).

References and tolerances:
* rotary angles against the RoPE formula written out here (image (0, row - ceil(rows / 2),
  column - ceil(columns / 2)), text m + j on every axis, theta 10000): the model's tables are
  float32, so 1e-5 rad;
* the compressed processor with nothing compressed, a full-rank rewrite and a pair selection that
  drops only pairs whose q/k rows are zero, against the original in float32: exact maths, so the
  tolerance is float32 rounding through 2 blocks (1e-5 relative);
* relative-position equivariance: multiplying every token's rotation by one common phase (a
  global position shift) leaves the logits unchanged in exact arithmetic; the shifted tables and
  the rotations are float32 products, so 1e-5 relative;
* statistics against grams of the hooked activations at the unpadded tokens (float32 products
  before the float64 sums: 1e-6 of the largest entry), and token counts exactly.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import pytest
import torch
from family_contract import collect, qk_ranks, rel, run
from family_pipelines import tiny_qwenimage_transformer
from torch import nn

from slimdiff.families import TokenMask, UnsupportedModelError, adapter_for
from slimdiff.families.attention import SlimQwenAttnProcessor, sdpa_backends
from slimdiff.families.units import compression_units, count_parameters
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import ServingShape, denoiser_flops, unit_flop_costs
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import apply_plan_shapes_, compress_

HW, TEXT = (8, 8), 6  # latent 8x8 -> 4x4 = 16 packed image tokens, 6 text tokens
N_IMG = 16
#: a pipeline-style (long 0/1) text mask: sample 0 padded at the end, sample 1 anywhere
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 1]])


def tiny(seed: int = 0) -> nn.Module:
    return tiny_qwenimage_transformer(seed)  # 2 blocks, 2 heads x 16, RoPE axes (4, 6, 6)


def inputs(model, seed: int, batch: int = 2, mask: torch.Tensor | None = None):
    args, kwargs = adapter_for(model).example_inputs(
        model, batch, HW, TEXT, device="cpu", generator=torch.Generator().manual_seed(seed)
    )
    if mask is not None:
        kwargs["encoder_hidden_states_mask"] = mask
    return args, kwargs


def covariances(model, n: int = 4) -> dict[str, torch.Tensor]:
    return collect(model, [inputs(model, 100 + i, mask=MASK) for i in range(n)]).stats().aggregate([1.0])


@pytest.fixture(scope="module")
def calibrated():
    model = tiny()
    return model, covariances(model)


# -- the adapter -----------------------------------------------------------------------------------
def test_units_layouts_and_costs():
    model = tiny()
    adapter = adapter_for(model)
    assert adapter.family.startswith("Qwen-Image")
    units = compression_units(model)
    assert {n: u.kind for n, u in units.items()} == {
        **{f"transformer_blocks.{i}.{s}": "ffn" for i in (0, 1) for s in ("img_mlp", "txt_mlp")},
        **{f"transformer_blocks.{i}.attn.{k}": k for i in (0, 1) for k in ("qk", "vo")},
    }
    qk = units["transformer_blocks.0.attn.qk"].layout
    assert qk.rope and not qk.norms_head_major
    assert qk.text_mask == TokenMask("transformer_blocks.0", "encoder_hidden_states_mask")
    txt = units["transformer_blocks.0.txt_mlp"].layout
    assert (txt.stream, txt.token_mask) == ("text", qk.text_mask)
    assert units["transformer_blocks.0.img_mlp"].layout.token_mask is None
    # dim 32, 2 heads, biases everywhere: QK = rows of to_q, to_k, add_q_proj, add_k_proj; VO = rows
    # of to_v, add_v_proj and columns of to_out.0, to_add_out; FFN = a row of net.0.proj + a column
    assert units["transformer_blocks.0.attn.qk"].cost_per_rank == 2 * 4 * 33
    assert units["transformer_blocks.0.attn.vo"].cost_per_rank == 2 * (2 * 33 + 2 * 32)
    assert units["transformer_blocks.0.txt_mlp"].cost_per_rank == 33 + 32
    assert units["transformer_blocks.0.txt_mlp"].full_rank == 4 * 32


def test_rope_angles_are_the_models_image_and_text_positions():
    """Text tokens have positions too: token j at m + j on all three axes, m = max(floor(rows / 2),
    floor(columns / 2)) of the packed grid; image token (row, column) at (0, row - ceil(rows / 2),
    column - ceil(columns / 2)). Every token's angle comes from the model's own ``pos_embed``."""
    model = tiny()
    adapter = adapter_for(model)
    h, w = 6, 8  # latent grid -> 3 x 4 packed patches
    angles = adapter.rope_angles(model, (h, w), 5)  # [text; image]
    axes = (4, 6, 6)
    freqs = [10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes]
    rows, cols = h // 2, w // 2
    m = max(rows // 2, cols // 2)
    text = [torch.cat([(m + j) * f for f in freqs]) for j in range(5)]
    image = [  # centred: rows -2, -1, 0 (an odd count puts the extra one below 0), columns -2 .. 1
        torch.cat([0 * freqs[0], (r - (rows - rows // 2)) * freqs[1], (c - (cols - cols // 2)) * freqs[2]])
        for r in range(rows)
        for c in range(cols)
    ]
    ref = torch.stack(text + image)
    assert angles.shape == (5 + rows * cols, sum(axes) // 2)
    diff = torch.remainder(angles - ref + math.pi, 2 * math.pi) - math.pi  # angles are mod 2 pi
    assert diff.abs().max() < 1e-5
    # the serving shape's default: the pipeline's 128 x 128 latents and 512 text tokens
    assert adapter.sample_size(model) == (128, 128)
    assert adapter.rope_angles(model).shape == (512 + 64 * 64, 8)


def test_slim_processor_reproduces_the_stock_processor_with_padding():
    """Nothing compressed: SlimQwenAttnProcessor on the stock layers equals the stock
    QwenDoubleStreamAttnProcessor2_0 (mask, RoPE of both streams, output order), and the padding
    mask matters (the same inputs without it differ)."""
    model = tiny(seed=1)
    x = inputs(model, 2, mask=MASK)
    ref = run(model, x)
    slim = copy.deepcopy(model)
    for block in slim.transformer_blocks:
        block.attn.set_processor(SlimQwenAttnProcessor(scale=16**-0.5))
    assert rel(run(slim, x), ref) < 1e-6
    assert rel(run(slim, inputs(model, 2)), ref) > 1e-3  # far above float32 rounding


# -- (a) full rank, (b) parameter counts -------------------------------------------------------------
def test_full_rank_rewrite_reproduces_the_original(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    full = RankPlan.from_ranks(units, {n: u.full_rank for n, u in units.items()})
    slim = copy.deepcopy(model)
    compress_(slim, full, cov, rewrite_full_rank=True)
    assert type(slim.transformer_blocks[0].attn.processor) is SlimQwenAttnProcessor
    assert slim.transformer_blocks[0].attn.slim_rope_index.shape == (2, 16)
    for mask in (MASK, None):
        x = inputs(model, 3, mask=mask)
        assert rel(run(slim, x), run(model, x)) < 1e-5


def test_parameter_count_is_what_the_plan_says(calibrated):
    """Parameters removed = sum over units of (full rank - rank) x cost per rank, the plan's
    removed_params; pair selection replaces each of the 4 q/k RMSNorms (d_h weights) of a
    narrowed QK by a per-head one (heads x r weights), which the plan's unit costs leave out."""
    model, cov = calibrated
    units = compression_units(model)
    plan = plan_ranks(
        None, units, Budget(removed_fraction=0.4), r_min=4, multiple=2,
        profiles=error_profiles(model, cov, units),
    )  # fmt: skip
    ranks = {n: (6 if units[n].kind == "qk" else p.rank) for n, p in plan.units.items()}
    plan = RankPlan.from_ranks(units, ranks)
    assert {p.kind for p in plan.compressed_units().values()} == {"ffn", "qk", "vo"}
    slim = copy.deepcopy(model)
    report = compress_(slim, plan, cov)
    removed = sum((p.full_rank - p.rank) * units[n].cost_per_rank for n, p in plan.units.items())
    assert removed == plan.removed_params > 0
    norms = sum(4 * (2 * p.rank - 16) for p in plan.compressed_units().values() if p.kind == "qk")
    assert count_parameters(slim) == count_parameters(model) - removed + norms == report.params_after
    block = slim.transformer_blocks[0]
    r_vo = plan.units["transformer_blocks.0.attn.vo"].rank
    assert block.attn.to_q.out_features == block.attn.add_k_proj.out_features == 2 * 6
    assert block.attn.to_add_out.in_features == 2 * r_vo
    assert block.txt_mlp.net[2].in_features == plan.units["transformer_blocks.0.txt_mlp"].rank
    x = inputs(model, 7, mask=MASK)
    assert rel(run(slim, x), run(model, x)) < 0.1  # 0.024 measured (random weights)


# -- (c) known answer ---------------------------------------------------------------------------------
def zero_pairs(model: nn.Module, dropped: dict[int, list[int]], d: int = 16) -> nn.Module:
    """Zero the q/k rows (weights and biases) of the given rotary pairs of every head, in both
    streams' projections: those pairs carry no logit, so dropping exactly them is exact."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.transformer_blocks:
            for lin in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                layer = getattr(block.attn, lin)
                for h, pairs in dropped.items():
                    for p in pairs:
                        rows = slice(h * d + 2 * p, h * d + 2 * p + 2)
                        layer.weight[rows] = 0.0
                        layer.bias[rows] = 0.0
    return model


def test_pairs_that_carry_nothing_are_dropped_and_the_output_is_unchanged():
    """Known answer: pairs {1, 4, 6} (head 0) and {0, 2, 7} (head 1) zeroed in all four q/k
    projections; a QK rank of 10 (5 of 8 pairs) selects the other pairs, and with the norms' scale
    corrected the compressed model equals the original, padded prompts included."""
    model = zero_pairs(tiny(seed=3), {0: [1, 4, 6], 1: [0, 2, 7]})
    cov = covariances(model)
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, qk_ranks(units, 10), cov)
    for block in slim.transformer_blocks:
        idx = block.attn.slim_rope_index
        assert idx[0].tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 14, 15]
        assert idx[1].tolist() == [2, 3, 6, 7, 8, 9, 10, 11, 12, 13]
        assert block.attn.to_k.out_features == block.attn.add_q_proj.out_features == 2 * 10
    for mask in (MASK, None):
        x = inputs(model, 5, mask=mask)
        assert rel(run(slim, x), run(model, x)) < 1e-5


# -- (d) padded text tokens ---------------------------------------------------------------------------
def test_padded_text_tokens_never_enter_the_statistics():
    """Every statistic counts exactly the real tokens (16 image tokens per sample, 4 + 4 text
    tokens of MASK's 12), its sums are the grams of the hooked activations at those tokens, and
    changing what the padded text tokens hold changes no statistic. Without a mask all 12 text
    tokens count (the mask is what keeps them out)."""
    model = tiny(seed=2)
    x = inputs(model, 11, mask=MASK)
    keep = MASK.bool()
    n_text, n_img = int(keep.sum()), 2 * N_IMG
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path in ("img_mlp.net.2", "txt_mlp.net.2", "attn.to_add_out", "attn.to_out.0"):
        mod = model.get_submodule(f"transformer_blocks.0.{path}")
        handles.append(
            mod.register_forward_pre_hook(lambda m, a, p=path: seen.setdefault(p, []).append(a[0]))
        )
    for path in ("attn.to_k", "attn.add_k_proj", "attn.norm_q", "attn.norm_added_q"):
        mod = model.get_submodule(f"transformer_blocks.0.{path}")
        handles.append(mod.register_forward_hook(lambda m, a, o, p=path: seen.setdefault(p, []).append(o)))
    col = collect(model, [x])
    for h in handles:
        h.remove()
    stats = col.stats()
    tokens = {k: int(v.sum()) for k, v in stats.tokens.items()}
    for b in (0, 1):
        assert tokens[f"transformer_blocks.{b}.img_mlp.hidden"] == n_img
        assert tokens[f"transformer_blocks.{b}.txt_mlp.hidden"] == n_text == 8
        for which in ("query", "key", "query_normed", "key_normed", "attnout"):
            assert tokens[f"transformer_blocks.{b}.attn.{which}"] == n_img + n_text

    def gram(a: torch.Tensor) -> torch.Tensor:
        a = a.double()
        return a.T @ a

    def head_gram(a: torch.Tensor) -> torch.Tensor:  # (M, 2 * 16) -> (2, 16, 16)
        a = a.double().reshape(-1, 2, 16)
        return torch.einsum("mhd,mhe->hde", a, a)

    def close(key: str, ref: torch.Tensor) -> None:
        got = stats.moments[f"transformer_blocks.0.{key}"][0]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))

    (txt_hidden,), (img_hidden,) = seen["txt_mlp.net.2"], seen["img_mlp.net.2"]
    close("txt_mlp.hidden", gram(txt_hidden[keep]))
    close("img_mlp.hidden", gram(img_hidden.flatten(0, 1)))
    (k_img,), (k_txt,) = seen["attn.to_k"], seen["attn.add_k_proj"]
    close("attn.key", head_gram(k_img.flatten(0, 1)) + head_gram(k_txt[keep]))
    (a_img,), (a_txt,) = seen["attn.to_out.0"], seen["attn.to_add_out"]
    close("attn.attnout", head_gram(a_img.flatten(0, 1)) + head_gram(a_txt[keep]))
    (qn_img,), (qn_txt,) = seen["attn.norm_q"], seen["attn.norm_added_q"]  # (B, N, heads, d_h)
    assert qn_txt.shape == (2, TEXT, 2, 16)
    close("attn.query_normed", head_gram(qn_img.flatten(0, 1)) + head_gram(qn_txt[keep]))

    garbage = copy.deepcopy(x)
    enc = garbage[1]["encoder_hidden_states"]
    enc[~keep] = 100.0 * torch.randn(
        int((~keep).sum()), enc.shape[-1], generator=torch.Generator().manual_seed(9)
    )
    other = collect(model, [garbage]).stats()
    assert not torch.equal(enc, x[1]["encoder_hidden_states"])
    for key, m in stats.moments.items():
        torch.testing.assert_close(other.moments[key], m, rtol=1e-6, atol=1e-6 * float(m.abs().max()))
        assert torch.equal(other.tokens[key], stats.tokens[key])

    unmasked = collect(model, [inputs(model, 11)]).stats()
    assert int(unmasked.tokens["transformer_blocks.0.txt_mlp.hidden"].sum()) == 2 * TEXT
    assert int(unmasked.tokens["transformer_blocks.0.attn.key"].sum()) == n_img + 2 * TEXT


# -- (e) relative positions ---------------------------------------------------------------------------
@contextmanager
def shifted_positions(model: nn.Module, offset: tuple[float, float, float], text: bool = True):
    """Shift every token's (frame, row, column) position by ``offset``: each table entry times
    exp(i offset_axis omega_p), omega_p the pair's frequency (its angle at position 1). With
    ``text`` False only the image tokens move."""
    pe = model.pos_embed
    omega = torch.angle(pe.pos_freqs[1])  # (d_h / 2,)
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor(pe.axes_dim) // 2)
    phase = torch.polar(torch.ones_like(omega), omega * torch.tensor(offset)[axis])
    forward = pe.forward

    def shifted(*args, **kwargs):
        img, txt = forward(*args, **kwargs)
        return img * phase.to(img.device), (txt * phase.to(txt.device) if text else txt)

    pe.forward = shifted
    try:
        yield
    finally:
        del pe.forward


def test_compressed_attention_keeps_relative_position_equivariance(calibrated):
    """A global position shift leaves a RoPE model's output unchanged; whole-pair selection with
    narrowed tables keeps that (QK at 8 of 16 coordinates everywhere). Moving the image tokens
    alone changes both models' outputs (text-image relative positions change)."""
    model, cov = calibrated
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, qk_ranks(units, 8), cov)
    assert slim.transformer_blocks[1].attn.slim_rope_index.shape == (2, 8)
    x = inputs(model, 9, mask=MASK)
    base = {"original": run(model, x), "compressed": run(slim, x)}
    for name, m in (("original", model), ("compressed", slim)):
        with shifted_positions(m, (3.0, 5.0, -2.0)):
            assert rel(run(m, x), base[name]) < 1e-5, name
        with shifted_positions(m, (3.0, 5.0, -2.0), text=False):
            assert rel(run(m, x), base[name]) > 1e-3, name


# -- kernels and FLOPs --------------------------------------------------------------------------------
def test_compressed_attention_stays_on_the_fused_kernel(calibrated):
    """r_qk != r_vo (QK 6, VO 10): the processor pads to one width, so SDPA runs the original's
    backend, with and without the padding mask."""
    model, cov = calibrated
    units = compression_units(model)
    ranks = {n: {"qk": 6, "vo": 10}.get(u.kind, u.full_rank) for n, u in units.items()}
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(units, ranks), cov)
    for mask in (None, MASK):
        x = inputs(model, 4, mask=mask)
        before, after = sdpa_backends(model, *x[0], **x[1]), sdpa_backends(slim, *x[0], **x[1])
        assert len(before) == 2 and before == after, (before, after)
        assert all(calls == ["flash"] for calls in after.values()), after  # PyTorch's fused CPU kernel


def test_plan_flops_are_the_flop_count():
    model = tiny()
    shape = ServingShape(HW, batch=2, text_len=TEXT)
    costs = unit_flop_costs(model, shape)
    assert costs.total == denoiser_flops(model, 2, HW, TEXT).total
    units = compression_units(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ranks = {
            n: 2 * int(torch.randint(1, u.full_rank // 2 + 1, (1,), generator=gen)) for n, u in units.items()
        }
        with torch.device("meta"):
            skeleton = type(model).from_config(model.config)
        apply_plan_shapes_(skeleton, RankPlan.from_ranks(units, ranks))
        assert costs.plan_flops(ranks) == denoiser_flops(skeleton, 2, HW, TEXT).total


def test_fused_projections_are_refused():
    """(The model's fuse_qkv_projections() leaves Qwen-Image's classic ``Attention`` modules alone in
    diffusers 0.42; an attention's own fuse_projections() adds the fused layers.)"""
    model = tiny()
    model.transformer_blocks[1].attn.fuse_projections()
    with pytest.raises(UnsupportedModelError, match="unfuse_qkv_projections"):
        compression_units(model)


# -- (f) through the pipeline: calibrate with its own sampler, compress, save, load ------------------
def test_pipeline_calibrates_compresses_and_loads_with_diffusers(tmp_path):
    """A tiny QwenImagePipeline (family_pipelines.py): statistics come from its own flow-matching
    sampler (the transformer gets t / 1000) with true classifier-free guidance (a negative prompt:
    two calls per step); prompts of different lengths are padded to the longest and the padded
    text tokens are counted nowhere. The compressed pipeline saves and loads with
    ``DiffusionPipeline.from_pretrained`` to the same latents."""
    from diffusers import DiffusionPipeline
    from family_pipelines import PROMPTS, QWEN_HW, tiny_qwenimage_pipeline

    from slimdiff.calibration.collect import collect_stats
    from slimdiff.formats.io import save_compressed
    from slimdiff.planning.influence import compute_influence

    pipe = tiny_qwenimage_pipeline(tmp_path / "build")
    model = pipe.transformer
    calls: list[tuple[int, int, int]] = []  # (text tokens, real ones, image tokens) of every call

    def hook(module, args, kwargs):
        mask, enc = kwargs["encoder_hidden_states_mask"], kwargs["encoder_hidden_states"]
        text = enc.shape[0] * enc.shape[1]
        real = text if mask is None else int(mask.bool().sum())
        calls.append((text, real, kwargs["hidden_states"].shape[0] * kwargs["hidden_states"].shape[1]))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    steps, prompts = 4, [PROMPTS[0], PROMPTS[4]]  # 5 and 2 words: the second is padded
    try:
        stats = collect_stats(
            pipe, prompts, num_inference_steps=steps, guidance_scale=4.0, n_buckets=2, batch_size=2,
            height=QWEN_HW, width=QWEN_HW, progress=False,
        )  # fmt: skip
    finally:
        handle.remove()
    assert stats.meta["cfg_branches"] == 2 and stats.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert adapter_for(model).text_len(pipe) == 512  # the pipeline's max_sequence_length: a bound
    assert len(calls) == 2 * steps  # conditional and negative-prompt calls
    text, real_text, n_img = (sum(c[i] for c in calls) for i in range(3))
    assert n_img == 2 * steps * 2 * (QWEN_HW // 4) ** 2 and real_text < text  # the batch had padding
    q = stats.tokens["transformer_blocks.0.attn.query"]
    assert int(q.sum()) == n_img + real_text and q.tolist() == [q[0].item()] * 2  # 2 steps per bucket
    assert int(stats.tokens["transformer_blocks.1.txt_mlp.hidden"].sum()) == real_text

    influence = compute_influence(stats, model)
    cov = influence.aggregate(stats)
    units = compression_units(model)
    plan = plan_ranks(
        influence.score_of(), units, Budget(removed_fraction=0.4), r_min=4, multiple=2,
        profiles=error_profiles(model, cov, units),
    )  # fmt: skip
    # narrow the QKs too, so the saved model carries narrowed rotary tables
    plan = RankPlan.from_ranks(
        units, {n: (8 if units[n].kind == "qk" else p.rank) for n, p in plan.units.items()}
    )
    assert {p.kind for p in plan.compressed_units().values()} == {"ffn", "qk", "vo"}
    compress_(model, plan, cov)
    save_compressed(pipe, tmp_path / "slim")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert type(loaded).__name__ == "QwenImagePipeline"
    assert type(loaded.transformer).__name__ == "SlimQwenImageTransformer2DModel"
    assert loaded.transformer.slimdiff_plan == plan
    assert torch.equal(
        loaded.transformer.transformer_blocks[0].attn.slim_rope_index,
        model.transformer_blocks[0].attn.slim_rope_index,
    )
    for module in loaded.components.values():  # fresh allocations: mmap offsets change CPU rounding
        if isinstance(module, nn.Module):
            for t in [*module.parameters(), *module.buffers()]:
                t.data = t.data.clone()
    kw = dict(
        num_inference_steps=2, height=QWEN_HW, width=QWEN_HW, output_type="latent",
        true_cfg_scale=4.0, negative_prompt=[" "] * 2,
    )  # fmt: skip
    a = pipe(prompts, generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded(prompts, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)
