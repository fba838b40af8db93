"""`slimdiff run` as a process (issue 13): SIGTERM and SIGKILL during calibration leave no process
behind (the temporary Prefect server is owned; after SIGKILL the next run stops the orphan and
marks the MLflow run KILLED), and an infeasible budget fails in one line before anything runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slimdiff.config import Params
from slimdiff.formats.models import toy_pipeline_dir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (toy_pipeline_dir() / "model_index.json").exists(), reason="toy model not committed"
    ),
]

TINY = {
    "slimset.n": 8,
    "calibration.num_inference_steps": 4,
    "calibration.n_buckets": 2,
    "calibration.shard_size": 4,
    "evaluation.max_prompts": 8,
    "evaluation.num_inference_steps": 4,
    "evaluation.latency_repeats": 1,
}


def _workspace(root: Path, **overrides) -> tuple[Path, Params]:
    root.mkdir(parents=True)
    params = Params().with_overrides(
        {
            **TINY,
            "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "tracking.artifact_root": str(root / "artifacts"),
            **overrides,
        }
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return root / "params.yaml", params


def _env(root: Path, slow_shards: bool = False) -> dict[str, str]:
    """A run with its own Prefect home and temporary server (no PREFECT_API_URL)."""
    paths = [str(ROOT)]
    if slow_shards:  # each calibration shard takes 3 s more (in the child only): the kill lands mid-stage
        hook = root / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(
            "import time, tasks.stages as s\n"
            "_orig = s.collect_shard\n"
            "def _slow(*a, **k):\n"
            "    time.sleep(3)\n"
            "    return _orig(*a, **k)\n"
            "s.collect_shard = _slow\n"
        )
        paths.insert(0, str(hook))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {
        **env,
        "PYTHONPATH": os.pathsep.join(paths),
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect" / "storage"),
    }


def _processes_with(var: str, value: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(var) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _runs(params: Params) -> list:
    from mlflow import MlflowClient

    from tasks.tracking import setup_tracking

    setup_tracking(params)
    client = MlflowClient()
    return client.search_runs([client.get_experiment_by_name("slimdiff").experiment_id])


def _cmdline(p) -> str:
    """A process's command line, "" once it has exited (a short-lived child can turn zombie or vanish
    between listing the children and reading it)."""
    import psutil

    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def _wait_until_calibrating(proc, root: Path, timeout: float = 300) -> list:
    """Wait for the store to exist and the temporary server to run; returns the run's children."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        children = psutil.Process(proc.pid).children(recursive=True)
        servers = [c for c in children if "uvicorn" in _cmdline(c)]
        if servers and list((root / "artifacts" / "calibrate").glob("*.zarr")):
            return children
        time.sleep(0.3)
    out = proc.stdout.read() if proc.poll() is not None else ""
    raise AssertionError(f"run never reached calibration (rc {proc.poll()}): {out[-3000:]}")


def test_sigterm_and_sigkill_during_calibration_leave_no_process_behind(tmp_path):
    import psutil
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from flows.cli import app

    term_params_file, term_params = _workspace(tmp_path / "term")
    kill_params_file, kill_params = _workspace(tmp_path / "kill")
    procs = {}
    for name, params_file in (("term", term_params_file), ("kill", kill_params_file)):
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "-p", str(params_file)],
            cwd=params_file.parent,
            env=_env(params_file.parent, slow_shards=True),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        term_children = _wait_until_calibrating(procs["term"], tmp_path / "term")
        kill_children = _wait_until_calibrating(procs["kill"], tmp_path / "kill")

        procs["term"].send_signal(signal.SIGTERM)
        procs["kill"].send_signal(signal.SIGKILL)
        assert procs["term"].wait(timeout=120) == 128 + signal.SIGTERM, procs["term"].stdout.read()[-3000:]
        assert procs["kill"].wait(timeout=60) == -signal.SIGKILL

        # SIGTERM: the run stopped its own server and recorded itself as KILLED
        _, alive = psutil.wait_procs(term_children, timeout=10)
        assert alive == [], [_cmdline(p) for p in alive]
        assert [r.info.status for r in _runs(term_params)] == ["KILLED"]

        # SIGKILL: nothing could run in the killed process: its server is an orphan (the fault) ...
        orphans = [p for p in kill_children if p.is_running() and "uvicorn" in _cmdline(p)]
        assert orphans, "expected the killed run's temporary server to outlive it"
        assert [r.info.status for r in _runs(kill_params)] == ["RUNNING"]
        # ... until the next run in that workspace (here one that fails its params check at once)
        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # start no server here
            nxt = CliRunner().invoke(
                app, ["run", "-p", str(kill_params_file), "--set", "allocation.budget.value=0.99"]
            )
        assert nxt.exit_code == 3, nxt.output
        _, alive = psutil.wait_procs(orphans, timeout=10)
        assert alive == []
        assert [r.info.status for r in _runs(kill_params)] == ["KILLED"]
        assert not list((tmp_path / "kill" / "artifacts" / ".runs").glob("*.json"))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for root in ("term", "kill"):
            for proc in _processes_with("PREFECT_HOME", str(tmp_path / root / "prefect")):
                proc.kill()


def test_infeasible_budget_fails_in_one_line_before_anything_runs(tmp_path):
    """Before: ~100 lines of Prefect traceback, twice, after SlimSet, calibration and influence
    had run. Now: one line, exit 3, no stage output, no process left behind."""
    params_file, params = _workspace(tmp_path / "w")
    env = _env(tmp_path / "w")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "-p",
            str(params_file),
            "--set",
            "allocation.budget.value=0.99",
        ],
        cwd=params_file.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 3, out.stderr[-3000:]
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "error: allocation.budget: budget {'removed_flops_fraction': 0.99}"
    ), lines  # the default FLOP budget, judged on a meta-device trace built from the config files
    assert "kept FLOPs in [" in lines[0] and "removed_flops_fraction in [" in lines[0]
    stage_dirs = [p.name for p in (tmp_path / "w" / "artifacts").iterdir() if not p.name.startswith(".")]
    assert stage_dirs == []
    time.sleep(1)
    assert _processes_with("PREFECT_HOME", env["PREFECT_HOME"]) == []
