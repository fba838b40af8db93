"""Scheduled recompression: watch a model source for new releases and run the pipeline on each.

Release sources:

* a folder of releases, local or any fsspec URL (``s3://bucket/releases``): every sub-folder
  holding a diffusers pipeline is a release; its revision is its content digest (offline and
  air-gapped use);
* a Hugging Face repo id: the revision is the commit hash of ``main``; queried only when online
  (``HF_HUB_OFFLINE`` unset), the snapshot must then be fetched into the local cache by the
  operator's own process (this project never downloads weights at run time).

A release whose digest is already registered (tag ``source_digest`` on any version of the target
registered model) is skipped, so a check that finds nothing new does nothing. A registry that
cannot be read (an unreachable tracking server, after MLflow's own retries) stops the check with a
:class:`~tasks.tracking.TrackingUnavailableError` before anything runs: it is never read as
"nothing registered", which would recompress every release.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import fsspec
from mlflow import MlflowClient
from prefect import flow, get_run_logger

from flows.pipeline import slimdiff_flow
from slimdiff.config import Params
from slimdiff.formats.models import resolve_release
from tasks.stages import NoBudgetPassesError
from tasks.tracking import registered_model_name, setup_tracking, tracking_call

log = logging.getLogger(__name__)


def list_folder_releases(releases: str, cache_dir: Path) -> list[Path]:
    """Local paths of the release folders under ``releases`` (remote ones are copied into cache_dir)."""
    fs, root = fsspec.core.url_to_fs(releases)
    if not fs.exists(root):
        raise FileNotFoundError(f"release source {releases} does not exist")
    found = []
    for entry in sorted(fs.ls(root, detail=False)):
        name = entry.rstrip("/").split("/")[-1]
        if name.startswith(".") or not fs.isdir(entry) or not fs.exists(f"{entry}/model_index.json"):
            continue
        if fs.protocol in ("file", ("file", "local")) or isinstance(
            fs, fsspec.implementations.local.LocalFileSystem
        ):
            found.append(Path(entry))
        else:
            local = cache_dir / name
            if not (local / "model_index.json").exists():
                fs.get(entry.rstrip("/") + "/", str(local) + "/", recursive=True)
            found.append(local)
    return found


def registered_source_digests(client: MlflowClient, name: str) -> set[str]:
    """Source digests already compressed into ``name``. A model not registered yet has none; a
    registry that cannot be read raises (TrackingUnavailableError when unreachable)."""
    from mlflow.exceptions import MlflowException

    try:
        with tracking_call(client.tracking_uri, f"reading the versions of {name!r}"):
            versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")):
            return set()
        raise
    return {v.tags.get("source_digest") for v in versions if v.tags.get("source_digest")}


@flow(name="slimdiff-release-check", log_prints=True)
def check_releases(
    releases: str, params: dict[str, Any] | None = None, kind: str = "folder"
) -> dict[str, Any]:
    """Run the pipeline on every release in ``releases`` (kind "folder": a folder of releases;
    kind "hub": a Hugging Face repo id) that is not registered yet."""
    if kind not in ("folder", "hub"):
        raise ValueError(f"kind must be 'folder' or 'hub', got {kind!r}")
    logger = get_run_logger()
    base = Params.from_dict(params or {}, source="deployment parameters")
    setup_tracking(base)  # TrackingUnavailableError (one line) when the server cannot be reached
    client = MlflowClient()
    cache_dir = Path(base.tracking.artifact_root) / "releases-cache"
    if kind == "hub":
        candidates = _hub_release(releases)
    else:
        candidates = [(str(p), None) for p in list_folder_releases(releases, cache_dir)]
    report: dict[str, Any] = {"checked": [], "ran": [], "skipped": [], "no_passing_budget": []}
    for source, revision in candidates:
        release = resolve_release(source, revision)
        name = registered_model_name(base, release.short_name if release.kind == "hub" else _family(releases))
        report["checked"].append(source)
        if release.digest in registered_source_digests(client, name):
            logger.info("release %s (%s) already compressed: skipped", source, release.digest[:12])
            report["skipped"].append(source)
            continue
        overrides = {"model.source": source, "tracking.registered_model": name}
        if release.kind == "hub":
            overrides["model.revision"] = release.revision
        cfg = base.with_overrides(overrides)
        logger.info("new release %s (%s): running the pipeline", source, release.digest[:12])
        try:
            result = slimdiff_flow(params=cfg.model_dump(mode="json"), trigger="scheduled")
        except NoBudgetPassesError as err:  # a budget search with no passing point: nothing registered
            logger.warning("release %s: %s", source, err)
            report["no_passing_budget"].append({"source": source, "message": str(err)})
            continue
        report["ran"].append(
            {"source": source, "registered": result["registered"], "summary": result["summary"]}
        )
    return report


def _family(releases: str) -> str:
    """Registered-model family name of a release folder: its own folder name."""
    return releases.rstrip("/").split("/")[-1].replace("_", "-").lower() or "releases"


def _hub_release(repo_id: str) -> list[tuple[str, str | None]]:
    """The hub repo's current commit (queried only when online). Its snapshot must be in the local
    HF cache: resolve_release names the missing snapshot and how to fetch it otherwise."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        log.warning("HF_HUB_OFFLINE is set: not querying %s for new releases", repo_id)
        return []
    from huggingface_hub import HfApi

    return [(repo_id, HfApi().model_info(repo_id).sha)]


def serve(
    releases: str, cron: str, params: Params, kind: str = "folder", name: str = "slimdiff-scheduled"
) -> None:
    """Serve the release check on a cron schedule (blocks; Ctrl-C stops)."""
    check_releases.serve(
        name=name,
        cron=cron,
        parameters={"releases": releases, "params": params.model_dump(mode="json"), "kind": kind},
    )
