"""Budgets in measured latency (slimdiff.planning.latency, Budget(removed_latency_fraction=...)).

Every table here is "measured" by a fake timer whose seconds are a known function of the timed
operation's widths: K seconds per FLOP (as ``slimdiff.planning.flops`` counts them) plus C seconds per
kernel call (linears, the FFN activation, the attention kernel, each zero-padding). References: the
FLOP cost model (``slimdiff.planning.flops.unit_flop_costs``) and the FLOP counter of models compressed to
a plan (``denoiser_flops`` on a meta skeleton), both independent of the latency code."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from conftest import make_tiny_unet
from test_flop_budget import compressed_flops, decreasing_profiles
from test_mmdit import tiny_sd3

from slimdiff.config import ConfigError, Params
from slimdiff.families.units import compression_units, planned_units
from slimdiff.planning.allocation import check_feasible, plan_ranks
from slimdiff.planning.budget import Budget, InfeasibleBudgetError
from slimdiff.planning.flops import ServingShape, denoiser_flops, unit_flop_costs
from slimdiff.planning.latency import QUANTUM_S, CostModel, LatencyCosts, LatencyOp, unit_latency_costs
from slimdiff.planning.plan import RankPlan, rank_grid

B, T = 2, 5
TINY = ServingShape((8, 8), batch=B, text_len=T)
GRID = dict(r_min=4, multiple=4)


class FakeTimer:
    """k seconds per FLOP + c per kernel call; ``pad`` more per zero-padding of the attention kernel,
    ``sdpa_scale`` x the attention kernel's FLOP time. Counts its calls per kind."""

    def __init__(
        self, k: float = 1e-12, c: float = 0.0, pad: float = 0.0, tile: tuple[int, int] | None = None
    ):
        self.k, self.c, self.pad, self.tile = k, c, pad, tile
        self.calls: Counter = Counter()
        self.cache_tag = f"fake:{k}:{c}:{pad}:{tile}"

    def __call__(self, op: LatencyOp) -> float:
        self.calls[op.kind] += 1
        pads = sum((a < w) + (v < w) for *_, a, v, w in op.sdpa)
        flops = op.flops
        if self.tile and op.kind != "forward":  # widths rounded up to whole tiles
            f, h = self.tile
            up = lambda x, m: -(-x // m) * m  # noqa: E731
            flops = sum(2 * rows * up(i, f) * up(o, f) for rows, i, o, _ in op.linears)
            flops += sum(2 * b * hh * nq * nk * 2 * up(w, h) for b, hh, nq, nk, _, _, w in op.sdpa)
        return self.k * flops + self.c * op.calls + self.pad * pads


def models():
    return {"unet": make_tiny_unet(), "sd3": tiny_sd3()}


def pads(a: int, v: int, d: int, device: str = "cpu") -> int:
    if a == v == d:
        return 0
    w = max(a, v)  # CPU: the common width is the larger one; CUDA rounds it up to a multiple of 8
    w = -(-w // 8) * 8 if device == "cuda" else w
    return (a < w) + (v < w)


# -- 1. the table is the timer's function at every grid point ----------------------------------
@pytest.mark.parametrize("family", ["unet", "sd3"])
def test_table_is_the_known_function_at_every_grid_point(family, tmp_path):
    model = models()[family]
    units = compression_units(model)
    c = 1e-6  # one microsecond per kernel call = 10^6 quanta
    lat = unit_latency_costs(model, TINY, timer=FakeTimer(c=c), cache_dir=tmp_path, **GRID)
    flops = unit_flop_costs(model, TINY)
    per_call = round(c / QUANTUM_S)
    assert isinstance(lat, CostModel) and isinstance(flops, CostModel)
    checked = 0
    for n, u in units.items():
        if u.kind != "ffn":
            continue
        for r in rank_grid(u.full_rank, **GRID):  # proj_in, activation, proj_out
            assert lat.unit_cost(n, r) == flops.unit_cost(n, r) + 3 * per_call, (n, r)
            checked += 1
    seen = set()
    for u in units.values():
        module = u.layout.module if u.kind != "ffn" else None
        if module is None or module in seen:
            continue
        seen.add(module)
        lay, d = u.layout, u.layout.head_dim
        n_qk, n_vo = len(lay.all_query) + len(lay.key), len(lay.value) + len(lay.out)
        grid = rank_grid(d, **GRID)
        for a in grid:
            for v in grid:
                expected = flops.attention_cost(module, a, v) + (n_qk + n_vo + 1 + pads(a, v, d)) * per_call
                assert lat.attention_cost(module, a, v) == expected, (module, a, v)
                checked += 1
    assert checked > 50
    # the whole forward, and the rest of the model outside the units, are the timer's too
    report = denoiser_flops(model, B, 8, T)
    assert lat.total == report.total + len(report.rows) * per_call
    assert lat.total_seconds == pytest.approx(1e-12 * report.total + c * len(report.rows))


# -- 2. identical blocks are measured once ---------------------------------------------------------
def test_identical_blocks_share_one_measurement(tmp_path):
    """Tiny UNet: three FFNs at the top level (down 0, up 1 x 2; width 32, GEGLU inner 128, 8x8
    tokens) and one in the mid block (width 64, inner 256, 4x4 tokens): one timing per distinct
    (shape, rank), i.e. 32 + 64 FFN timings, not 3 x 32 + 64; attentions likewise per shape."""
    unet = make_tiny_unet()
    units = compression_units(unet)
    ffn = [n for n, u in units.items() if u.kind == "ffn"]
    assert len(ffn) == 4
    timer = FakeTimer()
    lat = unit_latency_costs(unet, TINY, timer=timer, cache_dir=tmp_path, **GRID)
    assert timer.calls["ffn"] == len(rank_grid(128, **GRID)) + len(rank_grid(256, **GRID)) == 32 + 64
    # attention shapes: (attn1, attn2) x (top: d_h 16, mid: d_h 32); q/k and v/out per grid width
    assert (
        timer.calls["qk"]
        == timer.calls["vo"]
        == 2 * len(rank_grid(16, **GRID)) + 2 * len(rank_grid(32, **GRID))
    )
    # the kernel per (common width, padding) class: the diagonal (w, w) at every width and the two
    # padded sides at every width above the lowest: 4 + 2 x 3 = 10 at d_h 16, 8 + 2 x 7 = 22 at 32
    assert timer.calls["sdpa"] == 2 * 10 + 2 * 22
    assert timer.calls["forward"] == 1
    assert lat.measured == sum(timer.calls.values())
    top = [n for n in ffn if not n.startswith("mid_block")]
    assert lat.ffn[top[0]] == lat.ffn[top[1]] == lat.ffn[top[2]]


# -- 3. the cache ------------------------------------------------------------------------------
def test_cached_table_is_reused_never_remeasured(tmp_path):
    unet = make_tiny_unet()
    first = unit_latency_costs(unet, TINY, timer=FakeTimer(c=1e-6), cache_dir=tmp_path, **GRID)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and first.measured > 0
    data = json.loads(files[0].read_text())
    assert data["key"]["serving"] == TINY.to_dict() and data["key"]["grid"] == [4, 4]
    assert data["key"]["torch"] == torch.__version__ and data["key"]["threads"] == torch.get_num_threads()

    class Refuses(FakeTimer):
        def __call__(self, op):
            raise AssertionError(f"re-measured a cached {op.kind} operation")

    again = unit_latency_costs(unet, TINY, timer=Refuses(c=1e-6), cache_dir=tmp_path, **GRID)
    assert again.measured == 0 and again == first and again.table_digest == first.table_digest
    # another serving shape, grid or device is another table
    other = unit_latency_costs(
        unet, ServingShape((8, 8), batch=1, text_len=T), timer=FakeTimer(c=1e-6), cache_dir=tmp_path, **GRID
    )
    assert other.measured > 0 and other.total < first.total
    named = unit_latency_costs(
        unet, TINY, timer=FakeTimer(c=1e-6), cache_dir=tmp_path, device_name="another CPU", **GRID
    )
    assert named.measured > 0 and named.device == "another CPU"
    assert len(list(tmp_path.glob("*.json"))) == 3


# -- 4. a plan's predicted latency is the timer's figure for the compressed model ------------------
@pytest.mark.parametrize("family, device", [("unet", "cpu"), ("unet", "cuda"), ("sd3", "cpu")])
def test_plan_cost_is_the_timer_sum_over_the_compressed_model(family, device, tmp_path):
    """plan_cost = K x FLOPs of the compressed model (the counter's) + C x its kernel calls (the
    uncompressed forward's, plus each padding a compressed attention adds); off the grid too (a
    kernel class the grid never reaches: the unpadded kernel interpolated plus the padding
    overhead). CUDA's padding rule (common width rounded up to 8) with the fake timer."""
    model = models()[family]
    units = compression_units(model)
    c = 1e-6
    shape = ServingShape((8, 8), B, T, device)
    lat = unit_latency_costs(
        model, shape, timer=FakeTimer(c=c), cache_dir=tmp_path, device_name="test", **GRID
    )
    n_calls = len(denoiser_flops(model, B, 8, T).rows)
    rng = random.Random(3)
    for step in (4, 1):  # on the grid, then any rank (interpolated: exact for a linear timer)
        for _ in range(4):
            ranks = {n: rng.choice(rank_grid(u.full_rank, step, step)) for n, u in units.items()}
            padding = 0
            for module in {u.layout.module for u in units.values() if u.kind != "ffn"}:
                a, v = lat.attention_ranks(ranks, module)
                padding += pads(a, v, lat.head_dim(module), device)
            expected = compressed_flops(model, ranks, shape) + (n_calls + padding) * round(c / QUANTUM_S)
            assert lat.plan_cost(ranks) == expected, ranks
            assert lat.plan_seconds(ranks) == pytest.approx(expected * QUANTUM_S)


# -- 5. a timer proportional to FLOPs: the latency plan is the FLOP plan ---------------------------
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.6])
def test_latency_budget_with_a_flop_proportional_timer_is_the_flop_plan(fraction, tie, tmp_path):
    """At k quanta per FLOP (integer k) every option's cost is k x its FLOPs exactly, and the
    targets agree: k x FLOPs <= floor(k x compressible x (1 - f)) iff FLOPs <= floor(compressible x
    (1 - f)). So the plans are equal, rank for rank. (A non-integer k, or a timer only nearly
    proportional, rounds each measured operation to 1 quantum: plans may then differ where two
    options' costs are within the rounding.)"""
    unet = make_tiny_unet()
    units = compression_units(unet)
    profiles = decreasing_profiles(units)
    flops = unit_flop_costs(unet, TINY)
    ref = plan_ranks(
        None,
        units,
        Budget(removed_flops_fraction=fraction),
        profiles=profiles,
        costs=flops,
        tie_qk_vo=tie,
        **GRID,
    )
    for k in (1, 3):
        lat = unit_latency_costs(unet, TINY, timer=FakeTimer(k=k * QUANTUM_S), cache_dir=tmp_path, **GRID)
        plan = plan_ranks(
            None,
            units,
            Budget(removed_latency_fraction=fraction),
            profiles=profiles,
            costs=lat,
            tie_qk_vo=tie,
            **GRID,
        )
        assert plan.ranks() == ref.ranks()
        cm = plan.cost_model
        assert cm["cost"] == "latency" and cm["kind"] == "latency"
        assert cm["latency_after_s"] == pytest.approx(k * 1e-12 * ref.cost_model["flops_after"], rel=1e-12)
        assert cm["compressible_latency_s"] == pytest.approx(k * 1e-12 * ref.cost_model["compressible_flops"])
        assert cm["latency_after_s"] <= cm["target_latency_s"] and plan.solver["exact"] is True


