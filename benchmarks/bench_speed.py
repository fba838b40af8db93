"""Denoiser speed after compression, for the plans users get: measured latency next to the FLOPs bound.

For each budget (share of the compressible parameters removed) and each plan kind:

* ``error``: what the committed params.yaml produces (allocation mode, tau, r_min, multiple,
  tie_qk_vo), from error profiles of statistics collected on the model itself;
* ``error-tied``: the same with every attention's qk and vo ranks tied (an allocation constraint
  that the processor's padding makes unnecessary for the kernel; timed to decide);
* ``uniform``: one keep ratio everywhere; ``influence``: METHOD.md's softmax of spectral influence.

Statistics: for models without real weights here (SD v1.5, SDXL, ...) they are collected on the
random-weight model of the real shape with random inputs at three timesteps (``denoisers.py``);
speed depends on the shapes a plan leaves, and those come from the same code as for a real model,
but from different activations, so the plan shapes are representative, not the ones a real
checkpoint would get. The toy model is calibrated exactly as ``slimdiff run`` does.

Memory: the compressed copy shares every tensor it does not rewrite with the original (CPU
float32), so one model is resident plus the new, smaller layers. The float64 statistics are the
other large item: SDXL's 60 FFN second moments of 5120 x 5120 are 13 GB, held twice while the
snapshot and the aggregated covariances are made. ``--statistics auto`` (default) collects them
all at once only when twice their size fits in the available memory; otherwise (SDXL on a 24 GB
host) it collects them ``grouped``: a few units' statistics per sampling pass (the same random
inputs every pass, so each statistic is the one a single pass would give), each group's error
profiles computed and its statistics dropped before the next pass; the ``error`` plans then come
from the same allocation code as with all statistics at once (with one timestep bucket the
profiles of a unit depend on its own statistics only), ``influence`` plans are skipped (their
softmax needs every unit's score), and the compressed layers are built by the weight-only
methods (magnitude FFN selection, weight SVD for QK/VO) at the plan's ranks: the same layer
shapes as the SlimDiff rewrite, hence the same speed. ``none``: no statistics, ``uniform`` plans
only, built the same way.

Protocol: torch threads pinned (``--threads``, interop 1), one warm-up forward per model, then
``--reps`` interleaved pairs (original, compressed, compressed, original, ... so drift cancels),
wall clock. Reported: median latency of each and the speedup as the ratio of the medians, with the
range of the per-pair ratios; the conv / attention / FFN split of the same timed forwards (module
hooks); the analytic FLOPs bound (``slimdiff.planning.flops``, attention matmuls at the widths that run);
measured / bound (target >= 85%, and never below 1.0x); and which SDPA backend every attention
of the compressed model ran, next to the original's.

    python benchmarks/bench_speed.py --model sd15 --write
    python benchmarks/bench_speed.py --model toy --reps 30 --write
    python benchmarks/bench_speed.py --model sd15 --device cuda --dtype float16 --reps 20 --write
    python benchmarks/bench_speed.py --model sdxl --write            # 512 px, batch 1
    python benchmarks/bench_speed.py --model pixart-sigma --write    # 512 px, batch 2, 300 T5 tokens
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from denoisers import SPECS, Inputs  # benchmarks/ is on sys.path when run as a script

from slimdiff.calibration.collect import stat_shapes
from slimdiff.config import load_params
from slimdiff.families.attention import sdpa_backends
from slimdiff.families.base import split_path
from slimdiff.families.units import compression_units, count_parameters, planned_units
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import ServingShape, format_breakdown, forward_flops, unit_flop_costs
from slimdiff.planning.influence import compute_influence
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import compress_

ROOT = Path(__file__).resolve().parent.parent
TARGET_EFFICIENCY = 0.85
PLAN_KINDS = ("error", "error-flops", "error-tied", "uniform", "influence")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SplitTimer:
    """Wall seconds inside Conv2d, Attention and FeedForward modules during each forward (hooks;
    outermost module only, so nothing is counted twice). On CUDA every hook synchronises, which
    slows the forward: the split is then measured in separate passes (``--split-pass``)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, ffn_paths: frozenset[str] = frozenset()):
        from diffusers.models.attention import FeedForward

        from slimdiff.families.attention import is_attention_module

        self.device, self.spent, self._depth, self._t0 = device, defaultdict(float), 0, 0.0
        self.handles = []
        for name, mod in model.named_modules():
            cat = (
                "conv"
                if isinstance(mod, torch.nn.Conv2d)
                else "attention"
                if is_attention_module(mod)
                else "ffn"
                if isinstance(mod, FeedForward) or name in ffn_paths
                else None
            )
            if cat:
                self.handles.append(mod.register_forward_pre_hook(self._pre))
                self.handles.append(mod.register_forward_hook(lambda m, a, o, c=cat: self._post(c)))

    def _pre(self, mod, args) -> None:
        if self._depth == 0:
            sync(self.device)
            self._t0 = time.perf_counter()
        self._depth += 1

    def _post(self, cat: str) -> None:
        self._depth -= 1
        if self._depth == 0:
            sync(self.device)
            self.spent[cat] += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def timed_forward(model, x: Inputs, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(*x.args, **x.kwargs)
    sync(device)
    return time.perf_counter() - t0


def interleaved(models: dict, x: Inputs, device, reps: int, warmup: int, split: bool) -> dict:
    """Per model: forward seconds of ``reps`` interleaved runs (ABBA order) after ``warmup`` each,
    and the per-forward conv / attention / ffn seconds of the same runs."""
    names = list(models)
    for name in names:
        for _ in range(warmup):
            timed_forward(models[name], x, device)
    # FFN linears outside a FeedForward module (FLUX single blocks' proj_mlp / packed proj_out)
    ffn_paths = frozenset(
        split_path(p)[0]
        for u in compression_units(models[names[0]]).values()
        if u.kind == "ffn"
        for p in (u.layout.proj_in, u.layout.proj_out)
    )
    timers = {n: SplitTimer(models[n], device, ffn_paths) for n in names} if split else {}
    out = {n: {"seconds": [], "split": []} for n in names}
    try:
        for rep in range(reps):
            for name in names if rep % 2 == 0 else reversed(names):
                if name in timers:
                    timers[name].spent.clear()
                out[name]["seconds"].append(timed_forward(models[name], x, device))
                if name in timers:
                    out[name]["split"].append(dict(timers[name].spent))
    finally:
        for t in timers.values():
            t.remove()
    return out


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s module tree that holds ``model``'s own parameter and buffer tensors (no
    new memory). ``compress_`` swaps the layers it rewrites for new modules and never writes into
    the old tensors, so the original stays intact while the copy is compressed."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def statistics_fit(model: torch.nn.Module, compressible: int) -> tuple[bool, str]:
    """Whether the float64 statistics (one bucket) fit twice (the collector's sums and the snapshot,
    then the snapshot and the covariances), plus the compressed copy's new layers (at most the
    compressible parameters, float32), in the memory available now; and a sentence saying so."""
    stats = 8 * sum(math.prod(shape) for shape in stat_shapes(model).values())
    need = 2 * stats + 4 * compressible
    avail = available_bytes()
    fits = avail is None or need <= 0.9 * avail
    where = "unknown" if avail is None else f"{avail / 1e9:.1f} GB"
    return fits, (
        f"statistics {stats / 1e9:.1f} GB (float64), needs about {need / 1e9:.1f} GB with the compressed copy; "
        f"available {where}"
    )


