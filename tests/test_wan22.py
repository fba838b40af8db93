"""Wan 2.2 A14B: a ``WanPipeline`` with two denoisers, ``transformer`` for the high-noise steps
(t >= boundary_ratio x num_train_timesteps) and ``transformer_2`` for the low-noise ones. Each gets
statistics from its own steps (one shared calibration run, a collector on each), its own plan under
the same budget, and is compressed, saved and loaded with ``DiffusionPipeline.from_pretrained``.
Tiny pipelines built from config (wan_pipelines.py: ``tiny_wan22_pipeline``, random weights, fixed
seeds).

References and tolerances:
* the steps each denoiser runs at: counted by hooks on the two transformers during real pipeline
  calls, and computed here from the scheduler's timesteps and the boundary (the pipeline's rule);
  token counts exactly (calls x samples x tokens per sample, per bucket);
* one shared run against one run per denoiser: the same prompts, seeds and calls, so bit for bit;
* full rank: an exact rewrite, so float32 rounding through 2 blocks (1e-5 relative, as test_wan);
* each plan and compressed model against the library calls made by hand on that denoiser's own
  statistics (same inputs, same calls: same plan digest, identical tensors);
* parameter counts exactly; the saved and loaded pipeline against the in-memory one bit for bit.
The whole file runs in about 10 s on one core (a minute when the core is shared).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from family_pipelines import PROMPTS
from wan_pipelines import WAN_HW, tiny_wan22_pipeline, tiny_wan_pipeline, tiny_wan_transformer

from slimdiff.api import slim
from slimdiff.calibration.collect import collect_stats, collect_stats_by_denoiser
from slimdiff.config import Params
from slimdiff.families import UnsupportedModelError, adapter_for
from slimdiff.families.units import (
    compression_units,
    count_parameters,
    denoisers,
    planned_units,
    steps_served,
)
from slimdiff.planning.budget import Budget
from slimdiff.planning.plan import RankPlan
from slimdiff.surgery.compress import compress_

STEPS, BOUNDARY = 5, 0.6  # timesteps 1000, 750.25 (transformer) | 500.5, 250.75, 1 (transformer_2)
PAIR = [PROMPTS[0], PROMPTS[4]]  # one batch of 2 prompts
TOKENS = 5 * 4  # per sample: 5 latent frames x 2 x 2 patches (17 frames at 32 x 32 px)
CALIBRATION = dict(
    num_inference_steps=STEPS, guidance_scale=5.0, n_buckets=2, batch_size=2, height=WAN_HW, width=WAN_HW,
    progress=False,
)  # fmt: skip
PARAMS = Params().with_overrides(
    {
        "calibration.num_inference_steps": STEPS,
        "calibration.guidance_scale": 5.0,
        "calibration.n_buckets": 2,
        "calibration.batch_size": 2,
        "calibration.height": WAN_HW,
        "calibration.width": WAN_HW,
        "allocation.budget.kind": "removed_fraction",
        "allocation.budget.value": 0.4,
    }
)


def reference_steps(pipe) -> dict[str, list[float]]:
    """The pipeline's rule written out: transformer at t >= boundary_ratio x num_train_timesteps."""
    pipe.scheduler.set_timesteps(STEPS)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    ts = [float(t) for t in pipe.scheduler.timesteps]
    return {"transformer": [t for t in ts if t >= boundary], "transformer_2": [t for t in ts if t < boundary]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pipe = tiny_wan22_pipeline(tmp_path_factory.mktemp("wan22"), boundary_ratio=BOUNDARY)
    pipe.set_progress_bar_config(disable=True)
    return pipe, copy.deepcopy({n: m.state_dict() for n, m in denoisers(pipe).items()})


def fresh(built):
    """The tiny A14B pipeline with its original denoisers (shared text encoder, VAE, scheduler)."""
    pipe, original = built
    pipe = copy.copy(pipe)
    for name, state in original.items():
        model = tiny_wan_transformer()
        model.load_state_dict(state)
        setattr(pipe, name, model)
    return pipe


@pytest.fixture(scope="module")
def shared(built):
    """One calibration run with a collector on each denoiser, and the steps each was called at."""
    pipe = fresh(built)
    called: dict[str, list[float]] = {"transformer": [], "transformer_2": []}
    handles = [
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, a, k, name=name: called[name].append(float(k["timestep"][0])), with_kwargs=True
        )
        for name in called
    ]
    try:
        stats = collect_stats_by_denoiser(pipe, PAIR, **CALIBRATION)
    finally:
        for h in handles:
            h.remove()
    return pipe, stats, called


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- which denoisers, at which steps -------------------------------------------------------------------
def test_the_pipeline_lists_two_denoisers_and_the_steps_of_each(built, tmp_path):
    pipe = fresh(built)
    models = denoisers(pipe)
    assert list(models) == ["transformer", "transformer_2"]
    assert models["transformer"] is pipe.transformer and models["transformer_2"] is pipe.transformer_2
    want = reference_steps(pipe)
    assert want == {"transformer": [1000.0, 750.25], "transformer_2": [500.5000305175781, 250.75, 1.0]}
    ts = pipe.scheduler.timesteps
    for name, steps in want.items():
        assert ts[steps_served(pipe, name)(ts)].tolist() == steps
    # Wan 2.1 (one transformer) and a transformer_2 without boundary_ratio (never called): one denoiser
    single = tiny_wan_pipeline(tmp_path / "one")
    assert list(denoisers(single)) == ["transformer"] and steps_served(single, "transformer") is None
    unused = tiny_wan22_pipeline(tmp_path / "two", boundary_ratio=None)
    assert list(denoisers(unused)) == ["transformer"] and steps_served(unused, "transformer") is None
    with pytest.raises(KeyError, match="transformer_2"):
        steps_served(unused, "transformer_2")


