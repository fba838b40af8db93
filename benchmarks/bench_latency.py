"""Latency budgets: the measured latency table (``slimdiff.planning.latency``) of a denoiser on this device,
and how well a plan's predicted latency matches a measured forward.

1. The table: every unit at every grid rank of params.yaml's allocation (r_min, multiple), timed
   standalone at the benchmark's serving shape (``MeasuredTimer``: threads pinned, warm-up, median
   of repeats), identical blocks once; cached (``--cache-dir``), so a rerun re-times nothing.
   Written to ``benchmarks/results/latency_table_<model>_<device>.md`` / ``.json``.
2. For each ``--fractions`` f: the plan removing f of the compressible latency
   (``Budget(removed_latency_fraction=f)``) and the FLOP-budget plan of equal predicted latency
   (``removed_flops_fraction`` found by bisection so the table predicts the same forward latency).
   Both are compressed and timed with the original, interleaved (ABBA order) after warm-up, as
   ``bench_speed.py`` does: median and [min, max] per model, measured / predicted, and each plan's
   predicted output error (sum_m pi_m e_m(r_m), the allocation objective at tau = 0).

    python benchmarks/bench_latency.py --model toy --write
    python benchmarks/bench_latency.py --model sd15 --device cuda --dtype float16 --reps 30 --write
    # smoke (no statistics: synthetic error curves and the weight-only rewrite; nothing written)
    python benchmarks/bench_latency.py --model toy --profiles synthetic --reps 1 --warmup 0 \\
        --timer-warmup 0 --timer-repeats 1 --cache-dir /tmp/slimdiff-latency-smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_speed import interleaved, serving_of, sharing_copy  # benchmarks/ is on sys.path as a script
from denoisers import SPECS

from slimdiff.config import load_params
from slimdiff.families.units import compression_units, count_parameters, planned_units
from slimdiff.planning.allocation import flop_feasible_range, plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import unit_flop_costs
from slimdiff.planning.latency import MeasuredTimer, device_label, unit_latency_costs
from slimdiff.surgery.compress import compress_

ROOT = Path(__file__).resolve().parent.parent


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def synthetic_profiles(units) -> dict[str, list[float]]:
    """Strictly decreasing error curves (power-law spectra, exponents 0.4-1.9): for a smoke run
    without statistics; the plans' shapes are then not a real model's."""
    out = {}
    for i, (n, u) in enumerate(units.items()):
        a = 0.4 + 0.15 * (i % 11)
        spectrum = [(k + 1) ** -a for k in range(u.full_rank)]
        total = sum(spectrum)
        out[n] = [sum(spectrum[r:]) / total for r in range(u.full_rank + 1)]
    return out


def weighted_error(plan, profiles, units) -> float:
    """sum_m pi_m e_m(r_m), pi_m the unit's share of the compressible parameters."""
    total = sum(u.full_params for u in units.values())
    return sum(units[n].full_params / total * profiles[n][r] for n, r in plan.ranks().items())


