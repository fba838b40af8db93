"""Denoisers at the shapes people run, built from their published configs with random weights.

Speed and memory do not depend on weight values, and nothing is downloaded. Each spec builds the
model, makes forward inputs at a resolution (every family through its adapter's
``example_inputs``: the same argument layout the pipelines pass, e.g. SDXL's added time / text
embeddings, PixArt's T5 attention mask), and collects activation statistics for the plans
(``calibrate``): on the real-shaped random-weight model with random inputs at a few timesteps,
except for the committed toy model, which is calibrated exactly as ``slimdiff run`` does (its own
sampler over SlimSet-sized training captions).

Batches: SD v1.5 and PixArt-Sigma at batch 2 (one prompt, both classifier-free-guidance
branches), SDXL and SD3.5-medium at batch 1 (2.6 B and 2.5 B parameters: two fp32 copies already
take ~20 GB of the 24 GB host). Text lengths: 77 CLIP tokens (SD, SDXL), 333 joint tokens (SD3.5:
77 CLIP + 256 T5), 300 T5 tokens (PixArt-Sigma's ``max_sequence_length``; all of them unmasked
here, the cost of the padded prompts the pipeline runs).
"""

from __future__ import annotations

import functools
import inspect
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

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the published values; diffusers
#: defaults for the keys not listed: act_fn silu, flip_sin_to_cos, freq_shift 0, norm_eps 1e-5, ...)
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # heads per level (head width 64), as in SD 1.x configs
    cross_attention_dim=2048,  # CLIP ViT-L (768) + OpenCLIP ViT-bigG (1280) hidden states
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 pooled text
    norm_num_groups=32,
    norm_eps=1e-5,
)

#: PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json (as diffusers'
#: scripts/convert_pixart_sigma_to_diffusers.py writes it for 1024 px)
PIXART_SIGMA_CONFIG = dict(
    num_attention_heads=16,
    attention_head_dim=72,  # width 1152
    in_channels=4,
    out_channels=8,  # learned sigma
    num_layers=28,
    cross_attention_dim=1152,
    attention_bias=True,
    sample_size=128,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=2,
    use_additional_conditions=False,
    caption_channels=4096,  # T5-XXL (v1.1) hidden states
)

#: stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: 24 joint blocks, width
#: 1536 = 24 heads x 64, per-head RMSNorm on q and k, a second image-only self-attention in the
#: first 13 blocks, the last block context_pre_only)
SD35_MEDIUM_CONFIG = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,  # T5-XXL hidden states (CLIP-L + CLIP-G states zero-padded to it)
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # CLIP-L (768) + CLIP-G (1280) pooled
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)

#: black-forest-labs/FLUX.1-dev transformer/config.json at full width (3072 = 24 heads x 128, MLP
#: 12288, RoPE axes (16, 56, 56), guidance embedding) but reduced depth: 1 of the 19 double blocks
#: and 2 of the 38 single blocks, the whole model's 1 : 2 mix (12 B parameters do not fit a 24 GB
#: host; per-block costs repeat, so the slice's ratios are the whole model's up to the embeddings)
FLUX_DEV_SLICE_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: the whole FLUX.1-dev: blocks of each kind (for extrapolating the slice)
FLUX_DEV_BLOCKS = {"double": 19, "single": 38}

#: The 2025-26 releases (issue 26) at full width, a few blocks each: diffusers 0.42's default configs
#: of these classes are the released models' (Qwen/Qwen-Image, Tongyi-MAI/Z-Image, Wan-AI/Wan2.1-T2V-14B,
#: black-forest-labs/FLUX.2-dev); only the depth is cut. FLUX.2 is timed at klein-4B's width (3072 =
#: 24 heads x 128, text width 7680, 5 double : 20 single blocks) with its 1 : 4 mix of double and
#: (uncompressed) single blocks, so the slice's ratio is the whole model's up to the embeddings.
QWENIMAGE_SLICE_CONFIG = dict(num_layers=2)
QWENIMAGE_BLOCKS = 60
ZIMAGE_SLICE_CONFIG = dict(n_layers=2, n_refiner_layers=1)
ZIMAGE_BLOCKS = {"layers": 30, "refiner": 2}
WAN_SLICE_CONFIG = dict(num_layers=1)
WAN_BLOCKS = 40
#: Wan timed on 5 frames (2 latent frames) at 480 x 832: 2 x 30 x 52 = 3120 video tokens
WAN_LATENT_FRAMES_TIMED, WAN_LATENT_HW = 2, (60, 104)
FLUX2_KLEIN_SLICE_CONFIG = dict(
    num_layers=1,
    num_single_layers=4,
    num_attention_heads=24,
    joint_attention_dim=7680,
    guidance_embeds=False,
)
FLUX2_KLEIN_BLOCKS = {"double": 5, "single": 20}
#: FLUX.3 at its default (released) width, 3072 = 24 heads x 128, MLP 9216, text context 20480
#: wide: 1 of its 5 per-mode layers (an image, a reference-image and a text block; the reference
#: blocks do not run in text-to-image) and 5 of its 28 joint blocks (its 5 : 28 mix, nearly)
FLUX3_SLICE_CONFIG = dict(num_layers=1, num_single_layers=5)


