"""Save and load compressed denoisers (and whole pipelines around them).

A compressed folder loads with a plain ``DiffusionPipeline.from_pretrained(folder)`` (or the
denoiser alone with its class's ``from_pretrained(folder, subfolder=...)``): the denoiser is saved
as its slimdiff class (``slimdiff.formats.loading``), a subclass of the stock one whose config carries the
rank plan, so the skeleton is built at the compressed shapes before the weights load. Layout:

    <dir>/config.json                             the stock config + "slimdiff": plan and layout
                                                  options; _class_name Slim<StockClass>
    <dir>/diffusion_pytorch_model.safetensors     the compressed weights (stock module names)
    <dir>/slimdiff.json                           sidecar: format version, per-tensor shape and
                                                  dtype, sha256 of the weights file, plan digest,
                                                  and "lora_maps": index + sha256 of the file below
    <dir>/slimdiff_lora_maps.safetensors          the linear maps of the rewritten layers, for
                                                  projecting LoRAs of the original (slimdiff.formats.lora)

For a pipeline, ``<dir>`` is a normal ``save_pretrained`` folder whose denoiser subfolder
(``unet/`` or ``transformer/``; Wan 2.2 A14B: ``transformer/`` and ``transformer_2/``) has the
layout above and whose ``model_index.json`` names the slimdiff class. Every mismatch between
sidecar, plan, config and weights (edited sidecar, wrong ranks, changed or truncated weights) is an
error that says what differs; a folder never loads into a silently different model.

Folders of the first format (stock config class, plan only in the sidecar; sidecar
format_version 1) still load through ``load_compressed``, which rebuilds the shapes from the
sidecar as before.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimdiff.core.digests import file_sha256
from slimdiff.families.base import UnsupportedModelError, adapter_for_class
from slimdiff.families.units import denoisers
from slimdiff.formats import loading
from slimdiff.formats.loading import to_slim_
from slimdiff.formats.sidecar import (
    CONFIG_KEY,
    SIDECAR_FORMAT_VERSION,
    SIDECAR_NAME,
    WEIGHTS_NAME,
    CompressedModelError,
    compare_shapes,
    null_components,
    read_lora_maps,
    read_sidecar,
    verify_lora_maps,
)
from slimdiff.planning.plan import PlanValidationError, RankPlan
from slimdiff.surgery.compress import apply_plan_shapes_
from slimdiff.surgery.maps import (
    COMPRESSION_ATTRIBUTE,
    FOLDER_ATTRIBUTE,
    LORA_MAPS_ATTRIBUTE,
    LORA_MAPS_NAME,
    PLAN_ATTRIBUTE,
    LoraMapsMissingError,
)
from slimdiff.surgery.maps import SIDECAR_KEY as LORA_SIDECAR_KEY

logger = logging.getLogger(__name__)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "components") and hasattr(obj, "save_pretrained") and not isinstance(obj, nn.Module)


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def _lora_maps_for_save(unet: nn.Module):
    """The LoraMaps to write with ``unet``: those compress_ recorded, else those of the folder it
    was loaded from; None (folder saved without maps) when there are none."""

    maps = getattr(unet, LORA_MAPS_ATTRIBUTE, None)
    if maps is None and getattr(unet, FOLDER_ATTRIBUTE, None):
        try:
            maps = read_lora_maps(getattr(unet, FOLDER_ATTRIBUTE))
        except LoraMapsMissingError:
            maps = None
    if maps is None:
        logger.warning(
            "saving a compressed model without LoRA maps (compressed with lora_maps=False or loaded from a "
            "folder without them): LoRAs of the original model cannot be projected onto the saved folder"
        )
    return maps


def _save_unet(unet: nn.Module, directory: Path, plan: RankPlan, extra: dict | None) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    to_slim_(unet)  # its slimdiff class: config.json then carries the plan and names that class
    unet.save_config(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    # one metadata entry only: safetensors writes its metadata map in a per-process random order,
    # so two entries gave the same tensors two different byte sequences (and digests) across runs
    save_file(state, str(weights), metadata={"format": "pt"})
    maps = _lora_maps_for_save(unet)
    if maps is not None and maps.plan_digest not in (None, plan.digest):
        raise CompressedModelError(
            f"the model's LoRA maps belong to plan {maps.plan_digest[:12]}, the folder is saved with plan "
            f"{plan.digest[:12]}"
        )
    sidecar = {
        "format_version": SIDECAR_FORMAT_VERSION,
        "model_class": type(unet).__name__,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": file_sha256(weights),
        "plan_digest": plan.digest,
        "plan": plan.to_dict(),
        # layout options beyond the ranks (e.g. how a QK under RMSNorms was rebuilt)
        "compression": dict(getattr(unet, COMPRESSION_ATTRIBUTE, None) or {}),
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in state.items()},
        "extra": dict(extra or {}),
    }
    stale = directory / LORA_MAPS_NAME
    if stale.exists():
        stale.unlink()
    if maps is not None:
        sidecar[LORA_SIDECAR_KEY] = maps.save(directory)
    (directory / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=1) + "\n")
    logger.info("saved compressed %s (%d tensors) to %s", type(unet).__name__, len(state), directory)
    return directory


def save_compressed(
    pipeline_or_unet: Any, directory: str | Path, *, plan: RankPlan | None = None, extra: dict | None = None
) -> Path:
    """Write a compressed UNet (or a pipeline containing one) to ``directory``.

    ``plan`` defaults to the plan ``compress_`` recorded on the UNet. For a pipeline the whole
    pipeline is saved with ``save_pretrained``, its ``unet/`` folder is written by SlimDiff and a
    top-level ``slimdiff.json`` marks the folder as compressed (it points at ``unet/``).
    ``extra`` is free-form JSON (e.g. lineage) stored in the sidecar(s) under "extra".

    A pipeline of several denoisers (``slimdiff.families.units.denoisers``; Wan 2.2 A14B:
    ``transformer`` and ``transformer_2``) has each compressed one written in this layout (``plan``
    is the first one's); the top-level sidecar then also lists ``"denoisers"``: {subfolder: plan
    digest}, and points ``unet_subfolder`` / ``plan_digest`` at the first compressed one."""
    directory = Path(directory)
    if not _is_pipeline(pipeline_or_unet):
        unet = pipeline_or_unet
        plan = plan or getattr(unet, PLAN_ATTRIBUTE, None)
        if plan is None:
            raise CompressedModelError(
                "no rank plan: pass plan=... or save a UNet returned by compress_ (it records unet.slimdiff_plan)"
            )
        return _save_unet(unet, directory, plan, extra)
    pipe = pipeline_or_unet
    models = denoisers(pipe)
    first = next(iter(models))
    plans = {
        name: (plan if name == first and plan is not None else getattr(model, PLAN_ATTRIBUTE, None))
        for name, model in models.items()
    }
    plans = {name: p for name, p in plans.items() if p is not None}
    if not plans:
        raise CompressedModelError(
            "no rank plan: pass plan=... or save a UNet returned by compress_ (it records unet.slimdiff_plan)"
        )
    for name in plans:
        setattr(pipe, name, to_slim_(models[name]))  # model_index.json names the slimdiff class
    pipe.save_pretrained(directory, safe_serialization=True)
    for name, p in plans.items():
        sub_dir = directory / name
        if sub_dir.exists():
            shutil.rmtree(sub_dir)  # replaced by the SlimDiff layout below
        _save_unet(models[name], sub_dir, p, extra)
    sub = next(iter(plans))
    top = {
        "format_version": SIDECAR_FORMAT_VERSION,
        "kind": "pipeline",
        "unet_subfolder": sub,
        "plan_digest": plans[sub].digest,
        "extra": dict(extra or {}),
    }
    if len(models) > 1:
        top["denoisers"] = {name: p.digest for name, p in plans.items()}
    (directory / SIDECAR_NAME).write_text(json.dumps(top, indent=1) + "\n")
    return directory


def _load_unet(directory: Path, device: str | torch.device, torch_dtype: torch.dtype | None) -> nn.Module:
    from safetensors import safe_open

    sidecar = read_sidecar(directory)
    try:
        model_cls = adapter_for_class(str(sidecar.get("model_class"))).denoiser_class()
    except UnsupportedModelError as err:
        raise CompressedModelError(f"{directory}: {err}") from err
    try:
        plan = RankPlan.from_dict(sidecar["plan"])
    except (KeyError, PlanValidationError) as err:  # re-raised with the folder named
        raise CompressedModelError(f"{directory}/{SIDECAR_NAME}: invalid rank plan: {err}") from err
    if plan.digest != sidecar.get("plan_digest"):
        raise CompressedModelError(
            f"{directory}/{SIDECAR_NAME}: the rank plan does not match its recorded digest (the sidecar was "
            "edited); refusing to guess the layer shapes"
        )
    weights = directory / sidecar.get("weights_file", WEIGHTS_NAME)
    if not weights.is_file():
        raise CompressedModelError(f"{weights} not found")
    digest = file_sha256(weights)
    if digest != sidecar.get("weights_sha256"):
        raise CompressedModelError(
            f"{weights}: sha256 {digest[:12]}... does not match the sidecar's {str(sidecar.get('weights_sha256'))[:12]}...: "
            "the weights were changed or truncated after saving"
        )
    verify_lora_maps(directory, sidecar)

    config = model_cls.load_config(directory)
    # parameters on the meta device (no memory, no random init), buffers computed as the model's
    # __init__ computes them: non-persistent buffers (PixArt's sin-cos position table) are not in
    # the weights file, so a skeleton built wholly on meta would keep them empty
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        unet = model_cls.from_config(config)
    try:
        apply_plan_shapes_(unet, plan, **dict(sidecar.get("compression") or {}))
    except PlanValidationError as err:
        raise CompressedModelError(
            f"{directory}: the sidecar's plan does not fit config.json: {err}"
        ) from err

    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    recorded = {k: tuple(v["shape"]) for k, v in sidecar["tensors"].items()}
    compare_shapes(expected, recorded, "the plan applied to config.json", "the sidecar", directory)
    state = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        compare_shapes(expected, stored, "the plan applied to config.json", "the weights file", directory)
        for k in stored:
            state[k] = f.get_tensor(k)
    unet.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if leftover:
        raise CompressedModelError(f"{directory}: tensors not provided by the weights file: {leftover[:5]}")
    unet.eval()
    if torch_dtype is not None:
        unet.to(dtype=torch_dtype)
    unet.to(device)
    setattr(
        unet, FOLDER_ATTRIBUTE, str(directory)
    )  # slimdiff.formats.lora reads (and verifies) maps from here
    return unet


def load_compressed(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    pipeline_class: type | None = None,
    **pipeline_kwargs: Any,
) -> Any:
    """Load what ``save_compressed`` wrote: a denoiser, or a pipeline when ``directory`` holds a
    ``model_index.json`` (loaded with ``pipeline_class`` or ``DiffusionPipeline``). Current folders
    load through diffusers' own ``from_pretrained`` (the slimdiff class rebuilds the shapes and
    verifies the sidecar); first-format folders are rebuilt from their sidecar here. The denoiser
    is in eval mode with the compressed attention processor on every compressed attention."""
    directory = Path(directory)
    if (directory / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        top = read_sidecar(directory) if (directory / SIDECAR_NAME).is_file() else {}
        sub = top.get("unet_subfolder", "unet")

        cls = pipeline_class or DiffusionPipeline
        # components saved as absent (SD3 without T5): diffusers fills in only its optional ones
        kwargs = {**null_components(directory), **pipeline_kwargs}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype  # diffusers 0.42 name (torch_dtype is deprecated)
        if _is_slim_folder(directory / sub):
            pipe = cls.from_pretrained(directory, **kwargs)
            expected = dict(top.get("denoisers") or {sub: top.get("plan_digest")}) if top else {}
            for name, digest in expected.items():
                plan = getattr(getattr(pipe, name, None), PLAN_ATTRIBUTE, None)
                if plan is None or digest != plan.digest:
                    raise CompressedModelError(
                        f"{directory}/{SIDECAR_NAME}: plan digest differs from the one in its {name} folder (mixed folders?)"
                    )
            return pipe.to(device)
        unet = _load_unet(directory / sub, device, torch_dtype)
        if top and top.get("plan_digest") != unet.slimdiff_plan.digest:
            raise CompressedModelError(
                f"{directory}/{SIDECAR_NAME}: plan digest differs from the one in its unet folder (mixed folders?)"
            )
        pipe = cls.from_pretrained(directory, **{sub: unet}, **kwargs)
        return pipe.to(device)
    if _is_slim_folder(directory):
        config = json.loads((directory / "config.json").read_text())
        model = getattr(loading, config["_class_name"]).from_pretrained(directory, torch_dtype=torch_dtype)
        return model.eval().to(device)
    return _load_unet(directory, device, torch_dtype)


def _is_slim_folder(directory: Path) -> bool:
    """A denoiser folder of the current format (its config names a slimdiff class)."""

    config = directory / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return str(data.get("_class_name", "")).startswith("Slim") and CONFIG_KEY in data
