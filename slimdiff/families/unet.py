"""SD 1.x / 2.x / XL: ``UNet2DConditionModel`` with BasicTransformerBlocks in its cross-attention
down, mid and up blocks.

SDXL is the same family at other shapes: up to 10 transformer layers per block, context width
2048, and added conditioning (``addition_embed_type="text_time"``: pooled text embeddings and six
time ids, passed as ``added_cond_kwargs``), which ``example_inputs`` supplies.
"""

from __future__ import annotations

import torch

from slimdiff.families.base import UnsupportedModelError, randn, register_adapter
from slimdiff.families.basic import BasicBlocksAdapter


@register_adapter
class UNetAdapter(BasicBlocksAdapter):
    family = "SD 1.x / 2.x / XL UNet (UNet2DConditionModel)"
    pipeline_attr = "unet"
    denoiser_name = "UNet2DConditionModel"

    def example_inputs(
        self, model, batch, latent_hw, text_len, *, device="meta", dtype=torch.float32, generator=None
    ):
        cfg = model.config
        h, w = latent_hw
        sample = randn((batch, cfg.in_channels, h, w), device, dtype, generator)
        text = randn((batch, text_len, cfg.cross_attention_dim), device, dtype, generator)
        t = torch.full((batch,), 500, dtype=torch.long, device=device)
        kwargs = {}
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embeds + 6 time ids
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": randn((batch, pooled), device, dtype, generator),
                "time_ids": randn((batch, 6), device, dtype, generator),
            }
        elif cfg.addition_embed_type is not None:
            raise UnsupportedModelError(
                f"UNet addition_embed_type={cfg.addition_embed_type!r}: example inputs are only known for "
                "SD 1.x/2.x (none) and SDXL ('text_time')"
            )
        return (sample, t, text), kwargs
