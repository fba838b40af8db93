"""MLflow: one run per flow run, and the Model Registry entry of each compressed model with lineage.

Default store: ``sqlite:///mlflow.db`` plus ``mlartifacts/`` in the working directory; any tracking
URI (an MLflow server, ``databricks``, ...) from ``tracking.tracking_uri`` or ``MLFLOW_TRACKING_URI``.

Reliability (docs/reliability.md): registration is idempotent (one version per compressed-model
digest: a file lock per digest in the workspace, the digest tag set when the version is created,
and a duplicate created by another workspace meanwhile removed again); which runs may move the
alias is ``tracking.alias_policy`` (:func:`alias_for`); every run records its host and process, so
that the next run marks a run whose process was killed ``KILLED`` (:func:`end_orphaned_runs`); an
unreachable tracking server is a :class:`TrackingUnavailableError`, never an empty registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from slimdiff.config import Params, TrackingParams
from tasks.artifacts import stage_lock

log = logging.getLogger(__name__)

# what started a flow run; decides which alias a registered version may move (alias_for)
TRIGGERS = ("committed", "scheduled", "experiment", "repair")


class TrackingUnavailableError(RuntimeError):
    """The tracking server (or its model registry) cannot be reached, after MLflow's own retries."""


def _unreachable(err: BaseException) -> bool:
    import requests

    seen: BaseException | None = err
    for _ in range(8):  # the requests error is the cause/context of MLflow's exception
        if seen is None:
            return False
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def tracking_call(uri: str, what: str) -> Iterator[None]:
    """Turn "cannot reach the tracking server" into one clear TrackingUnavailableError."""
    try:
        yield
    except MlflowException as err:
        if not _unreachable(err):
            raise
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
        raise TrackingUnavailableError(
            f"tracking server {uri} is unreachable ({what}; MLflow retried {retries} times, see "
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES): nothing was run or registered; check the server, or "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI"
        ) from None


# lineage tags on every registered version (and on the run)
LINEAGE_TAGS = (
    "source_model",
    "source_revision",
    "source_digest",
    "slimset_digest",
    "slimset_uri",
    "stats_digest",
    "stats_uri",
    "influence_digest",
    "influence_uri",
    "plan_digest",
    "plan_uri",
    "compressed_digest",
    "compressed_uri",
    "eval_digest",
    "eval_uri",
    "params_digest",
    "git_commit",
)


def resolve_tracking_uri(params: Params, workdir: Path | None = None) -> str:
    if params.tracking.tracking_uri:
        return params.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(workdir or Path.cwd()).resolve() / 'mlflow.db'}"


def setup_tracking(params: Params, workdir: Path | None = None) -> str:
    """Point MLflow at the configured store and make sure the experiment exists."""
    uri = resolve_tracking_uri(params, workdir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = params.tracking.experiment
    # Two runs touching a fresh SQLite store at once both run its schema migrations (one fails)
    # and both create the experiment: the first touch is serialised by a lock next to the file.
    first_touch = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        from tasks.artifacts import lock_path

        db = Path(uri[len("sqlite:///") :])
        first_touch = stage_lock(
            lock_path(db), timeout=params.integrity.lock_timeout_s, what=f"MLflow store {db}"
        )
    with first_touch, tracking_call(uri, f"opening experiment {name!r}"):
        if mlflow.get_experiment_by_name(name) is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):
                artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
            mlflow.create_experiment(name, artifact_location=artifact_location)
        mlflow.set_experiment(name)
    return uri


# -- runs killed before they could end themselves -------------------------------------------------
def process_tags() -> dict[str, str]:
    """Who runs this MLflow run: host, pid and the process's start time (pids are reused)."""
    import psutil

    return {
        "slimdiff.host": socket.gethostname(),
        "slimdiff.pid": str(os.getpid()),
        "slimdiff.pid_started": f"{psutil.Process().create_time():.3f}",
    }


