"""Integrity under concurrency and faults, on tiny inputs (issue 13; docs/reliability.md):
byte-stable weights headers, stage locks, publish-once outputs, verified cache hits, orphaned
processes and MLflow runs, the alias policy, an unreachable tracking server."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from slimdiff.config import Params
from tasks.artifacts import (
    ArtifactError,
    Manifest,
    StageBusyError,
    canonicalise_safetensors_header,
    check_artifact,
    content_digest,
    file_digest,
    stage_lock,
    staged_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the cause of the differing compressed bytes ------------------------------------------------
def _header(path: Path) -> bytes:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n]


def _swap_metadata_order(path: Path) -> None:
    """Rewrite the header with its __metadata__ entries reversed: what another process writes."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    new = json.dumps(header, separators=(",", ":")).encode()
    data[8 : 8 + len(new)] = new
    path.write_bytes(bytes(data))


def test_same_tensors_get_different_bytes_until_the_header_is_canonical(tmp_path):
    """Root cause of two runs disagreeing on compressed bytes: safetensors writes __metadata__ in
    a per-process random order, and slimdiff.formats.io writes two metadata entries into the UNet's
    weights. Both orders load as the same tensors; only the canonical header makes them one file."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = {"b": np.arange(6, dtype=np.float32), "a": np.zeros(3, dtype=np.float32)}
    meta = {"format": "pt", "slimdiff_plan_digest": "0" * 64}
    one, other = tmp_path / "one.safetensors", tmp_path / "other.safetensors"
    save_file(tensors, str(one), metadata=meta)
    other.write_bytes(one.read_bytes())
    _swap_metadata_order(other)
    assert file_digest(one) != file_digest(other)  # the fault: same model, two digests
    for f in (one, other):
        assert {k: v.tolist() for k, v in load_file(str(f)).items()} == {
            k: v.tolist() for k, v in tensors.items()
        }
    canonical = {canonicalise_safetensors_header(f)[1] for f in (one, other)}
    assert len(canonical) == 1 and file_digest(one) == file_digest(other)
    assert json.loads(_header(one))["__metadata__"] == dict(sorted(meta.items()))
    assert canonicalise_safetensors_header(one) == (file_digest(one), file_digest(one))  # idempotent


def test_separate_processes_write_identical_canonical_weights(tmp_path):
    """The same tensors saved by separate processes (each with its own hash-map seed) end up as
    one byte sequence once canonicalised, however the processes ordered their headers."""
    script = (
        "import sys, json, struct, numpy as np\n"
        "from safetensors.numpy import save_file\n"
        "from tasks.artifacts import canonicalise_safetensors_header\n"
        "p = sys.argv[1]\n"
        "save_file({'w': np.arange(4, dtype=np.float32)}, p,"
        " metadata={'format': 'pt', 'slimdiff_plan_digest': 'x', 'z': 'y'})\n"
        "raw = open(p, 'rb').read(); n = struct.unpack('<Q', raw[:8])[0]\n"
        "order = list(json.loads(raw[8:8 + n])['__metadata__'])\n"
        "print(json.dumps([order, canonicalise_safetensors_header(p)[1]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", script, str(tmp_path / f"{i}.safetensors")],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            ).stdout
        )
        for i in range(6)
    ]
    orders = {tuple(order) for order, _ in results}
    digests = {digest for _, digest in results}
    assert len(digests) == 1, (orders, digests)


# -- locks and publish-once --------------------------------------------------------------------
def test_stage_lock_waits_refuses_and_is_released_when_its_holder_is_killed(tmp_path):
    lock = tmp_path / ".locks" / "plan-abc.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tasks.artifacts import stage_lock\n"
            "with stage_lock(sys.argv[1], timeout=None, what='t'):\n"
            "    print('held', flush=True); time.sleep(60)\n",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        refuse = pytest.raises(StageBusyError, match=rf"pid {holder.pid} on .*not waiting")
        with refuse, stage_lock(lock, timeout=0, what="rank_plan (stage plan)"):
            pass
        t0 = time.monotonic()
        give_up = pytest.raises(StageBusyError, match="still writing it after 1 s")
        with give_up, stage_lock(lock, timeout=1.0, what="rank_plan (stage plan)"):
            pass
        assert time.monotonic() - t0 >= 1.0
        holder.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the flock
        holder.wait()
        with stage_lock(lock, timeout=5, what="rank_plan (stage plan)"):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_concurrent_writers_of_one_key_compute_once_and_never_replace_it(tmp_path):
    """Two writers of the same stage key at once: one computes and publishes, the other waits and
    reuses that very folder; a publish that bypasses the lock never replaces a published folder."""
    from tasks import prefect_tasks, stages

    params = Params().with_overrides({"tracking.artifact_root": str(tmp_path)})
    calls: list[int] = []

    def compute(out: Path) -> Manifest:
        calls.append(threading.get_ident())
        with staged_dir(out, replace=False) as tmp:
            (tmp / "rank_plan.json").write_bytes(os.urandom(64))  # every computation differs
            time.sleep(0.5)
        return stages._finish("plan", out, {})

    model = Manifest("model", "m", "d" * 64)
    results: list = [None, None]

    def worker(i: int) -> None:
        results[i] = prefect_tasks._keyed(params, "plan", (model,), compute)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.outcome for r in results) == ["ran", "reused"]
    assert results[0].manifest.digest == results[1].manifest.digest
    out = Path(results[0].manifest.uri)
    assert content_digest(out) == results[0].manifest.digest

    published = (out / "rank_plan.json").read_bytes()
    with staged_dir(out, replace=False) as tmp:  # a writer that did not take the lock
        (tmp / "rank_plan.json").write_bytes(b"different bytes")
    assert (out / "rank_plan.json").read_bytes() == published
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_cache_check_levels_and_quarantine_of_a_damaged_output(tmp_path):
    from tasks import prefect_tasks, stages

    params = Params().with_overrides({"tracking.artifact_root": str(tmp_path)})
    model = Manifest("model", "m", "d" * 64)

    def compute(out: Path) -> Manifest:
        with staged_dir(out, replace=False) as tmp:
            (tmp / "pipeline").mkdir()
            (tmp / "pipeline" / "weights.bin").write_bytes(bytes(range(256)) * 64)
        return stages._finish("compress", out, {})

    first = prefect_tasks._keyed(params, "compress", (model,), compute).manifest
    weights = Path(first.uri) / "pipeline" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01  # one flipped bit: same size
    weights.write_bytes(bytes(data))
    assert check_artifact(first, "size") is None  # sizes cannot see a flipped bit ...
    assert "digest" in check_artifact(first, "digest")  # ... every byte can
    # a cache hit of this small "large" artifact is checked fully under verify_large auto
    assert prefect_tasks.verification_level(params, first) == "digest"
    size_only = params.with_overrides({"integrity.verify_large": "size"})
    assert prefect_tasks.verification_level(size_only, first) == "size"

    again = prefect_tasks._keyed(params, "compress", (model,), compute)
    assert again.outcome == "repaired" and "digest" in again.problem
    assert again.manifest.digest == first.digest and check_artifact(again.manifest) is None
    kept = list((Path(first.uri).parent / ".quarantine").iterdir())
    assert len(kept) == 1 and (kept[0] / "pipeline" / "weights.bin").read_bytes() == bytes(data)

    weights.write_bytes(weights.read_bytes()[:-1])  # truncated: the size check sees it
    assert "has 16383 bytes, recorded 16384" in check_artifact(again.manifest, "size")


# -- the covariance store: damage is found and recomputed, never merged -----------------------
def test_store_flipped_bit_in_the_totals_is_found_and_recollecting_restores_the_digest(tmp_path):
    """A flipped bit in the merged totals passes the size check, fails the full check and every
    read of that statistic (naming the repair); the totals keep no per-shard copy, so the repair
    collects every shard again and the store's digest and bytes come back the same."""
    import torch

    from slimdiff.core.stats import ActivationStats
    from tasks.store import CovarianceStore

    shapes = {"blk.ff.hidden": (6, 6), "blk.attn1.query": (2, 3, 3)}

    def shard(seed: int) -> ActivationStats:
        g = torch.Generator().manual_seed(seed)
        return ActivationStats(
            3,
            {k: torch.randn((3, *s), generator=g, dtype=torch.float64) for k, s in shapes.items()},
            {k: torch.randint(1, 9, (3,), generator=g) for k in shapes},
        )

    def collect(store):
        for i in store.missing_shards():
            store.mark_shard(i, store.write_shard(i, shard(i)))
            store.merge_completed()
        return store.finalize()

    uri = str(tmp_path / "stats.zarr")
    store = CovarianceStore.open_or_create(uri, identity={"m": 1}, n_shards=3, n_buckets=3, shapes=shapes)
    digest = collect(store)
    want = store.read().moments["blk.ff.hidden"].clone()
    assert CovarianceStore.open(uri).totals_problems(full=True) == {}

    chunk = tmp_path / "stats.zarr" / [f for f in store.totals_chunk_files() if "ff.hidden" in f][2]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    reopened = CovarianceStore.open(uri)
    assert reopened.totals_problems(full=False) == {}  # same size: only the full check sees it
    assert list(reopened.totals_problems(full=True)) == ["blk.ff.hidden"]
    with pytest.raises(ArtifactError) as err:
        reopened.read().moments["blk.ff.hidden"]
    assert err.value.stage == "calibrate" and "every shard is collected again" in err.value.repair

    writable = CovarianceStore.open(uri, writable=True)
    writable.drop_totals()
    assert writable.missing_shards() == [0, 1, 2] and not writable.complete
    assert collect(writable) == digest
    assert torch.equal(CovarianceStore.open(uri).read().moments["blk.ff.hidden"], want)

    chunk = tmp_path / "stats.zarr" / CovarianceStore.open(uri).totals_chunk_files()[0]
    chunk.write_bytes(chunk.read_bytes()[:-3])  # truncated: the size check sees it
    assert list(CovarianceStore.open(uri).totals_problems(full=False)) == ["blk.attn1.query"]


