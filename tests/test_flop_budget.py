"""Budgets in FLOPs at a serving shape (slimdiff.planning.flops.unit_flop_costs, allocation.budget.kind
removed_flops_fraction / total_flops).

References: FLOP costs per rank written out by hand for a tiny UNet at a tiny shape; the FLOP
counter (``slimdiff.planning.flops.denoiser_flops``) of models compressed to random plans (built on the meta
device by ``apply_plan_shapes_``: the shapes a compression gives, no decomposition); brute force
over every rank combination for the solver."""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_pixart, make_tiny_unet
from test_allocation_exact import synthetic_profiles
from test_mmdit import tiny_sd3

from slimdiff.config import ConfigError, Params
from slimdiff.families.units import UnitInfo, compression_units, planned_units
from slimdiff.planning import allocation
from slimdiff.planning.allocation import check_feasible, plan_ranks
from slimdiff.planning.budget import Budget, InfeasibleBudgetError
from slimdiff.planning.flops import (
    AttentionCost,
    FlopCosts,
    ServingShape,
    denoiser_flops,
    serving_shape,
    unit_flop_costs,
)
from slimdiff.planning.plan import RankPlan, rank_grid
from slimdiff.surgery.compress import apply_plan_shapes_

B, N_TOP, N_MID, T = 2, 8 * 8, 4 * 4, 5  # batch, tokens at 8x8 and at the 4x4 mid block, text tokens
TINY = ServingShape((8, 8), batch=B, text_len=T)
D0 = "down_blocks.0.attentions.0.transformer_blocks.0"
MID = "mid_block.attentions.0.transformer_blocks.0"


def compressed_flops(model, ranks: dict[str, int], shape: ServingShape, qk_norm: str = "select") -> int:
    """``denoiser_flops`` of ``model`` with the layer shapes compression gives at ``ranks``."""
    with torch.device("meta"):
        skeleton = type(model).from_config(model.config)
    apply_plan_shapes_(skeleton, RankPlan.from_ranks(compression_units(model), ranks), qk_norm)
    return denoiser_flops(skeleton, shape.batch, shape.latent_hw, shape.text_len, device=shape.device).total


# -- 1. FLOP cost per rank: known answers ------------------------------------------------------
def test_flop_cost_per_rank_known_answers_on_the_tiny_unet():
    """Tiny UNet (widths 32 / 64, 2 heads, GEGLU 4d, text width 24) at batch 2, 8x8 latents, 5
    text tokens: every Linear costs 2 x rows x in x out, an attention matmul 2 B H N_q N_k per unit
    of head width."""
    unet = make_tiny_unet()
    costs = unit_flop_costs(unet, TINY)
    d, heads, text_dim = 32, 2, 24  # top level: d_h = 16, GEGLU inner 128
    # FFN: GEGLU in (d -> 2 x inner) gives each neuron two rows of d; the out projection one column
    ffn = 2 * B * N_TOP * d * 2 + 2 * B * N_TOP * d
    assert costs.per_rank[f"{D0}.ff"] == ffn == 24_576
    # self-attention QK: q and k projections (d -> H r) on the image tokens + the logits N x N
    logits1 = 2 * B * heads * N_TOP * N_TOP
    assert costs.per_rank[f"{D0}.attn1.qk"] == 2 * (2 * B * N_TOP * d * heads) + logits1 == 65_536
    # VO: v projection (key tokens) + out projection (H r -> d, query tokens) + probabilities x values
    assert costs.per_rank[f"{D0}.attn1.vo"] == 2 * B * N_TOP * d * heads * 2 + logits1 == 65_536
    # cross-attention: keys and values come from the 5 text tokens of width 24
    logits2 = 2 * B * heads * N_TOP * T
    qk2 = 2 * B * N_TOP * d * heads + 2 * B * T * text_dim * heads + logits2
    vo2 = 2 * B * T * text_dim * heads + 2 * B * N_TOP * heads * d + logits2
    assert costs.per_rank[f"{D0}.attn2.qk"] == qk2 == 19_904
    assert costs.per_rank[f"{D0}.attn2.vo"] == vo2 == 19_904
    # the mid block runs at 4x4 = 16 tokens, width 64 (d_h 32, GEGLU inner 256)
    assert costs.per_rank[f"{MID}.ff"] == 2 * B * N_MID * 64 * 2 + 2 * B * N_MID * 64 == 12_288
    assert costs.per_rank[f"{MID}.attn1.qk"] == 2 * (2 * B * N_MID * 64 * heads) + 2 * B * heads * N_MID**2
    assert costs.total == denoiser_flops(unet, B, 8, T).total == 85_145_600

    # a compressed attention runs both matmuls at ONE width (the narrower side zero-padded): QK at 8
    # under VO at 16 keeps the logits at 16 -- the per-unit sum counts them at 8 and is short by that
    att = costs.attentions[f"{D0}.attn1"]
    assert (att.qk_proj, att.vo_proj, att.matmul) == (2 * 2 * B * N_TOP * d * heads, 32_768, logits1)
    assert att.flops(8, 16) == att.qk_proj * 8 + att.vo_proj * 16 + 2 * 16 * logits1
    ranks = {f"{D0}.attn1.qk": 8, f"{D0}.attn1.vo": 16}
    exact = costs.plan_flops(ranks)
    assert exact == compressed_flops(unet, ranks, TINY)
    linear = costs.total - sum((16 - r) * costs.per_rank[n] for n, r in ranks.items())
    assert exact - linear == (16 - 8) * logits1


