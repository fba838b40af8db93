"""SD3 / SD3.5 MMDiT: ``SD3Transformer2DModel`` built from ``JointTransformerBlock``s.

What differs from a BasicTransformerBlock (see docs/METHOD.md, "MMDiT"):

* **Joint attention** (``attn``): image and text tokens have their own projections (``to_q/to_k/
  to_v`` and ``add_q_proj/add_k_proj/add_v_proj``), are concatenated, attended together and split
  again for two output projections (``to_out.0``, ``to_add_out``). A head's width is shared by both
  streams, so one rank per head covers both: the layout lists both streams' linears, their
  statistics add into one sum over the concatenated tokens, and a rewrite applies the same
  per-head transform to both.
* **Per-head RMSNorm on q and k** (``qk_norm="rms_norm"``: ``norm_q``/``norm_k`` and
  ``norm_added_q``/``norm_added_k``). The whitening-SVD of ``W_q W_k^T`` does not commute with the
  norm, so a normed QK unit carries its norms in the layout and is handled by the
  ``compression.qk_norm`` mode (keep, project after the norm, or RMSNorm-aware coordinate
  selection).
* **SD3.5 dual attention** (``attn2``): a second, image-only self-attention in the first blocks.
* **The last block is context_pre_only**: the text stream's attention output is discarded (no
  ``to_add_out``) and it has no text FFN. Its ``add_q_proj`` still runs (its queries' outputs are
  dropped), so it is rewritten with the image queries' transform but kept out of the statistics.
* FFNs are GELU(tanh) (``ff`` for the image stream, ``ff_context`` for the text stream).
"""

from __future__ import annotations

import torch
from torch import nn

from slimdiff.core.stats import ATTN_OUT, KEY, KEY_NORMED, QUERY, QUERY_NORMED, attn_key, ffn_key
from slimdiff.families.attention import SlimJointAttnProcessor
from slimdiff.families.base import (
    AttentionLayout,
    FFNLayout,
    ModelAdapter,
    UnitInfo,
    UnsupportedModelError,
    attention_units,
    ffn_unit,
    randn,
    register_adapter,
    require_processor,
)

#: statistic suffix of the FFN of the text stream (``{block}.ff_context.hidden``)
CONTEXT_FFN = "ff_context"


def _ffn(model: nn.Module, block: str, name: str) -> UnitInfo:
    from diffusers.models.activations import GELU

    ff = model.get_submodule(f"{block}.{name}")
    if not isinstance(ff.net[0], GELU):
        raise UnsupportedModelError(
            f"{block}.{name}: expected a GELU feed-forward, got {type(ff.net[0]).__name__}"
        )
    key = ffn_key(block) if name == "ff" else f"{block}.{name}.hidden"
    stream = "image" if name == "ff" else "text"
    layout = FFNLayout(
        f"{block}.{name}.net.0.proj", f"{block}.{name}.net.{len(ff.net) - 1}", False, key, stream
    )
    return ffn_unit(model, f"{block}.{name}", block, layout)


