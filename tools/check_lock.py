"""Check that the installed set satisfies the project's requirements, extras included.

`make install` installs constraints.txt exactly as pinned with ``--no-deps`` (no resolver), so a
requirement added to pyproject.toml without regenerating constraints.txt would go unnoticed. This
walks the requirements from ``slimdiff-pipeline[dev]`` down (markers evaluated, extras followed)
and exits 1 naming every one that is missing or at a version outside its range. Packages named
on the command line are skipped (``triton``: torch's GPU kernel compiler, left out on purpose).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def problems(root: str, extras: set[str], skip: set[str]) -> list[str]:
    out: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(root), frozenset(extras), "(root)")]
    while todo:
        name, want, parent = todo.pop()
        if (name, want) in seen:
            continue
        seen.add((name, want))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            out.append(f"{name} (required by {parent}) is not installed")
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if canonicalize_name(req.name) in skip:
                continue
            envs = [{"extra": e} for e in want] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            try:
                have = distribution(req.name).version
            except PackageNotFoundError:
                out.append(f"{req} (required by {dist.metadata['Name']}) is not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                out.append(f"{req} (required by {dist.metadata['Name']}) but {have} is installed")
            todo.append((canonicalize_name(req.name), frozenset(req.extras), dist.metadata["Name"]))
    return out


def main() -> int:
    skip = {canonicalize_name(a) for a in sys.argv[1:]}
    found = problems("slimdiff-pipeline", {"dev"}, skip)
    for p in found:
        print(f"error: {p}", file=sys.stderr)
    if found:
        print(
            "error: constraints.txt does not satisfy pyproject.toml; regenerate it (see its header)",
            file=sys.stderr,
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
