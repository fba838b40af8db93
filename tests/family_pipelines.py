"""Tiny pipelines of the non-SD-1.x families, built from config (nothing downloaded), fixed seeds.

* ``tiny_sdxl_pipeline``: a real ``StableDiffusionXLPipeline``. Its UNet is SDXL-shaped
  (``addition_embed_type="text_time"``: pooled text embeddings + six time ids, two transformer
  layers per block, ``use_linear_projection``, a DownBlock2D first as in SDXL), its context width
  is the sum of the two text encoders' hidden sizes (16 + 32 = 48; SDXL: 768 + 1280 = 2048) and
  ``projection_class_embeddings_input_dim`` = 6 x addition_time_embed_dim + text_encoder_2's
  projection_dim (6 x 8 + 16 = 64; SDXL: 6 x 256 + 1280 = 2816), which the pipeline checks.
  One-level VAE (scale factor 1): 8x8 latents = 8x8 px images.
* ``tiny_pixart_pipeline``: a real ``PixArtSigmaPipeline``: a two-layer PixArtTransformer2DModel
  (adaLN-single, GELU-tanh FFN, learned sigma) and a one-layer T5 encoder. The pipeline pads every
  prompt to ``max_sequence_length`` (default 300, the tokenizer's model_max_length here) T5
  tokens and marks the padding in the attention mask. Resolution binning
  (``use_resolution_binning=True``, the default) only knows transformer sample sizes 32 / 64 / 128
  / 256: sample_size 32 with a four-level VAE (scale factor 8) makes the default 256 px, which
  the 256-px bin table maps to itself: 32x32 latents, 16x16 = 256 image tokens in 2x2 patches.
  ``clean_caption=True`` (the default) needs bs4 and ftfy; without them the pipeline warns and
  lower-cases the prompt instead, so callers may leave it (``collect_stats`` does).
* ``tiny_flux_pipeline``: a real ``FluxPipeline``: a FluxTransformer2DModel with 2 double-stream
  (FluxTransformerBlock) and 2 single-stream (FluxSingleTransformerBlock) blocks, 2 heads x 16,
  RoPE axes (4, 6, 6), no guidance embedding (FLUX.1-schnell-like: ``guidance_scale`` is ignored,
  only ``true_cfg_scale`` > 1 with a negative prompt runs CFG), a CLIPTextModel whose *pooled*
  output (hidden size 16 = ``pooled_projection_dim``) conditions the timestep embedding, and a
  one-layer T5 encoder whose states (d_model 24 = ``joint_attention_dim``) are the text tokens.
  The pipeline pads every prompt to ``max_sequence_length`` T5 tokens (default 512, whatever
  tokenizer_2's model_max_length): callers pass ``max_sequence_length=FLUX_TEXT_LEN`` (32, the
  tokenizer's model_max_length here); the default still runs, with 512 text tokens. 16 latent
  channels as in FLUX's VAE, packed in 2x2 patches (transformer in_channels 64); one-level VAE
  (scale factor 1) with FLUX's ``shift_factor`` / ``scaling_factor``. Height and width must be
  multiples of 2 x the VAE scale factor; the pipeline's default, ``128 x vae_scale_factor`` px
  (a hard-coded ``default_sample_size``, not in any config), is always 64 x 64 = 4096 packed
  tokens: it runs (about 0.6 s a call) but callers pass ``height=width=FLUX_HW`` (16 px: 16x16
  latents, 8x8 = 64 image tokens). The scheduler is a default FlowMatchEulerDiscreteScheduler
  (no dynamic shifting, shift 1: the ``mu`` the pipeline computes is then unused; FLUX.1-dev's
  has ``use_dynamic_shifting=True``).

All tokenizers are word-level ``PreTrainedTokenizerFast`` objects saved to ``tmp`` and reloaded
(as ``make_tiny_pipeline`` in test_calib_collector.py does), so the pipelines save and load with
``save_pretrained`` / ``from_pretrained`` like real ones. Every pipeline runs with
``output_type="latent"`` and ``"np"`` on the CPU in well under a second per call.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    *("a", "an", "the", "photo", "of", "cat", "dog", "on", "red", "blue", "green", "table"),
    *("bench", "street", "car", "tree", "man", "woman", "with", "and", "in"),
]
PROMPTS = [
    "a photo of a cat",
    "red car on the street",
    "a dog on a bench",
    "man with a tree",
    "blue table",
    "woman",
]


def word_tokenizer(
    path: Path, max_len: int, specials: list[str], *, bos: str | None, eos: str, pad: str, unk: str
):
    """A whitespace word-level fast tokenizer over ``specials + WORDS``, saved to ``path`` and
    reloaded (ids: specials first, in order). ``bos`` None: only ``eos`` is appended (T5)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = f"{bos} $A {eos}" if bos else f"$A {eos}"
    used = [t for t in (bos, eos) if t]
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in used]
    )
    kwargs = {"bos_token": bos} if bos else {}
    PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_len, pad_token=pad, unk_token=unk, eos_token=eos, **kwargs
    ).save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def tiny_vae(levels: int, seed: int, *, latent_channels: int = 4, **config):
    """A tiny AutoencoderKL, scale factor 2 ** (levels - 1); ``config`` overrides (FLUX: a
    ``shift_factor``, its ``scaling_factor``, no quant convs)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=8 * 2 ** (levels - 1),
        **config,
    ).eval()


# -- SDXL ------------------------------------------------------------------------------------------
SDXL_TEXT_LEN = 12  # both CLIP tokenizers' model_max_length (77 in SDXL)


def tiny_sdxl_unet(seed: int = 0, cross_attention_dim: int = 48, pooled_dim: int = 16):
    """A 2-level SDXL-shaped UNet2DConditionModel: DownBlock2D then a cross-attention block, two
    transformer layers per block (mid block included), text_time added conditioning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2,
        attention_head_dim=(2, 4),  # heads per level, as in SDXL's (5, 10, 20)
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + pooled_dim,
        norm_num_groups=8,
    ).eval()


