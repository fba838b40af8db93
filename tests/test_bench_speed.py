"""The speed benchmark's grouped statistics (``benchmarks/bench_speed.py``): how SDXL-sized models get
statistics-driven plans on a host where all their statistics do not fit beside the model."""

from __future__ import annotations

import math

import bench_speed
import pytest
from conftest import make_tiny_unet
from denoisers import DenoiserSpec, random_stats, text_inputs

from slimdiff.calibration.collect import stat_shapes
from slimdiff.families.units import compression_units
from slimdiff.planning.spectra import error_profiles


def _spec() -> DenoiserSpec:
    return DenoiserSpec("tiny", "tiny UNet", make_tiny_unet, text_inputs(7), 64, 2, random_stats(7))


def test_stat_groups_respect_the_limit_and_keep_hook_order():
    unet = make_tiny_unet()
    units = compression_units(unet)
    shapes = stat_shapes(unet)
    sizes = {n: 8 * sum(int(math.prod(shapes[k])) for k in u.stat_keys()) for n, u in units.items()}
    limit = max(sizes.values())  # every unit fits alone; several groups
    groups = bench_speed.stat_groups(units, shapes, limit)
    assert [n for g in groups for n in g] == list(units)  # every unit once, in order
    assert len(groups) > 1
    assert all(sum(sizes[n] for n in g) <= limit for g in groups)
    assert bench_speed.stat_groups(units, shapes, 1) == [[n] for n in units]  # too small: one unit each


def test_grouped_profiles_equal_the_profiles_of_all_statistics_at_once():
    """Each pass sees the same random inputs and the collector's sums are exact float64 sums of the
    same products, so the grouped profiles are the one-pass profiles to rounding (1e-12 relative:
    only the order of float64 additions may differ)."""
    spec = _spec()
    unet = spec.build()
    units = compression_units(unet)
    stats = spec.calibrate(unet, 64)
    expected = error_profiles(unet, stats.aggregate([1.0]), units=units, damping=1e-2)
    sizes = [8 * sum(int(math.prod(s)) for s in stat_shapes(unet).values())]
    got = bench_speed.grouped_profiles(spec, unet, 64, units, 1e-2, limit_bytes=sizes[0] // 4)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-15), name


def test_kept_shares_name_every_kind_and_a_whole_kind_reads_1():
    """The results table's "kept ffn / qk / vo" cell: the kept share of each kind's parameters in
    the plan, and "1" for a kind the plan leaves out (FLUX's QKs under qk_norm auto), so the three
    positions always mean ffn, qk, vo (printed to 2 decimals: compared within 5e-3)."""
    from slimdiff.planning.plan import RankPlan

    unet = make_tiny_unet()
    units = compression_units(unet)
    half = {n: u.full_rank // 2 for n, u in units.items()}
    everything = RankPlan.from_ranks(units, half)
    shares = [float(x) for x in bench_speed.kind_shares(everything).split(" / ")]
    for share, kind in zip(shares, ("ffn", "qk", "vo"), strict=True):
        ours = [p for p in everything.units.values() if p.kind == kind]
        assert share == pytest.approx(
            sum(p.params_after for p in ours) / sum(p.params_before for p in ours), abs=5e-3
        )
    no_qk = {n: u for n, u in units.items() if u.kind != "qk"}
    cell = bench_speed.kind_shares(RankPlan.from_ranks(no_qk, {n: half[n] for n in no_qk}))
    assert cell.split(" / ")[1] == "1" and cell.split(" / ")[0] == f"{shares[0]:.2f}"
