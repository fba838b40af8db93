"""The pipeline stages as plain functions: params + input manifests + an output location -> Manifest.

These are what both entry points run: the Prefect tasks in :mod:`tasks.prefect_tasks` (content-
addressed outputs under ``tracking.artifact_root``, cached by key) and the ``slimdiff <stage>``
commands that ``dvc.yaml`` calls (fixed output paths, DVC decides what is stale). Each stage reads
only its own params group(s) (``slimdiff.config.STAGE_PARAMS``), writes into a temporary folder
that replaces its output only on success (``replace=False``: content-addressed outputs are
published once and never replaced), and returns a small manifest that also records the file sizes
a cache hit is checked against.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import slimdiff
from slimdiff.config import Params
from slimdiff.evaluation.evaluate import jsonable
from slimdiff.families.units import planned_units  # noqa: F401  (re-exported: the plan stage and preflight use it)
from tasks.artifacts import (
    ArtifactError,
    Manifest,
    check_artifact,
    content_digest,
    file_digest,
    folder_files,
    lock_path,
    read_manifest,
    sha256_json,
    stage_lock,
    staged_dir,
    verify,
    write_manifest,
)
from tasks.store import CovarianceStore

log = logging.getLogger(__name__)

# Bump a stage's version when its output changes meaning for the same inputs: it is part of the
# stage's cache key, so old cached results stop matching.
STAGE_VERSIONS = {
    "slimset": "1",
    "calibrate": "2",  # 2: store format 2 (merged totals), statistics read per unit
    "influence": "3",  # 2: also writes error_profiles.json; 3: profiles are undamped errors
    "plan": "3",  # 2: mode "error"; plans record profiles_digest and predicted_error; 3: exact DP
    "compress": "3",  # 2: fused-kernel processor, undamped report errors; 3: LoRA maps saved
    "evaluate": "2",  # 2: metrics gain fd_cls (classifier-feature FD), its floor and fd_cls_to_original
    "register": "1",
}

SLIMSET_FILE = "slimset.json"
INFLUENCE_FILE = "influence.json"
PLAN_FILE = "rank_plan.json"
PROFILES_FILE = "error_profiles.json"
METRICS_FILE = "metrics.json"


class StageInputError(ValueError):
    """Bad input for a stage (budget out of range, SlimSet overlapping evaluation prompts, ...)."""


class NoBudgetPassesError(StageInputError):
    """A budget search (``search.values``) found no point that passes the quality gate; nothing was
    registered and no alias moved. The message names the best point and its metrics."""


def headline_metrics(metrics: dict) -> dict:
    """The few numbers a budget point is judged by, from an evaluate stage's metrics.json: sizes,
    FLOPs and latency (and their ratios to the original), exact match (toy path), PSNR to the
    original, feature FD (toy CLIP), classifier-feature FD (toy path) and the gate. Used by the budget search and by DVC's metrics file."""
    o, c, s = metrics.get("original", {}), metrics.get("compressed", {}), metrics.get("summary", {})
    return {
        "params_kept": c.get("unet_params"),
        "params_removed": s.get("params_removed"),
        "original_params": o.get("unet_params"),
        "flops": c.get("unet_flops"),
        "flops_ratio": s.get("flops_ratio"),
        "latency_ms": c.get("unet_latency_ms"),
        "latency_ratio": s.get("latency_ratio"),
        "exact_match": ((c.get("accuracy") or {}).get("all") or {}).get("exact"),
        "exact_match_drop": s.get("exact_match_drop"),
        "psnr_db": (s.get("fidelity") or {}).get("psnr_db_mean"),
        "fd": c.get("fid"),
        "fd_cls": c.get("fd_cls"),
        "gate_passed": bool(s.get("gate_passed")),
        "gate_reasons": list(s.get("gate_reasons") or []),
    }


def code_version(stage: str) -> str:
    return f"slimdiff-{slimdiff.__version__}/stage-{STAGE_VERSIONS[stage]}"


# Above this size the covariance store and the compressed weights are checked by recorded file
# sizes on a cache hit under integrity.verify_large "auto"; below it, by every byte.
FULL_VERIFY_MAX_BYTES = 256 << 20


