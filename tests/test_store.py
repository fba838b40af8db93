"""The Zarr covariance store (format 2): per-shard deltas merged into running totals. Exact round
trip, a size that does not grow with the shards, resume from completed shards, crash-safe merges,
corruption detected, format-1 stores converted or refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import ZstdCodec

from slimdiff.core.stats import ActivationStats, merge
from tasks.artifacts import ArtifactError
from tasks.store import CovarianceStore, convert_v1

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


def _fill(store, n):
    for i in range(n):
        store.mark_shard(i, store.write_shard(i, _shard(i)))
        store.merge_completed()


def test_round_trip_is_exact_and_equals_merge(tmp_path):
    """Merged totals are bit-identical to summing all shards at once (same float64 order)."""
    uri = str(tmp_path / "stats.zarr")
    shards = [_shard(i) for i in range(3)]
    store = _open(uri)
    _fill(store, 3)
    digest = store.finalize()
    reread = CovarianceStore.open(uri)
    assert reread.complete and reread.digest == digest
    got, expected = reread.read(), merge(shards)
    for k in SHAPES:
        assert torch.equal(got.moments[k], expected.moments[k])
        assert torch.equal(got.tokens[k], expected.tokens[k])
        assert torch.equal(got.second_moment(k, 1), expected.second_moment(k, 1))
    w = [0.2, 0.3, 0.5]
    agg, want = got.aggregate(w), expected.aggregate(w)
    for k in SHAPES:
        assert torch.equal(agg[k], want[k])
    assert reread.attrs["token_counts"]["blk.ff.hidden"] == expected.tokens["blk.ff.hidden"].tolist()
    # one chunk per bucket matrix; one generation of totals, no per-shard copies left
    gen, _ = reread.generation()
    assert reread.group[f"totals/g{gen}/blk.ff.hidden"].chunks == (1, 6, 6)
    assert list(reread.group["deltas"].group_keys()) == []
    assert list(reread.group["totals"].group_keys()) == [f"g{gen}"]


def test_store_size_does_not_grow_with_shards(tmp_path):
    """Bytes on disk after 2 and after 12 shards are the same: one copy of the statistics."""

    def size(n):
        uri = tmp_path / f"s{n}.zarr"
        store = _open(str(uri), n_shards=n)
        _fill(store, n)
        store.finalize()
        return sum(f.stat().st_size for f in uri.rglob("*") if f.is_file() and f.name != "zarr.json")

    assert size(2) == size(12)


def test_resume_rewrites_only_unmarked_shards(tmp_path):
    uri = str(tmp_path / "stats.zarr")
    store = _open(uri)
    store.mark_shard(0, store.write_shard(0, _shard(0)))
    store.write_shard(1, _shard(99))  # "crashed" before its completion marker: must not count
    resumed = _open(uri)
    assert resumed.missing_shards() == [1, 2]
    assert resumed.merge_completed() == [0]
    with pytest.raises(ArtifactError, match="incomplete"):
        resumed.read()


def test_merge_waits_for_index_order(tmp_path):
    """Shard 2 done before shard 1 stays a delta until 1 is merged (the sum order is fixed)."""
    store = _open(str(tmp_path / "stats.zarr"))
    store.mark_shard(0, store.write_shard(0, _shard(0)))
    store.mark_shard(2, store.write_shard(2, _shard(2)))
    assert store.merge_completed() == [0]
    assert store.unmerged_shards() == [2]
    store.mark_shard(1, store.write_shard(1, _shard(1)))
    assert store.merge_completed() == [1, 2]
    store.finalize()
    assert torch.equal(
        store.read().moments["blk.ff.hidden"], merge([_shard(i) for i in range(3)]).moments["blk.ff.hidden"]
    )


def test_a_merge_killed_before_its_mark_leaves_the_old_generation_in_force(tmp_path, monkeypatch):
    """Kill during a merge: the half-written generation never counts, the deltas survive, and the
    rerun gives the exact totals."""
    uri = str(tmp_path / "stats.zarr")
    store = _open(uri)
    _fill(store, 1)
    store.mark_shard(1, store.write_shard(1, _shard(1)))

    class Killed(BaseException):
        pass

    def killed(key):
        if key == "blk.ff.hidden":  # after the first statistic of the new generation was written
            raise Killed

    with pytest.raises(Killed):
        store.merge_completed(progress=killed)
    reopened = _open(uri)
    assert reopened.merged_shards() == [0] and reopened.unmerged_shards() == [1]
    assert reopened.merge_completed() == [1]
    reopened.mark_shard(2, reopened.write_shard(2, _shard(2)))
    reopened.finalize()
    expected = merge([_shard(i) for i in range(3)])
    for k in SHAPES:
        assert torch.equal(reopened.read().moments[k], expected.moments[k])


def test_different_inputs_never_overwrite_an_existing_store(tmp_path):
    uri = str(tmp_path / "stats.zarr")
    _open(uri)
    with pytest.raises(ArtifactError, match="different inputs"):
        _open(uri, identity={"model": "other", "slimset": "s"})


def test_corrupted_total_is_reported(tmp_path):
    uri = str(tmp_path / "stats.zarr")
    store = _open(uri, n_shards=1)
    _fill(store, 1)
    store.finalize()
    gen, _ = store.generation()
    # overwrite one bucket with different (valid) data behind the store's back
    store.group[f"totals/g{gen}/blk.ff.hidden"][1] = np.zeros((6, 6))
    with pytest.raises(ArtifactError, match=r"totals of blk.ff.hidden \(bucket 1\) are corrupted"):
        CovarianceStore.open(uri).read().moments["blk.ff.hidden"]
    assert list(CovarianceStore.open(uri).totals_problems(full=True)) == ["blk.ff.hidden"]
    # what `slimdiff lineage --verify` runs (all-zero data: zarr dropped the chunk file)
    with pytest.raises(ArtifactError, match=r"chunk totals/g1/blk.ff.hidden/c/1/0/0 is missing") as err:
        CovarianceStore.open(uri).verify()
    assert "every shard is collected again" in err.value.repair


def test_corrupted_delta_is_caught_before_it_is_merged(tmp_path):
    """A damaged delta is found by the full check and by the merge, which refuses to add it and
    drops its mark. (The first shard is renamed into the totals, not read: its damage is found
    by the digest check of every read of the totals, see test_corrupted_total_is_reported.)"""
    uri = str(tmp_path / "stats.zarr")
    store = _open(uri, n_shards=2)
    _fill(store, 1)
    store.mark_shard(1, store.write_shard(1, _shard(1)))
    store.group["deltas/1/blk.attn1.query"][2] = np.zeros((2, 3, 3))
    assert list(store.shard_problems(full=True)) == [1]
    with pytest.raises(ArtifactError, match="shard 1 is corrupted"):
        store.merge_completed()
    assert store.missing_shards() == [1]  # it lost its mark: the next run collects it again
    assert store.merged_shards() == [0]


def test_a_damaged_first_shard_is_caught_when_the_totals_are_read(tmp_path):
    uri = str(tmp_path / "stats.zarr")
    store = _open(uri, n_shards=1)
    store.mark_shard(0, store.write_shard(0, _shard(0)))
    store.group["deltas/0/blk.attn1.query"][2] = np.zeros((2, 3, 3))
    store.finalize()
    assert list(CovarianceStore.open(uri).totals_problems(full=True)) == ["blk.attn1.query"]
    with pytest.raises(ArtifactError, match="are corrupted"):
        CovarianceStore.open(uri).read().second_moment("blk.attn1.query", 2)


def _write_v1(uri: str, shards: list[ActivationStats]) -> None:
    """A format-1 store as the previous version wrote it (per-shard copies of everything)."""
    g = zarr.open_group(store=uri, mode="w-")
    done, moments, tokens = g.create_group("done"), g.create_group("moments"), g.create_group("tokens")
    for key, mat in SHAPES.items():
        m = moments.create_array(
            key,
            shape=(len(shards), 3, *mat),
            chunks=(1, 1, *mat),
            dtype="float64",
            compressors=ZstdCodec(level=3),
        )
        t = tokens.create_array(key, shape=(len(shards), 3), chunks=(1, 3), dtype="int64")
        for i, s in enumerate(shards):
            m[i] = s.moments[key].numpy()
            t[i] = s.tokens[key].numpy()
    for i in range(len(shards)):
        done.create_group(str(i), attributes={"digest": f"d{i}"})
    g.attrs.update(
        {
            "format_version": 1,
            "identity": {"model": "m"},
            "identity_digest": "x",
            "n_shards": len(shards),
            "n_buckets": 3,
            "keys": sorted(SHAPES),
            "complete": True,
        }
    )


def test_format_1_store_is_refused_with_how_to_convert_and_converts_exactly(tmp_path):
    old, new = str(tmp_path / "v1.zarr"), str(tmp_path / "v2.zarr")
    shards = [_shard(i) for i in range(3)]
    _write_v1(old, shards)
    with pytest.raises(ArtifactError, match=r"format 1 .*`slimdiff convert-store "):
        CovarianceStore.open(old)
    converted = convert_v1(old, new)
    assert converted.complete
    expected = merge(shards)
    for k in SHAPES:
        assert torch.equal(CovarianceStore.open(new).read().moments[k], expected.moments[k])


def test_a_full_disk_during_a_shard_write_stops_with_one_message_and_keeps_what_was_done(
    tmp_path, monkeypatch
):
    import errno

    uri = str(tmp_path / "stats.zarr")
    store = _open(uri)
    _fill(store, 1)

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.Array, "__setitem__", no_space)
    with pytest.raises(ArtifactError, match="no space left on the device while writing shard 1; nothing"):
        store.write_shard(1, _shard(1))
    monkeypatch.undo()
    reopened = _open(uri)
    assert reopened.merged_shards() == [0] and reopened.missing_shards() == [1, 2]
    _fill_rest = [reopened.mark_shard(i, reopened.write_shard(i, _shard(i))) for i in (1, 2)]
    assert len(_fill_rest) == 2
    reopened.finalize()
    assert torch.equal(
        reopened.read().moments["blk.ff.hidden"],
        merge([_shard(i) for i in range(3)]).moments["blk.ff.hidden"],
    )


def test_a_transient_read_error_is_not_reported_as_damage(tmp_path, monkeypatch):
    """Only a codec error, a wrong-size chunk or a missing array means damage (and a recomputation);
    an I/O error of the storage (a dropped connection) or MemoryError surfaces as itself."""
    uri = str(tmp_path / "stats.zarr")
    store = _open(uri, n_shards=1)
    _fill(store, 1)
    store.finalize()

    def dropped(self, *args, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(zarr.Array, "__getitem__", dropped)
    with pytest.raises(ConnectionResetError):
        CovarianceStore.open(uri).totals_problems(full=True)
    with pytest.raises(ConnectionResetError):
        CovarianceStore.open(uri).read().moments["blk.ff.hidden"]
