"""The covariance store: activation statistics in chunked Zarr (v3), resumable per prompt shard.

Layout (any fsspec URL: a local folder, ``s3://bucket/stats.zarr``, ...)::

    stats.zarr/                       attrs: format_version, identity (model release, SlimSet
                                      digest, calibration params, code version), n_shards,
                                      n_buckets, keys, shards = {i: shard digest}, complete
      moments/<stat key>              float64 (n_shards, n_buckets, *mat), chunks (1, 1, *mat)
      tokens/<stat key>               int64   (n_shards, n_buckets),       chunks (1, n_buckets)

      done/<i>                        empty group; attrs {"digest": shard digest, "files": {chunk
                                      file: size in bytes}}: the completion mark

One chunk per (shard, timestep bucket, statistic): a whole matrix, zstd-compressed, so object
stores and DVC see few, large files. A shard counts only once its ``done/<i>`` mark exists, which
is written after its data: a crash mid-shard leaves it unmarked, and a rerun rewrites exactly the
unmarked shards (resume). Each shard has its own mark, so workers on different machines (Dask)
can write and mark their shards concurrently without a shared file to race on. Reads recompute every
shard digest, so a corrupted chunk is reported, never silently merged.

A cache hit on a finished store is checked per shard (:meth:`CovarianceStore.shard_problems`):
against the chunk sizes recorded in its mark, or fully against its digest; a damaged shard loses its
mark (:meth:`CovarianceStore.unmark_shards`), so the next collection recomputes exactly that shard.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from slimdiff.stats import ActivationStats, merge
from tasks.artifacts import ArtifactError, sha256_json

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1


def shard_digest(stats: ActivationStats) -> str:
    """sha256 over every statistic's exact bytes (keys sorted)."""
    h = hashlib.sha256()
    for key in sorted(stats.moments):
        h.update(key.encode())
        h.update(np.ascontiguousarray(stats.moments[key].numpy()).tobytes())
        h.update(np.ascontiguousarray(stats.tokens[key].numpy()).tobytes())
    return h.hexdigest()


