"""The one call (slimdiff.api.slim): the staged library calls with params.yaml's settings, bit for bit;
the public verbs' defaults equal params.yaml's; the statistics folder; the README's library example.

References: the staged calls as tasks/stages.py makes them (run_influence, run_plan, run_compress),
with the settings of slimdiff.Params() (= the committed params.yaml, tests/test_foundation.py). Same
inputs and same calls must give the same plan digest and identical tensors, not close ones."""

from __future__ import annotations

import copy
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_calib_collector import PROMPTS, make_tiny_pipeline

import slimdiff
from slimdiff.api import SlimReport, budget_of, slim
from slimdiff.config import ConfigError, Params, load_params
from slimdiff.planning.budget import Budget, InfeasibleBudgetError

ROOT = Path(__file__).resolve().parents[1]
TOY_PROMPTS = 4  # one calibration batch (batch_size 16): the toy world's first training captions


def staged(pipe, prompts: list[str], params: Params):
    """The library calls of the calibrate, influence, plan and compress stages (tasks/stages.py)."""
    from slimdiff.calibration.collect import collect_stats
    from slimdiff.families.units import compression_units, denoiser_of, planned_units
    from slimdiff.planning.allocation import plan_ranks
    from slimdiff.planning.influence import compute_influence
    from slimdiff.planning.spectra import error_profiles
    from slimdiff.surgery.compress import compress_
    from tasks.stages import budget_from_params

    cfg = params.calibration
    stats = collect_stats(pipe, prompts, **cfg.sampler_options(), progress=False)
    denoiser = denoiser_of(pipe)
    influence = compute_influence(stats, denoiser, weighting=params.influence.weighting)
    profiles = error_profiles(denoiser, influence.aggregate(stats), damping=params.compression.damping)
    all_units = compression_units(denoiser)
    units = planned_units(all_units, params.allocation.modules, params.compression.qk_norm)
    costs = None
    if params.allocation.budget.in_flops:
        from slimdiff.planning.flops import serving_shape, unit_flop_costs

        s = params.allocation.serving
        shape = serving_shape(pipe, height=s.height, width=s.width, batch=s.batch, text_len=s.text_len)
        costs = unit_flop_costs(denoiser, shape, params.compression.qk_norm, all_units)
    plan = plan_ranks(
        influence.score_of(),
        units,
        budget_from_params(params),
        model_params=sum(p.numel() for p in denoiser.parameters()),
        profiles=profiles if params.allocation.mode == "error" else None,
        costs=costs,
        **params.allocation.solver_options(),
    )
    # run_compress compresses with one thread, as slim does; conftest runs every test single-threaded
    report = compress_(denoiser, plan, influence.aggregate(stats), **params.compression.compress_options())
    return plan, report


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name, tensor in sa.items():
        assert tensor.shape == sb[name].shape and torch.equal(tensor, sb[name]), name


# -- the one call on the committed toy model ---------------------------------------------------
@pytest.fixture(scope="module")
def toy_runs():
    from slimdiff.formats.models import load_pipeline
    from slimdiff.toy.data import train_captions

    prompts = train_captions()[:TOY_PROMPTS]
    pipe = load_pipeline("toy")
    reference = copy.copy(pipe)  # the same text encoder, VAE and scheduler; its own UNet
    reference.unet = copy.deepcopy(pipe.unet)
    one_call, report = slim(pipe, prompts, progress=False)
    plan, compression = staged(reference, prompts, Params())
    return one_call, report, reference, plan, compression


def test_slim_is_the_staged_calls_with_the_params_defaults(toy_runs):
    one_call, report, reference, plan, compression = toy_runs
    assert isinstance(report, SlimReport) and report.params == Params() == load_params(ROOT / "params.yaml")
    assert report.plan.digest == plan.digest and report.plan == plan
    assert report.plan.mode == "error" and report.plan.budget == {"removed_flops_fraction": 0.55}
    assert_same_weights(one_call.unet, reference.unet)
    assert report.compression.to_dict() == compression.to_dict()
    assert report.params_before == compression.params_before == 3_881_252  # the toy UNet
    assert (
        report.params_after == compression.params_after == sum(p.numel() for p in one_call.unet.parameters())
    )
    cost = (
        report.plan.cost_model
    )  # 55% of the compressible FLOPs at the serving shape, not more than a rank step over
    assert cost["flops_after"] <= cost["target_flops"] and report.plan.digest[:12] in report.summary()
    assert report.store is None and report.reused_statistics is False


def test_the_one_call_is_exported_lazily():
    assert slimdiff.slim is slim and slimdiff.SlimReport is SlimReport
    assert "slim" in slimdiff.__all__ and "SlimReport" in dir(slimdiff)


