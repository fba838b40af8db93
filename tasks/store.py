"""The covariance store: activation statistics in chunked Zarr (v3), resumable per prompt shard, whose
size follows the statistics, not the number of shards (format 2).

Layout (any fsspec URL: a local folder, ``s3://bucket/stats.zarr``, ...)::

    stats.zarr/                     attrs: format_version 2, identity (model release, SlimSet digest,
                                    calibration params, code version), n_shards, n_buckets, keys,
                                    shapes, complete, memory_plan
      deltas/<i>/<stat key>         float64 (n_buckets, *mat), chunks (1, *mat): shard i's sums,
                                    kept only until they are merged into the totals
      done/<i>                      empty group, the completion mark of shard i; attrs {"digest",
                                    "key_digests", "tokens": {key: per-bucket counts}, "files"}
      totals/g<N>/<stat key>        float64 (n_buckets, *mat), chunks (1, *mat): generation N of the
                                    running totals (the exact sum of the merged shards)
      generations/g<N>              empty group, the mark of generation N; attrs {"shards": merged
                                    shard indices, "digests": {key: per-bucket sha256}, "tokens",
                                    "files"}

A shard is collected (maybe in several sampling passes, ``slimdiff.core.memory``), written to its delta
and marked; then merged: generation N+1 = generation N + the deltas of the next shards in index
order, written chunk by chunk (one bucket of one statistic in memory) beside generation N; its mark
is written last, then generation N and the merged deltas are deleted. A kill at any point leaves
either the old generation or the new one marked, never a half-merged one, and the deltas of every
shard not in the marked generation are still there. So the store holds at most two generations
plus the deltas in flight, whatever the number of shards, and merging in index order makes the
totals bit-identical to summing all shards at once (the format-1 reader's order).

Integrity: the marks record every chunk's digest and file size. A damaged delta loses its mark and
exactly that shard is collected again. A damaged total cannot be rebuilt from one shard (the store
keeps no per-shard copies once merged): the damaged generation is dropped and every shard is
collected again; the message says so.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import fsspec
import fsspec.implementations.local
import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from slimdiff.core.stats import ActivationStats, LazyActivationStats
from tasks.artifacts import ArtifactError, sha256_json

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 2


def _chunk_digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def key_digest(moments: np.ndarray, tokens: Sequence[int]) -> str:
    """sha256 of one statistic of one shard: its per-bucket chunk digests and token counts."""
    chunks = [_chunk_digest(moments[b]) for b in range(moments.shape[0])]
    return sha256_json({"chunks": chunks, "tokens": [int(t) for t in tokens]})


def combine_key_digests(key_digests: Mapping[str, str]) -> str:
    return sha256_json({k: key_digests[k] for k in sorted(key_digests)})


def shard_digest(stats: ActivationStats) -> str:
    """Digest of one shard's statistics (every statistic's exact bytes and token counts)."""
    return combine_key_digests(
        {k: key_digest(stats.moments[k].numpy(), stats.tokens[k].tolist()) for k in stats.moments}
    )


def _disk_full(err: OSError, uri: str, what: str) -> ArtifactError:
    return ArtifactError(
        f"{uri}: no space left on the device while writing {what}; nothing already marked is lost "
        "(completed shards and the merged totals stay as they are): free space and rerun, which resumes",
        stage="calibrate",
        artifact="covariance_store",
        repair=what,
    )


class ShardWriter:
    """Receives one shard's statistics, one at a time (``collect_stats(sink=...)``), writes each
    to the shard's delta at once, and marks the shard complete in :meth:`finish`."""

    def __init__(self, store: CovarianceStore, index: int) -> None:
        self.store, self.index = store, index
        self.key_digests: dict[str, str] = {}
        self.chunk_digests: dict[str, list[str]] = {}
        self.tokens: dict[str, list[int]] = {}

    def __call__(self, key: str, moments: torch.Tensor, tokens: torch.Tensor) -> None:
        self.write(key, moments, tokens)

    def write(self, key: str, moments: torch.Tensor, tokens: torch.Tensor) -> None:
        s = self.store
        if key not in s.shapes:
            raise ArtifactError(
                f"shard {self.index}: statistic {key!r} is not in the store layout of {s.uri}"
            )
        m = moments.detach().cpu().numpy()
        if m.dtype != np.float64 or m.shape != (s.n_buckets, *s.shapes[key]):
            raise ArtifactError(
                f"shard {self.index}: {key} is {m.dtype} {m.shape}, the store holds float64 "
                f"{(s.n_buckets, *s.shapes[key])}"
            )
        t = [int(v) for v in tokens.tolist()]
        try:
            arr = s._array(f"deltas/{self.index}", key, create=True)
            for b in range(s.n_buckets):
                arr[b] = m[b]
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise _disk_full(err, s.uri, f"shard {self.index}") from err
            raise
        self.chunk_digests[key] = [_chunk_digest(m[b]) for b in range(m.shape[0])]
        self.key_digests[key] = sha256_json({"chunks": self.chunk_digests[key], "tokens": t})
        self.tokens[key] = t

    def finish(self) -> str:
        s = self.store
        missing = sorted(set(s.keys) - set(self.key_digests))
        if missing:
            raise ArtifactError(
                f"shard {self.index}: {len(missing)} statistics were not written, e.g. {missing[:3]}"
            )
        digest = combine_key_digests(self.key_digests)
        s._mark_shard(self.index, digest, self.key_digests, self.chunk_digests, self.tokens)
        return digest


