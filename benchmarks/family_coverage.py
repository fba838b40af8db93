"""Coverage you can read (issue 26): every denoiser class of the pinned diffusers, and whether
slimdiff compresses it.

Which classes: every ``ModelMixin`` subclass exported from ``diffusers`` whose module lives under
``diffusers.models.transformers`` or ``diffusers.models.unets`` (VAEs, ControlNets, autoencoders
and text encoders live in other packages, so the module rule leaves them out), except the few in
``NOT_DENOISERS``, which are clearly not denoisers (an adapter, a layer of another denoiser, an
autoregressive decoder): the document lists them under "left out". Everything else is included,
denoisers of other modalities (audio, video, protein structure) and diffusion priors too.

Each row: the class is built on the meta device from its default constructor arguments (no
weights allocated, nothing downloaded), then ``slimdiff.families.adapter_for`` picks its family,
``adapter.units`` lists its compression units (counted by kind: ffn / qk / vo) and
``adapter.check_processors`` checks its default attention processors. Status: ``supported``;
``refused`` (an ``UnsupportedModelError``: its first sentence is the reason); ``not buildable``
(the default constructor fails); ``error`` (any other exception from slimdiff: a bug to fix).
A buildable row also records its attention layers (``attention_layers``): what a new adapter
would describe.

    python benchmarks/family_coverage.py            # print the document
    python benchmarks/family_coverage.py --write    # write docs/coverage.md and benchmarks/results/coverage.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "coverage.md"
COMMAND = "python benchmarks/family_coverage.py --write"
PACKAGES = ("diffusers.models.transformers.", "diffusers.models.unets.")
KINDS = ("ffn", "qk", "vo")
ATTENTION = re.compile("Attention|Attn")

#: exported classes under those packages that are clearly not denoisers, with the reason
NOT_DENOISERS = {
    "MiniMaxMusic3RVQDepthDecoder": "an autoregressive codebook decoder, not a diffusion denoiser",
    "MotionAdapter": "an adapter: motion modules loaded into a UNet2DConditionModel (UNetMotionModel)",
    "TransformerTemporalModel": "a layer: the temporal transformer inside UNet3DConditionModel",
}

Row = dict[str, Any]


def denoiser_classes() -> list[type]:
    """The denoiser classes of the installed diffusers, sorted by name (see the module docstring)."""
    import diffusers
    from diffusers import ModelMixin

    found = {}
    for name in dir(diffusers):
        obj = getattr(diffusers, name, None)
        if (
            inspect.isclass(obj)
            and issubclass(obj, ModelMixin)
            and obj.__module__.startswith(PACKAGES)
            and name not in NOT_DENOISERS
        ):
            found[name] = obj
    return [found[n] for n in sorted(found)]


def first_sentence(message: str) -> str:
    """The first sentence of an exception message's first line."""
    line = (message.strip().splitlines() or [""])[0]
    return re.split(r"(?<=[a-z0-9)\]'\"`])\. ", line, maxsplit=1)[0].rstrip(".")


def trim(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def attention_layers(model: torch.nn.Module) -> list[str]:
    """Types of the model's innermost repeated layers that hold attention: elements of an
    ``nn.ModuleList`` with a module named like an attention (``Attention`` / ``Attn``) in them
    and no such element nested inside."""
    found: dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList):
            for i, element in enumerate(mod):
                if any(ATTENTION.search(type(m).__name__) for m in element.modules()):
                    found[f"{name}.{i}" if name else str(i)] = type(element).__name__
    outer = {path[:i] for path in found for i, c in enumerate(path) if c == "."}
    return list(dict.fromkeys(t for path, t in found.items() if path not in outer))


def reason_group(reason: str, stage: str, family: str) -> str:
    """A refusal reason without the class name, block lists and module paths: the key of the
    "why refused" table."""
    text = re.sub(r"\(its block types: [^)]*\)", "(no adapter matches its block types)", reason)
    text = re.sub(r" \(its blocks: [^)]*\)", "", text)
    if stage != "adapter_for":  # an adapter took the class, then its units or processors failed
        text = f"{family} adapter, {stage}: " + re.sub(r"^[\w.]+: ", "", text.strip())
    return re.sub(r"\s+", " ", text).strip()


