"""Tiny FLUX.2 models and a tiny ``Flux2KleinPipeline``, built from config (nothing downloaded),
random weights, fixed seeds.

* ``tiny_flux2_transformer``: a klein-shaped ``Flux2Transformer2DModel``: 2 double-stream
  (``Flux2TransformerBlock``) and 2 single-stream (``Flux2SingleTransformerBlock``) blocks, 2 heads
  x 16 (inner dim 32), SwiGLU FFNs of 3 x 32 = 96 neurons, RoPE on 4 axes (t, h, w, l) of 4
  coordinates each (klein: 4 x 32 = 128), no guidance embedding (klein's ``guidance_embeds=False``),
  4 latent channels packed in 2x2 patches (``in_channels`` 16; klein: 32 x 4 = 128), text width
  ``FLUX2_TEXT_DIM`` = 3 stacked text-encoder layers of width 8 (klein 4B: 3 x 2560).
* ``tiny_flux2_pipeline``: a real ``Flux2KleinPipeline`` (the simpler of the two FLUX.2 text-to-image
  pipelines: a Qwen3 text encoder, where ``Flux2Pipeline`` needs a Mistral-3 vision-language model
  and its processor). Its text encoder is a ``Qwen3ForCausalLM`` of width 8 with 27 layers, so the
  pipeline's default ``text_encoder_out_layers`` (9, 18, 27) exist and the pipeline runs with its
  defaults; the tokenizer is a word-level fast tokenizer with Qwen's chat markers and a small chat
  template (``apply_chat_template`` is what the pipeline calls), ``model_max_length``
  ``FLUX2_TEXT_LEN`` (32). The pipeline pads every prompt to ``max_sequence_length`` tokens (default
  512, whatever the tokenizer says): ``Flux2Adapter.pipeline_kwargs`` passes the tokenizer's 32,
  and direct callers pass ``max_sequence_length=FLUX2_TEXT_LEN``. One-level ``AutoencoderKLFlux2``
  (scale factor 1, 4 latent channels, its batch norm over the 16 patchified channels); callers pass
  ``height=width=FLUX2_HW`` (16 px: 8x8 = 64 image tokens; the default is 128 px). Default
  ``FlowMatchEulerDiscreteScheduler``; ``is_distilled=False``: true classifier-free guidance with the
  pipeline's own empty negative prompt when ``guidance_scale`` > 1 (two transformer calls per step).

Every call runs on the CPU in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from family_pipelines import WORDS

FLUX2_HW = 16  # px: VAE scale factor 1, 2x2 patches -> 8x8 = 64 image tokens
FLUX2_TEXT_LEN = 32  # the tokenizer's model_max_length: text tokens per prompt
FLUX2_LATENT_CHANNELS = 4
FLUX2_TEXT_HIDDEN = 8  # the text encoder's width
FLUX2_TEXT_DIM = 3 * FLUX2_TEXT_HIDDEN  # three stacked hidden-state layers = joint_attention_dim
#: a chat template of Qwen's form (the pipeline passes ``enable_thinking``, unused here)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_flux2_transformer(seed: int = 0, *, guidance_embeds: bool = False):
    """A klein-shaped Flux2Transformer2DModel (see the module docstring)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX2_LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX2_TEXT_DIM,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    ).eval()


def flux2_tokenizer(path: Path, max_len: int = FLUX2_TEXT_LEN):
    """A word-level fast tokenizer with Qwen's chat markers, "\\n" as a token and ``CHAT_TEMPLATE``,
    no BOS / EOS appended (as Qwen's), saved to ``path`` and reloaded."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]  # pad, chat markers, unk
    words = list(dict.fromkeys(["\n", "user", "assistant", *WORDS]))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]+"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_len,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def tiny_flux2_pipeline(tmp: Path, seed: int = 0):
    """A tiny ``Flux2KleinPipeline`` (see the module docstring); ``tmp`` holds the tokenizer."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = flux2_tokenizer(Path(tmp) / "tokenizer")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=FLUX2_TEXT_HIDDEN,
        intermediate_size=16,
        num_hidden_layers=27,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(config).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=FLUX2_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=FLUX2_HW,
    ).eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(seed),
    )
