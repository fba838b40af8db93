"""Configs and builders of the toy FLUX pipeline (FLUX.1 architecture, built from config).

The toy FLUX world goes through exactly the code path a real FLUX.1 takes: a diffusers ``FluxPipeline``
with a ``FluxTransformer2DModel`` (double-stream blocks with joint attention, single-stream blocks with
parallel attention + MLP, per-head RMSNorm on q and k, 3-axis rotary position embeddings), a
``CLIPTextModel`` whose pooled output is the pooled conditioning (``text_encoder``), a
``T5EncoderModel`` whose last hidden states are the text tokens (``text_encoder_2``, T5 v1.1-style gated
GELU), the UNet toy world's VAE (FLUX-style latent normalisation: ``shift_factor`` and
``scaling_factor`` set) and word-level tokenizer (both tokenizers), and a
``FlowMatchEulerDiscreteScheduler`` with FLUX's resolution-dependent (dynamic) shift.

How the pipeline builds the transformer input (diffusers ``FluxPipeline``): the 8x8x4 latents are packed
into 2x2 patches, 16 image tokens of 16 channels (``in_channels = 4 * latent channels``) at rotary
positions ``(0, row, column)``; the text tokens are T5's ``max_sequence_length`` last hidden states
(this toy's T5 is trained on the tokenizer's 16 tokens: call the pipeline with
``max_sequence_length=16``, which :func:`slimdiff.families.units.pipeline_call_kwargs` does) at rotary
position ``(0, 0, 0)``; the pooled input is CLIP's ``pooler_output`` (its EOS state); the transformer
gets ``t = sigma`` in [0, 1] (the pipeline passes ``timestep / 1000``).

No guidance embedding (``guidance_embeds=False``, as FLUX.1-schnell): FLUX.1-dev's embedded guidance
is distilled from a teacher run with classifier-free guidance, and there is no such teacher here. The
toy is trained with caption dropout and sampled with FluxPipeline's true classifier-free guidance
(``true_cfg_scale`` with ``negative_prompt=""``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from slimdiff.toy.data import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, toy_vocabulary

LATENT_SIZE = 8  # the toy VAE maps 32x32x3 to 8x8x4
LATENT_CHANNELS = 4
PACKED_SIZE = LATENT_SIZE // 2  # FluxPipeline packs 2x2 latent patches: 4x4 = 16 image tokens
# FlowMatchEulerDiscreteScheduler's dynamic-shift defaults (FLUX.1's scheduler config)
BASE_IMAGE_SEQ_LEN, MAX_IMAGE_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


@dataclass
class ToyFluxConfig:
    """Architecture of the toy FLUX pipeline. Defaults are the committed model's."""

    max_length: int = 16  # the toy tokenizer (both encoders): CLIP positions = max_sequence_length
    clip_hidden: int = 64  # CLIPTextModel width = pooled_projection_dim
    clip_heads: int = 2
    # the text-token encoder (``text_encoder_2``): its width is joint_attention_dim. FLUX gives every
    # text token the rotary position (0, 0, 0), so word order reaches the transformer only through this
    # encoder. "clip" (the committed model): a CLIPTextModel's last hidden states, absolute positions
    # and causal attention, as the toy MMDiT's token encoders (100% two-object exact match there).
    # "t5": a T5EncoderModel (FLUX.1's class, relative positions only); with this recipe it placed
    # both objects right but swapped their attributes: 38.9% two-object exact match with 8
    # relative-position buckets over 32 tokens, 40.2% with T5's default 32 over 128
    token_encoder: str = "clip"
    token_dim: int = 128  # = joint_attention_dim
    token_heads: int = 4
    token_ff: int = 256  # CLIP: MLP width; T5: gated-GELU FFN (T5 v1.1, as FLUX's T5-XXL)
    t5_d_kv: int = 32  # T5 only: per-head width
    t5_buckets: int = 8  # T5 only: relative-position buckets
    t5_max_distance: int = 32
    text_layers: int = 2
    num_layers: int = 4  # double-stream blocks
    num_single_layers: int = 6  # single-stream blocks
    num_heads: int = 4
    head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # sums to head_dim (FLUX.1: 16, 56, 56 of 128)

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(
                f"axes_dims_rope={self.axes_dims_rope} must be three even sizes summing to head_dim={self.head_dim}"
            )
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope={self.axes_dims_rope}: every axis rotates pairs, use even sizes"
            )
        if self.num_layers < 2 or self.num_single_layers < 2:
            raise ValueError(
                "the toy FLUX needs num_layers >= 2 double and num_single_layers >= 2 single blocks"
            )
        if self.token_encoder not in ("clip", "t5"):
            raise ValueError(f"token_encoder={self.token_encoder!r}: use 'clip' or 't5'")
        if self.token_dim % self.token_heads:
            raise ValueError(f"token_dim={self.token_dim} must divide by token_heads={self.token_heads}")
        if self.clip_hidden % self.clip_heads:
            raise ValueError(f"clip_hidden={self.clip_hidden} must divide by clip_heads={self.clip_heads}")
        if not 1 <= self.max_length <= 512:
            raise ValueError(f"max_length={self.max_length}: FluxPipeline allows 1..512 text tokens")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def scheduler_shift(self) -> float:
        """The sampler's effective shift at 16 image tokens: FLUX's ``exp(mu)`` (``calculate_shift``);
        ``exp(mu) s / (1 + (exp(mu) - 1) s)`` is the scheduler's exponential time shift."""
        n = PACKED_SIZE * PACKED_SIZE
        m = (MAX_SHIFT - BASE_SHIFT) / (MAX_IMAGE_SEQ_LEN - BASE_IMAGE_SEQ_LEN)
        return math.exp(n * m + BASE_SHIFT - m * BASE_IMAGE_SEQ_LEN)


