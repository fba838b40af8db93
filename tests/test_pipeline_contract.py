"""Contracts between the Prefect flow, dvc.yaml and the params: one source of truth for stage params."""

from __future__ import annotations

from pathlib import Path

import yaml

from slimdiff.config import STAGE_PARAMS, Params

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_stage_params_equal_the_flow_cache_key_params():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, spec in dvc.items():
        assert tuple(spec["params"]) == STAGE_PARAMS[stage], stage
    # every cached flow stage is a DVC stage (register is a side effect, not a DVC output)
    assert set(STAGE_PARAMS) - set(dvc) == {"register"}


def test_every_stage_param_path_exists():
    data = Params().model_dump()
    for keys in STAGE_PARAMS.values():
        for dotted in keys:
            node = data
            for part in dotted.split("."):
                assert part in node, dotted
                node = node[part]


def test_stage_keys_change_only_downstream_of_a_param_change():
    from tasks.artifacts import Manifest
    from tasks.stages import stage_key

    base = Params()
    tau = base.with_overrides({"allocation.tau": 0.3})
    inp = Manifest("x", "u", "d")
    for stage in ("slimset", "calibrate", "influence", "compress", "evaluate"):
        assert stage_key(stage, base, inp) == stage_key(stage, tau, inp), stage
    assert stage_key("plan", base, inp) != stage_key("plan", tau, inp)
    # a changed input digest changes the key
    assert stage_key("plan", base, inp) != stage_key("plan", base, Manifest("x", "u", "other"))
