"""A tiny Z-Image transformer and ``ZImagePipeline``, built from config (nothing downloaded), fixed seeds.

* ``tiny_zimage_transformer``: a ``ZImageTransformer2DModel`` of width 32, 2 heads x 16, one noise
  refiner block, one context refiner block and two main blocks (all ``ZImageTransformerBlock``),
  per-head RMSNorm on q / k, RoPE axes (4, 6, 6) over (caption index, row, column) (Z-Image:
  32 + 48 + 48 = 128), SwiGLU FFN of int(32 / 3 * 8) = 85 neurons, captions of width 16.
* ``tiny_zimage_pipeline``: a real ``ZImagePipeline`` around it: a two-layer ``Qwen3Model``
  text encoder (hidden size 16; the pipeline takes its second-to-last hidden state), a word-level
  tokenizer with a Qwen-style chat template (``family_pipelines.qwen_tokenizer`` plus a template:
  the pipeline wraps each prompt with ``apply_chat_template``), a one-level ``AutoencoderKL``
  (16 latent channels as Z-Image's VAE, scale factor 1, with a shift and a scaling factor) and a
  default ``FlowMatchEulerDiscreteScheduler``. The pipeline pads every prompt to
  ``max_sequence_length`` (default 512) tokens for the text encoder and hands the transformer only
  the real ones (one tensor per prompt); the transformer itself pads each caption and each image to
  a multiple of 32 tokens with learned pad tokens and a batch to its longest sequence. Call it with
  ``height=width=ZIMAGE_HW`` (16 px: 16x16 latents, 8x8 = 64 image tokens); the default is 1024 px.
  Its ``guidance_scale`` s > 0 runs classifier-free guidance as pos + s (pos - neg) (two branches).
"""

from __future__ import annotations

from pathlib import Path

import torch
from family_pipelines import qwen_tokenizer, tiny_vae

ZIMAGE_HW = 16  # px = latent px (one-level VAE): 16x16 latents -> 8x8 = 64 image tokens
ZIMAGE_TEXT_DIM = 16  # the text encoder's hidden size = the transformer's cap_feat_dim
ZIMAGE_LATENT_CHANNELS = 16  # as Z-Image's VAE
#: Qwen3's chat template reduced to what ZImagePipeline uses (one user message, generation prompt)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_zimage_transformer(seed: int = 0, cap_feat_dim: int = ZIMAGE_TEXT_DIM, **config):
    """A Z-Image-shaped ZImageTransformer2DModel (see the module docstring); ``config`` overrides."""
    from diffusers import ZImageTransformer2DModel

    kwargs = dict(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=ZIMAGE_LATENT_CHANNELS,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=cap_feat_dim,
        rope_theta=256.0,
        axes_dims=[4, 6, 6],  # sums to the head dim
        axes_lens=[1024, 128, 128],  # caption index up to 1023; up to 128 x 128 patches
    )
    kwargs.update(config)
    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**kwargs).eval()
    with torch.no_grad():  # the pad tokens are zeros at init: make them tokens of their own
        gen = torch.Generator().manual_seed(seed + 1)
        model.x_pad_token.copy_(torch.randn(model.x_pad_token.shape, generator=gen))
        model.cap_pad_token.copy_(torch.randn(model.cap_pad_token.shape, generator=gen))
    return model


def zimage_tokenizer(path: Path):
    """``qwen_tokenizer`` with the chat template, saved to ``path`` and reloaded."""
    from transformers import PreTrainedTokenizerFast

    tok = qwen_tokenizer(Path(path), max_len=512)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def tiny_zimage_pipeline(tmp: Path, seed: int = 0):
    """A tiny ``ZImagePipeline`` (see the module docstring); ``tmp`` holds the tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = zimage_tokenizer(Path(tmp) / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=ZIMAGE_TEXT_DIM,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    vae = tiny_vae(
        1,
        seed,
        latent_channels=ZIMAGE_LATENT_CHANNELS,
        shift_factor=0.1159,  # Z-Image's VAE (FLUX's): the pipeline decodes latents / scaling + shift
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_zimage_transformer(seed),
    )
