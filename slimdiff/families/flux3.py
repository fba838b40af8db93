"""FLUX.3: ``Flux3Transformer2DModel`` built from per-mode ``Flux3ModeTransformerBlock``s and joint
``Flux3SingleTransformerBlock``s (diffusers ``transformer_flux3.py``). diffusers 0.42 has no
``DiffusionPipeline`` for it, only the modular ``Flux3ModularPipeline`` (one prompt per call), so
statistics are collected with ``ActivationCollector`` around the caller's own sampling loop.

How the model runs (what the adapter relies on):

* Three token modes: the noisy image tokens, the optional reference-image tokens
  (``image_cond_hidden_states``, image-to-image only) and the text context. Each mode first passes
  through its OWN per-mode blocks, self-attention within that mode only: ``mode_blocks.image``,
  ``mode_blocks.image_cond`` and ``txt_mode_blocks`` (each ``num_layers`` blocks); then the joint
  ``single_transformer_blocks`` run on [text; image (; reference)], and only the image tokens reach
  the output. No block passes an attention mask (the text padding, a multiple of 80 tokens, is
  attended to by design).
* Every block, per-mode or joint, is the same parallel block: ONE LayerNorm + modulation, then
  attention and FFN from that same input, summed into the residual with one gate (the joint block
  modulates the text and the content tokens separately). ``Flux3Attention``: separate ``to_q``,
  ``to_k``, ``to_v`` and ``to_out.0`` (no biases), per-head ``torch.nn.RMSNorm`` ``norm_q`` /
  ``norm_k`` over d_h applied to (B, N, heads, d_h) in float32, then RoPE on adjacent coordinate
  pairs (2i, 2i+1) with real cos / sin tables (``repeat_interleave_real``; ``apply_rotary_emb(...,
  sequence_dim=1)``), cast back to v's dtype, SDPA at 1/sqrt(d_h). ``Flux3FeedForward`` is FLUX.2's
  packed SwiGLU: ``linear_in`` rows [gate | up], ``linear_out``.
* Rotary positions (4 axes t, h, w, l; ``Flux3PosEmbed`` = FLUX.2's): the pipeline puts image
  token (row, column) of the packed grid at (0, 0.5 row, 0.5 column, 0) (its ``image_rope_scale``),
  reference image i at l = -(1 + i), text token j at (0, 0, 0, j). A per-mode block gets its own
  mode's table, a joint block the concatenation [text; image (; reference)].
* ``timestep`` is the flow time in [0, 1] (the pipeline passes t / 1000; the model multiplies by
  1000 itself). A flow-map (step-distilled, ``flow_map=True``) model also takes ``target_timestep``
  and runs without guidance; the others are sampled with classifier-free guidance (no guidance
  embedding).

What is compressed (docs/METHOD.md, "FLUX and RoPE"): every block of ``mode_blocks.image``,
``txt_mode_blocks`` and ``single_transformer_blocks``, three units each:

* **QK** (``{block}.attn.qk``): whole rotary pairs, the same in q and k, per head
  (``linalg.rope_pair_selection``, the per-head norms scale-corrected), exactly as FLUX.2's double
  blocks; ``SlimFlux3AttnProcessor`` gathers the rotary tables at each head's kept pairs and runs
  ``padded_sdpa`` at the original scale. The pair-selection phase moments are those of the joint
  [text; image] sequence at the default serving shape (``rope_angles``), for every block: a
  per-mode block attends over one mode's positions only, a subset of those (the selection rule is
  exact either way; only its error weights average over the joint sequence).
* **VO** (``{block}.attn.vo``): ``to_v`` rows with ``to_out.0`` columns.
* **FFN** (``{block}.ff``): the packed SwiGLU as the generic gated layout (a kept neuron keeps its
  row in both halves of ``linear_in``), as FLUX.2's.

The text per-mode blocks act on text tokens only: their linears are the text stream
(``AttentionLayout.text_linears``, ``FFNLayout.stream``); the joint blocks count as the image stream,
as FLUX's single blocks do.

Left at full width: the reference-image blocks ``mode_blocks.image_cond``. They run only for
image-to-image, so a text-to-image calibration gives them no statistics (a unit without tokens
cannot be rebuilt: compressing them blind would change image-to-image results arbitrarily);
reference tokens that do reach the joint blocks go through the compressed joint blocks.

Refused (``UnsupportedModelError`` naming the module or block type): blocks of any other type
(variants), per-mode blocks for modes other than image / image_cond, fused projections
(``fuse_projections()``: unfuse first; also refused at run time by the compressed processor),
processors other than ``Flux3AttnProcessor``, q/k norms other than an RMSNorm over d_h with a set
epsilon, feed-forwards other than ``Flux3FeedForward`` with ``Flux3SwiGLU``.
"""

