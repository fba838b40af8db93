"""Lineage audit of a registered model: the chain of artifacts that produced it, and their digests.

Source model -> SlimSet -> covariance store -> influence -> rank plan -> compressed weights ->
evaluation, each with its URI, recorded digest, MLflow run, DVC path and git commit. ``verify``
recomputes every digest it can reach and names the first broken link.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from tasks.artifacts import ARTIFACT_NAMES, ArtifactError, content_digest

# link name -> (uri tag, digest tag, DVC output path of the same stage in dvc.yaml)
CHAIN = (
    ("source_model", "source_model", "source_digest", "data/toy/pipeline"),
    ("slimset", "slimset_uri", "slimset_digest", "data/slimset"),
    ("covariance_store", "stats_uri", "stats_digest", "artifacts/dvc/stats.zarr"),
    ("influence", "influence_uri", "influence_digest", "data/influence"),
    ("rank_plan", "plan_uri", "plan_digest", "data/plan"),
    ("compressed_weights", "compressed_uri", "compressed_digest", "artifacts/dvc/compressed"),
    ("evaluation", "eval_uri", "eval_digest", "artifacts/dvc/eval"),
)


@dataclass
class Link:
    name: str
    uri: str | None
    digest: str | None
    dvc_path: str
    details: dict[str, Any] = field(default_factory=dict)
    verified: bool | None = None  # None = not checked
    problem: str | None = None
    repair: str | None = None  # what `slimdiff repair` recomputes for a broken link


@dataclass
class Lineage:
    model: str
    version: str
    run_id: str | None
    git_commit: str | None
    params_digest: str | None
    aliases: list[str]
    gate_passed: str | None
    links: list[Link]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def first_broken(self) -> Link | None:
        return next((link for link in self.links if link.verified is False), None)


def _details(name: str, uri: str | None, tags: dict[str, str]) -> dict[str, Any]:
    """Small human facts about a link, read from the artifact when it is reachable."""
    out: dict[str, Any] = {}
    if uri is None:
        return out
    p = Path(uri)
    try:
        if name == "source_model":
            out["revision"] = tags.get("source_revision")
        elif name == "slimset" and (p / "slimset.json").is_file():
            data = json.loads((p / "slimset.json").read_text())
            out.update({k: data.get(k) for k in ("pool_digest", "embedder_id", "seed", "n")})
        elif name == "covariance_store":
            from tasks.store import CovarianceStore

            store = CovarianceStore.open(uri)
            meta = store.attrs.get("stats_meta", {})
            out["timesteps"] = meta.get("bucket_timesteps") or meta.get("timesteps")
            out["n_shards"] = store.n_shards
            totals = {k: int(sum(v)) for k, v in store.attrs.get("token_counts", {}).items()}
            out["tokens_total"] = sum(totals.values())
        elif name == "rank_plan" and (p / "rank_plan.json").is_file():
            data = json.loads((p / "rank_plan.json").read_text())
            out["inputs"] = data.get("inputs")
        elif name == "evaluation" and (p / "metrics.json").is_file():
            out["summary"] = json.loads((p / "metrics.json").read_text()).get("summary")
    except (OSError, ValueError, ArtifactError) as err:
        out["unreadable"] = str(err)
    return out


def get_lineage(ref: str) -> Lineage:
    from tasks.tracking import resolve_version

    client = MlflowClient()
    version = resolve_version(client, ref)
    tags = dict(version.tags)
    links = []
    for name, uri_tag, digest_tag, dvc_path in CHAIN:
        uri = tags.get(uri_tag)
        links.append(Link(name, uri, tags.get(digest_tag), dvc_path, _details(name, uri, tags)))
    return Lineage(
        model=version.name,
        version=str(version.version),
        run_id=version.run_id,
        git_commit=tags.get("git_commit"),
        params_digest=tags.get("params_digest"),
        aliases=list(getattr(version, "aliases", []) or []),
        gate_passed=tags.get("gate_passed"),
        links=links,
    )


def _recompute(link: Link) -> str:
    if link.name == "source_model":
        from slimdiff.formats.models import resolve_release

        return resolve_release(link.uri).digest
    if link.name == "covariance_store":
        from tasks.store import CovarianceStore

        store = CovarianceStore.open(link.uri)
        store.verify()  # every byte of the totals (and unmerged shards) against its recorded digest
        return store.digest
    return content_digest(link.uri)


_STAGE_OF = {artifact: stage for stage, artifact in ARTIFACT_NAMES.items()}


def verify_lineage(lineage: Lineage) -> Lineage:
    """Recompute every reachable digest in chain order; mark each link verified or broken (and,
    for a stage output, what `slimdiff repair` recomputes: the stage, or only the damaged shards)."""
    for link in lineage.links:
        stage = _STAGE_OF.get(link.name)
        if link.uri is None or link.digest is None:
            link.verified, link.problem = False, "not recorded in the registry tags"
            continue
        try:
            actual = _recompute(link)
        except (ArtifactError, OSError, ValueError) as err:
            link.verified, link.problem = False, f"unreadable or missing: {str(err).splitlines()[0]}"
            if stage:
                link.repair = getattr(err, "repair", None) or f"the {stage} stage"
            continue
        link.verified = actual == link.digest
        if not link.verified:
            link.problem = f"changed after registration (digest {actual[:12]} != recorded {link.digest[:12]})"
            if stage:
                link.repair = f"the {stage} stage"
    return lineage


def format_lineage(lineage: Lineage) -> str:
    lines = [
        f"{lineage.model} version {lineage.version}"
        + (f" (aliases: {', '.join(lineage.aliases)})" if lineage.aliases else "")
        + f"  gate_passed={lineage.gate_passed}",
        f"  mlflow run {lineage.run_id}  git {lineage.git_commit}  params {str(lineage.params_digest)[:12]}",
    ]
    for i, link in enumerate(lineage.links):
        mark = {True: "ok ", False: "BROKEN", None: ""}[link.verified]
        arrow = "   " if i == 0 else "-> "
        lines.append(
            f"{arrow}{link.name:<19} {str(link.digest)[:12]:<12} {mark:<6} {link.uri}  (dvc: {link.dvc_path})"
        )
        for k, v in link.details.items():
            if v is not None:
                lines.append(f"      {k}: {v}")
        if link.problem:
            lines.append(f"      problem: {link.problem}")
    return "\n".join(lines)
