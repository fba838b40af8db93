"""FLUX.3 (``Flux3Transformer2DModel``): the adapter (image and text per-mode blocks and the joint
single blocks compressed, the reference-image per-mode blocks left whole), the packed SwiGLU FFN,
RoPE pair selection with the pipeline's positions, the compressed processor, statistics through a
hand-written flow-matching sampler with classifier-free guidance, the plan's parameter count and
FLOPs, save / load, and the refusals; on a tiny model built from config (random weights, fixed
seeds).

diffusers 0.42.1 has no ``DiffusionPipeline`` for FLUX.3, only the modular ``Flux3ModularPipeline``
(a Qwen3-VL text encoder, one prompt per call), which slimdiff's ``collect_stats`` does not drive;
the sampler here calls the transformer as that pipeline's denoise step does (``timestep`` = t / 1000,
the pipeline's position ids, conditional and unconditional branches batched).

References and tolerances:
* rotary angles against the RoPE formula written out here (4 axes of 4 coordinates, theta 2000,
  image (0, row / 2, column / 2, 0), text (0, 0, 0, j)): the model's tables are float32, so 1e-5 rad;
* the compressed processor with nothing compressed, a full-rank rewrite, selections that drop only
  pairs / neurons carrying nothing (zeroed q/k rows, zeroed up rows), and a compressed attention
  against attention over the kept pairs computed by hand from the angle formula, all in float32:
  exact maths, so the tolerance is float32 rounding (1e-5 relative; the processor swap alone: 1e-6);
* a global position shift leaves the logits unchanged in exact arithmetic; float32 tables: 1e-5;
* statistics against grams of the hooked activations (float32 products summed in float64: 1e-6 of
  the largest entry), token counts exactly;
* parameter counts, FLOPs, kept indices and saved / loaded outputs exactly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from family_contract import rel, run
from torch import nn

from slimdiff.calibration.collect import ActivationCollector
from slimdiff.families import UnsupportedModelError, adapter_for
from slimdiff.families.attention import HeadwiseRMSNorm
from slimdiff.families.flux3 import SlimFlux3AttnProcessor
from slimdiff.families.units import compressible_parameter_count, compression_units, count_parameters
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import ServingShape, denoiser_flops, unit_flop_costs
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.planning.streams import linear_costs
from slimdiff.surgery.compress import apply_plan_shapes_, compress_

HW, TEXT = (8, 8), 6  # latent 8x8 -> 4x4 = 16 packed image tokens, 6 text tokens
N_IMG, N_REF, D_H, HEADS, INNER, DIM = 16, 9, 16, 2, 96, 32
CHANNELS, TEXT_DIM = 16, 24
IMAGE = ("mode_blocks.image.0", "mode_blocks.image.1")
TXT = ("txt_mode_blocks.0", "txt_mode_blocks.1")
SINGLE = ("single_transformer_blocks.0", "single_transformer_blocks.1")
BLOCKS = IMAGE + TXT + SINGLE


def tiny_flux3(seed: int = 0, *, flow_map: bool = False):
    """A FLUX.3-shaped transformer: 2 per-mode blocks per mode (image, reference image, text) and 2
    joint single blocks, 2 heads x 16 (inner dim 32), SwiGLU FFNs of 3 x 32 = 96 neurons, RoPE on 4
    axes (t, h, w, l) of 4 coordinates each at theta 2000, 16 latent channels, text width 24."""
    from diffusers import Flux3Transformer2DModel

    torch.manual_seed(seed)
    return Flux3Transformer2DModel(
        in_channels=CHANNELS, cond_in_channels=CHANNELS, num_layers=2, num_single_layers=2,
        attention_head_dim=D_H, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
        timestep_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, flow_map=flow_map,
    ).eval()  # fmt: skip


def inputs(model, seed: int, batch: int = 2, reference: bool = False):
    args, kwargs = adapter_for(model).example_inputs(
        model, batch, HW, TEXT, device="cpu", generator=torch.Generator().manual_seed(seed)
    )
    if reference:  # one 3x3 reference image at l = -1, as the pipeline places reference 0
        gen = torch.Generator().manual_seed(seed + 1000)
        ids = torch.zeros(3, 3, 4)
        ids[..., 1] += 0.5 * torch.arange(3)[:, None]
        ids[..., 2] += 0.5 * torch.arange(3)[None, :]
        ids[..., 3] = -1.0
        kwargs["image_cond_hidden_states"] = torch.randn(batch, N_REF, CHANNELS, generator=gen)
        kwargs["image_cond_ids"] = ids.reshape(N_REF, 4)
    return args, kwargs


def covariances(model, n: int = 4) -> dict[str, torch.Tensor]:
    col = ActivationCollector(model, 1)
    with col:
        for i in range(n):
            run(model, inputs(model, 100 + i))
    return col.stats().aggregate([1.0])


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_flux3()
    return model, covariances(model)


def ranks(units, **by_kind: int) -> RankPlan:
    return RankPlan.from_ranks(units, {n: by_kind.get(u.kind, u.full_rank) for n, u in units.items()})


# -- the adapter -----------------------------------------------------------------------------------
def test_units_layouts_and_costs():
    """Three units per compressed block (QK, VO, the packed SwiGLU FFN), for the image and text
    per-mode blocks and the joint blocks; the reference-image per-mode blocks have none. The text
    per-mode blocks are the text stream; no biases anywhere."""
    model = tiny_flux3()
    adapter = adapter_for(model)
    assert adapter.family.startswith("FLUX.3") and type(adapter).__name__ == "Flux3Adapter"
    units = compression_units(model)
    assert {n: u.kind for n, u in units.items()} == {
        f"{b}.{s}": k for b in BLOCKS for s, k in (("attn.qk", "qk"), ("attn.vo", "vo"), ("ff", "ffn"))
    }
    assert list(units)[:3] == [
        "mode_blocks.image.0.attn.qk",
        "mode_blocks.image.0.attn.vo",
        "mode_blocks.image.0.ff",
    ]
    assert not any("image_cond" in n for n in units)
    for b in BLOCKS:
        qk, vo, ff = (units[f"{b}.{s}"] for s in ("attn.qk", "attn.vo", "ff"))
        lay = qk.layout
        assert lay is vo.layout and lay.rope and not lay.norms_head_major and not lay.norms_across_heads
        assert (lay.heads, lay.head_dim, lay.module) == (HEADS, D_H, f"{b}.attn")
        assert (lay.query, lay.key, lay.value, lay.out) == (
            (f"{b}.attn.to_q",), (f"{b}.attn.to_k",), (f"{b}.attn.to_v",), (f"{b}.attn.to_out.0",)
        )  # fmt: skip
        assert (lay.norms_q, lay.norms_k) == ((f"{b}.attn.norm_q",), (f"{b}.attn.norm_k",))
        text = b.startswith("txt")
        assert lay.text_linears == ((*lay.query, *lay.key, *lay.value, *lay.out) if text else ())
        assert (ff.layout.proj_in, ff.layout.proj_out, ff.layout.gated, ff.layout.stream) == (
            f"{b}.ff.linear_in", f"{b}.ff.linear_out", True, "text" if text else "image"
        )  # fmt: skip
        # dim 32: QK = a head's rows of to_q and to_k; VO = its to_v rows and to_out.0 columns; FFN =
        # a neuron's gate and up rows of linear_in and its linear_out column
        assert (qk.cost_per_rank, vo.cost_per_rank, ff.cost_per_rank) == (
            HEADS * 2 * DIM,
            HEADS * 2 * DIM,
            3 * DIM,
        )
        assert (qk.full_rank, vo.full_rank, ff.full_rank) == (D_H, D_H, INNER)
        streams = {s for s, _ in linear_costs(model, qk).values()}
        assert streams == {"text" if text else "image"}
    sites = {(s.key, s.module, s.kind, s.head_major) for s in adapter.stat_sites(model)}
    b = "txt_mode_blocks.1"
    assert sites >= {
        (f"{b}.attn.query", f"{b}.attn.to_q", "post", False),
        (f"{b}.attn.query_normed", f"{b}.attn.norm_q", "post", False),
        (f"{b}.attn.attnout", f"{b}.attn.to_out.0", "pre", False),
        (f"{b}.ff.hidden", f"{b}.ff.linear_out", "pre", False),
    }
    assert not any("image_cond" in s[1] for s in sites)
    # sampling conventions: the pipeline passes t / 1000; classifier-free guidance unless flow map
    x = inputs(model, 0)
    assert float(adapter.timestep(model, x[0], x[1])[0]) == 500.0
    assert adapter.guidance_kwargs(model, 4.0, 2) == ({"guidance_scale": 4.0}, 2)
    flow = tiny_flux3(flow_map=True)
    assert adapter_for(flow).guidance_kwargs(flow, 4.0, 2) == ({}, 1)
    assert "target_timestep" in inputs(flow, 0)[1] and "target_timestep" not in x[1]
    assert adapter.sample_size(model) == (128, 128)


def test_rope_angles_are_the_pipelines_image_and_text_positions():
    """Image token (row, column) at (0, row / 2, column / 2, 0) (the pipeline's image_rope_scale),
    text token j at (0, 0, 0, j): the angles from the model's own ``pos_embed`` against the formula,
    [text; image]; default serving shape 128 x 128 latents and 512 text tokens."""
    model = tiny_flux3()
    adapter = adapter_for(model)
    h, w = 6, 8  # latent grid -> 3 x 4 packed tokens
    angles = adapter.rope_angles(model, (h, w), 5)
    freq = 2000.0 ** (-torch.arange(0, 4, 2, dtype=torch.float64) / 4)  # one axis: 2 pairs

    def angle(t, r, c, j):
        return torch.cat([t * freq, r * freq, c * freq, j * freq])

    ref = torch.stack(
        [angle(0, 0, 0, j) for j in range(5)]
        + [angle(0, r / 2, c / 2, 0) for r in range(h // 2) for c in range(w // 2)]
    )
    assert angles.shape == (5 + 12, 8)
    diff = torch.remainder(angles - ref + math.pi, 2 * math.pi) - math.pi  # angles are mod 2 pi
    assert diff.abs().max() < 1e-5
    assert adapter.rope_angles(model).shape == (512 + 64 * 64, 8)
    c, s = adapter.rope_phases(model)
    assert c.shape == s.shape == (8, 8)


def test_slim_processor_reproduces_the_stock_processor():
    """Nothing compressed: SlimFlux3AttnProcessor on every attention (the reference-image blocks
    too) equals Flux3AttnProcessor, with and without reference images; fused projections are
    refused at run time, not ignored."""
    model = tiny_flux3(seed=1)
    slim = copy.deepcopy(model)
    for m in slim.modules():
        if type(m).__name__ == "Flux3Attention":
            m.set_processor(SlimFlux3AttnProcessor(scale=D_H**-0.5))
    for reference in (False, True):
        x = inputs(model, 2, reference=reference)
        assert rel(run(slim, x), run(model, x)) < 1e-6
    slim.single_transformer_blocks[0].attn.fuse_projections()
    with pytest.raises(UnsupportedModelError, match="SlimFlux3AttnProcessor: fused"):
        run(slim, inputs(model, 2))


# -- statistics ---------------------------------------------------------------------------------------
def sample(model, scheduler, steps: int, *, guidance: float = 4.0, reference: bool = False, seed: int = 0):
    """A flow-matching Euler sampler as Flux3ModularPipeline's denoise step calls the transformer:
    the conditional and the unconditional branch batched (two prompts, two negatives), timestep
    t / 1000 for both, the pipeline's position ids (the same for both branches)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, N_IMG, CHANNELS, generator=gen)
    text = torch.randn(4, TEXT, TEXT_DIM, generator=gen)  # [prompts; negative prompts]
    _, kwargs = inputs(model, seed, batch=4, reference=reference)
    kwargs["encoder_hidden_states"] = text
    scheduler.set_timesteps(steps)
    calls = []
    for t in scheduler.timesteps:
        kwargs["timestep"] = (t / 1000).expand(4)
        with torch.no_grad():
            v = model(hidden_states=torch.cat([latents, latents]), **kwargs).sample
        calls.append(float(t))
        cond, uncond = v.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents, calls


def head_gram(a: torch.Tensor) -> torch.Tensor:
    """(..., 2 * 16) or (..., 2, 16) -> per-head grams (2, 16, 16), float64."""
    a = a.double().reshape(-1, HEADS, D_H)
    return torch.einsum("mhd,mhe->hde", a, a)


@pytest.mark.parametrize("reference", [False, True], ids=["text-to-image", "reference-image"])
def test_statistics_through_a_sampler_count_every_modes_tokens(reference):
    """Statistics over 4 steps of the sampler in 2 timestep buckets (the collector maps the
    transformer's t / 1000 back to the scheduler's timesteps): per bucket 2 steps x 4 samples (2
    prompts x 2 branches); the image per-mode blocks count the image tokens, the text per-mode
    blocks the text tokens, the joint blocks both (and the reference tokens when there are some,
    whose own per-mode blocks are not hooked). Grams equal those of the hooked activations."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_flux3(seed=2)
    scheduler = FlowMatchEulerDiscreteScheduler()
    col = ActivationCollector(model, 2, scheduler=scheduler)
    seen: dict[str, list[torch.Tensor]] = {}

    def record(path: str, pre: bool):  # the hooked input (pre) or output of module ``path``, every call
        module = model.get_submodule(path)
        if pre:
            return module.register_forward_pre_hook(lambda m, a: seen.setdefault(path, []).append(a[0]))
        return module.register_forward_hook(lambda m, a, o: seen.setdefault(path, []).append(o))

    hooks = [
        *(
            record(p, True)
            for p in ("txt_mode_blocks.1.ff.linear_out", "single_transformer_blocks.0.attn.to_out.0")
        ),
        *(
            record(p, False)
            for p in ("mode_blocks.image.0.attn.to_k", "single_transformer_blocks.1.attn.norm_q")
        ),
    ]
    try:
        with col:
            _, calls = sample(model, scheduler, 4, reference=reference)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 4
    stats = col.stats()
    assert set(stats.moments) == {
        k for u in compression_units(model).values() for k in (*u.stat_keys(), *u.first_moment_keys())
    }
    per_call = {"image": N_IMG, "txt": TEXT, "single": TEXT + N_IMG + (N_REF if reference else 0)}
    keys = ("attn.query", "attn.key", "attn.query_normed", "attn.key_normed", "attn.attnout", "ff.hidden")
    for b in BLOCKS:
        n = per_call["image" if b in IMAGE else "txt" if b in TXT else "single"]
        for key in keys:
            assert stats.tokens[f"{b}.{key}"].tolist() == [2 * 4 * n] * 2, (b, key)

    def close(key: str, ref: torch.Tensor) -> None:
        got = stats.moments[key].sum(0)  # both buckets
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))

    hidden = torch.cat([a.flatten(0, 1) for a in seen["txt_mode_blocks.1.ff.linear_out"]]).double()
    close("txt_mode_blocks.1.ff.hidden", hidden.T @ hidden)
    close("mode_blocks.image.0.attn.key", sum(head_gram(a) for a in seen["mode_blocks.image.0.attn.to_k"]))
    normed = seen["single_transformer_blocks.1.attn.norm_q"]
    assert normed[0].shape == (4, per_call["single"], HEADS, D_H) and normed[0].dtype == torch.float32
    close("single_transformer_blocks.1.attn.query_normed", sum(head_gram(a) for a in normed))
    out = seen["single_transformer_blocks.0.attn.to_out.0"]
    close("single_transformer_blocks.0.attn.attnout", sum(head_gram(a) for a in out))


# -- full rank, known answers, parameter count ---------------------------------------------------------
def test_full_rank_rewrite_reproduces_the_original(calibrated):
    """Every unit rebuilt at full rank (pair selection of all pairs, a Nystrom refit of every FFN, a
    full VO) computes the original model, with and without reference images; the reference-image
    blocks keep the stock processor and their weights."""
    model, cov = calibrated
    units = compression_units(model)
    slim = copy.deepcopy(model)
    compress_(slim, ranks(units), cov, rewrite_full_rank=True)
    from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor

    for b in BLOCKS:
        attn = slim.get_submodule(f"{b}.attn")
        assert type(attn.processor) is SlimFlux3AttnProcessor and attn.slim_rope_index.shape == (HEADS, D_H)
        assert type(attn.norm_q) is HeadwiseRMSNorm
    for old, new in zip(model.mode_blocks["image_cond"], slim.mode_blocks["image_cond"], strict=True):
        assert type(new.attn.processor) is Flux3AttnProcessor
        assert all(torch.equal(p, q) for p, q in zip(old.parameters(), new.parameters(), strict=True))
    for reference in (False, True):
        x = inputs(model, 3, reference=reference)
        assert rel(run(slim, x), run(model, x)) < 1e-5


DROPPED = {0: [1, 4, 6], 1: [0, 2, 7]}  # rotary pairs zeroed in every attention, per head
KEPT_INDEX = {0: [0, 1, 4, 5, 6, 7, 10, 11, 14, 15], 1: [2, 3, 6, 7, 8, 9, 10, 11, 12, 13]}


def zero_pairs(model: nn.Module) -> nn.Module:
    """Zero the q/k rows of the ``DROPPED`` rotary pairs of every head in every compressed block:
    those pairs carry no logit, so dropping exactly them is exact."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for b in BLOCKS:
            attn = model.get_submodule(f"{b}.attn")
            for weight in (attn.to_q.weight, attn.to_k.weight):
                for h, pairs in DROPPED.items():
                    for p in pairs:
                        weight[h * D_H + 2 * p : h * D_H + 2 * p + 2] = 0.0
    return model


def by_hand(attn: nn.Module, x: torch.Tensor, ids: torch.Tensor, kept: dict[int, list[int]]) -> torch.Tensor:
    """The attention of ``attn`` (stock, full width) on ``x`` (B, N, 32) at positions ``ids`` (N, 4)
    with every head's logits summed over its ``kept`` rotary pairs only, written out: per-head
    RMSNorm of q and k, pair p of axis a = p // 2 turned by ids[:, a] * 2000^(-(p % 2) / 2) (as
    complex numbers), softmax at 1/sqrt(16), values, to_out."""
    b, n, _ = x.shape
    with torch.no_grad():
        q, k, v = (lin(x).double().view(b, n, HEADS, D_H) for lin in (attn.to_q, attn.to_k, attn.to_v))

        def norm(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight.double()

        q, k = norm(q, attn.norm_q), norm(k, attn.norm_k)
        pairs = torch.arange(8)
        theta = ids.double()[:, pairs // 2] * 2000.0 ** (-(pairs % 2).double() / 2)  # (N, 8)
        turn = torch.polar(torch.ones_like(theta), theta)  # (N, 8)
        zq = torch.complex(q[..., 0::2], q[..., 1::2]) * turn[None, :, None, :]  # (B, N, H, 8)
        zk = torch.complex(k[..., 0::2], k[..., 1::2]) * turn[None, :, None, :]
        out = torch.zeros(b, n, HEADS, D_H, dtype=torch.float64)
        for h, ps in kept.items():
            logits = torch.einsum("bmp,bnp->bmn", zq[:, :, h, ps], zk[:, :, h, ps].conj()).real / 4.0
            out[:, :, h] = logits.softmax(-1) @ v[:, :, h]
        return attn.to_out[0](out.flatten(2).float())


def test_pairs_that_carry_nothing_are_dropped_and_match_a_hand_computation():
    """Known answer: pairs {1, 4, 6} (head 0) and {0, 2, 7} (head 1) zeroed in every compressed
    block; a QK rank of 10 (5 of 8 pairs) keeps exactly the other pairs, the kept rows of to_q /
    to_k are the original rows, the model's output is unchanged, and every compressed attention
    equals the attention over the kept pairs computed by hand from the angle formula at its own
    mode's positions (image, text, or [text; image] for the joint blocks)."""
    model = zero_pairs(tiny_flux3(seed=3))
    slim = copy.deepcopy(model)
    compress_(slim, ranks(compression_units(model), qk=10), covariances(model))
    x = inputs(model, 5)
    img_ids, txt_ids = x[1]["img_ids"], x[1]["txt_ids"]
    gen = torch.Generator().manual_seed(6)
    for b in BLOCKS:
        old, new = model.get_submodule(f"{b}.attn"), slim.get_submodule(f"{b}.attn")
        assert {h: new.slim_rope_index[h].tolist() for h in range(HEADS)} == KEPT_INDEX
        kept_rows = (new.slim_rope_index + torch.tensor([[0], [D_H]])).flatten()
        assert torch.equal(new.to_q.weight, old.to_q.weight[kept_rows])
        assert torch.equal(new.to_k.weight, old.to_k.weight[kept_rows])
        ids = img_ids if b in IMAGE else txt_ids if b in TXT else torch.cat([txt_ids, img_ids])
        h = torch.randn(2, len(ids), DIM, generator=gen)
        with torch.no_grad():
            got = new(hidden_states=h, image_rotary_emb=slim.pos_embed(ids))
        kept = {hd: sorted({i // 2 for i in KEPT_INDEX[hd]}) for hd in range(HEADS)}
        assert rel(got, by_hand(old, h, ids, kept)) < 1e-5
        assert (
            rel(got, by_hand(old, h, ids, {hd: list(range(8)) for hd in range(HEADS)})) < 1e-5
        )  # nothing lost
    assert rel(run(slim, x), run(model, x)) < 1e-5


def test_packed_swiglu_keeps_both_rows_of_a_neuron():
    """Known answer for the packed SwiGLU: neurons whose up row (second half of linear_in) is zero
    output nothing; an FFN rank of 96 - 20 drops exactly them, keeps row j of the gate half and row
    j of the up half of every other neuron, and the output is unchanged."""
    model = tiny_flux3(seed=4)
    dead = torch.randperm(INNER, generator=torch.Generator().manual_seed(0))[:20]
    with torch.no_grad():
        for b in BLOCKS:
            model.get_submodule(f"{b}.ff").linear_in.weight[INNER + dead] = 0.0
    slim = copy.deepcopy(model)
    compress_(slim, ranks(compression_units(model), ffn=INNER - 20), covariances(model))
    alive = sorted(set(range(INNER)) - set(dead.tolist()))
    for b in BLOCKS:
        w_old, w_new = (
            model.get_submodule(f"{b}.ff.linear_in").weight,
            slim.get_submodule(f"{b}.ff.linear_in").weight,
        )
        assert w_new.shape == (2 * (INNER - 20), DIM)
        order = [int((w_old[:INNER] == w_new[k]).all(1).nonzero()) for k in range(INNER - 20)]
        assert sorted(order) == alive
        assert torch.equal(w_new[INNER - 20 :], w_old[INNER + torch.tensor(order)])
    x = inputs(model, 6)
    assert rel(run(slim, x), run(model, x)) < 1e-5


def test_parameter_count_is_what_the_plan_says(calibrated):
    """Parameters removed = the plan's removed_params; pair selection replaces the 2 q/k RMSNorms
    (d_h weights each) of a narrowed QK by per-head ones (heads x r weights), which the plan's unit
    costs leave out. The reference-image blocks keep every parameter."""
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
    full = compressible_parameter_count(model, units)
    assert full == sum(u.full_params for u in units.values())
    assert compressible_parameter_count(slim, units) == full - removed
    norms = sum(2 * (HEADS * p.rank - D_H) for p in plan.compressed_units().values() if p.kind == "qk")
    assert count_parameters(slim) == count_parameters(model) - removed + norms == report.params_after
    assert count_parameters(slim.mode_blocks["image_cond"]) == count_parameters(
        model.mode_blocks["image_cond"]
    )
    for b in BLOCKS:
        r_qk, r_vo, r_ff = (plan.units[f"{b}.{k}"].rank for k in ("attn.qk", "attn.vo", "ff"))
        blk = slim.get_submodule(b)
        assert blk.attn.to_q.weight.shape == blk.attn.to_k.weight.shape == (HEADS * r_qk, DIM)
        assert blk.attn.to_v.out_features == blk.attn.to_out[0].in_features == HEADS * r_vo
        assert blk.ff.linear_in.out_features == 2 * r_ff and blk.ff.linear_out.in_features == r_ff
    for reference in (False, True):
        x = inputs(model, 7, reference=reference)
        assert rel(run(slim, x), run(model, x)) < 0.2  # a lossy plan on random weights: it runs, close


def test_compressed_model_keeps_relative_position_equivariance(calibrated):
    """Shifting every token's position ids by one offset leaves a RoPE model unchanged (every block
    only sees differences of positions within its sequence); whole-pair selection with narrowed
    tables keeps that (QK 8 of 16). Moving the text alone changes the joint blocks' logits."""
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
    """The FLOP cost model reproduces the counted FLOPs of a compressed model and of random plans'
    skeletons; per unit of rank, on the tokens each block sees (2 FLOPs per multiply-add): QK a row
    of to_q and of to_k per head, VO a to_v row and a to_out.0 column per head, FFN a gate row, an
    up row and a linear_out column; QK and VO also one attention matmul per unit of head width."""
    model, cov = calibrated
    shape = ServingShape(HW, batch=2, text_len=TEXT)
    costs = unit_flop_costs(model, shape)
    assert costs.total == denoiser_flops(model, 2, HW, TEXT).total
    units = compression_units(model)
    for b, n in (
        ("mode_blocks.image.0", N_IMG),
        ("txt_mode_blocks.1", TEXT),
        ("single_transformer_blocks.0", N_IMG + TEXT),
    ):
        tokens, matmul = 2 * n, 2 * 2 * HEADS * n**2
        assert costs.per_rank[f"{b}.attn.qk"] == 2 * tokens * (HEADS * 2 * DIM) + matmul
        assert costs.per_rank[f"{b}.attn.vo"] == 2 * tokens * (HEADS * 2 * DIM) + matmul
        assert costs.per_rank[f"{b}.ff"] == 2 * tokens * 3 * DIM
    plan = {n: (8 if u.kind != "ffn" else 40) for n, u in units.items()}
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(units, plan), cov)
    counted = denoiser_flops(slim, 2, HW, TEXT)
    assert costs.plan_flops(plan) == counted.total < costs.total
    assert [r.dims[-2:] for r in counted.rows if r.module == "single_transformer_blocks.1.attn"] == [(8, 8)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        plan = {
            n: 2 * int(torch.randint(1, u.full_rank // 2 + 1, (1,), generator=gen)) for n, u in units.items()
        }
        with torch.device("meta"):
            skeleton = type(model).from_config(model.config)
        apply_plan_shapes_(skeleton, RankPlan.from_ranks(units, plan))
        assert costs.plan_flops(plan) == denoiser_flops(skeleton, 2, HW, TEXT).total


# -- save / load ------------------------------------------------------------------------------------
def test_save_and_load_give_bit_identical_outputs(calibrated, tmp_path):
    """``save_compressed`` writes the transformer folder as ``SlimFlux3Transformer2DModel``; both
    ``load_compressed`` and diffusers' own ``from_pretrained`` of that class rebuild the narrowed
    layers, per-head norms, kept rotary indices and processors, and reproduce the compressed model's
    outputs bit for bit, with and without reference images."""
    from slimdiff.formats import loading
    from slimdiff.formats.io import load_compressed, save_compressed

    model, cov = calibrated
    units = compression_units(model)
    # the text per-mode blocks: only their QK narrowed (14 of 16); every other block: all three units
    narrowed = {"qk": 10, "vo": 12, "ffn": 64}
    plan = RankPlan.from_ranks(
        units,
        {
            n: (14 if u.kind == "qk" else u.full_rank) if n.startswith("txt") else narrowed[u.kind]
            for n, u in units.items()
        },
    )
    slim = copy.deepcopy(model)
    compress_(slim, plan, cov)
    save_compressed(slim, tmp_path / "slim")
    loaded = [
        load_compressed(tmp_path / "slim"),
        loading.SlimFlux3Transformer2DModel.from_pretrained(tmp_path / "slim").eval(),
    ]
    for new in loaded:
        assert type(new).__name__ == "SlimFlux3Transformer2DModel" and new.slimdiff_plan == plan
        for b in BLOCKS:
            a, c = new.get_submodule(f"{b}.attn"), slim.get_submodule(f"{b}.attn")
            assert type(a.processor) is SlimFlux3AttnProcessor and type(a.norm_k) is HeadwiseRMSNorm
            assert torch.equal(a.slim_rope_index, c.slim_rope_index)
        for t in [*new.parameters(), *new.buffers()]:  # fresh allocations: mmap offsets change CPU rounding
            t.data = t.data.clone()
        for reference in (False, True):
            x = inputs(model, 8, reference=reference)
            assert torch.equal(run(new, x), run(slim, x))


# -- refused --------------------------------------------------------------------------------------------
def test_what_the_adapter_does_not_handle_is_refused_naming_it():
    from diffusers.models.transformers.transformer_flux3 import (
        Flux3AttnProcessor,
        Flux3ModeTransformerBlock,
    )

    model = tiny_flux3()

    fused = copy.deepcopy(model)
    fused.txt_mode_blocks[1].attn.fuse_projections()
    with pytest.raises(UnsupportedModelError, match=r"txt_mode_blocks\.1\.attn .*unfuse_qkv_projections"):
        compression_units(fused)

    class OtherProcessor(Flux3AttnProcessor):
        pass

    other = copy.deepcopy(model)
    other.single_transformer_blocks[1].attn.set_processor(OtherProcessor())
    with pytest.raises(
        UnsupportedModelError,
        match=r"single_transformer_blocks\.1\.attn \(Flux3SingleTransformerBlock\): unknown attention "
        r"processor OtherProcessor",
    ):
        ActivationCollector(other, 1)

    class Flux3VariantBlock(Flux3ModeTransformerBlock):
        pass

    for path in ("mode_blocks.image_cond.0", "txt_mode_blocks.1"):
        variant = copy.deepcopy(model)
        variant.get_submodule(path).__class__ = Flux3VariantBlock
        with pytest.raises(UnsupportedModelError, match=rf"{path}: block type Flux3VariantBlock"):
            compression_units(variant)

    modes = copy.deepcopy(model)
    modes.mode_blocks["video"] = nn.ModuleList()
    with pytest.raises(
        UnsupportedModelError,
        match=r"modes \['image', 'image_cond'\], got \['image', 'image_cond', 'video'\]",
    ):
        compression_units(modes)

    no_eps = copy.deepcopy(model)
    no_eps.single_transformer_blocks[0].attn.norm_k = nn.RMSNorm(D_H, eps=None)
    with pytest.raises(
        UnsupportedModelError,
        match=r"single_transformer_blocks\.0\.attn\.norm_k: an RMSNorm without a set eps",
    ):
        compression_units(no_eps)

    across = copy.deepcopy(model)
    across.mode_blocks["image"][0].attn.norm_q = nn.RMSNorm(DIM, eps=1e-6)
    with pytest.raises(
        UnsupportedModelError, match=r"mode_blocks\.image\.0\.attn\.norm_q .*expected one per head over 16"
    ):
        compression_units(across)

    ff = copy.deepcopy(model)
    ff.txt_mode_blocks[0].ff.act_fn = nn.SiLU()
    with pytest.raises(
        UnsupportedModelError, match=r"txt_mode_blocks\.0\.ff .*Flux3SwiGLU, got Flux3FeedForward with SiLU"
    ):
        compression_units(ff)
