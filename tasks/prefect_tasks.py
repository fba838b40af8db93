"""Prefect tasks, one per stage, wrapping :mod:`tasks.stages`.

Cache keys come from :func:`tasks.stages.stage_key`: the stage's code version, the digest of the
params the stage reads (``slimdiff.config.STAGE_PARAMS``, nothing else) and the digests of its input
manifests. Results (the manifests) are persisted, so the cache survives across processes and
Prefect server restarts; outputs are content-addressed folders ``<artifact_root>/<stage>/<key>``.
Retries only where a retry can help (registry/storage I/O), never on numerical stages.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from slimdiff.config import Params
from tasks import stages
from tasks.artifacts import Manifest


def stage_dir(params: Params, stage: str, key: str) -> Path:
    return Path(params.tracking.artifact_root) / stage / key[:16]


def _cache_key(stage: str, *input_names: str):
    def key_fn(context, parameters) -> str:
        params = parameters["params"]
        key = stages.stage_key(stage, params, *(parameters[n] for n in input_names))
        # The cached value is a manifest pointing into artifact_root: workspaces with different
        # roots must not hand each other manifests of folders they do not own.
        root = str(Path(params.tracking.artifact_root).resolve())
        return f"slimdiff-{stage}-{key[:32]}-{stages.sha256_json(root)[:8]}"

    return key_fn


def _out(params: Params, stage: str, *inputs: Manifest) -> Path:
    return stage_dir(params, stage, stages.stage_key(stage, params, *inputs))


@task(name="slimset", cache_key_fn=_cache_key("slimset", "model"), persist_result=True)
def slimset_task(params: Params, model: Manifest) -> Manifest:
    return stages.run_slimset(params, _out(params, "slimset", model), model=model)


@task(name="calibrate-prepare")
def calibrate_prepare_task(params: Params, model: Manifest, slimset: Manifest) -> stages.CalibrationJob:
    # Not cached by Prefect: the store is its own cache. Its path is the stage key, its shards carry
    # completion marks, so a finished store has nothing missing and a crashed one resumes.
    key = stages.stage_key("calibrate", params, model, slimset)
    root = (params.tracking.store_root or params.tracking.artifact_root).rstrip("/")
    return stages.prepare_calibration(params, model, slimset, f"{root}/calibrate/{key[:16]}.zarr")


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
def influence_task(params: Params, model: Manifest, stats: Manifest) -> Manifest:
    return stages.run_influence(params, model, stats, _out(params, "influence", model, stats))


@task(name="plan", cache_key_fn=_cache_key("plan", "model", "influence"), persist_result=True)
def plan_task(params: Params, model: Manifest, influence: Manifest) -> Manifest:
    return stages.run_plan(params, model, influence, _out(params, "plan", model, influence))


@task(
    name="compress",
    cache_key_fn=_cache_key("compress", "model", "stats", "influence", "plan"),
    persist_result=True,
)
def compress_task(
    params: Params, model: Manifest, stats: Manifest, influence: Manifest, plan: Manifest
) -> Manifest:
    out = _out(params, "compress", model, stats, influence, plan)
    return stages.run_compress(params, model, stats, influence, plan, out)


@task(name="evaluate", cache_key_fn=_cache_key("evaluate", "model", "compressed"), persist_result=True)
def evaluate_task(params: Params, model: Manifest, compressed: Manifest) -> Manifest:
    return stages.run_evaluate(params, model, compressed, _out(params, "evaluate", model, compressed))


STAGE_TASKS = {
    "slimset": slimset_task,
    "influence": influence_task,
    "plan": plan_task,
    "compress": compress_task,
    "evaluate": evaluate_task,
}