# -- 2. summed over a plan: the FLOP counter's figure, exactly ---------------------------------
def random_ranks(rng: random.Random, units, tied: bool) -> dict[str, int]:
    ranks = {n: rng.choice(rank_grid(u.full_rank, 1, 1)) for n, u in units.items()}
    if tied:
        for n, u in units.items():
            if u.kind == "vo" and n[: -len("vo")] + "qk" in ranks:
                ranks[n] = ranks[n[: -len("vo")] + "qk"]
    return ranks


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_per_rank_costs_summed_over_a_plan_are_the_flop_count_on_the_tiny_unet(device):
    """Tied plans (r_qk = r_vo in every attention): sum_m (R_m - r_m) x cost per rank is exactly what
    the FLOP counter removes. Any plan: ``plan_flops`` (each attention at its padded width; CUDA
    rounds it up to a multiple of 8, odd ranks drawn here) is exactly the counter's figure."""
    unet = make_tiny_unet()
    shape = ServingShape((8, 8), B, T, device)
    units = compression_units(unet)
    costs = unit_flop_costs(unet, shape)
    rest = costs.total - sum(u.full_rank * costs.per_rank[n] for n, u in units.items())
    rng = random.Random(0)
    for tied in (True, False):
        for _ in range(6):
            ranks = random_ranks(rng, units, tied)
            counted = compressed_flops(unet, ranks, shape)
            assert costs.plan_flops(ranks) == counted
            if tied and device == "cpu":  # (CUDA pads an odd width up: linear only on its grid)
                assert rest + sum(r * costs.per_rank[n] for n, r in ranks.items()) == counted


@pytest.mark.parametrize(
    "family, qk_norm",
    [("pixart", "select"), ("sd3", "select"), ("sd3", "keep"), ("sd3", "project")],
)
def test_plan_flops_are_the_flop_count_on_transformers(family, qk_norm):
    """PixArt (cross-attention to text) and SD3 MMDiT (joint attention of both streams, dual
    attention, the context_pre_only last block whose discarded text queries still run; QK under the
    q/k RMSNorms selected, kept whole, or projected after the norms at the VO rank)."""
    model = make_tiny_pixart() if family == "pixart" else tiny_sd3()
    units = planned_units(compression_units(model), ("ffn", "qk", "vo"), qk_norm)
    costs = unit_flop_costs(model, TINY, qk_norm)
    assert costs.total == denoiser_flops(model, B, 8, T).total
    rng = random.Random(1)
    for tied in (True, False):
        for _ in range(4):
            ranks = random_ranks(rng, units, tied)
            assert costs.plan_flops(ranks) == compressed_flops(model, ranks, TINY, qk_norm), ranks
    if qk_norm == "project":  # a VO cut below d_h adds the post-norm projections: 2 B H (N_q + N_k) d_h
        att = costs.attentions["transformer_blocks.0.attn"]
        n = 16 + T  # 4x4 patches + text, joint
        assert att.post == 2 * B * 2 * (n + n) * 8


