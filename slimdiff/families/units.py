"""The front door to the model families (``slimdiff.families``): units, layouts and their costs for any
supported denoiser, without naming a family.

Compression units (METHOD.md stage 4), one rank per unit, named from the block's module path:

* ``{block}.ff``        FFN: rank = kept intermediate neurons (full = inner dim, 4d in SD)
* ``{block}.{attn}.qk`` query-key: rank = per-head q/k dim (full = d_h), same for every head
* ``{block}.{attn}.vo`` value-output: rank = per-head v dim (full = d_h)

e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.qk`` (a UNet) or
``transformer_blocks.7.ff`` (a DiT). Which family a model belongs to is decided once, by
``slimdiff.families.adapter_for`` (its denoiser class and block types); this module never imports a
diffusers block class.

Which denoiser: a pipeline may have several denoiser components (Wan 2.2 A14B: ``transformer`` for
the high-noise steps, ``transformer_2`` for the low-noise ones). ``denoisers(pipe)`` lists those its
sampler calls, by component name, the family adapter's own (``denoiser_of``) first; ``steps_served``
says at which of the scheduler's timesteps the sampler calls each. A family adapter opts in by
overriding ``ModelAdapter.denoiser_components(pipe)`` and ``steps_served(pipe, name)``
(``slimdiff.families.wan``); by default a pipeline has the one denoiser ``denoiser_of`` names,
called at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimdiff.families.base import (
    AttentionLayout,
    FFNLayout,
    UnitInfo,
    UnitKind,
    UnsupportedModelError,
    adapter_for,
    denoiser_attr,
    denoiser_of,
    linear,
    split_path,
)

F64 = torch.float64

__all__ = [
    "AttentionLayout",
    "FFNLayout",
    "UnitInfo",
    "UnitKind",
    "UnsupportedModelError",
    "adapter_for",
    "compression_units",
    "compressible_parameter_count",
    "count_parameters",
    "denoiser_of",
    "denoisers",
    "linear",
    "parameter_dtype",
    "qk_left_whole",
    "short_unit_label",
    "steps_served",
]


def compression_units(model: nn.Module) -> dict[str, UnitInfo]:
    """Every compression unit of ``model`` (any supported denoiser), keyed by unit name, in module
    order. Raises UnsupportedModelError naming the block type for unsupported models."""
    return adapter_for(model).units(model)


def qk_left_whole(unit: UnitInfo, qk_norm: str) -> bool:
    """Whether ``compression.qk_norm`` leaves this unit out of every plan: a QK under per-head q/k
    RMSNorms unless the mode is "select" ("keep" / "project" leave them whole); "auto" leaves whole
    those that also carry rotary embeddings (FLUX-class: pair selection measured behind "keep" at
    equal FLOPs) and selects the others (SD3-class: "select" measured equal to "keep" up to 40%)."""
    if unit.kind != "qk" or not unit.layout.qk_norm:
        return False
    if qk_norm == "auto":
        return bool(unit.layout.rope)
    return qk_norm != "select"


def planned_units(units: dict[str, UnitInfo], modules, qk_norm: str = "auto") -> dict[str, UnitInfo]:
    """The units a plan allocates: the kinds in ``modules``, without the QKs ``qk_norm`` leaves
    whole (:func:`qk_left_whole`)."""
    return {n: u for n, u in units.items() if u.kind in modules and not qk_left_whole(u, qk_norm)}


def compressible_parameter_count(model: nn.Module, units: dict[str, UnitInfo]) -> int:
    """Parameters of the compressible set counted on the live layers of ``model`` (compressed or
    not; ``units`` are those of the original architecture): the rank-dependent tensors of each
    unit's cost model -- FFN proj_in and gate (weight, bias) and proj_out weight; QK query/key linears
    (weight, bias); VO value linears (weight, bias) and out linears' weight. On an uncompressed
    model it equals the sum of the units' full_params.

    A packed path's column range (``packed_path``: FLUX's single-block ``proj_out[:3072]`` and
    ``proj_out[-12288:]``) is given in the original's widths, which no longer hold once a part is
    narrowed; its parts together cover the whole layer (every family that packs columns does), so the
    whole packed layer's weight is counted, once. Row parts (``row_part``) address the live widths."""
    seen: set[str] = set()
    total = 0

    def add(path: str, with_bias: bool) -> None:
        nonlocal total
        base, cols = split_path(path)
        if cols is not None:  # a column range of a packed linear: the whole layer, counted once
            path = base
        key = f"{path}:{with_bias}"
        if key in seen:
            return
        seen.add(key)
        layer = linear(model, path)
        total += layer.weight.numel() + (layer.bias.numel() if with_bias and layer.bias is not None else 0)

    for u in units.values():
        lay = u.layout
        if isinstance(lay, FFNLayout):
            add(lay.proj_in, True)
            if lay.gate:
                add(lay.gate, True)
            add(lay.proj_out, False)
        elif u.kind == "qk":
            for p in (*lay.all_query, *lay.key):
                add(p, True)
        else:
            for p in lay.value:
                add(p, True)
            for p in lay.out:
                add(p, False)
    return total


