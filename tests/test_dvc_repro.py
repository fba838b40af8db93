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

from slimdiff.models import toy_pipeline_dir

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


def test_dvc_repro_is_incremental(tmp_path):
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
    dvc = str(venv / "bin" / "dvc")

    def run(*args: str) -> str:
        out = subprocess.run([dvc, *args], cwd=work, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    run("init", "--no-scm", "-q")
    run("config", "core.analytics", "false")
    first = _ran_stages(run("repro"))
    assert first == {"slimset", "calibrate", "influence", "plan", "compress", "evaluate"}
    assert (work / "dvc.lock").exists() and (work / "data" / "plan" / "rank_plan.json").exists()

    assert _ran_stages(run("repro")) == set()  # nothing changed: nothing runs

    params["allocation"]["tau"] = 0.5
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran_stages(run("repro")) == {"plan", "compress", "evaluate"}
