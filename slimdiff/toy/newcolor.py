"""A color the toy world does not have: data and a measurement for LoRA experiments.

The toy model knows four colors (``slimdiff.toy.data.COLORS``). A LoRA that teaches it a fifth
one, "orange", is something it demonstrably cannot do before (benchmarks/bench_lora.py). This
module extends the world for that experiment only; the default data set, the held-out split and
the committed models are untouched:

* palette: :data:`PALETTE` = the four colors plus :data:`NEW_COLOR` at :data:`NEW_RGB` (70 from
  yellow and 107 from red in RGB; the palette colors are 176-297 apart; the per-channel jitter is
  +-12);
* captions: every single-object caption of the new color (15) and every two-object caption with at
  least one object of it (312), in the toy world's grammar; a seeded :data:`HELDOUT_FRACTION` of
  each kind is held out of LoRA training (:func:`heldout_new_captions`);
* rendering: the toy world's renderer with the extended palette (same jitter rules).

Why orange and not a color farther from the palette (purple, cyan, white, pink, ...): the
committed VAE was trained on the four colors only, and its decoder cannot draw most others. Renders
of the 82 held-out captions passed through it (encode, posterior mean, decode) come back
red-orange for purple (200, 40, 200) and magenta, yellow for white, pink and lavender, blue for
cyan and mint: with each of them as the new color, 0% read as the new color. Orange comes back
orange (100%, core colors within 31 of :data:`NEW_RGB`). A LoRA on the UNet alone can only reach
colors the decoder can produce, so the new color has to be one of those. :func:`vae_round_trip`
measures this ceiling (benchmarks/bench_lora.py reports it).

"orange" is not a word of the toy tokenizer (a word-level vocabulary of the 25 words the captions
use): it becomes ``<unk>``, so a LoRA trained with the text encoder frozen learns to draw orange
for the ``<unk>`` token in a color position.

Measurement (the committed attribute classifier knows only four colors): a fixed pixel rule per
slot, :func:`slot_colors`. Object pixels are pixels of the slot's window (:data:`WINDOW` px either
side of the slot center) that differ from the background by more than :data:`OBJECT_THRESHOLD` in
some channel; the slot's color is the palette entry (with the new color) nearest to the mean RGB
of their core (deviation at least :data:`CORE_SHARE` of their 90th percentile: anti-aliased edges,
blends with the dark background, would pull a yellow toward orange) if it lies within
:data:`MAX_DISTANCE` of it, else :data:`OTHER` (the base model draws an unknown color word as a
palette color or as khaki-like blends, which the nearest color alone would call orange), or None
(empty) with fewer than :data:`MIN_PIXELS` object pixels. Shapes come from the classifier with the
color marginalised out (:func:`slot_shapes`), which is color-agnostic enough to read orange shapes
(checked on renders by :func:`measurement_validity`).
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np

from slimdiff.toy.data import (
    BACKGROUND,
    COLORS,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    SLOT_NAMES,
    SLOTS,
    SceneObject,
    render_scene,
    single_caption,
    two_caption,
)

NEW_COLOR = "orange"
NEW_RGB: tuple[int, int, int] = (240, 145, 35)
PALETTE: dict[str, tuple[int, int, int]] = {**COLORS, NEW_COLOR: NEW_RGB}
NEW_SPLIT_SEED = 20261218
HELDOUT_FRACTION = 0.25

WINDOW = 6  # half-width (px) of the square window around a slot center the pixel rule reads
OBJECT_THRESHOLD = 80  # max |RGB - background| above which a pixel counts as an object pixel
MIN_PIXELS = 12  # fewer object pixels than this in the window: the slot reads empty
CORE_SHARE = 0.8  # core pixels: deviation >= this share of the object pixels' 90th percentile
#: farther than this (RGB distance of the core mean) from every palette color: a color outside the
#: palette. 1.5x the largest deviation of the new color's renders passed through the committed VAE
#: (29.5-30.8 for three render seeds of the held-out captions); renders deviate at most 20 (jitter)
MAX_DISTANCE = 45.0
OTHER = "other"  # what slot_colors reads for an object of a color outside PALETTE


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------
@cache
def new_single_captions() -> tuple[str, ...]:
    """The 15 single-object captions of the new color (shape, slot order)."""
    return tuple(single_caption(NEW_COLOR, s, p) for s in SHAPES for p in SLOT_NAMES)


@cache
def new_two_captions() -> tuple[str, ...]:
    """The 312 two-object captions with at least one object of the new color."""
    objects = [(c, s) for c in PALETTE for s in SHAPES]
    return tuple(
        two_caption(c1, s1, rel, c2, s2)
        for (c1, s1) in objects
        for (c2, s2) in objects
        if (c1, s1) != (c2, s2) and NEW_COLOR in (c1, c2)
        for rel in RELATIONS
    )


@cache
def _new_split() -> tuple[frozenset[str], frozenset[str]]:
    rng = np.random.default_rng(NEW_SPLIT_SEED)
    held = []
    for captions in (new_single_captions(), new_two_captions()):
        order = rng.permutation(len(captions))
        held.append(frozenset(captions[i] for i in order[: round(HELDOUT_FRACTION * len(captions))]))
    return held[0], held[1]


def _pick(kind: str | None, heldout: bool) -> list[str]:
    if kind not in (None, "single", "two"):
        raise ValueError(f"kind={kind!r}: use None (both), 'single' or 'two'")
    held_single, held_two = _new_split()
    out: list[str] = []
    if kind in (None, "single"):
        out += [c for c in new_single_captions() if (c in held_single) == heldout]
    if kind in (None, "two"):
        out += [c for c in new_two_captions() if (c in held_two) == heldout]
    return out


def train_new_captions(kind: str | None = None) -> list[str]:
    """New-color captions a LoRA may train on."""
    return _pick(kind, heldout=False)


def heldout_new_captions(kind: str | None = None) -> list[str]:
    """New-color captions never trained on (4 single, 78 two-object)."""
    return _pick(kind, heldout=True)


_PHRASE_SLOT = {v: k for k, v in POSITION_PHRASES.items()}


@cache
def _patterns() -> tuple[re.Pattern, re.Pattern]:
    color = "|".join(PALETTE)
    shape = "|".join(SHAPES)
    phrase = "|".join(POSITION_PHRASES.values())
    rel = "|".join(RELATIONS)
    single = re.compile(rf"a ({color}) ({shape}) ({phrase})")
    two = re.compile(rf"a ({color}) ({shape}) ({rel}) a ({color}) ({shape})")
    return single, two


def parse_new_caption(caption: str) -> tuple[SceneObject, ...]:
    """The objects of a caption over the extended palette (any toy caption, or one with the new
    color); ValueError otherwise."""
    key = " ".join(caption.strip().lower().split())
    single, two = _patterns()
    if m := single.fullmatch(key):
        return (SceneObject(m[1], m[2], _PHRASE_SLOT[m[3]]),)
    if (m := two.fullmatch(key)) and (m[1], m[2]) != (m[4], m[5]):
        p1, p2 = RELATIONS[m[3]]
        return (SceneObject(m[1], m[2], p1), SceneObject(m[4], m[5], p2))
    raise ValueError(f"caption {caption!r} is not a caption over the colors {list(PALETTE)}")


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def render_new(caption: str, rng: np.random.Generator, recolor: str | None = None) -> np.ndarray:
    """One image of a caption over the extended palette: uint8 (32, 32, 3). ``recolor``: draw
    the new-color objects in this palette color instead (the same random draws)."""
    scene = parse_new_caption(caption)
    if recolor is not None:
        scene = tuple(SceneObject(recolor, o.shape, o.slot) if o.color == NEW_COLOR else o for o in scene)
    return render_scene(scene, rng, palette=PALETTE)


def render_many(captions: list[str], seed: int, recolor: str | None = None) -> np.ndarray:
    """One render per caption, deterministic given ``seed``: uint8 (N, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    if not captions:
        return np.zeros((0, 32, 32, 3), np.uint8)
    return np.stack([render_new(c, rng, recolor) for c in captions])


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def _window(slot: str) -> tuple[slice, slice]:
    cx, cy = SLOTS[slot]
    return (
        slice(int(round(cy - WINDOW)), int(round(cy + WINDOW))),
        slice(int(round(cx - WINDOW)), int(round(cx + WINDOW))),
    )


def slot_colors(images: np.ndarray, slot: str) -> list[str | None]:
    """Per image, the color the pixel rule reads in ``slot``: a PALETTE name, :data:`OTHER` (an
    object whose color is no palette color's) or None (empty)."""
    names = list(PALETTE)
    ref = np.asarray([PALETTE[n] for n in names], dtype=np.float64)  # (C, 3)
    ys, xs = _window(slot)
    out: list[str | None] = []
    for image in np.asarray(images):
        px = image[ys, xs].reshape(-1, 3).astype(np.float64)  # (P, 3)
        dev = np.abs(px - np.asarray(BACKGROUND)).max(axis=1)  # (P,)
        obj = dev > OBJECT_THRESHOLD
        if obj.sum() < MIN_PIXELS:
            out.append(None)
            continue
        # the object's core: edge pixels are blends with the dark background, and a darkened
        # yellow is nearer to orange than to yellow
        core = obj & (dev >= CORE_SHARE * np.percentile(dev[obj], 90))
        dist = np.sqrt(((ref - px[core].mean(axis=0)) ** 2).sum(axis=1))  # (C,)
        best = int(np.argmin(dist))
        out.append(names[best] if dist[best] <= MAX_DISTANCE else OTHER)
    return out


def slot_shapes(images: np.ndarray, classifier) -> np.ndarray:
    """Per image and slot (SLOT_NAMES order), the classifier's shape with the color marginalised
    out: int64 (N, 5), -1 for empty (P(empty) > 1/2), else the index into SHAPES."""
    import torch

    from slimdiff.toy.data import to_tensor_range

    images = np.asarray(images)
    with torch.no_grad():
        probs = classifier(to_tensor_range(images)).softmax(-1)  # (N, 5, 13)
    n = len(images)
    shape_p = probs[..., 1:].reshape(n, len(SLOT_NAMES), len(COLORS), len(SHAPES)).sum(2)  # (N, 5, 3)
    out = shape_p.argmax(-1).numpy().astype(np.int64)
    out[probs[..., 0].numpy() > 0.5] = -1
    return out


def new_color_scores(images: np.ndarray, captions: list[str], classifier=None) -> dict[str, np.ndarray]:
    """Per-image 0/1 scores of images of captions over the extended palette:

    * ``color``: every new-color object of the caption reads the new color in its slot (the
      attribute the LoRA teaches; captions without the new color score 1);
    * ``color_shape``: and the classifier reads its shape there;
    * ``exact``: every object of the caption reads its color and shape in its slot, and every other
      slot is empty for the classifier."""
    if classifier is None:
        from slimdiff.toy.classifier import load_toy_classifier

        classifier = load_toy_classifier()
    images = np.asarray(images)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    colors = {slot: slot_colors(images, slot) for slot in SLOT_NAMES}
    shapes = slot_shapes(images, classifier) if len(images) else np.zeros((0, 5), np.int64)
    out = {k: np.zeros(len(images)) for k in ("color", "color_shape", "exact")}
    for i, caption in enumerate(captions):
        scene = parse_new_caption(caption)
        new = [o for o in scene if o.color == NEW_COLOR]
        color_ok = all(colors[o.slot][i] == NEW_COLOR for o in new)
        shape_ok = all(shapes[i, SLOT_NAMES.index(o.slot)] == SHAPES.index(o.shape) for o in new)
        used = {o.slot for o in scene}
        exact = all(
            colors[o.slot][i] == o.color and shapes[i, SLOT_NAMES.index(o.slot)] == SHAPES.index(o.shape)
            for o in scene
        ) and all(shapes[i, j] == -1 for j, s in enumerate(SLOT_NAMES) if s not in used)
        out["color"][i] = color_ok
        out["color_shape"][i] = color_ok and shape_ok
        out["exact"][i] = exact
    return out


def new_color_accuracy(images: np.ndarray, captions: list[str], classifier=None) -> dict[str, float]:
    """Means of :func:`new_color_scores` (``n``: number of images)."""
    scores = new_color_scores(images, captions, classifier)
    result = {k: float(v.mean()) if len(v) else float("nan") for k, v in scores.items()}
    result["n"] = len(captions)
    return result


def measurement_validity(captions: list[str], seed: int = 0, classifier=None) -> dict[str, dict]:
    """The rule on rendered ground truth: accuracy on renders of ``captions`` in the new color
    (must be 1.0) and on renders of the same captions with the new color replaced by its two
    nearest palette colors, red and yellow (their ``color`` must be 0.0: the rule does not read
    them as the new color)."""
    return {
        "new_color_renders": new_color_accuracy(render_many(captions, seed), captions, classifier),
        "red_renders": new_color_accuracy(render_many(captions, seed, recolor="red"), captions, classifier),
        "yellow_renders": new_color_accuracy(
            render_many(captions, seed, recolor="yellow"), captions, classifier
        ),
    }


def vae_round_trip(vae, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``images`` encoded by ``vae`` (posterior mean) and decoded: uint8 (N, 32, 32, 3), the best
    any denoiser can do through this decoder."""
    import torch

    from slimdiff.toy.data import to_tensor_range

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = vae.decode(vae.encode(to_tensor_range(images[i : i + batch_size])).latent_dist.mean).sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)
