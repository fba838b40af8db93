"""FLUX.2: ``Flux2Transformer2DModel`` built from double-stream ``Flux2TransformerBlock``s and
single-stream ``Flux2SingleTransformerBlock``s (diffusers ``transformer_flux2.py``), sampled by
``Flux2Pipeline`` (dev, a guidance embedding) and ``Flux2KleinPipeline`` (klein: true
classifier-free guidance, or none for the step-distilled models).

What is compressed (see docs/METHOD.md, "FLUX and RoPE"):

* **Double blocks**, every unit: FLUX.1's double block with other FFNs. The joint attention
  (``Flux2Attention``: ``to_q/k/v`` image, ``add_q/k/v_proj`` text, ``to_out.0`` / ``to_add_out``,
  text tokens first) has per-head q/k ``torch.nn.RMSNorm``s (called on (B, N, heads, d_h)) and
  then RoPE on adjacent coordinate pairs (2i, 2i+1) with FLUX.1's real cos / sin tables
  (``repeat_interleave_real``), so a QK unit keeps whole rotary pairs, the same in q and k, per head
  (``linalg.rope_pair_selection``, scale-corrected per-head norms), and ``SlimFlux2AttnProcessor``
  gathers the tables at each head's kept pairs. One QK and one VO unit per block cover both
  streams, as in MMDiT / FLUX.1.
* **FFNs** ``ff`` (image) and ``ff_context`` (text) are ``Flux2FeedForward``: one packed
  ``linear_in`` (d -> 2 x inner) whose output is chunked into [gate | up] halves, SwiGLU
  ``silu(gate) * up``, and ``linear_out``. A kept neuron j keeps row j of the gate half and row j of
  the up half: the generic ``FFNLayout(gated=True)`` already is that rule (rows [first half J |
  second half J] selected together, ``compress._apply_ffn``; the cost counts both rows). Which half
  is activated does not matter to the rule: row selection is symmetric in the two halves, the
  statistic is the input of ``linear_out`` (the product h), and the magnitude baseline scores a
  neuron by both of its rows. So nothing new is needed for the packed SwiGLU.
* **Text tokens have rotary positions** (``Flux2KleinPipeline._prepare_text_ids``): 4 position
  axes (t, h, w, l); image token (row, column) is at (0, row, column, 0), text token j at
  (0, 0, 0, j). ``rope_angles`` reads every image and text token's angles off the model's own
  ``pos_embed``, as for Qwen-Image.
* **Single blocks**, every unit. ``Flux2ParallelSelfAttention`` computes q, k, v and the MLP input
  with ONE fused linear, ``to_qkv_mlp_proj``, whose output rows are q | k | v | [gate | up], and
  ``to_out`` consumes [attention output | SwiGLU(gate, up)]. The fused linear is declared packed by
  rows into four parts (``base.record_row_parts``: widths H d_h, H d_h, H d_h, 2 x MLP recorded on
  the layer and kept current by ``base.replace_module``), so each part keeps its address
  ``to_qkv_mlp_proj#i`` however the others were narrowed; ``to_out``'s two column blocks are
  ``base.packed_path`` ranges, the first counted from the start, the MLP's from the end, as in
  FLUX.1's ``proj_out``. Units: QK = parts 0 and 1 (whole rotary pairs, the same in q and k, per
  head, per-head ``norm_q`` / ``norm_k`` scale-corrected, exactly as in the double blocks); VO =
  part 2 with ``to_out``'s attention columns; FFN (``{block}.mlp``) = part 3, a gated layout
  ([gate | up]: a kept neuron keeps its gate row and its up row) with ``to_out``'s MLP columns.
  Statistics hook the fused linear's output (each key its rows), ``norm_q`` / ``norm_k``'s outputs
  and ``to_out``'s input (each key its columns); single-block weights act on the joint
  [text; image] sequence. A compressed block still runs ONE input matmul (rows [q' | k' | v' |
  gate' | up']) and ONE ``to_out`` matmul: ``SlimFlux2ParallelAttnProcessor`` splits the fused
  output at the widths recorded on the layer (not the config's), gathers the rotary tables at each
  head's kept pairs and runs ``padded_sdpa`` at the original scale; the FFN unit names the
  attention (``FFNLayout.attention``), so a block whose MLP alone is narrowed gets that processor
  too. LoRA deltas of a narrowed ``to_qkv_mlp_proj`` are not projected (dropped with a reason:
  ``slimdiff.formats.lora`` maps column-packed linears only); ``to_out``'s are, as FLUX.1's.
* The transformer is called with ``timestep = t / 1000`` (it multiplies by 1000 itself).

Refused (``Flux3Transformer2DModel`` is its own family, ``slimdiff.families.flux3``): FLUX.2 models whose blocks are not exactly ``Flux2TransformerBlock`` /
``Flux2SingleTransformerBlock`` (named), fused double-block projections (``fuse_qkv_projections()``:
unfuse first), processors other than ``Flux2AttnProcessor`` in the double blocks and
``Flux2ParallelSelfAttnProcessor`` in the single blocks (the KV-cache processors of
``Flux2KleinKVPipeline`` included), single blocks whose MLP is not a SwiGLU of two halves, q/k norms
other than RMSNorm with a set epsilon.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from slimdiff.families.attention import (
    SlimFluxAttnProcessor,
    SlimProcessor,
    apply_rope,
    kept_rope_tables,
    padded_sdpa,
)
from slimdiff.families.base import (
    AttentionLayout,
    FFNLayout,
    ModelAdapter,
    UnitInfo,
    UnsupportedModelError,
    attention_stat_keys,
    attention_units,
    ffn_unit,
    packed_path,
    randn,
    record_row_parts,
    register_adapter,
    require_processor,
    row_parts,
)
from slimdiff.families.flux import _attention, _check_norms

#: the most text tokens the FLUX.2 pipelines hand the transformer by default: every prompt is
#: padded to ``max_sequence_length`` (default 512) tokens
FLUX2_TEXT_LEN = 512
#: the pipelines' ``default_sample_size``: 128 x 128 latents (1024 px with the 8x VAE)
FLUX2_SAMPLE_SIZE = 128
#: the FFNs of a double block (image, text)
FFNS = ("ff", "ff_context")


def _ffn(model: nn.Module, block: str, name: str) -> UnitInfo:
    from diffusers.models.transformers.transformer_flux2 import Flux2FeedForward, Flux2SwiGLU

    ff = model.get_submodule(f"{block}.{name}")
    if type(ff) is not Flux2FeedForward or type(ff.act_fn) is not Flux2SwiGLU:
        raise UnsupportedModelError(
            f"{block}.{name}: expected a Flux2FeedForward with Flux2SwiGLU, got {type(ff).__name__}"
            f"{'' if not hasattr(ff, 'act_fn') else ' with ' + type(ff.act_fn).__name__}"
        )
    # linear_in rows: [gate (activated) | up]; a kept neuron keeps its row in both halves
    layout = FFNLayout(
        f"{block}.{name}.linear_in",
        f"{block}.{name}.linear_out",
        True,
        f"{block}.{name}.hidden",
        "text" if name == "ff_context" else "image",
    )
    return ffn_unit(model, f"{block}.{name}", block, layout)


def _check_eps(model: nn.Module, layout: AttentionLayout) -> None:
    """The norm correction rescales the epsilon: a norm must have one (torch's RMSNorm may have
    ``eps=None``, meaning the dtype's machine epsilon at run time)."""
    for path in (*layout.norms_q, *layout.norms_k):
        if getattr(model.get_submodule(path), "eps", None) is None:
            raise UnsupportedModelError(f"{path}: an RMSNorm without a set eps is not supported")


def _single(model: nn.Module, block: str) -> list[UnitInfo]:
    """The QK, VO and FFN units of a single block (module docstring): parts of the fused
    ``to_qkv_mlp_proj`` (declared packed by rows) and column blocks of ``to_out``."""
    from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttention, Flux2SwiGLU

    path = f"{block}.attn"
    attn = model.get_submodule(path)
    if type(attn) is not Flux2ParallelSelfAttention or type(attn.mlp_act_fn) is not Flux2SwiGLU:
        raise UnsupportedModelError(
            f"{path}: expected a Flux2ParallelSelfAttention with Flux2SwiGLU, got {type(attn).__name__}"
            f"{' with ' + type(attn.mlp_act_fn).__name__ if hasattr(attn, 'mlp_act_fn') else ''}"
        )
    heads, head_dim = int(attn.heads), int(attn.head_dim)
    width, mlp = heads * head_dim, int(attn.mlp_hidden_dim)
    if int(attn.inner_dim) != width or int(attn.mlp_mult_factor) != 2:
        raise UnsupportedModelError(
            f"{path}: expected {heads} heads x {head_dim} = inner_dim ({attn.inner_dim}) and a SwiGLU MLP "
            f"of 2 halves (mlp_mult_factor {attn.mlp_mult_factor})"
        )
    query, key, value, mlp_in = record_row_parts(
        model, f"{path}.to_qkv_mlp_proj", (width, width, width, 2 * mlp)
    )
    if attn.to_out.in_features != width + mlp:
        raise UnsupportedModelError(
            f"{path}.to_out: {attn.to_out.in_features} inputs, expected attention {width} + MLP {mlp}"
        )
    _check_norms(model, [f"{path}.norm_q", f"{path}.norm_k"])
    layout = AttentionLayout(
        module=path,
        heads=heads,
        head_dim=head_dim,
        query=(query,),
        key=(key,),
        value=(value,),
        out=(packed_path(f"{path}.to_out", 0, width),),  # the first columns: the attention output
        **attention_stat_keys(block, "attn"),
        norms_q=(f"{path}.norm_q",),
        norms_k=(f"{path}.norm_k",),
        norms_head_major=False,
        rope=True,
    )
    _check_eps(model, layout)
    # the MLP hidden is the LAST `mlp` inputs of to_out (counted from the end: the address holds
    # after the attention columns are narrowed); [gate | up] rows of part 3, a gated layout
    ffn = FFNLayout(
        mlp_in,
        packed_path(f"{path}.to_out", -mlp),
        True,
        f"{block}.mlp.hidden",
        "image",
        attention=path,
    )
    return [*attention_units(model, block, "attn", layout), ffn_unit(model, f"{block}.mlp", block, ffn)]


def four_axis_position_ids(
    latent_hw: tuple[int, int], text_len: int, image_scale: float = 1.0, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids, txt_ids), (N, 4) (t, h, w, l), as the FLUX.2 / FLUX.3 pipelines build them: packed
    2x2 latent patch (row, column) at (0, s row, s column, 0) (s = ``image_scale``: 1 for FLUX.2,
    0.5 for FLUX.3), text token j at (0, 0, 0, j)."""
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    img = torch.zeros(h, w, 4)
    img[..., 1] += torch.arange(h)[:, None] * image_scale
    img[..., 2] += torch.arange(w)[None, :] * image_scale
    txt = torch.zeros(text_len, 4)
    txt[:, 3] = torch.arange(text_len)
    return img.reshape(h * w, 4).to(device), txt.to(device)


def joint_rope_angles(model: nn.Module, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> torch.Tensor:
    """(N, d_h / 2) rotary angle of every token of the joint [text; image] sequence and every
    coordinate pair, from the model's own ``pos_embed`` (float64)."""
    with torch.no_grad():
        cos, sin = model.pos_embed(torch.cat([txt_ids, img_ids]).to(next(model.parameters()).device))
    return torch.atan2(sin[:, 0::2].double().cpu(), cos[:, 0::2].double().cpu())


def fused_widths(attn: nn.Module) -> tuple[int, int, int, int]:
    """(q, k, v, MLP input) rows of a single block's ``to_qkv_mlp_proj`` as the layer holds them now:
    the widths recorded on it (``base.row_parts``, narrowed by a compression), else the stock ones."""
    parts = row_parts(attn.to_qkv_mlp_proj)
    if parts is None:
        return (attn.inner_dim,) * 3 + (attn.mlp_hidden_dim * attn.mlp_mult_factor,)
    return parts


class SlimFlux2ParallelAttnProcessor(SlimProcessor):
    """diffusers ``Flux2ParallelSelfAttnProcessor`` (FLUX.2 single blocks) for compressed widths.

    ONE matmul of the fused ``to_qkv_mlp_proj`` gives [q | k | v | gate | up], split at the widths
    recorded on the layer (``fused_widths``: H r_qk, H r_qk, H r_vo, 2 x MLP kept neurons), not at
    the config's; q / k / v are split into heads (B, H, N, r), q and k normalised by the per-head
    norms (stock ``RMSNorm`` or ``HeadwiseRMSNorm`` after pair selection) and rotated with the cos /
    sin tables gathered at the attention's ``slim_rope_index`` (``kept_rope_tables``); attention
    runs through ``padded_sdpa`` with the ORIGINAL scale 1/sqrt(d_h); the MLP half goes through the
    block's SwiGLU (it halves whatever width it gets); ONE matmul of ``to_out`` maps
    [attention output | MLP hidden]. The reference-image KV cache is refused, not ignored."""

    def head_widths(self, attn: nn.Module) -> tuple[int, int]:
        """(r_qk, r_vo) the attention runs at (read by the FLOP count)."""
        q, _, v, _ = fused_widths(attn)
        return q // attn.heads, v // attn.heads

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache=None,
        kv_cache_mode: str | None = None,
        num_txt_tokens: int = 0,
        num_ref_tokens: int = 0,
    ) -> torch.Tensor:
        if kv_cache is not None or kv_cache_mode is not None:
            raise UnsupportedModelError(
                "SlimFlux2ParallelAttnProcessor: the reference-image KV cache (kv_cache_mode "
                f"{kv_cache_mode!r}) is not supported by a compressed FLUX.2"
            )
        heads = attn.heads
        query, key, value, mlp = attn.to_qkv_mlp_proj(hidden_states).split(list(fused_widths(attn)), dim=-1)

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, heads*r) -> (B, heads, N, r)
            return x.unflatten(-1, (heads, -1)).transpose(1, 2)

        query, key, value = attn.norm_q(split(query)), attn.norm_k(split(key)), split(value)
        if image_rotary_emb is not None:  # (N, d_h) tables -> (H, N, r): each head's kept coordinates
            cos, sin = kept_rope_tables(attn, *image_rotary_emb)
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        out = padded_sdpa(query, key, value, scale=self.scale, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)  # (B, N, heads * r_vo)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class SlimFlux2AttnProcessor(SlimFluxAttnProcessor):
    """diffusers ``Flux2AttnProcessor`` (FLUX.2 double-block joint attention) for compressed per-head
    widths: FLUX.1's ``SlimFluxAttnProcessor`` (q / k / v at r_qk, r_vo per head, per-head norms,
    [text; image], rotary tables gathered at each head's kept pairs, ``padded_sdpa`` at the original
    scale), which computes exactly what the FLUX.2 stock processor computes. It names the KV-cache
    arguments of ``Flux2Attention`` so that they are not dropped silently, and refuses them: the
    reference-image KV cache is not supported."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache=None,
        kv_cache_mode: str | None = None,
        num_ref_tokens: int = 0,
    ):
        if kv_cache is not None or kv_cache_mode is not None:
            raise UnsupportedModelError(
                "SlimFlux2AttnProcessor: the reference-image KV cache (kv_cache_mode "
                f"{kv_cache_mode!r}) is not supported by a compressed FLUX.2"
            )
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


@register_adapter
class Flux2Adapter(ModelAdapter):
    family = "FLUX.2 (Flux2Transformer2DModel)"
    pipeline_attr = "transformer"
    denoiser_name = "Flux2Transformer2DModel"

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
        """(path, block, single) of every block in ``transformer_blocks`` / ``single_transformer_blocks``;
        a block of any other type (a variant's) is refused, naming its type."""
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2SingleTransformerBlock,
            Flux2TransformerBlock,
        )

        out = []
        for attr, cls, single in (
            ("transformer_blocks", Flux2TransformerBlock, False),
            ("single_transformer_blocks", Flux2SingleTransformerBlock, True),
        ):
            for i, block in enumerate(getattr(model, attr, None) or []):
                if type(block) is not cls:
                    raise UnsupportedModelError(
                        f"{attr}.{i}: block type {type(block).__name__} is not a FLUX.2 {cls.__name__} "
                        f"(a FLUX.2 variant slimdiff does not support)"
                    )
                out.append((f"{attr}.{i}", block, single))
        if not any(not single for _, _, single in out):
            raise UnsupportedModelError(f"{type(model).__name__} has no Flux2TransformerBlock")
        return out

    def units(self, model: nn.Module) -> dict[str, UnitInfo]:
        units: list[UnitInfo] = []
        for name, _, single in self.blocks(model):
            if single:
                units += _single(model, name)
                continue
            units += [_ffn(model, name, ffn) for ffn in FFNS]
            attention = _attention(model, name, False)
            _check_eps(model, attention[0].layout)
            units += attention
        return {u.name: u for u in units}

    def check_processors(self, model: nn.Module) -> None:
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2AttnProcessor,
            Flux2ParallelSelfAttnProcessor,
        )

        for name, block, single in self.blocks(model):
            stock = Flux2ParallelSelfAttnProcessor if single else Flux2AttnProcessor
            require_processor(f"{name}.attn", block.attn, stock)

    def processor(self, attn: nn.Module, layout: AttentionLayout):
        if hasattr(attn, "to_qkv_mlp_proj"):  # a single block's parallel attention
            return SlimFlux2ParallelAttnProcessor(scale=layout.head_dim**-0.5)
        return SlimFlux2AttnProcessor(scale=layout.head_dim**-0.5)

    # -- sampling ----------------------------------------------------------------------------
    def guidance_kwargs(self, model: nn.Module, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """Guidance-embedding models (``guidance_embeds``, FLUX.2 dev) take the scale as an input:
        one branch. Others (klein) run the pipeline's true classifier-free guidance with its own
        empty negative prompt when the scale is above 1: two branches."""
        if model.config.guidance_embeds:
            return {"guidance_scale": guidance_scale}, 1
        return {"guidance_scale": guidance_scale}, 2 if guidance_scale > 1.0 else 1

    def pipeline_kwargs(self, pipe, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """``guidance_kwargs``, except for step-distilled klein pipelines (``is_distilled``: no
        guidance, one branch; the scale is set to 1 so the pipeline does not warn), plus
        ``max_sequence_length`` = the tokenizer's length where it is below the pipeline's default (a
        model trained on shorter prompts): the pipelines pad every prompt to that length."""
        if getattr(getattr(pipe, "config", None), "is_distilled", False):
            kwargs, branches = {"guidance_scale": 1.0}, 1
        else:
            kwargs, branches = super().pipeline_kwargs(pipe, guidance_scale, batch)
        length = self.text_len(pipe)
        if length < self._pipeline_text_len(pipe):
            kwargs["max_sequence_length"] = length
        return kwargs, branches

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict):
        t = super().timestep(model, args, kwargs)
        return None if t is None else t * 1000  # the pipelines pass t / 1000

    @staticmethod
    def _pipeline_text_len(pipe) -> int:
        param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
        default = None if param is None else param.default
        return int(default) if isinstance(default, int) and default > 0 else FLUX2_TEXT_LEN

    def text_len(self, pipe) -> int:
        """Text tokens per prompt: the pipeline's default ``max_sequence_length`` (every prompt is
        padded to it), or the tokenizer's ``model_max_length`` where that is shorter."""
        length = self._pipeline_text_len(pipe)
        tokenizer = getattr(pipe, "tokenizer", None)
        own = int(getattr(tokenizer, "model_max_length", length) or length)
        return min(own, length)

    def attention_tokens(self, module, args, kwargs) -> tuple[int, int, int]:
        hidden = args[0] if args else kwargs["hidden_states"]
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        n = hidden.shape[1] + (0 if enc is None else enc.shape[1])
        return hidden.shape[0], n, n

    def sample_size(self, model: nn.Module) -> tuple[int, int]:
        size = getattr(model.config, "sample_size", None) or FLUX2_SAMPLE_SIZE
        return (size, size) if isinstance(size, int) else tuple(size)

    # -- positions ---------------------------------------------------------------------------
    @staticmethod
    def position_ids(
        latent_hw: tuple[int, int], text_len: int, device="cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_ids, txt_ids), (N, 4) (t, h, w, l) as the FLUX.2 pipelines build them: packed 2x2
        latent patch (row, column) at (0, row, column, 0), text token j at (0, 0, 0, j)."""
        return four_axis_position_ids(latent_hw, text_len, 1.0, device)

    def rope_angles(
        self, model: nn.Module, latent_hw: tuple[int, int] | None = None, text_len: int | None = None
    ) -> torch.Tensor:
        """(N, d_h / 2) rotary angle of every [text; image] token and coordinate pair at a serving
        shape (default: the pipelines' 128 x 128 latents and FLUX2_TEXT_LEN text tokens), from the
        model's own ``pos_embed`` (float64)."""
        img_ids, txt_ids = self.position_ids(latent_hw or self.sample_size(model), text_len or FLUX2_TEXT_LEN)
        return joint_rope_angles(model, img_ids, txt_ids)

    def example_inputs(
        self, model, batch, latent_hw, text_len, *, device="meta", dtype=torch.float32, generator=None
    ):
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
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.full((batch,), 4.0, dtype=dtype, device=device)
        return (hidden,), kwargs
