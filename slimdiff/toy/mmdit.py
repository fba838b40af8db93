"""Configs and builders of the toy MMDiT pipeline (SD3 / SD3.5 architecture, built from config).

The toy MMDiT world goes through exactly the code path a real SD3.5 takes: a diffusers
``StableDiffusion3Pipeline`` with an ``SD3Transformer2DModel`` (joint attention, per-head RMSNorm on q
and k, SD3.5-style dual-attention blocks, the last block ``context_pre_only``, GELU(tanh) FFNs for both
streams), two ``CLIPTextModelWithProjection`` encoders (the CLIP-L / CLIP-G stand-ins; no T5:
``text_encoder_3=None``), the UNet toy world's VAE and word-level tokenizer, and a
``FlowMatchEulerDiscreteScheduler``.

How the pipeline builds the transformer's text input without T5 (diffusers
``StableDiffusion3Pipeline.encode_prompt``): each CLIP's penultimate hidden states (``hidden_states[-2]``,
all ``max_length`` tokens) are concatenated on the feature axis and zero-padded to
``joint_attention_dim``; ``max_sequence_length`` (default 256) all-zero "T5" tokens are appended on the
sequence axis. The pooled embedding is the two CLIPs' projected EOS states concatenated
(``pooled_projection_dim``). :func:`encode_prompt_ids` reproduces that for training.

The 256 zero tokens are identical at every layer (no positional embedding on the text stream, every
text-stream operation is per token), so in joint attention they act as one key/value with weight 256:
training replaces them by one zero token whose attention logit gets ``+log(256)``
(:class:`RepeatedTokenJointAttnProcessor`), the same function of the weights at 1/16 of the text
tokens. Sampling always goes through the unmodified pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slimdiff.toy.data import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, toy_vocabulary

LATENT_SIZE = 8  # the toy VAE maps 32x32x3 to 8x8x4
LATENT_CHANNELS = 4


@dataclass
class ToyMMDiTConfig:
    """Architecture of the toy MMDiT pipeline. Defaults are the committed model's."""

    max_length: int = 16  # the UNet toy world's tokenizer (both CLIPs): text position embeddings
    text_hidden: tuple[int, int] = (64, 128)  # widths of the CLIP-L / CLIP-G stand-ins (= projection dims)
    text_layers: int = 2
    text_heads: tuple[int, int] = (2, 4)
    text_mlp_ratio: int = 2
    joint_attention_dim: int = 256  # > sum(text_hidden): the concatenated CLIP states are zero-padded
    num_layers: int = 6  # the last one context_pre_only (SD3Transformer2DModel makes it so)
    num_heads: int = 4
    head_dim: int = 32
    dual_attention_layers: tuple[int, ...] = (0, 1, 2)  # SD3.5-medium: the first 13 of 24
    patch_size: int = 2
    t5_tokens: int = 256  # the pipeline's default max_sequence_length: that many zero "T5" tokens
    scheduler_shift: float = 1.0  # FlowMatchEulerDiscreteScheduler shift (SD3 uses 3.0 at 1024 px)

    def __post_init__(self) -> None:
        self.text_hidden = tuple(int(h) for h in self.text_hidden)
        self.text_heads = tuple(int(h) for h in self.text_heads)
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        if len(self.text_hidden) != 2 or len(self.text_heads) != 2:
            raise ValueError("text_hidden and text_heads need two entries (text_encoder, text_encoder_2)")
        for h, n in zip(self.text_hidden, self.text_heads, strict=True):
            if h % n:
                raise ValueError(f"text width {h} must divide by its head count {n}")
        if sum(self.text_hidden) > self.joint_attention_dim:
            raise ValueError(
                f"joint_attention_dim={self.joint_attention_dim} is below the concatenated CLIP width "
                f"{sum(self.text_hidden)}: the pipeline pads the CLIP states up to it, it cannot cut them"
            )
        if self.num_layers < 2:
            raise ValueError(
                "num_layers must be >= 2 (a full joint block and the context_pre_only last block)"
            )
        if not self.dual_attention_layers or not all(
            0 <= i < self.num_layers for i in self.dual_attention_layers
        ):
            raise ValueError(
                f"dual_attention_layers={self.dual_attention_layers}: give at least one block index in "
                f"0..{self.num_layers - 1}"
            )
        if LATENT_SIZE % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide the latent size {LATENT_SIZE}")
        if self.t5_tokens < 1:
            raise ValueError("t5_tokens must be >= 1 (the pipeline's max_sequence_length)")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def pooled_projection_dim(self) -> int:
        return sum(self.text_hidden)


