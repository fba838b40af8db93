"""The toy world: a procedural text-to-image data set with fixed, checkable rules.

No SD/CLIP weights can be downloaded here, so the project trains its own tiny SD-architecture model
on this data set. The rules are fixed so that an attribute classifier can grade a generated image
against its caption exactly (GenEval-style), and a held-out set of captions measures compositions the
model never saw.

Rules (32x32 RGB, dark background):

* shapes ``circle``, ``square``, ``triangle``, about 9-11 px across;
* colors ``red``, ``green``, ``blue``, ``yellow`` (fixed RGB plus a small per-image jitter);
* five slots with centers (x, y): left (8, 16), right (24, 16), top (16, 8), bottom (16, 24),
  center (16, 16);
* single-object captions ``a {color} {shape} {on the left|on the right|at the top|at the bottom|in
  the center}`` (60 captions);
* two-object captions ``a {color} {shape} {above|below|to the left of|to the right of} a {color}
  {shape}`` with two different objects, the first at top/bottom/left/right and the second at the
  opposite slot (528 captions).

A fixed, seeded ~15% of each kind is held out of training (:func:`heldout_captions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

IMAGE_SIZE = 32
BACKGROUND = (24, 24, 24)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# slot name -> object center (x, y) in image coordinates (the image spans [0, 32] on both axes)
SLOTS: dict[str, tuple[float, float]] = {
    "left": (8.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
    "center": (16.0, 16.0),
}
SLOT_NAMES: tuple[str, ...] = tuple(SLOTS)
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# relation -> (slot of the first object, slot of the second object)
RELATIONS: dict[str, tuple[str, str]] = {
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
}
# per-slot classifier classes: 0 = empty, 1 + color_index * len(SHAPES) + shape_index
NUM_SLOT_CLASSES = 1 + len(COLORS) * len(SHAPES)

SIZE_RANGE = (9.0, 11.0)  # object extent in px (circle diameter, square side, triangle base/height)
POSITION_JITTER = 1.0  # max |offset| of an object center from its slot center, px
COLOR_JITTER = 12  # max |offset| per RGB channel
SPLIT_SEED = 20261126
HELDOUT_FRACTION = 0.15
_SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliased edges


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    slot: str

    @property
    def label(self) -> int:
        """Per-slot classifier class of this object (1..12)."""
        return 1 + list(COLORS).index(self.color) * len(SHAPES) + SHAPES.index(self.shape)


def label_to_attributes(label: int) -> tuple[str, str] | None:
    """Inverse of :attr:`SceneObject.label`: (color, shape), or None for an empty slot (0)."""
    if not 0 <= label < NUM_SLOT_CLASSES:
        raise ValueError(f"slot label {label} is outside 0..{NUM_SLOT_CLASSES - 1}")
    if label == 0:
        return None
    color_index, shape_index = divmod(label - 1, len(SHAPES))
    return list(COLORS)[color_index], SHAPES[shape_index]


def single_caption(color: str, shape: str, slot: str) -> str:
    return f"a {color} {shape} {POSITION_PHRASES[slot]}"


def two_caption(color1: str, shape1: str, relation: str, color2: str, shape2: str) -> str:
    return f"a {color1} {shape1} {relation} a {color2} {shape2}"


@cache
def all_single_captions() -> tuple[str, ...]:
    """All 60 single-object captions in a fixed order (color, shape, slot)."""
    return tuple(single_caption(c, s, p) for c in COLORS for s in SHAPES for p in SLOT_NAMES)


@cache
def all_two_captions() -> tuple[str, ...]:
    """All 528 two-object captions: ordered pairs of different objects x 4 relations."""
    objects = [(c, s) for c in COLORS for s in SHAPES]
    return tuple(
        two_caption(c1, s1, rel, c2, s2)
        for (c1, s1) in objects
        for (c2, s2) in objects
        if (c1, s1) != (c2, s2)
        for rel in RELATIONS
    )


@cache
def _split() -> tuple[frozenset[str], frozenset[str]]:
    """Held-out single and two-object captions: a fixed seeded ~15% of each kind."""
    rng = np.random.default_rng(SPLIT_SEED)
    held: list[frozenset[str]] = []
    for captions in (all_single_captions(), all_two_captions()):
        n_held = round(HELDOUT_FRACTION * len(captions))
        order = rng.permutation(len(captions))
        held.append(frozenset(captions[i] for i in order[:n_held]))
    return held[0], held[1]


def _select(kind: str | None, heldout: bool) -> list[str]:
    if kind not in (None, "single", "two"):
        raise ValueError(f"kind={kind!r}: use None (both), 'single' or 'two'")
    held_single, held_two = _split()
    out: list[str] = []
    if kind in (None, "single"):
        out += [c for c in all_single_captions() if (c in held_single) == heldout]
    if kind in (None, "two"):
        out += [c for c in all_two_captions() if (c in held_two) == heldout]
    return out


def train_captions(kind: str | None = None) -> list[str]:
    """Captions the models may train on (``kind``: None for both, 'single' or 'two')."""
    return _select(kind, heldout=False)


def heldout_captions(kind: str | None = None) -> list[str]:
    """Captions never used in training: evaluation measures unseen compositions on these."""
    return _select(kind, heldout=True)


def caption_kind(caption: str) -> str:
    """'single' or 'two' (number of objects the caption describes)."""
    return "single" if len(parse_caption(caption)) == 1 else "two"


@cache
def _caption_table() -> dict[str, tuple[SceneObject, ...]]:
    table: dict[str, tuple[SceneObject, ...]] = {}
    for c in COLORS:
        for s in SHAPES:
            for p in SLOT_NAMES:
                table[single_caption(c, s, p)] = (SceneObject(c, s, p),)
    objects = [(c, s) for c in COLORS for s in SHAPES]
    for c1, s1 in objects:
        for c2, s2 in objects:
            if (c1, s1) == (c2, s2):
                continue
            for rel, (p1, p2) in RELATIONS.items():
                table[two_caption(c1, s1, rel, c2, s2)] = (SceneObject(c1, s1, p1), SceneObject(c2, s2, p2))
    return table


def parse_caption(caption: str) -> tuple[SceneObject, ...]:
    """The objects (color, shape, slot) a caption describes; ValueError for any other text."""
    key = " ".join(caption.strip().lower().split())
    scene = _caption_table().get(key)
    if scene is None:
        raise ValueError(
            f"caption {caption!r} is not a toy-world caption: expected 'a {{color}} {{shape}} "
            "{position}' or 'a {color} {shape} {relation} a {color} {shape}' (see slimdiff.toy.data)"
        )
    return scene


def caption_slot_labels(caption: str) -> np.ndarray:
    """Per-slot classifier target of a caption: int64 (5,), slots in SLOT_NAMES order."""
    labels = np.zeros(len(SLOT_NAMES), dtype=np.int64)
    for obj in parse_caption(caption):
        labels[SLOT_NAMES.index(obj.slot)] = obj.label
    return labels


@cache
def _subpixel_grid() -> tuple[np.ndarray, np.ndarray]:
    n = IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE  # sub-pixel centers in image coordinates
    return np.meshgrid(coords, coords, indexing="xy")  # xs, ys: (n, n)


def _coverage(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    """Fraction of each pixel the shape covers: float64 (32, 32) in [0, 1]."""
    xs, ys = _subpixel_grid()
    half = size / 2.0
    if shape == "circle":
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    elif shape == "triangle":
        # apex up: height = base = size; the half-width grows linearly from the apex to the base
        t = (ys - (cy - half)) / size
        inside = (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= half * t)
    else:
        raise ValueError(f"unknown shape {shape!r}: use one of {SHAPES}")
    n, k = IMAGE_SIZE, _SUPERSAMPLE
    # (n*k, n*k) -> (n, k, n, k) -> mean over the k x k sub-pixels of each pixel
    return inside.reshape(n, k, n, k).mean(axis=(1, 3))


def render_scene(
    scene: tuple[SceneObject, ...],
    rng: np.random.Generator,
    palette: dict[str, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Render objects with per-object jitter in color, size and position: uint8 (32, 32, 3).

    ``palette`` (color name -> RGB) defaults to :data:`COLORS`; an extended palette renders colors
    the data set does not have (``slimdiff.toy.newcolor``) with the same rules and random draws."""
    palette = COLORS if palette is None else palette
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float64)
    image[:] = BACKGROUND
    for obj in scene:
        base = np.asarray(palette[obj.color], dtype=np.float64)
        color = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
        size = rng.uniform(*SIZE_RANGE)
        sx, sy = SLOTS[obj.slot]
        cx, cy = (
            sx + rng.uniform(-POSITION_JITTER, POSITION_JITTER),
            sy + rng.uniform(-POSITION_JITTER, POSITION_JITTER),
        )
        alpha = _coverage(obj.shape, cx, cy, size)[..., None]  # (32, 32, 1)
        image = image * (1.0 - alpha) + color * alpha
    return np.round(image).astype(np.uint8)


