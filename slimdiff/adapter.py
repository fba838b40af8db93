"""Which parts of a diffusers UNet SlimDiff touches, and what they cost.

The adapter is the single place that knows the module layout of the SD 1.x/2.x UNet family
(``UNet2DConditionModel``): every ``BasicTransformerBlock`` has ``attn1`` (self-attention),
``attn2`` (cross-attention, optional) and ``ff`` (GEGLU or GELU feed-forward). Everything else
(statistics keys, compression units, rank plans) is named from the block's module path, e.g.
``down_blocks.1.attentions.0.transformer_blocks.0``.

Compression units (METHOD.md stage 4), one rank per unit:

* ``{block}.ff``        FFN: rank = kept intermediate neurons (full = inner dim, 4d in SD)
* ``{block}.attn1.qk``  query-key: rank = per-head q/k dim (full = d_h), same for every head
* ``{block}.attn1.vo``  value-output: rank = per-head v dim (full = d_h)
* ``{block}.attn2.qk`` / ``{block}.attn2.vo`` likewise for cross-attention
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

UnitKind = Literal["ffn", "qk", "vo"]


class UnsupportedModelError(ValueError):
    """The model (or one of its modules) has a structure SlimDiff cannot compress."""


@dataclass(frozen=True)
class AttentionInfo:
    """Shapes of one diffusers ``Attention`` module (``attn1`` or ``attn2``)."""

    heads: int
    head_dim: int  # d_h of q and k (and v) in the original model
    query_in: int  # input features of to_q (the block width)
    kv_in: int  # input features of to_k / to_v (cross_attention_dim for attn2)
    out_dim: int  # output features of to_out.0
    qk_bias: bool  # to_q / to_k carry a bias
    v_bias: bool


@dataclass(frozen=True)
class BlockInfo:
    name: str  # module path of the BasicTransformerBlock inside the UNet
    dim: int  # block width d
    ffn_inner: int  # intermediate width of the FFN (4d in SD)
    geglu: bool  # ff.net.0 is GEGLU (proj: d -> 2*inner, chunk(2) = [hidden | gate])
    attn1: AttentionInfo
    attn2: AttentionInfo | None


@dataclass(frozen=True)
class UnitInfo:
    """One compression unit: the thing a rank plan assigns a rank to."""

    name: str  # e.g. "mid_block.attentions.0.transformer_blocks.0.attn2.qk"
    kind: UnitKind
    block: str
    attn: str | None  # "attn1" / "attn2" for qk and vo units, None for ffn
    full_rank: int  # R_m: inner dim for ffn, d_h for qk / vo
    cost_per_rank: int  # parameters per unit of rank (METHOD.md stage 4, biases included)

    @property
    def full_params(self) -> int:
        return self.full_rank * self.cost_per_rank


def find_transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All ``BasicTransformerBlock`` modules of ``model``, in module order.

    Raises UnsupportedModelError when there are none (nothing to compress)."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no diffusers BasicTransformerBlock: SlimDiff compresses the "
            "attention and feed-forward layers of transformer blocks (SD 1.x/2.x UNet2DConditionModel)"
        )
    return blocks


def _attention_info(block_name: str, which: str, attn: nn.Module) -> AttentionInfo:
    for proj in ("to_q", "to_k", "to_v"):
        if not isinstance(getattr(attn, proj, None), nn.Linear):
            raise UnsupportedModelError(
                f"{block_name}.{which}: expected separate nn.Linear to_q/to_k/to_v projections "
                f"({proj} is {type(getattr(attn, proj, None)).__name__}); fused QKV projections are not "
                "supported, call unet.unfuse_qkv_projections() first"
            )
    to_out = attn.to_out[0]
    heads = int(attn.heads)
    inner = attn.to_q.out_features
    if inner % heads or attn.to_k.out_features != inner or attn.to_v.out_features != inner:
        raise UnsupportedModelError(
            f"{block_name}.{which}: q/k/v widths ({attn.to_q.out_features}, {attn.to_k.out_features}, "
            f"{attn.to_v.out_features}) are not one shared multiple of {heads} heads"
        )
    return AttentionInfo(
        heads=heads,
        head_dim=inner // heads,
        query_in=attn.to_q.in_features,
        kv_in=attn.to_k.in_features,
        out_dim=to_out.out_features,
        qk_bias=attn.to_q.bias is not None,
        v_bias=attn.to_v.bias is not None,
    )


def describe_block(name: str, block: nn.Module) -> BlockInfo:
    from diffusers.models.activations import GEGLU, GELU

    ff = getattr(block, "ff", None)
    if ff is None or not hasattr(ff, "net"):
        raise UnsupportedModelError(f"{name}: transformer block has no feed-forward `ff.net`")
    act, out = ff.net[0], ff.net[-1]
    if not isinstance(act, GEGLU | GELU) or not isinstance(out, nn.Linear):
        raise UnsupportedModelError(
            f"{name}.ff: unsupported feed-forward ({type(act).__name__} -> {type(out).__name__}); "
            "expected GEGLU or GELU followed by nn.Linear"
        )
    attn2 = getattr(block, "attn2", None)
    return BlockInfo(
        name=name,
        dim=out.out_features,
        ffn_inner=out.in_features,
        geglu=isinstance(act, GEGLU),
        attn1=_attention_info(name, "attn1", block.attn1),
        attn2=_attention_info(name, "attn2", attn2) if attn2 is not None else None,
    )


def describe_unet(model: nn.Module) -> list[BlockInfo]:
    return [describe_block(name, block) for name, block in find_transformer_blocks(model)]


def units_of_block(info: BlockInfo) -> list[UnitInfo]:
    """The compression units of one block with their parameter cost per unit of rank."""
    d = info.dim
    # FFN: per kept neuron, GEGLU keeps one row of each proj half (2d weights + 2 biases) and one
    # column of ff.net.2 (d weights); plain GELU keeps one proj row (d + 1) and one column (d).
    ffn_cost = 3 * d + 2 if info.geglu else 2 * d + 1
    units = [UnitInfo(f"{info.name}.ff", "ffn", info.name, None, info.ffn_inner, ffn_cost)]
    for which in ("attn1", "attn2"):
        a: AttentionInfo | None = getattr(info, which)
        if a is None:
            continue
        qk_cost = a.heads * (a.query_in + a.kv_in + (2 if a.qk_bias else 0))
        vo_cost = a.heads * (a.kv_in + a.out_dim + (1 if a.v_bias else 0))
        units.append(UnitInfo(f"{info.name}.{which}.qk", "qk", info.name, which, a.head_dim, qk_cost))
        units.append(UnitInfo(f"{info.name}.{which}.vo", "vo", info.name, which, a.head_dim, vo_cost))
    return units


def compression_units(model: nn.Module) -> dict[str, UnitInfo]:
    """Every compression unit of ``model``, keyed by unit name, in module order."""
    return {u.name: u for info in describe_unet(model) for u in units_of_block(info)}


def short_unit_label(name: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2.qk' -> 'd1.a0.t0 attn2.qk'."""
    abbrev = {
        "down_blocks": "d",
        "up_blocks": "u",
        "mid_block": "mid",
        "attentions": "a",
        "transformer_blocks": "t",
    }
    parts = name.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p in abbrev:
            nxt = parts[i + 1] if i + 1 < len(parts) and parts[i + 1].isdigit() else ""
            out.append(abbrev[p] + nxt)
            i += 2 if nxt else 1
        else:
            break
    return ".".join(out) + " " + ".".join(parts[i:])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def parameter_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
