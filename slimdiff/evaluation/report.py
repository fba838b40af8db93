"""The evaluation report: a markdown page a person reads in a minute to decide whether to ship.

``write_report(metrics, out_dir, ...)`` turns the dict of ``slimdiff.evaluation.evaluate.evaluate_pair``
into ``REPORT.md``: the verdict of the quality gate first, then one table (original, compressed,
delta, and baselines when given), the same-seed sample grids, the rank-plan bar chart and the
influence heatmap, and the pinned protocol. ``compare_table(a, b)`` puts two evaluation results
side by side (``slimdiff compare A B``) and says when their protocols differ, because FID and CLIP
score of different protocols are not comparable.

Also the image tiling used for the grids (``tile_images``, ``comparison_grid``).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REPORT_NAME = "REPORT.md"


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------
def _display_scale(h: int) -> tuple[int, bool]:
    """(tile height, upsample with nearest?) so that tiny toy images stay crisp and big ones small."""
    if h < 96:
        return h * max(1, -(-96 // h)), True
    return min(h, 256), False


def _resize_tiles(images: np.ndarray):
    from PIL import Image

    h = images.shape[1]
    target, nearest = _display_scale(h)
    tiles = []
    for im in images:
        pil = Image.fromarray(im)
        if target != h:
            w = round(im.shape[1] * target / h)
            pil = pil.resize((w, target), Image.NEAREST if nearest else Image.BICUBIC)
        tiles.append(pil)
    return tiles


def tile_images(images: np.ndarray, columns: int = 8, pad: int = 4):
    """uint8 (N, H, W, 3) -> one PIL image, row-major, white gaps (toy images upscaled, nearest)."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty uint8 batch (N, H, W, 3), got {images.dtype} {images.shape}")
    tiles = _resize_tiles(images)
    th, tw = tiles[0].height, tiles[0].width
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * (tw + pad) + pad, rows * (th + pad) + pad), "white")
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        grid.paste(tile, (pad + c * (tw + pad), pad + r * (th + pad)))
    return grid


