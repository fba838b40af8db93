"""Does slimming stack with quantization and step caching? One run, every combination.

The fastest tools users compare slimming against are not structural: weight quantization and step
caching. Slimming is worth more if its gain multiplies with theirs. For one model this benchmark
builds the original and the SlimDiff-compressed denoiser (the committed params.yaml plan at
``--fraction`` removed) and runs each alone and with:

* ``int8``: dynamic int8 quantization of every ``nn.Linear`` (int8 weights, activations quantized
  per call; ``torch.ao.quantization.quantize_dynamic``, fbgemm kernels). torchao's int8 paths were
  tried first on this CPU (see the README); the torch.ao kernels are the ones that run fast here.
  Compression must come first: ``compress_`` refuses a quantized denoiser (the rewrite needs the
  float weights), and the run records that refusal.
* ``cache``: step caching as a maintained package provides it for the family: DeepCache
  (``DeepCache.DeepCacheSDHelper``, feature reuse of the deep UNet branches, ``--cache-interval``
  steps per full step, branch 0) for UNets; diffusers' own First Block Cache
  (``diffusers.hooks.apply_first_block_cache``, ``--fbc-threshold``) for transformers, with the
  pipeline call wrapped in a diffusers cache context (the SD3 and PixArt pipelines do not set one);
  for SD3-class MMDiTs, whose ``context_pre_only`` last block First Block Cache cannot take in
  diffusers 0.42, diffusers' Pyramid Attention Broadcast (``--pab-skip``).

Quality (toy models only, where the judges exist): held-out captions, one image each, same seeds
for every combination; exact-match attribute accuracy (toy classifier), PSNR to the original's
images, feature FD (toy CLIP features) and classifier-feature FD (the toy attribute classifier's
penultimate features, with its real-vs-real noise floor) against toy renders. Speed: wall clock of the whole
pipeline call (toy models: ``--speed-prompts`` captions, 20 steps) or of a ``--steps``-step
denoising trajectory with classifier-free guidance (random-weight models at real shapes, where no
text encoder / VAE exists here), after one warm-up per combination, ``--reps`` rounds in
alternating order (ABBA...); median, and the range of the per-round ratios to the original.

    python benchmarks/bench_stack.py --model toy --write
    python benchmarks/bench_stack.py --model toy-mmdit --write
    python benchmarks/bench_stack.py --model sd15 --steps 6 --reps 2 --write   # speed only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from bench_speed import (  # benchmarks/ is on sys.path when run as a script
    make_plans,
    serving_of,
    sharing_copy,
)
from denoisers import SPECS, toy_pipe

from slimdiff.config import load_params
from slimdiff.families.units import compression_units, count_parameters, planned_units
from slimdiff.planning.flops import unit_flop_costs
from slimdiff.planning.influence import compute_influence
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import CompressionError, compress_

ROOT = Path(__file__).resolve().parent.parent
COMBOS = (
    ("original", False, False),
    ("original", True, False),
    ("original", False, True),
    ("original", True, True),
    ("slimdiff", False, False),
    ("slimdiff", True, False),
    ("slimdiff", False, True),
    ("slimdiff", True, True),
)


def combo_name(base: str, int8: bool, cache: bool) -> str:
    return " + ".join([base] + (["int8"] if int8 else []) + (["cache"] if cache else []))


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 of every nn.Linear, on a copy (the float model stays usable)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices (the kernels still ship)
        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


# -- step caching, per family -------------------------------------------------------------------------
class DeepCacheUNet:
    """DeepCache on a UNet pipeline (or anything with ``unet`` and ``scheduler``)."""

    name = "DeepCache"

    def __init__(self, interval: int):
        self.interval = interval

    def describe(self) -> str:
        return f"DeepCache 0.1 (DeepCacheSDHelper), cache_interval {self.interval}, cache_branch_id 0"

    def enable(self, pipe) -> None:
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=self.interval, cache_branch_id=0)
        helper.enable()
        pipe._slimdiff_cache = helper

    @contextlib.contextmanager
    def around_call(self, pipe):
        # a new trajectory: forget the previous call's features (reset_states() would also drop the
        # wrapped forwards the helper calls through)
        helper = pipe._slimdiff_cache
        helper.cached_output, helper.start_timestep, helper.cur_timestep = {}, None, 0
        yield


class FirstBlockCache:
    """diffusers' First Block Cache on a transformer's blocks, one cache context per pipeline call."""

    name = "First Block Cache"

    def __init__(self, threshold: float, attr: str):
        self.threshold, self.attr = threshold, attr

    def describe(self) -> str:
        return f"diffusers First Block Cache (apply_first_block_cache), threshold {self.threshold:g}"

    def enable(self, pipe) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        model = getattr(pipe, self.attr)
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=self.threshold))
        forget_child_registries(model)

    @contextlib.contextmanager
    def around_call(self, pipe):
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        model = getattr(pipe, self.attr)
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
        _set_cache_context(model, CacheContext("cond_uncond"))  # one batched CFG call per step
        try:
            yield
        finally:
            _set_cache_context(model, None)


def forget_child_registries(model) -> None:
    """diffusers 0.42 caches a model's list of hooked submodules the first time a cache context is set
    (``HookRegistry._get_child_registries``) and never refreshes it: a pipeline call made before the
    cache was applied (FluxPipeline sets ``cache_context("cond")`` on every call) leaves the blocks'
    new hooks without a context ("No cache context is set"). Drop the stale list."""
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(model)._child_registries_cache = None


class PyramidAttentionBroadcast:
    """diffusers' Pyramid Attention Broadcast: every attention of the transformer blocks reuses its
    output of the previous step for ``skip - 1`` of every ``skip`` steps inside a timestep range. For
    SD3-class MMDiTs, where First Block Cache fails (diffusers 0.42: the last block is
    ``context_pre_only`` and returns no text states, so the cache's tail residual is None - text)."""

    name = "Pyramid Attention Broadcast"

    def __init__(self, skip: int, attr: str, timesteps: tuple[int, int] = (100, 800)):
        self.skip, self.attr, self.timesteps = skip, attr, timesteps
        self._t = [1000]

    def describe(self) -> str:
        return (
            f"diffusers Pyramid Attention Broadcast (apply_pyramid_attention_broadcast), attention reused "
            f"{self.skip - 1} of every {self.skip} steps for timesteps in {self.timesteps}"
        )

    def enable(self, pipe) -> None:
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        model = getattr(pipe, self.attr)

        def remember(module, args, kwargs):  # the step's timestep, for the broadcast's range check
            t = kwargs.get("timestep")
            self._t[0] = int(t.flatten()[0]) if t is not None else self._t[0]

        model.register_forward_pre_hook(remember, with_kwargs=True)
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.skip,
            spatial_attention_timestep_skip_range=self.timesteps,
            current_timestep_callback=lambda: self._t[0],
        )
        apply_pyramid_attention_broadcast(model, config)
        forget_child_registries(model)

    @contextlib.contextmanager
    def around_call(self, pipe):
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(getattr(pipe, self.attr)).reset_stateful_hooks()
        yield


