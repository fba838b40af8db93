"""Artifact references passed between stages: small manifests (URI + content digest), never tensors.

A :class:`Manifest` names one artifact (a file or a folder, local or any fsspec URL) by content
digest. Stage outputs are written to a temporary sibling first and renamed into place, so a crash
never leaves a half-written artifact under its final name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact is missing, unreadable, or its content does not match its recorded digest."""


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
            f"(digest {actual[:12]} != recorded {manifest.digest[:12]})"
        )


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
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary local folder; on success it replaces ``final`` atomically (same filesystem).

    On error the temporary folder is removed and ``final`` is left as it was: nothing already
    persisted is lost or overwritten by a failed stage."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        backup = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, backup)
        os.replace(tmp, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, final)
