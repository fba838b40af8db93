"""PixArt-alpha / PixArt-Sigma: ``PixArtTransformer2DModel``, a DiT whose BasicTransformerBlocks use
adaLN-single (``norm_type="ada_norm_single"``), a GELU(tanh) feed-forward (the ungated path of
Nystrom-CPQR) and cross-attention to T5 tokens under an attention mask.

The mask matters for the statistics: the pipeline pads every prompt to ``max_sequence_length``
(120 or 300) T5 tokens and masks the padding out of the softmax, so padding keys must not enter
the key covariance either (``masked_keys``: the collector reads the cross-attention's
``attention_mask`` and keeps only unmasked key tokens).
"""

from __future__ import annotations

import torch

from slimdiff.families.base import randn, register_adapter
from slimdiff.families.basic import BasicBlocksAdapter


@register_adapter
class PixArtAdapter(BasicBlocksAdapter):
    family = "PixArt-alpha / PixArt-Sigma DiT (PixArtTransformer2DModel)"
    pipeline_attr = "transformer"
    denoiser_name = "PixArtTransformer2DModel"
    masked_cross_attention = True

    def example_inputs(
        self, model, batch, latent_hw, text_len, *, device="meta", dtype=torch.float32, generator=None
    ):
        cfg = model.config
        h, w = latent_hw
        hidden = randn((batch, cfg.in_channels, h, w), device, dtype, generator)
        text = randn((batch, text_len, cfg.caption_channels), device, dtype, generator)
        t = torch.full((batch,), 500, dtype=torch.long, device=device)
        mask = torch.ones((batch, text_len), dtype=dtype, device=device)
        added = {"resolution": None, "aspect_ratio": None}
        if cfg.use_additional_conditions:  # PixArt-alpha at 1024 px: resolution and aspect ratio
            added = {
                "resolution": torch.full((batch, 2), float(h * 8), dtype=dtype, device=device),
                "aspect_ratio": torch.ones((batch, 1), dtype=dtype, device=device),
            }
        kwargs = {
            "encoder_hidden_states": text,
            "timestep": t,
            "added_cond_kwargs": added,
            "encoder_attention_mask": mask,
        }
        return (hidden,), kwargs

    def text_len(self, pipe) -> int:
        return int(getattr(pipe.tokenizer, "model_max_length", 300) or 300)
