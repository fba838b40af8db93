"""Integrity under concurrency and faults, on tiny inputs (issue 13; README "Reliability")."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

from tasks.artifacts import (
    canonicalise_safetensors_header,
    file_digest,
)

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the cause of the differing compressed bytes ------------------------------------------------
def _header(path: Path) -> bytes:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n]


def _swap_metadata_order(path: Path) -> None:
    """Rewrite the header with its __metadata__ entries reversed: what another process writes."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    new = json.dumps(header, separators=(",", ":")).encode()
    data[8 : 8 + len(new)] = new
    path.write_bytes(bytes(data))


def test_same_tensors_get_different_bytes_until_the_header_is_canonical(tmp_path):
    """Root cause of two runs disagreeing on compressed bytes: safetensors writes __metadata__ in
    a per-process random order, and slimdiff.io writes two metadata entries into the UNet's
    weights. Both orders load as the same tensors; only the canonical header makes them one file."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = {"b": np.arange(6, dtype=np.float32), "a": np.zeros(3, dtype=np.float32)}
    meta = {"format": "pt", "slimdiff_plan_digest": "0" * 64}
    one, other = tmp_path / "one.safetensors", tmp_path / "other.safetensors"
    save_file(tensors, str(one), metadata=meta)
    other.write_bytes(one.read_bytes())
    _swap_metadata_order(other)
    assert file_digest(one) != file_digest(other)  # the fault: same model, two digests
    for f in (one, other):
        assert {k: v.tolist() for k, v in load_file(str(f)).items()} == {
            k: v.tolist() for k, v in tensors.items()
        }
    canonical = {canonicalise_safetensors_header(f)[1] for f in (one, other)}
    assert len(canonical) == 1 and file_digest(one) == file_digest(other)
    assert json.loads(_header(one))["__metadata__"] == dict(sorted(meta.items()))
    assert canonicalise_safetensors_header(one) == (file_digest(one), file_digest(one))  # idempotent


def test_separate_processes_write_identical_canonical_weights(tmp_path):
    """The same tensors saved by separate processes (each with its own hash-map seed) end up as
    one byte sequence once canonicalised, however the processes ordered their headers."""
    script = (
        "import sys, json, struct, numpy as np\n"
        "from safetensors.numpy import save_file\n"
        "from tasks.artifacts import canonicalise_safetensors_header\n"
        "p = sys.argv[1]\n"
        "save_file({'w': np.arange(4, dtype=np.float32)}, p,"
        " metadata={'format': 'pt', 'slimdiff_plan_digest': 'x', 'z': 'y'})\n"
        "raw = open(p, 'rb').read(); n = struct.unpack('<Q', raw[:8])[0]\n"
        "order = list(json.loads(raw[8:8 + n])['__metadata__'])\n"
        "print(json.dumps([order, canonicalise_safetensors_header(p)[1]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", script, str(tmp_path / f"{i}.safetensors")],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            ).stdout
        )
        for i in range(6)
    ]
    orders = {tuple(order) for order, _ in results}
    digests = {digest for _, digest in results}
    assert len(digests) == 1, (orders, digests)