class CovarianceStore:
    """A Zarr group of running totals plus unmerged per-shard deltas (see module docstring)."""

    def __init__(self, group: zarr.Group, uri: str, storage_options: dict | None = None):
        self.group = group
        self.uri = uri
        self._storage_options = dict(storage_options or {})

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def _kw(cls, storage_options):
        return {"storage_options": storage_options} if storage_options else {}

    @classmethod
    def open_or_create(
        cls,
        uri: str,
        *,
        identity: Mapping[str, Any],
        n_shards: int,
        n_buckets: int,
        shapes: Mapping[str, Sequence[int]],
        storage_options: dict | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> CovarianceStore:
        """Open the store for (re)collection. An existing store is resumed only when its identity
        (model, SlimSet, params, code) matches; a different one is an error, never overwritten."""
        identity = dict(identity)
        identity_digest = sha256_json(identity)
        kw = cls._kw(storage_options)
        try:
            group = zarr.open_group(store=uri, mode="r", **kw)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            group = None
        if group is not None:
            _check_format(group, uri)
            found = group.attrs.get("identity_digest")
            if found != identity_digest:
                raise ArtifactError(
                    f"{uri}: an existing covariance store was made from different inputs "
                    f"(identity {str(found)[:12]} != {identity_digest[:12]}); remove it or choose another path"
                )
            store = cls(zarr.open_group(store=uri, mode="r+", **kw), uri, storage_options)
            store._clean_stale_generations()
            log.info("resuming %s: %d/%d shards complete", uri, len(store.completed_shards()), n_shards)
            return store
        try:  # "w-": never clear a store another writer created meanwhile; resume it instead
            group = zarr.open_group(store=uri, mode="w-", **kw)
        except FileExistsError:
            return cls.open_or_create(
                uri,
                identity=identity,
                n_shards=n_shards,
                n_buckets=n_buckets,
                shapes=shapes,
                storage_options=storage_options,
                attrs=attrs,
            )
        for name in ("done", "deltas", "totals", "generations"):
            group.create_group(name)
        group.attrs.update(
            {
                "format_version": STORE_FORMAT_VERSION,
                "identity": identity,
                "identity_digest": identity_digest,
                "n_shards": n_shards,
                "n_buckets": n_buckets,
                "keys": sorted(shapes),
                "shapes": {k: [int(s) for s in v] for k, v in shapes.items()},
                "complete": False,
                **dict(attrs or {}),  # provenance that is not identity (e.g. where the model came from)
            }
        )
        return cls(group, uri, storage_options)

    @classmethod
    def open_if_identical(cls, uri: str, identity: Mapping[str, Any], storage_options: dict | None = None):
        """The existing store at ``uri`` when it was made from ``identity``, else None."""
        try:
            group = zarr.open_group(store=uri, mode="r", **cls._kw(storage_options))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return None
        if group.attrs.get("identity_digest") != sha256_json(dict(identity)):
            return None
        _check_format(group, uri)
        return cls(group, uri, storage_options)

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None, writable: bool = False) -> CovarianceStore:
        try:
            group = zarr.open_group(store=uri, mode="r+" if writable else "r", **cls._kw(storage_options))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise ArtifactError(f"{uri}: covariance store not found") from err
        _check_format(group, uri)
        return cls(group, uri, storage_options)

    # -- facts --------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def n_shards(self) -> int:
        return int(self.group.attrs["n_shards"])

    @property
    def n_buckets(self) -> int:
        return int(self.group.attrs["n_buckets"])

    @property
    def keys(self) -> list[str]:
        return list(self.group.attrs["keys"])

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.group.attrs["shapes"].items()}

    def _marks(self, name: str) -> dict[str, dict]:
        return {n: dict(g.attrs) for n, g in self.group[name].groups()}

    def completed_shards(self) -> dict[int, str]:
        return {int(n): a["digest"] for n, a in self._marks("done").items() if "digest" in a}

    def missing_shards(self) -> list[int]:
        done = self.completed_shards()
        return [i for i in range(self.n_shards) if i not in done]

    def generation(self) -> tuple[int, dict]:
        """(N, mark attributes) of the newest marked generation of the totals; (0, {}) before any merge."""
        marks = {int(n[1:]): a for n, a in self._marks("generations").items() if "shards" in a}
        if not marks:
            return 0, {}
        n = max(marks)
        return n, marks[n]

    def merged_shards(self) -> list[int]:
        return list(self.generation()[1].get("shards", []))

    def unmerged_shards(self) -> list[int]:
        merged = set(self.merged_shards())
        return sorted(i for i in self.completed_shards() if i not in merged)

    @property
    def complete(self) -> bool:
        return (
            bool(self.group.attrs.get("complete"))
            and not self.missing_shards()
            and len(self.merged_shards()) == self.n_shards
        )

    @property
    def digest(self) -> str:
        """Content digest of the whole store: the ordered shard digests plus its identity."""
        shards = self.completed_shards()
        return sha256_json(
            {"identity": self.group.attrs["identity_digest"], "shards": [shards[i] for i in sorted(shards)]}
        )

    # -- writing ------------------------------------------------------------------------------
    def _array(self, parent: str, key: str, *, create: bool = False):
        path = f"{parent}/{key}"
        if create:
            return self.group.create_array(
                path,
                shape=(self.n_buckets, *self.shapes[key]),
                chunks=(1, *self.shapes[key]),
                dtype="float64",
                compressors=ZstdCodec(level=3),
                fill_value=0.0,
                overwrite=True,
            )
        return self.group[path]

    def shard_writer(self, index: int) -> ShardWriter:
        """A sink for ``collect_stats``: writes shard ``index`` statistic by statistic."""
        if not 0 <= index < self.n_shards:
            raise ValueError(f"shard index {index} out of range 0..{self.n_shards - 1}")
        if index in self.merged_shards():
            raise ArtifactError(f"{self.uri}: shard {index} is already merged into the totals")
        return ShardWriter(self, index)

    def write_shard(self, index: int, stats: ActivationStats) -> str:
        """Write one shard's statistics at once (chunk-aligned, safe to run concurrently for
        different shards). It does not count until :meth:`mark_shard` records its digest."""
        if stats.n_buckets != self.n_buckets or sorted(stats.moments) != self.keys:
            raise ArtifactError(f"shard {index}: statistics do not match the store layout of {self.uri}")
        writer = self.shard_writer(index)
        for key in self.keys:
            writer.write(key, stats.moments[key], stats.tokens[key])
        self._pending_writers[index] = writer
        return combine_key_digests(writer.key_digests)

    @property
    def _pending_writers(self) -> dict[int, ShardWriter]:
        if not hasattr(self, "_writers"):
            self._writers: dict[int, ShardWriter] = {}
        return self._writers

    def mark_shard(self, index: int, digest: str) -> None:
        """Record shard ``index`` as complete, after :meth:`write_shard` wrote its data."""
        writer = self._pending_writers.pop(index, None)
        if writer is None:
            raise ArtifactError(f"{self.uri}: shard {index} was not written by this store object")
        if combine_key_digests(writer.key_digests) != digest:
            raise ArtifactError(f"{self.uri}: shard {index} digest does not match what was written")
        writer.finish()

    def _mark_shard(
        self, index: int, digest: str, key_digests: dict, chunk_digests: dict, tokens: dict
    ) -> None:
        files = {rel: self._file_size(rel) for rel in self._chunk_files(f"deltas/{index}")}
        self.group["done"].create_group(
            str(index),
            overwrite=True,
            attributes={
                "digest": digest,
                "key_digests": key_digests,
                "chunk_digests": chunk_digests,
                "tokens": tokens,
                "files": files,
            },
        )

    def unmark_shards(self, indices: Sequence[int]) -> None:
        """Drop the completion marks of ``indices`` (damaged deltas): the next collection of this
        store recomputes exactly those shards."""
        merged = set(self.merged_shards())
        for i in indices:
            if i in merged:
                raise ArtifactError(f"{self.uri}: shard {i} is merged into the totals; use drop_totals()")
            del self.group["done"][str(i)]
        self.group.attrs["complete"] = False

    def drop_totals(self) -> None:
        """Forget every merged shard (damaged totals): all shards are collected again."""
        for name in list(self.group["generations"].group_keys()):
            del self.group["generations"][name]
        for name in list(self.group["totals"].group_keys()):
            del self.group["totals"][name]
        for name in list(self.group["done"].group_keys()):
            del self.group["done"][name]
        for name in list(self.group["deltas"].group_keys()):
            del self.group["deltas"][name]
        self.group.attrs["complete"] = False

    # -- merging ------------------------------------------------------------------------------
    def merge_completed(self, progress: Callable[[str], None] | None = None) -> list[int]:
        """Fold every completed shard that follows the merged ones in index order into a new
        generation of the totals; returns the shards merged (none when the next one is not done).

        Memory: one bucket of one statistic (plus the delta bucket being added). Crash-safe: the new
        generation counts only once its mark exists, and the deltas are deleted after that. The
        first shard becomes generation 1 by a rename (no copy, no second full size on disk)."""
        gen, mark = self.generation()
        merged = list(mark.get("shards", []))
        if merged != list(range(len(merged))):
            raise ArtifactError(f"{self.uri}: generation {gen} merged shards out of order: {merged}")
        done = self._marks("done")
        todo = []
        i = len(merged)
        while str(i) in done and "digest" in done[str(i)]:
            todo.append(i)
            i += 1
        if not todo:
            return []
        out = []
        if gen == 0:
            self._promote(todo[0], done[str(todo[0])])
            out, todo = [todo[0]], todo[1:]
            if not todo:
                return out
            gen, mark = self.generation()
            merged = list(mark["shards"])
        new = gen + 1
        self._delete_group("totals", f"g{new}")  # leftovers of a merge killed before its mark
        digests: dict[str, list[str]] = {}
        tokens: dict[str, list[int]] = {}
        try:
            for key in self.keys:
                dst = self._array(f"totals/g{new}", key, create=True)
                src = self._array(f"totals/g{gen}", key)
                deltas = [self._array(f"deltas/{j}", key) for j in todo]
                digests[key] = []
                for b in range(self.n_buckets):
                    acc = np.asarray(src[b])
                    for j, d in zip(todo, deltas, strict=True):
                        chunk = np.asarray(d[b])
                        if _chunk_digest(chunk) != done[str(j)]["chunk_digests"][key][b]:
                            self.unmark_shards([j])
                            raise ArtifactError(
                                f"{self.uri}: shard {j} is corrupted ({key} bucket {b} does not match its "
                                "recorded digest); it lost its mark: rerun to collect it again",
                                **_damaged(j),
                            )
                        acc = acc + chunk  # float64, in shard order
                    dst[b] = acc
                    digests[key].append(_chunk_digest(acc))
                tokens[key] = [
                    int(mark["tokens"][key][b]) + sum(int(done[str(j)]["tokens"][key][b]) for j in todo)
                    for b in range(self.n_buckets)
                ]
                if progress is not None:
                    progress(key)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise _disk_full(err, self.uri, f"the merge of shards {todo}") from err
            raise
        self._mark_generation(new, merged + todo, digests, tokens)
        # the new generation is marked: the old one and the merged deltas can go
        self._clean_stale_generations()
        log.info("merged shards %s into generation %d of %s", todo, new, self.uri)
        return out + todo

    def _mark_generation(self, gen: int, shards: list[int], digests: dict, tokens: dict) -> None:
        files = {rel: self._file_size(rel) for rel in self._chunk_files(f"totals/g{gen}")}
        self.group["generations"].create_group(
            f"g{gen}",
            overwrite=True,
            attributes={"shards": shards, "digests": digests, "tokens": tokens, "files": files},
        )

    def _promote(self, index: int, done: dict) -> None:
        """Shard ``index``'s delta becomes generation 1 of the totals: a rename on a local disk
        (atomic: a kill leaves the delta or the renamed totals, and the mark follows), a copy on
        object stores (the delta is deleted only after the generation is marked)."""
        fs, root = self._fs_root()
        src, dst = f"{root}/deltas/{index}", f"{root}/totals/g1"
        if fs.exists(src):
            self._delete_group("totals", "g1")  # leftovers of a promotion killed before its mark
            if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
                fs.mv(src, dst, recursive=True)
            else:  # object stores have no rename: copy object by object
                for f in fs.find(src):
                    fs.copy(f, dst + f[len(src) :])
        self._mark_generation(1, [index], dict(done["chunk_digests"]), dict(done["tokens"]))
        self._clean_stale_generations()  # the delta, where it was copied

    def _clean_stale_generations(self) -> None:
        """Delete every generation but the newest marked one (and unmarked leftovers older than it)."""
        gen, _ = self.generation()
        if not gen:
            return
        for name in list(self.group["generations"].group_keys()):
            if int(name[1:]) != gen:
                del self.group["generations"][name]
        for name in list(self.group["totals"].group_keys()):
            if int(name[1:]) < gen:
                del self.group["totals"][name]
        merged = set(self.merged_shards())
        for name in list(self.group["deltas"].group_keys()):
            if int(name) in merged:
                del self.group["deltas"][name]

    def _delete_group(self, parent: str, name: str) -> None:
        if name in set(self.group[parent].group_keys()):
            del self.group[parent][name]

    # -- integrity ----------------------------------------------------------------------------
    def _fs_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.uri, **self._storage_options)
        return fs, root.rstrip("/")

    def _chunk_files(self, parent: str) -> list[str]:
        """Store-relative paths of the chunk files under ``parent`` (zarr's own key encoding)."""
        out = []
        for key in self.keys:
            try:
                arr = self._array(parent, key)
            except KeyError:
                continue
            enc = arr.metadata.chunk_key_encoding
            for b in range(self.n_buckets):
                coords = (b,) + (0,) * (arr.ndim - 1)
                out.append(f"{parent}/{key}/{enc.encode_chunk_key(coords)}")
        return out

    def _shard_chunk_files(self, index: int) -> list[str]:
        return self._chunk_files(f"deltas/{index}")

    def totals_chunk_files(self) -> list[str]:
        gen, _ = self.generation()
        return self._chunk_files(f"totals/g{gen}") if gen else []

    def _file_size(self, rel: str) -> int | None:
        fs, root = self._fs_root()
        try:
            return int(fs.size(f"{root}/{rel}"))
        except FileNotFoundError:
            return None

    @property
    def recorded_bytes(self) -> int | None:
        """Total size of the chunk files recorded in the marks (totals and unmerged deltas)."""
        _, mark = self.generation()
        total = sum(v or 0 for v in mark.get("files", {}).values())
        merged = set(mark.get("shards", []))
        for name, attrs in self._marks("done").items():
            if int(name) not in merged:
                total += sum(v or 0 for v in attrs.get("files", {}).values())
        return total

    def _size_problem(self, files: Mapping[str, int | None]) -> str | None:
        for rel, size in files.items():
            actual = self._file_size(rel)
            if actual != size:
                got = "missing" if actual is None else f"{actual} bytes"
                return f"chunk {rel} is {got}, recorded {size if size is not None else 'absent'}"
        return None

    def shard_problems(self, full: bool = False) -> dict[int, str]:
        """{shard: what is wrong} for every completed, not yet merged shard whose delta no longer
        matches its mark (sizes always; every byte with ``full``)."""
        merged = set(self.merged_shards())
        problems: dict[int, str] = {}
        for name, attrs in sorted(self._marks("done").items(), key=lambda kv: int(kv[0])):
            i = int(name)
            if i in merged:
                continue
            problem = self._size_problem(attrs.get("files", {}))
            if problem is None and full:
                try:
                    self.read_shard(i, verify=True)
                except ArtifactError as err:
                    problem = str(err).removeprefix(f"{self.uri}: ")
            if problem is not None:
                problems[i] = problem
        return problems

    def totals_problems(self, full: bool = False) -> dict[str, str]:
        """{statistic: what is wrong} for the marked generation of the totals."""
        gen, mark = self.generation()
        if not gen:
            return {}
        problems: dict[str, str] = {}
        sizes = mark.get("files", {})
        for key in self.keys:
            own = {rel: s for rel, s in sizes.items() if rel.startswith(f"totals/g{gen}/{key}/")}
            problem = self._size_problem(own)
            if problem is None and full:
                try:
                    self._read_total_bucket(key, None)
                except ArtifactError as err:
                    problem = str(err).removeprefix(f"{self.uri}: ")
            if problem is not None:
                problems[key] = problem
        return problems

    def verify(self) -> None:
        """Read every byte of the store (the merged totals and any unmerged shard) against its
        recorded digest; raise ArtifactError naming the first damage and its repair."""
        for key, problem in sorted(self.totals_problems(full=True).items()):
            raise ArtifactError(f"{self.uri}: {problem}", **_damaged_totals(key))
        for i, problem in sorted(self.shard_problems(full=True).items()):
            raise ArtifactError(f"{self.uri}: shard {i}: {problem}", **_damaged(i))

    def finalize(self, extra_attrs: Mapping[str, Any] | None = None) -> str:
        self.merge_completed()
        missing = self.missing_shards()
        if missing:
            raise ArtifactError(f"{self.uri}: cannot finalize, shards {missing} are not complete")
        if len(self.merged_shards()) != self.n_shards:
            raise ArtifactError(
                f"{self.uri}: cannot finalize, shards {self.unmerged_shards()} are not merged"
            )
        _, mark = self.generation()
        self.group.attrs.update({**dict(extra_attrs or {}), "token_counts": mark["tokens"], "complete": True})
        return self.digest

    # -- reading ------------------------------------------------------------------------------
    def read_shard(self, index: int, verify: bool = True) -> ActivationStats:
        """One shard's statistics while its delta exists (before it is merged)."""
        if index in set(self.merged_shards()):
            raise ArtifactError(
                f"{self.uri}: shard {index} is merged into the totals (no per-shard copy is kept)"
            )
        marks = self._marks("done")
        if str(index) not in marks:
            raise ArtifactError(f"{self.uri}: shard {index} was never completed")
        attrs = marks[str(index)]
        moments, tokens = {}, {}
        for key in self.keys:
            data = self._read(
                f"deltas/{index}", key, slice(None), f"shard {index} of {key} is", _damaged(index)
            )
            moments[key] = torch.from_numpy(data)
            tokens[key] = torch.tensor(attrs["tokens"][key], dtype=torch.int64)
        stats = ActivationStats(
            self.n_buckets, moments, tokens, meta=dict(self.group.attrs.get("stats_meta", {}))
        )
        if verify:
            actual = shard_digest(stats)
            if actual != attrs["digest"]:
                raise ArtifactError(
                    f"{self.uri}: shard {index} is corrupted (digest {actual[:12]} != recorded {attrs['digest'][:12]})",
                    **_damaged(index),
                )
        return stats

    def _read(self, parent: str, key: str, sel, what: str, damaged: dict[str, str]) -> np.ndarray:
        """``array[sel]`` of ``parent/key``. Only a codec error on a damaged chunk (RuntimeError), a
        chunk of the wrong size (ValueError) or a missing array (KeyError) means damage; I/O and
        memory errors propagate as themselves."""
        try:
            return np.asarray(self._array(parent, key)[sel])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ArtifactError(
                f"{self.uri}: {what} unreadable ({type(err).__name__}: {err})", **damaged
            ) from err

    def _read_total_bucket(self, key: str, bucket: int | None, verify: bool = True) -> torch.Tensor:
        """One bucket (or all, ``bucket=None``) of one statistic of the totals, digest-checked."""
        gen, mark = self.generation()
        buckets = range(self.n_buckets) if bucket is None else [bucket]
        out = []
        for b in buckets:
            what = f"the totals of {key} (bucket {b}) are"
            chunk = self._read(f"totals/g{gen}", key, b, what, _damaged_totals(key))
            if verify and _chunk_digest(chunk) != mark["digests"][key][b]:
                raise ArtifactError(
                    f"{self.uri}: the totals of {key} (bucket {b}) are corrupted (digest mismatch)",
                    **_damaged_totals(key),
                )
            out.append(torch.from_numpy(chunk))
        return out[0] if bucket is not None else torch.stack(out)

    def read(self, verify: bool = True, cache_bytes: int = 1 << 30) -> LazyActivationStats:
        """The merged statistics, read per statistic (or per bucket) on demand, every chunk checked
        against its recorded digest: no reader holds more than it asks for."""
        if not self.complete:
            raise ArtifactError(
                f"{self.uri}: store is incomplete (missing shards {self.missing_shards()}, "
                f"unmerged {self.unmerged_shards()})"
            )
        _, mark = self.generation()
        return LazyActivationStats(
            self.n_buckets,
            {k: torch.tensor(mark["tokens"][k], dtype=torch.int64) for k in self.keys},
            read_key=lambda key: self._read_total_bucket(key, None, verify),
            read_bucket=lambda key, b: self._read_total_bucket(key, b, verify),
            meta=dict(self.group.attrs.get("stats_meta", {})),
            cache_bytes=cache_bytes,
        )