def stat_groups(units, shapes: dict, limit_bytes: int) -> list[list[str]]:
    """Units in hook order, cut into consecutive groups whose float64 statistics (one bucket) stay
    within ``limit_bytes`` (a unit larger than the limit is a group of its own)."""
    groups: list[list[str]] = []
    size = 0
    for name, unit in units.items():
        nbytes = 8 * sum(math.prod(shapes[k]) for k in unit.stat_keys())
        if not groups or size + nbytes > limit_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def grouped_profiles(spec, model, resolution: int, units, damping: float, limit_bytes: int) -> dict:
    """Error profiles of every unit from statistics collected a group of units at a time
    (``stat_groups``): one sampling pass per group, its statistics dropped once the group's
    profiles are made. Equal to ``error_profiles`` of statistics collected all at once (tests:
    ``test_bench_speed.py``) for one-bucket statistics; multi-bucket statistics are refused (their
    timestep weights depend on every unit)."""
    shapes = stat_shapes(model)
    groups = stat_groups(units, shapes, limit_bytes)
    profiles: dict[str, list[float]] = {}
    for i, group in enumerate(groups, 1):
        keys = list(
            dict.fromkeys(k for n in group for k in (*units[n].stat_keys(), *units[n].first_moment_keys()))
        )
        stats = spec.calibrate(model, resolution, keys=keys)
        if stats.n_buckets != 1:
            raise ValueError(f"grouped statistics need one timestep bucket, got {stats.n_buckets}")
        covariances = stats.aggregate([1.0])
        del stats
        profiles.update(
            error_profiles(model, covariances, units={n: units[n] for n in group}, damping=damping)
        )
        del covariances
        gc.collect()
        print(f"  statistics group {i}/{len(groups)}: {len(group)} units, {len(keys)} statistics", flush=True)
    return profiles


