"""Prefect tasks, one per stage, wrapping :mod:`tasks.stages`.

Cache keys come from :func:`tasks.stages.stage_key`: the stage's code version, the digest of the
params the stage reads (``slimdiff.config.STAGE_PARAMS``, nothing else) and the digests of its input
manifests. Results are persisted, so the cache survives across processes and Prefect server
restarts; outputs are content-addressed folders ``<artifact_root>/<stage>/<key>``.
Retries only where a retry can help (registry/storage I/O), never on numerical stages.

Concurrent runs on one workspace (docs/reliability.md): a stage writes its keyed folder while
holding that key's file lock; under the lock it first looks for a result already published under
the key (by another run) and reuses it once it passes verification, so a second run waits and
reuses instead of recomputing, and a published folder is never replaced by different bytes. A
published folder that fails verification is moved to quarantine and recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import task

from slimdiff.config import Params
from tasks import stages
from tasks.artifacts import (
    ARTIFACT_NAMES,
    Manifest,
    check_artifact,
    lock_path,
    quarantine,
    read_manifest,
    stage_lock,
)

log = logging.getLogger(__name__)

# Stages whose outputs are small: checked by content digest on every cache hit.
SMALL_STAGES = frozenset({"slimset", "influence", "plan", "evaluate"})


@dataclass(frozen=True)
class StageResult:
    """What a stage task returns: the manifest, and how this task got it."""

    manifest: Manifest
    outcome: str  # "ran" | "reused" (published by another run under the same key) | "repaired"
    problem: str | None = None  # for "repaired": what failed verification


def stage_dir(params: Params, stage: str, key: str) -> Path:
    return Path(params.tracking.artifact_root) / stage / key[:16]


def _cache_key(stage: str, *input_names: str):
    def key_fn(context, parameters) -> str:
        params = parameters["params"]
        key = stages.stage_key(stage, params, *(parameters[n] for n in input_names))
        # The cached value is a manifest pointing into artifact_root: workspaces with different
        # roots must not hand each other manifests of folders they do not own.
        root = str(Path(params.tracking.artifact_root).resolve())
        # "r2": records hold a StageResult (older records held a bare Manifest)
        return f"slimdiff-r2-{stage}-{key[:32]}-{stages.sha256_json(root)[:8]}"

    return key_fn


def _out(params: Params, stage: str, *inputs: Manifest) -> Path:
    return stage_dir(params, stage, stages.stage_key(stage, params, *inputs))


def verification_level(params: Params, manifest: Manifest) -> str:
    """ "digest" (every byte) or "size" (recorded file list and sizes) for a cache hit."""
    if manifest.stage in SMALL_STAGES:
        return "digest"
    files = manifest.meta.get("files") if isinstance(manifest.meta, dict) else None
    size = sum(files.values()) if files else None
    return "digest" if stages.full_verification(params, size) else "size"


def check_cached(params: Params, manifest: Manifest) -> str | None:
    """None when a cached stage output still matches its manifest, else what is wrong."""
    return check_artifact(manifest, verification_level(params, manifest))


def _keyed(params: Params, stage: str, inputs: tuple[Manifest, ...], compute: Callable[[Path], Manifest]):
    """Run ``compute(out)`` for the keyed output folder ``out`` under its lock, unless a verified
    result is already published there."""
    out = _out(params, stage, *inputs)
    what = f"{ARTIFACT_NAMES[stage]} (stage {stage}) {out}"
    with stage_lock(lock_path(out), timeout=params.integrity.lock_timeout_s, what=what):
        problem = None
        if out.exists():
            try:
                published = read_manifest(out)
            except (ValueError, TypeError):  # a damaged manifest.json: the folder cannot be trusted
                published = None
            if published is not None and Path(published.uri).resolve() == out.resolve():
                published = replace(published, uri=str(out))  # same folder, maybe spelled differently
                problem = check_cached(params, published)
                if problem is None:
                    return StageResult(published, "reused")
            else:
                problem = "no readable manifest (damaged, or its writer stopped before publishing it)"
            kept = quarantine(out)
            log.warning(
                "%s failed verification: %s; recomputing exactly this stage (damaged copy kept at %s)",
                what,
                problem,
                kept,
            )
        manifest = compute(out)
        return StageResult(manifest, "repaired" if problem else "ran", problem)


@task(name="slimset", cache_key_fn=_cache_key("slimset", "model"), persist_result=True)
def slimset_task(params: Params, model: Manifest) -> StageResult:
    return _keyed(
        params, "slimset", (model,), lambda out: stages.run_slimset(params, out, model=model, replace=False)
    )


@task(name="calibrate-prepare")
def calibrate_prepare_task(params: Params, model: Manifest, slimset: Manifest) -> stages.CalibrationJob:
    # Not cached by Prefect: the store is its own cache. Its path is the stage key, its shards carry
    # completion marks, so a finished store has nothing missing and a crashed one resumes. The flow
    # holds the store's lock from here to calibrate-finalize.
    key = stages.stage_key("calibrate", params, model, slimset)
    return stages.prepare_calibration(params, model, slimset, stages.store_uri_for(params, key))


@task(name="calibrate-shard", task_run_name="calibrate-shard-{index}")
def calibrate_shard_task(
    params: Params, model: Manifest, slimset: Manifest, store_uri: str, index: int
) -> str:
    # Self-contained, so a Dask worker on another machine can run it (one worker per GPU).
    return stages.collect_shard(params, model, slimset, store_uri, index, progress=False)


@task(name="calibrate-finalize")
def calibrate_finalize_task(job: stages.CalibrationJob, seconds: float | None) -> Manifest:
    return stages.finalize_calibration(job, seconds)


@task(name="influence", cache_key_fn=_cache_key("influence", "model", "stats"), persist_result=True)
def influence_task(params: Params, model: Manifest, stats: Manifest) -> StageResult:
    return _keyed(
        params,
        "influence",
        (model, stats),
        lambda out: stages.run_influence(params, model, stats, out, replace=False),
    )


@task(name="plan", cache_key_fn=_cache_key("plan", "model", "influence"), persist_result=True)
def plan_task(params: Params, model: Manifest, influence: Manifest) -> StageResult:
    return _keyed(
        params,
        "plan",
        (model, influence),
        lambda out: stages.run_plan(params, model, influence, out, replace=False),
    )


@task(
    name="compress",
    cache_key_fn=_cache_key("compress", "model", "stats", "influence", "plan"),
    persist_result=True,
)
def compress_task(
    params: Params, model: Manifest, stats: Manifest, influence: Manifest, plan: Manifest
) -> StageResult:
    return _keyed(
        params,
        "compress",
        (model, stats, influence, plan),
        lambda out: stages.run_compress(params, model, stats, influence, plan, out, replace=False),
    )


@task(name="evaluate", cache_key_fn=_cache_key("evaluate", "model", "compressed"), persist_result=True)
def evaluate_task(params: Params, model: Manifest, compressed: Manifest) -> StageResult:
    return _keyed(
        params,
        "evaluate",
        (model, compressed),
        lambda out: stages.run_evaluate(params, model, compressed, out, replace=False),
    )


STAGE_TASKS = {
    "slimset": slimset_task,
    "influence": influence_task,
    "plan": plan_task,
    "compress": compress_task,
    "evaluate": evaluate_task,
}
