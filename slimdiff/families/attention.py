"""Attention for compressed heads: the processor, the kernel rule, and a probe of the SDPA backend.

Why this module exists: ``F.scaled_dot_product_attention`` runs its fused kernels (flash attention
on the CPU; flash / memory-efficient / cuDNN on CUDA) only when the query/key head width equals the
value head width. A SlimDiff plan may give a head r_qk query-key columns and r_vo value columns
with r_qk != r_vo; passed as they are, PyTorch falls back to its math kernel, measured on the 2-core
dev machine at 2.5-4x *slower* than the original uncompressed attention (batch 2, 8 heads, 4096
tokens). The processor therefore zero-pads the narrower of q/k or v to one common width before the
call. That is exact: zero columns of q and k add nothing to the logits q k^T, and zero columns of
v produce zero output columns, which are sliced off before ``to_out``. Its cost is the attention
matmuls at max(r_qk, r_vo) instead of r_qk + r_vo, still never more than the original's d_h.

On CUDA the width is also rounded up to a multiple of 8 (flash attention's requirement); on the
CPU any width runs on the fused kernel.

``sdpa_backends(model, *args)`` runs one forward under the PyTorch profiler and reports, per
attention module, which SDPA implementation ran (``flash``, ``efficient``, ``cudnn``, ``math``),
so tests and benchmarks can assert that a compressed model stays on the original's kernel.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: aten op name (substring) -> backend label, most specific first
_BACKEND_OPS = (
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_fused_attention_overrideable", "fused"),
    ("_scaled_dot_product_attention_math", "math"),
    ("_efficient_attention_forward", "efficient"),
    ("_flash_attention_forward", "flash"),
)

#: head widths are padded to a multiple of this on CUDA (flash attention needs head_dim % 8 == 0)
CUDA_HEAD_MULTIPLE = 8


def common_head_width(r_qk: int, r_vo: int, device: torch.device) -> int:
    """The one head width q, k and v are padded to before SDPA (see the module docstring)."""
    width = max(r_qk, r_vo)
    if device.type == "cuda":
        width = -(-width // CUDA_HEAD_MULTIPLE) * CUDA_HEAD_MULTIPLE
    return width


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def padded_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` for q/k heads of width r_qk and v heads of width r_vo.

    query (B, H, N_q, r_qk), key (B, H, N_k, r_qk), value (B, H, N_k, r_vo) -> (B, H, N_q, r_vo).
    All three are zero-padded to ``common_head_width`` so the fused kernels apply; ``scale`` must be
    given (the padded width is not the width the logits were designed for)."""
    r_vo = value.shape[-1]
    width = common_head_width(query.shape[-1], r_vo, query.device)
    out = F.scaled_dot_product_attention(
        _pad_last(query, width),
        _pad_last(key, width),
        _pad_last(value, width),
        attn_mask=attn_mask,
        dropout_p=0.0,
        is_causal=False,
        scale=scale,
    )
    return out if width == r_vo else out[..., :r_vo]


class SlimProcessor:
    """What every compressed attention processor shares: the ORIGINAL softmax scale 1/sqrt(d_h)
    (the QK rewrite approximates the original logits, so rescaling by 1/sqrt(r_qk) would sharpen
    every attention map), the marker that the statistics hooks accept it (``slimdiff_supported``)
    and that it runs ``padded_sdpa`` at one common head width (``slimdiff_pads_heads``: FLOPs and
    latency count that width)."""

    slimdiff_supported = True
    slimdiff_pads_heads = True

    def __init__(self, scale: float):
        if not scale > 0:
            raise ValueError(f"scale must be positive (1/sqrt(original head dim)), got {scale}")
        self.scale = float(scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale:.6g})"


