"""Foundation: config validation, import isolation of the library layer, CLI surface, env defaults."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from slimdiff.config import STAGE_PARAMS, ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def _params_dict() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_load_and_match_defaults():
    params = load_params(ROOT / "params.yaml")
    # params.yaml spells out every default: the file and the code cannot drift apart silently
    assert params == Params()
    assert (params.allocation.budget.kind, params.allocation.budget.value) == ("removed_flops_fraction", 0.55)
    assert params.flat()["allocation.tau"] == 0.0 and params.flat()["allocation.mode"] == "error"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["allocation"].update(tao=0.5), "allocation.tao: unknown key"),
        (
            lambda d: d["allocation"]["budget"].update(value=-0.4),
            "allocation.budget: value: removed_flops_fraction must be in (0, 1)",
        ),
        (
            lambda d: d["allocation"]["budget"].update(kind="removed_params", value=-5.0),
            "allocation.budget: value: removed_params must be a positive",
        ),
        (
            lambda d: d["calibration"].update(batch_size="sixteen"),
            "calibration.batch_size: must be an integer (got 'sixteen')",
        ),
        (lambda d: d["allocation"].update(tau="0.5"), "allocation.tau: must be a number (got '0.5')"),
        (
            lambda d: d["influence"].update(weighting="linear"),
            "influence.weighting: must be one of 'spectral', 'uniform' or 'snr'",
        ),
        (
            lambda d: d["calibration"].update(n_buckets=50),
            "calibration: n_buckets (50) must be <= num_inference_steps (20)",
        ),
        (lambda d: d.update(extra_group={}), "extra_group: unknown key"),
    ],
)
def test_malformed_params_fail_with_the_key_named(mutate, expected):
    data = _params_dict()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        Params.from_dict(data, source="params.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("params.yaml: ")


def test_overrides_are_validated():
    p = Params().with_overrides({"allocation.tau": 0.25})
    assert p.allocation.tau == 0.25
    with pytest.raises(ConfigError, match="allocation.tau: Input should be greater than or equal to 0"):
        Params().with_overrides({"allocation.tau": -1.0})
    with pytest.raises(ConfigError, match="unknown key 'taux'"):
        Params().with_overrides({"allocation.taux": 1.0})


def test_stage_digest_covers_only_its_params():
    base = Params()
    changed = base.with_overrides({"allocation.tau": 0.5})
    assert base.digest(STAGE_PARAMS["plan"]) != changed.digest(STAGE_PARAMS["plan"])
    for stage in ("slimset", "calibrate", "influence", "compress", "evaluate"):
        assert base.digest(STAGE_PARAMS[stage]) == changed.digest(STAGE_PARAMS[stage])


def test_import_slimdiff_does_not_import_orchestration():
    code = textwrap.dedent(
        """
        import sys, importlib, pkgutil
        import slimdiff
        for m in pkgutil.walk_packages(slimdiff.__path__, "slimdiff."):
            importlib.import_module(m.name)
        bad = sorted(n for n in sys.modules if n.split(".")[0] in {"prefect", "mlflow", "dvc"})
        assert not bad, bad
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_slimdiff_imports_without_orchestration_installed(tmp_path):
    # Shadow prefect/mlflow/dvc with packages that fail on import: the library must not care.
    for name in ("prefect", "mlflow", "dvc"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed')\n")
    code = "import slimdiff, slimdiff.config, slimdiff.core.stats, slimdiff.families.units; print(slimdiff.__version__)"
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]


def test_env_defaults_do_not_override_the_environment(tmp_path, monkeypatch):
    from slimdiff.env import apply_env_defaults

    env_file = tmp_path / "slimdiff.env"
    env_file.write_text("# comment\nSLIMDIFF_TEST_A=1\nSLIMDIFF_TEST_B=2\nPREFECT_HOME=.prefect\n")
    monkeypatch.setenv("SLIMDIFF_TEST_B", "kept")
    monkeypatch.delenv("SLIMDIFF_TEST_A", raising=False)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    applied = apply_env_defaults(env_file)
    import os

    assert os.environ["SLIMDIFF_TEST_A"] == "1"
    assert os.environ["SLIMDIFF_TEST_B"] == "kept"
    assert applied["PREFECT_HOME"] == str(tmp_path / ".prefect")


def test_committed_env_file_turns_telemetry_off():
    from slimdiff.env import read_env_file

    env = read_env_file(ROOT / "slimdiff.env")
    assert env["DO_NOT_TRACK"] == "1"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert int(env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 60
    dvc_config = (ROOT / ".dvc" / "config").read_text()
    assert "analytics = false" in dvc_config