def test_each_denoisers_statistics_come_from_its_own_steps_only(shared, built):
    """Hooks on both transformers count the calls of a real sampling run: each was called at
    exactly the steps the boundary gives it (2 calls per step: classifier-free guidance), and its
    statistics hold the tokens of those calls only, bucketed over its own steps (transformer: 2
    steps, one per bucket; transformer_2: 3 steps, buckets of 2 and 1)."""
    pipe, stats, called = shared
    want = reference_steps(pipe)
    for name, steps in want.items():
        assert called[name] == [t for t in steps for _ in range(2)], name  # cond + uncond per step
        s = stats[name]
        assert s.meta["denoiser"] == name and s.meta["timesteps"] == steps
        per_step = 2 * 2 * TOKENS  # 2 calls x 2 samples x 20 video tokens
        split = {"transformer": [1, 1], "transformer_2": [2, 1]}[name]
        assert s.meta["bucket_timesteps"] == [steps[: split[0]], steps[split[0] :]]
        for block in (0, 1):
            assert s.tokens[f"blocks.{block}.attn1.query"].tolist() == [per_step * k for k in split]
            assert s.tokens[f"blocks.{block}.ffn.hidden"].tolist() == [per_step * k for k in split]
            assert s.tokens[f"blocks.{block}.attn2.key"].tolist() == [2 * 2 * 512 * k for k in split]
    assert int(stats["transformer"].tokens["blocks.0.attn1.query"].sum()) == 2 * 2 * 2 * TOKENS
    assert int(stats["transformer_2"].tokens["blocks.0.attn1.query"].sum()) == 3 * 2 * 2 * TOKENS
    # one shared run = one run per denoiser, bit for bit (same calls, same seeds)
    alone = collect_stats(fresh(built), PAIR, **CALIBRATION, denoiser="transformer_2")
    assert alone.tokens.keys() == stats["transformer_2"].tokens.keys()
    for key, moments in alone.moments.items():
        assert torch.equal(moments, stats["transformer_2"].moments[key]), key
    assert not torch.equal(
        stats["transformer"].moments["blocks.0.ffn.hidden"],
        stats["transformer_2"].moments["blocks.0.ffn.hidden"],
    )


def test_full_rank_compression_of_each_denoiser_reproduces_it(shared):
    pipe, stats, _ = shared
    for name, model in denoisers(pipe).items():
        units = compression_units(model)
        full = RankPlan.from_ranks(units, {n: u.full_rank for n, u in units.items()})
        slim_model = copy.deepcopy(model)
        compress_(slim_model, full, stats[name].aggregate([0.5, 0.5]), rewrite_full_rank=True)
        assert slim_model.blocks[0].attn1.slim_rope_index.shape == (2, 16)
        args, kwargs = adapter_for(model).example_inputs(
            model, 2, (8, 8), 6, device="cpu", generator=torch.Generator().manual_seed(3), latent_frames=3
        )
        with torch.no_grad():
            assert rel(slim_model(*args, **kwargs).sample, model(*args, **kwargs).sample) < 1e-5, name