def _finish(stage: str, folder: Path, meta: dict[str, Any]) -> Manifest:
    existing = read_manifest(folder)
    same_folder = existing is not None and Path(existing.uri).resolve() == Path(folder).resolve()
    if same_folder and check_artifact(existing) is None:  # another writer published this key first
        return existing
    files = folder_files(folder)
    manifest = Manifest(
        stage=stage, uri=str(folder), digest=content_digest(folder), meta={**meta, "files": files}
    )
    write_manifest(manifest, folder)
    return manifest


def full_verification(params: Params, size_bytes: int | None) -> bool:
    """Whether a cache hit of a large artifact (store, compressed weights) is checked byte for byte."""
    mode = params.integrity.verify_large
    if mode == "auto":
        return size_bytes is None or size_bytes <= FULL_VERIFY_MAX_BYTES
    return mode == "full"


# -- model -----------------------------------------------------------------------------------
def model_manifest(params: Params) -> Manifest:
    """The source model release as a manifest (digest = weights digest)."""
    from slimdiff.formats.models import resolve_release

    release = resolve_release(params.model.source, params.model.revision)
    return Manifest(stage="model", uri=release.source, digest=release.digest, meta=release.to_dict())


def _load_pipe(params: Params, model: Manifest):
    """A fresh pipeline (compress modifies its UNet in place)."""
    from slimdiff.formats.models import load_pipeline

    revision = model.meta.get("revision") if model.meta["kind"] == "hub" else None
    pipe = load_pipeline(model.meta["source"], revision, dtype=params.model.dtype, device=params.model.device)
    check_one_denoiser(pipe)
    return pipe


def check_one_denoiser(pipe) -> None:
    """The staged pipeline calibrates, plans and compresses ONE denoiser: a pipeline of several
    (Wan 2.2 A14B: ``transformer`` and ``transformer_2``) is refused, pointing to ``slimdiff.slim``."""
    from slimdiff.families.units import UnsupportedModelError, denoisers

    names = list(denoisers(pipe))  # raises for a pipeline of several denoisers slimdiff cannot compress
    if len(names) > 1:
        raise UnsupportedModelError(
            f"{type(pipe).__name__} has {len(names)} denoisers ({', '.join(names)}): the staged pipeline "
            "compresses one; compress such pipelines with slimdiff.slim(pipe, prompts), which calibrates, plans "
            "and compresses each of them, and save with slimdiff.save_compressed"
        )


_PIPE_CACHE: dict[tuple, Any] = {}


def _cached_pipe(params: Params, model: Manifest):
    """One read-only pipeline per process and model (calibration shards, influence, plan share it)."""
    key = (model.digest, params.model.dtype, params.model.device)
    if key not in _PIPE_CACHE:
        _PIPE_CACHE.clear()
        _PIPE_CACHE[key] = _load_pipe(params, model)
    return _PIPE_CACHE[key]


# -- prompts ---------------------------------------------------------------------------------
def read_prompt_source(spec: str) -> list[str]:
    """Prompts from a named set ("toy", "toy-train", "toy-heldout") or a file (txt: one per line;
    csv/tsv: the 'caption'/'prompt'/'Prompt'/'text' column, else the first; json: a list)."""
    from slimdiff.toy.data import heldout_captions, train_captions

    if spec in ("toy", "toy-train"):
        return train_captions()
    if spec == "toy-heldout":
        return heldout_captions()
    path = Path(spec)
    if not path.is_file():
        raise StageInputError(f"prompt source {spec!r}: no such file (or use toy / toy-heldout)")
    if path.suffix in (".csv", ".tsv"):
        import csv

        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        if not rows:
            raise StageInputError(f"{path}: no rows")
        cols = list(rows[0])
        col = next((c for c in ("caption", "prompt", "Prompt", "text") if c in cols), cols[0])
        return [r[col] for r in rows if r.get(col)]
    if path.suffix in (".json", ".jsonl"):
        if path.suffix == ".jsonl":
            items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            items = json.loads(path.read_text())
        return [i if isinstance(i, str) else i.get("prompt") or i.get("caption") for i in items]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _embedder(params: Params, model: Manifest | None):
    from slimdiff.calibration.embedders import OpenClipEmbedder, PipelineTextEmbedder

    e = params.slimset.embedder
    if e.kind == "toy":
        from slimdiff.toy.clip import CHECKPOINT_NAME, register_toy_clip_config, toy_clip_dir

        return OpenClipEmbedder(register_toy_clip_config(), str(toy_clip_dir() / CHECKPOINT_NAME))
    if e.kind == "open_clip":
        return OpenClipEmbedder(e.model_name, e.pretrained)
    if model is None:
        raise StageInputError("slimset.embedder.kind 'pipeline' needs the source model")
    return PipelineTextEmbedder(_load_pipe(params, model))


