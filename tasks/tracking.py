"""MLflow: one run per flow run, and the Model Registry entry of each compressed model with lineage.

Default store: ``sqlite:///mlflow.db`` plus ``mlartifacts/`` in the working directory; any tracking
URI (an MLflow server, ``databricks``, ...) from ``tracking.tracking_uri`` or ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient

from slimdiff.config import Params

log = logging.getLogger(__name__)

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
    if mlflow.get_experiment_by_name(name) is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(name, artifact_location=artifact_location)
    mlflow.set_experiment(name)
    return uri


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


class SlimDiffPipelineModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper so the registry can serve the model: predict(prompts) -> images (uint8 arrays).

    For Python use, :func:`load_registered_pipeline` returns the diffusers pipeline itself."""

    def load_context(self, context) -> None:
        from slimdiff.io import load_compressed

        self.pipeline = load_compressed(context.artifacts["pipeline"])

    def predict(self, context, model_input, params: dict | None = None):
        import numpy as np

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        out = self.pipeline(prompts, output_type="np", **(params or {}))
        return [np.asarray(img * 255).round().astype("uint8") for img in out.images]


def find_version_by_digest(client: MlflowClient, name: str, compressed_digest: str):
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for v in versions:
        if v.tags.get("compressed_digest") == compressed_digest:
            return v
    return None


def register_compressed(
    params: Params,
    *,
    source_short_name: str,
    pipeline_dir: Path,
    lineage: dict[str, str],
    gate_passed: bool,
    gate_reasons: list[str],
) -> dict[str, Any]:
    """Register the compressed pipeline (once per content digest) with lineage tags; move the alias
    to it only when it passed the quality gate. Must be called inside an active MLflow run."""
    client = MlflowClient()
    name = registered_model_name(params, source_short_name)
    existing = find_version_by_digest(client, name, lineage["compressed_digest"])
    if existing is not None:
        version = existing.version
        newly = False
        log.info("%s: compressed model already registered as version %s", name, version)
    else:
        info = mlflow.pyfunc.log_model(
            name="compressed_pipeline",
            python_model=SlimDiffPipelineModel(),
            artifacts={"pipeline": str(pipeline_dir)},
            pip_requirements=["slimdiff-pipeline"],  # skips slow dependency inference
            registered_model_name=name,
        )
        version = str(info.registered_model_version)
        newly = True
    for key, value in lineage.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_model_version_tag(name, version, "gate_passed", str(gate_passed).lower())
    client.set_model_version_tag(name, version, "gate_reasons", "; ".join(gate_reasons) or "-")
    alias = params.tracking.alias
    if gate_passed:
        client.set_registered_model_alias(name, alias, version)
    return {
        "name": name,
        "version": str(version),
        "new_version": newly,
        "alias": alias if gate_passed else None,
    }


def load_registered_pipeline(ref: str, params: Params | None = None):
    """One call from a registry reference ("name@alias", "name/3" or "name") to a diffusers pipeline."""
    from slimdiff.io import load_compressed

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