# -- 3. a FLOP-budget plan on the tiny UNet ------------------------------------------------------
def decreasing_profiles(units) -> dict[str, list[float]]:
    """Strictly decreasing curves (tails of power-law spectra, no noise), e(R) = 0."""
    out = {}
    for i, (n, u) in enumerate(units.items()):
        a = 0.4 + 0.15 * (i % 11)
        spectrum = [(k + 1) ** -a for k in range(u.full_rank)]
        total = sum(spectrum)
        out[n] = [sum(spectrum[r:]) / total for r in range(u.full_rank + 1)]
    return out


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.6])
def test_flop_budget_plan_meets_its_budget_within_one_rank_step(fraction, tie):
    """Within the budget, and no unit (or tied pair) can take its next grid step in what is left: on
    strictly decreasing curves such a step would lower the error, so the exact solver takes every
    one that fits. The recorded FLOPs are the counter's figure for the compressed model."""
    unet = make_tiny_unet()
    units = compression_units(unet)
    costs = unit_flop_costs(unet, TINY)
    plan = plan_ranks(
        None,
        units,
        Budget(removed_flops_fraction=fraction),
        profiles=decreasing_profiles(units),
        tie_qk_vo=tie,
        costs=costs,
        r_min=4,
        multiple=4,
    )
    cm = plan.cost_model
    assert plan.solver["exact"] is True and cm["cost"] == "flops"
    rest = costs.total - cm["compressible_flops"]
    assert cm["target_flops"] == rest + math.floor(cm["compressible_flops"] * (1 - fraction))
    assert cm["flops_after"] <= cm["target_flops"]
    assert cm["flops_after"] == costs.plan_flops(plan.ranks()) == compressed_flops(unet, plan.ranks(), TINY)
    assert cm["flops_before"] == costs.total and plan.target_params is None
    slack = cm["target_flops"] - cm["flops_after"]
    ranks = plan.ranks()
    for name, u in units.items():
        grid = rank_grid(u.full_rank, 4, 4)
        if ranks[name] == u.full_rank:
            continue
        up = dict(ranks, **{name: grid[grid.index(ranks[name]) + 1]})
        if tie and u.kind in ("qk", "vo"):
            other = name[:-2] + ("vo" if u.kind == "qk" else "qk")
            up[other] = up[name]
        assert costs.plan_flops(up) - cm["flops_after"] > slack, name
    # the same budget as total FLOPs of the whole model gives the same plan
    same = plan_ranks(
        None,
        units,
        Budget(total_flops=cm["target_flops"]),
        profiles=decreasing_profiles(units),
        tie_qk_vo=tie,
        costs=costs,
        r_min=4,
        multiple=4,
    )
    assert same.ranks() == plan.ranks()


def test_flop_budgets_need_the_cost_model_and_name_the_feasible_range():
    unet = make_tiny_unet()
    units = compression_units(unet)
    profiles = decreasing_profiles(units)
    with pytest.raises(ValueError, match="needs costs="):
        plan_ranks(None, units, Budget(removed_flops_fraction=0.4), profiles=profiles)
    costs = unit_flop_costs(unet, TINY)
    with pytest.raises(InfeasibleBudgetError, match=r"removed_flops_fraction in \[0\.000000, 0\.768017\]"):
        plan_ranks(None, units, Budget(removed_flops_fraction=0.99), profiles=profiles, costs=costs)
    with pytest.raises(InfeasibleBudgetError, match="total_flops in"):
        plan_ranks(None, units, Budget(total_flops=10), profiles=profiles, costs=costs)
    # the preflight (units only, no trace) cannot judge a FLOP budget: it leaves it to the plan stage
    assert check_feasible(units, Budget(removed_flops_fraction=0.99)) is None


