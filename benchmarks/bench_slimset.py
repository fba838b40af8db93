"""SlimSet selection speed: geometric median + FPS on random unit vectors (no embedding pass).

Target (issue 4): 30,000 prompts x 512-d, select 500, in < 2 minutes on the 2-core dev machine.

    python benchmarks/bench_slimset.py [--n-pool 30000] [--dim 512] [--n 500] [--write]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from slimdiff.calibration.slimset import (
    farthest_point_sampling,
    geometric_median,
    l2_normalise,
    select_indices,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-pool", type=int, default=30_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--canonical-share", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/slimset.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def out(line: str) -> None:
        print(line)
        lines.append(line)

    x = l2_normalise(torch.randn(args.n_pool, args.dim, generator=torch.Generator().manual_seed(0)))
    t0 = time.perf_counter()
    median = geometric_median(x)
    t_median = time.perf_counter() - t0
    t0 = time.perf_counter()
    farthest_point_sampling(x, args.n, [0])
    t_fps = time.perf_counter() - t0

    t0 = time.perf_counter()
    sel = select_indices(x, args.n, seed=0, canonical_share=args.canonical_share)
    t_total = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB (Linux)
    out(f"pool {args.n_pool} x {args.dim}, select {args.n}, {torch.get_num_threads()} threads")
    out(f"  geometric median (Weiszfeld): {t_median:7.2f} s   |median| = {float(median.norm()):.4f}")
    out(f"  farthest-point sampling:      {t_fps:7.2f} s")
    out(
        f"  select_indices (median + canonical share {args.canonical_share} + FPS): {t_total:7.2f} s, "
        f"{len(sel.selected)} selected, process peak RSS {peak_rss:.0f} MiB "
        f"(the pool itself is {x.numel() * 4 / 2**20:.0f} MiB)"
    )
    out(f"  target < 120 s: {'met' if t_total < 120 else 'MISSED'}")
    if args.write:
        path = Path(__file__).parent / "results" / "slimset.md"
        path.write_text("# SlimSet selection speed\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