def median_split(splits: list[dict]) -> dict:
    return {c: statistics.median(s.get(c, 0.0) for s in splits) for c in ("conv", "attention", "ffn")}


def make_plans(kind: str, units, fractions, profiles, scores, alloc, model_params, costs=None):
    """Plans of ``kind`` at every fraction: ``error-flops`` removes that share of the compressible
    FLOPs at the benchmark's own shape (``costs``: ``unit_flop_costs``), the others that share of
    the compressible parameters."""
    plans = {}
    for frac in fractions:
        budget = Budget(removed_fraction=frac)
        common = dict(r_min=alloc.r_min, multiple=alloc.multiple, model_params=model_params)
        if kind == "error-flops":
            plans[frac] = plan_ranks(
                scores,
                units,
                Budget(removed_flops_fraction=frac),
                mode="error",
                tau=alloc.tau,
                profiles=profiles,
                tie_qk_vo=alloc.tie_qk_vo,
                costs=costs,
                **common,
            )
        elif kind in ("error", "error-tied"):
            plans[frac] = plan_ranks(
                scores,
                units,
                budget,
                mode="error",
                tau=alloc.tau,
                profiles=profiles,
                tie_qk_vo=alloc.tie_qk_vo or kind == "error-tied",
                **common,
            )
        elif kind == "uniform":
            plans[frac] = plan_ranks(scores, units, budget, mode="uniform", **common)
        else:
            plans[frac] = plan_ranks(scores, units, budget, mode="influence", tau=1.0, **common)
    return plans


def serving_of(model, x, device: str) -> ServingShape:
    """The ServingShape of the timed inputs ``x``: their batch, latent grid and text tokens, read off
    the arguments by name (``encoder_hidden_states``, Z-Image's ``cap_feats``; per-sample lists too)."""
    import inspect

    params = list(inspect.signature(type(model).forward).parameters)[1:]
    bound = {**dict(zip(params, x.args, strict=False)), **x.kwargs}

    def batched(v):
        return v[0][None] if isinstance(v, list | tuple) else v

    text = batched(next(bound[k] for k in ("encoder_hidden_states", "cap_feats") if k in bound))
    first = batched(bound[params[0]])
    if first.ndim >= 4:  # (B, C, H, W) latents, (B, C, F, H, W) video, Z-Image's (C, F, H, W) per sample
        hw = (int(first.shape[-2]), int(first.shape[-1]))
    else:  # FLUX: (B, N, C) of 2x2-packed latent patches, square
        side = 2 * math.isqrt(int(first.shape[1]))
        hw = (side, side)
    return ServingShape(hw, batch=x.batch, text_len=int(text.shape[1]), device=device)


def kind_shares(plan) -> str:
    """Kept share of the parameters of the plan's FFN / QK / VO units; "1" for a kind the plan
    leaves out (whole: e.g. the QKs under q/k norms and RoPE that ``qk_norm: auto`` keeps)."""
    kept = defaultdict(lambda: [0, 0])
    for u in plan.units.values():
        kept[u.kind][0] += u.params_after
        kept[u.kind][1] += u.params_before
    return " / ".join(f"{kept[k][0] / kept[k][1]:.2f}" if kept[k][1] else "1" for k in ("ffn", "qk", "vo"))


