"""Analytic FLOPs of a denoiser forward, counted from the actual (possibly compressed) layer shapes.

Why analytic: the speed-up a compression can buy is bounded by the FLOPs it removes; measured
latency divided by that bound says how much of it the runtime realises. The count is exact for
the operations it covers and ignores the rest (stated so nobody mistakes it for a profiler):

* every ``nn.Linear``: 2 * tokens * in * out
* every ``nn.Conv2d``: 2 * B * H_out * W_out * C_out * (C_in / groups) * k_h * k_w
* attention matmuls of every diffusers ``Attention``: 2 * B * heads * N_q * N_k * (r_qk + r_vo)
  (logits q k^T and probabilities times values, with the per-head widths actually in use: untied
  compressed widths are padded to one, see ``slimdiff.families.attention``)

Not counted: biases, norms, softmax, activations, residual adds, up-sampling interpolation
(all elementwise, a few percent of a SD UNet).

How: the model's layer shapes are copied onto a skeleton on the meta device (no memory, no
compute) and one forward is traced with hooks for the given batch, latent size and text length.

Budgets in FLOPs: ``unit_flop_costs`` reads one such trace of the uncompressed model at a serving
shape (``ServingShape``) into the FLOPs every compression unit costs per unit of rank, and each
attention's exact cost at any pair of ranks (``AttentionCost``); ``FlopCosts.plan_flops`` is then
this module's count of the model compressed to any plan, to the FLOP.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimdiff.families.attention import (
    ROPE_INDEX,
    common_head_width,
    is_attention_module,
    pads_heads,
    set_rope_index,
)
from slimdiff.families.base import (
    ROW_PARTS,
    FFNLayout,
    adapter_for,
    denoiser_of,
    packed_share,
    row_parts,
    split_path,
)

logger = logging.getLogger(__name__)

CATEGORIES = ("conv", "attn1_proj", "attn1_matmul", "attn2_proj", "attn2_matmul", "ffn", "other_linear")


@dataclass(frozen=True)
class FlopsRow:
    module: str
    category: str  # one of CATEGORIES
    flops: int
    tokens: int  # spatial tokens (H*W) the module runs at; query tokens for attention; 1 for embeddings
    # the shapes the count was made from: Linear (rows, in, out), attention (batch, heads, N_q, N_k,
    # r_qk, r_vo) at the widths counted, post-norm projection (batch, heads, N_q + N_k, d_h, r); conv ()
    dims: tuple[int, ...] = ()


@dataclass
class FlopsReport:
    rows: list[FlopsRow]
    batch: int
    latent_size: int
    text_len: int

    @property
    def total(self) -> int:
        return sum(r.flops for r in self.rows)

    def by_category(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for r in self.rows:
            out[r.category] += r.flops
        return out

    def by_tokens(self) -> dict[tuple[str, int], int]:
        """FLOPs per (coarse kind, token count): e.g. ('attention', 4096) = attn projections and
        matmuls at 64x64, ('ffn', 1024), ('conv', 256), ..."""
        coarse = {
            "conv": "conv",
            "ffn": "ffn",
            "attn1_proj": "attention",
            "attn1_matmul": "attention",
            "attn2_proj": "attention",
            "attn2_matmul": "attention",
            "other_linear": "other_linear",
        }
        out: dict[tuple[str, int], int] = defaultdict(int)
        for r in self.rows:
            out[(coarse[r.category], r.tokens)] += r.flops
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "latent_size": self.latent_size,
            "text_len": self.text_len,
            "total": self.total,
            "by_category": self.by_category(),
            "by_tokens": {f"{k}@{t}": v for (k, t), v in self.by_tokens().items()},
        }


def _category(name: str) -> str:
    for which, cat in ((".attn1.", "attn1_proj"), (".attn.", "attn1_proj"), (".attn2.", "attn2_proj")):
        if which in name:  # MMDiT's joint ``attn`` counts with self-attention
            return cat
    if ".ff." in name or ".ff_context." in name:
        return "ffn"
    return "other_linear"


def meta_copy(unet: nn.Module) -> nn.Module:
    """A skeleton of ``unet`` on the meta device with the same Linear/Conv2d shapes and the same
    attention processors (so compressed widths and SlimAttnProcessor are traced as they are); the
    modules a compression replaced or added (per-head norms of RMSNorm-aware selection, the q/k
    projections after the norms) are copied onto it too, on the meta device."""
    with torch.device("meta"):
        skel = type(unet).from_config(unet.config)
    skel.eval()
    for name, mod in unet.named_modules():
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        try:
            ref = skel.get_submodule(name)
        except AttributeError:
            ref = None
        if isinstance(mod, nn.Linear):
            if ref is not None and (ref.in_features, ref.out_features) == (mod.in_features, mod.out_features):
                continue
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        elif ref is None or type(ref) is not type(mod):
            new = copy.deepcopy(mod).to("meta")  # small leaf modules: norms, post-norm projections
        else:
            continue
        parent = skel.get_submodule(parent_name)
        if isinstance(parent, nn.ModuleList | nn.Sequential):
            parent[int(child)] = new
        else:
            setattr(parent, child, new)

    for name, mod in unet.named_modules():
        if ROPE_INDEX in mod._buffers:  # the kept rotary coordinates of narrowed RoPE heads
            set_rope_index(skel.get_submodule(name), mod._buffers[ROPE_INDEX])
        if row_parts(mod) is not None:  # the part widths of a row-packed linear (base.row_part)
            setattr(skel.get_submodule(name), ROW_PARTS, row_parts(mod))
    if hasattr(unet, "attn_processors"):
        skel.set_attn_processor(dict(unet.attn_processors))
    else:  # a model without diffusers' AttentionMixin (Z-Image): attention by attention
        for name, mod in unet.named_modules():
            if callable(getattr(mod, "set_processor", None)) and getattr(mod, "processor", None) is not None:
                skel.get_submodule(name).set_processor(mod.processor)
    return skel


def unet_flops(
    unet: nn.Module, batch: int = 2, latent_size: int = 64, text_len: int = 77, device: str = "cpu"
) -> FlopsReport:
    """``denoiser_flops`` with a square latent (the historical name; works for every family)."""
    return denoiser_flops(unet, batch, latent_size, text_len, device)


def denoiser_flops(
    model: nn.Module,
    batch: int = 2,
    latent_hw: tuple[int, int] | int = 64,
    text_len: int = 77,
    device: str = "cpu",
) -> FlopsReport:
    """Analytic forward FLOPs of any supported denoiser (``slimdiff.families``) at ``batch`` samples
    of ``latent_hw`` latents and ``text_len`` text tokens: the family adapter builds the meta inputs."""

    hw = (latent_hw, latent_hw) if isinstance(latent_hw, int) else tuple(latent_hw)
    args, kwargs = adapter_for(model).example_inputs(model, batch, hw, text_len, device="meta")
    report = forward_flops(model, args, kwargs, batch=batch, device=device)
    report.latent_size, report.text_len = hw[0], text_len
    return report


def forward_flops(
    model: nn.Module, args: tuple, kwargs: dict, *, batch: int, device: str = "cpu"
) -> FlopsReport:
    """Analytic FLOPs of one forward ``model(*args, **kwargs)`` of any diffusers denoiser; the
    inputs are meta tensors of the shapes to count (nothing is computed or allocated).

    Attention matmuls are counted at the widths that really run: a compressed head with
    r_qk != r_vo is padded to one width (``slimdiff.families.attention.common_head_width``, which depends on
    the ``device`` the model will run on)."""

    skel = meta_copy(model)
    rows: list[FlopsRow] = []
    hooks = []
    adapter = adapter_for(model)
    # FFN linears whose names do not say so (FLUX single blocks' proj_mlp and packed proj_out), from
    # the units of the uncompressed architecture (a meta-device build: nothing allocated)
    config = {k: v for k, v in dict(model.config).items() if k != "slimdiff"}  # a Slim* class's plan
    with torch.device("meta"):
        stock = adapter.denoiser_class().from_config(config)
    ffn_linears = {
        split_path(p)[0]
        for u in adapter.units(stock).values()
        if u.kind == "ffn"
        for p in (u.layout.proj_in, u.layout.proj_out, u.layout.gate)
        if p
    }

    def linear_hook(mod: nn.Linear, args, out, name: str) -> None:
        x = args[0]
        tokens = x.numel() // mod.in_features  # all leading dims: batch * sequence
        per_sample = tokens // batch if tokens >= batch else 1
        rows.append(
            FlopsRow(
                name,
                "ffn" if name in ffn_linears else _category(name),
                2 * tokens * mod.in_features * mod.out_features,
                per_sample,
                (tokens, mod.in_features, mod.out_features),
            )
        )

    def conv_hook(mod: nn.Conv2d, args, out, name: str) -> None:
        b, c_out, h, w = out.shape
        kh, kw = mod.kernel_size
        flops = 2 * b * h * w * c_out * (mod.in_channels // mod.groups) * kh * kw
        rows.append(FlopsRow(name, "conv", flops, h * w))

    def attn_hook(mod: nn.Module, args, kwargs, name: str) -> None:
        b, n_q, n_k = adapter.attention_tokens(mod, args, kwargs)
        heads = mod.heads
        widths = getattr(mod.processor, "head_widths", None)
        if callable(widths):  # a compressed processor that reads the widths off a fused projection
            r_qk, r_vo = widths(mod)
        elif getattr(mod, "to_q", None) is None:  # fused projections under the stock processor: whole
            r_qk = r_vo = mod.head_dim
        else:
            r_qk = mod.to_q.out_features // heads
            r_vo = mod.to_v.out_features // heads
        which = "attn2" if name.endswith("attn2") else "attn1"  # MMDiT: joint "attn" counts as attn1
        post = getattr(mod, "slim_qk_post", None)
        if post is not None:  # qk_norm "project": q and k (width d_h) projected to r after the norms
            d_h, r = post.t_q.shape[1], post.t_q.shape[2]
            rows.append(
                FlopsRow(
                    f"{name}.slim_qk_post",
                    f"{which}_proj",
                    2 * b * heads * (n_q + n_k) * d_h * r,
                    n_q,
                    (b, heads, n_q + n_k, d_h, r),
                )
            )
            r_qk = r
        if pads_heads(mod.processor):  # pads to one width
            r_qk = r_vo = common_head_width(r_qk, r_vo, torch.device(device))
        rows.append(
            FlopsRow(
                name,
                f"{which}_matmul",
                2 * b * heads * n_q * n_k * (r_qk + r_vo),
                n_q,
                (b, heads, n_q, n_k, r_qk, r_vo),
            )
        )

    for name, mod in skel.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: linear_hook(m, a, o, n)))
        elif isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: conv_hook(m, a, o, n)))
        elif is_attention_module(mod):
            hooks.append(
                mod.register_forward_pre_hook(lambda m, a, k, n=name: attn_hook(m, a, k, n), with_kwargs=True)
            )
    try:
        with torch.inference_mode():
            skel(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return FlopsReport(rows, batch, 0, 0)


def format_breakdown(report: FlopsReport, top: int = 8) -> str:
    """A small markdown table of where the FLOPs are (by category, then by kind and tokens)."""
    total = report.total
    lines = ["| where | GFLOPs | share |", "|---|---:|---:|"]
    for cat, f in sorted(report.by_category().items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {f / 1e9:.1f} | {f / total:.1%} |")
    lines += ["", "| kind @ tokens | GFLOPs | share |", "|---|---:|---:|"]
    for (kind, tokens), f in list(report.by_tokens().items())[:top]:
        lines.append(f"| {kind} @ {tokens} | {f / 1e9:.1f} | {f / total:.1%} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# FLOP costs of the compression units at a serving shape (allocation budgets in FLOPs)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServingShape:
    """The shape a model serves at: ``batch`` samples per denoiser forward (2 = one image with
    classifier-free guidance) of ``latent_hw`` latents with ``text_len`` text tokens. ``device``
    picks the padding rule of compressed heads (``slimdiff.families.attention.common_head_width``: CUDA
    rounds the common width up to a multiple of 8). Every FLOP here is per denoiser forward: a
    generation costs ``steps`` times as much, a factor common to every plan."""

    latent_hw: tuple[int, int]
    batch: int = 2
    text_len: int = 77
    device: str = "cpu"

    def __post_init__(self) -> None:
        hw = tuple(int(x) for x in self.latent_hw)
        if len(hw) != 2 or min(hw) < 1 or self.batch < 1 or self.text_len < 1:
            raise ValueError(
                f"ServingShape needs latent_hw (h, w) >= 1, batch >= 1 and text_len >= 1; got {self}"
            )
        object.__setattr__(self, "latent_hw", hw)

    def to_dict(self) -> dict:
        return {
            "latent_hw": list(self.latent_hw),
            "batch": self.batch,
            "text_len": self.text_len,
            "device": self.device,
        }


def serving_shape(
    pipe,
    *,
    height: int | None = None,
    width: int | None = None,
    batch: int = 2,
    text_len: int | None = None,
    device: str = "cpu",
) -> ServingShape:
    """The ``ServingShape`` of a diffusers pipeline: ``height`` / ``width`` in pixels (None: the
    denoiser's configured resolution, e.g. 512 px for SD v1.5), ``text_len`` None: the family's
    text length (77 for SD 1.x / XL, 333 for SD3, the tokenizer's for PixArt)."""

    model = denoiser_of(pipe)
    adapter = adapter_for(model)
    vae = int(getattr(pipe, "vae_scale_factor", 8))
    default = adapter.sample_size(model)

    def latent(px: int | None, i: int, key: str) -> int:
        if px is None:
            return int(default[i])
        if px % vae:
            raise ValueError(f"{key}: {px} px is not a multiple of the VAE's downsampling factor {vae}")
        return px // vae

    return ServingShape(
        (latent(height, 0, "height"), latent(width, 1, "width")),
        batch,
        adapter.text_len(pipe) if text_len is None else text_len,
        device,
    )


@dataclass(frozen=True)
class AttentionCost:
    """The rank-dependent FLOPs of one attention module at a serving shape, as ``forward_flops``
    counts them once the attention is compressed (so that a plan's predicted FLOPs are exact):

    * ``qk_proj``: FLOPs per unit of QK rank of its query and key projections (every head, every
      token of their streams, the queries whose outputs are discarded included: they run);
    * ``vo_proj``: per unit of VO rank, the value projections (key tokens) and the out projections
      (query tokens);
    * ``matmul``: one attention matmul per unit of head width, 2 B H N_q N_k (the logits q k^T and
      the probabilities times the values each cost this per unit of their width);
    * ``post``: qk_norm "project" only: the projections after the q/k norms per unit of VO rank,
      2 B H (N_q + N_k) d_h (0 otherwise).

    A compressed attention runs its two matmuls at one common width (``common_head_width``: the
    narrower of q/k and v is zero-padded so the fused kernel applies), so cutting QK below VO
    removes no logit FLOPs: ``flops`` is exact, the per-unit linear costs (``FlopCosts.per_rank``)
    are exact only where r_qk = r_vo."""

    module: str
    head_dim: int
    qk_proj: int
    vo_proj: int
    matmul: int
    post: int = 0
    device: str = "cpu"

    def flops(self, r_qk: int, r_vo: int) -> int:

        d = self.head_dim
        extra = 0
        width_qk = r_qk
        if self.post and r_vo < d:  # q and k projected to the VO rank after their norms
            extra, width_qk = self.post * r_vo, r_vo
        if r_qk < d or r_vo < d:  # a compressed attention: the slimdiff processor pads to one width
            w = common_head_width(width_qk, r_vo, torch.device(self.device))
            mm = 2 * w * self.matmul
        else:
            mm = (r_qk + r_vo) * self.matmul
        return self.qk_proj * r_qk + self.vo_proj * r_vo + mm + extra


@dataclass(frozen=True)
class FlopCosts:
    """FLOPs per denoiser forward at ``shape`` as a function of the units' ranks.

    ``per_rank[unit]``: what one unit of rank costs, counted like ``forward_flops``: FFN, the
    in projection (both GEGLU halves) and the out projection on every token; QK, its q and k
    projections plus the logits (``AttentionCost.matmul``); VO, its v and out projections plus the
    probabilities times values. ``attentions``: the exact cost of every attention (the padding of
    a compressed attention to one head width, the post-norm projections of qk_norm "project"),
    which the allocation uses. ``total``: ``forward_flops`` of the uncompressed model."""

    shape: ServingShape
    total: int
    per_rank: dict[str, int]
    full_rank: dict[str, int]
    attentions: dict[str, AttentionCost]
    unit_attention: dict[str, tuple[str, str]]  # qk / vo unit -> (attention module path, kind)
    qk_norm: str = "auto"

    def attention_ranks(self, ranks: Mapping[str, int], module: str) -> tuple[int, int]:
        """(r_qk, r_vo) of attention ``module`` under ``ranks`` (a unit not named stays whole)."""
        att = self.attentions[module]
        out = {"qk": att.head_dim, "vo": att.head_dim}
        for n, (m, kind) in self.unit_attention.items():
            if m == module and n in ranks:
                out[kind] = int(ranks[n])
        return out["qk"], out["vo"]

    def plan_flops(self, ranks: Mapping[str, int]) -> int:
        """FLOPs of one forward with these ranks (units not named stay whole): exactly what
        ``forward_flops`` counts for the model compressed to them (on ``shape.device``)."""
        unknown = sorted(set(ranks) - set(self.per_rank))
        if unknown:
            raise ValueError(f"ranks name units the cost model does not have, e.g. {unknown[:3]}")
        out = self.total
        for n, r in ranks.items():
            if n not in self.unit_attention:
                out -= (self.full_rank[n] - int(r)) * self.per_rank[n]
        touched = {self.unit_attention[n][0] for n in ranks if n in self.unit_attention}
        for module in touched:
            att = self.attentions[module]
            out += att.flops(*self.attention_ranks(ranks, module)) - att.flops(att.head_dim, att.head_dim)
        return out

    def to_dict(self) -> dict:
        """What a rank plan records of its cost model."""
        return {"kind": "flops", "serving": self.shape.to_dict(), "qk_norm": self.qk_norm}

    # -- the cost-model protocol the allocator reads (``slimdiff.planning.latency.CostModel``) ------------
    kind: ClassVar[str] = "flops"

    def has_unit(self, name: str) -> bool:
        return name in self.per_rank

    def unit_cost(self, name: str, rank: int) -> int:
        """FLOPs of a unit at ``rank`` by its per-rank cost (exact for FFN units; attentions:
        ``attention_cost``)."""
        return int(rank) * self.per_rank[name]

    def attention_cost(self, module: str, r_qk: int, r_vo: int) -> int:
        return self.attentions[module].flops(r_qk, r_vo)

    def head_dim(self, module: str) -> int:
        return self.attentions[module].head_dim

    def plan_cost(self, ranks: Mapping[str, int]) -> int:
        return self.plan_flops(ranks)


def unit_flop_costs(
    model: nn.Module, shape: ServingShape, qk_norm: str = "auto", units: dict | None = None
) -> FlopCosts:
    """The FLOP cost model of every compression unit of the UNCOMPRESSED ``model`` at ``shape``:
    one ``forward_flops`` trace on the meta device (no memory, no compute), every cost read off its
    rows, so that ``FlopCosts.plan_flops`` reproduces ``forward_flops`` of any compressed model
    exactly. ``qk_norm`` is ``compression.qk_norm`` ("project" adds post-norm projections to a
    normed attention whose VO is cut)."""

    adapter = adapter_for(model)
    units = adapter.units(model) if units is None else units
    args, kwargs = adapter.example_inputs(model, shape.batch, shape.latent_hw, shape.text_len, device="meta")
    report = forward_flops(model, args, kwargs, batch=shape.batch, device=shape.device)
    linear_flops: dict[str, int] = defaultdict(int)
    matmuls: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for row in report.rows:
        if row.category.endswith("_matmul"):
            matmuls[row.module].append(row.dims)
        elif len(row.dims) == 3 and not row.module.endswith(".slim_qk_post"):
            linear_flops[row.module] += row.flops

    def per(path: str, width: int) -> int:  # FLOPs of a linear per unit of its rank dimension
        part, whole = packed_share(model, path)  # a packed linear's columns or row part: their share
        f = linear_flops.get(split_path(path)[0], 0) * part // whole
        if f % width:
            raise ValueError(f"{path}: {f} FLOPs are not a multiple of its width {width}")
        return f // width

    per_rank: dict[str, int] = {}
    full_rank: dict[str, int] = {}
    attentions: dict[str, AttentionCost] = {}
    unit_attention: dict[str, tuple[str, str]] = {}
    for name, u in units.items():
        lay = u.layout
        full_rank[name] = u.full_rank
        if isinstance(lay, FFNLayout):
            per_rank[name] = per(lay.proj_in, u.full_rank) + per(lay.proj_out, u.full_rank)
            if lay.gate:  # a separate gate linear (SwiGLU)
                per_rank[name] += per(lay.gate, u.full_rank)
            continue
        unit_attention[name] = (lay.module, u.kind)
        if lay.module not in attentions:
            d, pairs, sums = lay.head_dim, 0, 0
            for b, heads, n_q, n_k, r_qk, r_vo in matmuls.get(lay.module, []):
                if (r_qk, r_vo) != (d, d):
                    raise ValueError(
                        f"{lay.module}: runs at head widths ({r_qk}, {r_vo}), not {d}: FLOP costs are "
                        "counted on the uncompressed model"
                    )
                pairs += b * heads * n_q * n_k
                sums += b * heads * (n_q + n_k)
            attentions[lay.module] = AttentionCost(
                module=lay.module,
                head_dim=d,
                qk_proj=sum(per(p, d) for p in (*lay.all_query, *lay.key)),
                vo_proj=sum(per(p, d) for p in lay.value) + sum(per(p, d) for p in lay.out),
                matmul=2 * pairs,
                post=2 * sums * d if qk_norm == "project" and lay.qk_norm else 0,
                device=shape.device,
            )
        att = attentions[lay.module]
        per_rank[name] = (att.qk_proj if u.kind == "qk" else att.vo_proj) + att.matmul
    return FlopCosts(shape, report.total, per_rank, full_rank, attentions, unit_attention, qk_norm)
