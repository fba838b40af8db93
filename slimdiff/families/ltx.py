"""LTX-Video text-to-video: ``LTXVideoTransformer3DModel`` built from ``LTXVideoTransformerBlock``s
(diffusers ``transformer_ltx.py``), sampled by ``LTXPipeline``.

A block is ``attn1`` (self-attention over the video tokens) -> ``attn2`` (cross-attention to the
T5 text) -> ``ff``, each attention an ``LTXAttention`` run by ``LTXVideoAttnProcessor``. What Wan's
machinery (``wan.py``) already covers, and what is unusual:

* **q/k RMSNorms across heads, as Wan.** ``norm_q`` / ``norm_k`` are ``torch.nn.RMSNorm(heads *
  d_h, eps=1e-5)`` on the projections' outputs before the head split (LTXAttention accepts no
  other ``qk_norm``). Both attentions' QK units are RMSNorm-aware selections with
  ``AttentionLayout.norms_across_heads`` (one ``AcrossHeadsRMSNorm`` per norm, one correction).
* **RoPE over ALL heads' coordinates (unusual).** ``LTXVideoRotaryPosEmbed(dim = heads * d_h)``
  builds ONE real (cos, sin) table of width heads x d_h, (B, N, heads * d_h), applied after the
  norm and BEFORE the head split; adjacent pairs (2i, 2i+1) are rotated (each pair's value
  repeated, diffusers' ``repeat_interleave`` layout, as FLUX / Wan), not split halves. Global pair
  g = (heads * d_h % 6) / 2 + 3 j + axis carries frequency j of axis (frame, row, column); the
  first (heads * d_h % 6) / 2 pairs are padding (cos 1, sin 0). Frequencies are geometric from 1 to
  theta = 10000 over the whole width, so head 0 holds the slowest and the last head the fastest:
  every head has its OWN frequencies. Consequences: (1) pairs never straddle heads (d_h even), so
  whole-pair selection (``linalg.rope_pair_selection``) applies per head unchanged; (2) the phase
  moments are per head: ``LTXAdapter.rope_phases`` returns (H, P, P) tables, which
  ``linalg.head_phases`` hands to each head's selection and error; (3) ``SlimLTXAttnProcessor``
  gathers the table at h d_h + ``slim_rope_index[h]`` (each head's kept coordinates in the WHOLE
  table) and rotates before the split, as the stock processor. Angles are theta_g(x) = omega_g pi /
  2 (2 x_axis - 1) with x the grid position scaled by ``rope_interpolation_scale`` / base size, an
  affine function of the position: a common shift of all positions adds one phase per pair, so
  logits depend on relative positions only (tested). The phases are read off the model's own
  ``rope`` at LTXPipeline's serving shape (161 frames at 512 x 704 px: 21 x 16 x 22 tokens,
  ``rope_interpolation_scale`` (8 / 25, 32, 32) for the 32x / 8x VAE at 25 fps).
* **attn2 (text) has no RoPE** and the same across-heads norms: coordinate selection without
  pairs, as Wan's attn2. Its query is the block's un-normalised residual stream (the stock block
  passes ``hidden_states``, not ``norm_hidden_states``): nothing changes for slimdiff, which
  records the projections' outputs.
* **Padded text is masked (unlike Wan).** LTXPipeline pads every prompt to
  ``max_sequence_length`` (128) T5 tokens and passes ``prompt_attention_mask``; the transformer turns
  it into an additive bias (0 real, -10000 padded, (B, 1, L)) that attn2 gets as
  ``attention_mask``. exp(-10000) is 0 in float32, so padded keys take no attention weight and are
  left out of attn2's key statistics (``masked_keys``, as PixArt; tested by token counts).
* **FFN** ``ff``: ``FeedForward`` with GELU(tanh) (the ungated Nystrom path).
* Resolution: LTXPipeline has no ``vae_scale_factor``, so slimdiff's generic code counts pixels in
  8-px units; ``sample_size`` is (64, 88) in those units (512 x 704 px) and ``example_inputs``'
  ``latent_hw`` is in them too: a token covers ``LTX_UNITS_PER_TOKEN`` = 4 units (32 px, the LTX
  VAE's spatial compression, times the transformer's ``patch_size``), as FLUX's latent grid is
  packed 2 x 2. Calibration passes ``num_frames = LTXAdapter.calibration_frames`` (17 frames: 3
  latent frames) instead of the pipeline's 161. Classifier-free guidance is two calls per step
  (``guidance_scale``); the transformer gets the scheduler's own timestep.

Refused (``UnsupportedModelError`` naming the module): fused projections, processors other than
``LTXVideoAttnProcessor``, q/k norms other than an affine RMSNorm over heads x d_h, key / value
heads other than the query heads, GELU-less FFNs. ``LTXImageToVideoPipeline`` /
``LTXConditionPipeline`` pass per-token timesteps (conditioning frames at t = 0), which the
statistics collector refuses (one timestep per call); LTX-2 (``LTX2VideoTransformer3DModel``,
audio-video) is another class and stays refused.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from slimdiff.core.linalg import rope_phase_moments
from slimdiff.families.attention import SlimProcessor, apply_rope, padded_sdpa
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
from slimdiff.families.wan import _check_norm

#: text tokens LTXPipeline hands the transformer: every prompt padded to ``max_sequence_length``
LTX_TEXT_LEN = 128
#: LTXPipeline's default 512 x 704 px in slimdiff's 8-px units (the module docstring)
LTX_SAMPLE_SIZE = (64, 88)
#: 8-px units per token side: the LTX VAE's 32x spatial compression / 8
LTX_UNITS_PER_TOKEN = 4
#: the LTX VAE's compressions and LTXPipeline's default frame rate (``rope_interpolation_scale``)
LTX_VAE_SPATIAL, LTX_VAE_TEMPORAL, LTX_FRAME_RATE = 32, 8, 25
#: latent frames of LTXPipeline's default 161 frames ((161 - 1) / 8 + 1)
LTX_LATENT_FRAMES = 21
#: frames of a calibration call ("a few frames": 3 latent frames)
LTX_CALIBRATION_FRAMES = 17


def rope_scale(frame_rate: float = LTX_FRAME_RATE) -> tuple[float, float, float]:
    """LTXPipeline's ``rope_interpolation_scale``: (temporal compression / frame rate, spatial
    compression, spatial compression)."""
    return (LTX_VAE_TEMPORAL / frame_rate, float(LTX_VAE_SPATIAL), float(LTX_VAE_SPATIAL))


class SlimLTXAttnProcessor(SlimProcessor):
    """diffusers ``LTXVideoAttnProcessor`` for compressed per-head widths.

    q, k and v are projected at the compressed widths (r_qk, r_vo per head); q and k are normalised
    by the across-heads norms and rotated BEFORE the head split (``image_rotary_emb`` = real
    (cos, sin) tables (B, N, heads * d_h) over every head's coordinates, gathered at h d_h +
    ``slim_rope_index[h]`` when the QK was narrowed); then split into heads, attended through
    ``padded_sdpa`` with the ORIGINAL scale 1/sqrt(d_h) under the additive text mask, and projected
    by ``to_out``."""

    def __init__(self, scale: float, head_dim: int):
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        super().__init__(scale)
        self.head_dim = int(head_dim)

    def __repr__(self) -> str:
        return f"SlimLTXAttnProcessor(scale={self.scale:.6g}, head_dim={self.head_dim})"

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch_size, heads = hidden_states.shape[0], attn.heads
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.norm_q(attn.to_q(hidden_states))  # (B, N, heads * r): norms across heads
        key = attn.norm_k(attn.to_k(context))
        value = attn.to_v(context)
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb  # (B, N, heads * d_h)
            index = getattr(attn, "slim_rope_index", None)
            if index is not None:  # each head's kept coordinates, in the whole table
                offsets = torch.arange(heads, device=index.device)[:, None] * self.head_dim
                flat = (index + offsets).reshape(-1).to(cos.device)
                cos, sin = cos[..., flat], sin[..., flat]
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        if attention_mask is not None:  # (B, N_k) or (B, 1 | N_q, N_k) -> broadcast over heads
            attention_mask = (
                attention_mask[:, None, None] if attention_mask.ndim == 2 else attention_mask[:, None]
            )

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, heads*r) -> (B, heads, N, r)
            return x.view(batch_size, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        out = padded_sdpa(split(query), split(key), split(value), scale=self.scale, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, value.shape[-1]).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _ffn(model: nn.Module, block: str) -> UnitInfo:
    from diffusers.models.activations import GELU

    ff = model.get_submodule(f"{block}.ff")
    if not isinstance(ff.net[0], GELU):
        raise UnsupportedModelError(
            f"{block}.ff: expected a GELU feed-forward, got {type(ff.net[0]).__name__}"
        )
    layout = FFNLayout(
        f"{block}.ff.net.0.proj", f"{block}.ff.net.{len(ff.net) - 1}", False, f"{block}.ff.hidden"
    )
    return ffn_unit(model, f"{block}.ff", block, layout)


def _attention(model: nn.Module, block: str, which: str) -> list[UnitInfo]:
    path = f"{block}.{which}"
    attn = model.get_submodule(path)
    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv") or hasattr(attn, "to_kv"):
        raise UnsupportedModelError(
            f"{path}: fused projections are not supported; call unfuse_qkv_projections() first"
        )
    heads = int(attn.heads)
    width = attn.to_q.out_features
    if width % heads or attn.to_k.out_features != width or attn.to_v.out_features != width:
        raise UnsupportedModelError(
            f"{path}: query / key / value widths {width} / {attn.to_k.out_features} / {attn.to_v.out_features} "
            f"do not split into {heads} equal heads (key / value heads other than the query heads are not supported)"
        )
    for norm in ("norm_q", "norm_k"):
        _check_norm(model, f"{path}.{norm}", width)
    layout = AttentionLayout(
        module=path,
        heads=heads,
        head_dim=width // heads,
        query=(f"{path}.to_q",),
        key=(f"{path}.to_k",),
        value=(f"{path}.to_v",),
        out=(f"{path}.to_out.0",),
        **attention_stat_keys(block, which),
        norms_q=(f"{path}.norm_q",),
        norms_k=(f"{path}.norm_k",),
        norms_head_major=False,  # the norms see (B, N, heads * d_h), before the head split
        rope=which == "attn1",
        masked_keys=which == "attn2",  # padded T5 tokens: additive -10000 bias, no attention weight
        norms_across_heads=True,
    )
    return attention_units(model, block, which, layout)


@register_adapter
class LTXAdapter(ModelAdapter):
    family = "LTX-Video text-to-video (LTXVideoTransformer3DModel)"
    pipeline_attr = "transformer"
    denoiser_name = "LTXVideoTransformer3DModel"
    block_type = "diffusers.models.transformers.transformer_ltx:LTXVideoTransformerBlock"
    #: frames of every calibration / evaluation pipeline call (``pipeline_kwargs``)
    calibration_frames = LTX_CALIBRATION_FRAMES

    def units(self, model: nn.Module) -> dict[str, UnitInfo]:
        units: list[UnitInfo] = []
        for name, _ in self.blocks(model):
            units += _attention(model, name, "attn1")
            units += _attention(model, name, "attn2")
            units.append(_ffn(model, name))
        return {u.name: u for u in units}

    def check_processors(self, model: nn.Module) -> None:
        from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

        for name, block in self.blocks(model):
            for which in ("attn1", "attn2"):
                require_processor(f"{name}.{which}", getattr(block, which), LTXVideoAttnProcessor)

    def processor(self, attn: nn.Module, layout: AttentionLayout) -> Any:
        return SlimLTXAttnProcessor(scale=layout.head_dim**-0.5, head_dim=layout.head_dim)

    def pipeline_kwargs(self, pipe, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """The stock classifier-free guidance and ``num_frames = calibration_frames``."""
        kwargs, branches = super().pipeline_kwargs(pipe, guidance_scale, batch)
        kwargs["num_frames"] = self.calibration_frames
        return kwargs, branches

    def sample_size(self, model: nn.Module) -> tuple[int, int]:
        """LTXPipeline's default 512 x 704 px in 8-px units (the module docstring)."""
        return LTX_SAMPLE_SIZE

    def text_len(self, pipe) -> int:
        """LTXPipeline's ``max_sequence_length`` default (128): every prompt is padded to it."""
        param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
        default = None if param is None else param.default
        return int(default) if isinstance(default, int) and default > 0 else LTX_TEXT_LEN

    def token_grid(
        self, model: nn.Module, latent_hw: tuple[int, int], latent_frames: int
    ) -> tuple[int, int, int]:
        """(frames, rows, columns) of the transformer's tokens for a latent video of ``latent_frames``
        frames x ``latent_hw`` (8-px units): the VAE's 4 units per latent, the transformer's patches."""
        cfg = model.config
        side = LTX_UNITS_PER_TOKEN * cfg.patch_size
        return latent_frames // cfg.patch_size_t, latent_hw[0] // side, latent_hw[1] // side

    def rotary_tables(
        self,
        model: nn.Module,
        latent_hw: tuple[int, int],
        latent_frames: int,
        frame_rate: float = LTX_FRAME_RATE,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (N, heads * d_h), from the model's own ``rope`` as LTXPipeline calls it
        (tokens in the transformer's order: frame, row, column)."""
        frames, rows, cols = self.token_grid(model, latent_hw, latent_frames)
        probe = torch.empty((1, 0), device=model.proj_in.weight.device)  # only its batch size is read
        with torch.no_grad():
            cos, sin = model.rope(probe, frames, rows, cols, rope_scale(frame_rate))
        return cos[0], sin[0]

    def rope_angles(
        self, model: nn.Module, latent_hw: tuple[int, int] | None = None, latent_frames: int | None = None
    ) -> torch.Tensor:
        """(N, heads, d_h / 2) rotary angle of every video token and every head's coordinate pair
        at a serving shape (default: LTXPipeline's 161 frames at 512 x 704 px), float64. Raises if
        the table does not repeat each pair's value (the adjacent-pair layout)."""
        cos, sin = self.rotary_tables(
            model, latent_hw or self.sample_size(model), latent_frames or LTX_LATENT_FRAMES
        )
        if not (torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(sin[:, 0::2], sin[:, 1::2])):
            raise UnsupportedModelError(
                f"{type(model).__name__}.rope: the rotary table does not rotate adjacent pairs (2i, 2i+1)"
            )
        heads = model.transformer_blocks[0].attn1.heads
        angles = torch.atan2(sin[:, 0::2].double().cpu(), cos[:, 0::2].double().cpu())
        return angles.view(angles.shape[0], heads, -1)

    def rope_phases(self, model: nn.Module, sequence=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head phase moments, each (heads, d_h / 2, d_h / 2) (``linalg.head_phases``)."""
        angles = self._angles(model, sequence)
        moments = [rope_phase_moments(angles[:, h]) for h in range(angles.shape[1])]
        return torch.stack([c for c, _ in moments]), torch.stack([s for _, s in moments])

    def example_inputs(
        self,
        model,
        batch,
        latent_hw,
        text_len,
        *,
        device="meta",
        dtype=torch.float32,
        generator=None,
        latent_frames: int | None = None,
    ):
        """One forward as LTXPipeline makes it: packed video tokens (batch, N, in_channels) of
        ``latent_frames`` (default the serving 21) x ``latent_hw`` (8-px units), ``text_len`` T5
        embeddings with an all-ones mask, timestep 500, the pipeline's ``rope_interpolation_scale``."""
        cfg = model.config
        frames, rows, cols = self.token_grid(model, latent_hw, latent_frames or LTX_LATENT_FRAMES)
        hidden = randn((batch, frames * rows * cols, cfg.in_channels), device, dtype, generator)
        text = randn((batch, text_len, cfg.caption_channels), device, dtype, generator)
        kwargs = {
            "encoder_hidden_states": text,
            "timestep": torch.full((batch,), 500.0, dtype=dtype, device=device),
            "encoder_attention_mask": torch.ones((batch, text_len), dtype=dtype, device=device),
            "num_frames": frames,
            "height": rows,
            "width": cols,
            "rope_interpolation_scale": rope_scale(),
        }
        return (hidden,), kwargs
