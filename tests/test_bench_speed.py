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
