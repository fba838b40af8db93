"""Cost of the activation-statistics hooks: sampling with the collector vs without.

(a) a small pipeline: the toy pipeline when ``slimdiff.toy.load_toy_pipeline`` finds one, else a
    tiny StableDiffusionPipeline built from config; full sampling loop, CFG on.
(b) a UNet built from the SD v1.5 config (random weights): one UNet step at 64x64 latents, batch 2
    (= one prompt with both CFG branches), statistics for every transformer block.

Target (issue 4): ratio <= 1.6x on the SD v1.5-shaped UNet. After one warm-up each, runs are
interleaved (off, on, on, off, ...); reported: the median of each and the range of the per-pair
ratios (wall clock, threads pinned).

    python benchmarks/bench_calibration.py [--repeats 5] [--skip-sd] [--device cpu] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from denoisers import SD15_UNET_CONFIG  # benchmarks/ is on sys.path when run as a script

from slimdiff.calibration.collect import ActivationCollector


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(run_off, run_on, repeats: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall seconds of run_off / run_on over ``repeats`` interleaved pairs (ABBA order, after one
    warm-up each)."""
    run_off()
    run_on()
    off, on = [], []
    for rep in range(repeats):
        order = ((run_off, off), (run_on, on)) if rep % 2 == 0 else ((run_on, on), (run_off, off))
        for fn, acc in order:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            acc.append(time.perf_counter() - t0)
    return off, on


def summary(off: list[float], on: list[float]) -> str:
    ratios = [b / a for a, b in zip(off, on, strict=True)]
    m_off, m_on = statistics.median(off), statistics.median(on)
    return (
        f"without collector {m_off:8.3f} s   with {m_on:8.3f} s   ratio {m_on / m_off:.2f}x "
        f"[pairs {min(ratios):.2f}-{max(ratios):.2f}]"
    )


LINES: list[str] = []


def out(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def small_pipeline(device: torch.device):
    with contextlib.suppress(ImportError):
        from slimdiff.toy import load_toy_pipeline

        try:
            return "toy pipeline", load_toy_pipeline().to(device)
        except FileNotFoundError as e:
            print(f"  (toy pipeline unavailable: {e}; using a tiny pipeline built from config)")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_calib_collector import make_tiny_pipeline  # the test suite's tiny from-config pipeline

    return "tiny from-config pipeline", make_tiny_pipeline(Path(tempfile.mkdtemp())).to(device)


def bench_pipeline(device: torch.device, repeats: int, steps: int, n_prompts: int) -> None:
    name, pipe = small_pipeline(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a cat", "a red car on the street", "a dog on a bench", "a man with a tree"][
        :n_prompts
    ]
    prompts = (prompts * n_prompts)[:n_prompts]
    collector = ActivationCollector(pipe.unet, n_buckets=min(5, steps), scheduler=pipe.scheduler)

    def sample():
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, generator=gens, output_type="latent")

    def sample_on():
        with collector:
            sample()

    off, on = interleaved(sample, sample_on, repeats, device)
    out(f"(a) {name}: {len(prompts)} prompts x {steps} steps, CFG on")
    out(f"    {summary(off, on)}")


def bench_sd15_unet(device: torch.device, repeats: int, dtype: torch.dtype) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().to(device, dtype)
    n_params = sum(p.numel() for p in unet.parameters())
    sample = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
    ctx = torch.randn(2, 77, 768, device=device, dtype=dtype)
    collector = ActivationCollector(unet, n_buckets=1)

    @torch.no_grad()
    def step():
        unet(sample, 500, encoder_hidden_states=ctx)

    def step_on():
        with collector:
            step()

    off, on = interleaved(step, step_on, repeats, device)
    stats = collector.stats()
    stat_mib = sum(m.numel() * 8 for m in stats.moments.values()) / 2**20
    out(
        f"(b) SD v1.5-shaped UNet ({n_params / 1e6:.0f}M params, random weights, {dtype}): one step, 64x64 latents, batch 2"
    )
    ratio = statistics.median(on) / statistics.median(off)
    out(f"    {summary(off, on)}   (target <= 1.6x: {'met' if ratio <= 1.6 else 'MISSED'})")
    out(f"    {len(stats.moments)} statistics, {stat_mib:.0f} MiB float64 per bucket")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="sampler steps for (a)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts for (a)")
    ap.add_argument("--skip-sd", action="store_true", help="skip (b), the SD v1.5-shaped UNet")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/calibration_<device>.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    device = torch.device(args.device)
    out(
        f"# Calibration overhead\n\ndevice {device}, {torch.get_num_threads()} threads pinned, torch {torch.__version__}, "
        f"{args.repeats} interleaved pairs after one warm-up each, wall clock\n"
    )
    bench_pipeline(device, args.repeats, args.steps, args.prompts)
    if not args.skip_sd:
        bench_sd15_unet(device, args.repeats, getattr(torch, args.dtype))
    if args.write:
        path = Path(__file__).parent / "results" / f"calibration_{device.type}.md"
        path.write_text("\n".join(LINES) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
