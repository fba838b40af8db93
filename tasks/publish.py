"""A registered compressed model as a folder someone can publish, and the push to the Hub.

``publish_folder(ref)`` assembles, from the registered version's lineage tags (nothing is
recomputed): the compressed pipeline (hard links where the file system allows, else copies), a
model card ``README.md`` with the Hub's front matter (``slimdiff.formats.modelcard``), the comparison grid,
the evaluation metrics and the exact params of the run (``slimdiff_params.yaml``, so the card's
reproduce command is literal). ``push(ref, repo_id)`` uploads that folder with
``huggingface_hub`` (the one network call; tests stop right before it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from slimdiff.config import Params

log = logging.getLogger(__name__)

PARAMS_FILE = "slimdiff_params.yaml"


def _link_tree(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)  # large weights are not duplicated on the same file system
        except OSError:
            shutil.copy2(path, target)


def publish_folder(ref: str, params: Params, run_params: Params | None = None) -> Path:
    """The publishable folder of registered version ``ref`` under ``<artifact_root>/publish/``
    (rebuilt when it exists: the card follows the registry). Raises LookupError for unknown refs."""
    from mlflow import MlflowClient

    from slimdiff.families.units import adapter_for, denoiser_of
    from slimdiff.formats.modelcard import CardInfo, model_card, source_license
    from slimdiff.formats.models import load_pipeline
    from slimdiff.planning.plan import RankPlan
    from tasks.stages import PLAN_FILE
    from tasks.tracking import resolve_version

    version = resolve_version(MlflowClient(), ref)
    tags = dict(version.tags)
    missing = [k for k in ("compressed_uri", "eval_uri", "plan_uri", "compressed_digest") if k not in tags]
    if missing:
        raise LookupError(f"{ref}: version {version.version} lacks the lineage tags {missing}")
    out = Path(params.tracking.artifact_root) / "publish" / tags["compressed_digest"][:16]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _link_tree(Path(tags["compressed_uri"]) / "pipeline", tmp)
    eval_dir = Path(tags["eval_uri"])
    metrics = (
        json.loads((eval_dir / "metrics.json").read_text()) if (eval_dir / "metrics.json").is_file() else {}
    )
    grids = sorted(eval_dir.glob("grid_*.png"))
    if grids:
        shutil.copy2(grids[0], tmp / "grid.png")
    if metrics:
        (tmp / "slimdiff_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    command = "slimdiff run --params params.yaml"
    if run_params is not None:
        (tmp / PARAMS_FILE).write_text(yaml.safe_dump(run_params.model_dump(mode="json"), sort_keys=False))
        command = f"slimdiff run --params {PARAMS_FILE}"
    pipe = load_pipeline(str(tmp))
    source = tags.get("source_model", "?")
    info = CardInfo(
        source=source,
        source_revision=tags.get("source_revision", "?"),
        family=adapter_for(denoiser_of(pipe)).family,
        pipeline_class=type(pipe).__name__,
        plan=RankPlan.load(Path(tags["plan_uri"]) / PLAN_FILE),
        slimset_digest=tags.get("slimset_digest", "?"),
        stats_digest=tags.get("stats_digest", "?"),
        compressed_digest=tags["compressed_digest"],
        plan_artifact_digest=tags.get("plan_digest"),
        metrics=metrics,
        command=command,
        grid="grid.png" if grids else None,
        license=source_license(source) if Path(source).is_dir() else None,
        base_model=source if "/" in source and not Path(source).exists() else None,
        git_commit=tags.get("git_commit"),
    )
    (tmp / "README.md").write_text(model_card(info))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def push(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload ``folder`` to the Hub model repo ``repo_id`` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=f"slimdiff: compressed model {folder.name}",
    )
    return str(getattr(info, "commit_url", info))