def build_text_encoders(cfg: ToyFluxConfig, seed: int = 0):
    """(``CLIPTextModel`` for the pooled input, the token encoder: a second ``CLIPTextModel`` or a
    ``T5EncoderModel`` per ``cfg.token_encoder``), both on the toy vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab = toy_vocabulary()
    special = {
        "bos_token_id": vocab.index(BOS_TOKEN),
        "eos_token_id": vocab.index(EOS_TOKEN),  # CLIP's pooled output: the state at the first EOS
        "pad_token_id": vocab.index(PAD_TOKEN),
    }

    def clip_model(hidden: int, heads: int, intermediate: int):
        return CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=hidden,
                intermediate_size=intermediate,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=heads,
                max_position_embeddings=cfg.max_length,
                hidden_act="gelu",
                **special,
            )
        )

    torch.manual_seed(seed)
    clip = clip_model(cfg.clip_hidden, cfg.clip_heads, 2 * cfg.clip_hidden)
    torch.manual_seed(seed + 1)
    if cfg.token_encoder == "clip":
        return clip, clip_model(cfg.token_dim, cfg.token_heads, cfg.token_ff)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(vocab),
            d_model=cfg.token_dim,
            d_kv=cfg.t5_d_kv,
            d_ff=cfg.token_ff,
            num_layers=cfg.text_layers,
            num_heads=cfg.token_heads,
            relative_attention_num_buckets=cfg.t5_buckets,
            relative_attention_max_distance=cfg.t5_max_distance,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=special["pad_token_id"],
            eos_token_id=special["eos_token_id"],
            decoder_start_token_id=special["pad_token_id"],
        )
    )
    return clip, t5


def build_transformer(cfg: ToyFluxConfig, seed: int = 0):
    """``FluxTransformer2DModel`` on packed 8x8x4 latents, adaLN-Zero initialised (DiT): every
    modulation and the output projection start at zero, so each block starts as the identity."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.token_dim,
        pooled_projection_dim=cfg.clip_hidden,
        guidance_embeds=False,
        axes_dims_rope=cfg.axes_dims_rope,
    )
    # FluxTransformer2DModel has no sample size (FluxPipeline defaults to 128 latents, 1024 px with
    # FLUX's VAE): record the toy's 8x8 latents so slimdiff's FLUX adapter serves it at 32x32
    # (diffusers keeps the extra key in the loaded config, with a warning that it is unused)
    model.register_to_config(sample_size=LATENT_SIZE)
    with torch.no_grad():
        zero = [model.norm_out.linear, model.proj_out]
        zero += [m for b in model.transformer_blocks for m in (b.norm1.linear, b.norm1_context.linear)]
        zero += [b.norm.linear for b in model.single_transformer_blocks]
        for layer in zero:
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def build_scheduler(cfg: ToyFluxConfig | None = None):
    """FLUX.1's scheduler: flow-matching Euler with the resolution-dependent exponential shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=BASE_SHIFT,
        max_shift=MAX_SHIFT,
        base_image_seq_len=BASE_IMAGE_SEQ_LEN,
        max_image_seq_len=MAX_IMAGE_SEQ_LEN,
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FluxPipeline's 2x2 patch packing."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def position_ids(text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids (16, 3), txt_ids (text_len, 3)) as FluxPipeline builds them."""
    from diffusers import FluxPipeline

    img = FluxPipeline._prepare_latent_image_ids(1, PACKED_SIZE, PACKED_SIZE, "cpu", torch.float32)
    return img, torch.zeros(text_len, 3)