def test_latency_plan_equals_the_flop_plan_on_sd3(tmp_path):
    model = tiny_sd3()
    units = planned_units(compression_units(model), ("ffn", "qk", "vo"))
    profiles = decreasing_profiles(units)
    lat = unit_latency_costs(model, TINY, timer=FakeTimer(), cache_dir=tmp_path, **GRID)
    flops = unit_flop_costs(model, TINY)
    for fraction in (0.3, 0.5):
        a = plan_ranks(
            None, units, Budget(removed_latency_fraction=fraction), profiles=profiles, costs=lat, **GRID
        )
        b = plan_ranks(
            None, units, Budget(removed_flops_fraction=fraction), profiles=profiles, costs=flops, **GRID
        )
        assert a.ranks() == b.ranks()


# -- 6. a timer that is not proportional moves the plan the predicted way ---------------------------
def test_costly_padding_makes_the_latency_plan_tie_every_attention(tmp_path):
    """Zero-padding q/k or v costs 10 us per call here (more than any attention's projections at
    this size): an untied pair (r_qk < r_vo, say) then costs more than the tied pair at the larger
    rank, which has no more error, so the latency plan ties every attention; the FLOP plan at the
    same fraction leaves some untied (cutting q/k projections below v is cheap in FLOPs)."""
    unet = make_tiny_unet()
    units = compression_units(unet)
    profiles = decreasing_profiles(units)
    flops = unit_flop_costs(unet, TINY)
    lat = unit_latency_costs(unet, TINY, timer=FakeTimer(pad=1e-5), cache_dir=tmp_path, **GRID)
    modules = {u.layout.module for u in units.values() if u.kind != "ffn"}
    for fraction in (0.3, 0.5):
        by_flops = plan_ranks(
            None, units, Budget(removed_flops_fraction=fraction), profiles=profiles, costs=flops, **GRID
        )
        by_time = plan_ranks(
            None, units, Budget(removed_latency_fraction=fraction), profiles=profiles, costs=lat, **GRID
        )
        untied = [
            sum(len(set(c.attention_ranks(p.ranks(), m))) > 1 for m in modules)
            for p, c in ((by_flops, flops), (by_time, lat))
        ]
        assert untied[0] >= 1 and untied[1] == 0, untied