def process_alive(pid: int, started: float) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``started``."""
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # someone else's live process: not ours to judge


def end_orphaned_runs(params: Params) -> list[str]:
    """Mark ``KILLED`` every RUNNING run of the experiment whose process on this host is gone
    (killed before it could end its run); returns their run ids. Runs started on other hosts
    are left alone: their liveness cannot be checked from here."""
    client = MlflowClient()
    uri = mlflow.get_tracking_uri()
    with tracking_call(uri, "looking for runs left RUNNING by killed runs"):
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        if experiment is None:
            return []
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
        host, ended = socket.gethostname(), []
        for run in runs:
            tags = run.data.tags
            if tags.get("slimdiff.host") != host or "slimdiff.pid" not in tags:
                continue
            if process_alive(int(tags["slimdiff.pid"]), float(tags.get("slimdiff.pid_started", 0))):
                continue
            client.set_tag(run.info.run_id, "slimdiff.ended_by", f"orphan check of pid {os.getpid()}")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    for run_id in ended:
        log.warning("MLflow run %s was left RUNNING by a killed process: marked KILLED", run_id)
    return ended


def registered_model_name(params: Params, source_short_name: str) -> str:
    return params.tracking.registered_model or f"slimdiff-{source_short_name}"


def git_commit(cwd: Path | None = None) -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=cwd
    )
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# The registry's pyfunc: logged with MLflow's models-from-code (the model class is the source file,
# copied into the model and run at load time), so a registered version holds no pickle, nothing that
# runs code on unpickling; the compressed pipeline is a plain artifact folder next to it.
PYFUNC_MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


# The pyfunc's contract (tasks/pyfunc_model.py): a string column "prompt" in, uint8 images
# (N, H, W, 3) out, optional sampler params (None: the pipeline's own default).
PYFUNC_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt")]),
    outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3), "images")]),
    params=ParamSchema(
        [
            ParamSpec("num_inference_steps", "long", None),
            ParamSpec("guidance_scale", "double", None),
            ParamSpec("seed", "long", None),
        ]
    ),
)

# MLflow's warning for a model logged with a signature but no input example (ANSI colour first)
_NO_INPUT_EXAMPLE = r".*An input example was not provided when logging the model"


def versions_with_digest(client: MlflowClient, name: str, compressed_digest: str) -> list:
    """Every version of ``name`` tagged with this compressed-model digest, oldest first. A model
    that is not registered yet has none; any other registry error is raised, never read as none."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")):
            return []
        raise
    found = [v for v in versions if v.tags.get("compressed_digest") == compressed_digest]
    return sorted(found, key=lambda v: int(v.version))


def find_version_by_digest(client: MlflowClient, name: str, compressed_digest: str):
    found = versions_with_digest(client, name, compressed_digest)
    return found[0] if found else None