# -- 4. the solver is exact on FLOP costs: brute force --------------------------------------------
def synthetic_case(rng: random.Random, device: str):
    """One FFN and 1-2 attentions with random per-rank FLOPs (token counts of their own), head
    widths that CUDA's padding rounds up, and optionally qk_norm "project" post-norm projections;
    non-monotone error curves."""
    units, per_rank, full, attentions, unit_attention, profiles = {}, {}, {}, {}, {}, {}
    r_ffn = rng.choice([8, 12, 16, 24])
    units["b0.ff"] = UnitInfo("b0.ff", "ffn", "b0", None, r_ffn, rng.randint(100, 999))
    per_rank["b0.ff"] = rng.randint(1_000, 50_000)
    for i in range(rng.randint(1, 2)):
        d = rng.choice([6, 8, 12, 16])
        module = f"b{i}.attn1"
        attentions[module] = AttentionCost(
            module,
            d,
            qk_proj=rng.randint(1_000, 20_000),
            vo_proj=rng.randint(1_000, 20_000),
            matmul=rng.randint(1_000, 40_000),
            post=rng.choice([0, 0, rng.randint(500, 5_000)]),
            device=device,
        )
        for kind in ("qk", "vo"):
            n = f"{module}.{kind}"
            units[n] = UnitInfo(n, kind, f"b{i}", "attn1", d, rng.randint(100, 999))
            unit_attention[n] = (module, kind)
            per_rank[n] = (attentions[module].qk_proj if kind == "qk" else attentions[module].vo_proj) + (
                attentions[module].matmul
            )
    for n, u in units.items():
        full[n] = u.full_rank
        profiles[n] = [rng.random() for _ in range(u.full_rank + 1)]
    total = 10**7 + sum(full[n] * per_rank[n] for n in units)
    costs = FlopCosts(ServingShape((8, 8), device=device), total, per_rank, full, attentions, unit_attention)
    return units, profiles, costs


def brute_force(units, profiles, costs, limit: int, tau: float, r_min: int, multiple: int, tie: bool):
    names = list(units)
    compressible = sum(u.full_params for u in units.values())
    best = math.inf
    for combo in itertools.product(*(rank_grid(units[n].full_rank, r_min, multiple) for n in names)):
        ranks = dict(zip(names, combo, strict=True))
        if tie and any(ranks[n] != ranks[n[:-2] + "qk"] for n in names if n.endswith(".vo")):
            continue
        if costs.plan_flops(ranks) > limit:
            continue
        value = 0.0
        for n, r in ranks.items():
            phi = r / units[n].full_rank
            value += units[n].full_params / compressible * (profiles[n][r] + tau * phi * math.log(phi))
        best = min(best, value)
    return best


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_flop_budget_plans_equal_brute_force(bounded, device, monkeypatch):
    """60 random cases per parameter set (tied or not, the exact DP or, forced, the bounded
    search): the plan never exceeds the budget and its objective is the brute-force optimum."""
    if bounded:
        monkeypatch.setattr(allocation, "DP_MAX_STATES", 1)
    rng = random.Random(7 + bounded + 2 * (device == "cuda"))
    checked = over = 0
    for case in range(60):
        units, profiles, costs = synthetic_case(rng, device)
        r_min, multiple = rng.choice([(4, 4), (2, 4), (8, 8)])
        tie = case % 3 == 2
        lo = costs.plan_flops({n: rank_grid(u.full_rank, r_min, multiple)[0] for n, u in units.items()})
        if lo >= costs.total - 1:  # every grid is one rank: nothing to choose
            continue
        limit = rng.randint(lo, costs.total - 1)
        tau = rng.choice([0.0, 0.0, 0.05])
        plan = plan_ranks(
            None,
            units,
            Budget(total_flops=limit),
            tau=tau,
            profiles=profiles,
            costs=costs,
            r_min=r_min,
            multiple=multiple,
            tie_qk_vo=tie,
        )
        s = plan.solver
        assert plan.flops_after <= limit and s["exact"] is True
        assert s["method"] in (("bounded-dp",) if bounded else ("dp", "bounded-dp", "keep-all"))
        best = brute_force(units, profiles, costs, limit, tau, r_min, multiple, tie)
        # what per-unit linear costs (the logits counted at r_qk, not at the padded width) would
        # have planned: over the real FLOP limit in about a fifth to a third of these cases
        linear_units = {
            m: UnitInfo(m, u.kind, u.block, u.attn, u.full_rank, costs.per_rank[m]) for m, u in units.items()
        }
        rest = costs.total - sum(u.full_rank * costs.per_rank[m] for m, u in units.items())
        linear = plan_ranks(
            None,
            linear_units,
            Budget(kept_params=limit - rest),
            tau=tau,
            profiles=profiles,
            r_min=r_min,
            multiple=multiple,
            tie_qk_vo=tie,
        )
        over += costs.plan_flops(linear.ranks()) > limit
        mine = 0.0  # the plan's own objective
        compressible = sum(u.full_params for u in units.values())
        for n, r in plan.ranks().items():
            phi = r / units[n].full_rank
            mine += units[n].full_params / compressible * (profiles[n][r] + tau * phi * math.log(phi))
        assert mine == pytest.approx(best, abs=1e-12), (case, plan.ranks())
        checked += 1
    assert checked >= 50
    assert over >= 5  # measured 11-22 of 57-60


