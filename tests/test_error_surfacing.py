"""Narrow error handling: a fallback meant for one known case never hides a different failure
behind its own message (issue 27). `slimdiff repair NAME/VERSION` says "older run without
params.json" only for a run that has none, and LoRA projection guesses the "unet" prefix only for
a model no adapter supports."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from slimdiff.config import Params


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A SQLite registry with three versions of "m": 1 logged params.json, 2 (an older run) did not,
    3 ran in an experiment whose artifact store is an HTTP server nobody listens on."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.tracking import setup_tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    params = Params().with_overrides(
        {
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.artifact_root": str(tmp_path / "artifacts"),
            "allocation.tau": 0.25,  # not the default: the logged params are really read back
        }
    )
    setup_tracking(params)
    client = MlflowClient()
    client.create_registered_model("m")
    store = f"http://127.0.0.1:{_free_port()}/api/2.0/mlflow-artifacts/artifacts/dead"  # a proxied store
    dead = mlflow.create_experiment("dead-store", artifact_location=store)
    for experiment, logs in ((None, True), (None, False), (dead, False)):
        with mlflow.start_run(experiment_id=experiment) as run:
            if logs:
                mlflow.log_dict(params.model_dump(mode="json"), "params.json")
        client.create_model_version("m", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return params


def test_repair_reads_the_logged_params_and_names_only_a_missing_params_json(registry):
    from flows.cli import _registered_params

    got = _registered_params("m/1", Params())
    assert got.digest() == registry.digest() and got.allocation.tau == 0.25
    with pytest.raises(LookupError, match=r"m/2: its run \w+ has no params\.json \(older run\)"):
        _registered_params("m/2", registry)


def test_an_unreachable_artifact_store_is_not_reported_as_an_older_run(registry):
    """The old code caught every download error: a store that is down read as "older run without
    params.json; repair with -p/--set". Now the connection error surfaces, in the API and the CLI."""
    from mlflow.exceptions import MlflowException
    from typer.testing import CliRunner

    from flows.cli import _registered_params, app

    with pytest.raises(MlflowException, match="Connection refused|Failed to establish") as err:
        _registered_params("m/3", registry)
    assert not isinstance(err.value, LookupError) and "params.json (older run)" not in str(err.value)

    uri = registry.tracking.tracking_uri
    out = CliRunner().invoke(app, ["repair", "m/3", "--set", f"tracking.tracking_uri={uri}"])
    assert out.exit_code == 1, out.output  # an unexpected failure, not EXIT_INPUT (3)
    assert "older run" not in out.output and "-p/--set" not in out.output
    assert "Connection refused" in out.output or "Failed to establish" in out.output, out.output


# -- LoRA: the prefix guess for unsupported models -----------------------------------------------
def test_lora_prefix_guess_is_only_for_unsupported_models(monkeypatch):
    import slimdiff.formats.lora as lora
    from slimdiff.families.base import LoraError
    from slimdiff.formats.lora import _split, project_lora

    plain = nn.Linear(4, 4)
    assert _split(plain) == (plain, "unet", None)  # UnsupportedModelError: the "unet" guess
    with pytest.raises(LoraError, match="the model has no layer 'weight'"):  # "unet." was stripped
        project_lora(plain, {"unet.weight.lora_A.weight": torch.zeros(1, 4)})

    def broken(model):
        raise RuntimeError("adapter registry is broken")

    monkeypatch.setattr(lora, "adapter_for", broken)  # the name the LoRA module looks up
    with pytest.raises(RuntimeError, match="adapter registry is broken"):
        _split(plain)
    with pytest.raises(RuntimeError, match="adapter registry is broken"):
        project_lora(plain, {"unet.weight.lora_A.weight": torch.zeros(1, 4)})
