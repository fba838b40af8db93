"""Budget search timings on the toy model (issue 17 targets), each a fresh `slimdiff run` process.

1. a full run at the committed budget on an empty workspace
2. a 7-point ladder (search.values 0.2 .. 0.8) in the same workspace: calibration and influence
   are cache hits, the committed budget's point too; six new points plan, compress and evaluate
   target: the ladder costs <= 2x the full run, and each new point no more than its own
   plan + compress + evaluate seconds (what the per-point stage seconds show)
3. the same ladder plus one value (0.75, between two points): only that point runs

    python benchmarks/bench_search.py [--write]   # --write: benchmarks/results/search.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench_pipeline import run_flow  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
LADDER = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: one more value inside the toy's feasible range (at most 0.82 removed at r_min 8): a new point
MORE = 0.75


def _values(values) -> str:
    return "search.values=[" + ",".join(f"{v:g}" for v in values) + "]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/search.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="slimdiff-search-") as tmp:
        work = Path(tmp)
        full_s, full = run_flow(work)
        ladder_s, ladder = run_flow(work, _values(LADDER))
        more_s, more = run_flow(work, _values((*LADDER, MORE)))
    lines = [
        "| run | wall s | ratio to full | new points | target |",
        "|---|---:|---:|---:|---|",
        f"| full run (budget 0.4) | {full_s:.1f} | 1.00 | - | - |",
        f"| 7-point ladder after it | {ladder_s:.1f} | {ladder_s / full_s:.2f} | "
        f"{sum(1 for p in ladder['points'] if p.get('stages', {}).get('evaluate') == 'ran')} | <= 2.00 x full |",
        f"| ladder + {MORE} | {more_s:.1f} | {more_s / full_s:.2f} | "
        f"{sum(1 for p in more['points'] if p.get('stages', {}).get('evaluate') == 'ran')} | only the new point |",
        "",
        "Per point of the ladder (stage seconds; `cached` = a cache hit):",
        "",
        "| budget | plan | compress | evaluate | point total | params kept | exact match | PSNR dB | gate | chosen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in ladder["points"]:
        if p["status"] != "ok":
            lines.append(f"| {p['value']:g} | {p['status']} | | | | | | | | |")
            continue
        sec, st = p["seconds"], p["stages"]

        def cell(stage, sec=sec, st=st):
            return f"{sec[stage]:.1f}" + (" (cached)" if st[stage] == "cached" else "")

        lines.append(
            f"| {p['value']:g} | {cell('plan')} | {cell('compress')} | {cell('evaluate')} | "
            f"{sum(sec.values()):.1f} | {p['params_kept']:,} | {p['exact_match']:.3f} | "
            f"{p['psnr_db']:.1f} | {'pass' if p['gate_passed'] else 'FAIL'} | {'yes' if p.get('chosen') else ''} |"
        )
    inside = sum(sum(p.get("seconds", {}).values()) for p in ladder["points"])
    shared = {
        k: v for k, v in ladder["seconds"].items() if k in ("slimset", "calibrate", "influence", "register")
    }
    outside = ladder_s - inside - sum(shared.values())
    lines += [
        "",
        f"Ladder run: points {inside:.1f} s, shared stages "
        + ", ".join(f"{k} {v:.1f}" for k, v in shared.items())
        + f" s, outside the stages (process start, imports, Prefect server, MLflow runs, report) {outside:.1f} s.",
        f"Ladder + {MORE}: ran "
        + ", ".join(f"{p['value']:g}" for p in more["points"] if p.get("stages", {}).get("evaluate") == "ran")
        + ".",
        "",
        f"The ladder at {ladder_s / full_s:.2f}x the full run {'meets' if ladder_s <= 2 * full_s else 'misses'} "
        "the 2x target.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        out = ROOT / "benchmarks" / "results" / "search.md"
        out.write_text(
            "# Budget search timings (toy model, `python benchmarks/bench_search.py`)\n\n"
            f"Machine: {os.cpu_count()} CPU cores; each run is a fresh `slimdiff run` process.\n\n"
            + report
            + "\n"
        )


if __name__ == "__main__":
    sys.exit(main())