# -- 5. params: the serving shape is validated ------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"allocation.serving.height": 500}, "allocation.serving.height: Input should be a multiple of 8"),
        (
            {"allocation.serving.width": 0},
            "allocation.serving.width: Input should be greater than or equal to 8",
        ),
        (
            {"allocation.serving.batch": 0},
            "allocation.serving.batch: Input should be greater than or equal to 1",
        ),
        ({"allocation.serving.text_len": "77"}, "allocation.serving.text_len: must be an integer"),
        (
            {"allocation.budget.kind": "removed_flops_fraction", "allocation.budget.value": 1.5},
            "allocation.budget: value: removed_flops_fraction must be in (0, 1)",
        ),
    ],
)
def test_bad_serving_shape_or_flop_budget_is_rejected_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        Params().with_overrides(overrides)
    assert expected in str(err.value)


def test_serving_params_defaults_and_the_stage_key():
    from slimdiff.config import STAGE_PARAMS, load_params

    p = Params()
    assert p.allocation.budget.kind == "removed_flops_fraction"  # the committed default is a FLOP budget
    assert p.allocation.serving.model_dump() == {"height": None, "width": None, "batch": 2, "text_len": None}
    from pathlib import Path

    assert load_params(Path(__file__).resolve().parents[1] / "params.yaml").allocation == p.allocation
    changed = p.with_overrides({"allocation.serving.height": 768})
    assert p.digest(STAGE_PARAMS["plan"]) != changed.digest(STAGE_PARAMS["plan"])
    assert p.digest(STAGE_PARAMS["compress"]) == changed.digest(STAGE_PARAMS["compress"])


def test_serving_shape_of_a_pipeline():
    unet = make_tiny_unet()
    pipe = SimpleNamespace(unet=unet, vae_scale_factor=8, tokenizer=SimpleNamespace(model_max_length=77))
    assert serving_shape(pipe) == ServingShape((8, 8), 2, 77)  # the configured resolution, 64 px
    assert serving_shape(pipe, height=128, width=256, batch=1, text_len=5) == ServingShape((16, 32), 1, 5)
    with pytest.raises(ValueError, match="height: 60 px is not a multiple"):
        serving_shape(pipe, height=60)


