"""Whole-pipeline timings on the toy model (issue 6 targets), each a fresh `slimdiff run` process.

1. full run on an empty workspace (Prefect's temporary server start included)
2. no-op rerun (nothing changed: every stage cached)        target < 30 s
3. rerun after changing only allocation.tau                  target < 30% of the full run

Printed as seconds and as ratios of the full run measured in the same invocation.

    python benchmarks/bench_pipeline.py [--write]   # --write: benchmarks/results/pipeline.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_flow(workdir: Path, *overrides: str) -> tuple[float, dict]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(workdir / ".prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(workdir / ".prefect" / "storage"),
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--params", str(ROOT / "params.yaml"), "--json"]
    cmd += ["--set", f"tracking.artifact_root={workdir / 'artifacts'}"]
    cmd += ["--set", f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"slimdiff run failed ({out.returncode})")
    text = out.stdout[out.stdout.rfind("\n{") + 1 :]  # the JSON document is printed last
    return seconds, json.loads(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/pipeline.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="slimdiff-bench-") as tmp:
        work = Path(tmp)
        full_s, full = run_flow(work)
        noop_s, noop = run_flow(work)
        tau_s, tau = run_flow(work, "allocation.tau=0.5")
    rows = [
        ("full run", full_s, full["status"], "-"),
        ("no-op rerun", noop_s, noop["status"], "< 30 s"),
        ("rerun, tau changed", tau_s, tau["status"], "< 0.30 x full"),
    ]
    lines = [
        "| run | wall s | ratio to full | stages ran | target |",
        "|---|---:|---:|---|---|",
    ]
    for name, secs, status, target in rows:
        ran = ", ".join(k for k, v in status.items() if v == "ran") or "none"
        lines.append(f"| {name} | {secs:.1f} | {secs / full_s:.2f} | {ran} | {target} |")
    stage_lines = [""]
    for name, secs, result in (
        ("Full run", full_s, full),
        ("No-op rerun", noop_s, noop),
        ("Tau rerun", tau_s, tau),
    ):
        inside = sum(result["seconds"].values())
        stage_lines.append(
            f"{name}, per stage (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items())
            + f"; outside the stages (process start, imports, Prefect server, MLflow run): {secs - inside:.1f}"
        )
    verdict = [
        "",
        f"no-op rerun {'meets' if noop_s < 30 else 'misses'} the 30 s target; "
        f"tau rerun at {tau_s / full_s:.0%} of the full run {'meets' if tau_s / full_s < 0.30 else 'misses'} the 30% target.",
    ]
    report = "\n".join(lines + stage_lines + verdict)
    print(report)
    if args.write:
        out = ROOT / "benchmarks" / "results" / "pipeline.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            "# Pipeline timings (toy model, `python benchmarks/bench_pipeline.py`)\n\n"
            f"Machine: {os.cpu_count()} CPU cores; each run is a fresh `slimdiff run` process "
            "(Prefect temporary server start included).\n\n" + report + "\n"
        )


if __name__ == "__main__":
    main()
