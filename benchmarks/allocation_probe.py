"""Which allocation should spend the rank budget? A probe on the toy model.

Compresses the committed toy UNet at 20%, 40% and 60% of the compressible parameters removed with
rank plans from: METHOD.md's softmax of the influence scores (more rank to high TRQ), the same
scores normalised within each module type, the negated scores (more rank to low TRQ), uniform
allocation, and the error-driven allocation (``mode: error``, the default: least
parameter-weighted relative truncation error, ``slimdiff.planning.spectra``) at tau 0 and 0.05; reports
PSNR of 88 held-out captions against the original on the same seeds, the share of parameters
each module type keeps, and the plan's parameter-weighted predicted relative error. Uses the
statistics and influence of a previous `make run` (artifacts/calibrate, artifacts/influence).

    python benchmarks/allocation_probe.py [--write]   # --write: benchmarks/results/allocation_probe.md
"""

from __future__ import annotations

import argparse
import copy
import glob
import math
from pathlib import Path

import torch

from slimdiff.evaluation import metrics as M
from slimdiff.families.units import compression_units
from slimdiff.formats.models import load_pipeline
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.influence import Influence
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import compress_
from slimdiff.toy.data import heldout_captions
from tasks.store import CovarianceStore

ROOT = Path(__file__).resolve().parents[1]


def zscore(d: dict[str, float]) -> dict[str, float]:
    v = list(d.values())
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / len(v)) or 1.0
    return {k: (x - m) / s for k, x in d.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    stores = sorted(glob.glob(str(ROOT / "artifacts" / "calibrate" / "*.zarr")))
    influences = sorted(glob.glob(str(ROOT / "artifacts" / "influence" / "*" / "influence.json")))
    if not stores or not influences:
        raise SystemExit("run `make run` first: this probe reuses its statistics and influence")
    pipe = load_pipeline("toy")
    infl = Influence.from_json(Path(influences[0]).read_text())
    cov = CovarianceStore.open(stores[0]).read().aggregate(infl.weights)
    units = compression_units(pipe.unet)
    raw = infl.score_of()
    per_kind: dict[str, float] = {}
    for kind in ("ffn", "qk", "vo"):
        per_kind.update(zscore({n: raw[n] for n in units if units[n].kind == kind}))
    profiles = error_profiles(pipe.unet, cov, units)
    variants = {  # name: (scores, mode, tau)
        "influence (METHOD.md, tau 1)": (raw, "influence", 1.0),
        "influence, per-type z-score": (per_kind, "influence", 1.0),
        "negated influence": ({k: -v for k, v in raw.items()}, "influence", 1.0),
        "uniform": (None, "uniform", 1.0),
        "error, tau 0 (default)": (raw, "error", 0.0),
        "error, tau 0.05": (raw, "error", 0.05),
    }
    captions = heldout_captions()

    def sample(p):
        gens = [torch.Generator().manual_seed(1234 + i) for i in range(len(captions))]
        out = p(captions, num_inference_steps=20, guidance_scale=4.0, generator=gens, output_type="np").images
        return torch.from_numpy(out).permute(0, 3, 1, 2).float()

    reference = sample(pipe)
    original = copy.deepcopy(pipe.unet)
    lines = [
        "| removed | allocation | PSNR to original (dB) | kept share: ffn / qk / vo | predicted error |",
        "|---|---|---:|---|---:|",
    ]
    total = sum(u.full_params for u in units.values())
    for frac in (0.2, 0.4, 0.6):
        for name, (scores, mode, tau) in variants.items():
            plan = plan_ranks(
                scores, units, Budget(removed_fraction=frac), tau=tau, mode=mode, profiles=profiles
            )
            pipe.unet = copy.deepcopy(original)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            compress_(pipe.unet, plan, cov)
            torch.set_num_threads(threads)
            psnr = M.capped_mean_psnr(M.psnr(sample(pipe), reference), 100.0)
            kept: dict[str, list[int]] = {}
            for n, u in plan.units.items():
                acc = kept.setdefault(units[n].kind, [0, 0])
                acc[0] += u.params_before
                acc[1] += u.params_after
            share = " / ".join(f"{kept[k][1] / kept[k][0]:.2f}" for k in ("ffn", "qk", "vo"))
            predicted = sum(u.params_before / total * profiles[n][u.rank] for n, u in plan.units.items())
            lines.append(f"| {frac:.0%} | {name} | {psnr:.2f} | {share} | {predicted:.4f} |")
            print(lines[-1], flush=True)
    if args.write:
        out = ROOT / "benchmarks" / "results" / "allocation_probe.md"
        out.write_text(
            "# Allocation direction probe (`python benchmarks/allocation_probe.py`)\n\n"
            "Toy model, 88 held-out captions x 1 image, 20 DDIM steps, guidance 4.0, seeds 1234+i; "
            "r_min 8, multiple 8; damping 0.01. Predicted error: sum over units of the parameter share "
            "times the relative truncation error at the planned rank (what mode error minimises).\n\n"
            + "\n".join(lines)
            + "\n"
        )


if __name__ == "__main__":
    main()
