"""The toy world: a procedural data set and tiny SD-architecture models trained on it here.

No SD/CLIP/Inception weights can be downloaded, so the project's default model, end-to-end tests and
quality benchmarks use a tiny ``StableDiffusionPipeline`` trained on procedural 32x32 images
(``python -m slimdiff.toy.train``), committed under ``data/toy/``. It runs through exactly the code
path a real SD v1.5 takes. The MMDiT family has its own: a tiny ``StableDiffusion3Pipeline`` on the
same data, split, VAE and judges (``python -m slimdiff.toy.train_mmdit``), under ``data/toy-mmdit/``,
and the FLUX family a tiny ``FluxPipeline`` (``python -m slimdiff.toy.train_flux``), under ``data/toy-flux/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from slimdiff.toy.data import (
    COLORS,
    RELATIONS,
    SHAPES,
    SLOT_NAMES,
    SLOTS,
    SceneObject,
    caption_kind,
    caption_slot_labels,
    heldout_captions,
    make_dataset,
    parse_caption,
    render,
    train_captions,
)

__all__ = [
    "COLORS",
    "RELATIONS",
    "SHAPES",
    "SLOTS",
    "SLOT_NAMES",
    "SceneObject",
    "caption_kind",
    "caption_slot_labels",
    "heldout_captions",
    "load_toy_flux_pipeline",
    "load_toy_mmdit_pipeline",
    "load_toy_pipeline",
    "make_dataset",
    "parse_caption",
    "render",
    "toy_data_dir",
    "toy_flux_data_dir",
    "toy_flux_pipeline_dir",
    "toy_mmdit_data_dir",
    "toy_mmdit_pipeline_dir",
    "toy_pipeline_dir",
    "train_captions",
]

TOY_DIR_ENV = "SLIMDIFF_TOY_DIR"
TOY_MMDIT_DIR_ENV = "SLIMDIFF_TOY_MMDIT_DIR"
TOY_FLUX_DIR_ENV = "SLIMDIFF_TOY_FLUX_DIR"


def toy_data_dir() -> Path:
    """Folder of the committed toy models (``data/toy`` of the repository, or ``$SLIMDIFF_TOY_DIR``)."""
    override = os.environ.get(TOY_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "data" / "toy"


def toy_pipeline_dir() -> Path:
    """The committed diffusers pipeline folder (``save_pretrained`` layout, fp16 safetensors)."""
    return toy_data_dir() / "pipeline"


def load_toy_pipeline(dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """A working ``StableDiffusionPipeline`` loaded offline from the committed folder (or ``path``).

    Weights are stored fp16 and run fp32 by default (fp16 on CPU is slow)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else toy_pipeline_dir()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no toy pipeline at {folder} (model_index.json missing): train one with "
            "`python -m slimdiff.toy.train --out data/toy`"
        )
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.to(dtype)  # no-op on diffusers that honour `dtype`; older ones load the stored fp16 as is
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_mmdit_data_dir() -> Path:
    """Folder of the committed toy MMDiT (``data/toy-mmdit`` of the repository, or
    ``$SLIMDIFF_TOY_MMDIT_DIR``)."""
    override = os.environ.get(TOY_MMDIT_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "data" / "toy-mmdit"


def toy_mmdit_pipeline_dir() -> Path:
    """The committed ``StableDiffusion3Pipeline`` folder (``save_pretrained`` layout, fp16 safetensors)."""
    return toy_mmdit_data_dir() / "pipeline"


def load_toy_mmdit_pipeline(dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """A working ``StableDiffusion3Pipeline`` (two CLIPs, no T5) loaded offline from the committed
    folder (or ``path``). Weights are stored fp16 and run fp32 by default."""
    from slimdiff.toy.mmdit import load_pipeline

    folder = Path(path) if path is not None else toy_mmdit_pipeline_dir()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no toy MMDiT pipeline at {folder} (model_index.json missing): train one with "
            "`python -m slimdiff.toy.train_mmdit --out data/toy-mmdit`"
        )
    return load_pipeline(folder, dtype=dtype)


def toy_flux_data_dir() -> Path:
    """Folder of the committed toy FLUX (``data/toy-flux`` of the repository, or
    ``$SLIMDIFF_TOY_FLUX_DIR``)."""
    override = os.environ.get(TOY_FLUX_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "data" / "toy-flux"


def toy_flux_pipeline_dir() -> Path:
    """The committed ``FluxPipeline`` folder (``save_pretrained`` layout, fp16 safetensors)."""
    return toy_flux_data_dir() / "pipeline"


def load_toy_flux_pipeline(dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """A working ``FluxPipeline`` (CLIP pooled + CLIP-class text tokens, no guidance embedding) loaded offline from
    the committed folder (or ``path``). Weights are stored fp16 and run fp32 by default. Sample it with
    ``true_cfg_scale``, ``negative_prompt=""`` and ``max_sequence_length=16``
    (:func:`slimdiff.families.units.pipeline_call_kwargs`)."""
    from slimdiff.toy.flux import load_pipeline

    folder = Path(path) if path is not None else toy_flux_pipeline_dir()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no toy FLUX pipeline at {folder} (model_index.json missing): train one with "
            "`python -m slimdiff.toy.train_flux --out data/toy-flux`"
        )
    return load_pipeline(folder, dtype=dtype)