def short_unit_label(name: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2.qk' -> 'd1.a0.t0 attn2.qk'."""
    abbrev = {
        "down_blocks": "d",
        "up_blocks": "u",
        "mid_block": "mid",
        "attentions": "a",
        "transformer_blocks": "t",
    }
    parts = name.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p in abbrev:
            nxt = parts[i + 1] if i + 1 < len(parts) and parts[i + 1].isdigit() else ""
            out.append(abbrev[p] + nxt)
            i += 2 if nxt else 1
        else:
            break
    return ".".join(out) + " " + ".".join(parts[i:])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def out_heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """to_out.0 weight (d_out, H*d_h) -> (H, d_h, d_out): head h's block in row-vector form."""
    w = weight.detach().to("cpu", F64)
    return w.view(w.shape[0], heads, w.shape[1] // heads).permute(1, 2, 0)


def pipeline_call_kwargs(pipe, guidance_scale: float, batch: int) -> dict:
    """The sampling kwargs that make the pipeline run its denoiser the way its family does
    (``ModelAdapter.pipeline_kwargs``, the same calibration uses: ``guidance_scale`` for UNets, SD3
    and FLUX.1-dev; FluxPipeline's true classifier-free guidance for FLUX without a guidance
    embedding, and ``max_sequence_length`` = its T5 tokenizer's length below 512, as for the toy
    FLUX); pipelines whose denoiser slimdiff does not know get ``guidance_scale`` as given."""

    try:
        kwargs, _ = adapter_for(denoiser_of(pipe)).pipeline_kwargs(pipe, guidance_scale, batch)
    except UnsupportedModelError:
        return {"guidance_scale": guidance_scale}
    return kwargs


def _family(pipe):
    """(adapter, first denoiser) of ``pipe``; adapter None when slimdiff does not know the denoiser."""
    first = denoiser_of(pipe)
    try:
        return adapter_for(first), first
    except UnsupportedModelError:
        return None, first


def denoisers(pipe) -> dict[str, nn.Module]:
    """Every denoiser ``pipe``'s sampler calls, by pipeline component name, in sampling order: the
    one ``denoiser_of`` names first (``unet`` / ``transformer``), then any others the family adapter
    lists (``denoiser_components``; Wan 2.2 A14B: ``transformer_2``). The adapter validates a
    pipeline of several denoisers (UnsupportedModelError naming what is not supported)."""
    adapter, first = _family(pipe)
    if adapter is None:
        return {denoiser_attr(pipe): first}
    names = tuple(adapter.denoiser_components(pipe))
    models = {name: getattr(pipe, name, None) for name in names}
    bad = [n for n, m in models.items() if not isinstance(m, nn.Module)]
    if bad or not names or models[names[0]] is not first:
        raise UnsupportedModelError(f"{type(pipe).__name__}: no denoiser module at {bad or names}")
    return models


def steps_served(pipe, name: str) -> Callable | None:
    """At which steps ``pipe``'s sampler calls its denoiser ``name`` (a key of ``denoisers``): a
    function of the scheduler's ``timesteps`` (a tensor) returning the boolean mask of the steps it
    runs at, computed as the pipeline decides (Wan 2.2 A14B: ``t >= boundary_ratio *
    num_train_timesteps`` for ``transformer``, ``<`` for ``transformer_2``); None: every step."""
    names = list(denoisers(pipe))
    if name not in names:
        raise KeyError(f"{name!r} is not a denoiser of {type(pipe).__name__} (it has {names})")
    adapter, _ = _family(pipe)
    return None if adapter is None else adapter.steps_served(pipe, name)