# -- stages ----------------------------------------------------------------------------------
def run_slimset(
    params: Params, out: Path, model: Manifest | None = None, *, replace: bool = True
) -> Manifest:
    """SlimSet: the calibration prompts (file + card + projection plot)."""
    from slimdiff.calibration.slimset import select_slimset, slimset_card

    cfg = params.slimset
    pool = read_prompt_source(cfg.pool)
    # the evaluation prompts are always excluded: calibrating on them would flatter the evaluation
    specs = dict.fromkeys([*cfg.exclude, params.evaluation.prompts])
    exclude = [p for spec in specs for p in read_prompt_source(spec)]
    embedder = _embedder(params, model)
    with staged_dir(out, replace=replace) as tmp:
        selection = select_slimset(
            pool,
            embedder,
            n=cfg.n,
            exclude=exclude,
            seed=cfg.seed,
            canonical_share=cfg.canonical_share,
            near_dup_threshold=cfg.near_dup_threshold,
        )
        slimset = selection.slimset
        overlap = set(slimset.prompts) & {p.strip() for p in exclude}
        if overlap:  # build_slimset excludes them; this guards the contract at the stage boundary
            raise StageInputError(f"SlimSet overlaps the evaluation prompts: {sorted(overlap)[:3]}")
        slimset.save(tmp / SLIMSET_FILE)
        slimset_card(slimset, selection.embeddings, selection.selected_idx, tmp)
    return _finish(
        "slimset",
        out,
        {
            "n": len(slimset.prompts),
            "slimset_digest": slimset.digest,
            "pool_digest": slimset.pool_digest,
            "embedder": slimset.embedder_id,
            "pool_size": len(pool),
        },
    )


def check_no_overlap(calibration_prompts: list[str], evaluation_spec: str) -> None:
    """Refuse to calibrate on evaluation prompts (compared after whitespace/case normalisation)."""

    def norm(p: str) -> str:
        return " ".join(p.lower().split())

    evaluation = {norm(p) for p in read_prompt_source(evaluation_spec)}
    overlap = [p for p in calibration_prompts if norm(p) in evaluation]
    if overlap:
        raise StageInputError(
            f"the SlimSet overlaps the evaluation prompts ({evaluation_spec}) in {len(overlap)} prompts, "
            f"e.g. {overlap[0]!r}: rebuild it with those prompts excluded (slimset.exclude)"
        )


def _load_slimset(slimset: Manifest):
    from slimdiff.calibration.slimset import SlimSet

    verify(slimset)
    return SlimSet.load(Path(slimset.uri) / SLIMSET_FILE)


def calibration_identity(params: Params, model: Manifest, slimset: Manifest) -> dict:
    """What makes two stores interchangeable: the same weights, prompts, params and code (the
    same inputs as the stage's cache key; where the weights were loaded from does not matter)."""
    return {
        "model_digest": model.digest,
        "slimset_digest": slimset.digest,
        "calibration": params.identity_section("calibration"),
        "dtype": params.model.dtype,
        "code_version": code_version("calibrate"),
    }


@dataclass(frozen=True)
class CalibrationJob:
    """What is left to collect in one covariance store (small: passed between Prefect tasks)."""

    store_uri: str
    n_shards: int
    missing: tuple[int, ...]
    n_prompts: int
    # completed shards that failed verification and are collected again: (index, what was wrong)
    repaired: tuple[tuple[int, str], ...] = ()


def store_uri_for(params: Params, key: str) -> str:
    """Where the flow keeps the covariance store of a calibrate stage key."""
    root = (params.tracking.store_root or params.tracking.artifact_root).rstrip("/")
    return f"{root}/calibrate/{key[:16]}.zarr"


