"""A tiny Wan 2.1 text-to-video pipeline, built from config (nothing downloaded), fixed seeds.

* ``tiny_wan_transformer``: a ``WanTransformer3DModel`` with 2 ``WanTransformerBlock``s, 2 heads x
  16 (inner dim 32; Wan 2.1: 12 or 40 heads x 128), patches (1, 2, 2) as Wan, 16 latent channels,
  FFN 64 wide, ``cross_attn_norm`` as Wan 2.1. The RoPE axes follow from d_h = 16: frame 8, row
  4, column 4 coordinates (4 + 2 + 2 pairs). Every q/k RMSNorm gain (``torch.nn.RMSNorm(32)``,
  across heads) is drawn from 1 + 0.3 N(0, 1) (diffusers initialises them at 1; trained models
  are not), so the norm corrections are tested with non-trivial gains.
* ``tiny_wan_pipeline``: a real ``WanPipeline``: a one-layer UMT5 encoder (d_model 16 = the
  transformer's ``text_dim``), a word-level tokenizer with T5's special tokens
  (``family_pipelines.word_tokenizer``), a tiny ``AutoencoderKLWan`` with Wan's 8x spatial and 4x
  temporal compression (three downsampling levels, base width 3) and a default
  ``FlowMatchEulerDiscreteScheduler``. The pipeline pads every prompt to ``max_sequence_length``
  (512) tokens and zeroes the padded embeddings. Call it with ``height=width=WAN_HW`` (32 px:
  4x4 latents, 2x2 = 4 patches per latent frame) and a few frames (17 frames: 5 latent frames),
  ``output_type="latent"``.
* ``tiny_wan22_pipeline``: the same with a ``transformer_2`` and a ``boundary_ratio`` (Wan 2.2
  A14B's layout: two denoisers on disjoint timestep ranges).
"""

from __future__ import annotations

from pathlib import Path

import torch
from family_pipelines import WORDS, word_tokenizer

WAN_HW = 32  # px; latents 4x4 (8x VAE), 2x2 patches -> 4 tokens per latent frame
WAN_TEXT_DIM = 16  # UMT5 d_model = the transformer's text_dim
WAN_LATENT_CHANNELS = 16  # as Wan 2.1's VAE (z_dim)
WAN_TOKENIZER_LEN = 512  # the pipeline passes max_length=max_sequence_length itself


def tiny_wan_transformer(seed: int = 0, text_dim: int = WAN_TEXT_DIM, **config):
    """A Wan-2.1-shaped WanTransformer3DModel (see the module docstring); ``config`` overrides
    (``added_kv_proj_dim`` / ``image_dim`` make an I2V-shaped one)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=WAN_LATENT_CHANNELS,
        out_channels=WAN_LATENT_CHANNELS,
        text_dim=text_dim,
        freq_dim=16,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=64,  # >= 52 patch columns of the serving shape (832 px), where rope_angles reads phases
        **config,
    ).eval()
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.RMSNorm) and m.weight is not None:
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=gen))
    return model


def tiny_wan_pipeline(tmp: Path, seed: int = 0):
    """A tiny ``WanPipeline`` (see the module docstring); ``tmp`` holds the tokenizer."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
    tokenizer = word_tokenizer(
        Path(tmp) / "tokenizer", WAN_TOKENIZER_LEN, specials, bos=None, eos="</s>", pad="<pad>", unk="<unk>"
    )
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(specials) + len(WORDS),
            d_model=WAN_TEXT_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # UMT5-XXL, as Wan's text encoder
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=WAN_LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=tiny_wan_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def tiny_wan22_pipeline(tmp: Path, boundary_ratio: float | None = 0.6, transformer_2=None, seed: int = 0):
    """A tiny Wan 2.2 A14B-shaped ``WanPipeline``: ``tiny_wan_pipeline``'s components, its
    transformer for the high-noise steps (t >= boundary_ratio x 1000) and a second tiny transformer
    of other weights (seed + 7; or ``transformer_2``) for the low-noise ones."""
    from diffusers import WanPipeline

    base = tiny_wan_pipeline(tmp, seed)
    return WanPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        transformer=base.transformer,
        transformer_2=tiny_wan_transformer(seed + 7) if transformer_2 is None else transformer_2,
        scheduler=base.scheduler,
        boundary_ratio=boundary_ratio,
    )