def flop_plan_at(latency_s: float, lat, flops, units, profiles, alloc, iters: int):
    """The FLOP-budget plan whose predicted latency (the table's) is closest to ``latency_s`` from
    below (else from above): bisection on removed_flops_fraction."""
    lo_f, _, compressible = flop_feasible_range(units, flops, alloc.r_min, alloc.multiple, alloc.tie_qk_vo)
    hi = (1 - lo_f / compressible) * (1 - 1e-9)
    lo, best = 0.0, None

    def plan(g: float):
        return plan_ranks(
            None,
            units,
            Budget(removed_flops_fraction=g),
            profiles=profiles,
            costs=flops,
            tau=alloc.tau,
            r_min=alloc.r_min,
            multiple=alloc.multiple,
            tie_qk_vo=alloc.tie_qk_vo,
        )

    for _ in range(iters):
        g = 0.5 * (lo + hi)
        p = plan(g)
        t = lat.plan_seconds(p.ranks())
        key = (t > latency_s, abs(t - latency_s))
        if best is None or key < best[0]:
            best = (key, g, p, t)
        if t > latency_s:
            lo = g
        else:
            hi = g
    return best[1], best[2], best[3]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy", choices=sorted(SPECS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--batch", type=int, default=None, help="default: the spec's")
    ap.add_argument("--resolution", type=int, default=None, help="image pixels (default: the spec's)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--reps", type=int, default=20, help="interleaved timed forwards per model")
    ap.add_argument("--warmup", type=int, default=None, help="untimed forwards per model (cpu 1, cuda 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--timer-warmup", type=int, default=3, help="untimed runs per table entry")
    ap.add_argument("--timer-repeats", type=int, default=15, help="timed samples per table entry (median)")
    ap.add_argument(
        "--cache-dir", default=None, help="latency table cache (default ~/.cache/slimdiff/latency)"
    )
    ap.add_argument(
        "--match-iters", type=int, default=12, help="bisection steps for the equal-latency FLOP plan"
    )
    ap.add_argument(
        "--profiles",
        default="measured",
        choices=["measured", "synthetic"],
        help="error curves from calibration statistics (as bench_speed), or synthetic ones (smoke: no "
        "statistics, weight-only rewrite at the plans' ranks, same shapes)",
    )
    ap.add_argument(
        "--write", action="store_true", help="write benchmarks/results/latency_table_<model>_<device>.*"
    )
    args = ap.parse_args(argv)
    on_cpu = torch.device(args.device).type == "cpu"
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 3)
    args.threads = args.threads or os.cpu_count()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = SPECS[args.model]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    params = load_params(ROOT / "params.yaml")
    alloc, damping, qk_norm = params.allocation, params.compression.damping, params.compression.qk_norm
    resolution = args.resolution or spec.default_resolution
    batch = args.batch or spec.default_batch
    t_start = time.perf_counter()

    base = spec.build()
    units = planned_units(compression_units(base), alloc.modules, qk_norm)  # as the plan stage does
    x_cpu = spec.inputs(base, batch, resolution, 0)
    shape = serving_of(base, x_cpu, args.device)
    if args.profiles == "measured":
        from slimdiff.planning.influence import compute_influence
        from slimdiff.planning.spectra import error_profiles

        method = "slimdiff"
        stats = spec.calibrate(base, resolution)
        influence = compute_influence(stats, base, weighting="spectral" if stats.n_buckets > 1 else "uniform")
        covariances = influence.aggregate(stats)
        del stats
        profiles = error_profiles(base, covariances, damping=damping)
    else:
        method, covariances, profiles = "baseline", None, synthetic_profiles(units)

    base = base.to(device=device, dtype=dtype)
    name = device_label(device)
    t0 = time.perf_counter()
    timer = MeasuredTimer(
        device, dtype, warmup=args.timer_warmup, repeats=args.timer_repeats, threads=args.threads
    )
    timed = [0]

    def progress(op):  # the measured timer, with a line every 100 operations
        timed[0] += 1
        if timed[0] % 100 == 0:
            print(
                f"  latency table: {timed[0]} operations timed, {time.perf_counter() - t0:.0f} s", flush=True
            )
        return timer(op)

    progress.cache_tag = timer.cache_tag  # the cache key names the timing protocol, not the wrapper
    lat = unit_latency_costs(
        base,
        shape,
        dtype=dtype,
        timer=progress,
        cache_dir=args.cache_dir,
        r_min=alloc.r_min,
        multiple=alloc.multiple,
        qk_norm=qk_norm,
        units=units,
        device_name=name,
    )
    t_table = time.perf_counter() - t0
    flops = unit_flop_costs(base, shape, qk_norm, units)
    print(
        f"{spec.description} at {shape.to_dict()} on {name} ({args.dtype}): forward {1e3 * lat.forward_s:.3f} ms, "
        f"rest outside the units {1e3 * lat.seconds(lat.rest):.3f} ms; table: {lat.measured} operations timed "
        f"in {t_table:.1f} s (0 = cached: {lat.cache_path})",
        flush=True,
    )

    rows = []
    for frac in args.fractions:
        by_time = plan_ranks(
            None,
            units,
            Budget(removed_latency_fraction=frac),
            profiles=profiles,
            costs=lat,
            tau=alloc.tau,
            r_min=alloc.r_min,
            multiple=alloc.multiple,
            tie_qk_vo=alloc.tie_qk_vo,
        )
        predicted = lat.plan_seconds(by_time.ranks())
        g, by_flops, predicted_f = flop_plan_at(
            predicted, lat, flops, units, profiles, alloc, args.match_iters
        )
        models = {"original": base}
        for key, plan in (("latency plan", by_time), ("FLOP plan", by_flops)):
            shared = device.type == "cpu" and dtype == torch.float32
            slim = sharing_copy(base) if shared else copy.deepcopy(base).to("cpu", torch.float32)
            compress_(slim, plan, covariances, method=method, damping=damping, qk_norm=qk_norm)
            models[key] = slim.to(device=device, dtype=dtype)
        x = x_cpu.to(device, dtype)
        timing = interleaved(models, x, device, args.reps, args.warmup, False)
        pred = {"original": lat.total_seconds, "latency plan": predicted, "FLOP plan": predicted_f}
        plans = {"original": None, "latency plan": by_time, "FLOP plan": by_flops}
        for key, t in timing.items():
            s = t["seconds"]
            plan = plans[key]
            row = {
                "fraction": frac,
                "model": key,
                "flops_fraction": g if key == "FLOP plan" else None,
                "predicted_ms": 1e3 * pred[key],
                "median_ms": 1e3 * statistics.median(s),
                "min_ms": 1e3 * min(s),
                "max_ms": 1e3 * max(s),
                "measured_over_predicted": statistics.median(s) / pred[key],
                "gflops": (flops.total if plan is None else flops.plan_flops(plan.ranks())) / 1e9,
                "params": count_parameters(models[key]),
                "predicted_error": 0.0 if plan is None else weighted_error(plan, profiles, units),
                "timings_s": s,
                "ranks": None if plan is None else plan.ranks(),
            }
            rows.append(row)
            print(
                f"{frac:.0%} {key:>13}: predicted {row['predicted_ms']:.3f} ms, measured {row['median_ms']:.3f} ms "
                f"[{row['min_ms']:.3f}, {row['max_ms']:.3f}] ({row['measured_over_predicted']:.3f}x), "
                f"{row['gflops']:.2f} GFLOPs, error {row['predicted_error']:.4f}",
                flush=True,
            )
        del models
        gc.collect()

    report = render(args, spec, shape, name, lat, rows, t_table, time.perf_counter() - t_start)
    print(report)
    if args.write:
        out = ROOT / "benchmarks" / "results" / f"latency_table_{spec.name}_{slug(name)}.md"
        out.write_text(report + "\n")
        data = {
            "args": vars(args),
            "serving": shape.to_dict(),
            "device": name,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "table_digest": lat.table_digest,
            "forward_ms": 1e3 * lat.forward_s,
            "rest_ms": 1e3 * lat.seconds(lat.rest),
            "table": lat.rows(),
            "rows": rows,
        }
        out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def render(args, spec, shape, name, lat, rows, t_table, t_total) -> str:
    lines = [
        f"# Latency table and latency budgets: {spec.description}",
        "",
        f"Serving shape {shape.to_dict()}, {args.dtype} on {name} (torch {torch.__version__}, {args.threads} "
        f"threads pinned). Table: each distinct operation timed standalone ({args.timer_warmup} warm-up runs, "
        f"median of {args.timer_repeats} samples), table digest `{lat.table_digest[:16]}`; built in "
        f"{t_table:.1f} s ({lat.measured} operations timed; 0 = read from the cache). Forward "
        f"{1e3 * lat.forward_s:.3f} ms, of which outside the units {1e3 * lat.seconds(lat.rest):.3f} ms. "
        f"Plans: error curves `{args.profiles}`; {args.warmup} warm-up forward(s) per model, then {args.reps} "
        f"interleaved forwards per model (ABBA), wall clock; median [min, max]. Total {t_total:.0f} s.",
        "",
        "| removed latency | plan | FLOP fraction | predicted ms | measured ms [min, max] | measured / predicted "
        "| GFLOPs | params | predicted error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ff = "-" if r["flops_fraction"] is None else f"{r['flops_fraction']:.3f}"
        lines.append(
            f"| {r['fraction']:.0%} | {r['model']} | {ff} | {r['predicted_ms']:.3f} | {r['median_ms']:.3f} "
            f"[{r['min_ms']:.3f}, {r['max_ms']:.3f}] | {r['measured_over_predicted']:.3f} | {r['gflops']:.2f} "
            f"| {r['params'] / 1e6:.2f} M | {r['predicted_error']:.4f} |"
        )
    lines += ["", "## The table (ms per forward; each distinct shape once, at R/4, R/2 and R)", ""]
    lines += [
        "| unit (first of its shape) | part | ms at R/4 | ms at R/2 | ms at R |",
        "|---|---|---:|---:|---:|",
    ]
    seen = set()
    for n, t in lat.ffn.items():
        key = tuple(sorted(t.items()))
        if key in seen:
            continue
        seen.add(key)
        r = max(t)
        pts = [min(t, key=lambda g, x=x: abs(g - x)) for x in (r / 4, r / 2, r)]
        lines.append(f"| {n} | ffn | " + " | ".join(f"{1e3 * t[p]:.4f}" for p in pts) + " |")
    for m, att in lat.attentions.items():
        d = att.head_dim
        for part, t in (("q/k proj", att.qk), ("v/out proj", att.vo)):
            key = (part, tuple(sorted(t.items())))
            if key in seen:
                continue
            seen.add(key)
            pts = [min(t, key=lambda g, x=x: abs(g - x)) for x in (d / 4, d / 2, d)]
            lines.append(f"| {m} | {part} | " + " | ".join(f"{1e3 * t[p]:.4f}" for p in pts) + " |")
        diag = {w: s for (w, pq, pv), s in att.sdpa.items() if not pq and not pv}
        key = ("sdpa", tuple(sorted(diag.items())))
        if key not in seen:
            seen.add(key)
            pts = [min(diag, key=lambda g, x=x: abs(g - x)) for x in (d / 4, d / 2, d)]
            lines.append(
                f"| {m} | attention kernel (w, w) | " + " | ".join(f"{1e3 * diag[p]:.4f}" for p in pts) + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