# -- params checked before any stage ------------------------------------------------------------
def test_budget_feasibility_from_the_config_alone_agrees_with_the_planner():
    from slimdiff.api import cost_model
    from slimdiff.families import denoiser_of
    from slimdiff.formats.models import load_pipeline
    from slimdiff.planning.allocation import plan_ranks
    from slimdiff.planning.budget import InfeasibleBudgetError
    from tasks.preflight import check_budget, denoiser_units
    from tasks.stages import StageInputError, budget_from_params

    params_budget = {"allocation.budget.kind": "removed_fraction"}
    pipe = load_pipeline("toy")  # the plan stage's FLOP trace is made on the loaded pipeline
    for overrides, feasible in [
        ({**params_budget, "allocation.budget.value": 0.4}, True),
        ({**params_budget, "allocation.budget.value": 0.99}, False),
        ({**params_budget, "allocation.budget.value": 0.8, "allocation.r_min": 64}, False),
        ({"allocation.budget.kind": "kept_params", "allocation.budget.value": 1_000_000}, True),
        ({"allocation.budget.kind": "total_params", "allocation.budget.value": 1_000_000}, False),
        # the default FLOP budget: judged on the config files' trace, the planner on the pipeline's
        ({}, True),
        ({"allocation.budget.value": 0.99}, False),
        ({"allocation.budget.value": 0.6, "allocation.r_min": 64}, False),
        ({"allocation.budget.kind": "flops_speedup", "allocation.budget.value": 1.2}, True),
        ({"allocation.budget.kind": "flops_speedup", "allocation.budget.value": 3.0}, False),
    ]:
        params = Params().with_overrides(overrides)
        units, model_params = denoiser_units(params)
        cfg = params.allocation
        try:
            plan_ranks(
                None,
                units,
                budget_from_params(params),
                mode="uniform",
                r_min=cfg.r_min,
                multiple=cfg.multiple,
                model_params=model_params,
                costs=cost_model(pipe, denoiser_of(pipe), params, units),
            )
            planner_ok = True
        except InfeasibleBudgetError:
            planner_ok = False
        assert planner_ok == feasible, overrides
        if feasible:
            check_budget(params)
        else:
            with pytest.raises(StageInputError, match=r"^allocation\.budget: .*feasible with"):
                check_budget(params)