def comparison_grid(original: np.ndarray, compressed: np.ndarray, columns: int = 8, pad: int = 4):
    """Original above compressed, same seeds, ``columns`` images per row pair, with row labels."""
    from PIL import Image, ImageDraw

    if np.shape(original) != np.shape(compressed):
        raise ValueError(
            f"original {np.shape(original)} and compressed {np.shape(compressed)} batches differ"
        )
    a, b = _resize_tiles(np.asarray(original)), _resize_tiles(np.asarray(compressed))
    th, tw = a[0].height, a[0].width
    label_w, gap = 84, 3 * pad
    pairs = -(-len(a) // columns)
    height = pairs * (2 * (th + pad) + gap) + pad
    grid = Image.new("RGB", (label_w + columns * (tw + pad) + pad, height), "white")
    draw = ImageDraw.Draw(grid)
    for p in range(pairs):
        y0 = pad + p * (2 * (th + pad) + gap)
        for row, (tiles, label) in enumerate(((a, "original"), (b, "compressed"))):
            y = y0 + row * (th + pad)
            draw.text((4, y + th // 2 - 5), label, fill=(0, 0, 0))
            for c, tile in enumerate(tiles[p * columns : (p + 1) * columns]):
                grid.paste(tile, (label_w + pad + c * (tw + pad), y))
    return grid


# --------------------------------------------------------------------------------------------
# Table rows
# --------------------------------------------------------------------------------------------
def _get(d: Mapping | None, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class Row:
    label: str
    key: str  # dotted key inside one side's block ("accuracy.all.exact") or "summary:<dotted>"
    fmt: Callable[[float], str]
    delta_fmt: Callable[[float], str] | None = None  # None: no delta column for this row
    better: str = ""  # "higher" / "lower" / "": shown in the label

    def value(self, result: Mapping, side: str) -> Any:
        if self.key.startswith("summary:"):
            return (
                _get(result.get("summary"), self.key.removeprefix("summary:"))
                if side == "compressed"
                else None
            )
        return _get(result.get(side), self.key)


def _int(v: float) -> str:
    return f"{int(v):,}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _pts(v: float) -> str:
    return f"{100 * v:+.1f} pts"


def _f(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def _signed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:+.{digits}f}"


def _rel(v: float) -> str:
    return f"{v:+,.0f}"


def _giga(v: float) -> str:
    return f"{v / 1e9:.3f} G"


ROWS: tuple[Row, ...] = (
    Row("UNet parameters", "unet_params", _int, _rel, "lower"),
    Row("compressible parameters", "compressible_params", _int, _rel, "lower"),
    Row("UNet FLOPs / sample / step", "unet_flops", _giga, lambda v: f"{v / 1e9:+.3f} G", "lower"),
    Row("UNet latency (ms, median)", "unet_latency_ms", _f(2), _signed(2), "lower"),
    Row("UNet forward peak memory (MB)", "unet_forward_peak_memory_mb", _f(1), _signed(1), "lower"),
    Row("UNet weights (MB)", "unet_weights_mb", _f(2), _signed(2), "lower"),
    Row("exact match, all", "accuracy.all.exact", _pct, _pts, "higher"),
    Row("exact match, one object", "accuracy.single.exact", _pct, _pts, "higher"),
    Row("exact match, two objects", "accuracy.two.exact", _pct, _pts, "higher"),
    Row("object count", "accuracy.all.object", _pct, _pts, "higher"),
    Row("color", "accuracy.all.color", _pct, _pts, "higher"),
    Row("shape", "accuracy.all.shape", _pct, _pts, "higher"),
    Row("position", "accuracy.all.position", _pct, _pts, "higher"),
    Row("FID vs real", "fid", _f(4), _signed(4), "lower"),
    Row("classifier-feature FD vs real", "fd_cls", _f(1), _signed(1), "lower"),
    Row("CLIP score", "clip_score", _f(3), _signed(3), "higher"),
    Row("PSNR to original (dB)", "summary:fidelity.psnr_db_mean", _f(2), None, "higher"),
    Row("SSIM to original", "summary:fidelity.ssim_mean", _f(4), None, "higher"),
    Row("FID to original", "summary:fidelity.fid_to_original", _f(4), None, "lower"),
    Row("classifier-feature FD to original", "summary:fidelity.fd_cls_to_original", _f(1), None, "lower"),
    Row("sampling time (s)", "sample_time_s", _f(1), _signed(1), "lower"),
    Row("calibration time (s)", "summary:calibration_time_s", _f(1), None, "lower"),
)


def _fmt(row: Row, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return row.fmt(float(v))


def _label(row: Row) -> str:
    arrow = {"higher": " (higher is better)", "lower": " (lower is better)"}.get(row.better, "")
    return row.label + arrow


def metrics_table(metrics: Mapping, baselines: Mapping[str, Mapping] | None = None) -> str:
    """Markdown: original | compressed | delta (| each baseline's compressed value)."""
    baselines = dict(baselines or {})
    head = ["metric", "original", "compressed", "delta", *baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        o, c = row.value(metrics, "original"), row.value(metrics, "compressed")
        others = [row.value(b, "compressed") for b in baselines.values()]
        if o is None and c is None and all(x is None for x in others):
            continue
        delta = "-"
        if row.delta_fmt is not None and o is not None and c is not None:
            delta = row.delta_fmt(float(c) - float(o))
        cells = [_label(row), _fmt(row, o), _fmt(row, c), delta, *(_fmt(row, x) for x in others)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(metrics: Mapping) -> str:
    """The one paragraph a reader needs: verdict, size, speed and quality change."""
    s = metrics.get("summary", {})
    o, c = metrics.get("original", {}), metrics.get("compressed", {})
    verdict = "PASSED" if s.get("gate_passed") else "FAILED"
    parts = [f"**Quality gate: {verdict}.**"]
    if s.get("gate_reasons"):
        parts.append("Reasons: " + "; ".join(s["gate_reasons"]) + ".")
    elif s.get("gate_checks"):
        parts.append("Checks: " + "; ".join(ch["reason"] for ch in s["gate_checks"]) + ".")
    size = (
        f"UNet {o.get('unet_params', 0):,} -> {c.get('unet_params', 0):,} parameters "
        f"({100 * (1 - s.get('unet_params_ratio', 1.0)):.1f}% fewer; "
        f"{100 * s.get('compressible_removed_fraction', 0.0):.1f}% of the compressible set removed)"
    )
    parts.append(size + ".")
    if s.get("flops_ratio") is not None:
        parts.append(f"FLOPs x{s['flops_ratio']:.3f}.")
    if s.get("latency_ratio") is not None:
        parts.append(f"UNet latency x{s['latency_ratio']:.3f} (speedup {s['speedup']:.2f}x, same run).")
    if s.get("exact_match_drop") is not None:
        parts.append(
            f"Exact match {100 * o['accuracy']['all']['exact']:.1f}% -> {100 * c['accuracy']['all']['exact']:.1f}% "
            f"({-s['exact_match_drop']:+.1f} pts)."
        )
    if s.get("fid_increase") is not None:
        floor = _get(metrics.get("protocol"), "fid_real_vs_real")
        noise = f"; two real render sets differ by {floor:.4f}" if floor is not None else ""
        parts.append(f"FID {o['fid']:.4f} -> {c['fid']:.4f} ({s['fid_increase']:+.4f}{noise}).")
    if s.get("fd_cls_increase") is not None:
        floor = _get(metrics.get("protocol"), "fd_cls_real_vs_real")
        noise = f"; two real render sets differ by {floor:.1f}" if floor is not None else ""
        parts.append(
            f"Classifier-feature FD {o['fd_cls']:.1f} -> {c['fd_cls']:.1f} "
            f"({s['fd_cls_increase']:+.1f}{noise}; reported, not gated)."
        )
    return " ".join(parts)


def _copy_into(path: str | Path | None, out_dir: Path) -> str | None:
    """Copy an image into the report folder (so the report is self-contained); its relative name."""
    if path is None:
        return None
    src = Path(path)
    if not src.is_absolute() and (out_dir / src).is_file():
        return src.as_posix()
    if not src.is_file():
        raise FileNotFoundError(f"report image {src} does not exist")
    dst = out_dir / src.name
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    return src.name


def _protocol_lines(protocol: Mapping) -> list[str]:
    lines = []
    for key in (
        "path",
        "n_prompts",
        "images_per_prompt",
        "n_images",
        "prompts_sha256",
        "seed",
        "seed_rule",
        "resolution",
        "sampler",
        "num_inference_steps",
        "guidance_scale",
        "batch_size",
        "device",
        "dtype",
        "resize",
        "fid_feature",
        "fid_reference",
        "fid_real_vs_real",
        "fd_cls_feature",
        "fd_cls_real_vs_real",
        "fid_implementation",
        "clip_score",
        "accuracy",
        "psnr",
        "ssim",
        "flops",
        "latency",
        "gate",
        "versions",
    ):
        if key in protocol:
            lines.append(f"- **{key}**: {protocol[key]}")
    return lines


def write_report(
    metrics: dict,
    out_dir,
    *,
    plan_plot=None,
    heatmap=None,
    error_profiles=None,
    grids: Mapping[str, str] | Sequence[str] | None = None,
    curves=None,
    baselines: Mapping[str, Mapping] | None = None,
    title: str = "SlimDiff evaluation report",
    pareto=None,
    search_table: str | None = None,
) -> Path:
    """Write ``REPORT.md`` into ``out_dir`` and return its path.

    ``metrics`` is ``evaluate_pair``'s result. ``grids`` defaults to ``metrics["grids"]`` (file names
    inside ``out_dir``); ``plan_plot`` / ``heatmap`` / ``error_profiles`` / ``curves`` are image
    paths (copied into
    ``out_dir``); ``baselines`` maps a name to another evaluation result at the same protocol,
    shown as extra columns."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if grids is None:
        grids = metrics.get("grids") or {}
    grid_files = list(grids.values()) if isinstance(grids, Mapping) else list(grids)
    protocol = metrics.get("protocol", {})
    parts = [f"# {title}", "", headline(metrics), ""]
    parts += ["## Metrics", "", metrics_table(metrics, baselines), ""]
    if baselines:
        for name, b in baselines.items():
            diff = protocol_differences(protocol, b.get("protocol", {}))
            if diff:
                parts.append(
                    f"> baseline `{name}` was measured under a different protocol ({', '.join(diff)})."
                )
        parts.append("")
    if search_table:
        parts += ["## Budget search", "", search_table, ""]
    checks = metrics.get("summary", {}).get("gate_checks", [])
    if checks:
        parts += ["### Quality gate", ""]
        parts += [f"- {'pass' if ch['passed'] else 'FAIL'}: {ch['reason']}" for ch in checks]
        parts.append("")
    if grid_files:
        parts += ["## Samples (same prompts and seeds)", ""]
        for f in grid_files:
            name = _copy_into(f, out_dir)
            parts += [f"![{Path(name).stem}]({name})", ""]
    for heading, img in (
        ("Budget search: the trade-off curve", pareto),
        ("Rank plan", plan_plot),
        ("Truncation error per unit (what the error-driven allocation trades)", error_profiles),
        ("Spectral influence", heatmap),
        ("Quality vs parameters", curves),
    ):
        name = _copy_into(img, out_dir)
        if name:
            parts += [f"## {heading}", "", f"![{heading}]({name})", ""]
    if protocol:
        parts += ["## Protocol", "", *_protocol_lines(protocol), ""]
    path = out_dir / REPORT_NAME
    path.write_text("\n".join(parts))
    logger.info("wrote %s", path)
    return path


# --------------------------------------------------------------------------------------------
# Two results side by side
# --------------------------------------------------------------------------------------------
PROTOCOL_KEYS = (
    "path",
    "prompts_sha256",
    "images_per_prompt",
    "seed",
    "resolution",
    "sampler",
    "num_inference_steps",
    "guidance_scale",
    "fid_feature",
    "fid_reference",
    "clip_score",
    "resize",
)


def protocol_differences(a: Mapping, b: Mapping) -> list[str]:
    """Protocol keys whose values differ (the quality numbers are then not comparable)."""
    return [k for k in PROTOCOL_KEYS if a.get(k) != b.get(k)]


def compare_table(metrics_a: Mapping, metrics_b: Mapping, names: tuple[str, str] = ("A", "B")) -> str:
    """Markdown: the compressed side of two evaluation results, B - A, and the summary numbers
    (gate, ratios). A note lists protocol differences: FID / CLIP across protocols mean nothing."""
    a_name, b_name = names
    head = ["metric", a_name, b_name, f"{b_name} - {a_name}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def add(
        label: str, va: Any, vb: Any, fmt: Callable[[float], str], dfmt: Callable[[float], str] | None
    ) -> None:
        if va is None and vb is None:
            return
        cell = lambda v: "-" if v is None else fmt(float(v))  # noqa: E731
        delta = dfmt(float(vb) - float(va)) if dfmt and va is not None and vb is not None else "-"
        lines.append(f"| {label} | {cell(va)} | {cell(vb)} | {delta} |")

    for row in ROWS:
        add(
            _label(row),
            row.value(metrics_a, "compressed"),
            row.value(metrics_b, "compressed"),
            row.fmt,
            row.delta_fmt or _signed(4),
        )
    for label, key, fmt in (
        ("UNet params ratio", "unet_params_ratio", _f(4)),
        ("compressible removed", "compressible_removed_fraction", _pct),
        ("FLOPs ratio", "flops_ratio", _f(4)),
        ("latency ratio", "latency_ratio", _f(3)),
        ("exact-match drop (pts)", "exact_match_drop", _f(2)),
        ("FID increase", "fid_increase", _f(4)),
        ("classifier-feature FD increase", "fd_cls_increase", _f(1)),
    ):
        add(label, _get(metrics_a.get("summary"), key), _get(metrics_b.get("summary"), key), fmt, _signed(4))
    gate = lambda m: {True: "passed", False: "FAILED", None: "-"}[_get(m.get("summary"), "gate_passed")]  # noqa: E731
    lines.append(f"| quality gate | {gate(metrics_a)} | {gate(metrics_b)} | |")
    diff = protocol_differences(metrics_a.get("protocol", {}), metrics_b.get("protocol", {}))
    if diff:
        lines += ["", f"Note: the protocols differ in {', '.join(diff)}; quality numbers are not comparable."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Budget search
# --------------------------------------------------------------------------------------------
#: (point key, axis label) of the Pareto plot: size / cost axes against quality axes
PARETO_X = (
    ("params_kept", "denoiser parameters"),
    ("flops", "FLOPs per step"),
    ("latency_ms", "latency (ms)"),
)
PARETO_Y = (("exact_match", "exact match"), ("psnr_db", "PSNR to original (dB)"), ("fd", "feature FD"))


def search_table(points: Sequence[Mapping]) -> str:
    """Markdown table of a budget search's points (dicts with value, status, gate, metrics)."""
    lines = [
        "| budget | status | params kept | FLOPs ratio | latency ratio | exact match | PSNR (dB) | feature FD | gate | chosen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in points:

        def f(key, fmt, p=p):
            v = p.get(key)
            return "-" if v is None else format(v, fmt)

        lines.append(
            f"| {p['value']:g} | {p['status']} | {f('params_kept', ',')} | {f('flops_ratio', '.3f')} | "
            f"{f('latency_ratio', '.3f')} | {f('exact_match', '.3f')} | {f('psnr_db', '.1f')} | {f('fd', '.4g')} | "
            f"{'pass' if p.get('gate_passed') else ('-' if p['status'] != 'ok' else 'FAIL')} | "
            f"{'**yes**' if p.get('chosen') else ''} |"
        )
    return "\n".join(lines)


def plot_pareto(points: Sequence[Mapping], path) -> Path:
    """Size and cost (parameters, FLOPs, latency) against quality (exact match, PSNR to the
    original, feature FD) for every evaluated point; gate-passing points filled, the chosen one
    ringed. Axes without data are left empty."""
    from matplotlib.figure import Figure

    ok = [p for p in points if p.get("status") == "ok"]
    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(len(PARETO_Y), len(PARETO_X))
    for i, (ykey, ylabel) in enumerate(PARETO_Y):
        for j, (xkey, xlabel) in enumerate(PARETO_X):
            ax = axes[i][j]
            pts = [p for p in ok if p.get(xkey) is not None and p.get(ykey) is not None]
            for p in pts:
                passed = bool(p.get("gate_passed"))
                ax.plot(
                    p[xkey],
                    p[ykey],
                    "o",
                    color="tab:green" if passed else "tab:red",
                    mfc=None if passed else "none",
                )
                ax.annotate(
                    f"{p['value']:g}",
                    (p[xkey], p[ykey]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
                if p.get("chosen"):
                    ax.plot(p[xkey], p[ykey], "o", ms=12, mfc="none", color="black")
            if i == len(PARETO_Y) - 1:
                ax.set_xlabel(xlabel, fontsize=8)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle("Budget search (green: passes the gate, ringed: chosen)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
