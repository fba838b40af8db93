"""Wan 2.1 text-to-video and Wan 2.2 A14B (two denoisers, below): ``WanTransformer3DModel`` built
from ``WanTransformerBlock``s (diffusers ``transformer_wan.py``), sampled by ``WanPipeline``.

A block is ``attn1`` (self-attention over the video tokens) -> ``attn2`` (cross-attention to the
text) -> ``ffn``, each a ``WanAttention`` run by ``WanAttnProcessor`` (see docs/METHOD.md,
"FLUX and RoPE" and "Wan"):

* **q/k RMSNorms across heads.** ``norm_q`` / ``norm_k`` are ``torch.nn.RMSNorm(heads * d_h)``,
  applied to the projections' outputs BEFORE the head split (``qk_norm="rms_norm_across_heads"``;
  diffusers builds them in every attention whatever the config says). A token's norm scale
  therefore depends on every head's coordinates. Both attentions' QK units are compressed by
  RMSNorm-aware selection (``qk_norm: select``) with ``AttentionLayout.norms_across_heads``: each
  head keeps its own coordinates (chosen, as before, on its normalised q/k second moments), and
  the norm correction c = |S| / (rho D) is computed over the kept coordinates of ALL heads
  together (``linalg.rms_norm_correction_across_heads``, |S| = H r, D = H d_h), so each norm
  becomes ONE ``attention.AcrossHeadsRMSNorm`` over the H r kept coordinates (weight g_S / sqrt(c),
  eps / c). The predicted error's renormalisation term uses one factor per token for all heads
  (``linalg.selection_errors_across_heads``).
* **RoPE in attn1 only**, over (frame, row, column) of the patched latent grid: the head's d_h
  coordinates are split into axes of d_h - 4 floor(d_h / 6), 2 floor(d_h / 6) and 2 floor(d_h / 6)
  coordinates (Wan 2.1: 44, 42, 42), and adjacent pairs (2i, 2i+1) are rotated (real cos / sin
  tables with each pair's value repeated, FLUX's layout) AFTER the norm. So attn1's QK keeps whole
  pairs, the same in q and k (``linalg.rope_pair_selection``), and ``SlimWanAttnProcessor``
  gathers the tables at every head's kept pairs (``slim_rope_index``). The pair error form's phase
  moments come from the model's own ``rope`` at the serving shape (81 frames at 480 x 832 px:
  21 x 30 x 52 patches).
* **attn2 (text) has no RoPE**, but has the same across-heads q/k norms: the whitening-SVD of an
  un-normed QK does NOT apply (a linear map before an RMSNorm does not commute with it), so attn2's
  QK is the coordinate selection above, without pairs. Its VO is the ordinary whitening-SVD.
* **Padded text tokens are real inputs.** ``WanPipeline`` pads every prompt to
  ``max_sequence_length`` (512) UMT5 tokens and sets the padded embeddings to ZERO; the
  transformer's ``text_embedder`` (linear -> GELU-tanh -> linear) maps each zero row to one
  non-zero constant vector, and attn2 gets no mask. So every padded token is a key / value of
  every cross-attention softmax (it shares the attention weight with the real tokens), and
  slimdiff counts them in attn2's key statistics like the real ones, as for FLUX (PixArt and
  Qwen-Image mask their padding and leave it out). Tested: a WanPipeline call of 2 prompts (5 and
  2 words) gives attn2 keys of 512 tokens per sample per call, 4096 in 8 calls (2 steps x 2 CFG
  branches x 2 samples), and the transformer's output changes when the padded tokens are removed.
* **FFN** ``ffn``: ``FeedForward`` with GELU(tanh) (the ungated Nystrom path).
* The transformer is called with the scheduler's own timestep (no rescaling) and classifier-free
  guidance is two calls per step (``guidance_scale``, the default negative prompt ""). Calibration
  passes ``num_frames = WanAdapter.calibration_frames`` (17 frames: 5 latent frames), a few frames
  instead of the pipeline's 81.

Wan 2.2 A14B (``WanPipeline`` with ``transformer`` and ``transformer_2`` and a ``boundary_ratio``
in its config): the sampler calls ``transformer`` at the steps with t >= boundary_ratio x
``num_train_timesteps`` (high noise) and ``transformer_2`` at the others, each with classifier-free
guidance (``guidance_scale`` and ``guidance_scale_2``, which defaults to it; calibration passes
``guidance_scale`` only). ``denoiser_components`` lists both and ``steps_served`` gives each its
steps, computed as the pipeline does, so ``slimdiff.slim`` compresses both: one calibration run
with a collector on each (each buckets only its own steps), then per denoiser its own influence,
error profiles, rank plan under the same budget, compression and report; ``save_compressed`` writes
both as ``SlimWanTransformer3DModel`` and ``DiffusionPipeline.from_pretrained`` loads both. Only the
A14B text-to-video layout is supported: both denoisers ``WanTransformer3DModel`` with the blocks
above; two denoisers of different classes, or one this adapter refuses (below), are refused with one
message naming the component. A ``transformer_2`` without ``boundary_ratio`` is never called by the
pipeline and is left as it is. The staged pipeline (``tasks/``) calibrates one denoiser and refuses
such pipelines; LoRA-aware calibration of them is refused too. Wan 2.2 TI2V-5B (one transformer,
per-token timesteps) has the same blocks and passes the adapter as a Wan 2.1 denoiser, but is not
tested here.

Refused (``UnsupportedModelError`` naming the module): the image cross-attention of Wan 2.1 I2V /
FLF2V (``add_k_proj`` / ``add_v_proj`` with ``norm_added_k``: a second softmax over 257 CLIP image
tokens sharing the query; handling it needs a second key stream in the QK unit and a summed VO
statistic), fused projections (``fuse_projections()``: unfuse first), processors other than
``WanAttnProcessor``, q/k norms other than an RMSNorm over heads x d_h, other Wan-family denoisers
(VACE, Animate, ChronoEdit: other classes).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from slimdiff.families.attention import AcrossHeadsRMSNorm, SlimProcessor, apply_rope, padded_sdpa
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
    stock_class,
)

#: text tokens WanPipeline hands the transformer: every prompt padded to ``max_sequence_length``
WAN_TEXT_LEN = 512
#: WanPipeline's default 480 x 832 px at the VAE's 8x spatial compression
WAN_SAMPLE_SIZE = (60, 104)
#: latent frames of WanPipeline's default 81 frames (4x temporal compression: (81 - 1) / 4 + 1)
WAN_LATENT_FRAMES = 21
#: frames of a calibration call ("a few frames": 5 latent frames)
WAN_CALIBRATION_FRAMES = 17


class SlimWanAttnProcessor(SlimProcessor):
    """diffusers ``WanAttnProcessor`` for compressed per-head widths (text-to-video attention).

    q, k and v are projected at the compressed widths (r_qk, r_vo per head); q and k are normalised
    BEFORE the head split by the across-heads norms (the stock ``RMSNorm(heads * d_h)``, or
    ``AcrossHeadsRMSNorm`` over the kept coordinates after selection); then split into heads
    (B, H, N, r), rotated (self-attention: ``rotary_emb`` = real (cos, sin) tables (1, N, 1, d_h),
    gathered at the attention's ``slim_rope_index`` (H, r_qk) when its QK was narrowed), attended
    through ``padded_sdpa`` with the ORIGINAL scale 1/sqrt(d_h), and projected by ``to_out``."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:

        if getattr(attn, "add_k_proj", None) is not None:
            raise ValueError(
                "SlimWanAttnProcessor does not support the I2V image cross-attention (add_k_proj)"
            )
        batch_size, heads = hidden_states.shape[0], attn.heads
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, heads*r) -> (B, heads, N, r)
            return x.view(batch_size, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query = split(attn.norm_q(attn.to_q(hidden_states)))  # the norms act across heads: before the split
        key = split(attn.norm_k(attn.to_k(context)))
        value = split(attn.to_v(context))
        if rotary_emb is not None:
            cos, sin = (t.reshape(t.shape[-3], t.shape[-1]) for t in rotary_emb)  # (1, N, 1, d_h) -> (N, d_h)
            index = getattr(attn, "slim_rope_index", None)
            if index is not None:  # (N, d_h) -> (H, N, r): each head's kept coordinates
                index = index.to(cos.device)
                cos, sin = cos[:, index].permute(1, 0, 2), sin[:, index].permute(1, 0, 2)
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        out = padded_sdpa(query, key, value, scale=self.scale, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * value.shape[-1]).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _ffn_activation(model: nn.Module, block: str) -> nn.Module:
    from diffusers.models.activations import GELU

    ff = model.get_submodule(f"{block}.ffn")
    if not isinstance(ff.net[0], GELU):
        raise UnsupportedModelError(
            f"{block}.ffn: expected a GELU feed-forward, got {type(ff.net[0]).__name__}"
        )
    return ff


def _ffn(model: nn.Module, block: str) -> UnitInfo:
    ff = _ffn_activation(model, block)
    layout = FFNLayout(
        f"{block}.ffn.net.0.proj", f"{block}.ffn.net.{len(ff.net) - 1}", False, f"{block}.ffn.hidden"
    )
    return ffn_unit(model, f"{block}.ffn", block, layout)


def _check_norm(model: nn.Module, path: str, width: int) -> None:

    mod = model.get_submodule(path)
    if isinstance(mod, AcrossHeadsRMSNorm):
        return
    if not (
        isinstance(mod, nn.RMSNorm)
        and tuple(mod.normalized_shape) == (width,)
        and mod.weight is not None
        and mod.eps is not None
    ):
        shape = tuple(getattr(mod, "normalized_shape", ()) or ())
        raise UnsupportedModelError(
            f"{path}: qk norm {type(mod).__name__}{shape} is not supported (an affine torch.nn.RMSNorm over "
            f"heads x head_dim = {width} coordinates with an explicit eps)"
        )


def _check_attention(model: nn.Module, path: str) -> nn.Module:
    """The attention at ``path``, refused when it is not a text-to-video one (compressed or not)."""
    attn = model.get_submodule(path)
    if getattr(attn, "add_k_proj", None) is not None or getattr(attn, "added_kv_proj_dim", None) is not None:
        raise UnsupportedModelError(
            f"{path}: the image cross-attention of Wan I2V / FLF2V (add_k_proj / add_v_proj over CLIP image "
            "tokens) is not supported; only text-to-video WanTransformer3DModel (added_kv_proj_dim None)"
        )
    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv") or hasattr(attn, "to_kv"):
        raise UnsupportedModelError(
            f"{path}: fused projections are not supported; call unfuse_qkv_projections() first"
        )
    return attn


def _attention(model: nn.Module, block: str, which: str) -> list[UnitInfo]:
    path = f"{block}.{which}"
    attn = _check_attention(model, path)
    heads = int(attn.heads)
    width = attn.to_q.out_features
    if width % heads or attn.to_k.out_features != width:
        raise UnsupportedModelError(
            f"{path}: query width {width} / key width {attn.to_k.out_features} do not split into {heads} equal heads"
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
        norms_across_heads=True,
    )
    return attention_units(model, block, which, layout)


@register_adapter
class WanAdapter(ModelAdapter):
    family = "Wan 2.1 text-to-video (WanTransformer3DModel)"
    pipeline_attr = "transformer"
    denoiser_name = "WanTransformer3DModel"
    block_type = "diffusers.models.transformers.transformer_wan:WanTransformerBlock"
    #: frames of every calibration / evaluation pipeline call (``pipeline_kwargs``)
    calibration_frames = WAN_CALIBRATION_FRAMES

    def units(self, model: nn.Module) -> dict[str, UnitInfo]:
        units: list[UnitInfo] = []
        for name, _ in self.blocks(model):
            units += _attention(model, name, "attn1")
            units += _attention(model, name, "attn2")
            units.append(_ffn(model, name))
        return {u.name: u for u in units}

    def check_processors(self, model: nn.Module) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        for name, block in self.blocks(model):
            for which in ("attn1", "attn2"):
                require_processor(f"{name}.{which}", getattr(block, which), WanAttnProcessor)

    def processor(self, attn: nn.Module, layout: AttentionLayout) -> Any:
        return SlimWanAttnProcessor(scale=layout.head_dim**-0.5)

    def pipeline_kwargs(self, pipe, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """The stock classifier-free guidance (``guidance_scale``, two calls per step above 1) and
        ``num_frames = calibration_frames``. In a Wan 2.2 A14B pipeline ``transformer_2`` gets the
        same guidance (WanPipeline's ``guidance_scale_2`` defaults to ``guidance_scale``)."""
        kwargs, branches = super().pipeline_kwargs(pipe, guidance_scale, batch)
        kwargs["num_frames"] = self.calibration_frames
        return kwargs, branches

    # -- Wan 2.2 A14B: two denoisers ----------------------------------------------------------
    @staticmethod
    def _boundary(pipe) -> float | None:
        """The boundary ratio when the pipeline calls a ``transformer_2`` (else None)."""
        if getattr(pipe, "transformer_2", None) is None:
            return None
        ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
        return None if ratio is None else float(ratio)

    def denoiser_components(self, pipe) -> tuple[str, ...]:
        """``("transformer",)``, or ``("transformer", "transformer_2")`` for a Wan 2.2 A14B pipeline
        (a ``transformer_2`` and a ``boundary_ratio``; without the ratio WanPipeline never calls
        ``transformer_2``). Both must be text-to-video ``WanTransformer3DModel``s this adapter
        supports: anything else raises one UnsupportedModelError naming the component."""
        if self._boundary(pipe) is None:
            return ("transformer",)
        pipeline = type(pipe).__name__
        models = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
        classes = {n: stock_class(m).__name__ for n, m in models.items()}
        if len(set(classes.values())) > 1 or not all(
            isinstance(m, self.denoiser_class()) for m in models.values()
        ):
            raise UnsupportedModelError(
                f"{pipeline} has two denoisers of different classes (transformer: {classes['transformer']}, "
                f"transformer_2: {classes['transformer_2']}): slimdiff compresses a two-denoiser pipeline "
                f"(Wan 2.2 A14B) only when both are {self.denoiser_name}s of the text-to-video layout"
            )
        for name, model in models.items():
            try:  # what units() refuses, on compressed denoisers too (a compressed pipeline is saved)
                for block, _ in self.blocks(model):
                    for which in ("attn1", "attn2"):
                        _check_attention(model, f"{block}.{which}")
                    _ffn_activation(model, block)
                self.check_processors(model)
            except UnsupportedModelError as err:
                raise UnsupportedModelError(
                    f"{pipeline}'s {name} is not supported, so its two denoisers (Wan 2.2 A14B) cannot "
                    f"be compressed: {err}"
                ) from err
        return ("transformer", "transformer_2")

    def steps_served(self, pipe, name: str):
        """The steps WanPipeline calls ``name`` at, as a mask of the scheduler's timesteps:
        t >= boundary_ratio x num_train_timesteps for ``transformer``, below it for
        ``transformer_2`` (the pipeline's own comparison); None (every step) without a boundary."""
        ratio = self._boundary(pipe)
        if ratio is None:
            return None
        boundary = ratio * pipe.scheduler.config.num_train_timesteps
        if name == "transformer":
            return lambda timesteps: timesteps >= boundary
        if name == "transformer_2":
            return lambda timesteps: timesteps < boundary
        raise KeyError(f"{name!r} is not a denoiser of {type(pipe).__name__}")

    def sample_size(self, model: nn.Module) -> tuple[int, int]:
        size = getattr(model.config, "sample_size", None) or WAN_SAMPLE_SIZE
        return (size, size) if isinstance(size, int) else tuple(size)

    def text_len(self, pipe) -> int:
        """WanPipeline's ``max_sequence_length`` default (512): every prompt is padded to it."""
        param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
        default = None if param is None else param.default
        return int(default) if isinstance(default, int) and default > 0 else WAN_TEXT_LEN

    def rotary_tables(
        self, model: nn.Module, latent_hw: tuple[int, int], latent_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (N, d_h), from the model's own ``rope`` for a latent video of
        ``latent_frames`` x ``latent_hw`` (tokens in the transformer's order: frame, row, column)."""
        probe = torch.empty((1, 0, latent_frames, *latent_hw), device=model.rope.freqs_cos.device)
        with torch.no_grad():
            cos, sin = model.rope(probe)  # (1, N, 1, d_h): only the shape of the input is read
        return cos[0, :, 0], sin[0, :, 0]

    def rope_angles(
        self, model: nn.Module, latent_hw: tuple[int, int] | None = None, latent_frames: int | None = None
    ) -> torch.Tensor:
        """(N, d_h / 2) rotary angle of every video token and coordinate pair at a serving shape
        (default: WanPipeline's 81 frames at 480 x 832 px), float64."""
        cos, sin = self.rotary_tables(
            model, latent_hw or self.sample_size(model), latent_frames or WAN_LATENT_FRAMES
        )
        return torch.atan2(sin[:, 0::2].double().cpu(), cos[:, 0::2].double().cpu())

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
        """One forward as WanPipeline makes it: a (batch, channels, frames, h, w) latent video
        (``latent_frames``, default the serving 21), ``text_len`` text embeddings, timestep 500."""
        cfg = model.config
        frames = latent_frames or WAN_LATENT_FRAMES
        hidden = randn((batch, cfg.in_channels, frames, *latent_hw), device, dtype, generator)
        text = randn((batch, text_len, cfg.text_dim), device, dtype, generator)
        kwargs = {
            "encoder_hidden_states": text,
            "timestep": torch.full((batch,), 500.0, dtype=dtype, device=device),
        }
        return (hidden,), kwargs
