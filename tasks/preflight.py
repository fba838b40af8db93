"""Checks of the params that need no model run, made before any stage starts.

A budget that cannot be met used to surface in the plan stage, after SlimSet selection, calibration
and influence had run (37 s on the toy model, hours on a real one). Whether it can be met depends
only on the shapes of the compression units, which the denoiser's config gives: the skeleton is
built on the meta device (no weights are read, nothing is allocated) by :func:`denoiser_units`.
"""

from __future__ import annotations

from pathlib import Path

from slimdiff.config import ConfigError, Params
from tasks.stages import StageInputError, budget_from_params, read_prompt_source


def _denoiser_config_dir(params: Params) -> Path | None:
    """The folder holding the denoiser's config.json (None: a source whose layout is not known
    here, e.g. an already compressed slimdiff folder; its checks stay with the stages)."""
    from slimdiff.families.base import registered_adapters
    from slimdiff.formats.models import toy_source_dir

    attrs = list(dict.fromkeys(a.pipeline_attr for a in registered_adapters()))
    source = params.model.source
    folder = toy_source_dir(source)
    if folder is None and Path(source).expanduser().exists():
        folder = Path(source).expanduser()
    if folder is None:  # a hub id: its snapshot in the local cache (resolve_release reports a missing one)
        from huggingface_hub import try_to_load_from_cache

        for attr in attrs:
            hit = try_to_load_from_cache(source, f"{attr}/config.json", revision=params.model.revision)
            if isinstance(hit, str):
                return Path(hit).parent
        return None
    if (folder / "slimdiff.json").is_file():
        return None
    for attr in attrs:
        if (folder / attr / "config.json").is_file():
            return folder / attr
    return folder if (folder / "config.json").is_file() else None


def denoiser_units(params: Params):
    """(compression units the plan stage would allocate, whole-denoiser parameter count) of the
    source model, from its config alone (``slimdiff.families.base.skeleton_from_config``); None when
    the layout is not known here."""
    from slimdiff.families.base import skeleton_from_config
    from slimdiff.families.units import compression_units
    from tasks.stages import planned_units

    config_dir = _denoiser_config_dir(params)
    if config_dir is None:
        return None
    skeleton = skeleton_from_config(config_dir)
    if skeleton is None:
        return None
    units = planned_units(compression_units(skeleton), params.allocation.modules, params.compression.qk_norm)
    return units, sum(p.numel() for p in skeleton.parameters())


def _config_only_pipe(params: Params, skeleton):
    """What ``slimdiff.planning.flops.serving_shape`` reads of a pipeline, from the pipeline folder's config
    files alone: the meta-device denoiser, its tokenizers' ``model_max_length`` and the VAE's
    downsampling factor. None when the folder does not hold them (the plan stage judges then)."""
    import json
    from types import SimpleNamespace

    from slimdiff.families.base import adapter_for

    config_dir = _denoiser_config_dir(params)
    folder = config_dir.parent if config_dir is not None else None
    if folder is None or not (folder / "model_index.json").is_file():
        return None
    pipe = SimpleNamespace(**{adapter_for(skeleton).pipeline_attr: skeleton})
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        cfg = folder / name / "tokenizer_config.json"
        if cfg.is_file():
            length = json.loads(cfg.read_text()).get("model_max_length")
            setattr(pipe, name, SimpleNamespace(model_max_length=int(length) if length else 77))
    vae = folder / "vae" / "config.json"
    if vae.is_file():
        pipe.vae_scale_factor = 2 ** (len(json.loads(vae.read_text()).get("block_out_channels", [0] * 4)) - 1)
    return pipe


def _flop_costs(params: Params):
    """The FLOP cost model the plan stage will spend a FLOP budget in (``slimdiff.api.cost_model``:
    one meta-device trace at ``allocation.serving``), from the config files alone; None when they
    do not give it."""
    from slimdiff.api import cost_model
    from slimdiff.families.base import skeleton_from_config
    from slimdiff.families.units import compression_units

    config_dir = _denoiser_config_dir(params)
    skeleton = skeleton_from_config(config_dir) if config_dir is not None else None
    pipe = _config_only_pipe(params, skeleton) if skeleton is not None else None
    if pipe is None:
        return None
    try:
        return cost_model(pipe, skeleton, params, compression_units(skeleton))
    except (AttributeError, TypeError, ValueError, RuntimeError):  # a family reading more of the pipeline
        return None


def check_budget(params: Params) -> None:
    """Raise StageInputError (one line, the key named) when allocation.budget cannot be met. A FLOP
    budget is judged on the FLOP trace at ``allocation.serving`` the plan stage will make, built
    from the config files (nothing is loaded or run); a latency budget is left to the plan stage
    (it needs the measured table)."""
    from slimdiff.planning.allocation import check_feasible
    from slimdiff.planning.budget import InfeasibleBudgetError

    found = denoiser_units(params)
    if found is None:
        return
    units, model_params = found
    cfg = params.allocation
    budget = budget_from_params(params)
    costs = None
    if budget.in_flops:
        costs = _flop_costs(params)
        if costs is None:
            return
    elif budget.in_latency:
        return
    try:
        check_feasible(units, budget, cfg.r_min, cfg.multiple, model_params, costs=costs)
    except InfeasibleBudgetError as err:
        raise StageInputError(f"allocation.budget: {err}") from None


def check_params(params: Params) -> None:
    """Everything about ``params`` that can be known without running the model: the prompt
    sources exist and the budget is feasible. Raises StageInputError with one clear line."""
    for spec in dict.fromkeys([params.slimset.pool, *params.slimset.exclude, params.evaluation.prompts]):
        read_prompt_source(spec)
    if not params.search.values:
        check_budget(params)
        return
    # a budget search: infeasible points are recorded and skipped, but a sweep with none left is refused
    problems = []
    for value in params.search.values:
        try:
            check_budget(params.with_overrides({"allocation.budget.value": value}))
        except StageInputError as err:
            problems.append(f"{value:g}: {err}")
        except ConfigError as err:  # the value is out of range for allocation.budget.kind
            raise ConfigError(f"search.values: {value:g} is not a valid budget ({err})") from None
    if len(problems) == len(params.search.values):
        raise StageInputError("search.values: no budget is feasible; " + " | ".join(problems))