def test_tiled_kernels_make_the_latency_plan_skip_ranks_that_save_no_time(tmp_path):
    """Kernels that run in tiles (every linear's feature widths rounded up to 16, the attention
    kernel's head width to 8: the GPU GEMM tiling and flash attention's rule): with 2 heads and
    GEGLU (2r features), rank 4 costs what rank 8 costs, 12 what 16 costs, ... Every rank that is 4
    mod 8 is then dominated (same latency, more error), and the latency plan uses none of them; the
    FLOP plan at the same fraction does."""
    unet = make_tiny_unet()
    units = compression_units(unet)
    profiles = decreasing_profiles(units)
    flops = unit_flop_costs(unet, TINY)
    lat = unit_latency_costs(unet, TINY, timer=FakeTimer(tile=(16, 8)), cache_dir=tmp_path, **GRID)
    for name, u in units.items():  # the table shows the steps
        if u.kind == "ffn":
            assert lat.unit_cost(name, 4) == lat.unit_cost(name, 8) < lat.unit_cost(name, 12)
    for fraction in (0.3, 0.5):
        by_flops = plan_ranks(
            None, units, Budget(removed_flops_fraction=fraction), profiles=profiles, costs=flops, **GRID
        )
        by_time = plan_ranks(
            None, units, Budget(removed_latency_fraction=fraction), profiles=profiles, costs=lat, **GRID
        )
        assert any(r % 8 for r in by_flops.ranks().values())
        assert not any(r % 8 for r in by_time.ranks().values()), by_time.ranks()
        assert by_time.solver["exact"] is True


