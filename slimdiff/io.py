"""Save and load compressed UNets (and whole pipelines around them).

A compressed UNet cannot be loaded by a plain ``from_pretrained``: its config describes the
original architecture while its Linear layers are smaller. So, as SliceGPT and diffusers'
quantizer loaders do, a folder holds the weights plus a small JSON sidecar, and loading rebuilds
the skeleton from the config, applies the plan's shapes (no decomposition), then loads weights:

    <dir>/config.json                             the UNet's diffusers config (unchanged)
    <dir>/diffusion_pytorch_model.safetensors     the compressed weights
    <dir>/slimdiff.json                           rank plan, format version, per-tensor shape and
                                                  dtype, sha256 of the weights file

For a pipeline, ``<dir>`` is a normal ``save_pretrained`` folder whose ``unet/`` subfolder has the
layout above. Every mismatch between sidecar, plan, config and weights (edited sidecar, wrong
ranks, changed or truncated weights) is an error that says what differs; a folder never loads
into a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimdiff.allocation import PlanValidationError, RankPlan
from slimdiff.arch.base import UnsupportedModelError, adapter_for_class, denoiser_attr, denoiser_of
from slimdiff.compress import PLAN_ATTRIBUTE, apply_plan_shapes_

logger = logging.getLogger(__name__)

SIDECAR_NAME = "slimdiff.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SIDECAR_FORMAT_VERSION = 1


class CompressedModelError(ValueError):
    """A compressed-model folder is inconsistent (sidecar, plan, config and weights disagree)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "components") and hasattr(obj, "save_pretrained") and not isinstance(obj, nn.Module)


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------
def _save_unet(unet: nn.Module, directory: Path, plan: RankPlan, extra: dict | None) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    unet.save_config(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    save_file(state, str(weights), metadata={"format": "pt", "slimdiff_plan_digest": plan.digest})
    sidecar = {
        "format_version": SIDECAR_FORMAT_VERSION,
        "model_class": type(unet).__name__,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": _sha256(weights),
        "plan_digest": plan.digest,
        "plan": plan.to_dict(),
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in state.items()},
        "extra": dict(extra or {}),
    }
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
    ``extra`` is free-form JSON (e.g. lineage) stored in the sidecar(s) under "extra"."""
    directory = Path(directory)
    unet = denoiser_of(pipeline_or_unet) if _is_pipeline(pipeline_or_unet) else pipeline_or_unet
    plan = plan or getattr(unet, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise CompressedModelError(
            "no rank plan: pass plan=... or save a UNet returned by compress_ (it records unet.slimdiff_plan)"
        )
    if _is_pipeline(pipeline_or_unet):
        pipeline_or_unet.save_pretrained(directory, safe_serialization=True)
        sub = denoiser_attr(pipeline_or_unet)
        unet_dir = directory / sub
        if unet_dir.exists():
            shutil.rmtree(unet_dir)  # replaced by the SlimDiff layout below
        _save_unet(unet, unet_dir, plan, extra)
        top = {
            "format_version": SIDECAR_FORMAT_VERSION,
            "kind": "pipeline",
            "unet_subfolder": sub,
            "plan_digest": plan.digest,
            "extra": dict(extra or {}),
        }
        (directory / SIDECAR_NAME).write_text(json.dumps(top, indent=1) + "\n")
        return directory
    return _save_unet(unet, directory, plan, extra)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
def read_sidecar(directory: str | Path) -> dict:
    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        raise CompressedModelError(f"{path} not found: {directory} is not a SlimDiff-compressed UNet folder")
    data = json.loads(path.read_text())
    if data.get("format_version") != SIDECAR_FORMAT_VERSION:
        raise CompressedModelError(
            f"{path}: format_version {data.get('format_version')!r} is not supported (expected {SIDECAR_FORMAT_VERSION})"
        )
    return data


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
    digest = _sha256(weights)
    if digest != sidecar.get("weights_sha256"):
        raise CompressedModelError(
            f"{weights}: sha256 {digest[:12]}... does not match the sidecar's {str(sidecar.get('weights_sha256'))[:12]}...: "
            "the weights were changed or truncated after saving"
        )

    config = model_cls.load_config(directory)
    # parameters on the meta device (no memory, no random init), buffers computed as the model's
    # __init__ computes them: non-persistent buffers (PixArt's sin-cos position table) are not in
    # the weights file, so a skeleton built wholly on meta would keep them empty
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        unet = model_cls.from_config(config)
    try:
        apply_plan_shapes_(unet, plan)
    except PlanValidationError as err:
        raise CompressedModelError(
            f"{directory}: the sidecar's plan does not fit config.json: {err}"
        ) from err

    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    recorded = {k: tuple(v["shape"]) for k, v in sidecar["tensors"].items()}
    _compare_shapes(expected, recorded, "the plan applied to config.json", "the sidecar", directory)
    state = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        _compare_shapes(expected, stored, "the plan applied to config.json", "the weights file", directory)
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
    return unet


def _compare_shapes(expected: dict, got: dict, what_expected: str, what_got: str, directory: Path) -> None:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise CompressedModelError(
            f"{directory}: {what_got} and {what_expected} disagree on tensor names: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    for k in expected:
        if expected[k] != got[k]:
            raise CompressedModelError(
                f"{directory}: tensor {k} has shape {list(got[k])} in {what_got} but {list(expected[k])} per "
                f"{what_expected} (wrong ranks?)"
            )


def load_compressed(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    pipeline_class: type | None = None,
    **pipeline_kwargs: Any,
) -> Any:
    """Load what ``save_compressed`` wrote: a UNet, or a pipeline when ``directory`` holds a
    ``model_index.json`` (loaded with ``pipeline_class`` or ``DiffusionPipeline``, its UNet rebuilt
    here). The UNet is in eval mode with SlimAttnProcessor on every compressed attention."""
    directory = Path(directory)
    if (directory / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        top = read_sidecar(directory) if (directory / SIDECAR_NAME).is_file() else {}
        sub = top.get("unet_subfolder", "unet")
        unet = _load_unet(directory / sub, device, torch_dtype)
        if top and top.get("plan_digest") != unet.slimdiff_plan.digest:
            raise CompressedModelError(
                f"{directory}/{SIDECAR_NAME}: plan digest differs from the one in its unet folder (mixed folders?)"
            )
        cls = pipeline_class or DiffusionPipeline
        kwargs = dict(pipeline_kwargs)
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype  # diffusers 0.42 name (torch_dtype is deprecated)
        pipe = cls.from_pretrained(directory, **{sub: unet}, **kwargs)
        return pipe.to(device)
    return _load_unet(directory, device, torch_dtype)
