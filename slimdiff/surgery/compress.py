"""Module surgery: rebuild a denoiser's attention and FFN layers at the ranks of a rank plan.

``compress_(model, plan, covariances)`` is the one in-place verb (torchao-shaped). For every unit
the plan keeps below full rank it computes a closed-form decomposition (``slimdiff.core.linalg``) from
the aggregated covariances and swaps in *really smaller* ``nn.Linear`` layers. Which layers those
are comes from the unit's layout (``slimdiff.families``); for a BasicTransformerBlock:

=============  ===========================================  ================================
unit           layers rewritten                             new shape (out, in)
=============  ===========================================  ================================
``.ff``        ``ff.net.0.proj`` (GEGLU: rows J of both     (2k, d)   [GELU: (k, d)]
               halves + their biases), ``ff.net.2``         (d, k)
``.attnX.qk``  ``to_q``, ``to_k``                           (H*r_qk, d_q_in), (H*r_qk, d_kv_in)
``.attnX.vo``  ``to_v``, ``to_out.0``                       (H*r_vo, d_kv_in), (d_out, H*r_vo)
=============  ===========================================  ================================

(a family whose attention has two token streams rewrites both streams' projections with the
same per-head transforms.)

Attention modules with a compressed QK or VO get the family's compressed processor
(``slimdiff.families.attention.SlimAttnProcessor`` for diffusers' ``Attention``): diffusers' stock
processor derives one head dim for q, k and v and the softmax scale from it, which is wrong once
r_qk != d_h or r_vo != r_qk; so does the attention of a parallel block whose FFN is rewritten
(``FFNLayout.attention``: FLUX.2's single blocks compute q | k | v | MLP with one fused linear, and
the processor splits it at the narrowed widths). Units at full rank are left untouched, so a plan
can compress only the FFNs, only QK or only VO.

Methods are looked up in a registry by (unit kind, name), not by if/elif: "slimdiff" (whitened /
Nystrom-CPQR, the method), "weight_svd" (QK/VO baseline without activations) and "magnitude"
(FFN pruning baseline). ``register_method`` adds more.

Everything is decomposed before the first module is touched, so a failure (missing covariance,
bad plan) leaves the model as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from slimdiff.core import linalg
from slimdiff.families.attention import (
    AcrossHeadsRMSNorm,
    HeadwiseRMSNorm,
    QKPostProjection,
    set_rope_index,
)
from slimdiff.families.base import (
    AttentionLayout,
    FFNLayout,
    UnitInfo,
    adapter_for,
    linear,
    replace_module,
)
from slimdiff.families.units import count_parameters, out_heads
from slimdiff.planning.plan import RankPlan
from slimdiff.surgery.maps import (
    COMPRESSION_ATTRIBUTE,
    LORA_MAPS_ATTRIBUTE,
    PLAN_ATTRIBUTE,
    FFNRewrite,
    QKRewrite,
    VORewrite,
    maps_from_rewrites,
)

logger = logging.getLogger(__name__)

F64 = torch.float64

QK_NORM_MODES = ("auto", "select", "keep", "project")
# the modes under which compress_ rewrites a QK under per-head norms that the plan cuts, by
# selection: "auto" leaves RoPE QKs out of plans (planned_units), so a plan that cuts one was made
# on purpose (e.g. under "select") and is carried out the same way
CUT_QK_NORM_MODES = ("auto", "select")


class CompressionError(ValueError):
    """Compression cannot proceed (missing statistics, unknown method, already compressed)."""


@dataclass(frozen=True)
class UnitContext:
    """Everything a decomposition method may read for one unit (nothing is mutated)."""

    unit: UnitInfo
    model: nn.Module  # the whole denoiser (layers are looked up by the layout's paths)
    rank: int
    covariances: Mapping[str, torch.Tensor]
    damping: float
    ffn_selection: str
    qk_norm: str = "auto"  # how a QK under per-head RMSNorms is compressed (compress_)
    lora_maps: bool = False  # also compute the maps slimdiff.formats.lora needs (FFN refit map: extra solve)
    # (c, s) rotary phase moments of the calibrated sequence (RoPE QKs; compress_ computes them once)
    rope_phases: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def layout(self) -> FFNLayout | AttentionLayout:
        return self.unit.layout

    def covariance(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.covariances:
            raise CompressionError(f"{self.unit.name}: covariance {key!r} is missing from the statistics")
        cov = self.covariances[key]
        if tuple(cov.shape) != shape:
            raise CompressionError(
                f"{self.unit.name}: covariance {key!r} has shape {tuple(cov.shape)}, the model needs {shape} "
                "(statistics collected on another model?)"
            )
        return cov

    def mean(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """A first-moment statistic (``stats.mean_key``), or None where the statistics predate them
        (the kept-share model then takes zero-mean tokens)."""
        if not key or key not in self.covariances:
            return None
        return self.covariance(key, shape).to(F64)

    def weight(self, path: str) -> torch.Tensor:
        return linear(self.model, path).weight.detach().to("cpu", F64)

    def head_shape(self) -> tuple[int, int, int]:
        return (self.layout.heads, self.layout.head_dim, self.layout.head_dim)

    def out_blocks(self) -> torch.Tensor:
        """(H, d_h, sum d_out): every out linear's per-head block in row-vector form, side by side."""
        return torch.cat([out_heads(self.weight(p), self.layout.heads) for p in self.layout.out], dim=-1)

    def head_gram(self, paths: tuple[str, ...]) -> torch.Tensor:
        """(H, d_h, d_h): sum over ``paths`` of W_h W_h^T, the per-head output covariance of those
        linears for isotropic inputs (what the weight-only baselines use)."""
        return sum((w := _heads(self.weight(p), self.layout.heads)) @ w.transpose(1, 2) for p in paths)