class SlimAttnProcessor(SlimProcessor):
    """diffusers ``AttnProcessor2_0`` for attention with compressed per-head q/k and v widths.

    q and k are split into heads of width r_qk = to_q.out_features / heads, v into heads of
    width r_vo = to_v.out_features / heads, and attention runs through ``padded_sdpa`` (one common
    width, so the fused kernel is used) with the ORIGINAL softmax scale 1/sqrt(d_h): the QK
    decomposition approximates the original logits q k^T, so rescaling by 1/sqrt(r_qk) would
    sharpen every attention map."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            # (B, C, H, W) -> (B, H*W, C)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (B*heads, 1|N_q, N_k) -> (B, heads, 1|N_q, N_k) as scaled_dot_product_attention expects
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        r_qk = key.shape[-1] // heads
        r_vo = value.shape[-1] // heads
        # (B, N, heads*r) -> (B, heads, N, r)
        query = query.view(batch_size, -1, heads, r_qk).transpose(1, 2)
        key = key.view(batch_size, -1, heads, r_qk).transpose(1, 2)
        value = value.view(batch_size, -1, heads, r_vo).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # (B, heads, N_q, r_vo)
        hidden_states = padded_sdpa(query, key, value, scale=self.scale, attn_mask=attention_mask)
        # (B, heads, N_q, r_vo) -> (B, N_q, heads*r_vo)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * r_vo)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


class HeadwiseRMSNorm(nn.Module):
    """RMSNorm of each head's kept coordinates with a per-head weight and epsilon: what a stock
    per-head ``RMSNorm(d_h)`` becomes after RMSNorm-aware coordinate selection keeps a different
    set of r coordinates in every head (``slimdiff.core.linalg.rms_coordinate_selection``). Input and
    output (B, heads, N, r)."""

    def __init__(self, heads: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, dim, device=device, dtype=dtype))
        self.register_buffer("eps", torch.full((heads,), 1e-6, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)  # (B, H, N, 1)
        x = x * torch.rsqrt(variance + self.eps.view(1, -1, 1, 1))
        return (x.to(self.weight.dtype) * self.weight[None, :, None, :]).to(x.dtype)


class AcrossHeadsRMSNorm(HeadwiseRMSNorm):
    """ONE RMSNorm over all heads' kept coordinates together: what a stock ``RMSNorm(heads * d_h)``
    applied before the head split (Wan's q/k norms) becomes after RMSNorm-aware selection keeps r
    coordinates of every head. Parameters as ``HeadwiseRMSNorm`` (weight (heads, r), eps (heads,),
    every head's eps the same: ``linalg.rms_norm_correction_across_heads`` gives one correction per
    norm); input and output (..., heads * r), head-major as the projections' outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # kept: q / k must stay in v's dtype for SDPA (half-precision models)
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps[0])
        return (x.to(self.weight.dtype) * self.weight.reshape(-1)).to(dtype)


class QKPostProjection(nn.Module):
    """Per-head projections applied to q and k AFTER their norms (``compression.qk_norm:
    project``): logits n(q) T_q T_k^T n(k)^T of width r instead of d_h. ``t_q``, ``t_k``
    (heads, d_h, r)."""

    def __init__(self, heads: int, head_dim: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.t_q = nn.Parameter(torch.zeros(heads, head_dim, rank, device=device, dtype=dtype))
        self.t_k = nn.Parameter(torch.zeros(heads, head_dim, rank, device=device, dtype=dtype))

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, H, N, d_h) x (H, d_h, r) -> (B, H, N, r)
        return (
            torch.einsum("bhnd,hdr->bhnr", query, self.t_q.to(query.dtype)),
            torch.einsum("bhnd,hdr->bhnr", key, self.t_k.to(key.dtype)),
        )