from __future__ import annotations

import torch
from torch import nn

from slimdiff.families.attention import SlimProcessor, apply_rope, kept_rope_tables, padded_sdpa
from slimdiff.families.base import (
    AttentionLayout,
    FFNLayout,
    ModelAdapter,
    UnitInfo,
    UnsupportedModelError,
    attention_stat_keys,
    attention_units,
    ffn_unit,
    randn,
    register_adapter,
    require_processor,
)
from slimdiff.families.flux import _check_norms
from slimdiff.families.flux2 import _check_eps, four_axis_position_ids, joint_rope_angles

#: default text tokens per prompt: the pipeline pads each prompt to a multiple of 80 tokens (capped
#: at its ``max_sequence_length``, 8192), and upsampled captions run to several hundred, so the
#: serving length used for FLOPs and the rotary phase moments is FLUX.2's 512
FLUX3_TEXT_LEN = 512
#: the pipeline's default 1024 px: 128 x 128 latents at the 8x VAE scale (64 x 64 image tokens)
FLUX3_SAMPLE_SIZE = 128
#: the pipeline scales the image tokens' (h, w) position ids by this (``image_rope_scale``)
FLUX3_IMAGE_ROPE_SCALE = 0.5
#: the per-mode block lists of the model (its ``mode_blocks`` keys)
MODES = ("image", "image_cond")
#: block lists compressed (module docstring) -> the token stream their weights act on, module order
BLOCK_LISTS = (
    ("mode_blocks.image", "image"),
    ("txt_mode_blocks", "text"),
    ("single_transformer_blocks", "image"),
)
#: per-mode blocks left at full width: they run only for image-to-image (module docstring)
REFERENCE_BLOCKS = "mode_blocks.image_cond"


def _kind(model: nn.Module, block: str) -> str:
    return type(model.get_submodule(block)).__name__


def _ffn(model: nn.Module, block: str, stream: str) -> UnitInfo:
    from diffusers.models.transformers.transformer_flux3 import Flux3FeedForward, Flux3SwiGLU

    path = f"{block}.ff"
    ff = model.get_submodule(path)
    if type(ff) is not Flux3FeedForward or type(getattr(ff, "act_fn", None)) is not Flux3SwiGLU:
        act = f" with {type(ff.act_fn).__name__}" if hasattr(ff, "act_fn") else ""
        raise UnsupportedModelError(
            f"{path} ({_kind(model, block)}): expected a Flux3FeedForward with Flux3SwiGLU, got "
            f"{type(ff).__name__}{act}"
        )
    # linear_in rows: [gate (activated) | up]; a kept neuron keeps its row in both halves
    layout = FFNLayout(f"{path}.linear_in", f"{path}.linear_out", True, f"{path}.hidden", stream)
    return ffn_unit(model, path, block, layout)


def _attention(model: nn.Module, block: str, stream: str) -> list[UnitInfo]:
    from diffusers.models.transformers.transformer_flux3 import Flux3Attention

    path = f"{block}.attn"
    attn = model.get_submodule(path)
    if type(attn) is not Flux3Attention:
        raise UnsupportedModelError(
            f"{path} ({_kind(model, block)}): expected a Flux3Attention, got {type(attn).__name__}"
        )
    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv"):
        raise UnsupportedModelError(
            f"{path} ({_kind(model, block)}): fused to_qkv projections are not supported; call "
            "unfuse_qkv_projections() first"
        )
    heads, head_dim = int(attn.heads), int(attn.head_dim)
    norms_q, norms_k = f"{path}.norm_q", f"{path}.norm_k"
    _check_norms(model, [norms_q, norms_k])
    for norm in (norms_q, norms_k):  # per head: RoPE pair selection needs an RMSNorm over d_h
        shape = tuple(getattr(model.get_submodule(norm), "normalized_shape", ()))
        if shape != (head_dim,):
            raise UnsupportedModelError(
                f"{norm} ({_kind(model, block)}): an RMSNorm over {shape}, expected one per head over "
                f"{head_dim}"
            )
    linears = (f"{path}.to_q", f"{path}.to_k", f"{path}.to_v", f"{path}.to_out.0")
    layout = AttentionLayout(
        module=path,
        heads=heads,
        head_dim=head_dim,
        query=(linears[0],),
        key=(linears[1],),
        value=(linears[2],),
        out=(linears[3],),
        **attention_stat_keys(block, "attn"),
        norms_q=(norms_q,),
        norms_k=(norms_k,),
        norms_head_major=False,  # the stock processor normalises (B, N, heads, d_h)
        text_linears=linears if stream == "text" else (),
        rope=True,
    )
    _check_eps(model, layout)
    return attention_units(model, block, "attn", layout)