#: timesteps of the random-input calibration forwards (noisy, middle, clean)
CALIBRATION_TIMESTEPS = (999, 500, 100)


@dataclass(frozen=True)
class Inputs:
    args: tuple
    kwargs: dict
    batch: int

    def to(self, device: torch.device, dtype: torch.dtype) -> Inputs:
        def move(t):
            return t.to(device, dtype) if t.is_floating_point() else t.to(device)

        return self._map(move)

    def meta(self) -> Inputs:
        return self._map(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        """The same inputs with ``fn`` applied to every tensor, also inside nested dicts (SDXL's and
        PixArt's ``added_cond_kwargs``), lists and tuples."""

        def walk(v):
            if torch.is_tensor(v):
                return fn(v)
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return type(v)(walk(x) for x in v)
            return v

        return Inputs(walk(self.args), walk(self.kwargs), self.batch)

    def at_timestep(self, model: torch.nn.Module, t: int) -> Inputs:
        """The same inputs with every sample at timestep ``t`` (the ``timestep`` argument bound by
        name, positional or keyword, as the adapters pass it)."""
        ts = torch.full((self.batch,), t, dtype=torch.long)
        if "timestep" in self.kwargs:
            return Inputs(self.args, {**self.kwargs, "timestep": ts}, self.batch)
        params = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
        i = params.index("timestep")
        return Inputs((*self.args[:i], ts, *self.args[i + 1 :]), self.kwargs, self.batch)


@dataclass(frozen=True)
class DenoiserSpec:
    name: str
    description: str
    build: Callable[[], torch.nn.Module]  # random weights (seed 0), eval mode, float32, CPU
    inputs: Callable[[torch.nn.Module, int, int, int], Inputs]  # (model, batch, resolution px, seed)
    default_resolution: int
    default_batch: int = 2  # one prompt with both classifier-free-guidance branches
    # (model, resolution, keys=None) -> stats (keys: only those statistics)
    calibrate: Callable[..., object] | None = None


# -- inputs and statistics, any family ---------------------------------------------------------------
def adapter_inputs(
    model, batch: int, resolution: int, seed: int = 0, text_len: int = 77, vae_scale: int = 8
) -> Inputs:
    """One forward's inputs at ``resolution`` px (latents 1/``vae_scale`` of it), built by the
    family adapter: random latents and text states from a CPU generator seeded ``seed``, timestep
    500 (for a UNet the same tensors, in the same order, as the hand-written inputs of before)."""
    from slimdiff.families import adapter_for

    latent = resolution // vae_scale
    g = torch.Generator().manual_seed(seed)
    args, kwargs = adapter_for(model).example_inputs(
        model, batch, (latent, latent), text_len, device="cpu", generator=g
    )
    return Inputs(tuple(args), kwargs, batch)


def text_inputs(text_len: int) -> Callable[..., Inputs]:
    """``adapter_inputs`` at a fixed text length, in the spec's (model, batch, resolution, seed) form."""

    def inputs(model, batch: int, resolution: int, seed: int = 0) -> Inputs:
        return adapter_inputs(model, batch, resolution, seed, text_len)

    return inputs


def random_input_stats(
    model, inputs_at: Callable[[int, int], Inputs], timesteps=CALIBRATION_TIMESTEPS, keys=None
):
    """Activation statistics of a random-weight model on random inputs at a few timesteps, one
    bucket: what the benchmark's error- and influence-driven plans are made from when no real
    weights (hence no real activations) exist. ``keys``: only these statistics (None: all)."""
    from slimdiff.calibration.collect import ActivationCollector

    collector = ActivationCollector(model, n_buckets=1, keys=keys)
    with collector, torch.inference_mode():
        for i, t in enumerate(timesteps):
            x = inputs_at(i, t)
            model(*x.args, **x.kwargs)
    return collector.stats({"source": "random weights, random inputs", "timesteps": list(timesteps)})


def random_stats(text_len: int, batch: int = 2) -> Callable:
    """``calibrate`` for random-weight specs: ``random_input_stats`` on adapter inputs of ``batch``
    samples (2: one prompt with both guidance branches) at ``text_len`` tokens, seeds 100, 101, ..."""

    def calibrate(model, resolution: int, keys=None):
        def at(i: int, t: int) -> Inputs:
            return adapter_inputs(model, batch, resolution, 100 + i, text_len).at_timestep(model, t)

        return random_input_stats(model, at, keys=keys)

    return calibrate


# -- UNet (SD 1.x / 2.x / XL) ----------------------------------------------------------------------
def build_sd15() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).eval()