def store_lock_path(params: Params, store_uri: str) -> Path:
    """The lock serialising writers of a covariance store: next to a local store; for object
    storage under the local artifact_root (it serialises the runs of this workspace only)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(store_uri)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return lock_path(path)
    return Path(params.tracking.artifact_root) / ".locks" / f"calibrate-{sha256_json(store_uri)[:16]}.lock"


def _damaged_shards(params: Params, store: CovarianceStore) -> dict[int, str]:
    """Damaged unmerged shards, or every shard when the merged totals are damaged (a total cannot
    be rebuilt from one shard: the store keeps no per-shard copy once merged)."""
    full = full_verification(params, store.recorded_bytes)
    totals = store.totals_problems(full=full)
    if totals:
        key, problem = next(iter(sorted(totals.items())))
        what = f"merged totals damaged ({len(totals)} statistic(s), e.g. {key}: {problem}); every shard is collected again"
        return dict.fromkeys(range(store.n_shards), what)
    return store.shard_problems(full=full)


def statistics_plan(params: Params, denoiser, n_shards: int, reserved_bytes: int | None = None):
    """The statistics memory plan of this calibration (``slimdiff.core.memory``); a limit that cannot be
    met is a StageInputError saying what it would take."""
    from slimdiff.calibration.collect import plan_for_model
    from slimdiff.core.memory import MemoryLimitError

    try:
        cfg = params.calibration
        return plan_for_model(
            denoiser,
            cfg.n_buckets,
            max_memory=cfg.max_memory,
            accumulate=None if cfg.accumulate == "auto" else cfg.accumulate,
            flush_every=cfg.flush_every,
            reserved_bytes=reserved_bytes,
        )
    except MemoryLimitError as err:
        raise StageInputError(str(err)) from err


def prepare_calibration(params: Params, model: Manifest, slimset: Manifest, out_uri: str) -> CalibrationJob:
    """Open (resume) or create the store; say which shards are still missing.

    The completed shards of an existing store are verified first (sizes, or every byte; see
    integrity.verify_large): a damaged shard is reported, loses its mark and is collected again,
    so exactly the damaged shards are recomputed (all of them when the merged totals are damaged).
    Before any forward pass the statistics memory plan is logged: memory on the device and the
    host, sampling passes, store size."""
    from slimdiff.calibration.collect import pipeline_bytes, stat_shapes
    from slimdiff.families.units import compression_units, denoiser_of

    cfg = params.calibration
    prompts = _load_slimset(slimset).prompts
    check_no_overlap(prompts, params.evaluation.prompts)
    n_shards = max(1, -(-len(prompts) // cfg.shard_size))
    identity = calibration_identity(params, model, slimset)
    existing = CovarianceStore.open_if_identical(out_uri, identity)
    repaired: dict[int, str] = {}
    if existing is not None:
        repaired = _damaged_shards(params, existing)
        if repaired:
            problems = sorted(set(repaired.values()))
            log.warning(
                "covariance_store (stage calibrate) at %s failed verification: %s; recomputing exactly shards %s",
                out_uri,
                problems[0]
                if len(problems) == 1
                else "; ".join(f"shard {i}: {p}" for i, p in sorted(repaired.items())),
                sorted(repaired),
            )
            writable = CovarianceStore.open(out_uri, writable=True)
            if len(repaired) == existing.n_shards and set(existing.merged_shards()):
                writable.drop_totals()
            else:
                writable.unmark_shards(sorted(repaired))
        elif existing.complete:  # nothing to do: no need to load the model
            return CalibrationJob(out_uri, n_shards, (), len(prompts))
    pipe = _cached_pipe(params, model)
    denoiser = denoiser_of(pipe)
    compression_units(denoiser)  # unsupported architectures fail here, before any forward pass
    plan = statistics_plan(params, denoiser, n_shards, reserved_bytes=pipeline_bytes(pipe))
    log.info("%s", plan.describe(n_shards))
    store = CovarianceStore.open_or_create(
        out_uri,
        identity=identity,
        n_shards=n_shards,
        n_buckets=cfg.n_buckets,
        shapes=stat_shapes(denoiser),
        attrs={"model_release": model.meta, "slimset_uri": slimset.uri},
    )
    store.group.attrs["memory_plan"] = plan.to_dict()
    return CalibrationJob(
        out_uri, n_shards, tuple(store.missing_shards()), len(prompts), tuple(sorted(repaired.items()))
    )


def collect_shard(
    params: Params, model: Manifest, slimset: Manifest, store_uri: str, index: int, progress: bool = True
) -> str:
    """Collect one prompt shard into the store and mark it complete; returns the shard digest.

    Self-contained (loads its own model and prompts), so any worker process can run it. Each
    statistic goes to the store as soon as its sampling pass ends (``collect_stats(sink=...)``), so
    this process holds one pass's accumulators, never the whole statistics twice."""
    from slimdiff.calibration.collect import collect_stats

    cfg = params.calibration
    prompts = _load_slimset(slimset).prompts[index * cfg.shard_size : (index + 1) * cfg.shard_size]
    pipe = _cached_pipe(params, model)
    store = CovarianceStore.open(store_uri, writable=True)
    writer = store.shard_writer(index)
    stats = collect_stats(
        pipe,
        prompts,
        **cfg.sampler_options(),
        progress=progress,
        index_offset=index * cfg.shard_size,
        sink=writer,
    )
    digest = writer.finish()
    if index == 0:  # the sampler's schedule; the memory plan is in the store's own attrs
        store.group.attrs["stats_meta"] = jsonable(stats.meta)
    return digest


