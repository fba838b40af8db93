"""The calibration stage: resume after a killed collection, and the same statistics when shards run
on a 2-worker Dask cluster through Prefect's DaskTaskRunner. Tiny pipeline built from config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from slimdiff.config import Params

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from test_calib_collector import make_tiny_pipeline

    from tasks import stages

    root = tmp_path_factory.mktemp("calib")
    make_tiny_pipeline(root / "build").save_pretrained(root / "pipe")
    params = Params().with_overrides(
        {
            "model.source": str(root / "pipe"),
            "slimset.n": 9,
            "slimset.embedder.kind": "pipeline",
            "calibration.num_inference_steps": 4,
            "calibration.n_buckets": 2,
            "calibration.batch_size": 3,
            "calibration.shard_size": 3,
            "tracking.artifact_root": str(root / "artifacts"),
        }
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    model = stages.model_manifest(params)
    slimset = stages.run_slimset(params, root / "slimset", model=model)
    reference = stages.run_calibrate(params, model, slimset, str(root / "reference.zarr"), progress=False)
    return root, params, model, slimset, reference


def _stats(uri: str):
    from tasks.store import CovarianceStore

    return CovarianceStore.open(uri).read()


def _assert_same_stats(a, b):
    """Same statistics up to fp32 rounding of the per-batch products: processes with different
    thread counts sum in a different order (bit-identity holds only for identical settings)."""
    assert sorted(a.moments) == sorted(b.moments)
    for k in a.moments:
        assert torch.equal(a.tokens[k], b.tokens[k]), k
        scale = b.moments[k].abs().max().item()
        torch.testing.assert_close(a.moments[k], b.moments[k], rtol=1e-5, atol=1e-6 * scale, msg=k)


def test_killed_collection_resumes_from_completed_shards(tiny_setup):
    from tasks.store import CovarianceStore

    root, params, model, slimset, reference = tiny_setup
    store_uri = str(root / "killed.zarr")
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "calibrate",
        "-p",
        str(root / "params.yaml"),
        "--slimset",
        slimset.uri,
        "--out",
        store_uri,
    ]
    # Slow each shard down (in the child only, via sitecustomize) so the kill lands mid-collection.
    hook = root / "slow_shards"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(
        "import time, tasks.stages as s\n"
        "_orig = s.collect_shard\n"
        "def _slow(*a, **k):\n"
        "    out = _orig(*a, **k)\n"
        "    time.sleep(3)\n"
        "    return out\n"
        "s.collect_shard = _slow\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        cmd,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    done: dict = {}
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = CovarianceStore.open(store_uri).completed_shards()
        except Exception:  # noqa: BLE001 - store not created yet
            done = {}
        if done:
            break
        time.sleep(0.2)
    assert done, "first shard never completed: " + (
        proc.stdout.read().decode()[-2000:] if proc.poll() is not None else ""
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = CovarianceStore.open(store_uri)
    resumed = len(killed.completed_shards())
    assert not killed.complete and 1 <= resumed < killed.n_shards

    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"({resumed} resumed)" in out.stdout
    # the plan is said before any forward pass: memory, passes, store size
    assert (
        "statistics memory plan (limit" in out.stderr and "sampling passes per prompt shard: 1" in out.stderr
    )
    _assert_same_stats(_stats(store_uri), _stats(reference.uri))


def test_dask_two_workers_match_one_process(tiny_setup, monkeypatch):
    from prefect import flow, unmapped
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness
    from prefect_dask import DaskTaskRunner

    from tasks.prefect_tasks import calibrate_shard_task
    from tasks.stages import finalize_calibration, prepare_calibration

    root, params, model, slimset, reference = tiny_setup
    store_uri = str(root / "dask.zarr")
    with prefect_test_harness(server_startup_timeout=120):
        # one Prefect server for the whole cluster: workers inherit its URL
        monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})

        @flow(task_runner=runner)
        def sharded():
            job = prepare_calibration(params, model, slimset, store_uri)
            futures = calibrate_shard_task.map(
                unmapped(params), unmapped(model), unmapped(slimset), unmapped(store_uri), list(job.missing)
            )
            futures.result()
            return finalize_calibration(job)

        manifest = sharded()
    assert manifest.meta["collected_shards"] == 3
    _assert_same_stats(_stats(store_uri), _stats(reference.uri))


def test_slimset_overlapping_the_evaluation_prompts_stops_calibration(tiny_setup):
    from slimdiff.calibration.slimset import SlimSet
    from slimdiff.toy.data import heldout_captions
    from tasks.artifacts import Manifest, content_digest
    from tasks.stages import SLIMSET_FILE, StageInputError, prepare_calibration

    root, params, model, slimset, reference = tiny_setup
    original = SlimSet.load(Path(slimset.uri) / SLIMSET_FILE)
    assert not set(original.prompts) & set(heldout_captions())  # the stage excluded them
    bad_dir = root / "bad_slimset"
    bad_dir.mkdir()
    leaked = SlimSet(**{**original.__dict__, "prompts": [heldout_captions()[0], *original.prompts[1:]]})
    leaked.save(bad_dir / SLIMSET_FILE)
    bad = Manifest("slimset", str(bad_dir), content_digest(bad_dir))
    with pytest.raises(StageInputError, match="overlaps the evaluation prompts"):
        prepare_calibration(params, model, bad, str(root / "never.zarr"))
    assert not (root / "never.zarr").exists()


def test_a_memory_limit_below_the_largest_statistic_stops_before_anything_is_written(tiny_setup):
    from tasks.stages import StageInputError, prepare_calibration

    root, params, model, slimset, reference = tiny_setup
    tight = params.with_overrides({"calibration.max_memory": "1KiB"})
    with pytest.raises(
        StageInputError, match=r"max_memory=1.00 KiB is below the largest single statistic: \S+ needs"
    ):
        prepare_calibration(tight, model, slimset, str(root / "never-mem.zarr"))
    assert not (root / "never-mem.zarr").exists()


def test_a_limit_that_forces_passes_gives_the_reference_store_bit_for_bit(tiny_setup):
    """Three shards merged into the totals, sites split into several passes: the same digest (the
    shard digests are over the exact bytes) and the same statistics as the one-pass reference."""
    from slimdiff.calibration.collect import plan_for_model
    from slimdiff.families.units import denoiser_of
    from tasks import stages

    root, params, model, slimset, reference = tiny_setup
    denoiser = denoiser_of(stages._cached_pipe(params, model))
    largest = plan_for_model(denoiser, params.calibration.n_buckets, max_memory=None).largest[1]
    bounded = params.with_overrides({"calibration.max_memory": largest})
    assert plan_for_model(denoiser, params.calibration.n_buckets, max_memory=largest).passes >= 3
    m = stages.run_calibrate(bounded, model, slimset, str(root / "bounded.zarr"), progress=False)
    assert m.digest == reference.digest
    a, b = _stats(m.uri), _stats(reference.uri)
    for k in a.moments:
        assert torch.equal(a.moments[k], b.moments[k]), k
