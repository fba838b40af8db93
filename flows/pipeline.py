"""The SlimDiff flow: SlimSet -> statistics -> influence -> rank plan -> compress -> evaluate -> register.

Each stage is a cached Prefect task (see :mod:`tasks.prefect_tasks`); a rerun recomputes only what
is downstream of what changed. One MLflow run records the flow run: flattened params, which stages
ran and which were cached, the metrics, every stage's plots and files, and the registered model.

Before any stage runs, the params that need no model are checked (:mod:`tasks.preflight`) and runs
left RUNNING by killed processes are marked KILLED. A cache hit is used only after it passes
verification; one that fails is reported, recomputed and shown as ``repaired``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from slimdiff.config import Params
from tasks import stages
from tasks.artifacts import ARTIFACT_NAMES, Manifest, stage_lock
from tasks.prefect_tasks import (
    STAGE_TASKS,
    StageResult,
    calibrate_finalize_task,
    calibrate_prepare_task,
    calibrate_shard_task,
    check_cached,
)
from tasks.tracking import (
    TRIGGERS,
    end_orphaned_runs,
    git_commit,
    process_tags,
    register_compressed,
    setup_tracking,
)

log = logging.getLogger(__name__)

STAGE_ORDER = ("slimset", "calibrate", "influence", "plan", "compress", "evaluate", "register")

# registry tags that describe each stage's output: refreshed on an existing version when this run
# recomputed that output after it failed verification
STAGE_TAGS = {
    "slimset": ("slimset_digest", "slimset_uri"),
    "calibrate": ("stats_digest", "stats_uri"),
    "influence": ("influence_digest", "influence_uri"),
    "plan": ("plan_digest", "plan_uri"),
    "compress": ("compressed_digest", "compressed_uri"),
    "evaluate": ("eval_digest", "eval_uri", "gate_passed", "gate_reasons"),
}


@dataclass
class FlowResult:
    manifests: dict[str, Manifest] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "cached" | "repaired"
    repaired: dict[str, str] = field(default_factory=dict)  # stage -> what failed verification
    seconds: dict[str, float] = field(default_factory=dict)
    registered: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    report: str | None = None
    points: list[dict[str, Any]] = field(default_factory=list)  # budget search: one per budget value

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "repaired": self.repaired,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "registered": self.registered,
            "summary": self.metrics.get("summary", {}),
            "mlflow_run_id": self.mlflow_run_id,
            "report": self.report,
            "manifests": {k: {"uri": m.uri, "digest": m.digest} for k, m in self.manifests.items()},
            "points": self.points,  # last: CLI readers find the document by its leading "status"
        }


def _run_stage(result: FlowResult, stage: str, params: Params, *inputs: Manifest) -> Manifest:
    logger = get_run_logger()
    task = STAGE_TASKS[stage]
    t0 = time.perf_counter()
    state = task(params, *inputs, return_state=True)
    outcome: StageResult = state.result()  # raises the stage's own error: the flow stops at this stage
    if state.name == "Cached":
        # verified before use: small outputs by digest, large ones per integrity.verify_large
        problem = check_cached(params, outcome.manifest)
        if problem is None:
            outcome = StageResult(outcome.manifest, "reused")
        else:  # the task body re-checks under the stage lock, quarantines the damaged copy, recomputes
            state = task.with_options(refresh_cache=True)(params, *inputs, return_state=True)
            outcome = state.result()
    manifest = outcome.manifest
    result.manifests[stage] = manifest
    result.status[stage] = {"ran": "ran", "reused": "cached", "repaired": "repaired"}[outcome.outcome]
    if outcome.problem:
        result.repaired[stage] = outcome.problem
        logger.warning(
            "%s (stage %s) failed verification (%s): recomputed",
            ARTIFACT_NAMES[stage],
            stage,
            outcome.problem,
        )
    result.seconds[stage] = time.perf_counter() - t0
    logger.info("%-9s %-8s %5.1fs  %s", stage, result.status[stage], result.seconds[stage], manifest.uri)
    return manifest


def _calibrate(result: FlowResult, params: Params, model: Manifest, slimset: Manifest) -> Manifest:
    """Calibration as one task per prompt shard: sequential here, spread over workers with Dask."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    store_uri = stages.store_uri_for(params, stages.stage_key("calibrate", params, model, slimset))
    # one writer per store: a second run waits here, then finds the store complete (and verified)
    with stage_lock(
        stages.store_lock_path(params, store_uri),
        timeout=params.integrity.lock_timeout_s,
        what=f"covariance_store (stage calibrate) {store_uri}",
    ):
        job = calibrate_prepare_task(params, model, slimset)
        if job.missing:
            logger.info("calibrate: %d of %d shards to collect", len(job.missing), job.n_shards)
            futures = calibrate_shard_task.map(
                unmapped(params),
                unmapped(model),
                unmapped(slimset),
                unmapped(job.store_uri),
                list(job.missing),
            )
            # merge each shard into the running totals as it completes (in index order), so the store
            # holds the totals plus the shards in flight, never one copy per shard
            try:
                for future in futures:
                    future.result()  # raises the first shard's error; completed shards stay marked
                    stages.merge_calibration(job.store_uri)
            except BaseException:
                for future in futures:  # let the other shards finish (and mark) before failing
                    future.wait()
                raise
        manifest = calibrate_finalize_task(job, time.perf_counter() - t0 if job.missing else None)
    result.manifests["calibrate"] = manifest
    result.status["calibrate"] = "repaired" if job.repaired else ("ran" if job.missing else "cached")
    if job.repaired:
        problems = {p for _, p in job.repaired}
        result.repaired["calibrate"] = (
            problems.pop()
            if len(problems) == 1 and len(job.repaired) > 1
            else "; ".join(f"shard {i}: {p}" for i, p in job.repaired)
        )
    result.seconds["calibrate"] = time.perf_counter() - t0
    logger.info(
        "%-9s %-6s %5.1fs  %s",
        "calibrate",
        result.status["calibrate"],
        result.seconds["calibrate"],
        manifest.uri,
    )
    return manifest