def encode_prompt_ids(text_encoder, text_encoder_2, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxPipeline's ``encode_prompt`` from token ids (B, L), both encoders on the same ids (one
    shared tokenizer, ``max_sequence_length`` = L): (T5 last hidden states (B, L, D), CLIP pooled
    output (B, clip_hidden))."""
    pooled = text_encoder(ids, output_hidden_states=False).pooler_output
    states = text_encoder_2(ids, output_hidden_states=False)[0]
    return states, pooled


FLUX_BLOCK_UNITS = {"double": ("attn", "ff", "ff_context"), "single": ("attn", "proj_mlp", "proj_out")}


def flux_block_share(model) -> float:
    """Fraction of a FLUX transformer's parameters in its blocks' attention and FFNs: double blocks'
    ``attn`` (both streams' projections, q/k RMSNorms), ``ff``, ``ff_context``; single blocks' ``attn``,
    ``proj_mlp`` and ``proj_out`` (the shared output projection of attention and MLP). The rest: adaLN
    modulations, embedders, output layer."""
    doubles = list(getattr(model, "transformer_blocks", []))
    singles = list(getattr(model, "single_transformer_blocks", []))
    if not doubles and not singles:
        raise ValueError(f"{type(model).__name__} has no FLUX blocks")
    inside = sum(
        p.numel()
        for blocks, names in ((doubles, FLUX_BLOCK_UNITS["double"]), (singles, FLUX_BLOCK_UNITS["single"]))
        for b in blocks
        for name in names
        for p in getattr(b, name).parameters()
    )
    return inside / sum(p.numel() for p in model.parameters())


def flux_vae(vae, shift_factor: float, scaling_factor: float):
    """The toy VAE with FLUX's latent normalisation: ``z = (latent - shift_factor) * scaling_factor``
    (the pipeline decodes ``z / scaling_factor + shift_factor``; FLUX needs ``shift_factor`` set)."""
    vae.register_to_config(shift_factor=float(shift_factor), scaling_factor=float(scaling_factor))
    return vae


def assemble_pipeline(vae, text_encoder, text_encoder_2, tokenizer, transformer, scheduler):
    """A standard ``FluxPipeline`` (one tokenizer object for both encoders)."""
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        transformer=transformer,
    )


def load_pipeline(folder: str | Path, dtype: torch.dtype = torch.float32):
    """The toy ``FluxPipeline`` loaded offline from ``folder`` (fp16 on disk, ``dtype`` in memory)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(Path(folder), dtype=dtype, local_files_only=True)
    if any(getattr(c, "dtype", dtype) != dtype for c in pipe.components.values()):
        pipe.to(dtype)  # diffusers that ignore `dtype` load the stored fp16 as is
    pipe.set_progress_bar_config(disable=True)
    return pipe
