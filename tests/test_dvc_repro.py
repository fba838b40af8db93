"""`dvc repro` runs the same stages from dvc.yaml with the same incremental behaviour as the flow:
changing only the allocation temperature reruns plan, compress and evaluate, nothing upstream. It
runs as from a fresh clone after `make install`: nothing activated, the venv not on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimdiff.formats.models import toy_pipeline_dir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (toy_pipeline_dir() / "model_index.json").exists(), reason="toy model not committed"
    ),
]

SMALL = {
    "slimset": {"n": 12},
    "calibration": {"num_inference_steps": 6, "n_buckets": 3, "batch_size": 6, "shard_size": 6},
    "evaluation": {"max_prompts": 8, "num_inference_steps": 6, "latency_repeats": 2},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def _project(tmp_path):
    """A project folder with what dvc.yaml needs, a venv link like a fresh clone's, and an env
    without the venv on PATH; returns (work, params, env, dvc)."""
    work = tmp_path / "proj"
    work.mkdir()
    # the files dvc.yaml depends on (the library itself is the installed package)
    shutil.copy(ROOT / "dvc.yaml", work)
    shutil.copytree(ROOT / "slimdiff", work / "slimdiff", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "toy", work / "data" / "toy")
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), SMALL)
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # what `make install` leaves in a fresh clone: .venv; nothing of it on PATH (issue 13: the
    # stages called a console script only an activated venv has, and failed with exit 127)
    venv = Path(sys.prefix).resolve()
    (work / ".venv").symlink_to(venv, target_is_directory=True)
    path = [
        p for p in os.environ["PATH"].split(os.pathsep) if p and not Path(p).resolve().is_relative_to(venv)
    ]
    env = {**os.environ, "PATH": os.pathsep.join(path), "DVC_NO_ANALYTICS": "1"}
    env.pop("VIRTUAL_ENV", None)
    assert shutil.which("slimdiff", path=env["PATH"]) is None
    return work, params, env, str(venv / "bin" / "dvc")


def _runner(work, env, dvc):
    def run(*args: str) -> str:
        out = subprocess.run([dvc, *args], cwd=work, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    return run


def test_dvc_repro_is_incremental(tmp_path):
    work, params, env, dvc = _project(tmp_path)
    run = _runner(work, env, dvc)
    run("init", "--no-scm", "-q")
    run("config", "core.analytics", "false")
    first = _ran_stages(run("repro"))
    assert first == {"slimset", "calibrate", "influence", "plan", "compress", "evaluate"}
    assert (work / "dvc.lock").exists() and (work / "data" / "plan" / "rank_plan.json").exists()

    assert _ran_stages(run("repro")) == set()  # nothing changed: nothing runs

    params["allocation"]["tau"] = 0.5
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran_stages(run("repro")) == {"plan", "compress", "evaluate"}


def test_dvc_exp_sweeps_budgets_and_shows_their_metrics(tmp_path):
    """The DVC way of a budget sweep: `dvc exp run -S allocation.budget.value=...` on dvc.yaml; the
    evaluate stage's metrics file (declared in dvc.yaml) holds the headline numbers of that run's
    metrics.json, and `dvc exp show` lists every experiment with its budget and metrics."""
    import json

    from tasks.stages import headline_metrics

    work, params, env, dvc = _project(tmp_path)
    run = _runner(work, env, dvc)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(work)]
    subprocess.run([*git, "init", "-q"], check=True)
    (work / ".gitignore").write_text("/artifacts\n/.venv\n/mlflow.db\n/mlartifacts\n")
    run("init", "-q")
    run("config", "core.analytics", "false")
    run("repro")
    summary = json.loads((work / "metrics" / "evaluate.json").read_text())
    full = headline_metrics(json.loads((work / "artifacts" / "dvc" / "eval" / "metrics.json").read_text()))
    assert summary["params_kept"] == full["params_kept"] and summary["psnr_db"] == full["psnr_db"]
    assert summary["gate_passed"] == int(full["gate_passed"]) and (work / "metrics" / "grid.png").is_file()
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], check=True)

    run("exp", "run", "-S", "allocation.budget.value=0.6", "-n", "budget-0.6")
    shown = json.loads(run("exp", "show", "--json"))
    rows = {}
    for entry in shown:  # the baseline commit, then its experiments
        for item in [entry, *(e for x in entry.get("experiments") or [] for e in x.get("revs", []))]:
            data = item.get("data") or {}
            value = (
                data.get("params", {}).get("params.yaml", {}).get("data", {})["allocation"]["budget"]["value"]
            )
            kept = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {}).get("params_kept")
            rows[value] = kept
    assert set(rows) == {0.55, 0.6}, rows  # the committed default (55% of the FLOPs), the experiment
    assert rows[0.6] < rows[0.55] == summary["params_kept"]  # more removed at the larger budget