def alias_for(tracking: TrackingParams, trigger: str, gate_passed: bool) -> str | None:
    """The alias a registered version moves, by ``tracking.alias_policy`` (docs/reliability.md):
    only versions that pass the gate move any; ``alias`` (champion) moves for the runs the policy
    names, ``candidate_alias`` for every other run; repairs move neither."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    if not gate_passed or trigger == "repair":
        return None
    moves_main = {
        "committed": trigger in ("committed", "scheduled"),
        "scheduled": trigger == "scheduled",
        "any": True,
        "never": False,
    }[tracking.alias_policy]
    return tracking.alias if moves_main else tracking.candidate_alias


def register_compressed(
    params: Params,
    *,
    source_short_name: str,
    pipeline_dir: Path,
    lineage: dict[str, str],
    gate_passed: bool,
    gate_reasons: list[str],
    trigger: str = "experiment",
    refresh_tags: Iterable[str] = (),
) -> dict[str, Any]:
    """Register the compressed pipeline once per content digest, with its lineage tags set when the
    version is created; move the alias :func:`alias_for` names. An existing version keeps the
    lineage it was registered with: only tags it lacks, and ``refresh_tags`` (links this run
    recomputed after they failed verification), are updated. Must be called inside an active run."""
    client = MlflowClient()
    name = registered_model_name(params, source_short_name)
    digest = lineage["compressed_digest"]
    tags = {
        **{k: str(v) for k, v in lineage.items()},
        "gate_passed": str(gate_passed).lower(),
        "gate_reasons": "; ".join(gate_reasons) or "-",
        "trigger": trigger,
    }
    lock = (
        Path(params.tracking.artifact_root)
        / ".locks"
        / f"register-{hashlib.sha256(f'{name}/{digest}'.encode()).hexdigest()[:16]}.lock"
    )
    with stage_lock(lock, timeout=params.integrity.lock_timeout_s, what=f"registration of {name}"):
        existing = find_version_by_digest(client, name, digest)
        if existing is not None:
            version, newly = str(existing.version), False
            log.info("%s: compressed model already registered as version %s", name, version)
            refresh = set(refresh_tags)
            for key, value in tags.items():
                if key != "trigger" and (key not in existing.tags or key in refresh):
                    client.set_model_version_tag(name, version, key, value)
        else:
            with warnings.catch_warnings():
                # the explicit signature is the contract: an input example would make MLflow load
                # and run the diffusion pipeline at every registration to validate it
                warnings.filterwarnings("ignore", message=_NO_INPUT_EXAMPLE, category=UserWarning)
                info = mlflow.pyfunc.log_model(
                    name="compressed_pipeline",
                    python_model=str(PYFUNC_MODEL_CODE),  # models-from-code: no pickled object
                    artifacts={"pipeline": str(pipeline_dir)},
                    signature=PYFUNC_SIGNATURE,
                    pip_requirements=["slimdiff-pipeline"],  # skips slow dependency inference
                )
            version, newly = str(mlflow.register_model(info.model_uri, name, tags=tags).version), True
            # another workspace (which does not share this lock) may have registered the same
            # digest meanwhile: the oldest version stays, a younger duplicate is removed again
            oldest = find_version_by_digest(client, name, digest)
            if oldest is not None and str(oldest.version) != version:
                log.warning(
                    "%s: digest %s was registered meanwhile as version %s; removing version %s",
                    name,
                    digest[:12],
                    oldest.version,
                    version,
                )
                client.delete_model_version(name, version)
                version, newly = str(oldest.version), False
        alias = alias_for(params.tracking, trigger, gate_passed)
        if alias:
            client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "new_version": newly, "alias": alias}


def load_registered_pipeline(ref: str, params: Params | None = None):
    """One call from a registry reference ("name@alias", "name/3" or "name") to a diffusers pipeline."""
    from slimdiff.formats.io import load_compressed

    # default params: $MLFLOW_TRACKING_URI or ./mlflow.db, as `slimdiff run` uses
    setup_tracking(params if params is not None else Params())
    uri = model_uri(ref)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    return load_compressed(local / "artifacts" / "pipeline")


def model_uri(ref: str) -> str:
    if ref.startswith("models:/"):
        return ref
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return f"models:/{name}@{alias}"
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return f"models:/{name}/{version}"
    return f"models:/{ref}/latest"


def resolve_version(client: MlflowClient, ref: str):
    """The ModelVersion for "name@alias", "name/3" or "name" (latest)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name='{ref}'")
    if not versions:
        raise LookupError(f"no registered model named {ref!r}")
    return max(versions, key=lambda v: int(v.version))


def registered_metrics(ref: str) -> dict[str, Any]:
    """The evaluation metrics.json of a registered version (from its run's logged artifacts)."""
    import json

    client = MlflowClient()
    version = resolve_version(client, ref)
    local = mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path="stages/evaluate/metrics.json"
    )
    return json.loads(Path(local).read_text())
