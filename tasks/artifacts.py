"""Artifact references passed between stages: small manifests (URI + content digest), never tensors.

A :class:`Manifest` names one artifact (a file or a folder, local or any fsspec URL) by content
digest. Stage outputs are written to a temporary sibling first and renamed into place, so a crash
never leaves a half-written artifact under its final name.

Concurrency and integrity (docs/reliability.md): :func:`stage_lock` is an OS file lock (``flock``,
released by the kernel when its holder dies) that serialises writers of one output; with
``replace=False`` :func:`staged_dir` never replaces an output that is already there (first publish
wins); :func:`check_artifact` says whether an artifact still matches its manifest, by digest or by
its recorded file sizes; :func:`quarantine` moves a damaged artifact aside (kept for inspection)
so that its stage can be recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import filelock
import fsspec

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LOCKS_DIR = ".locks"
QUARANTINE_DIR = ".quarantine"
_CHUNK = 1 << 20

# What each stage's output is called in messages and in the lineage chain (tasks.lineage.CHAIN).
ARTIFACT_NAMES = {
    "slimset": "slimset",
    "calibrate": "covariance_store",
    "influence": "influence",
    "plan": "rank_plan",
    "compress": "compressed_weights",
    "evaluate": "evaluation",
}


class ArtifactError(RuntimeError):
    """An artifact is missing, unreadable, or its content does not match its recorded digest.

    ``stage`` and ``artifact`` name what failed when known; ``repair`` says what `slimdiff repair`
    recomputes for it (e.g. "shards [1] of the covariance store")."""

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        artifact: str | None = None,
        repair: str | None = None,
    ):
        super().__init__(message)
        self.stage, self.artifact, self.repair = stage, artifact, repair


class StageBusyError(RuntimeError):
    """Another run holds the lock of the output this run wants to write, past the wait limit."""


@dataclass(frozen=True)
class Manifest:
    """What a stage hands to the next one."""

    stage: str
    uri: str  # local path or fsspec URL of the artifact (file or folder)
    digest: str  # sha256 of the content (see content_digest)
    meta: dict[str, Any] = field(default_factory=dict)  # small, JSON-able facts (counts, shapes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls(**json.loads(text))

    @property
    def short(self) -> str:
        return self.digest[:12]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def file_digest(uri: str | Path) -> str:
    fs, path = _fs(str(uri))
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_digest(uri: str | Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> str:
    """sha256 of a file, or of a folder as the sorted list of (relative path, file sha256).

    Independent of timestamps and of where the folder lives (local disk or object storage)."""
    fs, path = _fs(str(uri))
    if not fs.exists(path):
        raise ArtifactError(f"{uri}: artifact not found")
    if not fs.isdir(path):
        return file_digest(uri)
    entries = []
    root = path.rstrip("/")
    for f in sorted(fs.find(root)):
        rel = f[len(root) :].lstrip("/")
        if rel.split("/")[-1] in exclude or rel.startswith(".tmp-"):
            continue
        h = hashlib.sha256()
        with fs.open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        entries.append((rel, h.hexdigest()))
    return sha256_json(entries)


def canonicalise_safetensors_header(path: str | Path) -> tuple[str, str]:
    """Sort the ``__metadata__`` entries of a safetensors file's JSON header, in place; returns the
    file's sha256 before and after (equal when the header was already canonical).

    safetensors writes ``__metadata__`` in Rust HashMap order, randomised per process, so the same
    tensors with two or more metadata entries get different bytes from different processes. The
    sorted header has the same length, so no tensor offset moves."""
    path = Path(path)
    with path.open("r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or list(meta) == sorted(meta):
            digest = file_digest(path)
            return digest, digest

        def dump(obj) -> bytes:
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

        body = raw.rstrip(b" ")
        if dump(header) != body:  # not the serialisation we know: leave the file alone
            log.warning("%s: unexpected safetensors header layout; not canonicalised", path)
            digest = file_digest(path)
            return digest, digest
        before = file_digest(path)
        ordered = {"__metadata__": dict(sorted(meta.items()))}
        ordered.update((k, v) for k, v in header.items() if k != "__metadata__")
        new = dump(ordered)
        assert len(new) == len(body), "a reordered header has the same length"
        f.seek(8)
        f.write(new)
    return before, file_digest(path)


def verify(manifest: Manifest) -> None:
    """Raise ArtifactError unless the artifact exists with the recorded digest."""
    actual = content_digest(manifest.uri)
    if actual != manifest.digest:
        raise ArtifactError(
            f"{manifest.stage}: {manifest.uri} changed after it was written "
            f"(digest {actual[:12]} != recorded {manifest.digest[:12]})",
            stage=manifest.stage,
            artifact=ARTIFACT_NAMES.get(manifest.stage, manifest.stage),
            repair=f"the {manifest.stage} stage",
        )


def folder_files(uri: str | Path) -> dict[str, int]:
    """{relative path: size in bytes} of an artifact folder (its manifest and temporaries excluded):
    what a manifest records so that a cache hit can be checked without reading every byte."""
    fs, path = _fs(str(uri))
    root = path.rstrip("/")
    out = {}
    for f, info in sorted(fs.find(root, detail=True).items()):
        rel = f[len(root) :].lstrip("/")
        if rel.split("/")[-1] == MANIFEST_NAME or rel.startswith(".tmp-"):
            continue
        out[rel] = int(info["size"])
    return out


def check_artifact(manifest: Manifest, level: Literal["digest", "size"] = "digest") -> str | None:
    """None when the artifact still matches its manifest, else what is wrong (one line).

    ``digest``: every byte (content digest). ``size``: the recorded file list and sizes (catches
    missing, extra and truncated files, not a flipped bit); manifests without a file list are
    checked by digest."""
    fs, path = _fs(manifest.uri)
    if not fs.exists(path):
        return f"{manifest.uri} is missing"
    files = manifest.meta.get("files") if isinstance(manifest.meta, dict) else None
    if level == "size" and files is not None and fs.isdir(path):
        actual = folder_files(manifest.uri)
        for rel, size in files.items():
            if rel not in actual:
                return f"file {rel} is missing"
            if actual[rel] != size:
                return f"file {rel} has {actual[rel]} bytes, recorded {size}"
        extra = sorted(set(actual) - set(files))
        return f"unexpected file {extra[0]}" if extra else None
    try:
        actual_digest = content_digest(manifest.uri)
    except (OSError, ArtifactError) as err:
        return f"unreadable: {str(err).splitlines()[0]}"
    if actual_digest != manifest.digest:
        return f"digest {actual_digest[:12]} != recorded {manifest.digest[:12]}"
    return None


def quarantine(path: str | Path) -> Path:
    """Move a damaged artifact folder aside, to ``<stage dir>/.quarantine/<name>-<utc time>``, so
    that its stage can publish a fresh one under the same key; the damaged copy is kept for
    inspection (delete it when done)."""
    path = Path(path)
    dest = path.parent / QUARANTINE_DIR / f"{path.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    dest = dest.with_name(f"{dest.name}-{uuid.uuid4().hex[:6]}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    return dest


def lock_path(output: str | Path) -> Path:
    """The lock file of a local output: ``<parent>/.locks/<name>.lock``."""
    output = Path(output)
    return output.parent / LOCKS_DIR / f"{output.name}.lock"


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _describe_holder(holder_file: Path) -> str:
    try:
        h = json.loads(holder_file.read_text())
        return f"pid {h['pid']} on {h['host']} since {h['since']}"
    except (OSError, ValueError, KeyError):
        return "another run"


@contextmanager
def stage_lock(path: str | Path, *, timeout: float | None, what: str) -> Iterator[None]:
    """Hold the OS file lock ``path`` (``flock``: the kernel releases it when the holder exits or
    is killed, so a crashed run never leaves a stale lock). Waits up to ``timeout`` seconds for
    another holder (None = no limit, 0 = refuse at once), then raises StageBusyError naming it.

    Works on local disks and on network file systems with working ``flock`` (NFSv4); it does not
    lock object storage (docs/reliability.md)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder_file = path.with_name(path.name + ".holder")
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = _describe_holder(holder_file)
        if timeout == 0:
            raise StageBusyError(
                f"{what}: {holder} is writing it (integrity.lock_timeout_s is 0: not waiting)"
            ) from None
        log.info("%s: waiting for %s, which is writing it", what, holder)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except filelock.Timeout:
            raise StageBusyError(
                f"{what}: {_describe_holder(holder_file)} is still writing it after {timeout:.0f} s "
                "(integrity.lock_timeout_s); try again later"
            ) from None
    try:
        holder_file.write_text(json.dumps(_holder()))
        yield
    finally:
        holder_file.unlink(missing_ok=True)
        lock.release()


