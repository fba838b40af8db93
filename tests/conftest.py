"""Shared fixtures: tiny diffusers models built from config (never downloaded), quiet and offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# experiment runners live with the benchmarks that use them (benchmarks/ablation_runner.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest
import torch

torch.set_num_threads(1)


def make_tiny_unet(
    seed: int = 0,
    heads: int = 2,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 24,
    layers_per_block: int = 1,
    transformer_layers_per_block: int = 1,
    sample_size: int = 8,
):
    """A 2-level SD-1.x-shaped UNet2DConditionModel: cross-attention blocks with GEGLU FFN.

    ``heads`` is the number of attention heads (diffusers' ``attention_head_dim`` in SD 1.x
    configs really means heads)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers_per_block,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        transformer_layers_per_block=transformer_layers_per_block,
        norm_num_groups=8,
    )
    return unet.eval()


def make_tiny_pixart(
    seed: int = 0, heads: int = 2, head_dim: int = 8, layers: int = 2, caption_channels: int = 12
):
    """A 2-layer PixArt-Sigma-shaped PixArtTransformer2DModel (adaLN-single, GELU-tanh FFN,
    cross-attention to text tokens), 8x8 latents in 2x2 patches."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=heads * head_dim,
        sample_size=8,
        patch_size=2,
        caption_channels=caption_channels,
        use_additional_conditions=False,
    ).eval()


def transformer_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of every diffusers BasicTransformerBlock: the tests' own view of the layout
    (the library finds blocks only through slimdiff.families)."""
    from diffusers.models.attention import BasicTransformerBlock

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def tiny_unet_factory():
    return make_tiny_unet
