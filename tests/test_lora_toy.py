"""The toy world's new color (slimdiff.toy.newcolor): captions, rendering and the measurement
rule on rendered ground truth (benchmarks/bench_lora.py uses it to grade a LoRA)."""

from __future__ import annotations

import numpy as np
import pytest

from slimdiff.toy import data as d
from slimdiff.toy import newcolor as nc


# --------------------------------------------------------------------------------------------
# the new color: captions, rendering, the measurement rule
# --------------------------------------------------------------------------------------------
def test_new_captions_split_and_parse():
    assert len(nc.new_single_captions()) == 15 and len(nc.new_two_captions()) == 312
    held, train = nc.heldout_new_captions(), nc.train_new_captions()
    assert (len(nc.heldout_new_captions("single")), len(nc.heldout_new_captions("two"))) == (4, 78)
    assert not set(held) & set(train)
    assert set(held) | set(train) == {*nc.new_single_captions(), *nc.new_two_captions()}
    assert all(nc.NEW_COLOR in c for c in held + train)
    # no new-color caption is a toy-world caption, and toy captions parse the same way
    assert not set(held + train) & {*d.all_single_captions(), *d.all_two_captions()}
    for c in d.heldout_captions():
        assert nc.parse_new_caption(c) == d.parse_caption(c)
    assert nc.parse_new_caption(f"a {nc.NEW_COLOR} square below a red circle") == (
        d.SceneObject(nc.NEW_COLOR, "square", "bottom"),
        d.SceneObject("red", "circle", "top"),
    )
    with pytest.raises(ValueError, match="not a caption"):
        nc.parse_new_caption(f"a {nc.NEW_COLOR} circle above a {nc.NEW_COLOR} circle")


def test_extended_palette_leaves_the_data_set_unchanged():
    """The renderer's palette parameter draws the same random numbers: toy captions render
    identically with the default and the extended palette."""
    caps = d.heldout_captions()[:20]
    a = np.stack([d.render(c, r) for r in [np.random.default_rng(3)] for c in caps])
    b = nc.render_many(caps, seed=3)
    np.testing.assert_array_equal(a, b)
    assert nc.NEW_COLOR not in d.COLORS and d.NUM_SLOT_CLASSES == 13


def test_rule_reads_new_color_renders_and_not_their_neighbours():
    """Accuracy 1.0 on renders of the held-out new-color captions; 0.0 on the same captions and
    draws rendered in red or yellow (the palette colors nearest to the new one)."""
    caps = nc.heldout_new_captions()
    v = nc.measurement_validity(caps, seed=11)
    assert v["new_color_renders"] == {"color": 1.0, "color_shape": 1.0, "exact": 1.0, "n": len(caps)}
    for other in ("red_renders", "yellow_renders"):
        assert v[other]["color"] == 0.0 and v[other]["exact"] == 0.0
    # the rule reads each slot's own color: red where red was rendered
    image = nc.render_many([f"a {nc.NEW_COLOR} circle above a red square"], seed=0)
    assert nc.slot_colors(image, "top") == [nc.NEW_COLOR]
    assert nc.slot_colors(image, "bottom") == ["red"]
    image = nc.render_many([f"a {nc.NEW_COLOR} square on the left"], seed=0)
    assert nc.slot_colors(image, "left") == [nc.NEW_COLOR]
    assert nc.slot_colors(image, "right") == [None]  # windows of opposite slots do not overlap
    # toy captions: every object of a render reads its color (captions without the new color)
    caps = d.heldout_captions()
    assert nc.new_color_accuracy(nc.render_many(caps, seed=2), caps)["exact"] == 1.0
