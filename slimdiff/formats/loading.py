"""Compressed denoisers as first-class diffusers models: ``DiffusionPipeline.from_pretrained(folder)``
loads a slimdiff folder with no slimdiff call, because the folder names slimdiff's classes.

A compressed denoiser is saved as an instance of a thin subclass of its stock class
(``SlimUNet2DConditionModel``, ``SlimPixArtTransformer2DModel``, ``SlimSD3Transformer2DModel``,
one per family adapter) whose config carries one more key, ``slimdiff``: the rank plan and the
layout options. Its ``__init__`` builds the stock skeleton from the config and then shrinks the
planned layers (``slimdiff.surgery.compress.apply_plan_shapes_``), so diffusers' own loader (meta-device
init, safetensors, dtype, device maps) fills a model of the right shapes. The pipeline's
``model_index.json`` records the class as ``["slimdiff", "SlimUNet2DConditionModel"]``. diffusers
(0.42) resolves a component's library only if it is one of its own libraries or a module the
calling process has already imported (it never imports what a repository names, since that would
run its code), so a loading process needs ``import slimdiff`` -- one import, no slimdiff call, no
``trust_remote_code``, no pickles. Module names stay those of the stock model (``to_q``,
``ff.net.2``, ...).

``from_pretrained`` of these classes also verifies the folder's ``slimdiff.json`` sidecar
(weights digest, plan digest) when it is there, and raises ``CompressedModelError`` naming what
differs.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from torch import nn

from slimdiff.core.digests import file_sha256
from slimdiff.families.base import UnsupportedModelError, adapter_for, adapter_for_class
from slimdiff.formats.sidecar import (
    CONFIG_FORMAT_VERSION,
    CONFIG_KEY,
    SIDECAR_NAME,
    CompressedModelError,
    compare_shapes,
    read_sidecar,
    verify_lora_maps,
)
from slimdiff.planning.plan import PlanValidationError, RankPlan
from slimdiff.surgery.compress import apply_plan_shapes_
from slimdiff.surgery.maps import COMPRESSION_ATTRIBUTE, FOLDER_ATTRIBUTE, PLAN_ATTRIBUTE

_SLIM_CLASSES: dict[str, type] = {}


def _slim_init(base: type):
    base_init = base.__init__

    def __init__(self, *args, slimdiff: dict | None = None, **kwargs):
        base_init(self, *args, **kwargs)
        if slimdiff:
            apply_plan_shapes_(
                self, RankPlan.from_dict(slimdiff["plan"]), **dict(slimdiff.get("compression") or {})
            )

    # diffusers reads a model's config keys from its __init__ signature: the stock parameters + ours
    sig = inspect.signature(base_init)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params.append(inspect.Parameter(CONFIG_KEY, inspect.Parameter.KEYWORD_ONLY, default=None))
    __init__.__signature__ = sig.replace(parameters=params)
    return __init__


def slim_class(base: type) -> type:
    """The slimdiff subclass of a stock diffusers denoiser class (created once, defined in this
    module so that ``model_index.json`` can name it)."""
    from diffusers.configuration_utils import register_to_config

    name = f"Slim{base.__name__}"
    if name not in _SLIM_CLASSES:

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            folder = Path(str(pretrained_model_name_or_path))
            if kwargs.get("subfolder"):
                folder = folder / kwargs["subfolder"]
            if folder.is_dir():  # a local folder: verify before loading (hub repos: after download)
                verify_folder(folder)
            model = super(cls, cls).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            if folder.is_dir():  # where slimdiff.formats.lora finds this model's LoRA maps
                setattr(model, FOLDER_ATTRIBUTE, str(folder))
            return model

        cls = type(
            name,
            (base,),
            {
                "__init__": register_to_config(_slim_init(base)),
                "from_pretrained": from_pretrained,
                # model_index.json records this module for the class: the top-level package, which
                # resolves Slim* lazily, so ``import slimdiff`` is all a loading process needs
                "__module__": "slimdiff",
                "__doc__": f"{base.__name__} compressed by slimdiff: the stock skeleton, shrunk to the "
                f"rank plan in config['{CONFIG_KEY}'] before the weights load.",
            },
        )
        _SLIM_CLASSES[name] = cls
        globals()[name] = cls
    return _SLIM_CLASSES[name]


def verify_folder(folder: Path) -> None:
    """Check a compressed denoiser folder before anything loads, and raise CompressedModelError
    naming what differs: the sidecar exists and is readable; the plan in config.json and the one
    in the sidecar each match their digest and each other; the weights match the sidecar's
    sha256; and the tensor shapes in the weights file are those the plan builds from config.json
    (checked on a meta-device skeleton, so nothing is allocated)."""
    from safetensors import safe_open

    if not (folder / SIDECAR_NAME).is_file():
        raise CompressedModelError(
            f"{folder}/{SIDECAR_NAME} not found: the weights of this slimdiff folder cannot be verified "
            "(it is written by slimdiff.formats.io.save_compressed next to config.json)"
        )
    sidecar = read_sidecar(folder)
    config = json.loads((folder / "config.json").read_text())
    section = config.get(CONFIG_KEY) or {}
    try:
        plan = RankPlan.from_dict(section["plan"])
        side_plan = RankPlan.from_dict(sidecar["plan"])
    except (KeyError, PlanValidationError) as err:
        raise CompressedModelError(f"{folder}: invalid rank plan: {err}") from err
    if plan.digest != section.get("plan_digest"):
        raise CompressedModelError(
            f"{folder}/config.json: the rank plan does not match its recorded digest (edited)"
        )
    if side_plan.digest != sidecar.get("plan_digest"):
        raise CompressedModelError(
            f"{folder}/{SIDECAR_NAME}: the rank plan does not match its recorded digest (edited)"
        )
    if plan.digest != side_plan.digest:
        raise CompressedModelError(
            f"{folder}: config.json's rank plan (digest {plan.digest[:12]}) differs from the sidecar's "
            f"({side_plan.digest[:12]}): mixed or edited files"
        )
    weights = folder / sidecar.get("weights_file", "diffusion_pytorch_model.safetensors")
    if not weights.is_file():
        raise CompressedModelError(f"{weights} not found (named by {folder / SIDECAR_NAME})")
    digest = file_sha256(weights)
    if digest != sidecar.get("weights_sha256"):
        raise CompressedModelError(
            f"{weights}: sha256 {digest[:12]}... does not match the sidecar's "
            f"{str(sidecar.get('weights_sha256'))[:12]}...: the weights were changed or truncated after saving"
        )
    verify_lora_maps(folder, sidecar)
    name = str(config.get("_class_name"))
    try:
        base = slim_class_named(name).__mro__[1]
    except AttributeError:
        base = None
    if base is None:
        raise CompressedModelError(
            f"{folder}: config.json names {config.get('_class_name')!r}, not a slimdiff class"
        )
    stock = {k: v for k, v in config.items() if k != CONFIG_KEY}
    import torch

    with torch.device("meta"):
        skeleton = base.from_config(stock)
    try:
        apply_plan_shapes_(skeleton, plan, **dict(section.get("compression") or {}))
    except PlanValidationError as err:
        raise CompressedModelError(f"{folder}: the rank plan does not fit config.json: {err}") from err
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    compare_shapes(expected, stored, "the plan applied to config.json", "the weights file", folder)


def to_slim_(model: nn.Module) -> nn.Module:
    """Turn a model ``compress_`` rewrote into an instance of its slimdiff class, in place, with the
    plan and layout options recorded in its config (what ``save_pretrained`` then writes)."""

    plan = getattr(model, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise ValueError("to_slim_ needs a model compressed by compress_ (it carries slimdiff_plan)")
    base = type(model)
    if base.__name__ in _SLIM_CLASSES:
        base = base.__mro__[1]
    adapter = adapter_for(model)
    if base is not adapter.denoiser_class():
        raise ValueError(
            f"{base.__name__} is not the stock denoiser class {adapter.denoiser_class().__name__}"
        )
    model.__class__ = slim_class(base)
    section: dict[str, Any] = {
        "format_version": CONFIG_FORMAT_VERSION,
        "plan_digest": plan.digest,
        "plan": plan.to_dict(),
        "compression": dict(getattr(model, COMPRESSION_ATTRIBUTE, None) or {}),
    }
    model.register_to_config(**{CONFIG_KEY: section})
    return model


def slim_class_named(name: str) -> type:
    """The slimdiff class called ``name`` (``Slim<StockClass>`` of a registered family)."""
    return __getattr__(name)


def __getattr__(name: str) -> type:
    """``slimdiff.formats.loading.Slim<StockClass>``: created on first access (diffusers' loader asks for
    the class by the name in model_index.json / config.json). diffusers also looks up its loadable
    base classes in the component's module to find the load method: ``ModelMixin`` is that base."""
    if name == "ModelMixin":
        from diffusers import ModelMixin

        return ModelMixin
    if name.startswith("Slim"):
        try:  # a family adapter's class, or a class recognised by its parts (families.structural)
            base = adapter_for_class(name[len("Slim") :]).denoiser_class()
        except UnsupportedModelError:
            base = None
        if base is not None and name == f"Slim{base.__name__}":
            return slim_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