# -- the one call: both denoisers, their own plans, save and load -------------------------------------
def test_slim_compresses_each_denoiser_to_its_own_plan_and_the_folder_loads_bit_identically(
    built, shared, tmp_path
):
    """``slimdiff.slim`` on the A14B pipeline: each denoiser's plan and weights are those of the
    library calls made by hand on its own statistics (from the shared run) under the same budget
    (40% of ITS compressible parameters removed), each denoiser's parameter count is its plan's,
    and the saved folder loads with ``DiffusionPipeline.from_pretrained`` to the same latents."""
    from diffusers import DiffusionPipeline

    from slimdiff.families.attention import AcrossHeadsRMSNorm
    from slimdiff.formats.io import load_compressed, save_compressed
    from slimdiff.planning.allocation import plan_ranks
    from slimdiff.planning.influence import compute_influence
    from slimdiff.planning.spectra import error_profiles

    _, stats, _ = shared
    pipe, report = slim(fresh(built), PAIR, params=PARAMS, progress=False)
    assert report.denoiser == "transformer" and [r.denoiser for r in report.others] == ["transformer_2"]
    assert list(report.denoisers) == ["transformer", "transformer_2"]
    assert "transformer: " in report.summary() and "; transformer_2: " in report.summary()
    alloc, comp = PARAMS.allocation, PARAMS.compression
    reference = fresh(built)
    for name, part in report.denoisers.items():
        model, original = getattr(pipe, name), getattr(reference, name)
        influence = compute_influence(stats[name], original, weighting=PARAMS.influence.weighting)
        cov = influence.aggregate(stats[name])
        all_units = compression_units(original)
        units = planned_units(all_units, alloc.modules, comp.qk_norm)
        plan = plan_ranks(
            influence.score_of(), units, Budget(removed_fraction=0.4), model_params=count_parameters(original),
            profiles=error_profiles(original, cov, damping=comp.damping), **alloc.solver_options(),
        )  # fmt: skip
        assert part.plan.digest == plan.digest and model.slimdiff_plan == plan, name
        compress_(original, plan, cov, **comp.compress_options())
        for key, tensor in original.state_dict().items():
            assert torch.equal(tensor, model.state_dict()[key]), (name, key)
        compressible = sum(u.full_params for u in units.values())
        assert plan.removed_params >= 0.4 * compressible and plan.budget == {"removed_fraction": 0.4}
        # parameters: the plan's removed ones, and each narrowed QK's two norms keep H r of H d_h weights
        norms = sum(2 * 2 * (p.rank - 16) for p in plan.compressed_units().values() if p.kind == "qk")
        before = count_parameters(tiny_wan_transformer())
        assert count_parameters(model) == before - plan.removed_params + norms == part.params_after, name
        assert part.params_before == before and part.compression.params_after == part.params_after
    assert report.plan.digest != report.others[0].plan.digest  # two denoisers, two plans
    assert {p.kind for p in report.plan.compressed_units().values()} >= {"ffn", "vo"}

    save_compressed(pipe, tmp_path / "slim")
    top = json.loads((tmp_path / "slim" / "slimdiff.json").read_text())
    assert top["denoisers"] == {n: r.plan.digest for n, r in report.denoisers.items()}
    assert top["unet_subfolder"] == "transformer" and top["plan_digest"] == report.plan.digest
    index = json.loads((tmp_path / "slim" / "model_index.json").read_text())
    assert index["transformer"] == index["transformer_2"] == ["slimdiff", "SlimWanTransformer3DModel"]
    assert index["boundary_ratio"] == BOUNDARY
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert type(loaded).__name__ == "WanPipeline" and loaded.config.boundary_ratio == BOUNDARY
    for name, part in report.denoisers.items():
        got = getattr(loaded, name)
        assert type(got).__name__ == "SlimWanTransformer3DModel" and got.slimdiff_plan == part.plan
        assert type(got.blocks[0].attn2.norm_q) is type(getattr(pipe, name).blocks[0].attn2.norm_q)
    assert isinstance(loaded.transformer_2.blocks[1].attn1.norm_k, torch.nn.RMSNorm | AcrossHeadsRMSNorm)
    for module in loaded.components.values():  # fresh allocations: mmap offsets change CPU rounding
        if isinstance(module, torch.nn.Module):
            for t in [*module.parameters(), *module.buffers()]:
                t.data = t.data.clone()
    kw = dict(
        num_inference_steps=STEPS, height=WAN_HW, width=WAN_HW, num_frames=5, output_type="latent",
        guidance_scale=5.0,
    )  # fmt: skip
    a = pipe(PAIR, generator=torch.Generator().manual_seed(0), **kw).frames
    b = loaded(PAIR, generator=torch.Generator().manual_seed(0), **kw).frames
    assert torch.equal(a, b)
    c = reference(PAIR, generator=torch.Generator().manual_seed(0), **kw).frames  # compressed by hand
    assert torch.equal(a, c)
    again = load_compressed(tmp_path / "slim")
    assert again.transformer_2.slimdiff_plan == report.others[0].plan