def merge_calibration(store_uri: str) -> list[int]:
    """Fold the completed shards into the store's running totals (the coordinator's job: one
    merger per store, so workers only ever write their own shard)."""
    return CovarianceStore.open(store_uri, writable=True).merge_completed()


def finalize_calibration(job: CalibrationJob, seconds: float | None = None) -> Manifest:
    store = CovarianceStore.open(job.store_uri, writable=True)
    digest = store.finalize({"calibration_seconds": seconds} if seconds is not None else None)
    return Manifest(
        stage="calibrate",
        uri=job.store_uri,
        digest=digest,
        meta={
            "n_shards": job.n_shards,
            "n_prompts": job.n_prompts,
            "resumed_shards": job.n_shards - len(job.missing),
            "collected_shards": len(job.missing),
            "repaired_shards": [i for i, _ in job.repaired],
        },
    )


def run_calibrate(
    params: Params, model: Manifest, slimset: Manifest, out_uri: str, *, progress: bool = True
) -> Manifest:
    """Activation statistics into a resumable Zarr store, one prompt shard after the other, here.
    A rerun after a crash collects only the shards without a completion mark (or with a damaged
    one). One writer per store at a time (a file lock; see :func:`store_lock_path`). Each shard is
    merged into the running totals as soon as it is marked, so the store stays one copy."""
    lock = store_lock_path(params, out_uri)
    with stage_lock(lock, timeout=params.integrity.lock_timeout_s, what=f"covariance store {out_uri}"):
        job = prepare_calibration(params, model, slimset, out_uri)
        t0 = time.perf_counter()
        if job.missing:
            log.info(
                "calibrating %d of %d shards (%d prompts)", len(job.missing), job.n_shards, job.n_prompts
            )
        for i in job.missing:
            collect_shard(params, model, slimset, out_uri, i, progress=progress)
            merge_calibration(out_uri)
        return finalize_calibration(job, time.perf_counter() - t0 if job.missing else None)


def read_stats(stats: Manifest):
    store = CovarianceStore.open(stats.uri)
    if store.digest != stats.digest:
        raise ArtifactError(
            f"{stats.uri}: store digest {store.digest[:12]} != manifest {stats.digest[:12]}",
            stage="calibrate",
            artifact="covariance_store",
            repair="the covariance store's changed shards",
        )
    return store.read(verify=True)


def run_influence(
    params: Params, model: Manifest, stats: Manifest, out: Path, *, replace: bool = True
) -> Manifest:
    """Spectral influence per unit and timestep weights (+ heatmap); no forward passes."""
    from slimdiff.families.units import denoiser_of
    from slimdiff.planning.influence import compute_influence, plot_influence_heatmap
    from slimdiff.planning.spectra import error_profiles

    activation_stats = read_stats(stats)
    pipe = _cached_pipe(params, model)
    with staged_dir(out, replace=replace) as tmp:
        influence = compute_influence(
            activation_stats, denoiser_of(pipe), weighting=params.influence.weighting
        )
        (tmp / INFLUENCE_FILE).write_text(influence.to_json())
        plot_influence_heatmap(influence, tmp / "influence_heatmap.png")
        # the truncation error of every unit at every rank, under the same weighted covariances
        # and damping compress_ uses: what allocation mode "error" spends the budget on
        profiles = error_profiles(
            denoiser_of(pipe),
            influence.aggregate(activation_stats),
            damping=params.compression.damping,
            rope_sequence=activation_stats.meta.get("rope_sequence"),
        )
        (tmp / PROFILES_FILE).write_text(json.dumps(profiles, separators=(",", ":"), allow_nan=False))
    return _finish(
        "influence", out, {"weighting": params.influence.weighting, "influence_digest": influence.digest}
    )