def test_plan_stage_spends_a_flop_budget_at_the_serving_shape(tmp_path):
    """``slimdiff plan`` with allocation.budget.kind removed_flops_fraction on the toy UNet (its
    influence output stood in by decreasing curves): the plan, its record and the stage manifest
    carry the FLOPs at allocation.serving (null resolution = the model's 32 px, 16 text tokens)."""
    from pathlib import Path

    from slimdiff.families.units import denoiser_of
    from slimdiff.planning.influence import Influence
    from tasks import stages

    params = Params().with_overrides(
        {
            "allocation.budget.kind": "removed_flops_fraction",
            "allocation.budget.value": 0.4,
            "allocation.serving.height": 64,  # pixels: 16 latent rows (toy VAE factor 4)
            "tracking.artifact_root": str(tmp_path / "artifacts"),
        }
    )
    model = stages.model_manifest(params)
    denoiser = denoiser_of(stages._cached_pipe(params, model))
    units = compression_units(denoiser)
    folder = tmp_path / "influence"
    folder.mkdir()
    n = len(units)
    ones = torch.ones(n, 1, dtype=torch.float64)
    weights = torch.ones(1, dtype=torch.float64)
    scores = torch.arange(n, dtype=torch.float64)
    Influence(list(units), ones, weights, scores, "uniform").to_json(folder / stages.INFLUENCE_FILE)
    (folder / stages.PROFILES_FILE).write_text(json.dumps(decreasing_profiles(units)))
    influence = stages._finish("influence", folder, {})
    manifest = stages.run_plan(params, model, influence, tmp_path / "plan")
    plan = RankPlan.load(Path(manifest.uri) / stages.PLAN_FILE)
    cm = plan.cost_model
    shape = ServingShape((16, 8), batch=2, text_len=16)
    assert cm["serving"] == shape.to_dict() and cm["cost"] == "flops"
    assert plan.budget == {"removed_flops_fraction": 0.4} and plan.solver["exact"] is True
    assert cm["flops_before"] - cm["flops_after"] >= 0.4 * cm["compressible_flops"]
    assert cm["flops_after"] == compressed_flops(denoiser, plan.ranks(), shape)
    assert manifest.meta["flops_after"] == cm["flops_after"]


# -- 6. plan files ---------------------------------------------------------------------------------
def test_flop_plan_round_trips_and_old_plans_load_unchanged(tmp_path):
    unet = make_tiny_unet()
    units = compression_units(unet)
    costs = unit_flop_costs(unet, TINY)
    profiles = decreasing_profiles(units)
    plan = plan_ranks(None, units, Budget(removed_flops_fraction=0.3), profiles=profiles, costs=costs)
    data = json.loads(plan.save(tmp_path / "plan.json").read_text())
    assert data["cost_model"]["serving"] == {"latent_hw": [8, 8], "batch": 2, "text_len": 5, "device": "cpu"}
    assert data["units"][f"{D0}.ff"]["flops_per_rank"] == 24_576
    loaded = RankPlan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded.digest == plan.digest and loaded.flops_after == plan.flops_after
    # a parameter plan made without a cost model writes what it wrote before (digests unchanged)
    old = plan_ranks(None, units, Budget(removed_fraction=0.3), profiles=profiles)
    d = old.to_dict()
    assert "cost_model" not in d and all("flops_per_rank" not in u for u in d["units"].values())
    assert RankPlan.from_dict(d).digest == old.digest and old.flops_after is None
    # ... and recording FLOPs for a parameter budget changes no rank
    recorded = plan_ranks(None, units, Budget(removed_fraction=0.3), profiles=profiles, costs=costs)
    assert recorded.ranks() == old.ranks() and recorded.cost_model["cost"] == "params"