class SlimFlux3AttnProcessor(SlimProcessor):
    """diffusers ``Flux3AttnProcessor`` (every FLUX.3 block's self-attention) for compressed per-head
    widths, with the rotary tables narrowed to each head's kept pairs.

    q, k and v are projected at the compressed widths (r_qk, r_vo per head) and split into heads
    (B, H, N, r); q and k are normalised in float32 by the per-head norms (stock ``RMSNorm`` or
    ``HeadwiseRMSNorm`` after pair selection) and rotated in float32 with the cos / sin tables
    gathered at the attention's ``slim_rope_index`` (``kept_rope_tables``; the stock (N, d_h) tables
    when its QK is whole), then cast to v's dtype, as the stock processor does; attention runs
    through ``padded_sdpa`` at the ORIGINAL scale 1/sqrt(d_h) and ``to_out`` projects the result.
    Fused projections are refused, not ignored."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if getattr(attn, "fused_projections", False):
            raise UnsupportedModelError(
                "SlimFlux3AttnProcessor: fused to_qkv projections are not supported by a compressed FLUX.3"
            )
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, heads*r) -> (B, heads, N, r)
            return x.unflatten(-1, (heads, -1)).transpose(1, 2)

        query = attn.norm_q(split(attn.to_q(hidden_states)).float())
        key = attn.norm_k(split(attn.to_k(hidden_states)).float())
        value = split(attn.to_v(hidden_states))
        if image_rotary_emb is not None:  # (N, d_h) tables -> (H, N, r): each head's kept coordinates
            cos, sin = kept_rope_tables(attn, *image_rotary_emb)
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        query, key = query.to(value.dtype), key.to(value.dtype)
        out = padded_sdpa(query, key, value, scale=self.scale, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)  # (B, N, heads * r_vo)
        return attn.to_out[1](attn.to_out[0](out))


@register_adapter
class Flux3Adapter(ModelAdapter):
    family = "FLUX.3 (Flux3Transformer2DModel)"
    pipeline_attr = "transformer"
    denoiser_name = "Flux3Transformer2DModel"

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """(path, block, stream) of every compressed block (``BLOCK_LISTS``: the image and text
        per-mode blocks, the joint blocks), in module order. A block of any other type, in any list
        (``mode_blocks.image_cond`` included), is refused naming its type, as are per-mode blocks for
        modes other than ``MODES``."""
        from diffusers.models.transformers.transformer_flux3 import (
            Flux3ModeTransformerBlock,
            Flux3SingleTransformerBlock,
        )

        modes = getattr(model, "mode_blocks", None)
        if not isinstance(modes, nn.ModuleDict) or tuple(modes.keys()) != MODES:
            got = list(modes.keys()) if isinstance(modes, nn.ModuleDict) else type(modes).__name__
            raise UnsupportedModelError(
                f"{type(model).__name__}: expected per-mode blocks mode_blocks for the modes {list(MODES)}, "
                f"got {got} (a FLUX.3 variant slimdiff does not support)"
            )
        out = []
        lists = (*BLOCK_LISTS, (REFERENCE_BLOCKS, None))
        for attr, stream in lists:
            cls = (
                Flux3SingleTransformerBlock
                if attr == "single_transformer_blocks"
                else Flux3ModeTransformerBlock
            )
            for i, block in enumerate(model.get_submodule(attr)):
                if type(block) is not cls:
                    raise UnsupportedModelError(
                        f"{attr}.{i}: block type {type(block).__name__} is not a FLUX.3 {cls.__name__} "
                        f"(a FLUX.3 variant slimdiff does not support)"
                    )
                if stream is not None:
                    out.append((f"{attr}.{i}", block, stream))
        if not out:
            raise UnsupportedModelError(f"{type(model).__name__} has no FLUX.3 transformer blocks")
        return out

    def units(self, model: nn.Module) -> dict[str, UnitInfo]:
        units: list[UnitInfo] = []
        for name, _, stream in self.blocks(model):
            units += _attention(model, name, stream)
            units.append(_ffn(model, name, stream))
        return {u.name: u for u in units}

    def check_processors(self, model: nn.Module) -> None:
        from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor

        for name, block, _ in self.blocks(model):
            require_processor(f"{name}.attn ({type(block).__name__})", block.attn, Flux3AttnProcessor)

    def processor(self, attn: nn.Module, layout: AttentionLayout):
        return SlimFlux3AttnProcessor(scale=layout.head_dim**-0.5)

    # -- sampling ----------------------------------------------------------------------------
    def guidance_kwargs(self, model: nn.Module, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """No guidance embedding: classifier-free guidance, two branches above 1; a flow-map model
        (``flow_map``, step-distilled) is sampled without guidance: one branch."""
        if getattr(model.config, "flow_map", False):
            return {}, 1
        return super().guidance_kwargs(model, guidance_scale, batch)

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict):
        t = super().timestep(model, args, kwargs)
        return None if t is None else t * 1000  # the pipeline passes t / 1000

    def text_len(self, pipe) -> int:
        """Text tokens per prompt: FLUX3_TEXT_LEN, or the tokenizer's ``model_max_length`` where
        that is shorter."""
        tokenizer = getattr(pipe, "tokenizer", None)
        own = int(getattr(tokenizer, "model_max_length", FLUX3_TEXT_LEN) or FLUX3_TEXT_LEN)
        return min(own, FLUX3_TEXT_LEN)

    def attention_tokens(self, module, args, kwargs) -> tuple[int, int, int]:
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden.shape[0], hidden.shape[1], hidden.shape[1]  # self-attention, every block

    def sample_size(self, model: nn.Module) -> tuple[int, int]:
        size = getattr(model.config, "sample_size", None) or FLUX3_SAMPLE_SIZE
        return (size, size) if isinstance(size, int) else tuple(size)

    # -- positions ---------------------------------------------------------------------------
    @staticmethod
    def position_ids(
        latent_hw: tuple[int, int], text_len: int, device="cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_ids, txt_ids), (N, 4) (t, h, w, l) as the FLUX.3 pipeline builds them: the image token
        of packed-grid (row, column) (latents at the 8x VAE scale, 2x2 per token) at (0, 0.5 row,
        0.5 column, 0), text token j at (0, 0, 0, j)."""
        return four_axis_position_ids(latent_hw, text_len, FLUX3_IMAGE_ROPE_SCALE, device)

    def rope_angles(
        self, model: nn.Module, latent_hw: tuple[int, int] | None = None, text_len: int | None = None
    ) -> torch.Tensor:
        """(N, d_h / 2) rotary angle of every token of the joint [text; image] sequence and every
        coordinate pair at a serving shape (default: 128 x 128 latents and FLUX3_TEXT_LEN text
        tokens), from the model's own ``pos_embed`` (float64)."""
        img_ids, txt_ids = self.position_ids(latent_hw or self.sample_size(model), text_len or FLUX3_TEXT_LEN)
        return joint_rope_angles(model, img_ids, txt_ids)

    def example_inputs(
        self, model, batch, latent_hw, text_len, *, device="meta", dtype=torch.float32, generator=None
    ):
        """One text-to-image forward: ``batch`` image token sequences of (h / 2)(w / 2) tokens, text
        of ``text_len`` tokens, ``timestep`` 0.5 (and ``target_timestep`` 0.25 for a flow-map
        model); no reference images."""
        cfg = model.config
        h, w = latent_hw
        hidden = randn((batch, (h // 2) * (w // 2), cfg.in_channels), device, dtype, generator)
        text = randn((batch, text_len, cfg.joint_attention_dim), device, dtype, generator)
        img_ids, txt_ids = self.position_ids((h, w), text_len)
        kwargs = {
            "encoder_hidden_states": text,
            "timestep": torch.full((batch,), 0.5, dtype=dtype, device=device),
            "img_ids": img_ids.to(device=device, dtype=dtype),
            "txt_ids": txt_ids.to(device=device, dtype=dtype),
        }
        if getattr(cfg, "flow_map", False):
            kwargs["target_timestep"] = torch.full((batch,), 0.25, dtype=dtype, device=device)
        return (hidden,), kwargs
