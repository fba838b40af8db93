"""Z-Image: ``ZImageTransformer2DModel`` built from single-stream ``ZImageTransformerBlock``s
(diffusers ``transformer_z_image.py``), sampled by ``ZImagePipeline``.

Every block is one stream (see docs/METHOD.md, "FLUX and RoPE"):

* **Blocks**: ``noise_refiner.{i}`` run on the image tokens alone (timestep-modulated),
  ``context_refiner.{i}`` on the caption tokens alone (no modulation), then ``layers.{i}`` on the
  concatenation [image; caption] of every sample, attended together (the Omni variant adds
  ``siglip_refiner.{i}`` on image-encoder tokens; its blocks are the same class). Each block has
  one attention and one FFN, hence one QK, one VO and one FFN unit. The context refiner's linears
  act on caption tokens only: they are the text stream (``AttentionLayout.text_linears``,
  ``FFNLayout.stream``); the main blocks share their weights between image and caption tokens and
  count as the image stream, as FLUX's single blocks do.
* **Attention** (``attention``, a diffusers ``Attention`` run by ``ZSingleStreamAttnProcessor``):
  ``to_q/to_k/to_v``, no biases, split into heads, **per-head RMSNorm** ``norm_q`` / ``norm_k`` on
  (B, N, heads, d_h), then **RoPE**: adjacent coordinate pairs (2i, 2i+1) read as complex numbers
  and multiplied by the unit complex table ``freqs_cis`` (B, N, d_h / 2) of every token, FLUX's
  pair layout. A QK unit is therefore compressed by keeping whole pairs, the same in q and k, per
  head (``linalg.rope_pair_selection``), with each norm's scale corrected for the dropped
  coordinates; ``SlimZImageAttnProcessor`` gathers the tables at the kept pairs of every head.
  Positions are (axis 0, row, column): caption token j at (1 + j, 0, 0), its pad tokens included
  (they continue the count), image patch (row, column) at (L + 1, row, column) with L the
  caption's padded length, the image's pad tokens at (0, 0, 0); the rotary angles are read off the
  model's own patchify and ``rope_embedder`` (``ZImageAdapter.rope_angles``).
* **FFN** ``feed_forward``: SwiGLU with separate linears, h = silu(w1 x) * (w3 x), out = w2 h. A
  neuron is the pair (w1 row, w3 row) with its w2 column; one selection keeps both rows
  (``FFNLayout.gate`` = w1, ``proj_in`` = w3, ``proj_out`` = w2) and the Nystrom refit of w2 reads
  the second moment of h, as for GEGLU.
* **Padding, and which tokens count.** ``ZImagePipeline`` encodes each prompt padded to
  ``max_sequence_length`` but hands the transformer only its real tokens (one tensor per prompt):
  tokenizer padding never reaches it. The transformer then pads in two ways:

  - each caption and each image to a multiple of 32 tokens, with the learned ``cap_pad_token`` /
    ``x_pad_token``. No mask ever covers these tokens: every token attends
    to them (keys and values) in every block, so they shape the output like any caption token. They
    are real tokens of the computation and are **kept** in the statistics (the errors the
    decompositions minimise are errors on them too);
  - a batch to its longest sequence (``pad_sequence`` with zeros), separately for the noise
    refiner, the context refiner and the main blocks. These tokens are masked out of every
    attention's keys (the block's boolean ``attn_mask``, True: a real token; None when nothing is
    padded) and their outputs are discarded: they are **left out of every statistic** (q, k, their
    norms, the attention output, the FFN hidden), the block's ``attn_mask`` being their
    ``TokenMask``. Classifier-free guidance batches prompts with their negatives, so this padding
    is the common case.
* The transformer is called as ``model(x, t, cap_feats)`` with lists of per-sample tensors and
  ``t = (1000 - timestep) / 1000`` (it multiplies by ``t_scale`` itself): ``timestep`` maps it back
  to the sampler's timestep. Guidance: ``ZImagePipeline``'s ``guidance_scale`` s gives
  pos + s (pos - neg), i.e. the usual classifier-free scale w = 1 + s (two calls per step when
  s > 0); ``guidance_kwargs`` passes s = w - 1.

Refused (``UnsupportedModelError`` naming the module): fused projections (``fuse_projections()``:
unfuse first), processors other than ``ZSingleStreamAttnProcessor``, q/k norms other than a
per-head ``RMSNorm`` (``qk_norm=False``: RoPE on raw q/k has no pair-selection rule here), an
FFN other than the SwiGLU ``FeedForward``.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from slimdiff.families.attention import SlimProcessor, apply_rope_complex, padded_sdpa
from slimdiff.families.base import (
    AttentionLayout,
    FFNLayout,
    ModelAdapter,
    StatSite,
    TokenMask,
    UnitInfo,
    UnsupportedModelError,
    attention_stat_keys,
    attention_units,
    ffn_unit,
    randn,
    register_adapter,
    require_processor,
)

#: ZImagePipeline's default ``max_sequence_length``: the most caption tokens it hands the transformer
ZIMAGE_TEXT_LEN = 512
#: ZImagePipeline's default 1024 px: 128 x 128 latents with its 8x VAE
ZIMAGE_SAMPLE_SIZE = 128
#: the argument of a block's calls that marks its real (unpadded) tokens
MASK_ARG = "attn_mask"
#: block lists of the transformer -> the token stream their weights act on
BLOCK_STREAMS = {
    "noise_refiner": "image",
    "context_refiner": "text",
    "siglip_refiner": "image",
    "layers": "image",
}


def _mask(block: str) -> TokenMask:
    return TokenMask(block, MASK_ARG)


def _stream(block: str) -> str:
    return BLOCK_STREAMS.get(block.split(".")[0], "image")


def _kind(model: nn.Module, block: str) -> str:
    return type(model.get_submodule(block)).__name__


def _ffn(model: nn.Module, block: str) -> UnitInfo:
    path = f"{block}.feed_forward"
    ff = model.get_submodule(path)
    if type(ff).__name__ != "FeedForward" or not all(
        isinstance(getattr(ff, n, None), nn.Linear) for n in ("w1", "w2", "w3")
    ):
        raise UnsupportedModelError(
            f"{path} ({_kind(model, block)}): expected Z-Image's SwiGLU FeedForward (linears w1, w2, w3), "
            f"got {type(ff).__name__}"
        )
    layout = FFNLayout(
        f"{path}.w3",
        f"{path}.w2",
        False,
        f"{path}.hidden",
        _stream(block),
        _mask(block),
        gate=f"{path}.w1",
    )
    return ffn_unit(model, path, block, layout)


def _attention(model: nn.Module, block: str) -> list[UnitInfo]:
    path = f"{block}.attention"
    attn = model.get_submodule(path)
    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv"):
        raise UnsupportedModelError(
            f"{path} ({_kind(model, block)}): fused projections are not supported; call "
            "unfuse_projections() first"
        )
    heads = int(attn.heads)
    head_dim = attn.to_q.out_features // heads
    norms_q, norms_k = f"{path}.norm_q", f"{path}.norm_k"
    for norm in (norms_q, norms_k):
        mod = getattr(attn, norm.rsplit(".", 1)[1], None)
        if type(mod).__name__ != "RMSNorm" or tuple(getattr(mod, "dim", ())) != (head_dim,):
            got = "none" if mod is None else f"{type(mod).__name__} over {tuple(getattr(mod, 'dim', ()))}"
            raise UnsupportedModelError(
                f"{norm} ({_kind(model, block)}): qk norm {got} is not supported (a per-head RMSNorm "
                f"over {head_dim} is: RoPE pair selection needs it)"
            )
    linears = (f"{path}.to_q", f"{path}.to_k", f"{path}.to_v", f"{path}.to_out.0")
    text = _stream(block) == "text"
    layout = AttentionLayout(
        module=path,
        heads=heads,
        head_dim=head_dim,
        query=(linears[0],),
        key=(linears[1],),
        value=(linears[2],),
        out=(linears[3],),
        **attention_stat_keys(block, "attention"),
        norms_q=(norms_q,),
        norms_k=(norms_k,),
        norms_head_major=False,  # the stock processor normalises (B, N, heads, d_h)
        text_linears=linears if text else (),
        rope=True,
        text_mask=_mask(block) if text else None,
    )
    return attention_units(model, block, "attention", layout)


class SlimZImageAttnProcessor(SlimProcessor):
    """diffusers ``ZSingleStreamAttnProcessor`` for compressed per-head widths, with the rotary
    tables narrowed to each head's kept pairs.

    q, k and v are projected at the compressed widths (r_qk, r_vo per head), split into heads
    (B, H, N, r), normalised by the per-head norms (stock ``RMSNorm`` or ``HeadwiseRMSNorm`` after
    pair selection), rotated by ``freqs_cis`` (B, N, d_h / 2) complex, gathered at the kept pairs of
    the attention's ``slim_rope_index`` (H, r_qk) when its QK was narrowed, in float32 as the stock
    processor; the boolean ``attention_mask`` (B, N) (True: a real token) masks the keys, attention
    runs through ``padded_sdpa`` with the ORIGINAL scale 1/sqrt(d_h), and ``to_out`` projects the
    result."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("SlimZImageAttnProcessor is self-attention (Z-Image's single stream)")
        batch_size, heads = hidden_states.shape[0], attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, heads*r) -> (B, heads, N, r)
            return x.view(batch_size, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        def norm(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
            return x if module is None else module(x)

        query = norm(attn.norm_q, split(attn.to_q(hidden_states)))
        key = norm(attn.norm_k, split(attn.to_k(hidden_states)))
        value = split(attn.to_v(hidden_states))
        if freqs_cis is not None:  # (B, N, d_h / 2) complex
            index = getattr(attn, "slim_rope_index", None)
            if index is not None:  # (H, r) whole pairs (2p, 2p+1) -> (B, H, N, r / 2) tables of pairs p
                pairs = index[:, 0::2].to(freqs_cis.device) // 2
                freqs = freqs_cis[..., pairs].permute(0, 2, 1, 3)
            else:
                freqs = freqs_cis.unsqueeze(1)  # (B, 1, N, d_h / 2)
            query, key = apply_rope_complex(query, freqs), apply_rope_complex(key, freqs)
        if attention_mask is not None and attention_mask.ndim == 2:  # (B, N) -> (B, 1, 1, N)
            attention_mask = attention_mask[:, None, None, :]

        out = padded_sdpa(query, key, value, scale=self.scale, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * value.shape[-1]).to(query.dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)  # dropout
        return out


@register_adapter
class ZImageAdapter(ModelAdapter):
    family = "Z-Image (ZImageTransformer2DModel)"
    pipeline_attr = "transformer"
    denoiser_name = "ZImageTransformer2DModel"
    block_type = "diffusers.models.transformers.transformer_z_image:ZImageTransformerBlock"

    def units(self, model: nn.Module) -> dict[str, UnitInfo]:
        units: list[UnitInfo] = []
        for name, _ in self.blocks(model):
            units += _attention(model, name)
            units.append(_ffn(model, name))
        return {u.name: u for u in units}

    def stat_sites(self, model: nn.Module) -> list[StatSite]:
        """The generic sites, each restricted to its block's real tokens: the block's ``attn_mask``
        (the batch padding; see the module docstring) for the attention sites too, whose layouts
        name it only for the text stream (the FFN layouts name it as their ``token_mask``)."""
        sites = super().stat_sites(model)
        blocks = [name for name, _ in self.blocks(model)]
        out = []
        for site in sites:
            if site.mask_module is None:
                block = next(b for b in blocks if site.module.startswith(f"{b}."))
                site = replace(site, mask_module=block, mask_arg=MASK_ARG)
            out.append(site)
        return out

    def check_processors(self, model: nn.Module) -> None:
        from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

        for name, block in self.blocks(model):
            require_processor(
                f"{name}.attention ({type(block).__name__})", block.attention, ZSingleStreamAttnProcessor
            )

    def processor(self, attn: nn.Module, layout: AttentionLayout):
        return SlimZImageAttnProcessor(scale=layout.head_dim**-0.5)

    def guidance_kwargs(self, model: nn.Module, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """ZImagePipeline combines pos + s (pos - neg) and runs the negative branch whenever s > 0:
        the classifier-free scale w = ``guidance_scale`` is passed as s = w - 1 (two transformer
        calls per step, the negative prompt the pipeline's default "") when w > 1, s = 0 (one call)
        otherwise."""
        if guidance_scale > 1.0:
            return {"guidance_scale": guidance_scale - 1.0}, 2
        return {"guidance_scale": 0.0}, 1

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict):
        """The sampler's timestep: the transformer's ``t`` is (1000 - timestep) / 1000."""
        t = kwargs.get("t", args[1] if len(args) > 1 else None)
        if t is None:
            return None
        return 1000.0 * (1.0 - (t.double() if isinstance(t, torch.Tensor) else float(t)))

    def attention_tokens(self, module, args, kwargs) -> tuple[int, int, int]:
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden.shape[0], hidden.shape[1], hidden.shape[1]

    def sample_size(self, model: nn.Module) -> tuple[int, int]:
        size = getattr(model.config, "sample_size", None) or ZIMAGE_SAMPLE_SIZE
        return (size, size) if isinstance(size, int) else tuple(size)

    def text_len(self, pipe) -> int:
        """The pipeline's default ``max_sequence_length`` (ZIMAGE_TEXT_LEN): an upper bound on the
        caption tokens (the pipeline passes each prompt's real tokens; the transformer pads them to
        a multiple of 32)."""
        param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
        default = None if param is None else param.default
        return int(default) if isinstance(default, int) and default > 0 else ZIMAGE_TEXT_LEN

    def rope_angles(
        self, model: nn.Module, latent_hw: tuple[int, int] | None = None, text_len: int | None = None
    ) -> torch.Tensor:
        """(N, d_h / 2) rotary angle of every token the main blocks attend over at a serving shape
        (default: the model's sample size and ZIMAGE_TEXT_LEN caption tokens), the pad tokens
        included, from the model's own patchify (positions) and ``rope_embedder`` (float64)."""
        h, w = latent_hw or self.sample_size(model)
        text_len = text_len or ZIMAGE_TEXT_LEN
        patch, f_patch = model.all_patch_size[0], model.all_f_patch_size[0]
        image = torch.zeros(model.in_channels, f_patch, h, w)
        caption = torch.zeros(text_len, 1)  # only its length is read
        with torch.no_grad():
            img, cap, _, img_ids, cap_ids, _, _ = model.patchify_and_embed([image], [caption], patch, f_patch)
            # as the model's sequences: one table row per token (it cuts the caption's surplus ids)
            ids = torch.cat([img_ids[0][: len(img[0])], cap_ids[0][: len(cap[0])]])
            freqs = model.rope_embedder(ids.cpu())
        return torch.angle(freqs.to(torch.complex128))

    def example_inputs(
        self, model, batch, latent_hw, text_len, *, device="meta", dtype=torch.float32, generator=None
    ):
        """One forward as ZImagePipeline makes it: ``batch`` latents (C, 1, h, w) and ``batch``
        captions of ``text_len`` tokens (lists), ``t`` = 0.5."""
        cfg = model.config
        h, w = latent_hw
        x = [randn((cfg.in_channels, 1, h, w), device, dtype, generator) for _ in range(batch)]
        cap = [randn((text_len, cfg.cap_feat_dim), device, dtype, generator) for _ in range(batch)]
        t = torch.full((batch,), 0.5, dtype=dtype, device=device)
        return (x, t, cap), {}