def _load_profiles(influence: Manifest) -> dict[str, list[float]]:
    path = Path(influence.uri) / PROFILES_FILE
    if not path.exists():
        raise StageInputError(
            f"{path} is missing: the influence stage output predates error profiles; rerun `slimdiff influence`"
        )
    return json.loads(path.read_text())


def _load_influence(influence: Manifest):
    from slimdiff.planning.influence import Influence

    verify(influence)
    return Influence.from_json((Path(influence.uri) / INFLUENCE_FILE).read_text())


def budget_from_params(params: Params):
    from slimdiff.api import budget_of

    return budget_of(params)


def run_plan(
    params: Params, model: Manifest, influence: Manifest, out: Path, *, replace: bool = True
) -> Manifest:
    """Rank plan under the global budget (+ bar chart). A FLOP budget is spent at
    ``allocation.serving`` (one meta-device trace of the denoiser there); its plan records the
    cost model and the FLOPs before and after. Parameter budgets make the same plan as before
    (no FLOP record: its digest equals the library's, ``slimdiff.api.slim``)."""
    from slimdiff.families.units import compression_units, denoiser_of
    from slimdiff.planning.allocation import plan_ranks
    from slimdiff.planning.budget import InfeasibleBudgetError
    from slimdiff.planning.plan import plot_rank_plan
    from slimdiff.planning.spectra import plot_error_profiles

    cfg = params.allocation
    scores = _load_influence(influence).score_of()
    profiles = _load_profiles(influence) if cfg.mode == "error" else None
    pipe = _cached_pipe(params, model)
    denoiser = denoiser_of(pipe)
    all_units = compression_units(denoiser)
    units = planned_units(all_units, cfg.modules, params.compression.qk_norm)
    from slimdiff.api import cost_model

    try:  # FLOPs: a meta-device trace; latency: the device's table (measured once, then cached)
        costs = cost_model(pipe, denoiser, params, all_units)
    except ValueError as err:
        raise StageInputError(str(err)) from err
    with staged_dir(out, replace=replace) as tmp:
        try:
            plan = plan_ranks(
                scores,
                units,
                budget_from_params(params),
                model_params=sum(p.numel() for p in denoiser.parameters()),
                profiles=profiles,
                costs=costs,
                **cfg.solver_options(),
            )
        except InfeasibleBudgetError as err:
            raise StageInputError(f"allocation.budget: {err}") from err
        plan.save(tmp / PLAN_FILE)
        plot_rank_plan(plan, tmp / "rank_plan.png")
        if profiles is not None:
            plot_error_profiles(profiles, units, tmp / "error_profiles.png", plan.ranks())
    meta = {
        "plan_digest": plan.digest,
        "params_before": plan.params_before,
        "params_after": plan.params_after,
    }
    if plan.cost_model:
        meta |= {"flops_before": plan.flops_before, "flops_after": plan.flops_after}
    return _finish("plan", out, meta)


def run_compress(
    params: Params,
    model: Manifest,
    stats: Manifest,
    influence: Manifest,
    plan: Manifest,
    out: Path,
    *,
    replace: bool = True,
) -> Manifest:
    """Closed-form rebuild of the UNet at the planned ranks; a loadable compressed pipeline folder."""
    from slimdiff.families.units import denoiser_of
    from slimdiff.formats.io import save_compressed
    from slimdiff.planning.plan import RankPlan
    from slimdiff.surgery.compress import compress_, single_thread

    cfg = params.compression
    verify(plan)
    rank_plan = RankPlan.load(Path(plan.uri) / PLAN_FILE)
    weights = _load_influence(influence).weights
    activation_stats = read_stats(stats)
    covariances = activation_stats.aggregate(weights)
    pipe = _load_pipe(params, model)
    denoiser = denoiser_of(pipe)
    before = sum(p.numel() for p in denoiser.parameters())
    with single_thread():  # many small per-head factorisations: threads only add overhead
        report = compress_(
            denoiser,
            rank_plan,
            covariances,
            rope_sequence=activation_stats.meta.get("rope_sequence"),
            **cfg.compress_options(),
        )
    after = sum(p.numel() for p in denoiser.parameters())
    lineage = {
        "model_release": model.meta,
        "stats_digest": stats.digest,
        "plan_digest": plan.digest,
        "influence_digest": influence.digest,
    }
    with staged_dir(out, replace=replace) as tmp:
        save_compressed(pipe, tmp / "pipeline", extra={"lineage": lineage})
        (tmp / "compression_report.json").write_text(
            json.dumps(jsonable(report.to_dict()), indent=2, sort_keys=True)  # stable bytes, stable digest
        )
    return _finish("compress", out, {"unet_params_before": before, "unet_params_after": after})


