"""Analytic FLOPs (slimdiff.planning.flops): known answers on a tiny UNet, compressed shapes counted."""

from __future__ import annotations

import torch
from compress_helpers import capture_covariances, unet_inputs
from conftest import make_tiny_unet

from slimdiff.families.units import compression_units
from slimdiff.planning.flops import format_breakdown, unet_flops
from slimdiff.planning.plan import RankPlan
from slimdiff.surgery.compress import compress_


def test_known_answers_on_tiny_unet():
    unet = make_tiny_unet(heads=2)  # widths 32 / 64, cross_attention_dim 24
    b, size, text = 3, 8, 5
    rep = unet_flops(unet, batch=b, latent_size=size, text_len=text)
    rows = {r.module: r for r in rep.rows}
    assert rows["conv_in"].flops == 2 * b * size * size * 32 * 4 * 9
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    n = size * size
    assert rows[f"{blk}.ff.net.0.proj"].flops == 2 * b * n * 32 * 256
    assert rows[f"{blk}.attn2.to_k"].flops == 2 * b * text * 24 * 32
    assert rows[f"{blk}.attn2.to_k"].tokens == text
    assert rows[f"{blk}.attn1"].flops == 2 * b * 2 * n * n * (16 + 16)
    assert rows[f"{blk}.attn2"].flops == 2 * b * 2 * n * text * (16 + 16)
    assert rows["time_embedding.linear_1"].tokens == 1
    assert rep.total == sum(rep.by_category().values())
    assert "attention @ 64" in format_breakdown(rep)


def test_compressed_shapes_are_counted():
    unet = make_tiny_unet(heads=2)
    b, size, text = 2, 8, 5
    base = unet_flops(unet, batch=b, latent_size=size, text_len=text)
    covs = capture_covariances(unet, [unet_inputs(unet, batch=2, size=8)])
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    plan = RankPlan.from_ranks(
        compression_units(unet), {f"{blk}.ff": 64, f"{blk}.attn1.qk": 8, f"{blk}.attn1.vo": 8}
    )
    compress_(unet, plan, covs)
    after = unet_flops(unet, batch=b, latent_size=size, text_len=text)
    n, d = size * size, 32
    ffn_delta = 2 * b * n * 3 * d * (128 - 64)  # proj loses 2 rows, net.2 one column per neuron
    qk_delta = 2 * b * n * 2 * (d + d) * (16 - 8) + 2 * b * 2 * n * n * (16 - 8)  # to_q/to_k + logits
    vo_delta = 2 * b * n * 2 * (d + d) * (16 - 8) + 2 * b * 2 * n * n * (16 - 8)  # to_v/to_out + PV
    assert base.total - after.total == ffn_delta + qk_delta + vo_delta
    # the traced skeleton lives on the meta device: nothing of the real model moved
    assert next(unet.parameters()).device == torch.device("cpu")