def row(cls: type) -> Row:
    """The coverage row of one class (never raises: a failure is the row's status)."""
    from slimdiff.families import UnsupportedModelError, adapter_for

    out: Row = {"class": cls.__name__, "module": cls.__module__.rsplit(".", 1)[-1]}
    try:
        with torch.device("meta"):
            model = cls()
    except Exception as e:  # noqa: BLE001  (any failure of the default config is the finding)
        first = (str(e).strip().splitlines() or [""])[0]
        detail = f"cannot build from its default config: {type(e).__name__}: {first}"
        return out | {"status": "not buildable", "detail": trim(detail)}
    out["layers"] = attention_layers(model)
    stage, family = "adapter_for", ""
    try:
        adapter = adapter_for(model)
        stage, family = "units", adapter.family
        units = adapter.units(model)
        stage = "check_processors"
        adapter.check_processors(model)
    except UnsupportedModelError as e:
        sentence = first_sentence(str(e))
        group = reason_group(sentence.removeprefix(cls.__name__), stage, family)
        return out | {"status": "refused", "stage": stage, "detail": trim(sentence), "group": group}
    except Exception as e:  # noqa: BLE001  (a bug in slimdiff: reported, not hidden)
        detail = f"{type(e).__name__}: {first_sentence(str(e))}"
        return out | {"status": "error", "stage": stage, "detail": trim(detail)}
    counts = Counter(u.kind for u in units.values())
    return out | {"status": "supported", "detail": family, "units": {k: counts[k] for k in KINDS}}


def summary(rows: list[Row]) -> dict[str, int]:
    counts = Counter(r["status"] for r in rows)
    return {"classes": len(rows)} | {k: counts[k] for k in ("supported", "refused", "error", "not buildable")}


def summary_line(s: dict[str, int]) -> str:
    return (
        f"{s['classes']} classes: {s['supported']} supported, {s['refused']} refused, "
        f"{s['error']} errors, {s['not buildable']} not buildable from their default config"
    )


def collect() -> dict[str, Any]:
    import diffusers

    start = time.perf_counter()
    rows = [row(cls) for cls in denoiser_classes()]
    return {
        "diffusers": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": COMMAND,
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summary(rows),
        "left_out": NOT_DENOISERS,
        "rows": rows,
    }


def cell(text: str) -> str:  # a markdown table cell
    return text.replace("|", "\\|")


def names(classes: list[str], most: int = 4) -> str:
    shown = ", ".join(f"`{c}`" for c in classes[:most])
    return shown + (f" and {len(classes) - most} more" if len(classes) > most else "")


def grouped(rows: list[Row], keys_of: Callable[[Row], list[str]]) -> list[tuple[str, list[str]]]:
    """(key, classes) over rows, most classes first, then by key."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        for key in keys_of(r):
            groups.setdefault(key, []).append(r["class"])
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def table_rows(rows: list[Row]) -> list[str]:
    """The main table's body, one line per class."""
    lines = []
    for r in rows:
        units = r.get("units")
        stage = r.get("stage", "adapter_for")
        detail = r["detail"] if stage == "adapter_for" else f"({stage}) {r['detail']}"
        u = " / ".join(str(units[k]) for k in KINDS) if units else ""
        lines.append(f"| `{r['class']}` | {r['module']} | {r['status']} | {cell(detail)} | {u} |")
    return lines


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    refused = [r for r in rows if r["status"] == "refused"]
    lines = [
        "# Coverage: which diffusers denoisers slimdiff compresses",
        "",
        f"Generated, do not edit by hand: `{result['command']}` on {result['date']}, "
        f"diffusers {result['diffusers']}.",
        "",
        "Every denoiser class the pinned diffusers exports from `diffusers.models.transformers` and "
        "`diffusers.models.unets`, built on the meta device from its default config, then "
        "`slimdiff.families.adapter_for`, `adapter.units` and `adapter.check_processors` (the rules: "
        "`benchmarks/family_coverage.py`). Units: compression units by kind at the default config (a "
        "published checkpoint may have other sizes). A stage in parentheses: an adapter took the "
        "class, then that step refused it.",
        "",
        f"**{summary_line(result['summary'])}.**",
        "",
        "| class | module | status | family or reason | units (ffn / qk / vo) |",
        "|---|---|---|---|---|",
        *table_rows(rows),
        "",
        "## Why refused",
        "",
        "| reason | classes | which |",
        "|---|---|---|",
        *(f"| {cell(g)} | {len(c)} | {names(c)} |" for g, c in grouped(refused, lambda r: [r["group"]])),
        "",
        "## What the next adapter would describe",
        "",
        "The attention layers (innermost repeated layers holding an attention module) the refused "
        "classes share, by the number of classes that have them.",
        "",
        "| attention layer | classes | which |",
        "|---|---|---|",
    ]
    layers = grouped(refused, lambda r: r["layers"])
    lines += [f"| `{t}` | {len(c)} | {names(c)} |" for t, c in layers if len(c) > 1]
    single = sum(len(c) == 1 for _, c in layers)
    lines += ["", f"{single} more attention layer types belong to one refused class each.", ""]
    lines += ["## Left out (not denoisers)", ""] + [
        f"- `{n}`: {why}" for n, why in result["left_out"].items()
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="write docs/coverage.md and results/coverage.json")
    args = ap.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # default-config warnings of some classes
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' deprecation notices
    result = collect()
    text = render(result)
    if args.write:
        DOC.write_text(text)
        (RESULTS / "coverage.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{summary_line(result['summary'])} ({result['seconds']} s) -> {DOC.relative_to(ROOT)}")
    else:
        print(text)


if __name__ == "__main__":
    main()