Method = Callable[[UnitContext], FFNRewrite | QKRewrite | VORewrite]
_METHODS: dict[tuple[str, str], Method] = {}
# whether a method reads the unit's statistics; checked before any work
_NEEDS: dict[tuple[str, str], bool] = {}

#: method presets: a string ``method`` names one registered method per kind
PRESETS: dict[str, dict[str, str]] = {
    "slimdiff": {"ffn": "slimdiff", "qk": "slimdiff", "vo": "slimdiff"},
    "weight_svd": {"qk": "weight_svd", "vo": "weight_svd"},
    "magnitude": {"ffn": "magnitude"},
    "baseline": {"ffn": "magnitude", "qk": "weight_svd", "vo": "weight_svd"},
}


def register_method(kind: str, name: str, needs: bool = False) -> Callable[[Method], Method]:
    """Register a decomposition for units of ``kind`` ("ffn" | "qk" | "vo") under ``name``.

    ``needs`` says whether the method reads activation statistics (True: the unit's statistic keys,
    ``UnitInfo.stat_keys``, must be given)."""
    if kind not in ("ffn", "qk", "vo"):
        raise ValueError(f"kind must be 'ffn', 'qk' or 'vo', got {kind!r}")

    def deco(fn: Method) -> Method:
        if (kind, name) in _METHODS:
            raise ValueError(f"a {kind} method named {name!r} is already registered")
        _METHODS[(kind, name)] = fn
        _NEEDS[(kind, name)] = needs
        return fn

    return deco


def available_methods() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"ffn": [], "qk": [], "vo": []}
    for kind, name in _METHODS:
        out[kind].append(name)
    return out


def resolve_methods(method: str | Mapping[str, str], kinds: set[str]) -> dict[str, str]:
    """Per-kind method names for the unit kinds being compressed; errors list what exists."""
    if isinstance(method, str):
        if method in PRESETS:
            chosen = dict(PRESETS[method])
        else:
            chosen = {k: method for k in kinds}
    else:
        unknown = set(method) - {"ffn", "qk", "vo"}
        if unknown:
            raise CompressionError(f"method keys must be 'ffn', 'qk' or 'vo', got {sorted(unknown)}")
        chosen = dict(method)
    for kind in sorted(kinds):
        name = chosen.get(kind)
        if name is None or (kind, name) not in _METHODS:
            raise CompressionError(
                f"no {kind} method {name or method!r}: the plan compresses {kind} units; registered {kind} methods "
                f"are {available_methods()[kind]} (pass e.g. method={{'{kind}': '{available_methods()[kind][0]}'}} "
                f"or a preset among {sorted(PRESETS)})"
            )
    return {k: chosen[k] for k in kinds}


# -- FFN methods ------------------------------------------------------------------------------
def _check_selection(ctx: UnitContext) -> None:
    if ctx.ffn_selection == "separate" and (ctx.layout.gated or ctx.layout.gate):
        raise NotImplementedError(
            f"{ctx.unit.name}: ffn_selection='separate' (independent hidden/gate row sets) is not implemented: "
            "a kept hidden row paired with another neuron's gate row makes a new neuron whose correlation "
            "with the original h (needed by the Nystrom refit) is not in the statistics (E[h^T h] only). "
            "Use ffn_selection='shared'."
        )


@register_method("ffn", "slimdiff", needs=True)
def _ffn_nystrom(ctx: UnitContext) -> FFNRewrite:
    """Type I: CPQR selection on the FFN correlation, Nystrom refit of the output projection."""
    _check_selection(ctx)
    inner = ctx.unit.full_rank
    cov = ctx.covariance(ctx.layout.hidden_key, (inner, inner))
    res = linalg.nystrom_ffn(
        cov, ctx.weight(ctx.layout.proj_out), ctx.rank, ctx.damping, with_map=ctx.lora_maps
    )
    return FFNRewrite(
        res.keep, res.keep, res.out_weight, res.error, res.energy, [res.diagnostics], res.refit_rest
    )


@register_method("ffn", "magnitude")
def _ffn_magnitude(ctx: UnitContext) -> FFNRewrite:
    """Baseline: keep the neurons with the largest ||W_2 column|| * ||proj rows||, no refit."""
    _check_selection(ctx)
    inner = ctx.unit.full_rank
    w_in = ctx.weight(ctx.layout.proj_in)
    rows = torch.cat([w_in[:inner], w_in[inner:]], dim=1) if ctx.layout.gated else w_in  # (inner, 2d | d)
    if ctx.layout.gate:  # a separate gate linear: its rows score with the neuron's
        rows = torch.cat([rows, ctx.weight(ctx.layout.gate)], dim=1)
    w_out = ctx.weight(ctx.layout.proj_out)
    keep = linalg.magnitude_select(linalg.magnitude_neuron_scores(rows, w_out), ctx.rank)
    return FFNRewrite(keep, keep, w_out[:, keep].contiguous())