def _last_block_drops_text(denoiser) -> bool:
    blocks = getattr(denoiser, "transformer_blocks", None)
    return bool(blocks) and bool(getattr(blocks[-1], "context_pre_only", False))


def cache_method(denoiser, args):
    from diffusers import UNet2DConditionModel

    if isinstance(denoiser, UNet2DConditionModel):
        return DeepCacheUNet(args.cache_interval)
    if _last_block_drops_text(denoiser):
        return PyramidAttentionBroadcast(args.pab_skip, "transformer")
    return FirstBlockCache(args.fbc_threshold, "transformer")


# -- runners --------------------------------------------------------------------------------------------
class PipelineRunner:
    """Toy models: the stock pipeline with the combination's denoiser (quality and speed)."""

    def __init__(self, source: str, denoiser, cache, args):
        from slimdiff.formats.models import with_unet

        self.pipe = with_unet(toy_pipe(source), denoiser)
        self.cache = cache
        if cache is not None:
            cache.enable(self.pipe)
        self.args = args

    def sample(self, prompts, seeds) -> np.ndarray:
        from slimdiff.evaluation.sampling import pipeline_resolution, sample_pipeline

        h, w = pipeline_resolution(self.pipe)
        out = []
        for i in range(0, len(prompts), self.args.batch_size):  # one cache context per pipeline call
            ctx = self.cache.around_call(self.pipe) if self.cache else contextlib.nullcontext()
            with ctx:
                out.append(
                    sample_pipeline(
                        self.pipe,
                        prompts[i : i + self.args.batch_size],
                        seeds[i : i + self.args.batch_size],
                        num_inference_steps=self.args.num_inference_steps,
                        guidance_scale=self.args.guidance_scale,
                        batch_size=self.args.batch_size,
                        height=h,
                        width=w,
                    )
                )
        return np.concatenate(out)

    def timed(self, prompts) -> float:
        seeds = list(range(len(prompts)))
        t0 = time.perf_counter()
        self.sample(prompts, seeds)
        return time.perf_counter() - t0


