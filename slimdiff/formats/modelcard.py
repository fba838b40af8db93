"""A Hub-ready model card (``README.md`` with the Hub's YAML front matter) for a compressed folder.

Pure text from facts the pipeline already has: the source release and revision, the SlimSet and
statistics digests, the rank plan (parameters kept per unit kind), the evaluation against the
original (with the FLOPs kept per kind from the same evaluation), the image grid and the command
that reproduces it. The license is carried over from the source folder's own card when it has
one; nothing is guessed (no license field is written when the source declares none).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimdiff.planning.plan import RankPlan


@dataclass
class CardInfo:
    source: str  # hub repo id or folder the model was compressed from
    source_revision: str  # hub commit or content digest
    family: str  # the adapter family ("SD 1.x / 2.x / XL UNet ...")
    pipeline_class: str  # e.g. "StableDiffusionPipeline"
    plan: RankPlan
    slimset_digest: str
    stats_digest: str
    compressed_digest: str
    plan_artifact_digest: str | None = None  # the registry's plan_digest: the plan stage folder's content
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluate stage: original / compressed / summary
    command: str = "slimdiff run --params params.yaml"
    grid: str | None = None  # relative path of the comparison grid inside the folder
    license: str | None = None
    base_model: str | None = None  # the source's hub id (None for a local folder)
    git_commit: str | None = None
    tags: list[str] = field(default_factory=list)


def source_license(folder: str | Path) -> str | None:
    """The ``license`` of a source folder's README.md front matter, if it declares one."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    meta = _front_matter(readme.read_text())
    value = meta.get("license")
    return str(value) if value else None


def _front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    if not m:
        return {}
    data = yaml.safe_load(m.group(1))
    return data if isinstance(data, dict) else {}


def _kept_by_kind(plan: RankPlan) -> dict[str, tuple[int, int]]:
    kept: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for u in plan.units.values():
        kept[u.kind][0] += u.params_after
        kept[u.kind][1] += u.params_before
    return {k: (a, b) for k, (a, b) in kept.items()}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def model_card(info: CardInfo) -> str:
    meta: dict[str, Any] = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["slimdiff", "compressed", "training-free", "text-to-image", *info.tags],
    }
    if info.base_model:
        meta["base_model"] = info.base_model
    if info.license:
        meta["license"] = info.license
    front = yaml.safe_dump(meta, sort_keys=False).strip()
    plan = info.plan
    lines = [
        "---",
        front,
        "---",
        "",
        f"# {Path(info.source.rstrip('/')).name} slimmed by SlimDiff",
        "",
        f"A training-free compression of `{info.source}` (revision `{info.source_revision[:12]}`, "
        f"{info.family}): the attention query-key and value-output maps and the feed-forward layers were "
        "rebuilt in closed form at the ranks below from activation statistics collected over the sampler's "
        "timesteps (SlimDiff, arXiv 2509.21498, as implemented by slimdiff).",
        "",
        "## Load it",
        "",
        "```python",
        "import slimdiff  # registers slimdiff's model classes with diffusers' loader (no other slimdiff call)",
        "from diffusers import DiffusionPipeline",
        "",
        'pipe = DiffusionPipeline.from_pretrained("<this repo or folder>")',
        "```",
        "",
        "## What was removed",
        "",
        f"{plan.removed_params:,} of {plan.params_before:,} compressible parameters "
        f"({plan.removed_params / max(1, plan.params_before):.1%}), allocation `{plan.mode}`"
        + (f", tau {plan.tau}" if plan.tau is not None else "")
        + ".",
        "",
        "| unit kind | parameters kept | FLOPs kept |",
        "|---|---:|---:|",
    ]
    flops = _flops_by_kind(info.metrics)
    for kind, (after, before) in sorted(_kept_by_kind(plan).items()):
        lines.append(
            f"| {kind} | {after:,} / {before:,} ({after / max(1, before):.1%}) | {flops.get(kind, '-')} |"
        )
    lines += ["", "## Evaluation against the original (same prompts and seeds)", ""]
    lines += _evaluation_rows(info.metrics)
    if info.grid:
        lines += ["", f"![original (top) vs compressed (bottom), same seeds]({info.grid})"]
    lines += [
        "",
        "## Lineage",
        "",
        f"- source: `{info.source}` @ `{info.source_revision}`",
        f"- SlimSet digest: `{info.slimset_digest}`",
        f"- statistics (covariance store) digest: `{info.stats_digest}`",
        f"- rank plan digest (plan JSON): `{plan.digest}`",
        f"- compressed weights digest: `{info.compressed_digest}`",
    ]
    if info.plan_artifact_digest:
        lines.append(
            f"- rank plan stage artifact digest (registry tag `plan_digest`): `{info.plan_artifact_digest}`"
        )
    if info.git_commit:
        lines.append(f"- slimdiff commit: `{info.git_commit}`")
    lines += ["", "## Reproduce", "", "```bash", info.command, "```", ""]
    return "\n".join(lines)


def _flops_by_kind(metrics: dict) -> dict[str, str]:
    o = (metrics.get("original") or {}).get("unet_flops_by_category") or {}
    c = (metrics.get("compressed") or {}).get("unet_flops_by_category") or {}
    groups = {
        "ffn": ("ffn",),
        "attention (qk + vo)": ("attn1_proj", "attn1_matmul", "attn2_proj", "attn2_matmul"),
    }
    out = {}
    for label, cats in groups.items():
        before, after = sum(o.get(k, 0) for k in cats), sum(c.get(k, 0) for k in cats)
        if before:
            text = f"{after / before:.1%} ({label})"
            if label == "ffn":
                out["ffn"] = text
            else:
                out["qk"] = out["vo"] = text
    return out


def _evaluation_rows(metrics: dict) -> list[str]:
    if not metrics:
        return ["Not evaluated."]
    o, c, s = metrics.get("original", {}), metrics.get("compressed", {}), metrics.get("summary", {})
    rows = [
        ("denoiser parameters", "unet_params"),
        ("denoiser FLOPs per step (batch 1)", "unet_flops"),
        ("denoiser latency (ms, median, same run)", "unet_latency_ms"),
        ("FID", "fid"),
        ("CLIP score", "clip_score"),
    ]
    lines = ["| metric | original | compressed |", "|---|---:|---:|"]
    for label, key in rows:
        if key in o or key in c:
            lines.append(f"| {label} | {_fmt(o.get(key))} | {_fmt(c.get(key))} |")
    acc_o = ((o.get("accuracy") or {}).get("all") or {}).get("exact")
    acc_c = ((c.get("accuracy") or {}).get("all") or {}).get("exact")
    if acc_o is not None:
        lines.append(f"| exact-match accuracy (toy classifier) | {acc_o:.1%} | {acc_c:.1%} |")
    fidelity = s.get("fidelity") or {}
    extra = [
        ("PSNR to the original's images (dB)", fidelity.get("psnr_db_mean")),
        ("SSIM to the original's images", fidelity.get("ssim_mean")),
        ("measured denoiser speedup (same run)", s.get("speedup")),
        ("quality gate", "passed" if s.get("gate_passed") else "FAILED"),
    ]
    lines += [""] + [f"- {k}: {_fmt(v)}" for k, v in extra if v is not None]
    protocol = metrics.get("protocol") or {}
    if protocol:
        lines.append(
            f"- protocol: {protocol.get('n_images')} images, {protocol.get('num_inference_steps')} steps, "
            f"guidance {protocol.get('guidance_scale')}, {protocol.get('sampler')}, FID features "
            f"{protocol.get('fid_feature')}"
        )
    return lines
