"""Latency (interleaved, median) and peak memory of one denoiser forward, measured in the run that
reports them."""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from slimdiff.evaluation.sampling import pipeline_resolution
from slimdiff.families.base import adapter_for, denoiser_of

logger = logging.getLogger(__name__)


#: at most this many prompts per UNet latency batch (x2 under classifier-free guidance)
LATENCY_MAX_PROMPTS = 8


#: the timestep every latency forward runs at (the cost does not depend on it)
LATENCY_TIMESTEP = 500


# --------------------------------------------------------------------------------------------
# Latency and memory
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_inputs_like(pipe, n_prompts: int, guidance_scale: float, seed: int = 0) -> tuple[tuple, dict]:
    """Fixed random denoiser inputs of the sampling shapes, as (args, kwargs) of one forward:
    ``2 * n_prompts`` rows under classifier-free guidance, as the sampler feeds them."""

    model = denoiser_of(pipe)
    adapter = adapter_for(model)
    p = next(model.parameters())
    rows = n_prompts * (2 if guidance_scale > 1.0 else 1)
    h, w = pipeline_resolution(pipe)
    vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
    g = torch.Generator("cpu").manual_seed(seed)
    return adapter.example_inputs(
        model,
        rows,
        (h // vae_scale, w // vae_scale),
        adapter.text_len(pipe),
        device=p.device,
        dtype=p.dtype,
        generator=g,
    )


@torch.no_grad()
def interleaved_latency(
    unets: dict[str, nn.Module], inputs, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall-clock seconds of one UNet forward per model and repeat, the models alternating within
    each repeat so that machine-load drift hits all of them alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {k: [] for k in unets}
    args, kwargs = inputs
    for r in range(warmup + repeats):
        for name, unet in unets.items():
            device = next(unet.parameters()).device
            _sync(device)
            start = time.perf_counter()
            unet(*args, **kwargs)
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _rss_bytes() -> int | None:
    """Current resident set size from /proc (Linux); None elsewhere."""
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        return None
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``), so that the RSS of the next
    block shows its own allocations instead of reusing pages an earlier forward left in the heap.
    False where the C library has no malloc_trim (then RSS deltas under-count)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


@contextmanager
def peak_memory(device: torch.device, poll_s: float = 0.0005) -> Iterator[dict]:
    """Peak memory above the starting level while the block runs, in bytes: ``out["bytes"]``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the resident set size polled
    from /proc/self/statm by a background thread (torch's CPU allocations are invisible to
    tracemalloc); without /proc, the ru_maxrss delta (only growth beyond the process's previous
    high-water mark shows). Before a CPU measurement the heap is trimmed (glibc ``malloc_trim``):
    without it, a forward reuses pages an earlier one freed and its RSS delta reads ~0.
    ``out["method"]`` names which one was used."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
        out["method"] = "torch.cuda.max_memory_allocated - memory_allocated before"
        return
    trimmed = _malloc_trim()
    base = _rss_bytes()
    if base is None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield out
        out["bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        out["method"] = "resource ru_maxrss delta"
        return
    peak = [base]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            stop.wait(poll_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes() or 0)
        out["bytes"] = int(peak[0] - base)
        out["method"] = f"RSS from /proc/self/statm polled every {poll_s * 1000:g} ms, peak - start" + (
            " (after glibc malloc_trim(0))"
            if trimmed
            else " (no malloc_trim: freed memory may be reused unseen)"
        )


@torch.no_grad()
def unet_forward_peak_memory(unet: nn.Module, inputs) -> dict:
    device = next(unet.parameters()).device
    args, kwargs = inputs
    with peak_memory(device) as mem:
        unet(*args, **kwargs)
    return mem


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
