"""The library's layout is its architecture: one package per stage, each importing only the packages
before it in ``ORDER`` (the README's "Layout" section lists them in this order), and no import
circle between modules, function-local imports included. Read from the source with ``ast``, so a
lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "slimdiff"
#: a package (or top-level module) may import only those before it
ORDER = [
    "core",
    "config",
    "families",
    "calibration",
    "planning",
    "toy",
    "surgery",
    "evaluation",
    "formats",
    "api",
]
#: the package's front door (lazy re-exports) and the environment helper stand outside the order
OUTSIDE = {"__init__", "env"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every slimdiff module the file imports, at any depth of the file (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "slimdiff"
            and all(a.name == "__version__" for a in node.names)
        ):
            continue  # the version string, not the package's re-exports
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimdiff"):
            for alias in node.names:  # `from slimdiff.x import y`: y may be a module
                sub = f"{node.module}.{alias.name}"
                out.add(sub if _exists(sub) else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("slimdiff")}
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (LIB / rel).with_suffix(".py").is_file() or (LIB / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in LIB.rglob("*.py")}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_packages_import_only_the_stages_before_them():
    rank = {name: i for i, name in enumerate(ORDER)}
    tops = {_top(m) for m in _graph()} - OUTSIDE
    assert tops == set(ORDER), f"packages not in ORDER (add them where they belong): {tops ^ set(ORDER)}"
    wrong = []
    for module, deps in _graph().items():
        src = _top(module)
        if src in OUTSIDE:
            continue
        for dep in deps:
            dst = _top(dep)
            if dst != src and (dst in OUTSIDE or rank[dst] > rank[src]):
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the stage order:\n" + "\n".join(sorted(wrong))


def test_no_import_circles_between_modules():
    graph = _graph()
    # a package's __init__ is imported with every module inside it; count only real module edges
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # slimdiff.families.base asks the package to register the built-in families on first lookup
    # (a registry import: ``import slimdiff.families`` inside registered_adapters); no other cycle
    allowed = ("slimdiff.families.base", "slimdiff.families")
    real = [c for c in cycles if allowed not in set(itertools.pairwise(c))]
    assert not real, "import circles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_the_readme_lists_the_packages_in_their_order():
    readme = (LIB.parent / "README.md").read_text()
    listed = [
        line.split()[0]
        for line in readme.split("## Layout", 1)[1].splitlines()
        if line.startswith("slimdiff/")
    ]
    packages = [p.removeprefix("slimdiff/").strip("/").removesuffix(".py") for p in listed]
    assert [p for p in packages if p in ORDER] == [p for p in ORDER if p in packages]
    assert set(ORDER) - {"config"} <= set(packages)