# -- 7. the plan's record ----------------------------------------------------------------------
def test_latency_plan_records_its_table_and_round_trips(tmp_path):
    unet = make_tiny_unet()
    units = compression_units(unet)
    lat = unit_latency_costs(unet, TINY, timer=FakeTimer(c=1e-6), cache_dir=tmp_path / "cache", **GRID)
    profiles = decreasing_profiles(units)
    plan = plan_ranks(None, units, Budget(removed_latency_fraction=0.4), profiles=profiles, costs=lat, **GRID)
    cm = plan.cost_model
    assert {k: cm[k] for k in ("kind", "serving", "device", "table_digest", "dtype")} == lat.to_dict()
    assert cm["latency_before_s"] == lat.total_seconds and cm["latency_after_s"] == lat.plan_seconds(
        plan.ranks()
    )
    zero = lat.plan_cost(dict.fromkeys(units, 0))
    assert cm["compressible_latency_s"] == pytest.approx((lat.total - zero) * QUANTUM_S)
    removed = cm["latency_before_s"] - cm["latency_after_s"]
    assert removed >= 0.4 * cm["compressible_latency_s"] * (1 - 1e-12)
    assert plan.budget == {"removed_latency_fraction": 0.4} and plan.target_params is None
    assert all(u.flops_per_rank is None for u in plan.units.values())
    loaded = RankPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan and loaded.digest == plan.digest
    # a parameter budget with a latency table only records the predicted latency
    params = plan_ranks(None, units, Budget(removed_fraction=0.4), profiles=profiles, costs=lat, **GRID)
    assert params.cost_model["cost"] == "params"
    assert (
        params.ranks()
        == plan_ranks(None, units, Budget(removed_fraction=0.4), profiles=profiles, **GRID).ranks()
    )