class TrajectoryRunner:
    """Random-weight models at real shapes: ``steps`` DDIM steps of the denoiser with CFG (batch 2)."""

    def __init__(self, denoiser, cache, inputs, steps: int):
        from diffusers import DDIMScheduler, UNet2DConditionModel

        if not isinstance(denoiser, UNet2DConditionModel):
            raise NotImplementedError("the trajectory runner drives UNets (timestep as the second argument)")

        self.model, self.inputs = denoiser, inputs
        self.scheduler = DDIMScheduler(num_train_timesteps=1000)
        self.scheduler.set_timesteps(steps)
        self.pipe = types.SimpleNamespace(unet=denoiser, transformer=denoiser, scheduler=self.scheduler)
        self.cache = cache
        if cache is not None:
            cache.enable(self.pipe)

    @torch.inference_mode()
    def timed(self, _prompts=None) -> float:
        x = self.inputs
        sample = x.args[0].clone()
        t0 = time.perf_counter()
        ctx = self.cache.around_call(self.pipe) if self.cache else contextlib.nullcontext()
        with ctx:
            for t in self.scheduler.timesteps:
                args = (sample, t, *x.args[2:])  # the timestep as the pipelines pass it: a 0-d tensor
                out = self.pipe.unet(*args, **x.kwargs)
                eps = out[0] if isinstance(out, tuple) else out.sample
                sample = self.scheduler.step(eps[:, : sample.shape[1]], t, sample).prev_sample
        return time.perf_counter() - t0


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy", choices=sorted(SPECS))
    ap.add_argument(
        "--fraction", type=float, default=None, help="removed share (default: params.yaml budget)"
    )
    ap.add_argument(
        "--plan",
        default="error",
        choices=["error", "uniform"],
        help="error: the committed allocation (statistics needed); uniform: no statistics, weight-only rewrite",
    )
    ap.add_argument("--prompts", type=int, default=88, help="held-out captions for quality (toy models)")
    ap.add_argument("--speed-prompts", type=int, default=8, help="captions per timed pipeline call (toy)")
    ap.add_argument(
        "--steps", type=int, default=20, help="denoising steps of the timed trajectory (real shapes)"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-interval", type=int, default=3, help="DeepCache: one full step every N")
    ap.add_argument("--fbc-threshold", type=float, default=0.1, help="First Block Cache threshold")
    ap.add_argument(
        "--pab-skip", type=int, default=2, help="Pyramid Attention Broadcast: attention computed 1 of N steps"
    )
    ap.add_argument(
        "--write", action="store_true", help="write benchmarks/results/stack_<model>_cpu.md/.json"
    )
    args = ap.parse_args(argv)
    args.threads = args.threads or os.cpu_count()
    return args


def build_slim(spec, base, fraction: float | None, plan_kind: str = "error"):
    """The compressed denoiser: the committed params.yaml plan (``error``: statistics, error
    profiles, SlimDiff rewrite), or ``uniform`` without statistics (one keep ratio everywhere, the
    weight-only rewrite at those ranks: the same layer shapes, hence the same speed, as SlimDiff's
    rewrite of a uniform plan; for real shapes where the statistics would take longer than the
    timing)."""
    params = load_params(ROOT / "params.yaml")
    alloc, damping = params.allocation, params.compression.damping
    fraction = params.allocation.budget.value if fraction is None else fraction
    qk_norm = params.compression.qk_norm
    units = planned_units(compression_units(base), alloc.modules, qk_norm)  # as the plan stage does
    if plan_kind == "uniform":
        plan = make_plans("uniform", units, [fraction], None, None, alloc, count_parameters(base))[fraction]
        slim = sharing_copy(base)
        report = compress_(slim, plan, None, method="baseline", qk_norm=qk_norm)
        return slim.eval(), plan, None, report, fraction
    stats = spec.calibrate(base, spec.default_resolution)
    influence = compute_influence(stats, base, weighting="spectral" if stats.n_buckets > 1 else "uniform")
    covariances = influence.aggregate(stats)
    profiles = error_profiles(base, covariances, damping=damping)
    # the committed budget's own currency: a FLOP budget is spent at allocation.serving's batch, the
    # model's resolution and the inputs' text length (as the plan stage does)
    kind, costs = "error", None
    if alloc.budget.kind == "removed_flops_fraction":
        x = spec.inputs(base, alloc.serving.batch, spec.default_resolution)
        kind, costs = (
            "error-flops",
            unit_flop_costs(base, serving_of(base, x, "cpu"), qk_norm, units),
        )
    plan = make_plans(
        kind, units, [fraction], profiles, influence.score_of(), alloc, count_parameters(base), costs
    )[fraction]
    slim = sharing_copy(base)
    report = compress_(slim, plan, covariances, damping=damping, qk_norm=qk_norm)
    return slim.eval(), plan, covariances, report, fraction


def refused_quantize_first(base, plan, covariances) -> str:
    """Quantize, then compress: must be refused with a clear message; returns it."""
    try:
        compress_(quantize_int8(base), plan, covariances)
    except CompressionError as err:
        return str(err)
    raise AssertionError("compress_ accepted a quantized denoiser")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    spec = SPECS[args.model]
    toy = args.model.startswith("toy")
    t_start = time.perf_counter()
    base = spec.build()
    slim, plan, covariances, report, fraction = build_slim(spec, base, args.fraction, args.plan)
    refusal = refused_quantize_first(base, plan, covariances)
    print(f"quantize-then-compress refused: {refusal}", flush=True)
    cache = cache_method(base, args)
    params = load_params(ROOT / "params.yaml")
    ev = params.evaluation
    args.num_inference_steps, args.guidance_scale, args.batch_size = (
        ev.num_inference_steps,
        ev.guidance_scale,
        32,
    )

    denoisers = {}
    for b, q, _ in COMBOS:
        key = (b, q)
        if key not in denoisers:
            model = base if b == "original" else slim
            denoisers[key] = quantize_int8(model) if q else model
    runners = {}
    for b, q, c in COMBOS:
        # each cached combination gets its own copy of the module tree: cache hooks wrap forwards
        d = denoisers[(b, q)]
        if c:
            d = copy.deepcopy(d) if q else sharing_copy(d)
        method = copy.copy(cache) if c else None
        if toy:
            runners[combo_name(b, q, c)] = PipelineRunner(args.model, d, method, args)
        else:
            x = spec.inputs(base, spec.default_batch, spec.default_resolution, 0)
            runners[combo_name(b, q, c)] = TrajectoryRunner(d, method, x, args.steps)

    quality = {}
    if toy:
        from slimdiff.evaluation import metrics as M
        from slimdiff.evaluation.evaluate import PairEvaluator
        from slimdiff.toy.data import heldout_captions

        prompts = heldout_captions()[: args.prompts]
        evaluator = PairEvaluator(
            list(prompts), ev.model_copy(update={"max_prompts": None, "images_per_prompt": 1})
        )
        reference = None
        for name, runner in runners.items():
            t0 = time.perf_counter()
            images = runner.sample(evaluator.image_prompts, evaluator.seeds)
            q = evaluator.score(images)
            q.pop("_fid_features")
            q.pop("_cls_features")
            if reference is None:
                reference = images
                psnr = None
            else:
                values = M.psnr(M.uint8_to_float(images), M.uint8_to_float(reference))
                psnr = M.capped_mean_psnr(values, 100.0)
            quality[name] = {
                "exact": q["accuracy"]["all"]["exact"],
                "fd": q["fid"],
                "fd_cls": q["fd_cls"],
                "psnr_db": psnr,
                "sample_s": time.perf_counter() - t0,
            }
            print(f"{name}: {quality[name]}", flush=True)
        speed_prompts = list(prompts[: args.speed_prompts])
        args.fd_cls_floor = evaluator.fd_cls_real_vs_real  # recorded with the args in the JSON
    else:
        speed_prompts = None
        args.fd_cls_floor = None

    # speed: warm-up, then alternating rounds
    names = list(runners)
    for name in names:
        runners[name].timed(speed_prompts)
    seconds = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else reversed(names):
            seconds[name].append(runners[name].timed(speed_prompts))
        print(
            f"round {rep + 1}/{args.reps}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names),
            flush=True,
        )
    base_name = names[0]
    rows = []
    for name in names:
        ratios = [o / s for o, s in zip(seconds[base_name], seconds[name], strict=True)]
        rows.append(
            {
                "combination": name,
                "median_s": statistics.median(seconds[name]),
                "speedup": statistics.median(seconds[base_name]) / statistics.median(seconds[name]),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                **quality.get(name, {}),
            }
        )
    text = render(
        args, spec, plan, fraction, cache, rows, refusal, toy, time.perf_counter() - t_start, report
    )
    print(text)
    if args.write:
        out = ROOT / "benchmarks" / "results" / f"stack_{args.model}_cpu.md"
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(
            json.dumps({"args": vars(args), "rows": rows, "refusal": refusal}, indent=1, default=str) + "\n"
        )
        print(f"wrote {out}")
    return 0


def render(args, spec, plan, fraction, cache, rows, refusal, toy, total_s, report) -> str:
    by = {r["combination"]: r for r in rows}

    def ratio(a: str, b: str) -> float:
        return by[b]["median_s"] and by[a]["median_s"] / by[b]["median_s"]

    lines = [
        f"# Slimming stacked with int8 and step caching: {spec.description}",
        "",
        f"`python benchmarks/bench_stack.py --model {args.model}{' --write' if args.write else ''}` "
        f"(torch {torch.__version__}, {platform.processor() or 'cpu'}, {args.threads} threads, float32 + int8 "
        f"dynamic; {total_s / 60:.1f} min).",
        "",
        (
            "Compressed: the committed params.yaml plan"
            if args.plan == "error"
            else "Compressed: a uniform plan (one keep ratio; no statistics here: the weight-only rewrite at its "
            "ranks, the same layer shapes as SlimDiff's)"
        )
        + f" at {fraction:.0%} of the compressible "
        + ("FLOPs" if plan.budget.get("removed_flops_fraction") is not None else "parameters")
        + " removed "
        f"({plan.params_before:,} -> {plan.params_after:,} compressible parameters). int8: dynamic int8 of every "
        f"nn.Linear (torch.ao.quantization.quantize_dynamic). cache: {cache.describe()}.",
        "",
        (
            f"Speed: one pipeline call of {args.speed_prompts} held-out captions x {args.num_inference_steps} steps "
            f"(text encoders, denoiser, VAE), "
            if toy
            else f"Speed: a {args.steps}-step DDIM trajectory of the denoiser at batch {spec.default_batch} "
            f"({spec.default_resolution} px), "
        )
        + f"median of {args.reps} alternating rounds after one warm-up each; the range is that of the per-round "
        "ratios to the original.",
        "",
    ]
    head = "| combination | median s | speedup vs original | range |"
    sep = "|---|---:|---:|---|"
    if toy:
        head += " exact match | PSNR to original (dB) | feature FD | classifier FD |"
        sep += "---:|---:|---:|---:|"
    lines += [head, sep]
    for r in rows:
        line = (
            f"| {r['combination']} | {r['median_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} |"
        )
        if toy:
            psnr = "-" if r.get("psnr_db") is None else f"{r['psnr_db']:.1f}"
            fd_cls = "-" if r.get("fd_cls") is None else f"{r['fd_cls']:.1f}"
            line += f" {100 * r['exact']:.1f}% | {psnr} | {r['fd']:.4f} | {fd_cls} |"
        lines.append(line)
    floor = getattr(args, "fd_cls_floor", None)
    if toy and floor is not None:
        lines += [
            "",
            "feature FD: toy-CLIP features; classifier FD: the toy attribute classifier's penultimate features "
            f"(both vs toy renders of the same captions). Classifier FD noise floor (two independent render sets, "
            f"as many images): {floor:.1f}; differences below it are not findings.",
        ]
    lines += ["", "## Does it multiply?", ""]
    for extra in ("int8", "cache", "int8 + cache"):
        alone = by[f"original + {extra}"]["speedup"]
        slim = by["slimdiff"]["speedup"]
        both = by[f"slimdiff + {extra}"]["speedup"]
        lines.append(
            f"- slimdiff x {extra}: {slim:.2f}x alone, {alone:.2f}x {extra} alone, {both:.2f}x together "
            f"(product of the two alone {slim * alone:.2f}x: {both / (slim * alone):.0%} of it)."
        )
    lines += [
        "",
        f"Quantize first, then compress: refused (`{refusal}`).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
