"""Object storage through fsspec: the Zarr store, a DVC remote and MLflow artifacts on an
S3-compatible server started on loopback by the test (moto's server mode), never the internet."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Every client (s3fs/zarr, DVC, MLflow's boto3) reads the endpoint from the environment."""
    import boto3

    for k, v in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    bucket = f"slimdiff-{time.monotonic_ns()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


def test_covariance_store_on_s3_round_trips_and_resumes(s3_env):
    from slimdiff.core.stats import ActivationStats, merge
    from tasks.store import CovarianceStore

    shapes = {"b.ff.hidden": (4, 4)}
    uri = f"s3://{s3_env}/stats.zarr"

    def shard(seed):
        g = torch.Generator().manual_seed(seed)
        return ActivationStats(
            2,
            {"b.ff.hidden": torch.randn(2, 4, 4, generator=g, dtype=torch.float64)},
            {"b.ff.hidden": torch.tensor([3, 5])},
        )

    store = CovarianceStore.open_or_create(uri, identity={"m": 1}, n_shards=2, n_buckets=2, shapes=shapes)
    store.mark_shard(0, store.write_shard(0, shard(0)))
    resumed = CovarianceStore.open_or_create(uri, identity={"m": 1}, n_shards=2, n_buckets=2, shapes=shapes)
    assert resumed.missing_shards() == [1]
    resumed.mark_shard(1, resumed.write_shard(1, shard(1)))
    resumed.finalize()
    got = CovarianceStore.open(uri).read()
    assert torch.equal(got.moments["b.ff.hidden"], merge([shard(0), shard(1)]).moments["b.ff.hidden"])


def test_dvc_remote_on_s3_push_and_pull(s3_env, tmp_path):
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent))
    repo = tmp_path / "repo"
    repo.mkdir()
    run = lambda *a: subprocess.run(a, cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run(dvc, "config", "core.analytics", "false")
    run(dvc, "remote", "add", "-d", "team", f"s3://{s3_env}/dvc")
    (repo / "plan.json").write_text('{"ranks": {"a": 8}}')
    run(dvc, "add", "plan.json")
    run(dvc, "push")
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "plan.json").unlink()
    run(dvc, "pull")
    assert (repo / "plan.json").read_text() == '{"ranks": {"a": 8}}'


def test_mlflow_artifacts_on_s3(s3_env, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("s3-artifacts", artifact_location=f"s3://{s3_env}/mlflow")
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_dict({"budget": 0.4}, "plan/rank_plan.json")
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="plan/rank_plan.json", dst_path=str(tmp_path / "dl")
    )
    assert Path(local).read_text().strip().startswith("{")
    assert run.info.artifact_uri.startswith(f"s3://{s3_env}/mlflow")