# -- QK / VO methods --------------------------------------------------------------------------
def _heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(H*d_h, d_in) Linear weight -> (H, d_h, d_in) per-head rows, float64 on CPU."""
    w = weight.detach().to("cpu", F64)
    return w.view(heads, w.shape[0] // heads, w.shape[1])


def _qk_rewrite(results: list[linalg.QKResult]) -> QKRewrite:
    return QKRewrite(
        torch.stack([r.t_q for r in results]),
        torch.stack([r.t_k for r in results]),
        sum(r.error for r in results),
        sum(r.energy for r in results),
        [d for r in results for d in (r.diagnostics_q, r.diagnostics_k)],
    )


def _vo_rewrite(results: list[linalg.VOResult]) -> VORewrite:
    return VORewrite(
        torch.stack([r.t_v for r in results]),
        torch.stack([r.out_block for r in results]),
        sum(r.error for r in results),
        sum(r.energy for r in results),
        [r.diagnostics for r in results],
        None if any(r.s_out is None for r in results) else torch.stack([r.s_out for r in results]),
    )


def _qk_rms_select(ctx: UnitContext) -> QKRewrite:
    """QK under per-head RMSNorms: keep r coordinates of every head (chosen on the normalised
    statistics), the rows of every q/k projection for them, and each norm over the kept
    coordinates with its scale corrected (``linalg.rms_coordinate_selection``, ``rms_norm_correction``)."""
    lay, shape = ctx.layout, ctx.head_shape()
    cq, ck = ctx.covariance(lay.query_key, shape), ctx.covariance(lay.key_key, shape)
    cqn, ckn = ctx.covariance(lay.query_normed_key, shape), ctx.covariance(lay.key_normed_key, shape)
    means = ctx.mean(lay.query_mean_key, shape[:2]), ctx.mean(lay.key_mean_key, shape[:2])
    return _rms_select(ctx, cq, ck, cqn, ckn, means)


def _rms_select(
    ctx: UnitContext,
    cq: torch.Tensor,
    ck: torch.Tensor,
    cqn: torch.Tensor,
    ckn: torch.Tensor,
    means: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> QKRewrite:
    """The coordinate-selection rewrite from per-head second moments (H, d, d) of the raw (``cq``,
    ``ck``: the norm corrections and the predicted error's renormalisation term) and normalised
    (``cqn``, ``ckn``: the selection) queries and keys; ``means``: the raw per-head means (H, d)
    where the statistics have them (the renormalisation term's token model)."""
    lay = ctx.layout
    heads, d, r = lay.heads, lay.head_dim, ctx.rank
    t = torch.zeros(heads, d, r, dtype=F64)
    c_q, c_k = torch.zeros(heads, dtype=F64), torch.zeros(heads, dtype=F64)
    error = energy = 0.0
    if lay.rope and r % 2:
        raise CompressionError(
            f"{ctx.unit.name}: rank {r} is odd; a QK under RoPE keeps whole rotary pairs (even ranks: "
            "allocation.r_min and allocation.multiple must be even)"
        )
    phases = (ctx.rope_phases or adapter_for(ctx.model).rope_phases(ctx.model)) if lay.rope else None
    mq, mk = means
    sels = []
    for h in range(heads):
        # the raw moments also give the predicted error its renormalisation term
        raw = (cq[h], ck[h], None if mq is None else mq[h], None if mk is None else mk[h])
        if phases is not None:
            sel = linalg.rope_pair_selection(cqn[h], ckn[h], r, *linalg.head_phases(phases, h), *raw)
        else:
            sel = linalg.rms_coordinate_selection(cqn[h], ckn[h], r, *raw)
        sels.append(sel)
        t[h, sel.keep, torch.arange(r)] = 1.0  # one-hot columns: the new head keeps those rows
        c_q[h] = linalg.rms_norm_correction(cq[h], sel.keep)
        c_k[h] = linalg.rms_norm_correction(ck[h], sel.keep)
        error += float(sel.errors[r])
        energy += sel.energy
    keep = t.argmax(dim=1)  # (H, r) kept coordinate of every new column
    if lay.norms_across_heads:  # one q and one k norm over ALL heads' kept coordinates (Wan)
        c_q[:] = linalg.rms_norm_correction_across_heads(cq, keep)
        c_k[:] = linalg.rms_norm_correction_across_heads(ck, keep)
        error = float(linalg.selection_errors_across_heads(sels, cqn, ckn, cq, ck, phases, mq, mk)[r])
    norms = {}
    for paths, c in ((lay.norms_q, c_q), (lay.norms_k, c_k)):
        for path in paths:
            norm = ctx.model.get_submodule(path)
            g = norm.weight.detach().to("cpu", F64) if norm.weight is not None else torch.ones(d, dtype=F64)
            g = g.view(heads, d).gather(1, keep) if lay.norms_across_heads else g[keep]
            norms[path] = (g / c.sqrt()[:, None], float(norm.eps) / c)
    return QKRewrite(t, t.clone(), error, energy, [], norms, keep if lay.rope else None)


@register_method("qk", "slimdiff", needs=True)
def _qk_whitened(ctx: UnitContext) -> QKRewrite:
    if ctx.layout.qk_norm:
        if ctx.qk_norm not in CUT_QK_NORM_MODES:
            raise CompressionError(
                f"{ctx.unit.name}: the plan compresses a QK under per-head RMSNorms, but qk_norm is "
                f"{ctx.qk_norm!r}: with 'keep' or 'project' such units must stay at full rank in the plan "
                "(the plan stage drops them), or use qk_norm='select'"
            )
        return _qk_rms_select(ctx)
    cq = ctx.covariance(ctx.layout.query_key, ctx.head_shape())
    ck = ctx.covariance(ctx.layout.key_key, ctx.head_shape())
    return _qk_rewrite(
        [linalg.qk_whitened_svd(cq[h], ck[h], ctx.rank, ctx.damping) for h in range(ctx.layout.heads)]
    )


def _normed_gram(ctx: UnitContext, paths: tuple[str, ...], norms: tuple[str, ...]) -> torch.Tensor:
    """(H, d_h, d_h): sum over the streams of diag(g) W_h W_h^T diag(g), each stream's Gram scaled
    by its own norm's gains g (the weight-only stand-in for the normalised second moments; norms
    are aligned with the streams, as the statistics sites pair them)."""
    total = 0
    for path, norm in zip(paths, norms, strict=False):
        w = _heads(ctx.weight(path), ctx.layout.heads)
        gram = w @ w.transpose(1, 2)
        gain = ctx.model.get_submodule(norm).weight
        if gain is not None:
            g = gain.detach().to("cpu", F64)
            if ctx.layout.norms_across_heads:  # gains of all heads: (H * d_h,) -> (H, d_h)
                g = g.view(ctx.layout.heads, -1)
            gram = gram * g[..., :, None] * g[..., None, :]
        total = total + gram
    return total


@register_method("qk", "weight_svd")
def _qk_weight_svd(ctx: UnitContext) -> QKRewrite:
    """Baseline: truncated SVD of the head's bilinear form W_q,h^T W_k,h (isotropic inputs; with
    several token streams, their query / key weights' Grams summed).

    An SVD basis does not commute with per-head q/k RMSNorms (MMDiT), so there the weight-only
    baseline is the coordinate selection of ``qk_norm`` "select" with isotropic inputs: the Grams
    W_h W_h^T stand for the raw second moments and, scaled by the norm's learned gains, for the
    normalised ones (the norm's 1/rms is a common factor per token, irrelevant to the ranking)."""
    gq, gk = ctx.head_gram(ctx.layout.query), ctx.head_gram(ctx.layout.key)
    if ctx.layout.qk_norm:
        if ctx.qk_norm not in CUT_QK_NORM_MODES:
            raise CompressionError(
                f"{ctx.unit.name}: a QK under per-head RMSNorms is compressed only by coordinate "
                f"selection (qk_norm 'select'), got qk_norm {ctx.qk_norm!r}"
            )
        lay = ctx.layout
        qn, kn = _normed_gram(ctx, lay.query, lay.norms_q), _normed_gram(ctx, lay.key, lay.norms_k)
        return _rms_select(ctx, gq, gk, qn, kn)
    return _qk_rewrite(
        [linalg.qk_whitened_svd(gq[h], gk[h], ctx.rank, 1e-8) for h in range(ctx.layout.heads)]
    )


@register_method("vo", "slimdiff", needs=True)
def _vo_whitened(ctx: UnitContext) -> VORewrite:
    ca = ctx.covariance(ctx.layout.attnout_key, ctx.head_shape())
    wo = ctx.out_blocks()
    return _vo_rewrite(
        [linalg.vo_whitened_svd(ca[h], wo[h], ctx.rank, ctx.damping) for h in range(ctx.layout.heads)]
    )


@register_method("vo", "weight_svd")
def _vo_weight_svd(ctx: UnitContext) -> VORewrite:
    gv, wo = ctx.head_gram(ctx.layout.value), ctx.out_blocks()
    return _vo_rewrite(
        [linalg.vo_whitened_svd(gv[h], wo[h], ctx.rank, 1e-8) for h in range(ctx.layout.heads)]
    )


# --------------------------------------------------------------------------------------------
# Applying rewrites: build the smaller layers
# --------------------------------------------------------------------------------------------
def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """An nn.Linear holding ``weight`` (out, in) and ``bias``, in ``like``'s dtype and device,
    built on the meta device first so that no throwaway random init is paid."""
    dtype, device = like.weight.dtype, like.weight.device
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=dtype)
    lin.weight = nn.Parameter(
        weight.to(device=device, dtype=dtype).contiguous(), requires_grad=like.weight.requires_grad
    )
    if bias is not None:
        lin.bias = nn.Parameter(
            bias.to(device=device, dtype=dtype).contiguous(), requires_grad=like.weight.requires_grad
        )
    return lin


def _apply_ffn(model: nn.Module, unit: UnitInfo, rw: FFNRewrite) -> None:
    lay: FFNLayout = unit.layout
    proj, out = linear(model, lay.proj_in), linear(model, lay.proj_out)
    w = proj.weight.detach().to("cpu", F64)
    b = proj.bias.detach().to("cpu", F64) if proj.bias is not None else None
    if lay.gated:
        rows = torch.cat(
            [rw.keep_value, unit.full_rank + rw.keep_gate]
        )  # [hidden J | gate J]: chunk(2) still splits
    else:
        rows = rw.keep_value
    replace_module(model, lay.proj_in, _linear(w[rows], None if b is None else b[rows], proj))
    if lay.gate:  # a separate gate linear (SwiGLU): the kept neurons' gate rows
        gate = linear(model, lay.gate)
        gw, gb = gate.weight.detach().to("cpu", F64), gate.bias
        gb = gb.detach().to("cpu", F64)[rw.keep_gate] if gb is not None else None
        replace_module(model, lay.gate, _linear(gw[rw.keep_gate], gb, gate))
    out_bias = out.bias.detach().to("cpu", F64) if out.bias is not None else None
    replace_module(model, lay.proj_out, _linear(rw.out_weight, out_bias, out))


def _project_heads(layer: nn.Linear, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New rows T_h^T W_h per head: (H*d_h, d_in) -> (H*r, d_in); bias (H*d_h,) -> (H*r,)."""
    heads, _, r = t.shape
    w = _heads(layer.weight, heads)  # (H, d_h, d_in)
    new_w = torch.einsum("hdr,hdi->hri", t, w).reshape(heads * r, -1)
    new_b = None
    if layer.bias is not None:
        b = layer.bias.detach().to("cpu", F64).view(heads, -1)  # (H, d_h)
        new_b = torch.einsum("hdr,hd->hr", t, b).reshape(heads * r)
    return new_w, new_b


def _project_all(model: nn.Module, paths: tuple[str, ...], t: torch.Tensor) -> None:
    for path in paths:
        layer = linear(model, path)
        replace_module(model, path, _linear(*_project_heads(layer, t), layer))


def _apply_qk(model: nn.Module, unit: UnitInfo, rw: QKRewrite) -> None:
    _project_all(model, unit.layout.all_query, rw.t_q)
    _project_all(model, unit.layout.key, rw.t_k)
    if rw.rope_index is not None:
        set_rope_index(model.get_submodule(unit.layout.module), rw.rope_index)
    for path, (weight, eps) in rw.norms.items():
        old = model.get_submodule(path)
        like = old.weight if old.weight is not None else next(model.parameters())
        cls = AcrossHeadsRMSNorm if unit.layout.norms_across_heads else HeadwiseRMSNorm
        norm = cls(*weight.shape, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
            norm.eps.copy_(eps)
        replace_module(model, path, norm)


def _apply_vo(model: nn.Module, unit: UnitInfo, rw: VORewrite) -> None:
    _project_all(model, unit.layout.value, rw.t_v)
    heads, r, _ = rw.out_blocks.shape
    offset = 0
    for path in unit.layout.out:  # the out linears' blocks sit side by side in out_blocks
        old = linear(model, path)
        d_out = old.out_features
        blocks = rw.out_blocks[..., offset : offset + d_out]  # (H, r, d_out)
        offset += d_out
        # (H, r, d_out) -> (d_out, H, r) -> (d_out, H*r): column block h holds head h's new rows
        weight = blocks.permute(2, 0, 1).reshape(d_out, heads * r)
        bias = old.bias.detach().to("cpu", F64) if old.bias is not None else None
        replace_module(model, path, _linear(weight, bias, old))


def _attention_layout(units: Mapping[str, UnitInfo], unit: UnitInfo) -> AttentionLayout:
    """The layout of the attention whose processor reads an FFN's width (``FFNLayout.attention``)."""
    module = unit.layout.attention
    for u in units.values():
        if isinstance(u.layout, AttentionLayout) and u.layout.module == module:
            return u.layout
    raise CompressionError(f"{unit.name}: its attention {module!r} is not a unit of this model")


def _output_error(
    model: nn.Module,
    unit: UnitInfo,
    rw: FFNRewrite | QKRewrite | VORewrite,
    covariances: Mapping[str, torch.Tensor],
) -> tuple[float, float] | None:
    """(error, energy) of a rewrite under the undamped covariances, from the ORIGINAL weights of
    ``model`` (call before the rewrite is applied); None when the statistics are not given."""
    covs = [covariances.get(k) for k in unit.stat_keys()]
    if any(c is None for c in covs):
        return None
    lay = unit.layout
    if isinstance(rw, FFNRewrite):
        if not torch.equal(rw.keep_value, rw.keep_gate):
            return None
        return linalg.ffn_output_error(
            covs[0], linear(model, lay.proj_out).weight, rw.keep_value, rw.out_weight
        )
    if isinstance(rw, QKRewrite) and lay.qk_norm:  # coordinate selection: its dropped logit energy
        return rw.error, rw.energy
    if isinstance(rw, QKRewrite):
        cq, ck = covs
        parts = [linalg.qk_logit_error(cq[h], ck[h], rw.t_q[h], rw.t_k[h]) for h in range(lay.heads)]
    else:
        (ca,) = covs
        wo = torch.cat([out_heads(linear(model, p).weight, lay.heads) for p in lay.out], dim=-1)
        parts = [linalg.vo_output_error(ca[h], wo[h], rw.t_v[h], rw.out_blocks[h]) for h in range(lay.heads)]
    return sum(e for e, _ in parts), sum(n for _, n in parts)


def _post_norm_projections(
    model: nn.Module, units: dict[str, UnitInfo], plan: RankPlan, covariances, damping: float
) -> dict[str, tuple[AttentionLayout, nn.Module]]:
    """qk_norm "project": for every attention with q/k norms whose VO unit the plan cuts to r, a
    whitening-SVD of the NORMALISED q/k statistics at rank r (``linalg.qk_whitened_svd``),
    applied after the norms; the QK unit itself must be at full rank in the plan."""

    out = {}
    for name, u in units.items():
        lay = u.layout
        if u.kind != "vo" or not lay.qk_norm:
            continue
        qk_name = name[: -len(".vo")] + ".qk"
        if qk_name in plan.units and plan.units[qk_name].rank < plan.units[qk_name].full_rank:
            raise CompressionError(
                f"{qk_name}: qk_norm 'project' keeps a QK under RMSNorms at full rank in the plan; "
                "make the plan without those units (the plan stage does this for qk_norm 'project')"
            )
        r = plan.units[name].rank if name in plan.units else u.full_rank
        if r >= lay.head_dim:
            continue
        shape = (lay.heads, lay.head_dim, lay.head_dim)
        for key in (lay.query_normed_key, lay.key_normed_key):
            if key not in covariances:
                raise CompressionError(
                    f"{qk_name}: covariance {key!r} is missing (needed by qk_norm 'project')"
                )
            if tuple(covariances[key].shape) != shape:
                raise CompressionError(
                    f"{qk_name}: covariance {key!r} has shape {tuple(covariances[key].shape)}"
                )
        res = [
            linalg.qk_whitened_svd(
                covariances[lay.query_normed_key][h], covariances[lay.key_normed_key][h], r, damping
            )
            for h in range(lay.heads)
        ]
        like = linear(model, lay.query[0]).weight
        proj = QKPostProjection(lay.heads, lay.head_dim, r, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            proj.t_q.copy_(torch.stack([x.t_q for x in res]))
            proj.t_k.copy_(torch.stack([x.t_k for x in res]))
        out[lay.module] = (lay, proj)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
@dataclass
class UnitReport:
    name: str
    kind: str
    method: str
    full_rank: int
    rank: int
    params_before: int
    params_after: int
    # expected squared output error of the rewrite under the undamped covariance (what the unit
    # really loses on the calibration activations; None when no statistics were given)
    error: float | None
    relative_error: float | None  # error / output energy: what the plan's predicted_error predicts
    damped_relative_error: float | None  # the same under the damped covariance the method factored
    max_condition_number: float | None
    fallbacks: int  # covariances factored through the eigh fallback


@dataclass
class CompressionReport:
    units: dict[str, UnitReport]
    params_before: int  # whole UNet
    params_after: int
    predicted_params_after: int  # params_before - plan.removed_params: must equal params_after
    plan_digest: str
    methods: dict[str, str]
    damping: float

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "predicted_params_after": self.predicted_params_after,
            "plan_digest": self.plan_digest,
            "methods": dict(self.methods),
            "damping": self.damping,
            "units": {n: asdict(u) for n, u in self.units.items()},
        }


# --------------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------------
def _refuse_quantized(model: nn.Module) -> None:
    """Compression needs the float weights: refuse a quantized denoiser (torch.ao quantized modules,
    or nn.Linear layers whose weight is a quantized tensor subclass, as torchao makes them)."""
    for name, mod in model.named_modules():
        quantized = "quantized" in type(mod).__module__
        if not quantized and isinstance(mod, nn.Linear):
            w = mod.weight
            quantized = not w.dtype.is_floating_point or type(w.data) not in (torch.Tensor, nn.Parameter)
        if quantized:
            raise CompressionError(
                f"{name or 'the model'} is quantized ({type(mod).__module__}.{type(mod).__name__}): compress "
                "the float model first, then quantize "
                "the compressed one (the closed-form rewrite needs the float weights)"
            )


def compress_(
    unet: nn.Module,
    plan: RankPlan,
    covariances: Mapping[str, torch.Tensor] | None,
    *,
    method: str | Mapping[str, str] = "slimdiff",
    damping: float = 1e-2,
    ffn_selection: str = "shared",
    rewrite_full_rank: bool = False,
    ffn_method: str | None = None,
    qk_method: str | None = None,
    vo_method: str | None = None,
    qk_norm: str = "auto",
    lora_maps: bool = True,
    rope_sequence: Mapping | None = None,
) -> CompressionReport:
    """Compress ``unet`` in place to the ranks of ``plan``; returns a per-unit report.

    ``covariances`` are aggregated second moments keyed like ``ActivationStats.aggregate``
    (``{block}.ff.hidden`` (inner, inner); ``{block}.{attn}.query|key|attnout`` (H, d_h, d_h)); only
    the keys the chosen methods read are needed (None is fine for the weight-only baselines).
    ``method``: a preset name ("slimdiff", "weight_svd", "magnitude", "baseline") or a dict
    kind -> method name; ``ffn_method`` / ``qk_method`` / ``vo_method`` override one kind (the
    params.yaml form: ``compression.{ffn,qk,vo}_method``). ``rewrite_full_rank`` also rebuilds units planned at full rank (a check
    that the decomposition reproduces the original; normally they are left untouched).
    ``qk_norm`` says how a QK under per-head q/k RMSNorms (MMDiT) is treated: "select" (RMSNorm-
    aware coordinate selection, planned like any QK unit), "keep" (left whole: the plan must keep
    those units at full rank) or "project" (left whole in the plan; when the attention's VO is cut
    to r, q and k are projected to r AFTER their norms, so the logits and the fused kernel run at
    width r while to_q / to_k keep their size and the projections add 2 H d_h r parameters), or
    "auto" (the default; for planning, "keep" for those that also carry rotary embeddings and
    "select" for the others, ``slimdiff.families.units.qk_left_whole``; here, a QK the plan cuts is
    cut by selection, as under "select").
    The plan is recorded on the model as ``unet.slimdiff_plan`` for ``slimdiff.formats.io.save_compressed``.
    ``lora_maps`` (default on) also records, on ``unet.slimdiff_lora_maps``, the linear map every
    rewritten layer applied to the original weights (``slimdiff.formats.lora.LoraMaps``: per-head T of
    q/k/v, per-head S of the out linears, the FFN's kept rows J and refit map M), so that a LoRA
    made for the original model can be projected onto this one; ``save_compressed`` writes them.
    Their size is small for attention (H d_h r per linear) but (inner - k) k floats per FFN.
    ``rope_sequence``: the token sequence calibration ran (the statistics' ``meta["rope_sequence"]``,
    ``ModelAdapter.rope_sequence``): RoPE-aware pair selection weighs the rotary phases of that
    sequence; None takes the model's default serving shape."""
    if getattr(unet, PLAN_ATTRIBUTE, None) is not None:
        raise CompressionError(
            "this UNet is already compressed (it carries a slimdiff_plan); compress the original model instead"
        )
    _refuse_quantized(unet)
    if ffn_selection not in ("shared", "separate"):
        raise ValueError(f"ffn_selection must be 'shared' or 'separate', got {ffn_selection!r}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if qk_norm not in QK_NORM_MODES:
        raise ValueError(f"qk_norm must be one of {QK_NORM_MODES}, got {qk_norm!r}")
    plan.validate_against(unet)
    covariances = covariances or {}

    adapter = adapter_for(unet)
    units = adapter.units(unet)
    if qk_norm == "project" and any(u.layout.rope for u in units.values() if u.kind == "qk"):
        raise CompressionError(
            "qk_norm 'project' is not exact under rotary position embeddings (a projection after the "
            "norms mixes rotary pairs of different frequencies); use qk_norm 'auto' or 'keep' (left "
            "whole) or 'select' (whole-pair selection) for this model"
        )
    todo = {n: p for n, p in plan.units.items() if p.rank < p.full_rank or rewrite_full_rank}
    overrides = {
        k: v for k, v in (("ffn", ffn_method), ("qk", qk_method), ("vo", vo_method)) if v is not None
    }
    if overrides:
        base = dict(PRESETS.get(method, {})) if isinstance(method, str) else dict(method)
        if isinstance(method, str) and method not in PRESETS:
            base = {k: method for k in ("ffn", "qk", "vo")}
        method = {**base, **overrides}
    methods = resolve_methods(method, {p.kind for p in todo.values()})

    missing = sorted(
        {
            key
            for n, p in todo.items()
            if _NEEDS[(p.kind, methods[p.kind])]
            for key in units[n].stat_keys()
            if key not in covariances
        }
    )
    if missing:
        raise CompressionError(
            f"{len(missing)} covariances needed by method(s) {methods} are missing, e.g. {missing[:4]}; "
            "pass ActivationStats.aggregate(weights) of statistics collected on this model"
        )

    params_before = count_parameters(unet)
    cut_rope = any(units[n].kind == "qk" and units[n].layout.rope and units[n].layout.qk_norm for n in todo)
    phases = adapter.rope_phases(unet, rope_sequence) if cut_rope else None  # once, for every RoPE QK
    rewrites: dict[str, FFNRewrite | QKRewrite | VORewrite] = {}
    for name, p in todo.items():  # 1. decompose everything (no mutation yet)
        ctx = UnitContext(
            unit=units[name],
            model=unet,
            rank=p.rank,
            covariances=covariances,
            damping=damping,
            ffn_selection=ffn_selection,
            qk_norm=qk_norm,
            lora_maps=lora_maps,
            rope_phases=phases,
        )
        rewrites[name] = _METHODS[(p.kind, methods[p.kind])](ctx)
    post = _post_norm_projections(unet, units, plan, covariances, damping) if qk_norm == "project" else {}
    if lora_maps:  # from the ORIGINAL layers (shapes, weights), before anything is swapped
        maps = maps_from_rewrites(unet, units, rewrites, plan.digest)

    attentions: dict[str, AttentionLayout] = {}
    reports = {}
    norm_delta = 0  # parameters of replaced q/k norms: H * r per norm instead of d_h
    with torch.no_grad():
        for name, rw in rewrites.items():  # 2. swap in the smaller layers
            unit, p = units[name], todo[name]
            true = _output_error(unet, unit, rw, covariances)  # before the swap: original weights
            if isinstance(rw, FFNRewrite):
                _apply_ffn(unet, unit, rw)
                if unit.layout.attention:  # a parallel block: its processor splits the fused input
                    attentions[unit.layout.attention] = _attention_layout(units, unit)
            elif isinstance(rw, QKRewrite):
                # per-head norms (coordinate selection) are outside the unit cost model: count them
                norm_delta -= sum(count_parameters(unet.get_submodule(path)) for path in rw.norms)
                _apply_qk(unet, unit, rw)
                norm_delta += sum(count_parameters(unet.get_submodule(path)) for path in rw.norms)
                attentions[unit.layout.module] = unit.layout
            else:
                _apply_vo(unet, unit, rw)
                attentions[unit.layout.module] = unit.layout
            conds = [d.condition_number for d in rw.diagnostics]
            reports[name] = UnitReport(
                name=name,
                kind=p.kind,
                method=methods[p.kind],
                full_rank=p.full_rank,
                rank=p.rank,
                params_before=p.params_before,
                params_after=p.params_after,
                error=None if true is None else true[0],
                relative_error=None if true is None else (true[0] / true[1] if true[1] > 0 else 0.0),
                damped_relative_error=None if rw.error is None or not rw.energy else rw.error / rw.energy,
                max_condition_number=max(conds) if conds else None,
                fallbacks=sum(d.fallback for d in rw.diagnostics),
            )
        added = 0
        for path, (layout, proj) in post.items():
            unet.get_submodule(path).slim_qk_post = proj
            attentions[path] = layout
            added += sum(p.numel() for p in proj.parameters())
        for path, layout in sorted(attentions.items()):
            attn = unet.get_submodule(path)
            attn.set_processor(adapter.processor(attn, layout))

    setattr(unet, PLAN_ATTRIBUTE, plan)
    setattr(unet, COMPRESSION_ATTRIBUTE, {"qk_norm": qk_norm})
    if lora_maps:
        setattr(unet, LORA_MAPS_ATTRIBUTE, maps)
    params_after = count_parameters(unet)
    report = CompressionReport(
        units=reports,
        params_before=params_before,
        params_after=params_after,
        predicted_params_after=params_before - plan.removed_params + added + norm_delta,
        plan_digest=plan.digest,
        methods=methods,
        damping=damping,
    )
    if params_after != report.predicted_params_after:  # a cost model / surgery mismatch is a bug
        raise CompressionError(
            f"compressed UNet has {params_after} parameters, the plan predicts {report.predicted_params_after}"
        )
    fallbacks = sum(r.fallbacks for r in reports.values())
    logger.info(
        "compressed %d units (%s): %d -> %d parameters (%.2f%% removed), %d Cholesky fallbacks",
        len(reports),
        methods,
        params_before,
        params_after,
        100.0 * (params_before - params_after) / params_before,
        fallbacks,
    )
    return report


# --------------------------------------------------------------------------------------------
# Shapes only (for loading a saved compressed model)
# --------------------------------------------------------------------------------------------
def apply_plan_shapes_(model: nn.Module, plan: RankPlan, qk_norm: str = "select") -> None:
    """Replace the planned layers of an *uncompressed* skeleton by empty layers of the planned
    shapes and set the processors, without any decomposition: weights are loaded afterwards
    (``slimdiff.formats.io.load_compressed``). New layers live on the skeleton's device. ``qk_norm`` is the
    mode the model was compressed with (it decides the norm and projection modules' shapes)."""
    plan.validate_against(model)
    adapter = adapter_for(model)
    units = adapter.units(model)

    # new modules live where the skeleton's do: meta under diffusers' empty-weights init, else CPU
    ref = next(model.parameters())
    device, dtype = ref.device, ref.dtype

    def shrink(path: str, *, out_f: int | None = None, in_f: int | None = None) -> None:
        like = linear(model, path)
        new = nn.Linear(
            like.in_features if in_f is None else in_f,
            like.out_features if out_f is None else out_f,
            bias=like.bias is not None,
            device=like.weight.device,
            dtype=like.weight.dtype,
        )
        replace_module(model, path, new)

    attentions: dict[str, AttentionLayout] = {}
    for name, p in plan.compressed_units().items():
        lay, r = units[name].layout, p.rank
        if p.kind == "ffn":
            shrink(lay.proj_in, out_f=2 * r if lay.gated else r)
            if lay.gate:
                shrink(lay.gate, out_f=r)
            shrink(lay.proj_out, in_f=r)
            if lay.attention:  # a parallel block: its processor splits the fused input
                attentions[lay.attention] = _attention_layout(units, units[name])
            continue
        if p.kind == "qk":
            for path in (*lay.all_query, *lay.key):
                shrink(path, out_f=lay.heads * r)
            for path in (*lay.norms_q, *lay.norms_k):  # coordinate selection: per-head norms over r
                cls = AcrossHeadsRMSNorm if lay.norms_across_heads else HeadwiseRMSNorm
                replace_module(model, path, cls(lay.heads, r, device=device, dtype=dtype))
            if lay.rope:  # the kept rotary coordinates: values come with the state dict
                set_rope_index(model.get_submodule(lay.module), torch.zeros(lay.heads, r, dtype=torch.int64))
        else:
            if qk_norm == "project" and lay.qk_norm:
                model.get_submodule(lay.module).slim_qk_post = QKPostProjection(
                    lay.heads, lay.head_dim, r, device=device, dtype=dtype
                )
            for path in lay.value:
                shrink(path, out_f=lay.heads * r)
            for path in lay.out:
                shrink(path, in_f=lay.heads * r)
        attentions[lay.module] = lay
    for path, lay in sorted(attentions.items()):
        attn = model.get_submodule(path)
        attn.set_processor(adapter.processor(attn, lay))
    setattr(model, PLAN_ATTRIBUTE, plan)
    setattr(model, COMPRESSION_ATTRIBUTE, {"qk_norm": qk_norm})


@contextmanager
def single_thread():
    """Run the body on one torch thread: the rebuild is many small per-head factorisations, where
    threads only add overhead (the compress stage and ``slimdiff.slim`` both use it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