def test_known_errors_are_one_line_and_verbose_adds_the_traceback(tmp_path, caplog):
    from typer.testing import CliRunner

    from flows.cli import app

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    args = ["params-check", "-p", str(params), "--set", "allocation.budget.value=1.5"]
    with caplog.at_level("ERROR"):
        quiet = CliRunner().invoke(app, args)
    assert quiet.exit_code == 2 and "Traceback" not in quiet.output
    assert not [r for r in caplog.records if r.exc_info]
    with caplog.at_level("ERROR"):
        verbose = CliRunner().invoke(app, ["--verbose", *args])
    assert verbose.exit_code == 2
    assert [r for r in caplog.records if r.exc_info and "ConfigError" in repr(r.exc_info[1].__class__)]


# -- tracking: orphaned runs, alias policy, registration, unreachable server --------------------
@pytest.fixture
def sqlite_tracking(tmp_path):
    from tasks.tracking import setup_tracking

    params = Params().with_overrides(
        {
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.artifact_root": str(tmp_path / "artifacts"),
        }
    )
    setup_tracking(params)
    return params


def _dead_pid() -> tuple[int, float]:
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def test_a_run_left_running_by_a_killed_process_is_marked_killed(sqlite_tracking):
    from mlflow import MlflowClient

    from tasks.tracking import end_orphaned_runs, process_tags

    client = MlflowClient()
    exp = client.get_experiment_by_name("slimdiff").experiment_id
    pid, started = _dead_pid()
    killed = client.create_run(
        exp,
        tags={**process_tags(), "slimdiff.pid": str(pid), "slimdiff.pid_started": f"{started:.3f}"},
    )
    alive = client.create_run(exp, tags=process_tags())  # this very process: still running
    foreign = client.create_run(exp, tags={**process_tags(), "slimdiff.host": "elsewhere"})
    assert end_orphaned_runs(sqlite_tracking) == [killed.info.run_id]
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(foreign.info.run_id).info.status == "RUNNING"


