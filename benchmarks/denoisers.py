"""Denoisers at the shapes people run, built from their published configs with random weights.

Speed and memory do not depend on weight values, and nothing is downloaded. Each spec builds the
model, makes forward inputs at a resolution, and collects activation statistics for the plans
(``calibrate``): on the real-shaped random-weight model with random inputs at a few timesteps,
except for the committed toy model, which is calibrated exactly as ``slimdiff run`` does (its own
sampler over SlimSet-sized training captions).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,  # in SD 1.x configs this is the number of heads
    norm_num_groups=32,
)

#: timesteps of the random-input calibration forwards (noisy, middle, clean)
CALIBRATION_TIMESTEPS = (999, 500, 100)


@dataclass(frozen=True)
class Inputs:
    args: tuple
    kwargs: dict
    batch: int

    def to(self, device: torch.device, dtype: torch.dtype) -> Inputs:
        def move(t):
            if not torch.is_tensor(t):
                return t
            return t.to(device, dtype) if t.is_floating_point() else t.to(device)

        return Inputs(
            tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()}, self.batch
        )

    def meta(self) -> Inputs:
        def empty(t):
            return torch.empty(t.shape, dtype=t.dtype, device="meta") if torch.is_tensor(t) else t

        return Inputs(
            tuple(empty(a) for a in self.args), {k: empty(v) for k, v in self.kwargs.items()}, self.batch
        )


@dataclass(frozen=True)
class DenoiserSpec:
    name: str
    description: str
    build: Callable[[], torch.nn.Module]  # random weights (seed 0), eval mode, float32, CPU
    inputs: Callable[[torch.nn.Module, int, int, int], Inputs]  # (model, batch, resolution px, seed)
    default_resolution: int
    default_batch: int = 2  # one prompt with both classifier-free-guidance branches
    calibrate: Callable[[torch.nn.Module, int], object] | None = None  # (model, resolution) -> stats


# -- UNet (SD 1.x / 2.x / XL) ----------------------------------------------------------------------
def unet_inputs(
    model, batch: int, resolution: int, seed: int = 0, text_len: int = 77, vae_scale: int = 8
) -> Inputs:
    cfg = model.config
    latent = resolution // vae_scale
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    text = torch.randn(batch, text_len, cfg.cross_attention_dim, generator=g)
    return Inputs((sample, torch.full((batch,), 500), text), {}, batch)


def random_input_stats(model, inputs_at: Callable[[int, int], Inputs], timesteps=CALIBRATION_TIMESTEPS):
    """Activation statistics of a random-weight model on random inputs at a few timesteps, one
    bucket: what the benchmark's error- and influence-driven plans are made from when no real
    weights (hence no real activations) exist."""
    from slimdiff.calibration import ActivationCollector

    collector = ActivationCollector(model, n_buckets=1)
    with collector, torch.inference_mode():
        for i, t in enumerate(timesteps):
            x = inputs_at(i, t)
            model(*x.args, **x.kwargs)
    return collector.stats({"source": "random weights, random inputs", "timesteps": list(timesteps)})


def _unet_stats(model, resolution: int):
    def at(i: int, t: int) -> Inputs:
        x = unet_inputs(model, 2, resolution, seed=100 + i)
        return Inputs((x.args[0], torch.full((2,), t), x.args[2]), {}, 2)

    return random_input_stats(model, at)


def build_sd15() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).eval()


# -- the committed toy model -------------------------------------------------------------------------
@functools.cache
def _toy_pipe():
    from slimdiff.toy import load_toy_pipeline

    return load_toy_pipeline()


def build_toy() -> torch.nn.Module:
    return _toy_pipe().unet.eval()


def toy_inputs(model, batch: int, resolution: int, seed: int = 0) -> Inputs:
    pipe = _toy_pipe()
    return unet_inputs(model, batch, resolution, seed, pipe.tokenizer.model_max_length, pipe.vae_scale_factor)


def toy_stats(model, resolution: int):
    """The default calibration of ``slimdiff run`` (params.yaml: SlimSet size, steps, guidance,
    buckets) through the toy pipeline's own sampler, on its training captions (never the
    held-out evaluation captions)."""
    from slimdiff.calibration import collect_stats
    from slimdiff.config import load_params
    from slimdiff.toy.data import train_captions

    params = load_params(_repo_root() / "params.yaml")
    cal = params.calibration
    pipe = copy.copy(_toy_pipe())  # same components, this model as the UNet
    pipe.unet = model
    return collect_stats(
        pipe,
        train_captions()[: params.slimset.n],
        num_inference_steps=cal.num_inference_steps,
        guidance_scale=cal.guidance_scale,
        n_buckets=cal.n_buckets,
        batch_size=cal.batch_size,
        seed=cal.seed,
        progress=False,
    )


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


SPECS: dict[str, DenoiserSpec] = {
    "sd15": DenoiserSpec(
        "sd15",
        "SD v1.5 UNet (860 M), random weights",
        build_sd15,
        unet_inputs,
        512,
        2,
        _unet_stats,
    ),
    "toy": DenoiserSpec(
        "toy",
        "the committed toy UNet (3.9 M), trained weights, calibrated as `slimdiff run` does",
        build_toy,
        toy_inputs,
        32,
        64,  # what the evaluation sampler runs: 32 captions x 2 CFG branches
        toy_stats,
    ),
}