def tiny_sdxl_pipeline(tmp: Path, seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` (see the module docstring); ``tmp`` holds the tokenizers."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tmp = Path(tmp)
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    special_kw = dict(bos="<bos>", eos="<eos>", unk="<unk>")
    tokenizer = word_tokenizer(tmp / "tokenizer", SDXL_TEXT_LEN, specials, pad="<pad>", **special_kw)
    tokenizer_2 = word_tokenizer(tmp / "tokenizer_2", SDXL_TEXT_LEN, specials, pad="<pad>", **special_kw)
    common = dict(
        vocab_size=len(specials) + len(WORDS),
        num_attention_heads=2,
        max_position_embeddings=SDXL_TEXT_LEN,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, **common)
    ).eval()
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, projection_dim=16, **common)
    ).eval()
    unet = tiny_sdxl_unet(seed, cross_attention_dim=16 + 32, pooled_dim=16)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(1, seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


# -- PixArt-Sigma ----------------------------------------------------------------------------------
PIXART_TEXT_LEN = 300  # the pipeline's max_sequence_length default: every prompt is padded to it
PIXART_T5_DIM = 16


def tiny_pixart_transformer(seed: int = 0, caption_channels: int = PIXART_T5_DIM):
    """A 2-layer PixArt-Sigma-shaped PixArtTransformer2DModel at sample_size 32 (the smallest the
    pipeline's resolution binning knows), 2 heads x 8."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma: the pipeline keeps the first 4 channels
        num_layers=2,
        cross_attention_dim=16,
        sample_size=32,
        patch_size=2,
        caption_channels=caption_channels,
        use_additional_conditions=False,
    ).eval()


def tiny_pixart_pipeline(tmp: Path, seed: int = 0):
    """A tiny ``PixArtSigmaPipeline`` (see the module docstring); ``tmp`` holds the tokenizer."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    tmp = Path(tmp)
    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
    tokenizer = word_tokenizer(
        tmp / "tokenizer", PIXART_TEXT_LEN, specials, bos=None, eos="</s>", pad="<pad>", unk="<unk>"
    )
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(specials) + len(WORDS),
            d_model=PIXART_T5_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1 / Flan-T5, as PixArt's T5-XXL
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_vae(4, seed),
        transformer=tiny_pixart_transformer(seed),
        scheduler=DPMSolverMultistepScheduler(),
    )


# -- FLUX ------------------------------------------------------------------------------------------
FLUX_HW = 16  # px = latent px (one-level VAE): 16x16 latents -> 8x8 = 64 packed image tokens
FLUX_TEXT_LEN = 32  # tokenizer_2's model_max_length; pass it as max_sequence_length (default 512)
FLUX_CLIP_LEN = 77  # the CLIP tokenizer's model_max_length (only its pooled output is used)
FLUX_CLIP_DIM = 16  # CLIP hidden size = the transformer's pooled_projection_dim
FLUX_T5_DIM = 24  # T5 d_model = the transformer's joint_attention_dim
FLUX_LATENT_CHANNELS = 16  # as FLUX's VAE


def tiny_flux_transformer(
    seed: int = 0, joint_attention_dim: int = FLUX_T5_DIM, pooled_projection_dim: int = FLUX_CLIP_DIM
):
    """A FLUX-shaped FluxTransformer2DModel: 2 double- + 2 single-stream blocks, 2 heads x 16
    (inner dim 32), RoPE over (index, h, w) with axes (4, 6, 6), no guidance embedding."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX_LATENT_CHANNELS,  # the pipeline packs 2x2 latent patches
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim (FLUX: 16 + 56 + 56 = 128)
    ).eval()


def tiny_flux_pipeline(tmp: Path, seed: int = 0):
    """A tiny ``FluxPipeline`` (see the module docstring); ``tmp`` holds the tokenizers. Call it with
    ``height=FLUX_HW, width=FLUX_HW, max_sequence_length=FLUX_TEXT_LEN``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tmp = Path(tmp)
    clip_specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    tokenizer = word_tokenizer(
        tmp / "tokenizer", FLUX_CLIP_LEN, clip_specials, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>"
    )
    t5_specials = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
    tokenizer_2 = word_tokenizer(
        tmp / "tokenizer_2", FLUX_TEXT_LEN, t5_specials, bos=None, eos="</s>", pad="<pad>", unk="<unk>"
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_specials) + len(WORDS),
            hidden_size=FLUX_CLIP_DIM,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=FLUX_CLIP_LEN,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,  # pooled output: the state at the first <eos>
        )
    ).eval()
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_specials) + len(WORDS),
            d_model=FLUX_T5_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    vae = tiny_vae(
        1,
        seed,
        latent_channels=FLUX_LATENT_CHANNELS,
        shift_factor=0.1159,  # FLUX's VAE; the pipeline decodes latents / scaling + shift
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=tiny_flux_transformer(seed),
    )


# -- Qwen-Image ------------------------------------------------------------------------------------
QWEN_HW = 32  # px: latents 1/2 of it (VAE scale factor 2), packed in 2x2 patches -> 8x8 = 64 image tokens
QWEN_TEXT_DIM = 16  # the text encoder's hidden size = the transformer's joint_attention_dim
QWEN_TOKENIZER_LEN = 128  # the tokenizer's model_max_length (the pipeline passes max_length itself)
QWEN_LATENT_CHANNELS = 16  # as Qwen-Image's VAE (z_dim)
#: the words of QwenImagePipeline's prompt template; with "\n" as a token its prefix (system message
#: and "<|im_start|>user\n") is 34 tokens, the pipeline's ``prompt_template_encode_start_idx``,
#: as with the real Qwen2 tokenizer, and 5 template tokens follow the prompt
QWEN_TEMPLATE_WORDS = [
    *("system", "Describe", "the", "image", "by", "detailing", "color", ",", "shape", "size"),
    *("texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and"),
    *("background", ":", "user", "assistant"),
]


def qwen_tokenizer(path: Path, max_len: int = QWEN_TOKENIZER_LEN):
    """A word-level fast tokenizer with Qwen2's chat special tokens and "\\n" as a token (the
    template's newlines), no BOS / EOS appended (as Qwen2's), saved to ``path`` and reloaded."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]  # pad, chat markers, unk
    words = list(dict.fromkeys(["\n", *QWEN_TEMPLATE_WORDS, *WORDS]))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]+"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_len,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
    ).save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def tiny_qwenimage_transformer(seed: int = 0, joint_attention_dim: int = QWEN_TEXT_DIM):
    """A Qwen-Image-shaped QwenImageTransformer2DModel: 2 double-stream blocks, 2 heads x 16 (inner
    dim 32), RoPE axes (4, 6, 6) (Qwen-Image: 16 + 56 + 56 = 128), 2x2 packed 16-channel latents."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * QWEN_LATENT_CHANNELS,
        out_channels=QWEN_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_qwenimage_pipeline(tmp: Path, seed: int = 0):
    """A tiny ``QwenImagePipeline``: a one-layer Qwen2.5-VL text encoder (``Qwen2_5_VLForConditional
    Generation`` from config, hidden size 16 = joint_attention_dim; its one-block vision tower is
    never called for text prompts), the tokenizer of ``qwen_tokenizer``, a one-level
    AutoencoderKLQwenImage (16 latent channels, scale factor 2) and ``tiny_qwenimage_transformer``.
    The pipeline wraps each prompt in its chat template, drops the template's first 34 tokens and
    pads a batch to its longest prompt, passing ``encoder_hidden_states_mask`` when a batch has
    padding. Call it with ``height=width=QWEN_HW`` (the default is 128 x scale factor = 256 px).
    ``tmp`` holds the tokenizer."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer(Path(tmp) / "tokenizer")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=QWEN_TEXT_DIM,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=QWEN_TEXT_DIM,
            patch_size=2,
            spatial_merge_size=1,
            temporal_patch_size=1,
            window_size=4,
            fullatt_block_indexes=[0],
        ),
    )
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=QWEN_LATENT_CHANNELS, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False]
    ).eval()
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_qwenimage_transformer(seed),
    )
