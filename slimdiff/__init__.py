"""slimdiff: training-free SlimDiff compression of diffusion UNets (arXiv 2509.21498).

The library layer: math, hooks, module surgery, SlimSet and metrics. It imports torch, diffusers
and open_clip, never prefect, mlflow or dvc (those live in ``tasks/`` and ``flows/``), so a user can
compress a pipeline in a notebook without any orchestration: ``pipe, report = slimdiff.slim(pipe,
prompts)``. Submodules are imported lazily so ``import slimdiff`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "slim": "api",  # the one call: calibrate, influence, plan, compress with params.yaml's defaults
    "SlimReport": "api",
    "Params": "config",
    "ConfigError": "config",
    "load_params": "config",
    "ActivationStats": "core.stats",
    "merge": "core.stats",
    "compression_units": "families.units",
    "describe_unet": "families.units",
    "UnsupportedModelError": "families.units",
    "build_slimset": "calibration.slimset",
    "SlimSet": "calibration.slimset",
    "collect_stats": "calibration.collect",
    "compute_influence": "planning.influence",
    "Influence": "planning.influence",
    "Budget": "planning.budget",
    "RankPlan": "planning.plan",
    "plan_ranks": "planning.allocation",
    "compress_": "surgery.compress",
    "save_compressed": "formats.io",
    "load_compressed": "formats.io",
    "to_slim_": "formats.loading",
    "load_pipeline": "formats.models",
    "unet_flops": "planning.flops",
    "evaluate_pair": "evaluation.evaluate",
    "write_report": "evaluation.report",
    "compare_table": "evaluation.report",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None and (name.startswith("Slim") or name == "ModelMixin"):
        # SlimUNet2DConditionModel, ... (slimdiff.formats.loading); diffusers' loader also asks the module
        # of a component for its loadable base class, ModelMixin
        return getattr(importlib.import_module("slimdiff.formats.loading"), name)
    if module is None:
        raise AttributeError(f"module 'slimdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"slimdiff.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