# -- defaults ----------------------------------------------------------------------------------
def test_public_verb_defaults_are_the_params_defaults():
    """Each verb's keyword defaults equal the settings Params() (= params.yaml) gives the stage that
    calls it, so a library call without arguments does what the pipeline does."""
    from slimdiff.calibration.collect import collect_stats
    from slimdiff.families.units import planned_units
    from slimdiff.planning.allocation import plan_ranks
    from slimdiff.planning.influence import compute_influence
    from slimdiff.planning.spectra import error_profiles
    from slimdiff.surgery.compress import PRESETS, compress_

    params = Params()
    assert params == load_params(ROOT / "params.yaml")

    def defaults(fn) -> dict:
        return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}

    expected = {
        collect_stats: params.calibration.sampler_options(),
        compute_influence: {"weighting": params.influence.weighting},
        error_profiles: {"damping": params.compression.damping},
        plan_ranks: params.allocation.solver_options(),
        planned_units: {"qk_norm": params.compression.qk_norm},
    }
    for fn, wanted in expected.items():
        found = defaults(fn)
        assert {k: found.get(k, "<no default>") for k in wanted} == wanted, fn.__name__
    # compress_: ffn/qk/vo_method default to None = the kind's method in the `method` preset
    found = defaults(compress_)
    for key, value in params.compression.compress_options().items():
        kind = key.removesuffix("_method")
        got = found[key] if found[key] is not None or kind == key else PRESETS[found["method"]][kind]
        assert got == value, key


def test_budget_of_is_the_plan_stage_budget():
    from tasks.stages import budget_from_params

    for kind, value in [
        ("removed_fraction", 0.25),
        ("removed_params", 1000.0),
        ("kept_params", 2000.0),
        ("total_params", 3000.0),
        ("removed_flops_fraction", 0.3),
        ("total_flops", 4.0e9),
    ]:
        p = Params().with_overrides({"allocation.budget.kind": kind, "allocation.budget.value": value})
        assert budget_of(p) == budget_from_params(p)


