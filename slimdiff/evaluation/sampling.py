"""Sampling a pipeline for evaluation (per-image seeds, its family's guidance) and the sizes reported
beside quality (parameters, analytic FLOPs)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from slimdiff.families.base import adapter_for, denoiser_of
from slimdiff.families.units import compressible_parameter_count as count
from slimdiff.families.units import compression_units, pipeline_call_kwargs
from slimdiff.planning.flops import denoiser_flops

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------
def compressible_parameter_count(model: nn.Module, units: dict | None = None) -> int:
    """Parameters of the compressible set, counted on the live layers (works on compressed models,
    where the adapter's shape checks no longer hold: pass the original's ``units``, or the plan the
    model carries supplies them). On an uncompressed model it equals the sum of the units' full_params."""

    return count(model, compression_units_of(model) if units is None else units)


def _skeleton_of(model: nn.Module) -> nn.Module:
    """The uncompressed architecture of ``model`` on the meta device (from its config)."""
    with torch.device("meta"):
        return type(model).from_config(model.config)


def unet_flops(unet: nn.Module, latent_size: int | tuple[int, int], text_len: int) -> dict:
    """Analytic FLOPs of one denoiser forward on one latent (batch 1, one classifier-free-guidance
    branch) from ``slimdiff.planning.flops``, with the per-category breakdown."""

    report = denoiser_flops(unet, batch=1, latent_hw=latent_size, text_len=text_len)
    return {"total": int(report.total), "by_category": report.by_category()}


FLOPS_METHOD = (
    "slimdiff.planning.flops.denoiser_flops: analytic, batch 1 (one CFG branch), Linear + Conv2d + attention matmuls, "
    "multiply-add = 2 FLOPs; biases, norms, softmax and activations not counted"
)


def compression_units_of(model: nn.Module) -> dict:
    """The units of ``model``'s original architecture (its skeleton when it is compressed)."""

    return compression_units(
        _skeleton_of(model) if getattr(model, "slimdiff_plan", None) is not None else model
    )


def image_seeds(seed: int, n_images: int) -> list[int]:
    """Image k (prompt k // images_per_prompt) gets ``seed + k``: a sample does not depend on the
    batch it lands in, and both pipelines start from the same latent."""
    return [seed + k for k in range(n_images)]


@torch.no_grad()
def sample_pipeline(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
    height: int,
    width: int,
) -> np.ndarray:
    """One image per (prompt, seed) pair: uint8 (N, H, W, 3). Per-image CPU generators, so results
    do not depend on ``batch_size`` or the device the pipeline runs on."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per image")
    saved = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = list(prompts[i : i + batch_size])
            result = pipe(
                prompt=batch,
                num_inference_steps=num_inference_steps,
                **pipeline_call_kwargs(pipe, guidance_scale, len(batch)),
                height=height,
                width=width,
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]],
                output_type="np",
            )
            images = np.asarray(result.images)  # (B, H, W, 3) float in [0, 1]
            out.append(np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8))
    finally:
        pipe.set_progress_bar_config(**saved)
    return np.concatenate(out) if out else np.zeros((0, height, width, 3), np.uint8)


def pipeline_resolution(pipe) -> tuple[int, int]:

    vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
    model = denoiser_of(pipe)
    h, w = adapter_for(model).sample_size(model)
    return int(h) * vae_scale, int(w) * vae_scale


def is_toy_prompt_set(prompts: Sequence[str]) -> bool:
    """True when every prompt is a toy-world caption (the toy quality path applies)."""
    from slimdiff.toy.data import parse_caption

    for p in prompts:
        try:
            parse_caption(p)
        except ValueError:
            return False
    return bool(prompts)
