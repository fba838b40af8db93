"""The ablation runner behind `benchmarks/ablation.py`: baselines and ablations at equal budget, on one
model, with one evaluation protocol (an experiment, so it lives with the benchmarks, not in the library).

Every variant changes one thing against the SlimDiff default (error-driven allocation, spectral
timestep weighting, whitened QK/VO SVD, Nystrom-CPQR FFN, FPS SlimSet) and is compressed to the same
number of removed parameters -- a share of the *whole* compressible set, also when only one module
type is compressed (``Budget(removed_params=...)``), so rows of one budget are directly comparable.

Work is shared where the math allows it: calibration runs once per SlimSet variant (its statistics
are per timestep bucket, so every weighting is a pure re-aggregation, ``ActivationStats.aggregate``);
influence once per (SlimSet, weighting); the original pipeline is sampled and featurised once
(``slimdiff.evaluation.evaluate.PairEvaluator``) and every compressed variant is compared against it on the
same prompts and seeds. A budget a variant cannot reach (e.g. 40% of all compressible parameters
from the QK units alone) is reported as infeasible, not silently changed.

``run_ablation`` returns an :class:`AblationResult`; ``ablation_table``, ``plot_curves`` and
``readme_summary`` render it. ``benchmarks/ablation.py`` is the command around it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slimdiff.formats.models import with_unet

logger = logging.getLogger(__name__)

DEFAULT_METHODS: dict[str, str] = {"ffn": "slimdiff", "qk": "slimdiff", "vo": "slimdiff"}


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration prompt set: FPS SlimSet (the method) or a seeded random subset of the same
    candidate pool (same size, same exclusions)."""

    name: str
    selection: Literal["fps", "random"]
    n: int

    def __post_init__(self) -> None:
        if self.selection not in ("fps", "random"):
            raise ValueError(
                f"CalibrationSet {self.name}: selection must be 'fps' or 'random', got {self.selection!r}"
            )
        if self.n < 1:
            raise ValueError(f"CalibrationSet {self.name}: n must be >= 1, got {self.n}")


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: what differs from the SlimDiff default."""

    name: str
    group: Literal["method", "module", "slimset"]
    description: str
    calibration: str = "fps-64"  # CalibrationSet.name
    weighting: str = "spectral"  # timestep weighting (slimdiff.planning.influence)
    mode: Literal["error", "influence", "uniform"] | None = None  # rank allocation; None: the config's
    tau: float | None = None  # allocation temperature; None: the config's
    methods: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_METHODS))
    modules: tuple[str, ...] = ("ffn", "qk", "vo")
    budgets: tuple[float, ...] | None = None  # None: every budget of the config
    # QK under per-head RMSNorms (MMDiT, FLUX): "auto" (the default: "keep" under RoPE, "select"
    # elsewhere), "select" (RMSNorm-aware coordinate / rotary-pair selection), "project" (a
    # projection after the norms at the VO rank) or "keep" (left whole); see compress_
    qk_norm: Literal["auto", "select", "project", "keep"] = "auto"
    # "joint": one allocation over all units; "per-stream": image, text and joint units each remove
    # the budget's fraction of their own parameters (slimdiff.planning.streams.plan_per_group)
    split: Literal["joint", "per-stream"] = "joint"
    # what the allocation spends when the config's budgets count FLOPs (``AblationConfig.budget_kind``):
    # "budget": FLOPs directly (mode error only: the exact solver costs each option in FLOPs);
    # "params": a parameter budget, set to remove the same FLOPs (the smallest such parameter budget)
    spend: Literal["budget", "params"] = "budget"

    def __post_init__(self) -> None:
        if self.split not in ("joint", "per-stream"):
            raise ValueError(
                f"Variant {self.name}: split must be 'joint' or 'per-stream', got {self.split!r}"
            )
        if self.spend not in ("budget", "params"):
            raise ValueError(f"Variant {self.name}: spend must be 'budget' or 'params', got {self.spend!r}")
        if self.mode not in (None, "error", "influence", "uniform"):
            raise ValueError(
                f"Variant {self.name}: mode must be 'error', 'influence' or 'uniform', got {self.mode!r}"
            )
        bad = set(self.modules) - {"ffn", "qk", "vo"}
        if not self.modules or bad:
            raise ValueError(
                f"Variant {self.name}: modules must be a non-empty subset of ffn, qk, vo (got {self.modules})"
            )


def default_calibration_sets(base_n: int = 64) -> tuple[CalibrationSet, ...]:
    return (
        CalibrationSet(f"fps-{base_n}", "fps", base_n),
        CalibrationSet(f"random-{base_n}", "random", base_n),
        CalibrationSet("fps-16", "fps", 16),
        CalibrationSet("fps-256", "fps", 256),
    )


def default_variants(
    budgets: Sequence[float], slimset_budget: float, module_budget: float, base_n: int = 64
) -> tuple[Variant, ...]:
    """The issue's list: SlimDiff default; uniform rank allocation; weight-only SVD for QK/VO;
    magnitude FFN pruning; uniform timestep weighting; each module type alone; SlimSet FPS vs random
    and size 16/64/256. Module-alone rows also run at ``module_budget`` (small enough for QK or VO
    alone), SlimSet rows at ``slimset_budget``."""
    base = f"fps-{base_n}"
    every = (*budgets, module_budget) if module_budget not in budgets else tuple(budgets)
    return (
        Variant(
            "slimdiff",
            "method",
            "SlimDiff default: error-driven allocation, spectral weights, whitened SVD / Nystrom-CPQR",
            base,
            budgets=every,
        ),
        Variant(
            "influence-allocation",
            "method",
            "METHOD.md softmax of the spectral influence scores (tau 1)",
            base,
            mode="influence",
            tau=1.0,
        ),
        Variant(
            "uniform-allocation",
            "method",
            "same keep ratio for every unit (tau -> inf)",
            base,
            mode="uniform",
        ),
        Variant(
            "weight-svd-qk-vo",
            "method",
            "QK and VO by plain SVD of the weights (no activations)",
            base,
            methods={**DEFAULT_METHODS, "qk": "weight_svd", "vo": "weight_svd"},
        ),
        Variant(
            "magnitude-ffn",
            "method",
            "FFN neurons kept by weight magnitude (no activations)",
            base,
            methods={**DEFAULT_METHODS, "ffn": "magnitude"},
        ),
        Variant(
            "uniform-timesteps",
            "method",
            "uniform timestep weights for influence and covariances",
            base,
            weighting="uniform",
        ),
        Variant("ffn-only", "module", "only FFN units compressed", base, modules=("ffn",), budgets=every),
        Variant("qk-only", "module", "only QK units compressed", base, modules=("qk",), budgets=every),
        Variant("vo-only", "module", "only VO units compressed", base, modules=("vo",), budgets=every),
        Variant(
            f"random-{base_n}",
            "slimset",
            f"calibration on {base_n} random prompts instead of the FPS SlimSet",
            f"random-{base_n}",
            budgets=(slimset_budget,),
        ),
        Variant("slimset-16", "slimset", "FPS SlimSet of 16 prompts", "fps-16", budgets=(slimset_budget,)),
        Variant("slimset-256", "slimset", "FPS SlimSet of 256 prompts", "fps-256", budgets=(slimset_budget,)),
    )


def flux_variants(budgets: Sequence[float], base_n: int = 64) -> tuple[Variant, ...]:
    """The FLUX rows (issue 24): the default (``qk_norm: auto``, which leaves every QK under q/k
    norms and RoPE whole on FLUX), the RoPE-aware whole-pair QK selection, uniform allocation and the
    weight-only baseline (VO by weight SVD, QK whole as in the default). No ``qk-project`` row: a
    projection after the norms mixes rotary pairs, so it is refused under RoPE (METHOD.md, "FLUX
    and RoPE")."""
    base = f"fps-{base_n}"
    return (
        Variant(
            "slimdiff", "method", "SlimDiff default: error-driven, QK under norms and RoPE left whole", base
        ),
        Variant(
            "qk-select",
            "method",
            "QK by RoPE-aware whole-pair selection, planned with VO and FFN",
            base,
            qk_norm="select",
        ),  # fmt: skip
        Variant("uniform-allocation", "method", "same keep ratio for every unit", base, mode="uniform"),
        Variant(
            "weight-only-vo",
            "method",
            "no activations for attention: VO by SVD of the weights (QK whole, as the default)",
            base,
            methods={**DEFAULT_METHODS, "qk": "weight_svd", "vo": "weight_svd"},
        ),
    )


def cost_variants(base_n: int = 64, qk_select: bool = False) -> tuple[Variant, ...]:
    """Rows at equal FLOPs (issue 25, ``AblationConfig(budget_kind="flops")``): the error-driven
    allocation spending FLOPs at the serving shape, the same allocation under the parameter budget
    that removes as many FLOPs (the committed default's currency), and uniform ranks removing as
    many FLOPs, all with the default QK option (``qk_norm: auto``). ``qk_select``: also the FLOP
    allocation with the QKs under q/k norms planned by selection (``qk_norm: select``; on FLUX the
    default leaves them whole), removing as many FLOPs: the QK option's comparison at the committed
    default's currency."""
    base = f"fps-{base_n}"
    select = (
        Variant(
            "error-flops-qk-select",
            "method",
            "error-driven, FLOPs as the budget, QK under norms (and RoPE) planned by selection",
            base,
            qk_norm="select",
        ),
    )
    return (
        Variant("error-flops", "method", "error-driven, FLOPs at the serving shape as the budget", base),
        *(select if qk_select else ()),
        Variant(
            "error-params",
            "method",
            "error-driven under a parameter budget, sized to remove the same FLOPs",
            base,
            spend="params",
        ),
        Variant(
            "uniform-allocation", "method", "same keep ratio for every unit, same FLOPs", base, mode="uniform"
        ),
    )


def mmdit_variants(budgets: Sequence[float], base_n: int = 64) -> tuple[Variant, ...]:
    """The MMDiT rows (issue 15): the default (RMSNorm-aware QK selection, one joint allocation),
    the two other QK options (projection after the norms; QK left whole), uniform allocation, a
    fixed per-stream budget split, and the weight-only baseline (VO by weight SVD; QK by the
    weight-Gram coordinate selection, since an SVD basis does not commute with the q/k norms)."""
    base = f"fps-{base_n}"
    return (
        Variant("slimdiff", "method", "SlimDiff default: error-driven, QK by RMSNorm-aware selection", base),
        Variant(
            "qk-project", "method", "QK projected after the norms at the VO rank", base, qk_norm="project"
        ),
        Variant("qk-keep", "method", "QK under norms left whole (only VO and FFN)", base, qk_norm="keep"),
        Variant("uniform-allocation", "method", "same keep ratio for every unit", base, mode="uniform"),
        Variant(
            "per-stream-split",
            "method",
            "fixed split: image, text and joint units each remove the budget's share of their own parameters",
            base,
            split="per-stream",
        ),
        Variant(
            "weight-only-qk-vo",
            "method",
            "no activations for attention: VO by SVD of the weights, QK by coordinate selection on the weight Grams",
            base,
            methods={**DEFAULT_METHODS, "qk": "weight_svd", "vo": "weight_svd"},
        ),
    )


@dataclass(frozen=True)
class AblationConfig:
    """Budgets, variants and the fixed settings every variant shares (recorded with the results)."""

    budgets: tuple[float, ...] = (0.2, 0.4, 0.6)  # share of the compressible parameters removed
    slimset_budget: float = 0.4
    module_budget: float = 0.1
    calibration_sets: tuple[CalibrationSet, ...] = field(default_factory=default_calibration_sets)
    variants: tuple[Variant, ...] | None = None  # None: default_variants(...)
    # calibration (as params.yaml calibration)
    calibration_steps: int = 20
    calibration_guidance: float = 4.0
    n_buckets: int = 5
    calibration_batch_size: int = 16
    calibration_seed: int = 0
    slimset_seed: int = 0
    slimset_canonical_share: float = 0.0
    slimset_near_dup_threshold: float = 0.98
    # allocation / compression (as params.yaml allocation / compression)
    mode: str = "error"
    tau: float = 0.0
    r_min: int = 8
    multiple: int = 8
    damping: float = 1e-2
    ffn_selection: str = "shared"
    # what a budget is a share of: the compressible parameters ("params") or the compressible FLOPs
    # of one denoiser forward at the serving shape ("flops": every row of a budget removes the same
    # FLOPs, see Variant.spend); serving: allocation.serving (height, width, batch, text_len)
    budget_kind: Literal["params", "flops"] = "params"
    serving: tuple[int | None, int | None, int, int | None] = (None, None, 2, None)

    def __post_init__(self) -> None:
        if self.budget_kind not in ("params", "flops"):
            raise ValueError(f"budget_kind must be 'params' or 'flops', got {self.budget_kind!r}")
        what = "parameters" if self.budget_kind == "params" else "FLOPs"
        for b in (*self.budgets, self.slimset_budget, self.module_budget):
            if not 0.0 < b < 1.0:
                raise ValueError(f"budgets are shares of the compressible {what} removed, in (0, 1); got {b}")
        names = [c.name for c in self.calibration_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"calibration_sets names must be unique, got {names}")

    def resolved_variants(self) -> tuple[Variant, ...]:
        if self.variants is not None:
            variants = self.variants
        else:
            base = self.calibration_sets[0]
            variants = default_variants(self.budgets, self.slimset_budget, self.module_budget, base.n)
        known = {c.name for c in self.calibration_sets}
        for v in variants:
            if v.calibration not in known:
                raise ValueError(
                    f"variant {v.name}: calibration set {v.calibration!r} is not among {sorted(known)}"
                )
        return tuple(variants)


@dataclass
class AblationResult:
    rows: list[dict]  # one per (variant, budget); status "ok" or "infeasible"
    original: dict  # the original's metrics (evaluate_pair "original" block)
    calibration: dict[str, dict]  # per calibration set: n, seconds, prompts digest, first prompts
    protocol: dict  # the evaluation protocol (evaluate_pair "protocol")
    config: dict
    seconds: dict[str, float]
    # uint8 (N, H, W, 3) samples kept for grids: "original" and "{variant}@{budget}" (not serialised)
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("images")
        return d


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------
def calibration_prompts(
    spec: CalibrationSet,
    pool: Sequence[str],
    exclude: Sequence[str],
    embedder: Any,
    seed: int,
    *,
    n: int | None = None,
    canonical_share: float = 0.0,
    near_dup_threshold: float = 0.98,
) -> list[str]:
    """The prompts of one calibration set: FPS SlimSet, or a seeded random subset of the same
    deduplicated candidates (evaluation prompts excluded in both). ``n`` overrides ``spec.n`` (a
    random set matches the size its FPS counterpart really reached)."""
    from slimdiff.calibration.slimset import build_slimset, prepare_pool

    n = spec.n if n is None else n
    if spec.selection == "fps":
        return build_slimset(
            pool,
            embedder,
            n=n,
            exclude=exclude,
            seed=seed,
            canonical_share=canonical_share,
            near_dup_threshold=near_dup_threshold,
        ).prompts
    candidates = prepare_pool(pool, exclude).candidates
    if n > len(candidates):
        raise ValueError(f"{spec.name}: n={n} exceeds the {len(candidates)} candidate prompts")
    idx = np.random.default_rng(seed).choice(len(candidates), size=n, replace=False)
    return [candidates[i] for i in sorted(idx.tolist())]


def removed_flops_share(plan, units: Mapping, costs) -> float:
    """Share of the compressible FLOPs of ``units`` (at ``costs``' serving shape) that ``plan`` removes."""
    zero = costs.plan_flops({n: 0 for n in units})
    after = costs.plan_flops({n: u.rank for n, u in plan.units.items() if n in units})
    return (costs.total - after) / (costs.total - zero)


def plan_matching_flops(by_params: Callable[[int], Any], units: Mapping, costs, share: float):
    """The plan of the smallest parameter removal (``by_params(removed_params)``) that removes at
    least ``share`` of the compressible FLOPs (``slimdiff.planning.allocation.smallest_params_plan``: a
    bisection whose result is checked to reach the share). InfeasibleBudgetError when even the
    largest removal does not."""
    from slimdiff.planning.allocation import smallest_params_plan

    return smallest_params_plan(
        by_params, units, lambda plan: removed_flops_share(plan, units, costs) >= share - 1e-12
    )


def _row_metrics(result: dict) -> dict:
    """The flat numbers of one compared variant that the table and curves use."""
    c, s = result["compressed"], result["summary"]
    acc = c.get("accuracy") or {}
    row = {
        "unet_params": c["unet_params"],
        "compressible_params": c["compressible_params"],
        "removed_fraction": s["compressible_removed_fraction"],
        "unet_params_ratio": s["unet_params_ratio"],
        "flops_ratio": s.get("flops_ratio"),
        "latency_ratio": s.get("latency_ratio"),
        "fid": c.get("fid"),
        "fd_cls": c.get("fd_cls"),
        "clip_score": c.get("clip_score"),
        "psnr_db": s["fidelity"]["psnr_db_mean"],
        "ssim": s["fidelity"]["ssim_mean"],
        "fid_to_original": s["fidelity"]["fid_to_original"],
        "fd_cls_to_original": s["fidelity"].get("fd_cls_to_original"),
        "exact_match_drop": s.get("exact_match_drop"),
        "fid_increase": s.get("fid_increase"),
        "fd_cls_increase": s.get("fd_cls_increase"),
        "gate_passed": s["gate_passed"],
        "gate_reasons": s["gate_reasons"],
    }
    for split in ("all", "single", "two"):
        for metric in ("exact", "object", "color", "shape", "position"):
            if split in acc:
                row[f"{metric}_{split}"] = acc[split][metric]
    return row


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def run_ablation(
    pipe,
    pool: Sequence[str],
    eval_prompts: Sequence[str],
    eval_cfg: Any,
    cfg: AblationConfig,
    *,
    embedder: Any,
    judges: Any = None,
    on_row: Callable[[dict], None] | None = None,
    keep_images: Sequence[tuple[str, float]] = (),
) -> AblationResult:
    """Run every (variant, budget) of ``cfg`` on ``pipe`` (left unchanged) and evaluate each
    against the original on ``eval_prompts`` with ``eval_cfg`` (an EvaluationParams).

    ``pool`` is the calibration prompt pool (the evaluation prompts are excluded from it),
    ``embedder`` the SlimSet embedder, ``judges`` the toy judges (None: the committed ones).
    ``keep_images`` lists (variant, budget) pairs whose samples are kept in ``result.images``."""
    from slimdiff.calibration.collect import collect_stats
    from slimdiff.evaluation.evaluate import PairEvaluator
    from slimdiff.families.units import compression_units, count_parameters, denoiser_of, planned_units
    from slimdiff.planning.allocation import plan_ranks
    from slimdiff.planning.budget import Budget, InfeasibleBudgetError
    from slimdiff.planning.influence import compute_influence
    from slimdiff.planning.spectra import error_profiles
    from slimdiff.planning.streams import plan_per_group, stream_summary
    from slimdiff.surgery.compress import compress_

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    variants = cfg.resolved_variants()
    needed_sets = {v.calibration for v in variants}
    denoiser = denoiser_of(pipe)
    units_all = compression_units(denoiser)
    compressible = sum(u.full_params for u in units_all.values())
    model_params = count_parameters(denoiser)

    # 1. calibration, once per calibration set
    stats: dict[str, Any] = {}
    calibration: dict[str, dict] = {}
    fps_size: dict[int, int] = {}  # requested n -> prompts FPS really selected (near duplicates cut it short)
    for spec in sorted(cfg.calibration_sets, key=lambda c: c.selection != "fps"):  # FPS sets first
        if spec.name not in needed_sets:
            continue
        t0 = time.perf_counter()
        prompts = calibration_prompts(
            spec,
            pool,
            eval_prompts,
            embedder,
            cfg.slimset_seed,
            n=fps_size.get(spec.n) if spec.selection == "random" else None,
            canonical_share=cfg.slimset_canonical_share,
            near_dup_threshold=cfg.slimset_near_dup_threshold,
        )
        if spec.selection == "fps":
            fps_size[spec.n] = len(prompts)
        t_select = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats[spec.name] = collect_stats(
            pipe,
            prompts,
            num_inference_steps=cfg.calibration_steps,
            guidance_scale=cfg.calibration_guidance,
            n_buckets=cfg.n_buckets,
            batch_size=cfg.calibration_batch_size,
            seed=cfg.calibration_seed,
            progress=False,
        )
        calibration[spec.name] = {
            "selection": spec.selection,
            "n_requested": spec.n,
            "n": len(prompts),
            "selection_seconds": t_select,
            "calibration_seconds": time.perf_counter() - t0,
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "first_prompts": prompts[:3],
        }
        logger.info(
            "calibrated %s: %d prompts in %.1f s",
            spec.name,
            len(prompts),
            calibration[spec.name]["calibration_seconds"],
        )
    seconds["calibration"] = time.perf_counter() - t_start

    # 2. influence and aggregated covariances, once per (calibration set, weighting)
    t0 = time.perf_counter()
    influence: dict[tuple[str, str], Any] = {}
    covariances: dict[tuple[str, str], dict] = {}
    profiles: dict[tuple[str, str], dict] = {}
    for v in variants:
        key = (v.calibration, v.weighting)
        if key not in influence:
            influence[key] = compute_influence(stats[v.calibration], denoiser, v.weighting)
            covariances[key] = influence[key].aggregate(stats[v.calibration])
            profiles[key] = error_profiles(
                denoiser,
                covariances[key],
                units_all,
                cfg.damping,
                rope_sequence=stats[v.calibration].meta.get("rope_sequence"),
            )
    seconds["influence"] = time.perf_counter() - t0

    # 3. the original, sampled and featurised once
    t0 = time.perf_counter()
    evaluator = PairEvaluator(list(eval_prompts), eval_cfg, judges=judges)
    original = evaluator.measure(pipe)
    seconds["original_sampling"] = time.perf_counter() - t0
    images: dict[str, np.ndarray] = {"original": original.images} if keep_images else {}
    keep = {(name, round(b, 6)) for name, b in keep_images}

    # FLOP cost models at the serving shape, one per (QK option, unit set) (budget_kind "flops")
    cost_cache: dict = {}

    def flop_costs(qk_norm: str, units: dict):
        from slimdiff.planning.flops import serving_shape, unit_flop_costs

        key = (qk_norm, tuple(sorted(units)))
        if key not in cost_cache:
            h, w, batch, text_len = cfg.serving
            shape = serving_shape(pipe, height=h, width=w, batch=batch, text_len=text_len)
            cost_cache[key] = unit_flop_costs(denoiser, shape, qk_norm, units)
        return cost_cache[key]

    def default_flops(modules) -> tuple[int, int]:
        """(whole forward's FLOPs, compressible FLOPs) under the default QK option ("auto"): what
        every row's FLOP share is counted against, whatever units its own QK option plans (the
        whole forward's FLOPs are the same in every cost model)."""
        ref_units = planned_units(units_all, modules, "auto")
        ref = flop_costs("auto", ref_units)
        return ref.total, ref.total - ref.plan_flops({n: 0 for n in ref_units})

    # 4. every (variant, budget)
    rows: list[dict] = []
    protocol: dict = {}
    original_block: dict = {}
    t_variants = time.perf_counter()
    for v in variants:
        for budget in v.budgets if v.budgets is not None else cfg.budgets:
            row: dict = {
                "variant": v.name,
                "group": v.group,
                "budget": budget,
                "calibration": v.calibration,
                "weighting": v.weighting,
                "mode": v.mode or cfg.mode,
                "tau": cfg.tau if v.tau is None else v.tau,
                "methods": dict(v.methods),
                "modules": list(v.modules),
                "qk_norm": v.qk_norm,
            }
            units = planned_units(units_all, v.modules, v.qk_norm)
            removed = int(round(budget * compressible))
            row["split"] = v.split
            solver = dict(
                tau=row["tau"],
                r_min=cfg.r_min,
                multiple=cfg.multiple,
                mode=row["mode"],
                model_params=model_params,
                profiles=profiles[(v.calibration, v.weighting)],
            )
            scores = influence[(v.calibration, v.weighting)].score_of()

            def by_params(removed_params: int, units=units, scores=scores, solver=solver, v=v):
                if v.split == "per-stream":  # each group its share of the whole budget's removal
                    return plan_per_group(
                        denoiser,
                        units,
                        removed_params / sum(u.full_params for u in units.values()),
                        influence=scores,
                        **solver,
                    )
                return plan_ranks(scores, units, Budget(removed_params=removed_params), **solver)

            try:
                if cfg.budget_kind == "params":
                    plan = by_params(removed)
                else:
                    costs = flop_costs(v.qk_norm, units)
                    total, compressible = default_flops(v.modules)
                    if row["mode"] == "error" and v.spend == "budget" and v.split == "joint":
                        if v.qk_norm == "auto":
                            target = Budget(removed_flops_fraction=budget)
                        else:  # another QK option: remove as many FLOPs as the default's share does
                            target = Budget(total_flops=int(round(total - budget * compressible)))
                        plan = plan_ranks(scores, units, target, costs=costs, **solver)
                    else:
                        plan = plan_matching_flops(by_params, units, costs, budget)
                    removed = costs.total - costs.plan_flops(
                        {n: u.rank for n, u in plan.units.items() if n in units}
                    )
                    row["flops_removed_share"] = removed / compressible
            except InfeasibleBudgetError as err:
                row.update(status="infeasible", message=str(err))
                logger.info("%s @ %.0f%%: infeasible", v.name, 100 * budget)
                rows.append(row)
                if on_row:
                    on_row(row)
                continue
            row["streams"] = stream_summary(denoiser, units_all, plan)
            t0 = time.perf_counter()
            unet = copy.deepcopy(denoiser)
            compress_(
                unet,
                plan,
                covariances[(v.calibration, v.weighting)],
                method=dict(v.methods),
                damping=cfg.damping,
                ffn_selection=cfg.ffn_selection,
                qk_norm=v.qk_norm,
                rope_sequence=stats[v.calibration].meta.get("rope_sequence"),
            )
            t_compress = time.perf_counter() - t0
            slim = with_unet(pipe, unet)
            t0 = time.perf_counter()
            measured = evaluator.measure(slim)
            result = evaluator.compare(pipe, slim, original, measured, None)
            protocol, original_block = result["protocol"], result["original"]
            row.update(
                status="ok",
                compress_seconds=t_compress,
                eval_seconds=time.perf_counter() - t0,
                **_row_metrics(result),
            )
            logger.info(
                "%s @ %.0f%%: exact %s, FID %.4f (%.1f s)",
                v.name,
                100 * budget,
                f"{100 * row['exact_all']:.1f}%" if "exact_all" in row else "-",
                row["fid"] if row["fid"] is not None else float("nan"),
                t_compress + row["eval_seconds"],
            )
            rows.append(row)
            if on_row:
                on_row(row)
            if (v.name, round(budget, 6)) in keep:
                images[f"{v.name}@{budget:g}"] = measured.images
            del slim, unet
    seconds["variants"] = time.perf_counter() - t_variants
    seconds["total"] = time.perf_counter() - t_start
    config = asdict(cfg)
    config["variants"] = [asdict(v) for v in variants]
    config["compressible_params"] = compressible
    config["unet_params"] = model_params
    return AblationResult(
        rows=rows,
        original=original_block,
        calibration=calibration,
        protocol=protocol,
        config=config,
        seconds=seconds,
        images=images,
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


TABLE_COLUMNS = (
    "variant",
    "removed",
    "denoiser params",
    "exact %",
    "1-obj exact %",
    "2-obj exact %",
    "color %",
    "position %",
    "FID",
    "CLIP",
    "PSNR dB",
    "SSIM",
    "FLOPs x",
    "latency x",
    "gate",
)


#: the classifier-feature FD column, right after "FID"; only in tables of results that measured it,
#: so a result without it (an older ablation.json, the real path) renders as before
FD_CLS_COLUMN = "FD cls"


def has_fd_cls(result: AblationResult) -> bool:
    """Whether the original or any row carries the classifier-feature FD."""
    return result.original.get("fd_cls") is not None or any(
        r.get("fd_cls") is not None for r in result.rows if r["status"] == "ok"
    )


def table_columns(fd_cls: bool = False) -> tuple[str, ...]:
    """``TABLE_COLUMNS``, with ``FD_CLS_COLUMN`` after "FID" when ``fd_cls``."""
    if not fd_cls:
        return TABLE_COLUMNS
    i = TABLE_COLUMNS.index("FID") + 1
    return (*TABLE_COLUMNS[:i], FD_CLS_COLUMN, *TABLE_COLUMNS[i:])


def _with_fd_cls(cells: list[str], value: str, fd_cls: bool) -> list[str]:
    if fd_cls:
        cells.insert(TABLE_COLUMNS.index("FID") + 1, value)
    return cells


def _table_row(r: dict, fd_cls: bool = False) -> list[str]:
    if r["status"] != "ok":
        n = len(table_columns(fd_cls))
        return [r["variant"], f"{100 * r['budget']:.0f}%", "infeasible", *["-"] * (n - 3)]
    cells = [
        r["variant"],
        f"{100 * r['removed_fraction']:.1f}%",
        f"{r['unet_params']:,}",
        _pct(r.get("exact_all")),
        _pct(r.get("exact_single")),
        _pct(r.get("exact_two")),
        _pct(r.get("color_all")),
        _pct(r.get("position_all")),
        _num(r.get("fid"), 4),
        _num(r.get("clip_score"), 2),
        _num(r.get("psnr_db"), 1),
        _num(r.get("ssim"), 3),
        _num(r.get("flops_ratio"), 3),
        _num(r.get("latency_ratio"), 2),
        "pass" if r["gate_passed"] else "fail",
    ]
    return _with_fd_cls(cells, _num(r.get("fd_cls"), 1), fd_cls)


def _original_row(original: dict, fd_cls: bool = False) -> list[str]:
    acc = original.get("accuracy") or {}
    get = lambda split, m: acc.get(split, {}).get(m)  # noqa: E731
    cells = [
        "**original**",
        "0%",
        f"{original['unet_params']:,}",
        _pct(get("all", "exact")),
        _pct(get("single", "exact")),
        _pct(get("two", "exact")),
        _pct(get("all", "color")),
        _pct(get("all", "position")),
        _num(original.get("fid"), 4),
        _num(original.get("clip_score"), 2),
        "-",
        "-",
        "1.000",
        "1.00",
        "",
    ]
    return _with_fd_cls(cells, _num(original.get("fd_cls"), 1), fd_cls)


def budget_currency(config: Mapping) -> str:
    """What the result's budgets are shares of: "parameters" or "FLOPs" (``AblationConfig.budget_kind``)."""
    return "FLOPs" if config.get("budget_kind", "params") == "flops" else "parameters"


def ablation_table(result: AblationResult) -> str:
    """Markdown: one table per budget (original first), then the SlimSet and module sections.
    The "FD cls" column (classifier-feature FD) appears when the result measured it."""
    fd_cls = has_fd_cls(result)
    columns = table_columns(fd_cls)
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    orig = "| " + " | ".join(_original_row(result.original, fd_cls)) + " |"
    out: list[str] = []
    sections: list[tuple[str, Callable[[dict], bool]]] = []
    budgets = result.config["budgets"]
    currency = budget_currency(result.config)
    for b in budgets:
        sections.append(
            (
                f"### {100 * b:.0f}% of the compressible {currency} removed: methods",
                lambda r, b=b: r["group"] == "method" and r["budget"] == b,
            )
        )
    sections.append(
        (
            "### Module types alone (equal number of removed parameters)",
            lambda r: r["group"] == "module" or r["variant"] == "slimdiff",
        )
    )
    sb = result.config["slimset_budget"]
    base = result.config["calibration_sets"][0]["name"]
    sections.append(
        (
            f"### Calibration set at {100 * sb:.0f}% removed (SlimDiff default otherwise)",
            lambda r: r["group"] == "slimset" or (r["variant"] == "slimdiff" and r["budget"] == sb),
        )
    )
    for title, keep in sections:
        rows = [r for r in result.rows if keep(r)]
        if not rows:
            continue
        rows.sort(key=lambda r: (r["budget"], r["group"] != "method" or r["variant"] != "slimdiff"))
        lines = [orig]
        for r in rows:
            cells = _table_row(r, fd_cls)
            if r["group"] == "slimset" or (
                title.startswith("### Calibration") and r["variant"] == "slimdiff"
            ):
                cells[0] = f"{cells[0]} ({r['calibration'] if r['variant'] != 'slimdiff' else base})"
            lines.append("| " + " | ".join(cells) + " |")
        out += [title, "", head, *lines, ""]
    o_exact = (result.original.get("accuracy") or {}).get("all", {}).get("exact")
    n = result.protocol.get("n_images")
    if o_exact is not None and n:
        se = 100 * math.sqrt(max(o_exact * (1 - o_exact), 1e-12) / n)
        out += [
            f"Sampling noise: with {n} images, the standard error of an exact-match rate near the original's "
            f"{100 * o_exact:.1f}% is about {se:.1f} points for an independent sample; variants share prompts and "
            "seeds with the original, so differences between rows are less noisy than that, but a difference of "
            "one or two points is not a finding.",
            "",
        ]
    floor = result.protocol.get("fid_real_vs_real")
    if floor is not None:
        out += [
            f"FID noise floor: two independent render sets of the same {n} captions are {floor:.4f} apart "
            "(the FID of a perfect generator); FID differences smaller than that are not findings.",
            "",
        ]
    cls_floor = result.protocol.get("fd_cls_real_vs_real")
    if cls_floor is not None:
        o_cls = result.original.get("fd_cls")
        out += [
            f"FD cls (Frechet distance on the toy attribute classifier's penultimate features, vs the same "
            f"renders) noise floor: two independent render sets of the evaluated captions ({n} images each) are "
            f"{cls_floor:.1f} apart"
            + (f"; the original model's images are {o_cls:.1f} from the renders" if o_cls is not None else "")
            + ". Differences between rows smaller than the floor are not findings.",
            "",
        ]
    out += stream_table(result.rows)
    infeasible = [r for r in result.rows if r["status"] != "ok"]
    if infeasible:
        out += ["Infeasible (the budget cannot be reached by these units at r_min / multiple):", ""]
        out += [f"- {r['variant']} @ {100 * r['budget']:.0f}%: {r['message']}" for r in infeasible]
        out.append("")
    return "\n".join(out)


def stream_table(rows: Sequence[dict]) -> list[str]:
    """Markdown lines: how each method row's plan splits the removed parameters between the image
    and the text stream (``slimdiff.planning.streams.stream_summary``); nothing for one-stream families."""
    rows = [r for r in rows if r["status"] == "ok" and r["group"] == "method" and r.get("streams")]
    if not rows or not any(r["streams"]["compressible"]["text"] for r in rows):
        return []
    c = rows[0]["streams"]["compressible"]
    out = [
        "### Budget across the token streams",
        "",
        f"Compressible parameters: image stream {c['image'] / 1e6:.3f} M, text stream {c['text'] / 1e6:.3f} M "
        "(joint attention units count their image and text projections to their streams). "
        "`per-stream-split` makes image-only, text-only and joint units each remove the budget's share of their "
        "own parameters; the others allocate jointly.",
        "",
        "| variant | removed | image stream removed | text stream removed | text share of removed |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["budget"], r["variant"] != "slimdiff", r["variant"])):
        st = r["streams"]
        out.append(
            f"| {r['variant']} | {100 * r['budget']:.0f}% | {st['removed']['image'] / 1e6:.3f} M "
            f"({100 * st['removed_fraction']['image']:.0f}%) | {st['removed']['text'] / 1e6:.3f} M "
            f"({100 * st['removed_fraction']['text']:.0f}%) | {100 * st['text_share_of_removed']:.0f}% |"
        )
    return [*out, ""]


#: the SlimDiff default and the method baselines it is compared against (README table)
METHOD_VARIANTS = (
    "slimdiff",
    "influence-allocation",
    "uniform-allocation",
    "weight-svd-qk-vo",
    "magnitude-ffn",
    "uniform-timesteps",
)
CURVE_VARIANTS = (*METHOD_VARIANTS, "ffn-only")


def plot_curves(result: AblationResult, path: str | Path) -> Path:
    """Quality vs UNet parameters: exact match, FID, classifier-feature FD (when measured) and PSNR
    to the original, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    panels = (
        ("exact_all", "exact match (%)", 100.0),
        ("fid", "FID vs real renders (lower is better)", 1.0),
        ("fd_cls", "classifier-feature FD vs real renders (lower is better)", 1.0),
        ("psnr_db", "PSNR to original (dB)", 1.0),
    )
    panels = tuple(
        p for p in panels if any(r.get(p[0]) is not None for r in result.rows if r["status"] == "ok")
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    orig = result.original
    orig_values = {
        "exact_all": (orig.get("accuracy") or {}).get("all", {}).get("exact"),
        "fid": orig.get("fid"),
        "fd_cls": orig.get("fd_cls"),
        "psnr_db": None,
    }
    for ax, (key, label, scale) in zip(axes[0], panels, strict=True):
        for name in CURVE_VARIANTS:
            pts = sorted(
                (r["unet_params"], r[key])
                for r in result.rows
                if r["variant"] == name and r["status"] == "ok" and r.get(key) is not None
            )
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(np.array(xs) / 1e6, np.array(ys) * scale, marker="o", label=name)
        if orig_values.get(key) is not None:
            ax.scatter(
                [orig["unet_params"] / 1e6],
                [orig_values[key] * scale],
                marker="*",
                s=160,
                color="black",
                zorder=5,
                label="original",
            )
        ax.set_xlabel("UNet parameters (M)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Quality vs parameters at equal budget (toy model, held-out captions)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _find(result: AblationResult, variant: str, budget: float) -> dict | None:
    for r in result.rows:
        if r["variant"] == variant and math.isclose(r["budget"], budget) and r["status"] == "ok":
            return r
    return None


def readme_summary(
    result: AblationResult,
    table_path: str = "benchmarks/results/ablation.md",
    curves_path: str = "benchmarks/results/ablation_curves.png",
    *,
    names: Sequence[str] | None = None,
    what: str = "the toy UNet",
    command: str = "python benchmarks/ablation.py --write",
) -> str:
    """A short, data-driven paragraph for the README: every sentence is computed from the rows.
    ``names``: the variant columns, the SlimDiff default first (default: the UNet rows)."""
    p, orig = result.protocol, result.original
    o_exact = (orig.get("accuracy") or {}).get("all", {}).get("exact")
    lines = [
        f"### Ablation on {what} (equal {'FLOP' if budget_currency(result.config) == 'FLOPs' else 'parameter'} budgets)",
        "",
        f"`{command}` compresses {what} ({result.config['unet_params']:,} parameters, "
        f"{result.config['compressible_params']:,} in the compressible set) at "
        + ", ".join(f"{100 * b:.0f}%" for b in result.config["budgets"])
        + f" of the compressible {budget_currency(result.config)} removed and evaluates every variant against the original on the "
        f"{p.get('n_prompts')} held-out captions ({p.get('images_per_prompt')} images each, seeds {p.get('seed')}+k, "
        f"{p.get('num_inference_steps')} steps {p.get('sampler', '')}, guidance {p.get('guidance_scale')}). "
        f"It took {result.seconds['total'] / 60:.1f} min on this machine.",
        "",
    ]
    names = list(names) if names is not None else METHOD_VARIANTS
    lines += [
        "Each cell: exact match % / FID vs real renders / PSNR to the original's images (dB), same seeds.",
        "",
        "| removed | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    if o_exact is not None:
        lines.append(
            f"| original | {_pct(o_exact)} / {_num(orig.get('fid'), 4)} / - |" + " |" * (len(names) - 1)
        )
    for b in result.config["budgets"]:
        cells = []
        for name in names:
            r = _find(result, name, b)
            cells.append(
                "-"
                if r is None
                else f"{_pct(r.get('exact_all'))} / {_num(r.get('fid'), 4)} / {_num(r.get('psnr_db'), 1)}"
            )
        lines.append(f"| {100 * b:.0f}% | " + " | ".join(cells) + " |")
    floor = p.get("fid_real_vs_real")
    if floor is not None:
        lines += ["", f"FID noise floor (two independent render sets of the same captions): {floor:.4f}."]
    cls_floor = p.get("fd_cls_real_vs_real")
    if cls_floor is not None:
        o_cls = orig.get("fd_cls")
        lines += [
            "",
            "Classifier-feature FD (toy attribute classifier's penultimate features, vs real renders): noise floor "
            f"{cls_floor:.1f}"
            + (f", original {o_cls:.1f}" if o_cls is not None else "")
            + "; per variant in the full table (FD cls).",
        ]
    wins = []
    criteria = (
        ("exact_all", "higher exact match", 1),
        ("fid", "lower FID", -1),
        ("fd_cls", "lower classifier-feature FD", -1),
        ("psnr_db", "higher PSNR to the original", 1),
    )
    for other in names[1:]:
        pairs = [(_find(result, "slimdiff", b), _find(result, other, b)) for b in result.config["budgets"]]
        pairs = [(a, c) for a, c in pairs if a is not None and c is not None]
        counts = []
        for key, label, sign in criteria:
            valid = [(a[key], c[key]) for a, c in pairs if a.get(key) is not None and c.get(key) is not None]
            if valid:
                better = sum(sign * (x - y) > 0 for x, y in valid)
                tied = sum(x == y for x, y in valid)
                counts.append(f"{label} at {better} of {len(valid)}" + (f" ({tied} tied)" if tied else ""))
        if counts:
            wins.append(f"vs {other}: " + ", ".join(counts))
    if wins:
        lines += ["", "Budgets at which the SlimDiff default beats each baseline:", ""] + [
            f"- {w}." for w in wins
        ]
    lines += [
        "",
        f"Full table: [{Path(table_path).name}]({table_path}); curves: [{Path(curves_path).name}]({curves_path}). "
        "With this many images an exact-match difference of a few points is within sampling noise "
        "(see the table's note).",
    ]
    return "\n".join(lines) + "\n"