def write_manifest(manifest: Manifest, folder: str | Path) -> None:
    fs, path = _fs(str(folder))
    with fs.open(f"{path.rstrip('/')}/{MANIFEST_NAME}", "w") as f:
        f.write(manifest.to_json())


def read_manifest(folder: str | Path) -> Manifest | None:
    fs, path = _fs(str(folder))
    p = f"{path.rstrip('/')}/{MANIFEST_NAME}"
    if not fs.exists(p):
        return None
    with fs.open(p, "r") as f:
        return Manifest.from_json(f.read())


@contextmanager
def staged_dir(final: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary local folder; on success it replaces ``final`` atomically (same filesystem).

    On error the temporary folder is removed and ``final`` is left as it was: nothing already
    persisted is lost or overwritten by a failed stage. With ``replace=False`` (content-addressed
    outputs, published once under their key) an existing ``final`` is never replaced: the new
    folder is discarded and the one published first stays."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not replace:
        try:
            if final.exists():
                raise FileExistsError(final)
            os.rename(tmp, final)  # also fails if another writer's (non-empty) folder appeared meanwhile
        except OSError:
            log.warning(
                "%s was published by another writer meanwhile: keeping it, discarding this one", final
            )
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if final.exists():
        backup = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, backup)
        os.replace(tmp, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, final)