def _attention(model: nn.Module, block: str, which: str) -> list[UnitInfo]:
    attn = model.get_submodule(f"{block}.{which}")
    path = f"{block}.{which}"
    heads = int(attn.heads)
    head_dim = attn.to_q.out_features // heads
    joint = getattr(attn, "add_q_proj", None) is not None
    query, key, value, out = [f"{path}.to_q"], [f"{path}.to_k"], [f"{path}.to_v"], [f"{path}.to_out.0"]
    unused = []
    norms_q, norms_k = [], []
    if attn.norm_q is not None:
        norms_q.append(f"{path}.norm_q")
        norms_k.append(f"{path}.norm_k")
    text: list[str] = []  # the text stream's linears: the add_* projections and to_add_out
    if joint:
        text += [f"{path}.add_q_proj", f"{path}.add_k_proj", f"{path}.add_v_proj"]
        text += [] if attn.context_pre_only else [f"{path}.to_add_out"]
        key.append(f"{path}.add_k_proj")
        value.append(f"{path}.add_v_proj")
        if attn.context_pre_only:  # text queries' outputs are discarded: rewritten, not measured
            unused.append(f"{path}.add_q_proj")
        else:
            query.append(f"{path}.add_q_proj")
            out.append(f"{path}.to_add_out")
        if attn.norm_added_q is not None:
            norms_q.append(f"{path}.norm_added_q")
            norms_k.append(f"{path}.norm_added_k")
    for norm in (*norms_q, *norms_k):
        mod = model.get_submodule(norm)
        if type(mod).__name__ != "RMSNorm":
            raise UnsupportedModelError(
                f"{norm}: qk_norm {type(mod).__name__} is not supported (rms_norm only)"
            )
    layout = AttentionLayout(
        module=path,
        heads=heads,
        head_dim=head_dim,
        query=tuple(query),
        key=tuple(key),
        value=tuple(value),
        out=tuple(out),
        query_key=attn_key(block, which, QUERY),
        key_key=attn_key(block, which, KEY),
        attnout_key=attn_key(block, which, ATTN_OUT),
        query_normed_key=attn_key(block, which, QUERY_NORMED) if norms_q else "",
        key_normed_key=attn_key(block, which, KEY_NORMED) if norms_k else "",
        unused_query=tuple(unused),
        norms_q=tuple(norms_q),
        norms_k=tuple(norms_k),
        text_linears=tuple(text),
    )
    return attention_units(model, block, which, layout)


@register_adapter
class MMDiTAdapter(ModelAdapter):
    family = "SD3 / SD3.5 MMDiT (SD3Transformer2DModel)"
    pipeline_attr = "transformer"
    denoiser_name = "SD3Transformer2DModel"
    block_type = "diffusers.models.attention:JointTransformerBlock"

    def units(self, model: nn.Module) -> dict[str, UnitInfo]:
        units: list[UnitInfo] = []
        for name, block in self.blocks(model):
            units.append(_ffn(model, name, "ff"))
            if block.ff_context is not None:
                units.append(_ffn(model, name, CONTEXT_FFN))
            units += _attention(model, name, "attn")
            if block.attn2 is not None:
                units += _attention(model, name, "attn2")
        return {u.name: u for u in units}

    def check_processors(self, model: nn.Module) -> None:
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        for name, block in self.blocks(model):
            for which in ("attn", "attn2"):
                attn = getattr(block, which, None)
                if attn is None:
                    continue
                require_processor(f"{name}.{which}", attn, JointAttnProcessor2_0)

    def processor(self, attn: nn.Module, layout: AttentionLayout):

        return SlimJointAttnProcessor(scale=layout.head_dim**-0.5)

    def attention_tokens(self, module, args, kwargs) -> tuple[int, int, int]:
        hidden = args[0] if args else kwargs["hidden_states"]
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        n = hidden.shape[1] + (0 if enc is None else enc.shape[1])
        # context_pre_only: the text queries' outputs are dropped, but diffusers computes them
        return hidden.shape[0], n, n

    def example_inputs(
        self, model, batch, latent_hw, text_len, *, device="meta", dtype=torch.float32, generator=None
    ):
        cfg = model.config
        h, w = latent_hw
        hidden = randn((batch, cfg.in_channels, h, w), device, dtype, generator)
        text = randn((batch, text_len, cfg.joint_attention_dim), device, dtype, generator)
        pooled = randn((batch, cfg.pooled_projection_dim), device, dtype, generator)
        t = torch.full((batch,), 500.0, dtype=dtype, device=device)
        kwargs = {"encoder_hidden_states": text, "pooled_projections": pooled, "timestep": t}
        return (hidden,), kwargs

    def text_len(self, pipe) -> int:
        # the pipeline concatenates the CLIP tokens and max_sequence_length (default 256) T5 tokens,
        # zeros when there is no T5 encoder: 77 + 256 = 333 joint text tokens for SD3 / SD3.5
        return int(getattr(pipe.tokenizer, "model_max_length", 77)) + 256