def _log_folder(folder: str, artifact_path: str) -> None:
    p = Path(folder)
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix in (".json", ".md", ".png", ".csv"):
                mlflow.log_artifact(str(f), artifact_path=artifact_path)


# One worker by default: calibration shards share one in-process model and its hooks. For scale-out
# use with_dask(): shards then run in separate worker processes (one per GPU in production).
@flow(name="slimdiff", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def slimdiff_flow(params: dict[str, Any] | None = None, trigger: str = "experiment") -> dict[str, Any]:
    """Run every stage on ``params`` (a params.yaml mapping; defaults when None).

    ``trigger`` says what started the run and so which alias a passing model may move
    (``tracking.alias_policy``): "committed" (the committed params, no overrides), "scheduled"
    (the release check), "experiment" (anything else) or "repair" (moves no alias)."""
    from tasks.preflight import check_params

    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    cfg = Params.from_dict(params or {}, source="flow parameters")
    check_params(cfg)  # before any stage: nothing has to run to know these params cannot work
    logger = get_run_logger()
    result = FlowResult()
    tracking_uri = setup_tracking(cfg)
    end_orphaned_runs(cfg)
    model = stages.model_manifest(cfg)
    commit = git_commit()
    logger.info("source model %s (revision %s)", model.meta["source"], model.meta["revision"][:12])
    with mlflow.start_run(run_name=f"slimdiff-{model.meta['kind']}-{model.short}") as run:
        try:
            return _run_all(cfg, model, commit, trigger, result, run, tracking_uri)
        except BaseException as err:
            if not isinstance(err, Exception):  # SIGINT, SIGTERM (Terminated, Prefect's TerminationSignal)
                mlflow.end_run("KILLED")
            raise


def _run_all(
    cfg: Params, model: Manifest, commit: str, trigger: str, result: FlowResult, run, tracking_uri: str
) -> dict[str, Any]:
    """The stages, the registration and the report, inside the MLflow run ``slimdiff_flow`` opened."""
    logger = get_run_logger()
    result.mlflow_run_id = run.info.run_id
    mlflow.log_params(cfg.flat())
    mlflow.log_dict(cfg.model_dump(mode="json"), "params.json")  # exact params, for `slimdiff repair`
    mlflow.set_tags(
        {
            "source_model": model.meta["source"],
            "source_revision": model.meta["revision"],
            "git_commit": commit,
            "params_digest": cfg.digest(),
            "trigger": trigger,
            **process_tags(),
        }
    )
    try:
        slimset = _run_stage(result, "slimset", cfg, model)
        stats = _calibrate(result, cfg, model, slimset)
        influence = _run_stage(result, "influence", cfg, model, stats)
        if cfg.search.values:  # one point per budget; the pick rule chooses what is registered
            cfg, plan, compressed, evaluation = _search(cfg, model, slimset, stats, influence, result)
            result.manifests.update(plan=plan, compress=compressed, evaluate=evaluation)
        else:
            plan = _run_stage(result, "plan", cfg, model, influence)
            compressed = _run_stage(result, "compress", cfg, model, stats, influence, plan)
            evaluation = _run_stage(result, "evaluate", cfg, model, compressed)
    finally:
        mlflow.set_tags({f"stage.{k}": v for k, v in result.status.items()})
        mlflow.set_tags({f"repaired.{k}": v[:500] for k, v in result.repaired.items()})
    metrics = json.loads((Path(evaluation.uri) / stages.METRICS_FILE).read_text())
    result.metrics = metrics
    _log_metrics(metrics)
    from tasks.store import CovarianceStore

    calibration_s = CovarianceStore.open(stats.uri).attrs.get("calibration_seconds")
    if calibration_s is not None:  # wall time of the run that collected the statistics
        mlflow.log_metric("calibration_seconds", float(calibration_s))
    for stage, manifest in result.manifests.items():
        if stage != "calibrate":
            _log_folder(manifest.uri, f"stages/{stage}")
    t0 = time.perf_counter()
    lineage = {
        "source_model": model.meta["source"],
        "source_revision": model.meta["revision"],
        "source_digest": model.digest,
        "slimset_digest": slimset.digest,
        "slimset_uri": slimset.uri,
        "stats_digest": stats.digest,
        "stats_uri": stats.uri,
        "influence_digest": influence.digest,
        "influence_uri": influence.uri,
        "plan_digest": plan.digest,
        "plan_uri": plan.uri,
        "compressed_digest": compressed.digest,
        "compressed_uri": compressed.uri,
        "eval_digest": evaluation.digest,
        "eval_uri": evaluation.uri,
        "params_digest": cfg.digest(),
        "git_commit": commit,
    }
    mlflow.set_tags(lineage)
    summary = metrics.get("summary", {})
    from slimdiff.formats.models import ModelRelease

    result.registered = register_compressed(
        cfg,
        source_short_name=ModelRelease(**model.meta).short_name,  # already resolved: no re-hashing
        pipeline_dir=Path(compressed.uri) / "pipeline",
        lineage=lineage,
        gate_passed=bool(summary.get("gate_passed", False)),
        gate_reasons=list(summary.get("gate_reasons", [])),
        trigger=trigger,
        refresh_tags=[tag for stage in result.repaired for tag in STAGE_TAGS.get(stage, ())],
    )
    result.status["register"] = "ran" if result.registered["new_version"] else "cached"
    result.seconds["register"] = time.perf_counter() - t0
    mlflow.set_tag("stage.register", result.status["register"])
    result.report = _write_report(cfg, result, run.info.run_id)
    mlflow.log_artifacts(str(Path(result.report).parent), artifact_path="report")
    mlflow.log_dict(result.to_dict(), "flow_result.json")
    logger.info("tracking: %s  run %s", tracking_uri, result.mlflow_run_id)
    return result.to_dict()


def _point_record(
    value: float, plan: Manifest, compressed: Manifest, evaluation: Manifest, sub: FlowResult
) -> dict:
    metrics = json.loads((Path(evaluation.uri) / stages.METRICS_FILE).read_text())
    return {
        "value": value,
        "status": "ok",
        "stages": dict(sub.status),
        "seconds": {k: round(v, 2) for k, v in sub.seconds.items()},
        **stages.headline_metrics(metrics),
        "plan_digest": plan.digest,
        "compressed_digest": compressed.digest,
        "eval_uri": evaluation.uri,
    }


#: pick rule -> (key of the point to optimise, larger is better)
PICK_RULES = {
    "removed": ("params_removed", True),
    "flops": ("flops", False),
    "latency": ("latency_ms", False),
}


def _search(
    cfg: Params, model: Manifest, slimset: Manifest, stats: Manifest, influence: Manifest, result: FlowResult
) -> tuple[Params, Manifest, Manifest, Manifest]:
    """Plan, compress and evaluate every budget of ``search.values`` in this process (the model,
    statistics, influence and the original's evaluation samples are shared; each point's stages are
    cached under their own keys, so a value added later runs only its point). Every point is an
    MLflow child run; returns the chosen point's (params, plan, compressed, evaluation)."""
    from slimdiff.planning.budget import InfeasibleBudgetError
    from tasks.preflight import check_budget

    logger = get_run_logger()
    chosen_parts: dict[float, tuple] = {}
    for value in cfg.search.values:
        pcfg = cfg.with_overrides({"allocation.budget.value": value})
        try:
            check_budget(pcfg)
        except (stages.StageInputError, InfeasibleBudgetError) as err:
            result.points.append({"value": value, "status": "infeasible", "message": str(err)})
            logger.info("search %g: infeasible (%s)", value, err)
            continue
        sub = FlowResult()
        plan = _run_stage(sub, "plan", pcfg, model, influence)
        compressed = _run_stage(sub, "compress", pcfg, model, stats, influence, plan)
        evaluation = _run_stage(sub, "evaluate", pcfg, model, compressed)
        point = _point_record(value, plan, compressed, evaluation, sub)
        result.points.append(point)
        chosen_parts[value] = (pcfg, plan, compressed, evaluation)
        for stage, status in sub.status.items():  # a stage "ran" if it ran for any point
            if result.status.get(stage) != "ran":
                result.status[stage] = status
            result.seconds[stage] = result.seconds.get(stage, 0.0) + sub.seconds[stage]
        result.repaired.update(sub.repaired)
        with mlflow.start_run(run_name=f"budget-{value:g}", nested=True):
            mlflow.log_params(
                {"allocation.budget.kind": cfg.allocation.budget.kind, "allocation.budget.value": value}
            )
            mlflow.set_tags(
                {
                    "search_point": "true",
                    "source_model": model.meta["source"],
                    "source_revision": model.meta["revision"],
                    "slimset_digest": slimset.digest,
                    "plan_digest": plan.digest,
                    "compressed_digest": compressed.digest,
                    "gate_passed": str(point["gate_passed"]).lower(),
                }
            )
            mlflow.log_metrics(
                {
                    k: float(v)
                    for k, v in point.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
            )
        logger.info(
            "search %g: %s, gate %s (%s)",
            value,
            ", ".join(f"{k} {v}" for k, v in sub.status.items()),
            "passed" if point["gate_passed"] else "FAILED",
            "; ".join(point["gate_reasons"]) or "-",
        )
    ok = [p for p in result.points if p["status"] == "ok"]
    passing = [p for p in ok if p["gate_passed"]]
    mlflow.log_dict({"points": result.points}, "search/points.json")
    if not passing:
        from slimdiff.evaluation.report import plot_pareto

        out = Path(cfg.tracking.artifact_root) / "reports" / mlflow.active_run().info.run_id
        mlflow.log_artifact(str(plot_pareto(result.points, out / "pareto.png")), artifact_path="search")
        if not ok:
            raise stages.NoBudgetPassesError(
                f"search.values {list(cfg.search.values)}: no budget is feasible"
            )
        best = max(ok, key=lambda p: (p.get("exact_match") or 0.0, p.get("psnr_db") or 0.0))
        raise stages.NoBudgetPassesError(
            f"no budget of search.values {list(cfg.search.values)} passes the quality gate; best point: "
            f"{best['value']:g} ({', '.join(best['gate_reasons']) or 'gate failed'}; exact match "
            f"{best.get('exact_match')}, PSNR {best.get('psnr_db')} dB, params kept {best.get('params_kept')}). "
            "Nothing was registered; lower the budget or relax evaluation.gate"
        )
    key, larger = PICK_RULES[cfg.search.pick]
    if any(p.get(key) is None for p in passing):
        raise stages.NoBudgetPassesError(
            f"search.pick {cfg.search.pick!r}: {key} was not measured for every point"
        )
    pick = max(passing, key=lambda p: (p[key] if larger else -p[key], p["value"]))
    pick["chosen"] = True
    logger.info("search: picked budget %g (%s = %s)", pick["value"], key, pick[key])
    return chosen_parts[pick["value"]]


def _write_report(params: Params, result: FlowResult, run_id: str) -> str:
    """One report per flow run (outside the content-addressed stage folders, which stay immutable)."""
    from slimdiff.evaluation.report import plot_pareto, search_table, write_report

    m = result.manifests
    out = Path(params.tracking.artifact_root) / "reports" / run_id
    out.mkdir(parents=True, exist_ok=True)
    pareto = plot_pareto(result.points, out / "pareto.png") if result.points else None
    evaluation = Path(m["evaluate"].uri)
    profiles = Path(m["plan"].uri) / "error_profiles.png"
    path = write_report(
        result.metrics,
        out,
        plan_plot=Path(m["plan"].uri) / "rank_plan.png",
        heatmap=Path(m["influence"].uri) / "influence_heatmap.png",
        error_profiles=profiles if profiles.is_file() else None,  # drawn only by allocation mode "error"
        grids=sorted(str(p) for p in evaluation.glob("grid_*.png")),
        title=f"SlimDiff report: {params.model.source} ({run_id[:8]})",
        pareto=pareto,
        search_table=search_table(result.points) if result.points else None,
    )
    return str(path)


def _log_metrics(metrics: dict[str, Any]) -> None:
    flat: dict[str, float] = {}
    for group in ("original", "compressed", "summary"):
        for k, v in (metrics.get(group) or {}).items():
            if isinstance(v, int | float):  # bool is an int: gate_passed logs as 0/1
                flat[f"{group}.{k}"] = float(v)
    if flat:
        mlflow.log_metrics(flat)


def with_dask(address: str | None = None, n_workers: int = 2):
    """The flow on Prefect's DaskTaskRunner: an existing cluster (``tcp://scheduler:8786``) or, when
    ``address`` is None, a local cluster of ``n_workers`` single-threaded processes. Workers need the
    same PREFECT_API_URL as the flow (one Prefect server for the whole cluster)."""
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True}
        )
    return slimdiff_flow.with_options(task_runner=runner)
