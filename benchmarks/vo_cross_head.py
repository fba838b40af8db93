"""How much the per-head VO error misses: cross-head terms of the attention-output error, toy model.

The VO error profile sums each head's error E||a_h (W_h - T_h O_h)||^2; the unit's real output
error E||sum_h a_h (W_h - T_h O_h)||^2 also holds the cross terms 2 E[<a_h D_h, a_g D_g>], which
need the full (H*d_h)^2 attention-output covariance that calibration does not store. This probe
collects it on the committed toy model (its own sampler over 64 training captions, as
``slimdiff run`` calibrates) and, for the default plan's VO rewrites at 20/40/60% removed, compares
the error under the full covariance with the per-head sum under the same covariance.

    python benchmarks/vo_cross_head.py [--write]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from denoisers import SPECS

from slimdiff.config import load_params
from slimdiff.families.units import compression_units, out_heads
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.influence import compute_influence
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import compress_

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64


def full_attnout_covariances(model, spec) -> dict[str, torch.Tensor]:
    """Token-averaged (H*d_h, H*d_h) second moment of every attention's to_out.0 input during the
    default calibration sampling (all timesteps pooled)."""
    sums, counts, hooks = {}, {}, []
    for name, mod in model.named_modules():
        if name.endswith((".attn1", ".attn2")):

            def pre(m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(F64)
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]

            hooks.append(mod.to_out[0].register_forward_pre_hook(pre))
    try:
        stats = spec.calibrate(model, spec.default_resolution)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    spec = SPECS["toy"]
    model = spec.build()
    params = load_params(ROOT / "params.yaml")
    full, stats = full_attnout_covariances(model, spec)
    influence = compute_influence(stats, model, weighting=params.influence.weighting)
    covs = influence.aggregate(stats)
    profiles = error_profiles(model, covs, damping=params.compression.damping)
    units = compression_units(model)
    lines = [
        "# VO error: per-head sum vs the full attention-output covariance (toy model)",
        "",
        "Default plan (params.yaml) at each budget; every compressed VO unit's output error under the full "
        "(all heads) covariance of the calibration tokens, divided by the per-head sum under the same "
        "covariance (1 = no cross-head terms). Both exclude the bias.",
        "",
        "| removed | VO units compressed | ratio median | ratio min | ratio max | summed error full / per-head |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for frac in args.fractions:
        a = params.allocation
        plan = plan_ranks(
            influence.score_of(),
            units,
            Budget(removed_fraction=frac),
            mode="error",
            tau=a.tau,
            r_min=a.r_min,
            multiple=a.multiple,
            profiles=profiles,
            tie_qk_vo=a.tie_qk_vo,
        )
        slim = copy.deepcopy(model)
        compress_(slim, plan, covs, damping=params.compression.damping)
        ratios, tot_full, tot_head = [], 0.0, 0.0
        for name, p in plan.compressed_units().items():
            if p.kind != "vo":
                continue
            u = units[name]
            attn_name = f"{u.block}.{u.attn}"
            a0, a1 = model.get_submodule(attn_name), slim.get_submodule(attn_name)
            heads = a0.heads
            old_rows = a0.to_v.weight.detach().to(F64).view(heads, -1, a0.to_v.in_features)
            new_rows = a1.to_v.weight.detach().to(F64).view(heads, -1, a1.to_v.in_features)
            t = torch.linalg.lstsq(old_rows.transpose(1, 2), new_rows.transpose(1, 2)).solution  # (H, d_h, r)
            w0 = out_heads(a0.to_out[0].weight, heads)
            delta = w0 - t @ out_heads(a1.to_out[0].weight, heads)  # (H, d_h, d_out)
            c = full[attn_name]
            d_h = w0.shape[1]
            stacked = delta.reshape(-1, delta.shape[-1])
            e_full = float(torch.trace(stacked.T @ c @ stacked))
            e_head = sum(
                float(
                    torch.trace(delta[h].T @ c[h * d_h : (h + 1) * d_h, h * d_h : (h + 1) * d_h] @ delta[h])
                )
                for h in range(heads)
            )
            ratios.append(e_full / e_head)
            tot_full += e_full
            tot_head += e_head
        if ratios:
            lines.append(
                f"| {frac:.0%} | {len(ratios)} | {statistics.median(ratios):.3f} | {min(ratios):.3f} | "
                f"{max(ratios):.3f} | {tot_full / tot_head:.3f} |"
            )
        else:
            lines.append(f"| {frac:.0%} | 0 | - | - | - | - |")
    report = "\n".join(lines)
    print(report)
    if args.write:
        out = ROOT / "benchmarks" / "results" / "vo_cross_head.md"
        out.write_text(report + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