def benchmark_configs():
    """benchmarks/denoisers.py (the published configs), whichever way pytest was started."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "denoisers.py"
    spec = importlib.util.spec_from_file_location("_slimdiff_bench_denoisers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


# -- 7. SD v1.5 shape: a FLOP budget buys the FLOPs a parameter budget does not --------------------
@pytest.mark.parametrize("seed, param_ratio", [(0, 1.1721), (1, 1.1039)])
def test_sd15_flop_budget_removes_more_flops_than_the_parameter_budget(seed, param_ratio):
    """SD v1.5 UNet (meta device, 512 px, batch 2, 77 text tokens; 1606.5 GFLOPs per forward, of
    which 718.5 G (44.7%) depend on the units' ranks: the convolutions are the rest). With the same
    synthetic error curves (tests/test_allocation_exact.py), 40% of the compressible PARAMETERS
    removes only 32.8% (seed 0) / 21.0% (seed 1) of the compressible FLOPs: 1.172x / 1.104x fewer
    FLOPs for the whole UNet; 40% of the compressible FLOPs is 1.218x, while removing 20.8% / 29.0%
    of the parameters. Both plans proved optimal, in well under a second each."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**benchmark_configs().SD15_UNET_CONFIG)
    units = compression_units(unet)
    costs = unit_flop_costs(unet, ServingShape((64, 64), batch=2, text_len=77))
    assert costs.total == 1_606_546_882_560
    profiles = synthetic_profiles(units, seed)
    by_params = plan_ranks(None, units, Budget(removed_fraction=0.4), profiles=profiles, costs=costs)
    by_flops = plan_ranks(None, units, Budget(removed_flops_fraction=0.4), profiles=profiles, costs=costs)
    assert by_params.solver["exact"] and by_flops.solver["exact"]
    assert by_flops.flops_after < by_params.flops_after
    assert by_params.flops_before / by_params.flops_after == pytest.approx(param_ratio, abs=1e-4)
    assert by_flops.flops_before / by_flops.flops_after == pytest.approx(1.2179, abs=1e-4)
    compressible = by_flops.cost_model["compressible_flops"]
    assert compressible == 718_543_257_600
    assert by_flops.flops_before - by_flops.flops_after >= 0.4 * compressible


@pytest.mark.parametrize("mode", ["uniform", "influence"])
def test_rounded_modes_meet_a_flop_budget_with_the_smallest_parameter_count(mode):
    """uniform / influence round ratios under a parameter count: under a FLOP budget the count is
    the smallest whose plan fits the FLOPs: that plan fits, and the plan of one parameter fewer
    removed does not."""
    from slimdiff.planning.budget import Budget as B

    unet = make_tiny_unet()
    units = compression_units(unet)
    costs = unit_flop_costs(unet, TINY)
    scores = {n: 1.0 + (i % 3) for i, n in enumerate(units)}
    opts = {"mode": mode, "tau": 1.0 if mode == "influence" else 0.0, "costs": costs}
    zero = costs.plan_flops(dict.fromkeys(units, 0))
    for share in (0.2, 0.45):
        plan = plan_ranks(scores, units, B(removed_flops_fraction=share), **opts)
        limit = costs.total - share * (costs.total - zero)
        assert plan.flops_after <= limit + 1  # integer FLOP target: at most the rounding of the share
        assert plan.budget == {"removed_flops_fraction": share} and plan.cost_model["cost"] == "flops"
        removed = plan.solver["removed_params"]
        # one parameter fewer removed no longer fits (the bisection's answer is the smallest)
        fewer = plan_ranks(scores, units, B(removed_params=removed - 1), **opts)
        assert fewer.flops_after > limit


def test_flops_speedup_is_the_whole_forwards_flop_bound():
    """Budget(flops_speedup=s): the compressed forward runs at most total / s FLOPs (the same target
    as total_flops = floor(total / s)); s <= 1 is refused, and a bound beyond what the compressible
    layers can give names the feasible range of s."""
    unet = make_tiny_unet()
    units = compression_units(unet)
    profiles = decreasing_profiles(units)
    costs = unit_flop_costs(unet, TINY)
    plan = plan_ranks(None, units, Budget(flops_speedup=1.15), profiles=profiles, costs=costs)
    same = plan_ranks(
        None, units, Budget(total_flops=int(costs.total // 1.15)), profiles=profiles, costs=costs
    )
    assert plan.ranks() == same.ranks() and plan.flops_after <= costs.total / 1.15
    with pytest.raises(ValueError, match="flops_speedup must be a finite number > 1"):
        Budget(flops_speedup=1.0)
    with pytest.raises(InfeasibleBudgetError, match=r"flops_speedup in \[1\.0000, "):
        plan_ranks(None, units, Budget(flops_speedup=50.0), profiles=profiles, costs=costs)