def untied_share(model) -> float:
    from diffusers.models.attention_processor import Attention

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    return sum(a.to_q.out_features != a.to_v.out_features for a in attns) / max(1, len(attns))


def compiled_row(row: dict, base, slim, x: Inputs, device, args, compiled: dict) -> dict:
    """The same pair under ``torch.compile`` (inductor, default mode): compilation and ``warmup``
    forwards untimed, then ``reps`` interleaved pairs, as for the eager row."""
    if "original" not in compiled:
        compiled["original"] = torch.compile(base)
    t0 = time.perf_counter()
    slim_c = torch.compile(slim)
    with torch.inference_mode():
        for m in (compiled["original"], slim_c):
            m(*x.args, **x.kwargs)  # compiles (the original only the first time)
    compile_s = time.perf_counter() - t0
    timing = interleaved(
        {"original": compiled["original"], "compressed": slim_c}, x, device, args.reps, args.warmup, False
    )
    t_o, t_s = timing["original"]["seconds"], timing["compressed"]["seconds"]
    pair = [a / b for a, b in zip(t_o, t_s, strict=True)]
    measured = statistics.median(t_o) / statistics.median(t_s)
    out = {
        **row,
        "plan": f"{row['plan']} (compiled)",
        "orig_ms": 1e3 * statistics.median(t_o),
        "slim_ms": 1e3 * statistics.median(t_s),
        "measured": measured,
        "pair_min": min(pair),
        "pair_max": max(pair),
        "efficiency": measured / row["bound"],
        "split_orig": None,
        "split_slim": None,
        "timings_orig": t_o,
        "timings_slim": t_s,
        "compile_s": compile_s,
    }
    out["passes"] = out["efficiency"] >= TARGET_EFFICIENCY and measured >= 1.0
    print(
        f"{out['plan']:>10} {row['fraction']:.0%}: {out['orig_ms']:.0f} -> {out['slim_ms']:.0f} ms, measured "
        f"{measured:.3f}x [{out['pair_min']:.3f}, {out['pair_max']:.3f}] (compiling took {compile_s:.0f} s)",
        flush=True,
    )
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", choices=sorted(SPECS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument(
        "--batch", type=int, default=None, help="default: the spec's (2 = one prompt, both CFG branches)"
    )
    ap.add_argument("--resolution", type=int, default=None, help="image pixels (default: the spec's)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--plans", nargs="+", default=list(PLAN_KINDS), choices=PLAN_KINDS)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=None, help="untimed forwards per model (cpu 1, cuda 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument(
        "--statistics",
        default="auto",
        choices=["auto", "full", "grouped", "none"],
        help="collect activation statistics all at once (full), a few units per pass (grouped: error "
        "plans, weight-only rewrite at their ranks), or not (none: uniform plans, weight-only rewrite); "
        "auto: full when they fit in the available memory, else grouped",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time original and compressed under torch.compile (for the first plan kind's budgets)",
    )
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/speed_<model>_<device>.md")
    ap.add_argument(
        "--tag",
        default="",
        help="results file speed_<model>[_<tag>]_<device>.md: a run of some plans beside the full table",
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
    resolution = args.resolution or spec.default_resolution
    batch = args.batch or spec.default_batch
    alloc = load_params(ROOT / "params.yaml").allocation
    damping = load_params(ROOT / "params.yaml").compression.damping
    qk_norm = load_params(ROOT / "params.yaml").compression.qk_norm
    t_start = time.perf_counter()

    base = spec.build()
    units = compression_units(base)
    compressible = sum(u.full_params for u in units.values())
    total_before = count_parameters(base)
    x_cpu = spec.inputs(base, batch, resolution, 0)
    flops_before = forward_flops(
        base, x_cpu.meta().args, x_cpu.meta().kwargs, batch=batch, device=args.device
    )
    print(
        f"{spec.description}: {total_before / 1e6:.1f} M params, {compressible / 1e6:.1f} M compressible, "
        f"{flops_before.total / 1e9:.1f} GFLOPs at batch {batch}, {resolution} px",
        flush=True,
    )

    fits, memory_note = statistics_fit(base, compressible)
    with_stats = args.statistics == "full" or (args.statistics == "auto" and fits)
    grouped = not with_stats and args.statistics in ("auto", "grouped")
    if with_stats:
        plan_kinds = list(args.plans)
    elif grouped:
        plan_kinds = [k for k in args.plans if k != "influence"]
    else:
        plan_kinds = [k for k in args.plans if k == "uniform"]
    skipped = [k for k in args.plans if k not in plan_kinds]
    t0 = time.perf_counter()
    if grouped:
        method, covariances, scores = "baseline", None, None
        avail = available_bytes() or 8 * 2**30
        limit = max(2**28, min(4 * 2**30, int(0.9 * avail) // 3))  # sums, snapshot, covariances
        profiles = grouped_profiles(spec, base, resolution, units, damping, limit)
        t_stats = time.perf_counter() - t0
        memory_note += f"; collected grouped, <= {limit / 2**30:.2f} GiB of statistics per pass"
        print(f"grouped statistics and error profiles: {t_stats:.0f} s ({memory_note})", flush=True)
    elif with_stats:
        method = "slimdiff"
        stats = spec.calibrate(base, resolution)
        weighting = "spectral" if stats.n_buckets > 1 else "uniform"
        influence = compute_influence(stats, base, weighting=weighting)
        covariances = influence.aggregate(stats)
        del stats  # only the covariances are needed from here on
        scores = influence.score_of()
        needs_profiles = any(k.startswith("error") for k in plan_kinds)
        profiles = error_profiles(base, covariances, damping=damping) if needs_profiles else None
        t_stats = time.perf_counter() - t0
        print(f"statistics, influence and error profiles: {t_stats:.0f} s ({memory_note})", flush=True)
    else:
        method, covariances, profiles, scores, t_stats = "baseline", None, None, None, 0.0
        print(
            f"no statistics ({memory_note}): uniform plans only, compressed by the weight-only methods at the "
            f"plan's ranks (same shapes){'; skipped plans: ' + ', '.join(skipped) if skipped else ''}",
            flush=True,
        )

    base = base.to(device=device, dtype=dtype)
    x = x_cpu.to(device, dtype)
    probe = spec.inputs(base, 1, max(32, resolution // 4), 1).to(device, dtype)  # backend probe: small
    backends_before = sorted(
        {b for calls in sdpa_backends(base, *probe.args, **probe.kwargs).values() for b in calls}
    )

    rows = []
    compiled: dict = {}  # the compiled original, made once and timed against every compiled plan
    # on the CPU in float32 the compressed copy shares the original's tensors (one model resident)
    shared = device.type == "cpu" and dtype == torch.float32
    for kind in plan_kinds:
        costs = None
        if kind == "error-flops":  # FLOP costs at the timed shape (batch, latents, text tokens)
            costs = unit_flop_costs(base, serving_of(base, x_cpu, args.device))
        # the statistics-driven plans allocate the units the plan stage allocates (compression.qk_norm:
        # the default leaves QKs under q/k norms and RoPE whole); uniform cuts every unit
        planned = units if kind == "uniform" else planned_units(units, alloc.modules, qk_norm)
        plans = make_plans(kind, planned, args.fractions, profiles, scores, alloc, total_before, costs)
        for frac, plan in plans.items():
            slim = sharing_copy(base) if shared else copy.deepcopy(base).to("cpu", torch.float32)
            compress_(slim, plan, covariances, method=method, damping=damping, qk_norm=qk_norm)
            slim = slim.to(device=device, dtype=dtype)
            flops_after = forward_flops(
                slim, x_cpu.meta().args, x_cpu.meta().kwargs, batch=batch, device=args.device
            )
            backends = sorted(
                {b for calls in sdpa_backends(slim, *probe.args, **probe.kwargs).values() for b in calls}
            )
            timing = interleaved(
                {"original": base, "compressed": slim},
                x,
                device,
                args.reps,
                args.warmup,
                device.type == "cpu",
            )
            t_o, t_s = timing["original"]["seconds"], timing["compressed"]["seconds"]
            pair = [a / b for a, b in zip(t_o, t_s, strict=True)]
            bound = flops_before.total / flops_after.total
            measured = statistics.median(t_o) / statistics.median(t_s)
            row = {
                "plan": kind,
                "method": method,
                "fraction": frac,
                "removed": plan.removed_params,
                "params_after": count_parameters(slim),
                "gflops_after": flops_after.total / 1e9,
                "bound": bound,
                "orig_ms": 1e3 * statistics.median(t_o),
                "slim_ms": 1e3 * statistics.median(t_s),
                "measured": measured,
                "pair_min": min(pair),
                "pair_max": max(pair),
                "efficiency": measured / bound,
                "kept_ffn_qk_vo": kind_shares(plan),
                "untied_share": untied_share(slim),
                "backends": backends,
                "split_orig": median_split(timing["original"]["split"])
                if timing["original"]["split"]
                else None,
                "split_slim": median_split(timing["compressed"]["split"])
                if timing["compressed"]["split"]
                else None,
                "timings_orig": t_o,
                "timings_slim": t_s,
                "solver": plan.solver,
            }
            row["passes"] = row["efficiency"] >= TARGET_EFFICIENCY and measured >= 1.0
            rows.append(row)
            print(
                f"{kind:>10} {frac:.0%}: bound {bound:.3f}x, {row['orig_ms']:.0f} -> {row['slim_ms']:.0f} ms, "
                f"measured {measured:.3f}x [{row['pair_min']:.3f}, {row['pair_max']:.3f}], "
                f"{row['efficiency']:.0%} of bound, backends {backends}, untied {row['untied_share']:.0%}",
                flush=True,
            )
            if args.compile and kind == plan_kinds[0]:
                rows.append(compiled_row(row, base, slim, x, device, args, compiled))
            del slim
            gc.collect()

    report = render(
        args,
        spec,
        device,
        batch,
        resolution,
        total_before,
        compressible,
        flops_before,
        rows,
        backends_before,
        t_stats,
        time.perf_counter() - t_start,
        None if with_stats or grouped else (memory_note, skipped),
        (memory_note, skipped) if grouped else None,
    )
    print(report)
    if args.write:
        out = (
            ROOT
            / "benchmarks"
            / "results"
            / f"speed_{spec.name}{'_' + args.tag if args.tag else ''}_{device.type}.md"
        )
        out.write_text(report + "\n")
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
        print(f"wrote {out}")
    if skipped:
        why = (
            "the influence softmax needs every unit's score at once, which grouped statistics do not keep"
            if grouped
            else "they need statistics, which do not fit here"
        )
        print(f"skipped plans {skipped}: {why} ({memory_note})")
    return 0 if not skipped and all(r["passes"] for r in rows if r["plan"] == "error") else 1


def render(
    args,
    spec,
    device,
    batch,
    resolution,
    total_before,
    compressible,
    flops_before,
    rows,
    backends_before,
    t_stats,
    t_total,
    no_stats: tuple[str, list[str]] | None = None,
    grouped: tuple[str, list[str]] | None = None,
) -> str:
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    lines = [
        f"# Speed: {spec.description}",
        "",
        f"Written by `python benchmarks/bench_speed.py {' '.join(sys.argv[1:])}`.",
        "",
        f"batch {batch}, {resolution} px, {args.dtype} on {device.type} ({hw}, torch {torch.__version__}, "
        f"{args.threads} threads pinned); {args.warmup} warm-up forward(s) per model, then {args.reps} interleaved "
        "pairs (ABBA), wall clock. speedup = median original / median compressed, [range of the per-pair "
        "ratios]; bound = FLOPs before / after (slimdiff.planning.flops; attention matmuls at the widths that run); "
        f"target: measured >= {TARGET_EFFICIENCY:.0%} of the bound and >= 1.0x. Plans: `error` = the committed "
        "params.yaml allocation (parameter budget), `error-flops` = the same allocation with the budget in "
        "FLOPs of one forward at the timed shape (each fraction = that share of the compressible FLOPs "
        "removed); statistics "
        + (
            f"not collected ({no_stats[0]}): uniform plans only"
            + (f" (skipped: {', '.join(no_stats[1])})" if no_stats[1] else "")
            + ", compressed layers built by the weight-only methods (magnitude FFN selection, weight SVD for "
            "QK/VO) at the plan's ranks: the same shapes, hence the same speed, as the SlimDiff rewrite."
            if no_stats is not None
            else (
                f"collected grouped ({grouped[0]}), a few units' statistics per sampling pass on this "
                "random-weight model with random inputs at t = 999, 500, 100 (the same inputs every pass), "
                "each group's error profiles made before the next; the plans come from the same allocation "
                "code as with all statistics at once, and the compressed layers are built by the weight-only "
                "methods at the plan's ranks: the same shapes, hence the same speed, as the SlimDiff rewrite"
                + (f" (skipped: {', '.join(grouped[1])})" if grouped[1] else "")
                + "."
            )
            if grouped is not None
            else "from the toy pipeline's own sampler (as `slimdiff run`)."
            if spec.name == "toy"
            else "collected on this random-weight model with random inputs at t = 999, 500, 100 (no real weights "
            "here: representative plan shapes, not a real checkpoint's)."
        ),
        "",
        "| plan | removed (of compressible) | params | GFLOPs | bound | latency ms (orig -> slim) | speedup "
        "[pair range] | measured / bound | kept ffn / qk / vo | untied attn | SDPA backend | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
        f"| original | - | {total_before / 1e6:.1f} M | {flops_before.total / 1e9:.1f} | 1.000x | - | - | - | "
        f"1 / 1 / 1 | - | {', '.join(backends_before)} | - |",
    ]
    for r in rows:
        lines.append(
            f"| {r['plan']} | {r['fraction']:.0%} ({r['removed'] / 1e6:.2f} M) | {r['params_after'] / 1e6:.1f} M | "
            f"{r['gflops_after']:.1f} | {r['bound']:.3f}x | {r['orig_ms']:.0f} -> {r['slim_ms']:.0f} | "
            f"{r['measured']:.3f}x [{r['pair_min']:.3f}, {r['pair_max']:.3f}] | {r['efficiency']:.0%} | "
            f"{r['kept_ffn_qk_vo']} | {r['untied_share']:.0%} | {', '.join(r['backends'])} | "
            f"{'met' if r['passes'] else 'MISSED'} |"
        )
    if rows and rows[0]["split_orig"]:
        lines += [
            "",
            "## Where the time is (median seconds per forward, same timed runs, module hooks)",
            "",
            "| plan | removed | conv orig -> slim | attention orig -> slim | FFN orig -> slim | rest orig -> slim |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            if not r["split_orig"]:  # compiled rows: hooks would break the graph, so no split
                continue
            so, ss = r["split_orig"], r["split_slim"]
            rest_o = r["orig_ms"] / 1e3 - sum(so.values())
            rest_s = r["slim_ms"] / 1e3 - sum(ss.values())
            lines.append(
                f"| {r['plan']} | {r['fraction']:.0%} | {so['conv']:.2f} -> {ss['conv']:.2f} | "
                f"{so['attention']:.2f} -> {ss['attention']:.2f} | {so['ffn']:.2f} -> {ss['ffn']:.2f} | "
                f"{rest_o:.2f} -> {rest_s:.2f} |"
            )
    missed = [r for r in rows if not r["passes"]]
    lines += [
        "",
        f"Compressible set: {compressible / 1e6:.1f} M of {total_before / 1e6:.1f} M parameters. "
        f"Statistics + profiles took {t_stats:.0f} s; the whole benchmark {t_total / 60:.1f} min.",
        "Targets: "
        + (
            "all met."
            if not missed
            else "missed by "
            + ", ".join(
                f"{r['plan']} at {r['fraction']:.0%} ({r['measured']:.3f}x, {r['efficiency']:.0%} of bound)"
                for r in missed
            )
            + "."
        ),
        "",
        "## Where the FLOPs are (original)",
        "",
        format_breakdown(flops_before),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
