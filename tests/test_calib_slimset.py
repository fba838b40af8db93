"""SlimSet: normalisation, geometric median, FPS known answers, exclusion, determinism, file, card,
and the offline open_clip embedder on a tiny custom config registered by this test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimdiff.calibration.embedders import EmbedderWeightsNotFound, OpenClipEmbedder
from slimdiff.calibration.slimset import (
    SlimSet,
    build_slimset,
    dedup_key,
    farthest_point_sampling,
    geometric_median,
    normalise_prompt,
    prepare_pool,
    select_slimset,
    slimset_card,
)


class LookupEmbedder:
    """Test embedder: fixed vectors per prompt text (unknown prompts fail loudly)."""

    id = "lookup-test"

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.calls = 0

    def embed(self, prompts, batch_size=64):
        self.calls += 1
        return torch.tensor([self.table[p] for p in prompts], dtype=torch.float32)


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# angles in degrees: a dense cluster around 0 (canonical) and spread-out rare prompts
ANGLES = {
    "pos0": 0,
    "pos2": 2,
    "neg2": -2,
    "pos4": 4,
    "neg4": -4,
    "pos90": 90,
    "neg90": -90,
    "pos180": 180,
    "pos135": 135,
    "neg135": -135,
}
TABLE = {k: unit(v) for k, v in ANGLES.items()}


def test_normalisation_and_pool_preparation():
    assert normalise_prompt("  a\tcat \n on  a mat ") == "a cat on a mat"
    assert dedup_key("A cat, on a MAT!") == dedup_key("a cat on a mat")
    pool = ["a cat", "a  cat", "A cat.", "", "a dog", "The Eval prompt", "a bird"]
    prepared = prepare_pool(pool, exclude=["the eval   prompt!"])
    assert prepared.candidates == ["a cat", "a dog", "a bird"]
    assert (prepared.n_exact_dups, prepared.n_near_dups, prepared.n_excluded, prepared.n_empty) == (
        1,
        1,
        1,
        1,
    )
    assert (
        prepared.pool_digest == prepare_pool([p + "  " for p in pool]).pool_digest
    )  # whitespace-insensitive


def test_geometric_median_known_answers():
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) + torch.tensor([3.0, 4.0])
    torch.testing.assert_close(geometric_median(square), torch.tensor([3.0, 4.0], dtype=torch.float64))
    # on a line the geometric median is the middle point, whatever the outlier (the mean is 21.2)
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]])
    torch.testing.assert_close(
        geometric_median(line), torch.tensor([2.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_fps_known_answer_2d():
    # unit vectors at 0, 5, 90, 180, 270, 135 degrees; start at 0 degrees.
    # 180 is farthest (d=2); then 90 and 270 tie at d=1 (first index wins: 90); then 270 (d=1);
    # then 135 (d = 1 - cos 45 = 0.293); then 5 (d = 1 - cos 5).
    x = torch.tensor([unit(a) for a in (0, 5, 90, 180, 270, 135)])
    order, mindist = farthest_point_sampling(x, 6, [0])
    assert order == [0, 3, 2, 4, 5, 1]
    order4, mindist4 = farthest_point_sampling(x, 4, [0])
    assert order4 == [0, 3, 2, 4]
    assert float(mindist4[5]) == pytest.approx(1 - math.cos(math.radians(45)), abs=1e-6)
    assert float(mindist4[1]) == pytest.approx(1 - math.cos(math.radians(5)), abs=1e-6)
    # near-duplicate floor: 5 degrees is within 0.01 of 0 degrees, so selection stops before it
    order_floor, _ = farthest_point_sampling(x, 6, [0], min_distance=0.01)
    assert order_floor == [0, 3, 2, 4, 5]


def test_build_slimset_known_answer_and_determinism():
    emb = LookupEmbedder(TABLE)
    pool = list(TABLE)
    s = build_slimset(pool, emb, n=4, seed=0)
    # seed = nearest to the geometric median (the 0-degree prompt, by symmetry about the x-axis),
    # then 180, then the 90 / -90 tie in seeded order.
    assert s.prompts[:2] == ["pos0", "pos180"] and set(s.prompts[2:]) == {"pos90", "neg90"}
    assert s.median_distance[0] == min(s.median_distance)
    assert s.n == 4 and s.embedder_id == "lookup-test" and s.seed == 0
    again = build_slimset(list(pool), emb, n=4, seed=0)
    assert again.prompts == s.prompts and again.digest == s.digest
    orders = {tuple(build_slimset(pool, emb, n=4, seed=k).prompts[2:]) for k in range(8)}
    assert orders == {("pos90", "neg90"), ("neg90", "pos90")}  # the seed only breaks the exact tie


def test_near_duplicates_never_both_selected():
    emb = LookupEmbedder(TABLE)
    # cos 2 deg = 0.99939 >= 0.999: +-2 are near duplicates of 0 and of +-4; cos 4 deg = 0.99756 is not
    sel = select_slimset(list(TABLE), emb, n=10, near_dup_threshold=0.999)
    assert set(sel.slimset.prompts) == set(TABLE) - {"pos2", "neg2"}
    assert sel.slimset.params["n_requested"] == 10 and sel.slimset.n == 8


def test_canonical_share_reserves_nearest_to_median():
    emb = LookupEmbedder(TABLE)
    s = build_slimset(list(TABLE), emb, n=4, canonical_share=0.5, near_dup_threshold=0.9999)
    assert s.params["n_canonical"] == 2
    assert s.prompts[0] == "pos0" and s.prompts[1] in {"pos2", "neg2"} and s.prompts[2] == "pos180"
    # with the default threshold (0.98) the whole cluster is near duplicates of the seed: the second
    # canonical pick is the next nearest to the median (90 or -90, a tie), then FPS takes the
    # opposite 135-degree prompt (distance 1 - cos 225 = 1.707 to both picks)
    s_default = build_slimset(list(TABLE), emb, n=4, canonical_share=0.5)
    p = s_default.prompts
    assert p[0] == "pos0" and p[1] in {"pos90", "neg90"}
    assert p[2] == {"pos90": "neg135", "neg90": "pos135"}[p[1]]
    assert not {"pos2", "neg2", "pos4", "neg4"} & set(p)


def test_evaluation_prompts_never_selected():
    torch.manual_seed(0)
    names = [f"prompt number {i}" for i in range(60)]
    table = {n: torch.randn(8).tolist() for n in names}
    evaluation = [names[3].upper(), "  " + names[10] + ". ", names[25]]
    for n in (57, 20):  # all candidates, and a subset
        s = build_slimset(names, LookupEmbedder(table), n=n, exclude=evaluation, seed=1)
        assert not {dedup_key(p) for p in s.prompts} & {dedup_key(e) for e in evaluation}
        assert s.params["n_excluded"] == 3
    with pytest.raises(ValueError, match="exceeds the 57 candidate prompts"):
        build_slimset(names, LookupEmbedder(table), n=58, exclude=evaluation)


def test_slimset_file_round_trip_and_card(tmp_path):
    torch.manual_seed(0)
    names = [f"caption {i}" for i in range(200)]
    table = {n: torch.randn(16).tolist() for n in names}
    sel = select_slimset(names, LookupEmbedder(table), n=25, seed=3)
    s = sel.slimset
    path = s.save(tmp_path / "slimset.json")
    text = path.read_text()
    assert '"format_version": 1' in text and '"caption ' in text  # small, readable JSON
    back = SlimSet.load(path)
    assert back == s and back.digest == s.digest
    assert json.loads(text)["pool_digest"] == s.pool_digest
    md = slimset_card(s, sel.embeddings, sel.selected_idx, tmp_path / "card")
    body = md.read_text()
    assert "lookup-test" in body and "| canonical" in body and "| rare" in body
    assert (tmp_path / "card" / "slimset_card.png").stat().st_size > 10_000
    tampered = s.to_dict()
    tampered["kind"] = "something else"
    with pytest.raises(ValueError, match="not a SlimSet file"):
        SlimSet.from_dict(tampered)


# ---------------------------------------------------------------------------------------------
# open_clip, offline, with a tiny custom config registered here (random weights saved to tmp_path)
# ---------------------------------------------------------------------------------------------
TINY_CLIP = "slimdiff-test-tiny-clip"


@pytest.fixture
def tiny_clip_checkpoint(tmp_path):
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return model.eval(), ckpt


def test_open_clip_embedder_custom_config_local_checkpoint(tiny_clip_checkpoint):
    import open_clip

    model, ckpt = tiny_clip_checkpoint
    emb = OpenClipEmbedder(TINY_CLIP, str(ckpt))
    prompts = ["a photo of a cat", "a red car", "two dogs on a bench"]
    got = emb.embed(prompts, batch_size=2)
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts))
    torch.testing.assert_close(got, ref)  # the checkpoint's weights, not a fresh random init
    assert emb.id.startswith(f"open_clip:{TINY_CLIP}:file:tiny_clip.pt:sha256=")
    s = build_slimset(prompts + ["a blue bird", "an old man"], emb, n=3)
    assert s.embedder_id == emb.id and len(s) == 3


def test_open_clip_embedder_missing_weights_never_download(tiny_clip_checkpoint, tmp_path, monkeypatch):
    with pytest.raises(EmbedderWeightsNotFound, match="does not exist"):
        OpenClipEmbedder(TINY_CLIP, str(tmp_path / "missing.pt"))
    with pytest.raises(EmbedderWeightsNotFound, match="pretrained=<local checkpoint path>"):
        OpenClipEmbedder(TINY_CLIP, None)
    with pytest.raises(EmbedderWeightsNotFound, match="no model config named"):
        OpenClipEmbedder("not-a-registered-model", "x.pt")
    # a pretrained tag that is not cached: a clear error, no network access attempted
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(EmbedderWeightsNotFound, match="not in the local cache and will not be downloaded"):
        OpenClipEmbedder("ViT-B-32", "openai")
