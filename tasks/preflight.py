"""Checks of the params that need no model run, made before any stage starts.

A budget that cannot be met used to surface in the plan stage, after SlimSet selection, calibration
and influence had run (37 s on the toy model, hours on a real one). Whether it can be met depends
only on the shapes of the compression units, which the denoiser's config gives: the skeleton is
built on the meta device (no weights are read, nothing is allocated) by :func:`denoiser_units`.
"""

from __future__ import annotations

import json
from pathlib import Path

from slimdiff.config import Params
from tasks.stages import StageInputError, budget_from_params, read_prompt_source


def _denoiser_config_dir(params: Params) -> Path | None:
    """The folder holding the denoiser's config.json (None: a source whose layout is not known
    here, e.g. an already compressed slimdiff folder; its checks stay with the stages)."""
    from slimdiff.models import TOY_SOURCE, toy_pipeline_dir

    source = params.model.source
    if source == TOY_SOURCE:
        folder = toy_pipeline_dir()
    elif Path(source).expanduser().exists():
        folder = Path(source).expanduser()
    else:  # a hub id: its snapshot in the local cache (resolve_release reports a missing one)
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source, "unet/config.json", revision=params.model.revision)
        return Path(hit).parent if isinstance(hit, str) else None
    if (folder / "slimdiff.json").is_file():
        return None
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet"
    return folder if (folder / "config.json").is_file() else None


def denoiser_units(params: Params):
    """(compression units restricted to ``allocation.modules``, whole-denoiser parameter count) of
    the source model, from its config alone; None when the layout is not known here.

    The one place tasks/ builds a skeleton: re-point it at ``slimdiff.arch`` once model-family
    layouts live there."""
    import torch
    from diffusers import UNet2DConditionModel

    from slimdiff.adapter import compression_units

    config_dir = _denoiser_config_dir(params)
    if config_dir is None:
        return None
    config = json.loads((config_dir / "config.json").read_text())
    if config.get("_class_name", UNet2DConditionModel.__name__) != UNet2DConditionModel.__name__:
        return None
    with torch.device("meta"):
        skeleton = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir))
    units = {n: u for n, u in compression_units(skeleton).items() if u.kind in params.allocation.modules}
    return units, sum(p.numel() for p in skeleton.parameters())


def check_budget(params: Params) -> None:
    """Raise StageInputError (one line, the key named) when allocation.budget cannot be met."""
    from slimdiff.allocation import feasible_range

    found = denoiser_units(params)
    if found is None:
        return
    units, model_params = found
    cfg = params.allocation
    budget = budget_from_params(params)
    compressible = sum(u.full_params for u in units.values())
    target = budget.kept(compressible, model_params)
    lo, hi = feasible_range(units, cfg.r_min, cfg.multiple)
    if not lo <= target <= hi:
        raise StageInputError(
            f"allocation.budget: budget {budget.to_dict()} asks to keep {target} of {compressible} "
            f"compressible parameters; feasible with r_min={cfg.r_min}, multiple={cfg.multiple}: "
            f"kept_params in [{lo}, {hi}] ({budget.describe_range(lo, hi, compressible, model_params)})"
        )


def check_params(params: Params) -> None:
    """Everything about ``params`` that can be known without running the model: the prompt
    sources exist and the budget is feasible. Raises StageInputError with one clear line."""
    for spec in dict.fromkeys([params.slimset.pool, *params.slimset.exclude, params.evaluation.prompts]):
        read_prompt_source(spec)
    check_budget(params)