def build_sdxl() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()


# -- PixArt-Sigma ------------------------------------------------------------------------------------
def build_pixart_sigma() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(**PIXART_SIGMA_CONFIG).eval()


# -- SD3.5-medium (MMDiT) ----------------------------------------------------------------------------
def build_sd35_medium() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(**SD35_MEDIUM_CONFIG).eval()


# -- FLUX.1-dev (full width, a few blocks) -----------------------------------------------------------
def build_flux_slice() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX_DEV_SLICE_CONFIG).eval()


# -- the 2025-26 releases (full width, a few blocks) ----------------------------------------------------
def _build(cls_name: str, **config) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import diffusers

        torch.manual_seed(0)
        return getattr(diffusers, cls_name)(**config).eval()

    return build


def wan_inputs(model, batch: int, resolution: int, seed: int = 0) -> Inputs:
    """Wan's forward on 5 frames at 480 x 832 (``resolution`` is ignored: the shape is the video's),
    512 UMT5 tokens (padded, unmasked: real keys)."""
    from slimdiff.families import adapter_for

    g = torch.Generator().manual_seed(seed)
    args, kwargs = adapter_for(model).example_inputs(
        model, batch, WAN_LATENT_HW, 512, device="cpu", generator=g, latent_frames=WAN_LATENT_FRAMES_TIMED
    )
    return Inputs(tuple(args), kwargs, batch)


def wan_stats(model, resolution: int, keys=None):
    def at(i: int, t: int) -> Inputs:
        return wan_inputs(model, 1, resolution, 100 + i).at_timestep(model, t)

    return random_input_stats(model, at, keys=keys)


def zimage_stats(model, resolution: int, keys=None):
    """``random_stats`` for Z-Image, whose forward takes its time as ``t`` = (1000 - timestep) / 1000."""

    def at(i: int, t: int) -> Inputs:
        x = adapter_inputs(model, 1, resolution, 100 + i, 128)
        args = list(x.args)
        args[1] = torch.full_like(args[1], (1000 - t) / 1000)
        return Inputs(tuple(args), x.kwargs, x.batch)

    return random_input_stats(model, at, keys=keys)


# -- the committed toy models ------------------------------------------------------------------------
@functools.cache
def toy_pipe(source: str = "toy"):
    """The committed toy pipeline of ``source`` ("toy": SD-architecture UNet, "toy-mmdit": SD3-class
    MMDiT, "toy-flux": FLUX.1-class), loaded once per process."""
    from slimdiff.formats.models import load_pipeline

    return load_pipeline(source)