def _check_format(group: zarr.Group, uri: str) -> None:
    version = group.attrs.get("format_version")
    if version == STORE_FORMAT_VERSION:
        return
    if version == 1:
        raise ArtifactError(
            f"{uri}: a covariance store of format 1 (a full copy of the statistics per shard); this version "
            f"reads format {STORE_FORMAT_VERSION}: convert it with `slimdiff convert-store {uri} NEW_PATH` "
            "(no forward passes) or remove it and calibrate again"
        )
    raise ArtifactError(f"{uri}: not a slimdiff covariance store (format_version {version!r})")


def convert_v1(src: str, dst: str, storage_options: dict | None = None) -> CovarianceStore:
    """Rewrite a format-1 store (per-shard copies) as a format-2 store of merged totals, shard by
    shard in index order (the same sums, bit for bit, as format 1's reader). Memory: one shard."""
    kw = CovarianceStore._kw(storage_options)
    try:
        old = zarr.open_group(store=src, mode="r", **kw)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise ArtifactError(f"{src}: covariance store not found") from err
    if old.attrs.get("format_version") != 1:
        raise ArtifactError(
            f"{src}: not a format-1 covariance store (format_version {old.attrs.get('format_version')!r})"
        )
    a = dict(old.attrs)
    if not a.get("complete"):
        raise ArtifactError(
            f"{src}: the format-1 store is incomplete; finish its calibration with the old version"
        )
    shapes = {k: tuple(old["moments"][k].shape[2:]) for k in a["keys"]}
    extra = {
        k: v
        for k, v in a.items()
        if k
        not in (
            "format_version",
            "identity",
            "identity_digest",
            "n_shards",
            "n_buckets",
            "keys",
            "complete",
            "token_counts",
        )
    }
    new = CovarianceStore.open_or_create(
        dst,
        identity={**a["identity"], "converted_from_format": 1},
        n_shards=a["n_shards"],
        n_buckets=a["n_buckets"],
        shapes=shapes,
        storage_options=storage_options,
        attrs=extra,
    )
    done = {int(n) for n, _ in old["done"].groups()}
    for i in range(a["n_shards"]):
        if i not in done:
            raise ArtifactError(f"{src}: shard {i} of the format-1 store was never completed")
        writer = new.shard_writer(i)
        for key in a["keys"]:
            writer.write(
                key,
                torch.from_numpy(np.asarray(old["moments"][key][i])),
                torch.from_numpy(np.asarray(old["tokens"][key][i])),
            )
        writer.finish()
        new.merge_completed()
    new.finalize()
    return new


def _damaged(index: int) -> dict[str, str]:
    return {
        "stage": "calibrate",
        "artifact": "covariance_store",
        "repair": f"shard {index} of the covariance store",
    }


def _damaged_totals(key: str) -> dict[str, str]:
    return {
        "stage": "calibrate",
        "artifact": "covariance_store",
        "repair": f"the covariance store (its merged totals of {key} are damaged: every shard is collected again)",
    }