def run_evaluate(
    params: Params, model: Manifest, compressed: Manifest, out: Path, *, replace: bool = True
) -> Manifest:
    """Quality, size and speed of the compressed pipeline against the original, same seeds.

    The original model's samples and quality numbers depend only on the model and the evaluation
    params, so they are measured once and reused by every compressed variant (a tau sweep does
    not resample the original); sizes, FLOPs and the latency ratio are measured fresh each time."""
    from slimdiff.evaluation.evaluate import PairEvaluator, jsonable
    from slimdiff.formats.models import load_pipeline

    verify(compressed)
    original = _cached_pipe(params, model)
    slim = load_pipeline(
        str(Path(compressed.uri) / "pipeline"), dtype=params.model.dtype, device=params.model.device
    )
    prompts = read_prompt_source(params.evaluation.prompts)
    evaluator = PairEvaluator(list(prompts), params.evaluation)
    original_measured = _original_measurement(params, model, evaluator, original)
    compressed_measured = evaluator.measure(slim)
    with staged_dir(out, replace=replace) as tmp:
        metrics = jsonable(evaluator.compare(original, slim, original_measured, compressed_measured, tmp))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    s = metrics["summary"]
    log.info(
        "evaluation: gate %s, speedup %.3f", "passed" if s["gate_passed"] else "FAILED", s.get("speedup", 0)
    )
    return _finish("evaluate", out, {"gate_passed": s["gate_passed"]})


def _original_measurement(params: Params, model: Manifest, evaluator, pipe):
    """The original pipeline's Measured, from a content-keyed cache file when present."""
    import numpy as np

    from slimdiff.evaluation.evaluate import Measured, jsonable

    key = sha256_json(
        {"model": model.digest, "evaluation": params.section("evaluation"), "code": code_version("evaluate")}
    )
    folder = Path(params.tracking.artifact_root) / "evaluate-original"
    arrays, facts = folder / f"{key[:16]}.npz", folder / f"{key[:16]}.json"
    # shared by every compressed variant of the model: one writer at a time, checked before use
    with stage_lock(
        lock_path(arrays), timeout=params.integrity.lock_timeout_s, what=f"original measurement {arrays}"
    ):
        if arrays.exists() and facts.exists():
            meta = json.loads(facts.read_text())
            if meta.get("arrays_sha256") == file_digest(arrays):
                data = np.load(arrays)
                feats = torch.from_numpy(data["fid_features"]) if meta["has_fid_features"] else None
                return Measured(
                    images=data["images"],
                    quality=meta["quality"],
                    fid_features=feats,
                    sample_time_s=meta["sample_time_s"],
                )
            log.warning("%s does not match its recorded digest: measuring the original model again", arrays)
        measured = evaluator.measure(pipe)
        folder.mkdir(parents=True, exist_ok=True)
        tmp_arrays = folder / f".tmp-{key[:16]}.npz"
        feats = measured.fid_features
        np.savez(
            tmp_arrays,
            images=measured.images,
            fid_features=feats.numpy() if feats is not None else np.zeros(0),
        )
        facts.write_text(
            json.dumps(
                {
                    "quality": jsonable(measured.quality),
                    "sample_time_s": measured.sample_time_s,
                    "has_fid_features": feats is not None,
                    "arrays_sha256": file_digest(tmp_arrays),
                }
            )
        )
        os.replace(tmp_arrays, arrays)  # the arrays file appears last: a crash leaves no half cache entry
    return measured


def stage_key(stage: str, params: Params, *inputs: Manifest) -> str:
    """Cache key: the stage's code version, the params it reads (only those) and its input digests."""
    from slimdiff.config import STAGE_PARAMS

    return sha256_json(
        {
            "stage": stage,
            "code": code_version(stage),
            "params": params.digest(STAGE_PARAMS[stage]),
            "inputs": [m.digest for m in inputs],
        }
    )
