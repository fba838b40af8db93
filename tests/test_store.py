"""The Zarr covariance store: exact round trip, resume from completed shards, corruption detected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimdiff.stats import ActivationStats, merge
from tasks.artifacts import ArtifactError
from tasks.store import CovarianceStore

SHAPES = {"blk.ff.hidden": (6, 6), "blk.attn1.query": (2, 3, 3)}


def _shard(seed: int, n_buckets: int = 3) -> ActivationStats:
    g = torch.Generator().manual_seed(seed)
    moments = {k: torch.randn((n_buckets, *s), generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    tokens = {k: torch.randint(1, 100, (n_buckets,), generator=g) for k in SHAPES}
    return ActivationStats(n_buckets, moments, tokens)


def _open(uri, n_shards=3, identity=None):
    return CovarianceStore.open_or_create(
        uri,
        identity=identity or {"model": "m", "slimset": "s"},
        n_shards=n_shards,
        n_buckets=3,
        shapes=SHAPES,
    )


def test_round_trip_is_exact_and_equals_merge(tmp_path):
    uri = str(tmp_path / "stats.zarr")
    shards = [_shard(i) for i in range(3)]
    store = _open(uri)
    for i, s in enumerate(shards):
        store.mark_shard(i, store.write_shard(i, s))
    digest = store.finalize()
    reread = CovarianceStore.open(uri)
    assert reread.complete and reread.digest == digest
    got, expected = reread.read(), merge(shards)
    for k in SHAPES:
        assert torch.equal(got.moments[k], expected.moments[k])
        assert torch.equal(got.tokens[k], expected.tokens[k])
    assert reread.attrs["token_counts"]["blk.ff.hidden"] == expected.tokens["blk.ff.hidden"].tolist()
    # one chunk per (shard, bucket) matrix
    assert reread.group["moments"]["blk.ff.hidden"].chunks == (1, 1, 6, 6)


def test_resume_rewrites_only_unmarked_shards(tmp_path):
    uri = str(tmp_path / "stats.zarr")
    store = _open(uri)
    store.mark_shard(0, store.write_shard(0, _shard(0)))
    store.write_shard(1, _shard(99))  # "crashed" before its completion marker: must not count
    resumed = _open(uri)
    assert resumed.missing_shards() == [1, 2]
    with pytest.raises(ArtifactError, match="incomplete"):
        resumed.read()


def test_different_inputs_never_overwrite_an_existing_store(tmp_path):
    uri = str(tmp_path / "stats.zarr")
    _open(uri)
    with pytest.raises(ArtifactError, match="different inputs"):
        _open(uri, identity={"model": "other", "slimset": "s"})


def test_corrupted_chunk_is_reported(tmp_path):
    uri = str(tmp_path / "stats.zarr")
    store = _open(uri, n_shards=1)
    store.mark_shard(0, store.write_shard(0, _shard(0)))
    store.finalize()
    # overwrite one bucket with different (valid) data behind the store's back
    store.group["moments"]["blk.ff.hidden"][0, 1] = np.zeros((6, 6))
    with pytest.raises(ArtifactError, match="shard 0 is corrupted"):
        CovarianceStore.open(uri).read()
