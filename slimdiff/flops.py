"""Analytic FLOPs of a denoiser forward, counted from the actual (possibly compressed) layer shapes.

Why analytic: the speed-up a compression can buy is bounded by the FLOPs it removes; measured
latency divided by that bound says how much of it the runtime realises. The count is exact for
the operations it covers and ignores the rest (stated so nobody mistakes it for a profiler):

* every ``nn.Linear``: 2 * tokens * in * out
* every ``nn.Conv2d``: 2 * B * H_out * W_out * C_out * (C_in / groups) * k_h * k_w
* attention matmuls of every diffusers ``Attention``: 2 * B * heads * N_q * N_k * (r_qk + r_vo)
  (logits q k^T and probabilities times values, with the per-head widths actually in use: untied
  compressed widths are padded to one, see ``slimdiff.attention``)

Not counted: biases, norms, softmax, activations, residual adds, up-sampling interpolation
(all elementwise, a few percent of a SD UNet).

How: the model's layer shapes are copied onto a skeleton on the meta device (no memory, no
compute) and one forward is traced with hooks for the given batch, latent size and text length.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

CATEGORIES = ("conv", "attn1_proj", "attn1_matmul", "attn2_proj", "attn2_matmul", "ffn", "other_linear")


@dataclass(frozen=True)
class FlopsRow:
    module: str
    category: str  # one of CATEGORIES
    flops: int
    tokens: int  # spatial tokens (H*W) the module runs at; query tokens for attention; 1 for embeddings


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
    if hasattr(unet, "attn_processors"):
        skel.set_attn_processor(dict(unet.attn_processors))
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
    """Analytic forward FLOPs of any supported denoiser (``slimdiff.arch``) at ``batch`` samples
    of ``latent_hw`` latents and ``text_len`` text tokens: the family adapter builds the meta inputs."""
    from slimdiff.arch.base import adapter_for

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
    r_qk != r_vo is padded to one width (``slimdiff.attention.common_head_width``, which depends on
    the ``device`` the model will run on)."""
    from diffusers.models.attention_processor import Attention

    from slimdiff.arch.base import adapter_for
    from slimdiff.attention import SlimAttnProcessor, SlimJointAttnProcessor, common_head_width

    skel = meta_copy(model)
    rows: list[FlopsRow] = []
    hooks = []

    def linear_hook(mod: nn.Linear, args, out, name: str) -> None:
        x = args[0]
        tokens = x.numel() // mod.in_features  # all leading dims: batch * sequence
        per_sample = tokens // batch if tokens >= batch else 1
        rows.append(
            FlopsRow(name, _category(name), 2 * tokens * mod.in_features * mod.out_features, per_sample)
        )

    def conv_hook(mod: nn.Conv2d, args, out, name: str) -> None:
        b, c_out, h, w = out.shape
        kh, kw = mod.kernel_size
        flops = 2 * b * h * w * c_out * (mod.in_channels // mod.groups) * kh * kw
        rows.append(FlopsRow(name, "conv", flops, h * w))

    adapter = adapter_for(model)

    def attn_hook(mod: nn.Module, args, kwargs, name: str) -> None:
        b, n_q, n_k = adapter.attention_tokens(mod, args, kwargs)
        heads = mod.heads
        r_qk = mod.to_q.out_features // heads
        r_vo = mod.to_v.out_features // heads
        which = "attn2" if name.endswith("attn2") else "attn1"  # MMDiT: joint "attn" counts as attn1
        post = getattr(mod, "slim_qk_post", None)
        if post is not None:  # qk_norm "project": q and k (width d_h) projected to r after the norms
            d_h, r = post.t_q.shape[1], post.t_q.shape[2]
            rows.append(
                FlopsRow(f"{name}.slim_qk_post", f"{which}_proj", 2 * b * heads * (n_q + n_k) * d_h * r, n_q)
            )
            r_qk = r
        if isinstance(mod.processor, SlimAttnProcessor | SlimJointAttnProcessor):  # pads to one width
            r_qk = r_vo = common_head_width(r_qk, r_vo, torch.device(device))
        rows.append(FlopsRow(name, f"{which}_matmul", 2 * b * heads * n_q * n_k * (r_qk + r_vo), n_q))

    for name, mod in skel.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: linear_hook(m, a, o, n)))
        elif isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: conv_hook(m, a, o, n)))
        elif isinstance(mod, Attention):
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
