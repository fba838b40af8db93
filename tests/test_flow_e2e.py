"""End-to-end: the Prefect flow on the committed toy model, with Prefect, MLflow and all artifacts in a
temp directory. Shows incremental reruns (only what is downstream of a change recomputes), the
registry entry with lineage, the lineage audit catching tampering, and clean failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slimdiff.config import Params
from slimdiff.models import toy_pipeline_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (toy_pipeline_dir() / "model_index.json").exists(), reason="toy model not committed"
    ),
]

# A small but complete configuration: every stage runs for real, on fewer prompts and steps.
SMALL = {
    "slimset.n": 16,
    "calibration.num_inference_steps": 8,
    "calibration.n_buckets": 4,
    "calibration.batch_size": 8,
    "calibration.shard_size": 8,
    "evaluation.max_prompts": 16,
    "evaluation.num_inference_steps": 8,
    "evaluation.latency_repeats": 2,
    "evaluation.batch_size": 16,
}


@pytest.fixture(scope="module")
def flow_env(tmp_path_factory):
    """Prefect (own home, result storage and temporary server), MLflow and artifacts under tmp."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("flow")
    params = Params().with_overrides(
        {
            **SMALL,
            "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "tracking.artifact_root": str(root / "artifacts"),
        }
    )
    with (
        temporary_settings(
            {
                PREFECT_HOME: str(root / "prefect"),
                PREFECT_LOCAL_STORAGE_PATH: str(root / "prefect" / "storage"),
                PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
            }
        ),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield root, params


def _run(params: Params) -> dict:
    from flows.pipeline import slimdiff_flow

    return slimdiff_flow(params=params.model_dump(mode="json"))


@pytest.fixture(scope="module")
def first_run(flow_env):
    root, params = flow_env
    return _run(params)


def test_first_run_runs_every_stage_and_registers_with_lineage(flow_env, first_run):
    root, params = flow_env
    assert set(first_run["status"].values()) == {"ran"}
    assert list(first_run["status"]) == [
        "slimset",
        "calibrate",
        "influence",
        "plan",
        "compress",
        "evaluate",
        "register",
    ]
    reg = first_run["registered"]
    assert reg["name"] == "slimdiff-toy" and reg["version"] == "1" and reg["new_version"]

    from mlflow import MlflowClient

    from tasks.tracking import setup_tracking

    setup_tracking(params)
    version = MlflowClient().get_model_version("slimdiff-toy", "1")
    for tag in (
        "source_digest",
        "slimset_digest",
        "stats_digest",
        "plan_digest",
        "compressed_digest",
        "git_commit",
    ):
        assert version.tags.get(tag), tag
    assert version.tags["compressed_digest"] == first_run["manifests"]["compress"]["digest"]
    metrics = json.loads((Path(first_run["manifests"]["evaluate"]["uri"]) / "metrics.json").read_text())
    assert metrics["compressed"]["unet_params"] < metrics["original"]["unet_params"]
    # the default allocation is error-driven: the plan records what it predicted, from the
    # influence stage's profiles, and the run report shows the curves with the plan's cuts
    plan = json.loads((Path(first_run["manifests"]["plan"]["uri"]) / "rank_plan.json").read_text())
    profiles = json.loads(
        (Path(first_run["manifests"]["influence"]["uri"]) / "error_profiles.json").read_text()
    )
    assert plan["mode"] == "error" and plan["profiles_digest"]
    for name, unit in plan["units"].items():
        assert unit["predicted_error"] == profiles[name][unit["rank"]], name
    report = Path(first_run["report"])
    assert "error_profiles.png" in report.read_text() and (report.parent / "error_profiles.png").is_file()


def test_registered_model_loads_back_in_one_call(flow_env, first_run):
    import torch

    from slimdiff.models import load_pipeline
    from tasks.tracking import load_registered_pipeline

    root, params = flow_env
    pipe = load_registered_pipeline("slimdiff-toy/1", params)
    local = load_pipeline(str(Path(first_run["manifests"]["compress"]["uri"]) / "pipeline"))
    kw = {"num_inference_steps": 4, "output_type": "np", "guidance_scale": 4.0}
    a = pipe("a red circle on the left", generator=torch.Generator().manual_seed(0), **kw).images
    b = local("a red circle on the left", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == b.shape and (a == b).all()


def test_rerun_with_nothing_changed_recomputes_nothing(flow_env, first_run):
    root, params = flow_env
    again = _run(params)
    assert set(again["status"].values()) == {"cached"}, again["status"]
    assert again["registered"]["version"] == first_run["registered"]["version"]
    assert not again["registered"]["new_version"]


def test_changing_the_temperature_reruns_only_allocation_and_after(flow_env, first_run):
    root, params = flow_env
    result = _run(params.with_overrides({"allocation.tau": 0.25}))
    s = result["status"]
    assert [s[k] for k in ("slimset", "calibrate", "influence")] == ["cached"] * 3, s
    assert [s[k] for k in ("plan", "compress", "evaluate")] == ["ran"] * 3, s


def test_changing_the_timestep_weighting_needs_no_forward_passes(flow_env, first_run):
    root, params = flow_env
    result = _run(params.with_overrides({"influence.weighting": "uniform"}))
    s = result["status"]
    assert s["slimset"] == "cached" and s["calibrate"] == "cached", s
    assert [s[k] for k in ("influence", "plan", "compress", "evaluate")] == ["ran"] * 4, s


def test_infeasible_budget_stops_at_plan_and_keeps_earlier_artifacts(flow_env, first_run):
    from tasks.stages import StageInputError

    root, params = flow_env
    slimset_dir = Path(first_run["manifests"]["slimset"]["uri"])
    before = sorted(p.name for p in slimset_dir.iterdir())
    with pytest.raises(StageInputError, match="allocation.budget"):
        _run(params.with_overrides({"allocation.budget.value": 0.999, "allocation.r_min": 64}))
    assert sorted(p.name for p in slimset_dir.iterdir()) == before


def test_lineage_verify_catches_tampering(flow_env, first_run):
    from tasks.lineage import get_lineage, verify_lineage
    from tasks.tracking import setup_tracking

    root, params = flow_env
    setup_tracking(params)
    chain = verify_lineage(get_lineage("slimdiff-toy/1"))
    assert chain.first_broken is None, [(link.name, link.problem) for link in chain.links]

    plan_file = Path(first_run["manifests"]["plan"]["uri"]) / "rank_plan.json"
    original = plan_file.read_text()
    plan_file.write_text(original.replace('"tau"', '"tau" ', 1))
    try:
        broken = verify_lineage(get_lineage("slimdiff-toy/1")).first_broken
        assert broken is not None and broken.name == "rank_plan"
    finally:
        plan_file.write_text(original)

    slimset_file = Path(first_run["manifests"]["slimset"]["uri"]) / "slimset.json"
    backup = slimset_file.read_text()
    slimset_file.write_text(backup + "\n")
    try:
        broken = verify_lineage(get_lineage("slimdiff-toy/1")).first_broken
        assert broken is not None and broken.name == "slimset"
    finally:
        slimset_file.write_text(backup)


def test_new_release_in_a_release_folder_is_compressed_once(flow_env, first_run):
    from mlflow import MlflowClient

    from flows.deployments import check_releases

    root, params = flow_env
    releases = root / "releases"
    releases.mkdir()
    shutil.copytree(toy_pipeline_dir(), releases / "v1")
    cfg = params.model_dump(mode="json")
    report = check_releases(str(releases), params=cfg)
    assert len(report["ran"]) == 1 and report["skipped"] == []
    name = report["ran"][0]["registered"]["name"]
    versions = MlflowClient().search_model_versions(f"name='{name}'")
    assert len(versions) == 1
    assert versions[0].tags["source_model"] == str(releases / "v1")
    again = check_releases(str(releases), params=cfg)
    assert again["ran"] == [] and again["skipped"] == [str(releases / "v1")]
    assert len(MlflowClient().search_model_versions(f"name='{name}'")) == 1


def test_lineage_command_json_and_exit_codes(flow_env, first_run):
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    root, params = flow_env
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    runner = CliRunner()
    ok = runner.invoke(app, ["lineage", "slimdiff-toy/1", "--params", str(params_file), "--verify", "--json"])
    assert ok.exit_code == 0, ok.output
    chain = json.loads(ok.stdout)
    assert [link["name"] for link in chain["links"]] == [
        "source_model",
        "slimset",
        "covariance_store",
        "influence",
        "rank_plan",
        "compressed_weights",
        "evaluation",
    ]
    assert all(link["verified"] for link in chain["links"])
    assert chain["links"][1]["details"]["pool_digest"]  # SlimSet provenance is shown

    plan_file = Path(first_run["manifests"]["plan"]["uri"]) / "rank_plan.json"
    original = plan_file.read_text()
    plan_file.write_text(original + " ")
    try:
        broken = runner.invoke(app, ["lineage", "slimdiff-toy/1", "--params", str(params_file), "--verify"])
    finally:
        plan_file.write_text(original)
    assert broken.exit_code == 4
    assert "lineage broken at rank_plan" in broken.output

    missing = runner.invoke(app, ["lineage", "no-such-model/1", "--params", str(params_file)])
    assert missing.exit_code == 3, missing.output


def test_compare_command_prints_two_registered_models(flow_env, first_run):
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    root, params = flow_env
    _run(params.with_overrides({"allocation.tau": 0.25}))  # cached if the tau test already ran
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    out = CliRunner().invoke(
        app, ["compare", "slimdiff-toy/1", "slimdiff-toy/2", "--params", str(params_file)]
    )
    assert out.exit_code == 0, out.output
    assert "slimdiff-toy/1" in out.stdout and "slimdiff-toy/2" in out.stdout
    assert "exact match" in out.stdout