class CovarianceStore:
    """A Zarr group of per-shard, per-bucket activation statistics (see module docstring)."""

    def __init__(self, group: zarr.Group, uri: str, storage_options: dict | None = None):
        self.group = group
        self.uri = uri
        self._storage_options = dict(storage_options or {})

    # -- opening ------------------------------------------------------------------------------
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
        kw = {"storage_options": storage_options} if storage_options else {}
        try:
            group = zarr.open_group(store=uri, mode="r", **kw)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            group = None
        if group is not None:
            found = group.attrs.get("identity_digest")
            if found != identity_digest:
                raise ArtifactError(
                    f"{uri}: an existing covariance store was made from different inputs "
                    f"(identity {str(found)[:12]} != {identity_digest[:12]}); remove it or choose another path"
                )
            group = zarr.open_group(store=uri, mode="r+", **kw)
            store = cls(group, uri, storage_options)
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
        group.create_group("done")
        moments = group.create_group("moments")
        tokens = group.create_group("tokens")
        for key, mat in shapes.items():
            mat = tuple(int(s) for s in mat)
            arr = moments.create_array(
                key,
                shape=(n_shards, n_buckets, *mat),
                chunks=(1, 1, *mat),
                dtype="float64",
                compressors=ZstdCodec(level=3),
                fill_value=0.0,
            )
            arr.attrs.update(
                {"statistic": key, "matrix_shape": list(mat), "kind": "sum over tokens of x^T x"}
            )
            tokens.create_array(
                key, shape=(n_shards, n_buckets), chunks=(1, n_buckets), dtype="int64", fill_value=0
            )
        group.attrs.update(
            {
                "format_version": STORE_FORMAT_VERSION,
                "identity": identity,
                "identity_digest": identity_digest,
                "n_shards": n_shards,
                "n_buckets": n_buckets,
                "keys": sorted(shapes),
                "complete": False,
                **dict(attrs or {}),  # provenance that is not identity (e.g. where the model came from)
            }
        )
        return cls(group, uri, storage_options)

    @classmethod
    def open_if_identical(cls, uri: str, identity: Mapping[str, Any], storage_options: dict | None = None):
        """The existing store at ``uri`` when it was made from ``identity``, else None."""
        kw = {"storage_options": storage_options} if storage_options else {}
        try:
            group = zarr.open_group(store=uri, mode="r", **kw)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return None
        if group.attrs.get("identity_digest") != sha256_json(dict(identity)):
            return None
        return cls(group, uri, storage_options)

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None, writable: bool = False) -> CovarianceStore:
        kw = {"storage_options": storage_options} if storage_options else {}
        try:
            group = zarr.open_group(store=uri, mode="r+" if writable else "r", **kw)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise ArtifactError(f"{uri}: covariance store not found") from err
        if group.attrs.get("format_version") != STORE_FORMAT_VERSION:
            raise ArtifactError(f"{uri}: not a slimdiff covariance store (format_version missing or unknown)")
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

    def completed_shards(self) -> dict[int, str]:
        done = self.group["done"]
        return {int(name): dict(g.attrs)["digest"] for name, g in done.groups() if "digest" in g.attrs}

    def missing_shards(self) -> list[int]:
        done = self.completed_shards()
        return [i for i in range(self.n_shards) if i not in done]

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete")) and not self.missing_shards()

    @property
    def digest(self) -> str:
        """Content digest of the whole store: the ordered shard digests plus its identity."""
        shards = self.completed_shards()
        return sha256_json(
            {"identity": self.group.attrs["identity_digest"], "shards": [shards[i] for i in sorted(shards)]}
        )

    # -- writing ------------------------------------------------------------------------------
    def write_shard(self, index: int, stats: ActivationStats) -> str:
        """Write one shard's data (chunk-aligned, safe to run concurrently for different shards).
        It does not count until :meth:`mark_shard` records its digest."""
        if not 0 <= index < self.n_shards:
            raise ValueError(f"shard index {index} out of range 0..{self.n_shards - 1}")
        if stats.n_buckets != self.n_buckets or sorted(stats.moments) != self.keys:
            raise ArtifactError(f"shard {index}: statistics do not match the store layout of {self.uri}")
        for key in self.keys:
            self.group["moments"][key][index] = stats.moments[key].numpy()
            self.group["tokens"][key][index] = stats.tokens[key].numpy()
        return shard_digest(stats)

    def mark_shard(self, index: int, digest: str) -> None:
        """Record shard ``index`` as complete (after its data is written), with the size of every
        chunk file it wrote (None: an all-zero chunk that zarr does not store)."""
        files = {rel: self._file_size(rel) for rel in self._shard_chunk_files(index)}
        self.group["done"].create_group(
            str(index), overwrite=True, attributes={"digest": digest, "files": files}
        )

    def unmark_shards(self, indices: Sequence[int]) -> None:
        """Drop the completion marks of ``indices`` (damaged shards): the next collection of this
        store recomputes exactly those shards; the others stay as they are."""
        for i in indices:
            del self.group["done"][str(i)]
        self.group.attrs["complete"] = False

    # -- integrity ----------------------------------------------------------------------------
    def _fs_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.uri, **self._storage_options)
        return fs, root.rstrip("/")

    def _shard_chunk_files(self, index: int) -> list[str]:
        """Store-relative paths of the chunk files holding shard ``index`` (zarr's own key encoding)."""
        out = []
        for key in self.keys:
            moments = self.group["moments"][key]
            enc = moments.metadata.chunk_key_encoding
            for b in range(self.n_buckets):
                coords = (index, b) + (0,) * (moments.ndim - 2)
                out.append(f"moments/{key}/{enc.encode_chunk_key(coords)}")
            tokens = self.group["tokens"][key]
            out.append(f"tokens/{key}/{tokens.metadata.chunk_key_encoding.encode_chunk_key((index, 0))}")
        return out

    def _file_size(self, rel: str) -> int | None:
        fs, root = self._fs_root()
        try:
            return int(fs.size(f"{root}/{rel}"))
        except FileNotFoundError:
            return None

    @property
    def recorded_bytes(self) -> int | None:
        """Total size of the chunk files recorded in the completion marks (None: marks predate it)."""
        total = 0
        for _, g in self.group["done"].groups():
            files = g.attrs.get("files")
            if files is None:
                return None
            total += sum(v or 0 for v in files.values())
        return total

    def shard_problems(self, full: bool = False) -> dict[int, str]:
        """{shard: what is wrong} for every completed shard that no longer matches its mark.

        Always: every chunk file the mark records exists with its recorded size. ``full`` (or a
        mark without recorded sizes): the shard's bytes are read back and digested."""
        problems: dict[int, str] = {}
        for name, g in sorted(self.group["done"].groups(), key=lambda kv: int(kv[0])):
            i, files = int(name), g.attrs.get("files")
            for rel, size in (files or {}).items():
                actual = self._file_size(rel)
                if actual != size:
                    got = "missing" if actual is None else f"{actual} bytes"
                    problems[i] = f"chunk {rel} is {got}, recorded {size if size is not None else 'absent'}"
                    break
            if i not in problems and (full or files is None):
                try:
                    self.read_shard(i, verify=True)
                except ArtifactError as err:
                    problems[i] = str(err).removeprefix(f"{self.uri}: ")
        return problems

    def finalize(self, extra_attrs: Mapping[str, Any] | None = None) -> str:
        missing = self.missing_shards()
        if missing:
            raise ArtifactError(f"{self.uri}: cannot finalize, shards {missing} are not complete")
        # per-statistic token counts (summed over shards) as attributes, for audits without reading data
        token_counts = {k: np.asarray(self.group["tokens"][k][:]).sum(axis=0).tolist() for k in self.keys}
        self.group.attrs.update({**dict(extra_attrs or {}), "token_counts": token_counts, "complete": True})
        return self.digest

    # -- reading ------------------------------------------------------------------------------
    def read_shard(self, index: int, verify: bool = True) -> ActivationStats:
        moments, tokens = {}, {}
        for key in self.keys:
            try:
                moments[key] = torch.from_numpy(np.asarray(self.group["moments"][key][index]))
                tokens[key] = torch.from_numpy(np.asarray(self.group["tokens"][key][index]))
            except Exception as err:  # a codec error on a damaged chunk: report which one
                raise ArtifactError(
                    f"{self.uri}: shard {index} of {key} is unreadable ({err})", **_damaged(index)
                ) from err
        stats = ActivationStats(
            self.n_buckets, moments, tokens, meta=dict(self.group.attrs.get("stats_meta", {}))
        )
        if verify:
            recorded = self.completed_shards().get(index)
            if recorded is None:
                raise ArtifactError(f"{self.uri}: shard {index} was never completed")
            actual = shard_digest(stats)
            if actual != recorded:
                raise ArtifactError(
                    f"{self.uri}: shard {index} is corrupted (digest {actual[:12]} != recorded {recorded[:12]})",
                    **_damaged(index),
                )
        return stats

    def read(self, verify: bool = True) -> ActivationStats:
        """All shards merged exactly (sums), after checking every shard digest."""
        if not self.complete:
            raise ArtifactError(f"{self.uri}: store is incomplete (missing shards {self.missing_shards()})")
        stats = merge(self.read_shard(i, verify=verify) for i in range(self.n_shards))
        stats.meta = dict(self.group.attrs.get("stats_meta", {}))
        return stats


def _damaged(index: int) -> dict[str, str]:
    return {
        "stage": "calibrate",
        "artifact": "covariance_store",
        "repair": f"shard {index} of the covariance store",
    }
