"""Quiet, offline-safe environment defaults, read from the project's ``slimdiff.env``.

``slimdiff.env`` (project root) is the one place these defaults live: the Makefile exports it, the
command line and the tests call :func:`apply_env_defaults`. Variables already set win.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_FILE_NAME = "slimdiff.env"


def find_env_file(start: Path | None = None) -> Path | None:
    """``slimdiff.env`` in ``start`` (default: cwd) or its parents, else next to the package."""
    start = (start or Path.cwd()).resolve()
    for d in (start, *start.parents):
        if (d / ENV_FILE_NAME).is_file():
            return d / ENV_FILE_NAME
    beside_package = Path(__file__).resolve().parents[1] / ENV_FILE_NAME
    return beside_package if beside_package.is_file() else None


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"{path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        values[key.strip()] = value.strip()
    return values


def apply_env_defaults(path: Path | None = None, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Set every variable of the env file that is not already set; returns what was applied.

    Relative paths for PREFECT_HOME / PREFECT_LOCAL_STORAGE_PATH are resolved against the env
    file's folder so that running from a subdirectory does not scatter state."""
    path = path or find_env_file()
    if path is None:
        return {}
    values = read_env_file(path)
    values.update(overrides or {})
    applied = {}
    for key, value in values.items():
        if key in ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH") and not os.path.isabs(value):
            value = str((path.parent / value).resolve())
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied
