"""Configs and builders of the toy SD-architecture pipeline (built from config, never downloaded).

The toy model must go through exactly the code path a real SD v1.5 takes, so it is made of the same
diffusers/transformers classes: ``AutoencoderKL`` (32x32x3 -> 8x8x4 latents), ``CLIPTextModel`` with a
word-level tokenizer saved as ``PreTrainedTokenizerFast`` (loads offline with ``from_pretrained``;
transformers 5 silently ignores ``CLIPTokenizer(vocab_file=...)``), ``UNet2DConditionModel`` with
cross-attention transformer blocks (GEGLU FFN, several heads, ``cross_attention_dim`` different from
every block width so that attn2 key/value inputs differ from query inputs, 2 transformer layers per
block) and a DDIM scheduler with SD's beta schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimdiff.toy.data import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, toy_vocabulary


@dataclass
class ToyModelConfig:
    """Architecture of the toy pipeline. Defaults are the committed model's."""

    max_length: int = 16  # tokenizer model_max_length = text position embeddings (longest caption: 12)
    text_hidden: int = 128  # CLIP text width = UNet cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 levels: 32x32 -> 8x8 (vae_scale_factor 4)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 96)  # block widths at 8x8 and 4x4 latents
    unet_heads: int = 4  # diffusers' attention_head_dim means heads in SD 1.x configs
    unet_layers_per_block: int = 1
    unet_transformer_layers: int = 2
    norm_num_groups: int = 16
    scheduler: dict = field(
        default_factory=lambda: {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "prediction_type": "epsilon",
        }
    )

    def __post_init__(self) -> None:
        if self.text_hidden in self.unet_channels:
            raise ValueError(
                f"text_hidden={self.text_hidden} equals a UNet block width {self.unet_channels}: the toy model "
                "needs cross_attention_dim different from block widths (attn2 kv_in != query_in)"
            )
        for width in self.unet_channels:
            if width % self.unet_heads or width % self.norm_num_groups:
                raise ValueError(
                    f"unet_channels={self.unet_channels}: every width must divide by unet_heads="
                    f"{self.unet_heads} and norm_num_groups={self.norm_num_groups}"
                )
        if self.text_hidden % self.text_heads:
            raise ValueError(f"text_hidden={self.text_hidden} must divide by text_heads={self.text_heads}")
        if self.unet_transformer_layers < 1:
            raise ValueError("unet_transformer_layers must be >= 1 (the toy model needs transformer blocks)")


def build_tokenizer(cfg: ToyModelConfig):
    """A word-level tokenizer wrapped in ``PreTrainedTokenizerFast`` (``<bos> words <eos>``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(toy_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=cfg.max_length,
        padding_side="right",
    )


def build_text_encoder(cfg: ToyModelConfig, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = toy_vocabulary()
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        hidden_act="gelu",
        bos_token_id=vocab.index(BOS_TOKEN),
        eos_token_id=vocab.index(EOS_TOKEN),
        pad_token_id=vocab.index(PAD_TOKEN),
        projection_dim=cfg.text_hidden,
    )
    return CLIPTextModel(config)


def build_vae(cfg: ToyModelConfig, seed: int = 0, scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=32,
        scaling_factor=scaling_factor,
    )


def build_unet(cfg: ToyModelConfig, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=32 // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        layers_per_block=cfg.unet_layers_per_block,
        block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,
        transformer_layers_per_block=cfg.unet_transformer_layers,
        norm_num_groups=cfg.norm_num_groups,
    )


def build_scheduler(cfg: ToyModelConfig):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**cfg.scheduler)


def build_training_scheduler(cfg: ToyModelConfig):
    """DDPM noise schedule with the same betas as the sampler (adds noise during training)."""
    from diffusers import DDPMScheduler

    keys = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "clip_sample",
        "prediction_type",
    )
    return DDPMScheduler(**{k: cfg.scheduler[k] for k in keys})


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A standard ``StableDiffusionPipeline`` (no safety checker, no feature extractor)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline_fp16(pipe, out_dir: str | Path) -> Path:
    """Save with fp16 safetensors (small to commit); callers load it back in fp32 (fast on CPU)."""
    out_dir = Path(out_dir)
    pipe.to(torch.float16)
    try:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    finally:
        pipe.to(torch.float32)
    return out_dir


def transformer_share(model) -> float:
    """Fraction of the denoiser's parameters inside the modules SlimDiff compresses (every unit's
    attention and feed-forward module, norms and biases included). An MMDiT is counted directly over
    its joint blocks (:func:`joint_block_share`), a FLUX transformer over its double and single blocks
    (:func:`slimdiff.toy.flux.flux_block_share`: the single blocks' ``proj_out`` included)."""
    if _joint_blocks(model):
        return joint_block_share(model)
    if type(model).__name__ == "FluxTransformer2DModel":
        from slimdiff.toy.flux import flux_block_share

        return flux_block_share(model)
    from slimdiff.families.units import compression_units, count_parameters

    modules = {}
    for u in compression_units(model).values():
        path = u.layout.module if u.kind != "ffn" else u.layout.proj_in.rsplit(".net.", 1)[0]
        modules[path] = model.get_submodule(path)
    return sum(count_parameters(m) for m in modules.values()) / count_parameters(model)


# a JointTransformerBlock's compressible modules (attn2: dual-attention blocks only; ff_context: all
# but the context_pre_only last block)
JOINT_BLOCK_UNITS = ("attn", "attn2", "ff", "ff_context")


def _joint_blocks(model) -> list:
    from diffusers.models.attention import JointTransformerBlock

    return [m for m in model.modules() if isinstance(m, JointTransformerBlock)]


def joint_block_share(model) -> float:
    """Fraction of an MMDiT's parameters in its ``JointTransformerBlock`` s' joint attention ``attn``,
    dual attention ``attn2`` and the two streams' FFNs ``ff`` / ``ff_context`` (q/k RMSNorms and biases
    included; the adaLN modulations, embedders and output layers are the rest)."""
    blocks = _joint_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no JointTransformerBlock")
    inside = sum(
        p.numel()
        for b in blocks
        for name in JOINT_BLOCK_UNITS
        if getattr(b, name, None) is not None
        for p in getattr(b, name).parameters()
    )
    return inside / sum(p.numel() for p in model.parameters())
