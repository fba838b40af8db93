"""A tiny LTX-Video text-to-video pipeline, built from config (nothing downloaded), fixed seeds.

* ``tiny_ltx_transformer``: an ``LTXVideoTransformer3DModel`` with 2 ``LTXVideoTransformerBlock``s,
  2 heads x 16 (inner dim 32; LTX-Video: 32 heads x 64), patch size 1 as LTX, 8 latent channels,
  T5 width 16. The rotary table spans both heads' 32 coordinates: 32 % 6 = 2 padding coordinates
  (one pair), then 5 frequencies x 3 axes = 15 pairs, so head 0 holds the padding pair and the
  slow frequencies, head 1 the fast ones. Every q/k RMSNorm gain (``torch.nn.RMSNorm(32)``, across
  heads) is drawn from 1 + 0.3 N(0, 1) (diffusers initialises them at 1; trained models are not),
  so the norm corrections are tested with non-trivial gains.
* ``tiny_ltx_pipeline``: a real ``LTXPipeline``: a one-layer T5 encoder (d_model 16 = the
  transformer's ``caption_channels``), a word-level tokenizer with T5's special tokens
  (``family_pipelines.word_tokenizer``), a tiny ``AutoencoderKLLTXVideo`` with LTX's 32x spatial
  (patch 4, three downsampling levels) and 8x temporal compression, width 8, and a default
  ``FlowMatchEulerDiscreteScheduler``. The pipeline pads every prompt to ``max_sequence_length``
  (128) tokens and passes the padding mask. Call it with ``height=width=LTX_HW`` (64 px: 2x2
  latents, 4 tokens per latent frame) and a few frames (17 frames: 3 latent frames),
  ``output_type="latent"``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from family_pipelines import WORDS, word_tokenizer

LTX_HW = 64  # px; latents 2x2 (32x VAE), patch 1 -> 4 tokens per latent frame
LTX_TEXT_DIM = 16  # T5 d_model = the transformer's caption_channels
LTX_LATENT_CHANNELS = 8
LTX_TOKENIZER_LEN = 128  # the pipeline passes max_length=max_sequence_length itself


def tiny_ltx_transformer(seed: int = 0, **config):
    """An LTX-Video-shaped LTXVideoTransformer3DModel (see the module docstring)."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=LTX_LATENT_CHANNELS,
        out_channels=LTX_LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=LTX_TEXT_DIM,
        **config,
    ).eval()
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.RMSNorm) and m.weight is not None:
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=gen))
    return model


def tiny_ltx_pipeline(tmp: Path, seed: int = 0):
    """A tiny ``LTXPipeline`` (see the module docstring); ``tmp`` holds the tokenizer."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from transformers import T5Config, T5EncoderModel

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
    tokenizer = word_tokenizer(
        Path(tmp) / "tokenizer", LTX_TOKENIZER_LEN, specials, bos=None, eos="</s>", pad="<pad>", unk="<unk>"
    )
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(specials) + len(WORDS),
            d_model=LTX_TEXT_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1 XXL, as LTX's text encoder
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        latent_channels=LTX_LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    return LTXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=tiny_ltx_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