def test_alias_policy_table():
    from slimdiff.config import TrackingParams
    from tasks.tracking import alias_for

    expected = {  # policy -> trigger -> alias moved (gate passed)
        "committed": {"committed": "champion", "scheduled": "champion", "experiment": "candidate"},
        "scheduled": {"committed": "candidate", "scheduled": "champion", "experiment": "candidate"},
        "any": {"committed": "champion", "scheduled": "champion", "experiment": "champion"},
        "never": {"committed": "candidate", "scheduled": "candidate", "experiment": "candidate"},
    }
    for policy, by_trigger in expected.items():
        tracking = TrackingParams(alias_policy=policy)
        for trigger, alias in by_trigger.items():
            assert alias_for(tracking, trigger, True) == alias, (policy, trigger)
            assert alias_for(tracking, trigger, False) is None  # a failed gate moves nothing
        assert alias_for(tracking, "repair", True) is None
    assert alias_for(TrackingParams(candidate_alias=None), "experiment", True) is None
    with pytest.raises(ValueError, match="candidate_alias must differ"):
        TrackingParams(candidate_alias="champion")


def test_only_the_committed_params_file_counts_as_committed(tmp_path):
    from flows.cli import run_trigger

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    params = repo / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert run_trigger(params, None) == "experiment"  # not committed yet
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "params"], check=True)
    assert run_trigger(params, None) == "committed"
    assert run_trigger(params, ["allocation.tau=0.1"]) == "experiment"
    params.write_text(params.read_text() + "\n# a comment changes no param\n")
    assert run_trigger(params, None) == "committed"
    params.write_text(params.read_text().replace("tau: 0.0", "tau: 0.1"))
    assert run_trigger(params, None) == "experiment"
    outside = tmp_path / "params.yaml"
    outside.write_text((ROOT / "params.yaml").read_text())
    assert run_trigger(outside, None) == "experiment"


