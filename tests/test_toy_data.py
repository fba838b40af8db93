"""The toy world's data rules: colors, slots, shapes, captions, the held-out split, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from slimdiff.toy import data as d


def _object_mask(image: np.ndarray) -> np.ndarray:
    """Pixels more than half covered by an object (far from the background color): bool (32, 32)."""
    return np.abs(image.astype(int) - np.array(d.BACKGROUND)).max(-1) > 60


def _bbox(mask: np.ndarray) -> tuple[float, float, int, int]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0  # center x, center y (image coords), w, h


def test_caption_counts_and_split():
    assert len(d.all_single_captions()) == 60 and len(set(d.all_single_captions())) == 60
    assert len(d.all_two_captions()) == 528 and len(set(d.all_two_captions())) == 528
    held_s, held_t = d.heldout_captions("single"), d.heldout_captions("two")
    assert (len(held_s), len(held_t)) == (9, 79)  # round(0.15 * 60), round(0.15 * 528)
    assert set(held_s) | set(d.train_captions("single")) == set(d.all_single_captions())
    assert set(held_t) | set(d.train_captions("two")) == set(d.all_two_captions())
    assert not set(d.heldout_captions()) & set(d.train_captions())
    assert d.train_captions() == d.train_captions("single") + d.train_captions("two")


def test_split_is_fixed():
    # pinned: the split must never change silently (the committed model's metrics depend on it)
    d._split.cache_clear()
    again = d.heldout_captions()
    assert again == d.heldout_captions()
    rng = np.random.default_rng(d.SPLIT_SEED)
    expected_single = {d.all_single_captions()[i] for i in rng.permutation(60)[:9]}
    assert set(d.heldout_captions("single")) == expected_single


def test_training_captions_cover_every_attribute():
    objs = [o for c in d.train_captions() for o in d.parse_caption(c)]
    assert {o.color for o in objs} == set(d.COLORS)
    assert {o.shape for o in objs} == set(d.SHAPES)
    assert {o.slot for o in objs} == set(d.SLOT_NAMES)
    rels = {r for c in d.train_captions("two") for r in d.RELATIONS if f" {r} " in c}
    assert rels == set(d.RELATIONS)
    # every (color, shape, slot) of a held-out single caption is unseen as a single caption
    for c in d.heldout_captions("single"):
        assert c not in d.train_captions()


def test_parse_caption_and_slot_labels_known_answers():
    assert d.parse_caption("a red circle on the left") == (d.SceneObject("red", "circle", "left"),)
    scene = d.parse_caption("a blue square above a green triangle")
    assert scene == (d.SceneObject("blue", "square", "top"), d.SceneObject("green", "triangle", "bottom"))
    # labels: 1 + color_index * 3 + shape_index; slots (left, right, top, bottom, center)
    np.testing.assert_array_equal(d.caption_slot_labels("a red circle on the left"), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(
        d.caption_slot_labels("a blue square above a green triangle"), [0, 0, 8, 6, 0]
    )
    np.testing.assert_array_equal(
        d.caption_slot_labels("a yellow triangle to the right of a red square"), [2, 12, 0, 0, 0]
    )
    assert d.caption_kind("a yellow circle in the center") == "single"
    for label in range(1, d.NUM_SLOT_CLASSES):
        color, shape = d.label_to_attributes(label)
        assert d.SceneObject(color, shape, "left").label == label
    assert d.label_to_attributes(0) is None


@pytest.mark.parametrize(
    "bad", ["a red circle", "a red circle above a red circle", "a purple circle on the left"]
)
def test_parse_caption_rejects_other_text(bad):
    with pytest.raises(ValueError, match="not a toy-world caption"):
        d.parse_caption(bad)


@pytest.mark.parametrize("slot", d.SLOT_NAMES)
@pytest.mark.parametrize("shape", d.SHAPES)
def test_render_single_object_rules(slot, shape):
    rng = np.random.default_rng(7)
    for color, rgb in d.COLORS.items():
        image = d.render(d.single_caption(color, shape, slot), rng)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        mask = _object_mask(image)
        # background is exactly the fixed color away from the object
        np.testing.assert_array_equal(
            image[~_dilate(mask)], np.broadcast_to(d.BACKGROUND, image[~_dilate(mask)].shape)
        )
        cx, cy, w, h = _bbox(mask)
        sx, sy = d.SLOTS[slot]
        assert abs(cx - sx) <= 1.5 and abs(cy - sy) <= 1.5, (cx, cy, slot)
        assert 8 <= w <= 12 and 8 <= h <= 12, (w, h)
        # the object's interior color is the named color within the jitter
        inner = image[int(sy), int(sx)].astype(int)
        assert np.abs(inner - np.array(rgb)).max() <= d.COLOR_JITTER
        # shape by fill ratio of its bounding box: square ~1, circle ~pi/4, triangle ~1/2
        fill = mask.sum() / (w * h)
        expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
        assert abs(fill - expected) < 0.12, (shape, fill)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Mask grown by 1 px (anti-aliased edge pixels are neither object nor background)."""
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


@pytest.mark.parametrize("relation", list(d.RELATIONS))
def test_render_two_objects_at_opposite_slots(relation):
    rng = np.random.default_rng(3)
    image = d.render(d.two_caption("red", "square", relation, "blue", "circle"), rng)
    first, second = d.RELATIONS[relation]
    for slot, rgb in ((first, d.COLORS["red"]), (second, d.COLORS["blue"])):
        sx, sy = d.SLOTS[slot]
        assert np.abs(image[int(sy), int(sx)].astype(int) - np.array(rgb)).max() <= d.COLOR_JITTER
    center = d.SLOTS["center"]
    np.testing.assert_array_equal(image[int(center[1]), int(center[0])], d.BACKGROUND)


def test_dataset_is_deterministic_and_mixes_kinds():
    a_img, a_cap = d.make_dataset(64, seed=5, two_object_fraction=0.75)
    b_img, b_cap = d.make_dataset(64, seed=5, two_object_fraction=0.75)
    c_img, _ = d.make_dataset(64, seed=6, two_object_fraction=0.75)
    np.testing.assert_array_equal(a_img, b_img)
    assert a_cap == b_cap
    assert not np.array_equal(a_img, c_img)
    assert set(a_cap) <= set(d.train_captions())
    n_two = sum(d.caption_kind(c) == "two" for c in a_cap)
    assert 32 <= n_two <= 60  # Binomial(64, 0.75): mean 48, sd 3.5
    _, held = d.make_dataset(16, seed=5, heldout=True)
    assert set(held) <= set(d.heldout_captions())


def test_render_jitter_varies_images():
    rng = np.random.default_rng(0)
    imgs = [d.render("a green triangle at the top", rng) for _ in range(4)]
    assert len({im.tobytes() for im in imgs}) == 4


def test_to_tensor_range_known_values():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[0, 0, 0] = (255, 0, 127)
    x = d.to_tensor_range(img)
    assert x.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [1.0, -1.0, 127 / 127.5 - 1], atol=1e-6)