class SlimJointAttnProcessor(SlimProcessor):
    """diffusers ``JointAttnProcessor2_0`` (MMDiT joint attention) for compressed per-head widths.

    Image tokens are projected by ``to_q/to_k/to_v`` and text tokens by ``add_q_proj/add_k_proj/
    add_v_proj`` at the compressed widths r_qk / r_vo (one width per head for both streams), the
    per-head q/k norms run on those widths, both streams are concatenated ([image; text], as the
    stock processor does), attention runs through ``padded_sdpa`` with the ORIGINAL scale
    1/sqrt(d_h), and the output is split again for ``to_out.0`` and ``to_add_out`` (absent in a
    ``context_pre_only`` block, whose text output is discarded). Without ``encoder_hidden_states``
    (SD3.5's image-only ``attn2``) it is plain self-attention."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ):
        batch_size, n_image = hidden_states.shape[0], hidden_states.shape[1]
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, heads*r) -> (B, heads, N, r)
            return x.view(batch_size, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query, key, value = (
            split(attn.to_q(hidden_states)),
            split(attn.to_k(hidden_states)),
            split(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            c_query = split(attn.add_q_proj(encoder_hidden_states))
            c_key = split(attn.add_k_proj(encoder_hidden_states))
            c_value = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            # (B, heads, N_image + N_text, r): image tokens first, as JointAttnProcessor2_0
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)
        post = getattr(attn, "slim_qk_post", None)
        if post is not None:  # qk_norm "project": cheaper logits after the norms
            query, key = post(query, key)

        out = padded_sdpa(
            query, key, value, scale=self.scale, attn_mask=attention_mask
        )  # (B, heads, N, r_vo)
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * value.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, c_out = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                c_out = attn.to_add_out(c_out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)  # dropout
        if encoder_hidden_states is not None:
            return out, c_out
        return out


def is_attention_module(m: nn.Module) -> bool:
    """A diffusers attention module: the classic ``Attention`` or one of the newer per-family
    classes built on ``AttentionModuleMixin`` (``FluxAttention``, ...)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return isinstance(m, Attention | AttentionModuleMixin)


#: the processors that pad q/k and v heads to one width (``padded_sdpa``)
def pads_heads(processor: Any) -> bool:
    """Whether ``processor`` runs ``padded_sdpa`` at one common head width (``SlimProcessor``)."""
    return getattr(processor, "slimdiff_pads_heads", False) is True


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent coordinate pairs (2i, 2i+1) of x (B, H, N, r) by the angles whose cos / sin
    tables (H or 1, N, r) repeat each pair's value twice (diffusers' ``repeat_interleave_real``
    tables, as FLUX uses), in float32 as diffusers' ``apply_rotary_emb`` does."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def kept_rope_tables(
    attn: nn.Module, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's real rotary tables (N, d_h) narrowed to each head's kept coordinates, (H, N, r),
    when the attention's QK kept a subset of rotary pairs (``slim_rope_index``); else unchanged."""
    index = getattr(attn, "slim_rope_index", None)
    if index is None:
        return cos, sin
    index = index.to(cos.device)
    return cos[:, index].permute(1, 0, 2), sin[:, index].permute(1, 0, 2)