def test_registration_is_idempotent_even_when_another_workspace_races(sqlite_tracking, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from tasks import tracking

    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    lineage = {"compressed_digest": "c" * 64, "source_digest": "s" * 64}
    kw = dict(
        source_short_name="toy", pipeline_dir=pipeline, lineage=lineage, gate_passed=True, gate_reasons=[]
    )
    with mlflow.start_run():
        first = tracking.register_compressed(sqlite_tracking, **kw, trigger="committed")
        again = tracking.register_compressed(sqlite_tracking, **kw, trigger="experiment")
        # a workspace without our lock registered the same digest while we were logging ours
        real = tracking.find_version_by_digest
        calls = {"n": 0}

        def racing(client, name, digest):
            calls["n"] += 1
            return None if calls["n"] == 1 else real(client, name, digest)

        monkeypatch.setattr(tracking, "find_version_by_digest", racing)
        raced = tracking.register_compressed(sqlite_tracking, **kw, trigger="experiment")
    client = MlflowClient()
    versions = client.search_model_versions("name='slimdiff-toy'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["compressed_digest"] == "c" * 64 and versions[0].tags["trigger"] == "committed"
    assert (first["version"], first["new_version"], first["alias"]) == ("1", True, "champion")
    assert (again["version"], again["new_version"], again["alias"]) == ("1", False, "candidate")
    assert (raced["version"], raced["new_version"]) == ("1", False)
    assert str(client.get_model_version_by_alias("slimdiff-toy", "champion").version) == "1"


def test_unreachable_tracking_server_is_an_error_not_an_empty_registry(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.deployments import registered_source_digests
    from tasks.tracking import TrackingUnavailableError, setup_tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(TrackingUnavailableError, match="unreachable"):
        registered_source_digests(MlflowClient(tracking_uri=uri, registry_uri=uri), "slimdiff-releases")
    params = Params().with_overrides({"tracking.tracking_uri": uri})
    with pytest.raises(TrackingUnavailableError, match=f"tracking server {uri} is unreachable"):
        setup_tracking(params)

    releases = tmp_path / "releases"
    (releases / "v1").mkdir(parents=True)
    (releases / "v1" / "model_index.json").write_text("{}")
    out = CliRunner().invoke(
        app,
        [
            "check-releases",
            str(releases),
            "-p",
            str(ROOT / "params.yaml"),
            "--set",
            f"tracking.tracking_uri={uri}",
        ],
    )
    assert out.exit_code == 5, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: tracking server {uri} is unreachable"), lines
    assert "skipped" not in out.output and "ran" not in out.output


# -- processes left by a killed run ------------------------------------------------------------
def test_processes_of_a_killed_run_are_stopped_and_a_live_runs_are_not(tmp_path):
    import psutil

    from flows.runtime import RUNS_DIR, TOKEN_VAR, stop_orphans

    runs = tmp_path / RUNS_DIR
    runs.mkdir()
    dead_pid, dead_started = _dead_pid()
    me = psutil.Process()
    children = {}
    for name, owner in (("orphan", (dead_pid, dead_started)), ("live", (me.pid, me.create_time()))):
        token = f"token-{name}"
        (runs / f"{token}.json").write_text(
            json.dumps({"token": token, "pid": owner[0], "started": owner[1], "host": socket.gethostname()})
        )
        children[name] = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, TOKEN_VAR: token}
        )
    try:
        time.sleep(0.5)  # let the children exec (their environment is read from /proc)
        stopped = stop_orphans(tmp_path)
        assert [s["pid"] for s in stopped] == [children["orphan"].pid]
        assert children["orphan"].wait(timeout=10) is not None
        assert children["live"].poll() is None
        assert sorted(p.name for p in runs.iterdir()) == ["token-live.json"]
    finally:
        for child in children.values():
            child.kill()
            child.wait()


@pytest.mark.slow  # two fresh interpreters importing MLflow
def test_runs_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """Found while testing two runs at once: both ran the new database's migrations and one
    failed (alembic); the first touch of a SQLite store is now serialised."""
    code = (
        "import sys; from slimdiff.config import Params; from tasks.tracking import setup_tracking\n"
        "setup_tracking(Params().with_overrides({'tracking.tracking_uri': sys.argv[1]}))\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for e in errors]


def test_a_damaged_manifest_is_recomputed_not_a_crash(tmp_path):
    from tasks import prefect_tasks, stages

    params = Params().with_overrides({"tracking.artifact_root": str(tmp_path)})
    model = Manifest("model", "m", "d" * 64)

    def compute(out: Path) -> Manifest:
        with staged_dir(out, replace=False) as tmp:
            (tmp / "rank_plan.json").write_text('{"units": {}}')
        return stages._finish("plan", out, {})

    first = prefect_tasks._keyed(params, "plan", (model,), compute).manifest
    manifest_file = Path(first.uri) / "manifest.json"
    manifest_file.write_text(manifest_file.read_text()[:-5])  # truncated: not JSON any more
    again = prefect_tasks._keyed(params, "plan", (model,), compute)
    assert again.outcome == "repaired" and "no readable manifest" in again.problem
    assert again.manifest.digest == first.digest