# -- options -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD-shaped pipeline built from config and its original UNet weights."""
    pipe = make_tiny_pipeline(tmp_path_factory.mktemp("tiny"))
    pipe.set_progress_bar_config(disable=True)
    return pipe, {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def fresh(tiny):
    pipe, original = tiny
    pipe = copy.copy(pipe)  # shares text encoder and VAE; its own UNet with the original weights
    pipe.unet = copy.deepcopy(pipe.unet)
    pipe.unet.load_state_dict(original)
    return pipe


def test_options_are_params_overrides_and_refusals_come_before_sampling(tiny, monkeypatch):
    from slimdiff.calibration import collect as calibration

    calls = []
    monkeypatch.setattr(calibration, "collect_stats", lambda *a, **k: calls.append(1))
    with pytest.raises(TypeError, match="list of prompts"):
        slim(fresh(tiny), "a photo of a cat")
    with pytest.raises(ConfigError, match=r"slim\(\): allocation: .*tau"):
        slim(fresh(tiny), PROMPTS, mode="influence")  # influence needs tau > 0
    with pytest.raises(ConfigError, match="removed_fraction must be in"):
        slim(fresh(tiny), PROMPTS, budget=1.5)
    with pytest.raises(InfeasibleBudgetError, match="removed_fraction in"):
        slim(fresh(tiny), PROMPTS, budget=0.99)
    with pytest.raises(TypeError, match="budget"):
        slim(fresh(tiny), PROMPTS, budget="40%")
    assert calls == []

    from slimdiff.api import _settings

    got = _settings(Params(), Budget(kept_params=5000), "influence", 1.0, "keep", "1GiB", 7)
    assert got == Params().with_overrides(
        {
            "allocation.budget.kind": "kept_params",
            "allocation.budget.value": 5000.0,
            "allocation.mode": "influence",
            "allocation.tau": 1.0,
            "compression.qk_norm": "keep",
            "calibration.max_memory": "1GiB",
            "calibration.seed": 7,
        }
    )
    assert _settings(Params(), 0.3, None, None, None, None, None).calibration.max_memory is None
    custom = Params().with_overrides({"calibration.num_inference_steps": 6, "calibration.n_buckets": 2})
    assert _settings(custom, None, None, None, None, slimdiff.api.FROM_PARAMS, None) == custom


def test_store_gives_the_in_memory_result_and_is_reused(tiny, tmp_path, monkeypatch):
    params = Params().with_overrides(
        {"calibration.num_inference_steps": 6, "calibration.n_buckets": 2, "calibration.batch_size": 4}
    )
    memory, in_memory = slim(fresh(tiny), PROMPTS, params=params, budget=0.3, progress=False)
    store = tmp_path / "stats"
    stored, first = slim(fresh(tiny), PROMPTS, params=params, budget=0.3, store=store, progress=False)
    assert not first.reused_statistics and first.plan.digest == in_memory.plan.digest
    assert_same_weights(stored.unet, memory.unet)
    index = json.loads((store / "stats.json").read_text())
    assert len(index["files"]) == len(list((store / "moments").iterdir())) > 0

    from slimdiff.calibration import collect as calibration

    monkeypatch.setattr(calibration, "collect_stats", lambda *a, **k: pytest.fail("sampled again"))
    again, second = slim(fresh(tiny), PROMPTS, params=params, budget=0.3, store=store, progress=False)
    assert second.reused_statistics and second.plan.digest == in_memory.plan.digest
    assert_same_weights(again.unet, memory.unet)
    # another budget reuses the statistics too; other prompts or settings are refused, not overwritten
    assert slim(fresh(tiny), PROMPTS, params=params, budget=0.5, store=store, progress=False)[
        1
    ].reused_statistics
    with pytest.raises(ValueError, match="differing: calibration"):
        slim(fresh(tiny), PROMPTS, params=params, seed=1, store=store, progress=False)
    with pytest.raises(ValueError, match="differing: n_prompts, prompts_sha256"):
        slim(fresh(tiny), PROMPTS[:4], params=params, store=store, progress=False)
    first_file = store / next(iter(index["files"].values()))
    first_file.write_bytes(first_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        slim(fresh(tiny), PROMPTS, params=params, budget=0.3, store=store, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a slimdiff statistics folder"):
        slim(fresh(tiny), PROMPTS, params=params, store=tmp_path / "other", progress=False)


@pytest.mark.parametrize(
    "budget",
    [Budget(removed_flops_fraction=0.3), Budget(kept_params=60_000)],
    ids=["flops", "kept_params"],
)
def test_other_budgets_are_the_staged_calls_too(tiny, budget):
    """A FLOP budget (spent at allocation.serving) and an absolute one give the staged calls' plan
    and weights; the FLOP plan records its cost model."""
    params = Params().with_overrides({"calibration.num_inference_steps": 6, "calibration.n_buckets": 2})
    pipe, report = slim(fresh(tiny), PROMPTS, params=params, budget=budget, progress=False)
    kind, value = next((k, v) for k, v in vars(budget).items() if v is not None)
    same = params.with_overrides({"allocation.budget.kind": kind, "allocation.budget.value": float(value)})
    assert report.params == same
    reference = fresh(tiny)
    plan, compression = staged(reference, PROMPTS, same)
    assert report.plan.digest == plan.digest and report.plan.budget == budget.to_dict()
    assert_same_weights(pipe.unet, reference.unet)
    assert report.compression.to_dict() == compression.to_dict()
    if budget.in_flops:
        assert report.plan.cost_model["cost"] == "flops" and "FLOPs per denoiser forward" in report.summary()
        assert report.plan.flops_after < report.plan.flops_before
    else:
        assert not report.plan.cost_model and report.plan.params_after <= 60_000


def test_an_already_compressed_denoiser_is_refused_before_sampling(tiny):
    params = Params().with_overrides({"calibration.num_inference_steps": 4, "calibration.n_buckets": 2})
    pipe, _ = slim(fresh(tiny), PROMPTS[:2], params=params, mode="uniform", progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        slim(pipe, PROMPTS[:2], params=params)


# -- the README's example, as shown, in a fresh process ----------------------------------------
def readme_blocks(section: str) -> list[str]:
    """The python code blocks of a README section (from its heading to the next one)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


@pytest.mark.slow  # a fresh process, the toy loaded and calibrated twice: ~25 s on 2 cores
def test_readme_library_example_runs_as_shown(tmp_path):
    one_call, stage_by_stage = readme_blocks("Using the library without orchestration")
    assert "slimdiff.slim(pipe, prompts)" in one_call and "load_compressed(" in one_call
    # as shown, but calibrated on 4 of its 64 prompts (one batch) and one thread: 64 prompts take
    # minutes on a shared 2-core machine and add nothing to what this checks
    shown = "prompts = train_captions()[:64]"
    assert one_call.count(shown) == 1
    one_call = "import torch\ntorch.set_num_threads(1)\n" + one_call.replace(shown, shown.replace("64", "4"))
    check = (
        "import json\n"
        "a = json.load(open('slim-pipeline/slimdiff.json'))\n"
        "b = json.load(open('slim-pipeline-staged/slimdiff.json'))\n"
        "assert a['plan_digest'] == b['plan_digest'] == report.plan.digest\n"
        "assert type(load_compressed('slim-pipeline').unet).__name__ == 'SlimUNet2DConditionModel'\n"
        "print('ok', report.params_before, report.params_after)\n"
    )
    code = "\n".join([one_call, stage_by_stage, check])
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("ok 3881252 ")