class SlimFluxAttnProcessor(SlimProcessor):
    """diffusers ``FluxAttnProcessor`` for compressed per-head widths, with the rotary tables
    narrowed to each head's kept pairs.

    q, k and v are projected at the compressed widths (r_qk, r_vo per head), split into heads
    (B, H, N, r), normalised by the per-head norms (stock ``RMSNorm`` or ``HeadwiseRMSNorm`` after
    pair selection), the text stream's projections are prepended ([text; image] as FLUX does),
    the rotary embedding is applied with cos / sin gathered at the attention's ``slim_rope_index``
    (H, r_qk) when its QK was narrowed (the stock tables otherwise), and attention runs through
    ``padded_sdpa`` with the ORIGINAL scale 1/sqrt(d_h). Outputs as the stock processor: double
    blocks split and project both streams; single blocks (``pre_only``) return the attention output
    for the block's packed ``proj_out``."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        batch_size, heads = hidden_states.shape[0], attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, heads*r) -> (B, heads, N, r)
            return x.view(batch_size, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query = attn.norm_q(split(attn.to_q(hidden_states)))
        key = attn.norm_k(split(attn.to_k(hidden_states)))
        value = split(attn.to_v(hidden_states))
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            c_query = attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states)))
            c_key = attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states)))
            c_value = split(attn.add_v_proj(encoder_hidden_states))
            query = torch.cat([c_query, query], dim=2)  # text tokens first, as FLUX
            key = torch.cat([c_key, key], dim=2)
            value = torch.cat([c_value, value], dim=2)
        if image_rotary_emb is not None:  # (N, d_h) tables -> (H, N, r): each head's kept coordinates
            cos, sin = kept_rope_tables(attn, *image_rotary_emb)
            query = apply_rope(query, cos, sin)
            key = apply_rope(key, cos, sin)

        out = padded_sdpa(query, key, value, scale=self.scale, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * value.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        n_text = encoder_hidden_states.shape[1]
        c_out, out = out[:, :n_text], out[:, n_text:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(c_out.contiguous())


def apply_rope_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent coordinate pairs (2i, 2i+1) of x (B, H, N, r), read as complex numbers
    x_2i + i x_2i+1, by the unit complex table ``freqs`` (H or 1, N, r / 2) (or (N, r / 2)), in
    float32: the arithmetic of Qwen-Image's ``apply_rotary_emb_qwen(use_real=False)``."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


class SlimQwenAttnProcessor(SlimProcessor):
    """diffusers ``QwenDoubleStreamAttnProcessor2_0`` (Qwen-Image's joint attention) for compressed
    per-head widths, with the rotary tables narrowed to each head's kept pairs.

    Image tokens are projected by ``to_q/to_k/to_v``, text tokens by ``add_q_proj/add_k_proj/
    add_v_proj`` at the compressed widths (r_qk, r_vo per head), split into heads (B, H, N, r) and
    normalised by the per-head norms (stock ``RMSNorm`` or ``HeadwiseRMSNorm`` after pair
    selection). Both streams get their own rotary table (``image_rotary_emb`` = (image, text)
    complex tables (N, d_h / 2): Qwen-Image gives text tokens positions too), gathered at the kept
    pairs of the attention's ``slim_rope_index`` (H, r_qk) when its QK was narrowed. The streams are
    concatenated [text; image] as the stock processor does, the padded text tokens
    (``encoder_hidden_states_mask`` False) are masked out of the keys with the stock processor's
    joint mask, attention runs through ``padded_sdpa`` with the ORIGINAL scale 1/sqrt(d_h), and the
    output is split again and returned as (image output after ``to_out``, text output after
    ``to_add_out``)."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if encoder_hidden_states is None:
            raise ValueError("SlimQwenAttnProcessor requires encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError(
                "SlimQwenAttnProcessor does not accept an external attention_mask (as the stock "
                "QwenDoubleStreamAttnProcessor2_0): pass encoder_hidden_states_mask"
            )
        batch_size, heads, n_text = hidden_states.shape[0], attn.heads, encoder_hidden_states.shape[1]
        if encoder_hidden_states_mask is not None:  # the stock joint mask: [text mask | every image token]
            image_mask = torch.ones(
                (batch_size, hidden_states.shape[1]), dtype=torch.bool, device=hidden_states.device
            )
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, heads*r) -> (B, heads, N, r)
            return x.view(batch_size, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        def norm(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
            return x if module is None else module(x)

        query = norm(attn.norm_q, split(attn.to_q(hidden_states)))
        key = norm(attn.norm_k, split(attn.to_k(hidden_states)))
        value = split(attn.to_v(hidden_states))
        c_query = norm(attn.norm_added_q, split(attn.add_q_proj(encoder_hidden_states)))
        c_key = norm(attn.norm_added_k, split(attn.add_k_proj(encoder_hidden_states)))
        c_value = split(attn.add_v_proj(encoder_hidden_states))
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb  # complex (N_image, d_h / 2), (N_text, d_h / 2)
            index = getattr(attn, "slim_rope_index", None)
            if index is not None:  # (H, r) whole pairs (2p, 2p+1) -> (H, N, r / 2) tables of pairs p
                pairs = index[:, 0::2].to(img_freqs.device) // 2
                img_freqs = img_freqs[:, pairs].permute(1, 0, 2)
                txt_freqs = txt_freqs[:, pairs].permute(1, 0, 2)
            query, key = apply_rope_complex(query, img_freqs), apply_rope_complex(key, img_freqs)
            c_query, c_key = apply_rope_complex(c_query, txt_freqs), apply_rope_complex(c_key, txt_freqs)
        # text tokens first, as the stock processor
        query = torch.cat([c_query, query], dim=2)
        key = torch.cat([c_key, key], dim=2)
        value = torch.cat([c_value, value], dim=2)

        out = padded_sdpa(query, key, value, scale=self.scale, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * value.shape[-1]).to(query.dtype)
        c_out, out = out[:, :n_text], out[:, n_text:]
        out = attn.to_out[0](out.contiguous())
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)  # dropout
        return out, attn.to_add_out(c_out.contiguous())


# --------------------------------------------------------------------------------------------
# Which SDPA kernel ran
# --------------------------------------------------------------------------------------------
def _backend_of(op_name: str) -> str | None:
    for needle, label in _BACKEND_OPS:
        if needle in op_name:
            return label
    return None


@contextmanager
def _native_stderr_filtered() -> Iterator[None]:
    """Drop the profiler library's own start/stop and GPU-probe lines, which it writes to the
    process's stderr file descriptor (not Python's sys.stderr); everything else is passed on."""
    noise = ("SyncActivityProfilerHandler", "gpuGetDeviceCount")
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to filter
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [
                ln
                for ln in tmp.read().decode(errors="replace").splitlines(True)
                if not any(n in ln for n in noise)
            ]
            if kept:
                sys.stderr.write("".join(kept))


def sdpa_backends(
    model: nn.Module,
    *args: Any,
    is_attention: Callable[[nn.Module], bool] | None = None,
    **kwargs: Any,
) -> dict[str, list[str]]:
    """``{attention module name: [SDPA backend of each call]}`` for one forward ``model(*args, **kwargs)``.

    Each attention module's forward is wrapped in a named ``record_function`` range (hooks, only
    for this probe) and the aten SDPA implementation ops under it are read from the profiler.
    ``is_attention`` picks the modules (default: diffusers ``Attention`` and ``JointAttnProcessor``
    users, i.e. every ``diffusers.models.attention_processor.Attention``). Modules that never call
    SDPA map to an empty list."""
    from torch.autograd.profiler import profile, record_function

    if is_attention is None:
        is_attention = is_attention_module

    prefix = "slimdiff.attn::"
    ranges: dict[int, Any] = {}
    handles = []
    names = {}
    for name, mod in model.named_modules():
        if not is_attention(mod):
            continue
        names[name] = []

        def pre(m, a, n=name):
            ctx = record_function(prefix + n)
            ctx.__enter__()
            ranges[id(m)] = ctx

        def post(m, a, o):
            ranges.pop(id(m)).__exit__(None, None, None)

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        # the legacy profiler: the aten op names on the CPU side are all that is read
        with _native_stderr_filtered(), torch.inference_mode(), profile(use_kineto=False) as prof:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for event in prof.function_events:
        label = _backend_of(event.name)
        if label is None:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(prefix):
            parent = parent.cpu_parent
        if parent is not None:
            calls = names[parent.name[len(prefix) :]]
            # a backend op nests inside the dispatcher op of the same backend: count each call once
            if not (event.cpu_parent is not None and _backend_of(event.cpu_parent.name) == label):
                calls.append(label)
    return names


#: buffer of a RoPE attention whose QK kept a subset of rotary pairs: (H, r) original coordinate of
#: every kept coordinate; the processor gathers the rotary tables with it
ROPE_INDEX = "slim_rope_index"


def set_rope_index(attn: nn.Module, index: torch.Tensor) -> None:
    """Register (or replace) the attention's kept-coordinate index (saved with its state dict). A
    meta-device index (a skeleton built under ``torch.device("meta")``, e.g. for FLOP counting)
    stays on meta: it has no values to move."""
    if ROPE_INDEX in attn._buffers:
        del attn._buffers[ROPE_INDEX]
    index = index.to(torch.int64)
    attn.register_buffer(ROPE_INDEX, (index if index.is_meta else index.cpu()).clone())