def build_text_encoders(cfg: ToyMMDiTConfig, seed: int = 0):
    """Two ``CLIPTextModelWithProjection`` (projection_dim = hidden size, as SD3's CLIP-L / CLIP-G)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab = toy_vocabulary()
    encoders = []
    for k, (hidden, heads) in enumerate(zip(cfg.text_hidden, cfg.text_heads, strict=True)):
        torch.manual_seed(seed + k)
        config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=cfg.text_mlp_ratio * hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=heads,
            max_position_embeddings=cfg.max_length,
            hidden_act="gelu",
            bos_token_id=vocab.index(BOS_TOKEN),
            eos_token_id=vocab.index(EOS_TOKEN),
            pad_token_id=vocab.index(PAD_TOKEN),
            projection_dim=hidden,
        )
        encoders.append(CLIPTextModelWithProjection(config))
    return encoders[0], encoders[1]


def build_transformer(cfg: ToyMMDiTConfig, seed: int = 0):
    """``SD3Transformer2DModel`` on 8x8x4 latents, adaLN-Zero initialised (DiT): every modulation and
    the output projection start at zero, so each block starts as the identity."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=cfg.patch_size,
        in_channels=LATENT_CHANNELS,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        caption_projection_dim=cfg.inner_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=LATENT_SIZE // cfg.patch_size,
        dual_attention_layers=cfg.dual_attention_layers,
        qk_norm="rms_norm",
    )
    with torch.no_grad():
        zero = [model.norm_out.linear, model.proj_out]
        for block in model.transformer_blocks:
            zero += [block.norm1.linear, block.norm1_context.linear]
        for layer in zero:
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def build_scheduler(cfg: ToyMMDiTConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.scheduler_shift)


def sd3_vae(vae, shift_factor: float, scaling_factor: float):
    """The toy VAE with SD3's latent normalisation: ``z = (latent - shift_factor) * scaling_factor``
    (the pipeline decodes ``z / scaling_factor + shift_factor``; SD3 needs ``shift_factor`` set)."""
    vae.register_to_config(shift_factor=float(shift_factor), scaling_factor=float(scaling_factor))
    return vae


def encode_prompt_ids(text_encoder, text_encoder_2, ids: torch.Tensor, joint_attention_dim: int):
    """The pipeline's CLIP part of ``encode_prompt`` from token ids (B, L), both encoders on the same
    ids (one shared tokenizer): (CLIP states zero-padded to ``joint_attention_dim`` (B, L, D),
    pooled (B, pooled_projection_dim)). The zero T5 tokens are not appended here."""
    states, pooled = [], []
    for encoder in (text_encoder, text_encoder_2):
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])  # clip_skip=None: the penultimate layer, as the pipeline
        pooled.append(out.text_embeds)
    clip_states = torch.cat(states, dim=-1)
    clip_states = F.pad(clip_states, (0, joint_attention_dim - clip_states.shape[-1]))
    return clip_states, torch.cat(pooled, dim=-1)


class RepeatedTokenJointAttnProcessor:
    """Joint attention (diffusers ``JointAttnProcessor2_0``) where the last text token stands for
    ``count`` identical copies of itself: its attention logit gets ``+log(count)`` for every query.

    Exactly the function the pipeline computes with ``count`` identical (zero) T5 tokens, since
    identical tokens have identical keys and values at every layer; the copies' own outputs are
    identical too (and unused after the last block). Training only: sampling uses the stock processor.
    """

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"count={count} must be >= 1")
        self.log_count = math.log(count)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("RepeatedTokenJointAttnProcessor is for joint attention (attn), not attn2")
        batch, n_image = hidden_states.shape[:2]

        def heads(x):  # (B, N, H*D) -> (B, H, N, D)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        c_query = heads(attn.add_q_proj(encoder_hidden_states))
        c_key = heads(attn.add_k_proj(encoder_hidden_states))
        c_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            c_query = attn.norm_added_q(c_query)
        if attn.norm_added_k is not None:
            c_key = attn.norm_added_k(c_key)
        query = torch.cat([query, c_query], dim=2)
        key = torch.cat([key, c_key], dim=2)
        value = torch.cat([value, c_value], dim=2)
        bias = torch.zeros(1, 1, 1, key.shape[2], dtype=query.dtype, device=query.device)
        bias[..., -1] = self.log_count
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False
        )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        out, c_out = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            c_out = attn.to_add_out(c_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, c_out


def set_repeated_token_attention(transformer, count: int | None) -> None:
    """Install :class:`RepeatedTokenJointAttnProcessor` on every block's joint attention (``count``),
    or restore the stock ``JointAttnProcessor2_0`` (``count=None``). ``attn2`` is never touched."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    for block in transformer.transformer_blocks:
        block.attn.set_processor(
            JointAttnProcessor2_0() if count is None else RepeatedTokenJointAttnProcessor(count)
        )


def with_t5_token(clip_states: torch.Tensor) -> torch.Tensor:
    """Append the one zero token that stands for the T5 zeros (use with the repeated-token processor)."""
    return torch.cat(
        [clip_states, clip_states.new_zeros(clip_states.shape[0], 1, clip_states.shape[-1])], dim=1
    )


def assemble_pipeline(vae, text_encoder, text_encoder_2, tokenizer, transformer, scheduler):
    """A standard ``StableDiffusion3Pipeline`` without T5 (one tokenizer object for both CLIPs)."""
    from diffusers import StableDiffusion3Pipeline

    set_repeated_token_attention(transformer, None)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def load_pipeline(folder: str | Path, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        Path(folder), dtype=dtype, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    if any(getattr(c, "dtype", dtype) != dtype for c in pipe.components.values()):
        pipe.to(dtype)  # diffusers that ignore `dtype` load the stored fp16 as is
    pipe.set_progress_bar_config(disable=True)
    return pipe
