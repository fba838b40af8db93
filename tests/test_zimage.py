"""Z-Image (``ZImageTransformer2DModel``): the adapter, RoPE-aware pair selection, the SwiGLU FFN
with a separate gate linear, batch-padded tokens kept out of the statistics, the compressed
processor, save / load, on a tiny transformer and a tiny ``ZImagePipeline`` built from config
(zimage_pipelines.py: random weights, fixed seeds, a two-layer Qwen3 text encoder).

References and tolerances:
* rotary angles against the RoPE formula written out here (caption token j at (1 + j, 0, 0), its
  pads included, image patch (row, column) at (L + 1, row, column), the image's pads at (0, 0, 0),
  theta 256): the model
  rounds each angle to float32 before its complex64 table, |angle| <= 40 rad here, so the error is
  at most 40 x 2^-24 ~ 2.4e-6 rad plus the table's rounding: 1e-5 rad;
* the compressed processor on the stock layers, a full-rank rewrite and a pair selection that drops
  only pairs whose q/k rows are zero, against the original in float32: exact maths, so the
  tolerance is float32 rounding through 4 blocks (measured ~3e-7): 1e-5 relative;
* relative-position equivariance: a global integer shift of every token's position gives other
  rows of the same float32 tables; the logits are unchanged in exact arithmetic, so 1e-5 relative;
* statistics against grams of the hooked activations at the real tokens (float32 products summed
  in float64: 1e-6 of the largest entry); a padded batch's statistics against the sum of its
  samples' unpadded ones (different SDPA shapes, so float32 rounding of the activations: 1e-5 of
  the largest entry); token counts exactly;
* save / load: the same weights, the same operations: bit-identical latents.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from family_contract import collect, qk_ranks, rel, run
from torch import nn
from zimage_pipelines import ZIMAGE_HW, tiny_zimage_pipeline, tiny_zimage_transformer

from slimdiff.families import TokenMask, UnsupportedModelError, adapter_for
from slimdiff.families.units import compression_units, count_parameters
from slimdiff.families.zimage import SlimZImageAttnProcessor
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import ServingShape, denoiser_flops, unit_flop_costs
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import apply_plan_shapes_, compress_

HW = (8, 8)  # latents 8x8 -> 4x4 = 16 image patches, padded to 32 with the learned x_pad_token
N_IMG = 32  # image tokens per sample after the pad to a multiple of 32
CAPTIONS = (20, 45)  # caption tokens per sample: padded to 32 and 64, so the batch is padded too
BLOCKS = ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1")


def pad32(n: int) -> int:
    return -(-n // 32) * 32


def tiny(seed: int = 0, **config) -> nn.Module:
    return tiny_zimage_transformer(seed, **config)  # dim 32, 2 heads x 16, RoPE axes (4, 6, 6)


def inputs(model, seed: int, captions: tuple[int, ...] = CAPTIONS):
    """(args, kwargs) of one forward: one latent per caption, captions of the given lengths."""
    args, kwargs = adapter_for(model).example_inputs(
        model, len(captions), HW, max(captions), device="cpu", generator=torch.Generator().manual_seed(seed)
    )
    x, t, cap = args
    return (x, t, [c[:n] for c, n in zip(cap, captions, strict=True)]), kwargs


def covariances(model, n: int = 3) -> dict[str, torch.Tensor]:
    return collect(model, [inputs(model, 100 + i) for i in range(n)]).stats().aggregate([1.0])


@pytest.fixture(scope="module")
def calibrated():
    model = tiny()
    return model, covariances(model)


# -- the adapter -----------------------------------------------------------------------------------
def test_units_layouts_and_costs():
    model = tiny()
    adapter = adapter_for(model)
    assert adapter.family.startswith("Z-Image")
    units = compression_units(model)
    assert {n: u.kind for n, u in units.items()} == {
        **{f"{b}.feed_forward": "ffn" for b in BLOCKS},
        **{f"{b}.attention.{k}": k for b in BLOCKS for k in ("qk", "vo")},
    }
    ffn = units["layers.0.feed_forward"].layout
    assert (ffn.proj_in, ffn.gate, ffn.proj_out, ffn.gated) == (
        "layers.0.feed_forward.w3",
        "layers.0.feed_forward.w1",
        "layers.0.feed_forward.w2",
        False,
    )
    assert ffn.token_mask == TokenMask("layers.0", "attn_mask")
    qk = units["layers.0.attention.qk"].layout
    assert qk.rope and not qk.norms_head_major and qk.norms_q == ("layers.0.attention.norm_q",)
    # the context refiner acts on caption tokens only: the text stream, with its padding mask
    ctx = units["context_refiner.0.attention.qk"].layout
    assert ctx.text_mask == TokenMask("context_refiner.0", "attn_mask") and len(ctx.text_linears) == 4
    assert units["context_refiner.0.feed_forward"].layout.stream == "text"
    assert qk.text_mask is None and ffn.stream == "image"
    # every statistic site keeps only its block's real tokens
    sites = adapter.stat_sites(model)
    assert sites and all(
        s.mask_arg == "attn_mask" and s.module.startswith(f"{s.mask_module}.") for s in sites
    )
    # dim 32, 2 heads, no biases: QK = rows of to_q, to_k; VO = rows of to_v + columns of to_out.0;
    # FFN = a row of w3, a row of w1 (the gate) and a column of w2, int(32 / 3 * 8) = 85 neurons
    assert units["layers.0.attention.qk"].cost_per_rank == 2 * 2 * 32
    assert units["layers.0.attention.vo"].cost_per_rank == 2 * (32 + 32)
    assert units["layers.0.feed_forward"].cost_per_rank == 3 * 32
    assert units["layers.0.feed_forward"].full_rank == 85
    assert (
        sum(u.full_params for u in units.values())
        == sum(
            count_parameters(model.get_submodule(f"{b}.{m}"))
            for b in BLOCKS
            for m in ("attention", "feed_forward")
        )
        - len(BLOCKS) * 2 * 16
    )  # the q/k norms' weights are not in any unit
    # the Omni variant's SigLIP refiner blocks are the same class: listed the same way
    omni = compression_units(tiny(siglip_feat_dim=8))
    assert {"siglip_refiner.0.attention.qk", "siglip_refiner.0.feed_forward"} <= set(omni)


def test_rope_angles_are_the_models_positions():
    """Caption token j at (1 + j, 0, 0), its pad tokens (to a multiple of 32) too; image patch
    (row, column) at (L + 1, row, column), L the padded caption length, the image's pad tokens at
    (0, 0, 0); every angle comes from the model's own patchify and ``rope_embedder`` (theta 256)."""
    model = tiny()
    adapter = adapter_for(model)
    h, w, text = 6, 8, 5  # latent grid -> 3 x 4 patches (12, padded to 32); 5 caption tokens (-> 32)
    angles = adapter.rope_angles(model, (h, w), text)  # [image; caption]
    axes = (4, 6, 6)
    freqs = [256.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes]

    def at(a: int, b: int, c: int) -> torch.Tensor:
        return torch.cat([a * freqs[0], b * freqs[1], c * freqs[2]])

    image = [at(33, r, c) for r in range(h // 2) for c in range(w // 2)] + [at(0, 0, 0)] * 20
    caption = [at(1 + j, 0, 0) for j in range(32)]  # the caption's pad tokens continue the count
    ref = torch.stack(image + caption)
    assert angles.shape == (64, sum(axes) // 2)
    diff = torch.remainder(angles - ref + math.pi, 2 * math.pi) - math.pi  # angles are mod 2 pi
    assert diff.abs().max() < 1e-5
    # the serving shape's default: the pipeline's 128 x 128 latents and 512 caption tokens
    assert adapter.sample_size(model) == (128, 128)
    assert adapter.rope_angles(model).shape == (64 * 64 + 512, 8)


def test_slim_processor_reproduces_the_stock_processor_with_padding():
    """Nothing compressed: SlimZImageAttnProcessor on the stock layers equals the stock
    ZSingleStreamAttnProcessor (norms, RoPE, the batch-padding mask), and the mask matters."""
    model = tiny(seed=1)
    x = inputs(model, 2)
    ref = run(model, x)
    slim = copy.deepcopy(model)
    for name in BLOCKS:
        slim.get_submodule(f"{name}.attention").set_processor(SlimZImageAttnProcessor(scale=16**-0.5))
    assert rel(run(slim, x), ref) < 1e-6
    # one attention called directly: the padding mask changes the real tokens' outputs
    attn = model.layers[0].attention
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 40, 32, generator=gen)
    freqs = torch.polar(torch.ones(2, 40, 8), torch.randn(2, 40, 8, generator=gen))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    with torch.no_grad():
        stock = attn(hidden, attention_mask=mask, freqs_cis=freqs)
        ours = slim.layers[0].attention(hidden, attention_mask=mask, freqs_cis=freqs)
        unmasked = slim.layers[0].attention(hidden, freqs_cis=freqs)
    assert rel(ours, stock) < 1e-6
    assert rel(unmasked[1, :25], stock[1, :25]) > 1e-3  # far above float32 rounding


# -- (a) full rank, (b) parameter counts -------------------------------------------------------------
def test_full_rank_rewrite_reproduces_the_original(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    full = RankPlan.from_ranks(units, {n: u.full_rank for n, u in units.items()})
    slim = copy.deepcopy(model)
    compress_(slim, full, cov, rewrite_full_rank=True)
    assert type(slim.layers[0].attention.processor) is SlimZImageAttnProcessor
    assert slim.layers[0].attention.slim_rope_index.shape == (2, 16)
    for captions in (CAPTIONS, (30,), (7, 7)):
        x = inputs(model, 3, captions)
        assert rel(run(slim, x), run(model, x)) < 1e-5


def test_parameter_count_is_what_the_plan_says(calibrated):
    """Parameters removed = sum over units of (full rank - rank) x cost per rank, the plan's
    removed_params (an FFN neuron: its w1 row, w3 row and w2 column); pair selection replaces
    each of the 2 q/k RMSNorms (d_h weights) of a narrowed QK by a per-head one (heads x r), which
    the plan's unit costs leave out. w1 and w3 keep the same neurons, and the LoRA maps say so."""
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
    norms = sum(2 * (2 * p.rank - 16) for p in plan.compressed_units().values() if p.kind == "qk")
    assert count_parameters(slim) == count_parameters(model) - removed + norms == report.params_after
    ff, k = slim.layers[0].feed_forward, plan.units["layers.0.feed_forward"].rank
    assert (ff.w1.out_features, ff.w3.out_features, ff.w2.in_features) == (k, k, k)
    assert slim.layers[0].attention.to_k.out_features == 2 * 6
    maps = slim.slimdiff_lora_maps.layers
    w1, w3 = maps["layers.0.feed_forward.w1"], maps["layers.0.feed_forward.w3"]
    assert w1.kind == w3.kind == "rows_index" and torch.equal(w1.tensors["index"], w3.tensors["index"])
    orig = model.layers[0].feed_forward
    assert torch.equal(ff.w1.weight, orig.w1.weight[w1.tensors["index"]])
    assert torch.equal(ff.w3.weight, orig.w3.weight[w3.tensors["index"]])
    x = inputs(model, 7)
    assert rel(run(slim, x), run(model, x)) < 0.5  # 0.26 measured (random weights; a sanity bound)


# -- (c) known answer ---------------------------------------------------------------------------------
def zero_pairs(model: nn.Module, dropped: dict[int, list[int]], d: int = 16) -> nn.Module:
    """Zero the q/k rows of the given rotary pairs of every head in every block: those pairs carry
    no logit, so dropping exactly them is exact."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name in BLOCKS:
            attn = model.get_submodule(f"{name}.attention")
            for layer in (attn.to_q, attn.to_k):
                for h, pairs in dropped.items():
                    for p in pairs:
                        layer.weight[h * d + 2 * p : h * d + 2 * p + 2] = 0.0
    return model


def test_pairs_that_carry_nothing_are_dropped_and_the_output_is_unchanged():
    """Known answer: pairs {1, 4, 6} (head 0) and {0, 2, 7} (head 1) zeroed in to_q and to_k of
    every block; a QK rank of 10 (5 of 8 pairs) selects the other pairs, and with the norms' scale
    corrected the compressed model equals the original, batch padding included."""
    model = zero_pairs(tiny(seed=3), {0: [1, 4, 6], 1: [0, 2, 7]})
    cov = covariances(model)
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, qk_ranks(units, 10), cov)
    for name in BLOCKS:
        attn = slim.get_submodule(f"{name}.attention")
        assert attn.slim_rope_index[0].tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 14, 15]
        assert attn.slim_rope_index[1].tolist() == [2, 3, 6, 7, 8, 9, 10, 11, 12, 13]
        assert attn.to_q.out_features == attn.to_k.out_features == 2 * 10
    for captions in (CAPTIONS, (12,)):
        x = inputs(model, 5, captions)
        assert rel(run(slim, x), run(model, x)) < 1e-5


# -- (d) padded tokens ----------------------------------------------------------------------------------
def test_batch_padding_never_enters_the_statistics():
    """Captions of 20 and 45 tokens are padded (learned pad token) to 32 and 64 and the batch to 64
    (zeros, masked): every statistic counts the image and caption tokens with their learned pads
    (those are attended) and none of the batch padding; its sums are the grams of the hooked
    activations at those tokens, and equal the sums over the two samples run alone (no batch
    padding: nothing to mask)."""
    model = tiny(seed=2)
    x = inputs(model, 11)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path in ("feed_forward.w2", "attention.to_out.0"):
        for b in ("context_refiner.0", "layers.1"):
            mod = model.get_submodule(f"{b}.{path}")
            handles.append(
                mod.register_forward_pre_hook(
                    lambda m, a, p=f"{b}.{path}": seen.setdefault(p, []).append(a[0])
                )
            )
    for path in ("attention.to_k", "attention.norm_q"):
        mod = model.get_submodule(f"layers.1.{path}")
        handles.append(
            mod.register_forward_hook(lambda m, a, o, p=f"layers.1.{path}": seen.setdefault(p, []).append(o))
        )
    col = collect(model, [x])
    for h in handles:
        h.remove()
    stats = col.stats()
    tokens = {k: int(v.sum()) for k, v in stats.tokens.items()}
    caps = [pad32(n) for n in CAPTIONS]  # 32, 64
    expected = {
        "noise_refiner.0": 2 * N_IMG,
        "context_refiner.0": sum(caps),
        "layers.0": sum(N_IMG + c for c in caps),
        "layers.1": sum(N_IMG + c for c in caps),
    }
    for b, n in expected.items():
        assert tokens[f"{b}.feed_forward.hidden"] == n, b
        for which in ("query", "key", "query_normed", "key_normed", "attnout"):
            assert tokens[f"{b}.attention.{which}"] == n, (b, which)

    def real(a: torch.Tensor, lengths: list[int]) -> torch.Tensor:  # (B, N, ...) -> (tokens, ...)
        return torch.cat([a[i, :n] for i, n in enumerate(lengths)])

    def gram(a: torch.Tensor) -> torch.Tensor:
        a = a.double().flatten(1)
        return a.T @ a

    def head_gram(a: torch.Tensor) -> torch.Tensor:  # (M, 2 * 16) -> (2, 16, 16)
        a = a.double().reshape(-1, 2, 16)
        return torch.einsum("mhd,mhe->hde", a, a)

    def close(key: str, ref: torch.Tensor) -> None:
        got = stats.moments[key][0]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))

    main = [N_IMG + c for c in caps]
    (hc,), (hl,) = seen["context_refiner.0.feed_forward.w2"], seen["layers.1.feed_forward.w2"]
    assert hc.shape[1] == 64 and hl.shape[1] == 96  # the batch padding is there
    close("context_refiner.0.feed_forward.hidden", gram(real(hc, caps)))
    close("layers.1.feed_forward.hidden", gram(real(hl, main)))
    (oc,), (ol,) = seen["context_refiner.0.attention.to_out.0"], seen["layers.1.attention.to_out.0"]
    close("context_refiner.0.attention.attnout", head_gram(real(oc, caps)))
    close("layers.1.attention.attnout", head_gram(real(ol, main)))
    (k,), (qn,) = seen["layers.1.attention.to_k"], seen["layers.1.attention.norm_q"]
    assert qn.shape == (2, 96, 2, 16)  # (B, N, heads, d_h)
    close("layers.1.attention.key", head_gram(real(k, main)))
    close("layers.1.attention.query_normed", head_gram(real(qn, main)))

    (x0, t0, c0), _ = x  # each sample of the batch alone
    alone = [collect(model, [(([x0[i]], t0[i : i + 1], [c0[i]]), {})]).stats() for i in range(2)]
    for key, m in stats.moments.items():
        total = alone[0].moments[key] + alone[1].moments[key]
        torch.testing.assert_close(m, total, rtol=0, atol=1e-5 * float(m.abs().max()))
        assert int(alone[0].tokens[key].sum() + alone[1].tokens[key].sum()) == tokens[key]


# -- (e) relative positions ---------------------------------------------------------------------------
class ShiftedRope:
    """The model's ``rope_embedder`` with every position id moved by ``offset``; ``image_only``:
    only the image tokens' table (the model's first call of each forward) is moved."""

    def __init__(self, rope, offset: tuple[int, int, int], image_only: bool = False):
        self.rope, self.offset, self.image_only, self.calls = rope, torch.tensor(offset), image_only, 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.image_only and self.calls % 2 == 0:  # the caption's call
            return self.rope(ids)
        return self.rope(ids + self.offset.to(ids))


def test_compressed_attention_keeps_relative_position_equivariance(calibrated):
    """A global position shift leaves a RoPE model's output unchanged; whole-pair selection with
    narrowed tables keeps that (QK at 8 of 16 coordinates everywhere). Moving the image tokens
    alone changes both models' outputs (image-caption relative positions change)."""
    model, cov = calibrated
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, qk_ranks(units, 8), cov)
    assert slim.layers[1].attention.slim_rope_index.shape == (2, 8)
    x = inputs(model, 9)
    for name, m in (("original", model), ("compressed", slim)):
        base, rope = run(m, x), m.rope_embedder
        try:
            m.rope_embedder = ShiftedRope(rope, (3, 5, 2))
            assert rel(run(m, x), base) < 1e-5, name
            m.rope_embedder = ShiftedRope(rope, (3, 5, 2), image_only=True)
            assert rel(run(m, x), base) > 1e-3, name
        finally:
            m.rope_embedder = rope


# -- FLOPs and refusals -------------------------------------------------------------------------------
def test_plan_flops_are_the_flop_count():
    """The FLOP cost per rank of an FFN counts its gate rows: a plan's predicted FLOPs equal the
    count on a skeleton with the plan's shapes."""
    model = tiny()
    shape = ServingShape(HW, batch=2, text_len=40)
    costs = unit_flop_costs(model, shape)
    assert costs.total == denoiser_flops(model, 2, HW, 40).total
    units = compression_units(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        ranks = {
            n: 2 * int(torch.randint(1, u.full_rank // 2 + 1, (1,), generator=gen)) for n, u in units.items()
        }
        with torch.device("meta"):
            skeleton = type(model).from_config(model.config)
        apply_plan_shapes_(skeleton, RankPlan.from_ranks(units, ranks))
        assert costs.plan_flops(ranks) == denoiser_flops(skeleton, 2, HW, 40).total


def test_what_is_not_understood_is_refused():
    """Fused projections, another attention processor, no q/k norms, another FFN: refused with
    the module and its block type named."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = tiny()
    model.layers[1].attention.fuse_projections()
    with pytest.raises(
        UnsupportedModelError, match=r"layers\.1\.attention \(ZImageTransformerBlock\).*unfuse"
    ):
        compression_units(model)
    model = tiny()
    model.context_refiner[0].attention.set_processor(AttnProcessor2_0())
    with pytest.raises(
        UnsupportedModelError,
        match=r"context_refiner\.0\.attention \(ZImageTransformerBlock\).*AttnProcessor2_0",
    ):
        adapter_for(model).stat_sites(model)
    with pytest.raises(UnsupportedModelError, match=r"norm_q \(ZImageTransformerBlock\).*RMSNorm"):
        compression_units(tiny(qk_norm=False))
    model = tiny()
    model.layers[0].feed_forward = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    with pytest.raises(UnsupportedModelError, match=r"layers\.0\.feed_forward \(ZImageTransformerBlock\)"):
        compression_units(model)


# -- (f) through the pipeline: calibrate with its own sampler, compress, save, load ------------------
def test_pipeline_calibrates_compresses_and_loads_with_diffusers(tmp_path):
    """A tiny ZImagePipeline: statistics come from its own flow-matching sampler (the transformer
    gets (1000 - t) / 1000) with classifier-free guidance (scale 4 -> the pipeline's 3, prompts and
    negative prompts in one batch: two branches); the captions' padded lengths differ, so the
    batch is padded and those tokens are counted nowhere (the counts are the ones computed from the
    encoded prompts' lengths). The compressed pipeline saves and loads with
    ``DiffusionPipeline.from_pretrained`` to the same latents."""
    from diffusers import DiffusionPipeline
    from family_pipelines import PROMPTS, WORDS

    from slimdiff.calibration.collect import collect_stats
    from slimdiff.formats.io import save_compressed
    from slimdiff.planning.influence import compute_influence

    pipe = tiny_zimage_pipeline(tmp_path / "build")
    model = pipe.transformer
    adapter = adapter_for(model)
    assert adapter.guidance_kwargs(model, 4.0, 2) == ({"guidance_scale": 3.0}, 2)
    assert adapter.text_len(pipe) == 512  # the pipeline's max_sequence_length: a bound
    prompts = [PROMPTS[0] + " " + " ".join(WORDS), PROMPTS[4]]  # 26 and 2 words
    # (the pipeline rewrites a prompt list in place with its chat template: pass copies)
    pos, neg = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=True)
    caps = [pad32(len(e)) for e in pos + neg]  # what the transformer pads each caption to
    assert caps == [64, 32, 32, 32]
    n_img = (ZIMAGE_HW // 2) ** 2  # 64 patches, a multiple of 32
    steps = 4
    stats = collect_stats(
        pipe, list(prompts), num_inference_steps=steps, guidance_scale=4.0, n_buckets=2, batch_size=2,
        height=ZIMAGE_HW, width=ZIMAGE_HW, progress=False,
    )  # fmt: skip
    assert stats.meta["cfg_branches"] == 2 and stats.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    q = stats.tokens["layers.1.attention.query"]
    assert int(q.sum()) == steps * sum(n_img + c for c in caps)  # not steps * 4 * (64 + 64)
    assert q.tolist() == [q[0].item()] * 2  # 2 steps per bucket
    assert int(stats.tokens["context_refiner.0.feed_forward.hidden"].sum()) == steps * sum(caps)
    assert int(stats.tokens["noise_refiner.0.attention.key"].sum()) == steps * 4 * n_img

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
    assert type(loaded).__name__ == "ZImagePipeline"
    assert type(loaded.transformer).__name__ == "SlimZImageTransformer2DModel"
    assert loaded.transformer.slimdiff_plan == plan
    assert type(loaded.transformer.layers[0].attention.processor) is SlimZImageAttnProcessor
    assert torch.equal(
        loaded.transformer.layers[0].attention.slim_rope_index, model.layers[0].attention.slim_rope_index
    )
    for module in loaded.components.values():  # fresh allocations: mmap offsets change CPU rounding
        if isinstance(module, nn.Module):
            for t in [*module.parameters(), *module.buffers()]:
                t.data = t.data.clone()
    kw = dict(
        num_inference_steps=2, height=ZIMAGE_HW, width=ZIMAGE_HW, output_type="latent", guidance_scale=3.0
    )
    a = pipe(list(prompts), generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded(list(prompts), generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)
