"""End-to-end: the Prefect flow on the committed toy model, with Prefect, MLflow and all artifacts in a
temp directory. Shows incremental reruns (only what is downstream of a change recomputes), the
registry entry with lineage, the lineage audit catching tampering, and clean failures."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from slimdiff.config import Params
from slimdiff.formats.models import toy_pipeline_dir

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


def _run(params: Params, trigger: str = "experiment") -> dict:
    from flows.pipeline import slimdiff_flow

    return slimdiff_flow(params=params.model_dump(mode="json"), trigger=trigger)


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
    assert reg["alias"] == "candidate"  # an experiment (not the committed params): not champion

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

    from slimdiff.formats.models import load_pipeline
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


def test_infeasible_budget_stops_before_any_stage_and_keeps_earlier_artifacts(flow_env, first_run):
    from tasks.stages import StageInputError

    root, params = flow_env
    artifacts = Path(params.tracking.artifact_root)
    before = sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*"))
    # r_min 64 changes the plan key: were any stage to run, new folders would appear
    with pytest.raises(StageInputError, match="^allocation.budget: .*feasible with r_min=64"):
        _run(params.with_overrides({"allocation.budget.value": 0.999, "allocation.r_min": 64}))
    assert sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*")) == before


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


# -- issue 13: integrity under concurrency and faults ----------------------------------------------
def _flip_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x04
    path.write_bytes(bytes(data))


def test_compressed_weights_are_byte_stable(flow_env, first_run):
    """The cause of two concurrent runs registering different bytes for one model: the weights
    header order of a multi-entry safetensors metadata map (random per process). The published
    weights carry one metadata entry (nothing to order), the header is canonical, and the sidecar
    records the sha256 of exactly these bytes."""
    import struct

    from tasks.artifacts import canonicalise_safetensors_header, file_digest

    unet = Path(first_run["manifests"]["compress"]["uri"]) / "pipeline" / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    assert meta == {"format": "pt"}
    assert json.loads((unet / "slimdiff.json").read_text())["weights_sha256"] == file_digest(weights)
    assert canonicalise_safetensors_header(weights) == (file_digest(weights), file_digest(weights))


def test_only_committed_or_scheduled_runs_move_the_champion_alias(flow_env, first_run):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.tracking import setup_tracking

    root, params = flow_env
    setup_tracking(params)
    client = MlflowClient()
    with pytest.raises(MlflowException):  # experiments (the first run) never made a champion
        client.get_model_version_by_alias("slimdiff-toy", "champion")
    committed = _run(params, trigger="committed")
    assert committed["registered"] == {**first_run["registered"], "new_version": False, "alias": "champion"}
    assert str(client.get_model_version_by_alias("slimdiff-toy", "champion").version) == "1"
    again = _run(params)  # an experiment of the same model moves the candidate alias only
    assert again["registered"]["alias"] == "candidate"
    assert str(client.get_model_version_by_alias("slimdiff-toy", "champion").version) == "1"


def test_every_kind_of_cached_artifact_is_verified_and_recomputed_when_damaged(flow_env, first_run):
    """One flipped bit in each kind of artifact (SlimSet, a Zarr chunk, influence, rank plan,
    compressed weights, metrics): the rerun names each damaged artifact, recomputes exactly those
    stages (the store: all its shards, since merged totals keep no per-shard copy) and restores the
    recorded digests; nothing is reused silently."""
    from mlflow import MlflowClient

    from tasks.lineage import get_lineage, verify_lineage
    from tasks.store import CovarianceStore
    from tasks.tracking import setup_tracking

    root, params = flow_env
    m = {k: Path(v["uri"]) for k, v in first_run["manifests"].items()}
    before = {k: v["digest"] for k, v in first_run["manifests"].items()}
    store = CovarianceStore.open(str(m["calibrate"]))
    chunk = store.totals_chunk_files()[0]
    _flip_bit(m["slimset"] / "slimset.json")
    _flip_bit(m["calibrate"] / chunk)
    _flip_bit(m["influence"] / "influence.json")
    _flip_bit(m["plan"] / "rank_plan.json")
    _flip_bit(m["compress"] / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors", offset=-1)
    _flip_bit(m["evaluate"] / "metrics.json")

    result = _run(params)
    s = result["status"]
    assert [s[k] for k in ("slimset", "calibrate", "influence", "plan", "compress", "evaluate")] == [
        "repaired"
    ] * 6, s
    assert set(result["repaired"]) == {"slimset", "calibrate", "influence", "plan", "compress", "evaluate"}
    assert result["repaired"]["calibrate"].startswith("merged totals damaged"), result["repaired"][
        "calibrate"
    ]
    assert "digest" in result["repaired"]["compress"]
    after = {k: v["digest"] for k, v in result["manifests"].items()}
    for stage in ("slimset", "calibrate", "influence", "plan", "compress"):  # deterministic stages
        assert after[stage] == before[stage], stage
    # metrics hold fresh latency measurements: new bytes, and the registry's link follows them
    assert result["registered"] == {**first_run["registered"], "new_version": False}
    for stage in ("slimset", "influence", "plan", "compress", "evaluate"):
        assert len(list((m[stage].parent / ".quarantine").iterdir())) == 1, stage
    setup_tracking(params)
    assert len(MlflowClient().search_model_versions("name='slimdiff-toy'")) == len(
        {v.tags["compressed_digest"] for v in MlflowClient().search_model_versions("name='slimdiff-toy'")}
    )
    chain = verify_lineage(get_lineage("slimdiff-toy/1"))
    assert chain.first_broken is None, [(link.name, link.problem) for link in chain.links]
    assert set(_run(params)["status"].values()) == {"cached"}


def test_a_damaged_store_found_by_a_stage_names_the_repair_and_repair_recomputes_it(flow_env, first_run):
    """With size-only checks a flipped bit in the store passes the cache check; the stage that
    reads it fails (exit 4) saying what `slimdiff repair` recomputes, and repair does exactly that."""
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.store import CovarianceStore

    root, params = flow_env
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    store_uri = first_run["manifests"]["calibrate"]["uri"]
    digest = first_run["manifests"]["calibrate"]["digest"]
    _flip_bit(Path(store_uri) / CovarianceStore.open(store_uri).totals_chunk_files()[1])

    runner = CliRunner()
    failed = runner.invoke(
        app,
        [
            "run",
            "-p",
            str(params_file),
            "--set",
            "integrity.verify_large=size",
            "--set",
            "compression.damping=0.02",
        ],
    )
    assert failed.exit_code == 4, failed.output
    assert re.search(r"the totals of \S+ \(bucket \d\) are (corrupted|unreadable)", failed.output), (
        failed.output
    )
    assert "`slimdiff repair` recomputes exactly the covariance store (its merged totals of" in failed.output

    repaired = runner.invoke(app, ["repair", "-p", str(params_file), "--json"])
    assert repaired.exit_code == 0, repaired.output
    result = json.loads(repaired.stdout)
    assert list(result["repaired"]) == ["calibrate"] and result["repaired"]["calibrate"].startswith(
        "merged totals damaged"
    )
    assert result["status"]["calibrate"] == "repaired"
    assert {result["status"][k] for k in ("slimset", "influence", "plan", "compress", "evaluate")} == {
        "cached"
    }
    assert result["manifests"]["calibrate"]["digest"] == digest
    assert CovarianceStore.open(store_uri).totals_problems(full=True) == {}


def test_unreachable_tracking_server_stops_the_scheduled_check(flow_env, tmp_path, monkeypatch):
    from flows.deployments import check_releases
    from tasks.tracking import TrackingUnavailableError

    root, params = flow_env
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    releases = tmp_path / "releases"
    shutil.copytree(toy_pipeline_dir(), releases / "v1")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = params.with_overrides(
        {"tracking.tracking_uri": f"http://127.0.0.1:{port}", "tracking.artifact_root": str(tmp_path / "a")}
    )
    with pytest.raises(TrackingUnavailableError, match="unreachable"):
        check_releases(str(releases), params=cfg.model_dump(mode="json"))
    assert not (tmp_path / "a").exists()  # nothing ran


def test_two_runs_at_once_register_one_version_with_intact_lineage(flow_env, tmp_path):
    """Two `slimdiff run` of the same params started together in one workspace: each stage is
    computed by exactly one of them (the other waits for its lock and reuses the result), one
    version is registered, and the lineage of every registered version verifies."""
    import os
    import subprocess
    import sys

    import yaml
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from tasks.artifacts import content_digest
    from tasks.lineage import get_lineage, verify_lineage
    from tasks.tracking import setup_tracking

    root, params = flow_env
    work = tmp_path / "workspace"
    work.mkdir()
    tiny = params.with_overrides(
        {
            "slimset.n": 8,
            "calibration.num_inference_steps": 4,
            "calibration.n_buckets": 2,
            "calibration.shard_size": 4,
            "evaluation.max_prompts": 8,
            "evaluation.num_inference_steps": 4,
            "evaluation.latency_repeats": 1,
            "allocation.tau": 0.1,
            "tracking.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "tracking.artifact_root": str(work / "artifacts"),
        }
    )
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny.model_dump(mode="json")))
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    cmd = [sys.executable, "-m", "flows.cli", "run", "-p", str(params_file), "--json"]
    procs = [
        subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    results = [json.loads(out[out.index('{\n  "status"') :]) for out, _ in outs]

    for stage in ("slimset", "calibrate", "influence", "plan", "compress", "evaluate", "register"):
        assert sorted(r["status"][stage] for r in results) == ["cached", "ran"], (stage, results[0]["status"])
    setup_tracking(tiny)
    client = MlflowClient()
    versions = client.search_model_versions("name='slimdiff-toy'")
    assert [str(v.version) for v in versions] == ["1"]
    assert {r["registered"]["version"] for r in results} == {"1"}
    compressed = results[0]["manifests"]["compress"]
    assert results[1]["manifests"]["compress"] == compressed
    assert versions[0].tags["compressed_digest"] == compressed["digest"] == content_digest(compressed["uri"])
    for v in versions:
        chain = verify_lineage(get_lineage(f"slimdiff-toy/{v.version}"))
        assert chain.first_broken is None, [(link.name, link.problem) for link in chain.links]


def test_publishable_folder_has_a_hub_card_loads_plainly_and_pushes_up_to_the_upload(
    flow_env, first_run, monkeypatch
):
    """`slimdiff push`: the registered model as a folder with a model card (Hub front matter,
    lineage digests, plan summary, evaluation, grid, reproduce command); the upload itself is
    replaced by a recorder (no network here)."""
    import huggingface_hub
    import yaml
    from diffusers import DiffusionPipeline

    from tasks.publish import PARAMS_FILE, publish_folder, push
    from tasks.tracking import setup_tracking

    root, params = flow_env
    setup_tracking(params)
    folder = publish_folder("slimdiff-toy/1", params, params)
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert "slimdiff" in meta["tags"] and "license" not in meta  # the toy source declares none
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version("slimdiff-toy", "1").tags
    for key in ("slimset_digest", "stats_digest", "compressed_digest", "plan_digest", "source_revision"):
        assert tags[key] in card, key
    assert "| ffn |" in card and "exact-match accuracy" in card and "![original" in card
    assert f"slimdiff run --params {PARAMS_FILE}" in card and (folder / PARAMS_FILE).is_file()
    assert (folder / "grid.png").stat().st_size > 1000
    pipe = DiffusionPipeline.from_pretrained(folder)  # the published folder loads plainly
    assert type(pipe.unet).__name__ == "SlimUNet2DConditionModel"

    calls = []

    class Recorder:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/0"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    url = push(folder, "me/toy-slim", private=True)
    assert url.endswith("me/toy-slim/commit/0")
    assert calls[1] == (
        "create_repo",
        "me/toy-slim",
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    assert calls[2][1]["folder_path"] == str(folder) and calls[2][1]["repo_id"] == "me/toy-slim"


def test_budget_search_reuses_cached_points_and_registers_the_pick(flow_env, first_run):
    """A sweep calibrates and scores once; a budget already run (the first run's default 0.55 of
    the FLOPs) is a cache hit, a new one (0.75, near the toy's feasible maximum of 0.796) runs only its plan / compress /
    evaluate; a value beyond the maximum is recorded as infeasible. The pick rule "removed"
    registers the passing point that removes most, i.e. the compressed model of that point."""
    from mlflow import MlflowClient

    from tasks.tracking import setup_tracking

    root, params = flow_env
    assert params.allocation.budget.value == 0.55
    result = _run(params.with_overrides({"search.values": [0.55, 0.75, 0.95]}))
    first, second, third = result["points"]
    assert first["value"] == 0.55 and set(first["stages"].values()) == {"cached"}, first
    assert second["value"] == 0.75 and set(second["stages"].values()) == {"ran"}, second
    assert third["value"] == 0.95 and third["status"] == "infeasible" and "0.796" in third["message"]
    s = result["status"]
    assert [s[k] for k in ("slimset", "calibrate", "influence")] == ["cached"] * 3, s
    assert first["compressed_digest"] == first_run["manifests"]["compress"]["digest"]
    assert second["params_kept"] < first["params_kept"]
    passing = [p for p in (first, second) if p["gate_passed"]]
    assert first in passing  # the first run passed the gate at 0.55
    chosen = max(passing, key=lambda p: p["params_removed"])
    assert [p for p in (first, second) if p.get("chosen")] == [chosen]
    assert result["manifests"]["compress"]["digest"] == chosen["compressed_digest"]
    report = Path(result["report"])
    assert "## Budget search" in report.read_text() and (report.parent / "pareto.png").stat().st_size > 1000
    setup_tracking(params)
    client = MlflowClient()
    version = client.get_model_version("slimdiff-toy", result["registered"]["version"])
    assert version.tags["compressed_digest"] == chosen["compressed_digest"]
    children = client.search_runs(
        [client.get_experiment_by_name(params.tracking.experiment).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'",
    )
    assert sorted(r.data.params["allocation.budget.value"] for r in children) == ["0.55", "0.75"]


def test_budget_search_with_no_passing_point_registers_nothing(flow_env, first_run, monkeypatch):
    """The search's no-pass path: the gate verdict is forced to fail here (the toy model passes
    the real gate up to its feasible maximum, so no honest budget fails it reliably), with a gate
    limit of 2.5 points so the evaluate stage runs again and applies the forced verdict. The run
    stops with NoBudgetPassesError naming the best point; no version is added and no alias moves;
    `slimdiff run` maps the error to exit code 7."""
    from mlflow import MlflowClient

    from flows.cli import EXIT_GATE, _exit_code
    from slimdiff.evaluation import metrics as M
    from tasks.stages import NoBudgetPassesError
    from tasks.tracking import setup_tracking

    root, params = flow_env
    setup_tracking(params)
    client = MlflowClient()
    before = {(v.version, tuple(v.aliases)) for v in client.search_model_versions("name='slimdiff-toy'")}
    monkeypatch.setattr(M, "quality_gate", lambda *a, **k: (False, ["forced to fail by the test"], []))
    with pytest.raises(NoBudgetPassesError, match=r"best point: 0\.4 \(forced to fail by the test") as err:
        _run(params.with_overrides({"search.values": [0.4], "evaluation.gate.max_exact_match_drop": 2.5}))
    assert "Nothing was registered" in str(err.value) and _exit_code(err.value) == EXIT_GATE == 7
    after = {(v.version, tuple(v.aliases)) for v in client.search_model_versions("name='slimdiff-toy'")}
    assert after == before


def test_the_toy_flux_runs_the_whole_flow_with_lineage_and_gate(flow_env, first_run):
    """`slimdiff run --set model.source=toy-flux`: every stage on the FLUX.1-class toy (double and
    single blocks, QKs whole under the default qk_norm auto, the packed single-block proj_out), registered under its own
    name with lineage, graded by the toy judges; the compressed folder loads with diffusers."""
    from diffusers import DiffusionPipeline

    root, params = flow_env
    result = _run(params.with_overrides({"model.source": "toy-flux"}))
    assert set(result["status"].values()) == {"ran"}, result["status"]
    reg = result["registered"]
    assert reg["name"] == "slimdiff-toy-flux" and reg["new_version"]
    plan = json.loads((Path(result["manifests"]["plan"]["uri"]) / "rank_plan.json").read_text())
    # qk_norm auto: FLUX's QKs (q/k RMSNorms + RoPE) stay whole, so the plan holds VO and FFN units
    assert {u["kind"] for u in plan["units"].values()} == {"ffn", "vo"}
    assert any(n.startswith("single_transformer_blocks.") and n.endswith(".mlp") for n in plan["units"])
    metrics = json.loads((Path(result["manifests"]["evaluate"]["uri"]) / "metrics.json").read_text())
    assert metrics["compressed"]["unet_params"] < metrics["original"]["unet_params"]
    assert "exact_match_drop" in metrics["summary"]
    pipe = DiffusionPipeline.from_pretrained(Path(result["manifests"]["compress"]["uri"]) / "pipeline")
    assert type(pipe).__name__ == "FluxPipeline"
    assert type(pipe.transformer).__name__ == "SlimFluxTransformer2DModel"
    assert sum(p.numel() for p in pipe.transformer.parameters()) == metrics["compressed"]["unet_params"]


def test_the_toy_mmdit_runs_the_whole_flow_with_lineage_and_gate(flow_env, first_run):
    """`slimdiff run --set model.source=toy-mmdit`: every stage on the SD3-class toy (joint
    attention, q/k RMSNorm under the default RMSNorm-aware selection, dual attention), registered
    under its own name with lineage; the compressed folder loads plainly and is smaller."""
    from diffusers import DiffusionPipeline
    from mlflow import MlflowClient

    from tasks.tracking import setup_tracking

    root, params = flow_env
    result = _run(params.with_overrides({"model.source": "toy-mmdit"}))
    assert set(result["status"].values()) == {"ran"}, result["status"]
    reg = result["registered"]
    assert reg["name"] == "slimdiff-toy-mmdit" and reg["new_version"]
    setup_tracking(params)
    tags = MlflowClient().get_model_version(reg["name"], reg["version"]).tags
    assert tags["compressed_digest"] == result["manifests"]["compress"]["digest"]
    plan = json.loads((Path(result["manifests"]["plan"]["uri"]) / "rank_plan.json").read_text())
    kinds = {u["kind"] for u in plan["units"].values()}
    assert kinds == {"ffn", "qk", "vo"} and any(".attn2." in n for n in plan["units"])  # dual attention
    metrics = json.loads((Path(result["manifests"]["evaluate"]["uri"]) / "metrics.json").read_text())
    assert metrics["compressed"]["unet_params"] < metrics["original"]["unet_params"]
    assert "exact_match_drop" in metrics["summary"]  # the toy judges grade the MMDiT's images too
    # SD3 without T5: like the stock folder, diffusers needs the absent encoder named as None
    pipe = DiffusionPipeline.from_pretrained(
        Path(result["manifests"]["compress"]["uri"]) / "pipeline", text_encoder_3=None, tokenizer_3=None
    )
    assert type(pipe.transformer).__name__ == "SlimSD3Transformer2DModel"
