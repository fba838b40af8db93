"""Grading generated toy images against their captions (GenEval-style) and sampling grids.

Per image, with the classifier's per-slot prediction and the caption's expected slots:

* ``object``: the number of occupied slots equals the number of objects in the caption;
* ``color`` / ``shape``: the multiset of predicted colors (shapes) over occupied slots equals the
  caption's (position-free: a right color in the wrong place still counts);
* ``position``: the set of occupied slots equals the caption's slots;
* ``exact``: every slot matches (right objects with right attributes in the right places).

Accuracies are means over images, reported for single-object captions, two-object captions and all.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch

from slimdiff.toy.data import IMAGE_SIZE, caption_kind, caption_slot_labels, label_to_attributes

logger = logging.getLogger(__name__)

METRICS = ("object", "color", "shape", "position", "exact")
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0


def to_uint8_images(images) -> np.ndarray:
    """Accept uint8 (N, H, W, 3), float [0, 1] (N, H, W, 3) arrays (diffusers ``output_type="np"``),
    float [0, 1] torch (N, 3, H, W) or a list of PIL images; return uint8 (N, H, W, 3)."""
    if isinstance(images, list | tuple):
        return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    if isinstance(images, torch.Tensor):
        images = images.detach().float().permute(0, 2, 3, 1).cpu().numpy()  # (N, 3, H, W) -> (N, H, W, 3)
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def score_slots(predicted: np.ndarray, expected: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image 0/1 scores of every metric from slot labels int (N, 5) (pure; no model)."""
    predicted, expected = np.asarray(predicted), np.asarray(expected)
    if predicted.shape != expected.shape:
        raise ValueError(f"predicted slots {predicted.shape} and expected slots {expected.shape} differ")
    out = {m: np.zeros(len(expected), dtype=np.float64) for m in METRICS}
    for i, (p, e) in enumerate(zip(predicted, expected, strict=True)):
        p_attrs = [label_to_attributes(int(v)) for v in p if v]
        e_attrs = [label_to_attributes(int(v)) for v in e if v]
        out["object"][i] = len(p_attrs) == len(e_attrs)
        out["color"][i] = Counter(a[0] for a in p_attrs) == Counter(a[0] for a in e_attrs)
        out["shape"][i] = Counter(a[1] for a in p_attrs) == Counter(a[1] for a in e_attrs)
        out["position"][i] = np.array_equal(p > 0, e > 0)
        out["exact"][i] = np.array_equal(p, e)
    return out


def attribute_accuracy(images, captions: list[str], classifier=None) -> dict:
    """Accuracy of images vs captions: ``{"single"|"two"|"all": {metric: float, "n": int}}``.

    ``classifier`` defaults to the committed toy attribute classifier."""
    if classifier is None:
        from slimdiff.toy.classifier import load_toy_classifier

        classifier = load_toy_classifier()
    images = to_uint8_images(images)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image")
    expected = (
        np.stack([caption_slot_labels(c) for c in captions]) if captions else np.zeros((0, 5), np.int64)
    )
    scores = score_slots(classifier.predict(images), expected)
    kinds = np.array([caption_kind(c) for c in captions])
    result: dict = {}
    for split, mask in (
        ("single", kinds == "single"),
        ("two", kinds == "two"),
        ("all", np.ones(len(kinds), bool)),
    ):
        n = int(mask.sum())
        result[split] = {m: float(scores[m][mask].mean()) if n else float("nan") for m in METRICS}
        result[split]["n"] = n
    return result


@torch.no_grad()
def sample_images(
    pipe,
    captions: list[str],
    seed: int = 0,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Generate one image per caption: uint8 (N, 32, 32, 3). Deterministic given ``seed``. The
    guidance is applied the pipeline family's way (:func:`slimdiff.families.units.pipeline_call_kwargs`:
    true CFG with an empty negative prompt for the toy FLUX)."""
    from slimdiff.families.units import pipeline_call_kwargs

    pipe.set_progress_bar_config(disable=not progress)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = []
    for i in range(0, len(captions), batch_size):
        batch = captions[i : i + batch_size]
        result = pipe(
            batch,
            num_inference_steps=num_inference_steps,
            **pipeline_call_kwargs(pipe, guidance_scale, len(batch)),
            height=IMAGE_SIZE,  # the SD pipelines' default here; FluxPipeline's is 128 latents
            width=IMAGE_SIZE,
            generator=generator,
            output_type="np",
        )
        out.append(to_uint8_images(result.images))
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


def image_grid(images: np.ndarray, columns: int = 8, scale: int = 4, pad: int = 2):
    """Tile uint8 (N, H, W, 3) into one PIL image (``scale``x nearest upsampling, ``pad`` px gaps)."""
    from PIL import Image

    images = to_uint8_images(images)
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            im
        )
    pil = Image.fromarray(grid)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def sample_grid(
    pipe,
    captions: list[str],
    seed: int = 0,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    columns: int = 8,
):
    """Sample one image per caption and tile them row-major: (PIL grid image, uint8 images)."""
    images = sample_images(
        pipe, captions, seed, num_inference_steps, guidance_scale, batch_size=len(captions) or 1
    )
    return image_grid(images, columns=columns), images