# -- 8. the operations run (what MeasuredTimer times), without timing them --------------------------
@pytest.mark.parametrize("family", ["unet", "sd3"])
def test_every_operation_runs_on_the_device(family, tmp_path):
    model = models()[family]
    ran: Counter = Counter()

    def runs(op: LatencyOp) -> float:
        fn = op.make(torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            fn()
        ran[op.kind] += 1
        return 1e-6

    unit_latency_costs(model, TINY, timer=runs, cache_dir=tmp_path, r_min=8, multiple=8)
    assert set(ran) == {"ffn", "qk", "vo", "sdpa", "forward"}


# -- 9. bad inputs ---------------------------------------------------------------------------------
def test_bad_latency_budgets_and_tables_are_rejected_with_messages(tmp_path):
    unet = make_tiny_unet()
    units = compression_units(unet)
    profiles = decreasing_profiles(units)
    flops = unit_flop_costs(unet, TINY)
    lat = unit_latency_costs(unet, TINY, timer=FakeTimer(c=1e-6), cache_dir=tmp_path, **GRID)
    with pytest.raises(ValueError, match=r"removed_latency_fraction must be in \[0, 1\)"):
        Budget(removed_latency_fraction=1.0)
    with pytest.raises(ValueError, match="exactly one of"):
        Budget(removed_latency_fraction=0.2, removed_flops_fraction=0.2)
    with pytest.raises(
        ValueError,
        match="counts latency: plan_ranks needs costs=slimdiff.planning.latency.unit_latency_costs",
    ):
        plan_ranks(None, units, Budget(removed_latency_fraction=0.4), profiles=profiles)
    with pytest.raises(ValueError, match="counts latency but costs are flops"):
        plan_ranks(None, units, Budget(removed_latency_fraction=0.4), profiles=profiles, costs=flops)
    with pytest.raises(ValueError, match="counts FLOPs but costs is a latency table"):
        plan_ranks(None, units, Budget(removed_flops_fraction=0.4), profiles=profiles, costs=lat)
    # uniform ranks under a latency budget: the smallest parameter count whose plan fits the latency
    uni = plan_ranks(None, units, Budget(removed_latency_fraction=0.4), mode="uniform", costs=lat, **GRID)
    zero = lat.plan_cost(dict.fromkeys(units, 0))
    assert lat.plan_cost(uni.ranks()) <= lat.total - 0.4 * (lat.total - zero) + 1
    assert uni.cost_model["cost"] == "latency" and uni.budget == {"removed_latency_fraction": 0.4}
    with pytest.raises(InfeasibleBudgetError, match=r"removed_latency_fraction in \[0\.000000, 0\.\d+\]"):
        plan_ranks(None, units, Budget(removed_latency_fraction=0.99), profiles=profiles, costs=lat, **GRID)
    with pytest.raises(
        ValueError,
        match="costs must be slimdiff.planning.flops.FlopCosts or slimdiff.planning.latency.LatencyCosts",
    ):
        plan_ranks(None, units, Budget(removed_fraction=0.4), profiles=profiles, costs={"not": "costs"})
    other = unit_latency_costs(
        make_tiny_unet(block_out_channels=(32, 32)), TINY, timer=FakeTimer(), cache_dir=tmp_path, **GRID
    )
    mid = {n: u for n, u in units.items() if n.startswith("mid_block")}
    with pytest.raises(
        ValueError, match="made for another model: mid_block.* has full rank 128 there, 256 here"
    ):
        plan_ranks(None, mid, Budget(removed_latency_fraction=0.4), profiles=profiles, costs=other, **GRID)
    ffn = {n: u for n, u in units.items() if u.kind == "ffn"}
    only_ffn = unit_latency_costs(unet, TINY, timer=FakeTimer(), cache_dir=tmp_path, units=ffn, **GRID)
    with pytest.raises(ValueError, match="the latency cost model has no cost for 16 planned units"):
        plan_ranks(
            None, units, Budget(removed_latency_fraction=0.4), profiles=profiles, costs=only_ffn, **GRID
        )
    assert plan_ranks(
        None, ffn, Budget(removed_latency_fraction=0.4), profiles=profiles, costs=only_ffn, **GRID
    )
    assert check_feasible(units, Budget(removed_latency_fraction=0.99)) is None  # left to the plan stage
    # the table
    with pytest.raises(ValueError, match=r"timer returned nan seconds"):
        unit_latency_costs(unet, TINY, timer=lambda op: float("nan"), cache_dir=tmp_path / "x", **GRID)
    with pytest.raises(ValueError, match="move the model there first"):
        unit_latency_costs(unet, ServingShape((8, 8), B, T, "cuda"), cache_dir=tmp_path / "y")
    with pytest.raises(ValueError, match="qk_norm 'project'"):
        unit_latency_costs(tiny_sd3(), TINY, timer=FakeTimer(), cache_dir=tmp_path / "z", qk_norm="project")
    with pytest.raises(ValueError, match="r_min and multiple must be >= 1"):
        unit_latency_costs(unet, TINY, timer=FakeTimer(), cache_dir=tmp_path, r_min=0)
    with pytest.raises(ValueError, match="above the table's largest"):
        lat.plan_cost({f"{next(iter(units))}": 10_000})
    with pytest.raises(ValueError, match="units the latency table does not have"):
        lat.plan_cost({"no.such.unit": 4})
    assert isinstance(lat, LatencyCosts)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            {"allocation.budget.kind": "removed_latency_fraction", "allocation.budget.value": 1.5},
            "allocation.budget: value: removed_latency_fraction must be in (0, 1)",
        ),
    ],
)
def test_latency_budget_params_are_validated(overrides, expected):
    with pytest.raises(ConfigError) as err:
        Params().with_overrides(overrides)
    assert expected in str(err.value)
    ok = Params().with_overrides(
        {"allocation.budget.kind": "removed_latency_fraction", "allocation.budget.value": 0.3}
    )
    assert ok.allocation.budget.in_latency and not ok.allocation.budget.in_flops


def test_measured_timer_runs_warmup_then_repeats_and_restores_threads():
    """The protocol, not the clock: ``warmup`` untimed runs, ``repeats`` samples of back-to-back runs
    (one run each when ``min_sample_s`` is 0), the median returned, the thread count restored."""
    from slimdiff.planning.latency import MeasuredTimer

    runs = []
    op = LatencyOp("qk", ((8, 4, 4, True),), make=lambda device, dtype: lambda: runs.append(1))
    threads = torch.get_num_threads()
    timer = MeasuredTimer("cpu", warmup=2, repeats=5, threads=1, min_sample_s=0.0)
    seconds = timer(op)
    assert len(runs) == 2 + 5 and torch.get_num_threads() == threads
    lo, hi = timer.spread[op.signature()]
    assert 0.0 <= lo <= seconds <= hi
    assert timer.cache_tag == "measured:w2:r5:s0"
    with pytest.raises(ValueError, match="nothing to run"):
        timer(LatencyOp("qk", ((8, 4, 4, True),)))
    with pytest.raises(ValueError, match="repeats >= 1"):
        MeasuredTimer("cpu", repeats=0)
