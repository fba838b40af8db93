"""diffusers ``BasicTransformerBlock``: the block SD 1.x/2.x/XL UNets and PixArt-class DiTs share.

A block has ``attn1`` (self-attention), optionally ``attn2`` (cross-attention) and ``ff``
(``FeedForward``: ``net = [GEGLU | GELU(proj), Dropout, Linear]``; GEGLU's proj is d -> 2 * inner
with ``chunk(2)`` = [hidden | gate]). Families differ in where the blocks sit, in their inputs and
in their masks, not in the block: this module turns blocks into units and checks processors; the
family adapters (``unet.py``, ``pixart.py``) find the blocks.
"""

from __future__ import annotations

import inspect

from torch import nn

from slimdiff.core.stats import ATTN_OUT, KEY, QUERY, attn_key, ffn_key
from slimdiff.families.base import (
    AttentionLayout,
    FFNLayout,
    ModelAdapter,
    UnitInfo,
    UnsupportedModelError,
    _block_types,
    attention_units,
    ffn_unit,
)


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention import BasicTransformerBlock

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]


def block_units(
    model: nn.Module, name: str, block: nn.Module, *, masked_cross: bool = False
) -> list[UnitInfo]:
    """The ffn, attn1.{qk,vo} and attn2.{qk,vo} units of one BasicTransformerBlock."""
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
    units = [
        ffn_unit(
            model,
            f"{name}.ff",
            name,
            FFNLayout(
                f"{name}.ff.net.0.proj",
                f"{name}.ff.net.{len(ff.net) - 1}",
                isinstance(act, GEGLU),
                ffn_key(name),
            ),
        )
    ]
    for which in ("attn1", "attn2"):
        attn = getattr(block, which, None)
        if attn is None:
            continue
        path = f"{name}.{which}"
        heads = int(attn.heads)
        q = getattr(attn, "to_q", None)
        if not isinstance(q, nn.Linear):
            raise UnsupportedModelError(
                f"{path}: expected separate nn.Linear to_q/to_k/to_v projections (got {type(q).__name__}); "
                "fused QKV projections are not supported, call unfuse_qkv_projections() first"
            )
        if q.out_features % heads:
            raise UnsupportedModelError(
                f"{path}: query width {q.out_features} is not a multiple of {heads} heads"
            )
        layout = AttentionLayout(
            module=path,
            heads=heads,
            head_dim=q.out_features // heads,
            query=(f"{path}.to_q",),
            key=(f"{path}.to_k",),
            value=(f"{path}.to_v",),
            out=(f"{path}.to_out.0",),
            query_key=attn_key(name, which, QUERY),
            key_key=attn_key(name, which, KEY),
            attnout_key=attn_key(name, which, ATTN_OUT),
            masked_keys=masked_cross and which == "attn2",
        )
        units += attention_units(model, name, which, layout)
    return units


def check_attention_processor(name: str, attn: nn.Module) -> None:
    """Raise UnsupportedModelError (naming ``name``) if the statistics hooks would not see the
    query/key/attention-output activations this module really uses."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    proc_type = type(getattr(attn, "processor", None))
    known = (
        proc_type in (AttnProcessor, AttnProcessor2_0)
        or getattr(proc_type, "slimdiff_supported", False) is True
    )
    if "Fused" in proc_type.__name__ or (getattr(attn, "fused_projections", False) and not known):
        raise UnsupportedModelError(
            f"{name}: fused QKV projections ({proc_type.__name__}) are not supported: the statistics hook "
            "the separate to_q / to_k projections; call unfuse_qkv_projections() first"
        )
    if not known:
        raise UnsupportedModelError(
            f"{name}: unknown attention processor {proc_type.__name__}; SlimDiff statistics support "
            "diffusers' AttnProcessor2_0 / AttnProcessor and processors that set the class attribute "
            "`slimdiff_supported = True`. Call set_attn_processor(AttnProcessor2_0()) first"
        )
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        raise UnsupportedModelError(
            f"{name}: per-head QK normalisation (norm_q / norm_k) is not supported in this block type: the "
            "query/key statistics would not be those the softmax sees"
        )


class BasicBlocksAdapter(ModelAdapter):
    """Shared behaviour of families built from BasicTransformerBlocks."""

    masked_cross_attention = False  # cross-attention keys carry a padding mask (T5 text encoders)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks = transformer_blocks(model)
        if not blocks:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no diffusers BasicTransformerBlock (its blocks: "
                f"{', '.join(_block_types(model)) or 'none'}): SlimDiff compresses the attention and "
                "feed-forward layers of transformer blocks"
            )
        return blocks

    def near_miss(self, model: nn.Module) -> str | None:
        """Models of other classes built from BasicTransformerBlocks (DiT, UNet3D / motion / video
        UNets, the Kandinsky prior, ...): the blocks' units could be listed by their parts, but
        calibration drives a text-to-image pipeline with prompts and needs the model's inputs, and
        those are the family's own (DiT is class-conditioned, the video UNets take frames): a family
        file must say them."""
        if not transformer_blocks(model):
            return None
        params = inspect.signature(type(model).forward).parameters
        if "encoder_hidden_states" not in params:
            return (
                "its BasicTransformerBlocks are standard parts, but it takes no text states "
                f"(inputs: {', '.join(list(params)[1:4])}, ...): calibration drives text prompts"
            )
        return (
            "its BasicTransformerBlocks are standard parts, but its inputs and pipeline are not those "
            "of a family slimdiff knows: a family file must describe them"
        )

    def units(self, model: nn.Module) -> dict[str, UnitInfo]:
        return {
            u.name: u
            for name, block in self.blocks(model)
            for u in block_units(model, name, block, masked_cross=self.masked_cross_attention)
        }

    def check_processors(self, model: nn.Module) -> None:
        for name, block in self.blocks(model):
            for which in ("attn1", "attn2"):
                attn = getattr(block, which, None)
                if attn is not None:
                    check_attention_processor(f"{name}.{which}", attn)