def test_the_statistics_folder_holds_each_denoisers_statistics_and_is_reused(built, tmp_path, monkeypatch):
    """``store``: one folder per denoiser (``store/transformer``, ``store/transformer_2``), each
    naming its denoiser and both denoisers' weights; a second call reuses them without sampling and
    gives the same plans; a folder of other weights is refused."""
    import slimdiff.api as api

    params = PARAMS.with_overrides({"allocation.mode": "uniform"})  # no error profiles: faster
    _, first = slim(fresh(built), PAIR, params=params, store=tmp_path / "stats", progress=False)
    for name, part in first.denoisers.items():
        index = json.loads((tmp_path / "stats" / name / "stats.json").read_text())
        assert index["identity"]["denoiser"] == name and part.store == str(tmp_path / "stats" / name)
        assert set(index["identity"]["pipeline_weights_sha256"]) == {"transformer", "transformer_2"}
        assert index["meta"]["timesteps"] == reference_steps(fresh(built))[name]
    monkeypatch.setattr(api, "collect_stats_by_denoiser", lambda *a, **k: pytest.fail("sampled again"))
    _, again = slim(fresh(built), PAIR, params=params, store=tmp_path / "stats", progress=False)
    assert again.reused_statistics and all(r.reused_statistics for r in again.others)
    assert [r.plan.digest for r in again.denoisers.values()] == [
        r.plan.digest for r in first.denoisers.values()
    ]
    other = fresh(built)
    with torch.no_grad():
        other.transformer_2.blocks[0].ffn.net[2].weight.mul_(2.0)  # the low-noise denoiser changed
    with pytest.raises(ValueError, match="differing: .*pipeline_weights_sha256"):
        slim(other, PAIR, params=params, store=tmp_path / "stats", progress=False)


# -- refusals ------------------------------------------------------------------------------------------
def test_pipelines_slimdiff_cannot_compress_are_refused_before_sampling(built, tmp_path, monkeypatch):
    import slimdiff.api as api

    monkeypatch.setattr(api, "collect_stats_by_denoiser", lambda *a, **k: pytest.fail("sampled"))
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    vace = WanVACETransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=16,
        freq_dim=16, ffn_dim=64, num_layers=1, vace_layers=[0], vace_in_channels=16,
    )  # fmt: skip
    other = tiny_wan22_pipeline(tmp_path / "vace", transformer_2=vace)
    with pytest.raises(
        UnsupportedModelError, match=r"two denoisers of different classes.*WanVACETransformer3DModel"
    ):
        denoisers(other)
    with pytest.raises(UnsupportedModelError, match="different classes"):
        slim(other, PAIR, params=PARAMS, progress=False)
    i2v = tiny_wan_transformer(0, image_dim=8, added_kv_proj_dim=32)  # Wan I2V's image cross-attention
    unsupported = tiny_wan22_pipeline(tmp_path / "i2v", transformer_2=i2v)
    with pytest.raises(
        UnsupportedModelError,
        match=r"WanPipeline's transformer_2 is not supported.*blocks\.0\.attn2: the image",
    ):
        slim(unsupported, PAIR, params=PARAMS, progress=False)
    # transformer runs at 1 of 5 steps (t >= 900): fewer steps than the 2 buckets
    few = tiny_wan22_pipeline(tmp_path / "few", boundary_ratio=0.9)
    with pytest.raises(ValueError, match=r"calls its transformer at 1 of the sampler's 5 steps"):
        slim(few, PAIR, params=PARAMS, progress=False)
    with pytest.raises(ValueError, match="several denoisers"):
        slim(fresh(built), PAIR, params=PARAMS, loras=[{}], progress=False)
    from tasks.stages import check_one_denoiser

    with pytest.raises(UnsupportedModelError, match=r"transformer, transformer_2.*slimdiff\.slim"):
        check_one_denoiser(fresh(built))
    check_one_denoiser(tiny_wan_pipeline(tmp_path / "one"))  # Wan 2.1: one denoiser, accepted