def toy_build(source: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from slimdiff.families.base import denoiser_of

        return denoiser_of(toy_pipe(source)).eval()

    return build


def toy_inputs_of(source: str) -> Callable[..., Inputs]:
    def inputs(model, batch: int, resolution: int, seed: int = 0) -> Inputs:
        from slimdiff.families.base import adapter_for

        pipe = toy_pipe(source)
        text_len = adapter_for(model).text_len(pipe)
        return adapter_inputs(model, batch, resolution, seed, text_len, pipe.vae_scale_factor)

    return inputs


def toy_stats_of(source: str) -> Callable:
    def calibrate(model, resolution: int, keys=None):
        """The default calibration of ``slimdiff run`` (params.yaml: SlimSet size, steps, guidance,
        buckets) through the toy pipeline's own sampler, on its training captions (never the
        held-out evaluation captions)."""
        from slimdiff.calibration.collect import collect_stats
        from slimdiff.config import load_params
        from slimdiff.formats.models import with_unet
        from slimdiff.toy.data import train_captions

        params = load_params(_repo_root() / "params.yaml")
        cal = params.calibration
        pipe = with_unet(toy_pipe(source), model)  # same components, this model as the denoiser
        return collect_stats(
            pipe,
            train_captions()[: params.slimset.n],
            **cal.sampler_options(),
            keys=keys,
            progress=False,
        )

    return calibrate


# the names of before (the toy UNet)
build_toy, toy_inputs, toy_stats = toy_build("toy"), toy_inputs_of("toy"), toy_stats_of("toy")


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


SPECS: dict[str, DenoiserSpec] = {
    "sd15": DenoiserSpec(
        "sd15",
        "SD v1.5 UNet (860 M), random weights",
        build_sd15,
        text_inputs(77),
        512,
        2,
        random_stats(77),
    ),
    "sdxl": DenoiserSpec(
        "sdxl",
        "SDXL-base UNet (2.6 B), random weights",
        build_sdxl,
        text_inputs(77),
        512,  # 64x64 latents on the CPU (1024 px where a GPU is lent: --resolution 1024 --batch 2)
        1,
        random_stats(77),
    ),
    "pixart-sigma": DenoiserSpec(
        "pixart-sigma",
        "PixArt-Sigma-XL-2 transformer (611 M), random weights",
        build_pixart_sigma,
        text_inputs(300),
        512,  # 1024 image tokens on the CPU (4096 at --resolution 1024 where a GPU is lent)
        2,
        random_stats(300),
    ),
    "sd35-medium": DenoiserSpec(
        "sd35-medium",
        "SD3.5-medium MMDiT transformer (2.5 B), random weights",
        build_sd35_medium,
        text_inputs(333),  # 77 CLIP + 256 T5 tokens, what StableDiffusion3Pipeline concatenates
        512,  # 1024 image tokens on the CPU (4096 at --resolution 1024 where a GPU is lent)
        1,
        random_stats(333),
    ),
    "flux-slice": DenoiserSpec(
        "flux-slice",
        "FLUX.1-dev transformer at full width, 1 double + 2 single blocks (687 M), random weights",
        build_flux_slice,
        text_inputs(512),  # FluxPipeline's max_sequence_length: 512 T5 tokens, no mask
        512,  # 64x64 latents -> 1024 packed image tokens (+ 512 text) on the CPU
        1,  # FLUX.1-dev is guidance-distilled: one branch per sample
        random_stats(512, batch=1),
    ),
    "qwenimage-slice": DenoiserSpec(
        "qwenimage-slice",
        "Qwen-Image transformer at full width, 2 of its 60 blocks (720 M), random weights",
        _build("QwenImageTransformer2DModel", **QWENIMAGE_SLICE_CONFIG),
        text_inputs(128),  # the pipeline passes a prompt's own tokens (masked padding to the batch's longest)
        512,  # 1024 packed image tokens
        1,  # true classifier-free guidance: one transformer call per branch
        random_stats(128, batch=1),
    ),
    "zimage-slice": DenoiserSpec(
        "zimage-slice",
        "Z-Image transformer at full width, 2 of 30 layers + 1 noise and 1 context refiner (732 M), random weights",
        _build("ZImageTransformer2DModel", **ZIMAGE_SLICE_CONFIG),
        text_inputs(128),  # the prompt's own caption tokens (the model pads them to a multiple of 32)
        512,
        1,
        zimage_stats,
    ),
    "wan-slice": DenoiserSpec(
        "wan-slice",
        "Wan 2.1 T2V-14B transformer at full width, 1 of its 40 blocks (584 M), 5 frames at 480 x 832, random weights",
        _build("WanTransformer3DModel", **WAN_SLICE_CONFIG),
        wan_inputs,
        480,
        1,
        wan_stats,
    ),
    "flux2-klein-slice": DenoiserSpec(
        "flux2-klein-slice",
        "FLUX.2 transformer at klein-4B width, 1 double + 4 single blocks (its 1 : 4 mix; 931 M), random weights",
        _build("Flux2Transformer2DModel", **FLUX2_KLEIN_SLICE_CONFIG),
        text_inputs(512),
        512,
        1,
        random_stats(512, batch=1),
    ),
    "flux3-slice": DenoiserSpec(
        "flux3-slice",
        "FLUX.3 transformer at full width, 1 of 5 per-mode layers + 5 of 28 joint blocks, random weights",
        _build("Flux3Transformer2DModel", **FLUX3_SLICE_CONFIG),
        text_inputs(512),
        512,
        1,
        random_stats(512, batch=1),
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
    "toy-mmdit": DenoiserSpec(
        "toy-mmdit",
        "the committed toy MMDiT (SD3-class), trained weights, calibrated as `slimdiff run` does",
        toy_build("toy-mmdit"),
        toy_inputs_of("toy-mmdit"),
        32,
        64,
        toy_stats_of("toy-mmdit"),
    ),
    "toy-flux": DenoiserSpec(
        "toy-flux",
        "the committed toy FLUX (FluxTransformer2DModel), trained weights, calibrated as `slimdiff run` does",
        toy_build("toy-flux"),
        toy_inputs_of("toy-flux"),
        32,
        64,
        toy_stats_of("toy-flux"),
    ),
}