def render(caption: str, rng: np.random.Generator) -> np.ndarray:
    """One image of ``caption`` (fresh jitter drawn from ``rng``): uint8 (32, 32, 3)."""
    return render_scene(parse_caption(caption), rng)


def sample_captions(
    n: int, rng: np.random.Generator, two_object_fraction: float, heldout: bool = False
) -> list[str]:
    """``n`` captions drawn uniformly within each kind, a ``two_object_fraction`` share two-object."""
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction={two_object_fraction} must be in [0, 1]")
    pick = heldout_captions if heldout else train_captions
    singles, twos = pick("single"), pick("two")
    is_two = rng.random(n) < two_object_fraction
    idx_single = rng.integers(0, len(singles), size=n)
    idx_two = rng.integers(0, len(twos), size=n)
    return [twos[j] if t else singles[i] for t, i, j in zip(is_two, idx_single, idx_two, strict=True)]


def make_dataset(
    n: int, seed: int, two_object_fraction: float = 0.5, heldout: bool = False
) -> tuple[np.ndarray, list[str]]:
    """A deterministic data set: images uint8 (n, 32, 32, 3) and their captions."""
    rng = np.random.default_rng(seed)
    captions = sample_captions(n, rng, two_object_fraction, heldout=heldout)
    images = np.stack([render(c, rng) for c in captions]) if n else np.zeros((0, 32, 32, 3), np.uint8)
    return images, captions


def to_tensor_range(images: np.ndarray):
    """uint8 (N, H, W, 3) -> float32 torch (N, 3, H, W) in [-1, 1] (the VAE's input range)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    return x / 127.5 - 1.0


BOS_TOKEN = "<|startoftext|>"


EOS_TOKEN = "<|endoftext|>"


PAD_TOKEN = "<pad>"


UNK_TOKEN = "<unk>"


def toy_vocabulary() -> list[str]:
    """Special tokens first, then every word of the caption grammar (sorted: a stable vocabulary)."""
    words = {"a"} | set(COLORS) | set(SHAPES)
    for phrase in list(POSITION_PHRASES.values()) + list(RELATIONS):
        words |= set(phrase.split())
    return [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *sorted(words)]
