"""What slimdiff must know about a model family, behind one interface (the adapter), and the registry
that picks the adapter for a denoiser by its class and its block types (never by model names).

An adapter describes a denoiser as *compression units* (``UnitInfo``), each with a ``layout``: the
module paths of the linear layers the unit's rewrite touches. Everything downstream is generic over
layouts: the statistics hooks (``stat_sites``), influence, error profiles, the surgery, the shape
rebuild at load time and the FLOPs counter. A family only says where its layers are, what each
forward's inputs look like, and which attention processor runs a compressed attention.

Units (one rank each, METHOD.md stage 4):

* ``ffn``: rank = kept intermediate neurons. ``FFNLayout(proj_in, proj_out, gated)``: proj_in
  produces the intermediate (gated: its rows are [hidden | gate] halves, one shared selection),
  proj_out consumes it; ``gate`` names a separate gate linear (SwiGLU), its rows kept with proj_in's.
* ``qk``: rank = per-head query/key width. ``AttentionLayout.query`` / ``.key``: the linears whose
  outputs are split into query / key heads (one per token stream: MMDiT has two).
* ``vo``: rank = per-head value width. ``.value``: linears producing value heads; ``.out``: the
  linears that consume the per-head attention output.

A layout path names a whole ``nn.Linear`` or a part of a packed one: input columns [start:stop)
of a linear consuming a concatenation (``packed_path``, FLUX's single-block ``proj_out``), or the
i-th row part of a linear whose output is a concatenation (``row_part``, FLUX.2's single-block
``to_qkv_mlp_proj``: q | k | v | MLP). Row parts are addressed by index among widths recorded on
the layer (``record_row_parts``), so a part keeps its address while other parts are narrowed.

Statistic keys (``slimdiff.core.stats``) are named from the unit's block path, so a rank plan, a
covariance store and a compressed folder written for one family are read the same way.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from slimdiff.core.linalg import rope_phase_moments
from slimdiff.core.stats import ATTN_OUT, KEY, KEY_NORMED, QUERY, QUERY_NORMED, attn_key, mean_key
from slimdiff.families.attention import SlimAttnProcessor

logger = logging.getLogger(__name__)

UnitKind = Literal["ffn", "qk", "vo"]


class UnsupportedModelError(ValueError):
    """The model (or one of its modules) has a structure SlimDiff cannot compress."""


# --------------------------------------------------------------------------------------------
# Layouts and units
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenMask:
    """Where a token stream's padding mask is: the ``arg`` argument of every call of the module at
    ``module``, a (B, N) mask of the stream's N tokens, boolean (True: a real token) or additive
    (0: a real token, large negative: padding). The statistics of that stream keep only the real
    tokens (Qwen-Image: the blocks' boolean ``encoder_hidden_states_mask`` marks padded text)."""

    module: str
    arg: str


@dataclass(frozen=True)
class FFNLayout:
    proj_in: str  # nn.Linear d -> inner (gated: d -> 2 * inner, rows [hidden | gate])
    proj_out: str  # nn.Linear inner -> d
    gated: bool
    hidden_key: str  # statistic: second moment of proj_out's input (the intermediate h)
    # the token stream the FFN acts on: "image" (the latent tokens) or "text" (MMDiT's ff_context)
    stream: str = "image"
    # the padding mask of that stream (None: every token is real)
    token_mask: TokenMask | None = None
    # a separate gate linear d -> inner (SwiGLU's w1: h = act(gate x) * proj_in x), its rows
    # selected with proj_in's (one selection); "" when there is none
    gate: str = ""
    # an attention module whose processor splits this FFN's input off a fused projection (a
    # parallel block, FLUX.2's single blocks: one linear computes q | k | v | MLP): it gets the
    # family's compressed processor when this FFN is rewritten, as when its QK or VO is; "" if none
    attention: str = ""


@dataclass(frozen=True)
class AttentionLayout:
    module: str  # path of the attention module (its processor is replaced when compressed)
    heads: int
    head_dim: int  # d_h of q, k and v in the original model (the softmax scale is 1/sqrt(d_h))
    query: tuple[str, ...]  # linears whose outputs are the query heads (one per token stream)
    key: tuple[str, ...]
    value: tuple[str, ...]
    out: tuple[str, ...]  # linears consuming the per-head attention output (one per stream)
    query_key: str  # statistic keys: per-head second moments of q, k and the attention output
    key_key: str
    attnout_key: str
    query_normed_key: str = ""  # ... and of q, k after their RMSNorm (only with norms_q / norms_k)
    key_normed_key: str = ""
    # the module's ``attention_mask`` marks padded key/value tokens (e.g. T5 padding in PixArt's
    # cross-attention): those tokens are left out of the key statistics
    masked_keys: bool = False
    # query linears whose outputs the model discards (MMDiT's last block: text queries): rewritten
    # with the same transform as ``query`` so shapes stay consistent, never measured
    unused_query: tuple[str, ...] = ()
    # per-head RMSNorm modules applied to q and k after the projections (MMDiT qk_norm), aligned
    # with the streams; empty when the attention has none
    norms_q: tuple[str, ...] = ()
    norms_k: tuple[str, ...] = ()
    # the stock processor calls the norms on (B, heads, N, d) (SD3) or on (B, N, heads, d) (FLUX)
    norms_head_major: bool = True
    # linears of the text token stream (MMDiT's add_q/k/v_proj and to_add_out): their share of a
    # unit's parameters is the text stream's (slimdiff.planning.streams); the others act on image tokens
    text_linears: tuple[str, ...] = ()
    # rotary position embeddings rotate coordinate pairs (2i, 2i+1) of q and k after the norms
    # (FLUX and its descendants): the QK unit is compressed by keeping whole pairs (METHOD.md "RoPE")
    rope: bool = False
    # padding mask of the text stream (None: every text token is real): the statistics of the text
    # linears (and of the text stream's q/k norms) keep only real tokens, so padded text tokens
    # enter neither the text queries nor the keys image queries see nor the text attention output
    text_mask: TokenMask | None = None
    # the q/k RMSNorms act ACROSS heads (one norm over all heads * head_dim coordinates, before the
    # head split: Wan): a selection's norm correction and renormalisation use all heads' kept
    # coordinates together, and each norm becomes one ``AcrossHeadsRMSNorm``
    norms_across_heads: bool = False

    @property
    def qk_norm(self) -> bool:
        return bool(self.norms_q or self.norms_k)

    @property
    def first_moments(self) -> bool:
        """Whether the QK's error model takes the raw q/k means (recorded as statistics): under
        q/k norms WITH RoPE. Without RoPE (SD3) the zero-mean token model is kept, by measurement:
        on the toy MMDiT the means made the profile optimistic for its joint attentions and the
        default plan 3.3 dB worse at 40% (docs/METHOD.md, MMDiT)."""
        return self.qk_norm and self.rope

    @property
    def query_mean_key(self) -> str:
        """Statistic key of the raw queries' per-head mean ("" where ``first_moments`` is off)."""
        return mean_key(self.query_key) if self.first_moments else ""

    @property
    def key_mean_key(self) -> str:
        return mean_key(self.key_key) if self.first_moments else ""

    @property
    def all_query(self) -> tuple[str, ...]:
        return (*self.query, *self.unused_query)


@dataclass(frozen=True)
class UnitInfo:
    """One compression unit: the thing a rank plan assigns a rank to."""

    name: str  # e.g. "mid_block.attentions.0.transformer_blocks.0.attn2.qk"
    kind: UnitKind
    block: str  # path of the block the unit belongs to
    attn: str | None  # attention name inside the block ("attn1", "attn2", ...), None for ffn
    full_rank: int  # R_m: inner dim for ffn, d_h for qk / vo
    cost_per_rank: int  # parameters per unit of rank (biases included)
    layout: FFNLayout | AttentionLayout | None = field(default=None, compare=False)

    @property
    def full_params(self) -> int:
        return self.full_rank * self.cost_per_rank

    def stat_keys(self) -> tuple[str, ...]:
        lay = self.layout
        if lay is None:
            return ()
        if isinstance(lay, FFNLayout):
            return (lay.hidden_key,)
        if self.kind == "vo":
            return (lay.attnout_key,)
        if lay.qk_norm:
            return (lay.query_key, lay.key_key, lay.query_normed_key, lay.key_normed_key)
        return (lay.query_key, lay.key_key)

    def first_moment_keys(self) -> tuple[str, ...]:
        """Statistics the unit's error model also reads where they exist (calibration records them;
        statistics from before they did still work, with a zero-mean token model): the raw q / k
        per-head means of a QK under q/k norms and RoPE (``AttentionLayout.first_moments``)."""
        lay = self.layout
        if self.kind == "qk" and isinstance(lay, AttentionLayout) and lay.first_moments:
            return (lay.query_mean_key, lay.key_mean_key)
        return ()


@dataclass(frozen=True)
class StatSite:
    """One hooked activation: the statistic it feeds and how to reduce it."""

    key: str
    module: str  # path of the module whose input ("pre") or output ("post") is recorded
    kind: Literal["pre", "post"]
    heads: int  # 0: one full gram; else per-head grams
    shape: tuple[int, ...]
    first_moment: bool = False  # the per-head sum of the tokens (shape (heads, d)), not their grams
    mask_module: str | None = None  # module whose calls carry the mask that selects the tokens
    head_major: bool = False  # the tensor is (B, heads, N, d) (a per-head norm's output), not (B, N, heads*d)
    # only features [start, stop) of the hooked tensor are this key's: input columns of a packed
    # linear ("pre", ``packed_path``) or output rows of one ("post", ``row_part``)
    cols: tuple[int, int] | None = None
    mask_arg: str = "attention_mask"  # the argument of mask_module's calls that holds the mask


def packed_path(path: str, start: int, stop: int | None = None) -> str:
    """The layout path of input columns [start, stop) of a linear that consumes a concatenation
    (FLUX's single-block ``proj_out`` takes [attention output | MLP hidden]). A negative ``start``
    with ``stop`` None counts from the end, so each part keeps its address when the other part is
    narrowed: ``proj_out[:3072]`` (attention) and ``proj_out[-12288:]`` (MLP)."""
    return f"{path}[{start}:{'' if stop is None else stop}]"


#: attribute of a linear whose output rows are a concatenation of parts (FLUX.2's single-block
#: ``to_qkv_mlp_proj``: q | k | v | MLP): the CURRENT number of rows of every part, in row order.
#: ``record_row_parts`` sets it on the original layer; ``replace_module`` keeps it up to date when a
#: part is narrowed, so every part keeps its address ``row_part(path, i)`` in any order of rewrites.
ROW_PARTS = "slimdiff_row_parts"


def row_part(path: str, index: int) -> str:
    """The layout path of row part ``index`` of the packed linear at ``path`` (``ROW_PARTS``):
    ``"a.to_qkv_mlp_proj#1"``. ``linear`` views it (its rows and their bias), ``replace_module``
    replaces it, statistics hook its rows of the output, FLOPs give it its share of the layer."""
    return f"{path}#{int(index)}"


def split_row_part(path: str) -> tuple[str, int | None]:
    """``"a.b#1"`` -> (``"a.b"``, 1); any other path -> (path, None)."""
    base, sep, index = path.rpartition("#")
    return (base, int(index)) if sep else (path, None)


def row_parts(layer: nn.Module) -> tuple[int, ...] | None:
    """The recorded row-part widths of a packed linear (``ROW_PARTS``), or None."""
    parts = getattr(layer, ROW_PARTS, None)
    return None if parts is None else tuple(int(w) for w in parts)


def record_row_parts(model: nn.Module, path: str, widths: tuple[int, ...]) -> tuple[str, ...]:
    """Declare the linear at ``path`` packed by rows into parts of ``widths`` (an adapter calls it
    while building its units) and return the parts' layout paths (``row_part``). A record already
    on the layer is kept: it holds the current widths (a part narrowed by ``replace_module``).
    Raises UnsupportedModelError when the widths do not add up to the layer's rows."""
    layer = linear(model, path)
    parts = row_parts(layer)
    if parts is None:
        parts = tuple(int(w) for w in widths)
        if sum(parts) != layer.out_features:
            raise UnsupportedModelError(
                f"{path}: {layer.out_features} output rows, expected the parts {' | '.join(map(str, parts))} "
                f"= {sum(parts)}"
            )
        setattr(layer, ROW_PARTS, parts)
    elif len(parts) != len(widths) or sum(parts) != layer.out_features:
        raise UnsupportedModelError(
            f"{path}: its recorded row parts {parts} do not fit {layer.out_features} rows in {len(widths)} parts"
        )
    return tuple(row_part(path, i) for i in range(len(parts)))


def split_path(path: str) -> tuple[str, slice | None]:
    """``"a.b[0:8]"`` -> (``"a.b"``, slice(0, 8)); a row part ``"a.b#1"`` -> (``"a.b"``, None); a
    plain module path -> (path, None). The first element is always the module's path."""
    base, index = split_row_part(path)
    if index is not None:
        return base, None
    if not path.endswith("]"):
        return path, None
    base, _, spec = path[:-1].rpartition("[")
    start, _, stop = spec.partition(":")
    return base, slice(int(start) if start else None, int(stop) if stop else None)


def column_range(path: str, in_features: int) -> tuple[int, int]:
    """[start, stop) of a packed path's columns in a linear of ``in_features`` inputs (the whole
    range for a plain path)."""
    _, cols = split_path(path)
    if cols is None:
        return 0, in_features
    start, stop, _ = cols.indices(in_features)
    return start, stop


def row_range(layer: nn.Linear, path: str) -> tuple[int, int]:
    """[start, stop) of the rows of row part ``path`` (``row_part``) in its packed ``layer``, from
    the widths recorded on the layer."""
    base, index = split_row_part(path)
    parts = row_parts(layer)
    if parts is None or not 0 <= index < len(parts) or sum(parts) != layer.out_features:
        raise UnsupportedModelError(
            f"{path}: {base} has no row part {index} (recorded parts: {parts}, {layer.out_features} rows); "
            "its family adapter records them (record_row_parts) when it builds the units"
        )
    start = sum(parts[:index])
    return start, start + parts[index]


def packed_share(model: nn.Module, path: str) -> tuple[int, int]:
    """(features the path addresses, features of its linear along that axis): its input columns
    of the layer's inputs, its row part's rows of the layer's outputs; (1, 1) for a whole linear.
    A part's share of the layer's FLOPs is the first over the second."""
    base, index = split_row_part(path)
    if index is not None:
        whole = linear(model, base)
        start, stop = row_range(whole, path)
        return stop - start, whole.out_features
    base, cols = split_path(path)
    if cols is None:
        return 1, 1
    whole = linear(model, base)
    start, stop = column_range(path, whole.in_features)
    return stop - start, whole.in_features


def linear(model: nn.Module, path: str) -> nn.Linear:
    """The ``nn.Linear`` at ``path``; for a packed path (``packed_path``) a view of its columns
    (weights shared with the model, no bias: the bias belongs to the whole layer); for a row part
    (``row_part``) a view of its rows and their bias."""
    base, index = split_row_part(path)
    if index is not None:
        whole = linear(model, base)
        start, stop = row_range(whole, path)
        view = nn.Linear(whole.in_features, stop - start, bias=whole.bias is not None, device="meta")
        view.weight = nn.Parameter(whole.weight.detach()[start:stop], requires_grad=False)
        if whole.bias is not None:
            view.bias = nn.Parameter(whole.bias.detach()[start:stop], requires_grad=False)
        return view
    base, cols = split_path(path)
    if cols is not None:
        whole = linear(model, base)
        start, stop = column_range(path, whole.in_features)
        view = nn.Linear(stop - start, whole.out_features, bias=False, device="meta")
        view.weight = nn.Parameter(whole.weight.detach()[:, start:stop], requires_grad=False)
        return view
    mod = model.get_submodule(path)
    if not isinstance(mod, nn.Linear):
        raise UnsupportedModelError(
            f"{path}: expected nn.Linear, got {type(mod).__name__} (fused or quantized projections are "
            "not supported: compress the original float model, e.g. call unfuse_qkv_projections() first)"
        )
    return mod


def _rebuilt(whole: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A new linear of ``weight`` (out, in) and ``bias`` in ``whole``'s dtype and device (shapes
    only when either is on the meta device)."""
    w = whole.weight
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        if weight.device.type != "meta" and w.device.type != "meta":
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
    return layer


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path``. A packed path replaces only its columns of the packed linear (which
    stays one layer: its other columns and its bias are kept); ``new`` is then an ``nn.Linear``
    whose input width may differ from the columns it replaces. A row part (``row_part``) replaces
    only its rows and their bias (``new`` has a bias where the layer has one), and the layer's
    record of its parts' widths is updated, so the other parts keep their addresses."""
    base, index = split_row_part(path)
    if index is not None:
        whole = linear(model, base)
        start, stop = row_range(whole, path)
        if (new.bias is not None) != (whole.bias is not None):
            raise ValueError(f"{path}: the new rows must have a bias exactly where {base} has one")
        w = whole.weight.detach()
        neww = new.weight.detach().to(device=w.device, dtype=w.dtype)
        rows = w.shape[0] - (stop - start) + neww.shape[0]
        meta = neww.device.type == "meta" or w.device.type == "meta"
        weight = (
            torch.empty(rows, w.shape[1], device="meta") if meta else torch.cat([w[:start], neww, w[stop:]])
        )
        bias = None
        if whole.bias is not None:
            b, newb = whole.bias.detach(), new.bias.detach().to(device=w.device, dtype=w.dtype)
            bias = torch.empty(rows, device="meta") if meta else torch.cat([b[:start], newb, b[stop:]])
        layer = _rebuilt(whole, weight, bias)
        parts = list(row_parts(whole))
        parts[index] = neww.shape[0]
        setattr(layer, ROW_PARTS, tuple(parts))
        replace_module(model, base, layer)
        return
    base, cols = split_path(path)
    if cols is not None:
        whole = linear(model, base)
        start, stop = column_range(path, whole.in_features)
        w = whole.weight.detach()
        neww = new.weight.detach().to(device=w.device, dtype=w.dtype)
        if neww.device.type == "meta" or w.device.type == "meta":
            weight = torch.empty(
                w.shape[0], w.shape[1] - (stop - start) + neww.shape[1], dtype=w.dtype, device="meta"
            )
        else:
            weight = torch.cat([w[:, :start], neww, w[:, stop:]], dim=1)
        layer = _rebuilt(whole, weight, None if whole.bias is None else whole.bias.detach())
        if row_parts(whole) is not None:  # a linear packed both ways keeps its row record
            setattr(layer, ROW_PARTS, row_parts(whole))
        replace_module(model, base, layer)
        return
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, nn.ModuleList | nn.Sequential) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def _in_cost(layer: nn.Linear) -> int:
    return layer.in_features + (1 if layer.bias is not None else 0)


def ffn_unit(model: nn.Module, name: str, block: str, layout: FFNLayout) -> UnitInfo:
    """The FFN unit of ``layout`` with its cost per kept neuron: the neuron's row(s) of proj_in
    (weights and biases; both halves when gated), its row of a separate gate linear and its column
    of proj_out."""
    proj_in, proj_out = linear(model, layout.proj_in), linear(model, layout.proj_out)
    inner = proj_out.in_features
    if proj_in.out_features != (2 * inner if layout.gated else inner):
        raise UnsupportedModelError(
            f"{layout.proj_in}: {proj_in.out_features} outputs, expected {'2 x ' if layout.gated else ''}{inner} "
            f"(the input width of {layout.proj_out})"
        )
    cost = _in_cost(proj_in) * (2 if layout.gated else 1) + proj_out.out_features
    if layout.gate:
        gate = linear(model, layout.gate)
        if gate.out_features != inner:
            raise UnsupportedModelError(f"{layout.gate}: {gate.out_features} outputs, expected {inner}")
        cost += _in_cost(gate)
    return UnitInfo(name, "ffn", block, None, inner, cost, layout)


def attention_stat_keys(block: str, attn: str) -> dict[str, str]:
    """The statistic keys of an attention with q/k norms, as ``AttentionLayout`` fields (``query_key``,
    ``key_key``, ``attnout_key``, ``query_normed_key``, ``key_normed_key``): every family names them
    from the block path and the attention's attribute the same way."""
    return {
        "query_key": attn_key(block, attn, QUERY),
        "key_key": attn_key(block, attn, KEY),
        "attnout_key": attn_key(block, attn, ATTN_OUT),
        "query_normed_key": attn_key(block, attn, QUERY_NORMED),
        "key_normed_key": attn_key(block, attn, KEY_NORMED),
    }


def attention_units(model: nn.Module, block: str, attn: str, layout: AttentionLayout) -> list[UnitInfo]:
    """The qk and vo units of one attention, checking that every projection has the layout's
    heads x d_h width. QK cost per rank: the head's column of every query and key linear (and
    bias); VO: the value linears' columns (and bias) plus the out linears' rows."""
    width = layout.heads * layout.head_dim
    for path in (*layout.all_query, *layout.key, *layout.value):
        if linear(model, path).out_features != width:
            raise UnsupportedModelError(
                f"{path}: {linear(model, path).out_features} outputs, expected {layout.heads} heads x "
                f"{layout.head_dim} = {width} (q/k/v must share one head width)"
            )
    for path in layout.out:
        if linear(model, path).in_features != width:
            raise UnsupportedModelError(f"{path}: {linear(model, path).in_features} inputs, expected {width}")
    qk = layout.heads * sum(_in_cost(linear(model, p)) for p in (*layout.all_query, *layout.key))
    vo = layout.heads * (
        sum(_in_cost(linear(model, p)) for p in layout.value)
        + sum(linear(model, p).out_features for p in layout.out)
    )
    return [
        UnitInfo(f"{block}.{attn}.qk", "qk", block, attn, layout.head_dim, qk, layout),
        UnitInfo(f"{block}.{attn}.vo", "vo", block, attn, layout.head_dim, vo, layout),
    ]


def _mask_of(mask: TokenMask | None) -> dict:
    """StatSite keyword arguments for the tokens ``mask`` selects (none: every token)."""
    return {} if mask is None else {"mask_module": mask.module, "mask_arg": mask.arg}


def _stream_mask(lay: AttentionLayout, path: str) -> dict:
    """StatSite mask arguments of an attention linear's tokens: its stream's padding mask."""
    return _mask_of(lay.text_mask) if path in lay.text_linears else {}


def _key_mask(lay: AttentionLayout, path: str) -> dict:
    """... of a key linear's tokens: the attention's own mask under ``masked_keys``."""
    return {"mask_module": lay.module} if lay.masked_keys else _stream_mask(lay, path)


def sites_of(model: nn.Module, units: dict[str, UnitInfo]) -> list[StatSite]:
    """The statistics every unit's decomposition reads, as hook sites (derived from the layouts):
    FFN: proj_out's input; QK: the query and key linears' outputs, per head; VO: the out linears'
    inputs, per head. Several linears feeding one key (two token streams) add into one sum. Padded
    tokens are left out where the layout names a mask: keys under ``masked_keys`` (the attention's
    ``attention_mask``), the text stream's sites under ``text_mask``, an FFN under ``token_mask``."""
    sites: list[StatSite] = []
    for u in units.values():
        lay = u.layout
        if isinstance(lay, FFNLayout):
            inner = u.full_rank
            module, cols = _site(model, lay.proj_out)
            sites.append(
                StatSite(
                    lay.hidden_key, module, "pre", 0, (inner, inner), cols=cols, **_mask_of(lay.token_mask)
                )
            )
            continue
        shape = (lay.heads, lay.head_dim, lay.head_dim)
        if u.kind == "qk":
            for key, paths, mask in (
                (lay.query_key, lay.query, _stream_mask),
                (lay.key_key, lay.key, _key_mask),
            ):
                for p in paths:
                    module, rows = _site(model, p)
                    sites.append(StatSite(key, module, "post", lay.heads, shape, cols=rows, **mask(lay, p)))
                    if lay.first_moments:  # the raw tokens' mean: the kept-share model under norms + RoPE
                        sites.append(
                            StatSite(
                                mean_key(key),
                                module,
                                "post",
                                lay.heads,
                                shape[:2],
                                first_moment=True,
                                cols=rows,
                                **mask(lay, p),
                            )
                        )
            # after the per-head norms (aligned with the streams' query / key linears); the last norm
            # of norms_q belongs to unused queries when the attention has some (MMDiT's last block):
            # only the measured streams' norms count
            for p, q in zip(lay.norms_q[: len(lay.query)], lay.query, strict=False):
                sites.append(
                    StatSite(
                        lay.query_normed_key,
                        p,
                        "post",
                        lay.heads,
                        shape,
                        head_major=lay.norms_head_major,
                        **_stream_mask(lay, q),
                    )
                )
            for p, k in zip(lay.norms_k, lay.key, strict=False):
                sites.append(
                    StatSite(
                        lay.key_normed_key,
                        p,
                        "post",
                        lay.heads,
                        shape,
                        head_major=lay.norms_head_major,
                        **_key_mask(lay, k),
                    )
                )
        elif u.kind == "vo":
            for p in lay.out:
                module, cols = _site(model, p)
                sites.append(
                    StatSite(
                        lay.attnout_key, module, "pre", lay.heads, shape, cols=cols, **_stream_mask(lay, p)
                    )
                )
    return sites


def _site(model: nn.Module, path: str) -> tuple[str, tuple[int, int] | None]:
    """(module to hook, the features of its hooked tensor that are the path's) of a layout path:
    a packed path's input columns, a row part's output rows, None for a whole linear."""
    base, index = split_row_part(path)
    if index is not None:
        return base, row_range(linear(model, base), path)
    base, cols = split_path(path)
    if cols is None:
        return path, None
    return base, column_range(path, linear(model, base).in_features)


# --------------------------------------------------------------------------------------------
# The adapter interface
# --------------------------------------------------------------------------------------------
class ModelAdapter:
    """A model family. Subclasses set the class attributes and implement ``layouts`` and
    ``example_inputs``; everything else has a generic default built on the layouts."""

    #: family name for messages and the README ("SD 1.x / 2.x / XL UNet", ...)
    family: str = ""
    #: the pipeline attribute that holds the denoiser ("unet" or "transformer")
    pipeline_attr: str = "unet"
    #: recognises denoisers by their parts, whatever their class (``slimdiff.families.structural``):
    #: tried after every adapter of a named family
    by_parts: bool = False

    #: the diffusers class of this family's denoiser, by name (``denoiser_class`` and ``matches``
    #: default to it), e.g. "WanTransformer3DModel"
    denoiser_name: str = ""
    #: the diffusers block class the family is made of, "<module>:<class>" (``blocks`` defaults to
    #: every submodule of that class), e.g. "diffusers.models.attention:JointTransformerBlock"
    block_type: str = ""

    # -- recognition -----------------------------------------------------------------------
    def matches(self, model: nn.Module) -> bool:
        if not self.denoiser_name:
            raise NotImplementedError
        return isinstance(model, self.denoiser_class())

    def denoiser_class(self) -> type:
        """The diffusers class of this family's denoiser (rebuilt from config at load time)."""
        if not self.denoiser_name:
            raise NotImplementedError
        import diffusers

        return getattr(diffusers, self.denoiser_name)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(path, block) of every block of ``block_type`` in ``model``."""
        if not self.block_type:
            raise NotImplementedError
        module, name = self.block_type.split(":")
        cls = getattr(importlib.import_module(module), name)
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]
        if not found:
            raise UnsupportedModelError(f"{type(model).__name__} has no {name}")
        return found

    def bound(self, model: nn.Module) -> ModelAdapter:
        """The adapter ``adapter_for`` returns for a ``model`` this adapter ``matches``: itself for a
        family of one denoiser class; an adapter recognising denoisers by their parts
        (``slimdiff.families.structural``) returns a copy bound to the model's stock class, so
        ``denoiser_class`` and ``family`` name that class."""
        return self

    def near_miss(self, model: nn.Module) -> str | None:
        """Why this adapter does not take ``model`` although it nearly looks like its family (e.g.
        FLUX-shaped blocks with another attention processor), or None: ``adapter_for`` adds the
        reason to its refusal."""
        return None

    # -- layout ----------------------------------------------------------------------------
    def units(self, model: nn.Module) -> dict[str, UnitInfo]:
        """Every compression unit of ``model``, keyed by name, in module order. Raises
        UnsupportedModelError (naming the module) where the layout is not what the family has."""
        raise NotImplementedError

    def stat_sites(self, model: nn.Module) -> list[StatSite]:
        self.check_processors(model)
        return sites_of(model, self.units(model))

    def check_processors(self, model: nn.Module) -> None:
        """Raise if an attention processor would make the hooked activations differ from what the
        softmax sees (unknown or fused processors)."""

    def processor(self, attn: nn.Module, layout: AttentionLayout) -> Any:
        """The attention processor for a compressed attention (widths per head from its linears,
        softmax scale 1/sqrt(original d_h))."""

        return SlimAttnProcessor(scale=layout.head_dim**-0.5)

    # -- forwards ----------------------------------------------------------------------------
    def timestep(self, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The ``timestep`` argument of one denoiser call (bound by name from the signature)."""
        if "timestep" in kwargs:
            return kwargs["timestep"]
        params = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
        if "timestep" in params and params.index("timestep") < len(args):
            return args[params.index("timestep")]
        return None

    def example_inputs(
        self,
        model: nn.Module,
        batch: int,
        latent_hw: tuple[int, int],
        text_len: int,
        *,
        device: str | torch.device = "meta",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> tuple[tuple, dict]:
        """(args, kwargs) of one forward at these shapes: random tensors (meta for FLOPs)."""
        raise NotImplementedError

    def sample_size(self, model: nn.Module) -> tuple[int, int]:
        """The latent (height, width) the model is configured for."""
        size = model.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def text_len(self, pipe) -> int:
        tok = getattr(pipe, "tokenizer", None)
        return int(getattr(tok, "model_max_length", 77)) if tok is not None else 77

    def guidance_kwargs(self, model: nn.Module, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """(pipeline call kwargs that apply ``guidance_scale``, denoiser branches per sample): the
        stock pipelines' classifier-free guidance, two branches above 1."""
        return {"guidance_scale": guidance_scale}, 2 if guidance_scale > 1.0 else 1

    def pipeline_kwargs(self, pipe, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """(kwargs of a pipeline call of ``batch`` prompts, denoiser branches per sample): what
        calibration and evaluation pass so the denoiser runs as the family's pipelines run it
        (default: ``guidance_kwargs`` of its denoiser)."""
        model = denoiser_of(pipe)
        return self.guidance_kwargs(model, guidance_scale, batch)

    def denoiser_components(self, pipe) -> tuple[str, ...]:
        """The pipeline components its sampler calls as denoisers, the one ``denoiser_of`` names
        first (default: that one alone; Wan 2.2 A14B adds ``transformer_2``)."""
        return (denoiser_attr(pipe),)

    def steps_served(self, pipe, name: str):
        """At which of the scheduler's timesteps the sampler calls denoiser ``name``: a function of
        the timesteps tensor returning the boolean mask of its steps, or None (every step, the
        default)."""
        return None

    def rope_sequence(self, pipe, latent_hw: tuple[int, int]) -> dict | None:
        """The token sequence a pipeline call at latent size ``latent_hw`` rotates, as keyword
        arguments of the family's ``rope_angles`` (``latent_hw`` and, where it takes one, the
        pipeline's ``text_len``); None for families without RoPE. Calibration records it in the
        statistics' meta (``rope_sequence``) so that pair selection weighs the rotary phases of the
        sequence the statistics came from, not those of the model's default serving shape."""
        angles = getattr(self, "rope_angles", None)
        if angles is None:
            return None
        out: dict = {"latent_hw": [int(latent_hw[0]), int(latent_hw[1])]}
        if "text_len" in inspect.signature(angles).parameters:
            out["text_len"] = int(self.text_len(pipe))
        return out

    def rope_phases(
        self, model: nn.Module, sequence: Mapping | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Families with RoPE on q/k (``AttentionLayout.rope``): ``linalg.rope_phase_moments`` of
        the model's rotary angles (``rope_angles``, each family's) over the token sequence
        ``sequence`` (``rope_sequence``: what calibration ran; None: the model's default serving
        shape), for RoPE-aware pair selection."""
        if getattr(self, "rope_angles", None) is None:
            raise NotImplementedError(f"{self.family} has no rotary position embeddings")
        return rope_phase_moments(self._angles(model, sequence))

    def _angles(self, model: nn.Module, sequence: Mapping | None) -> torch.Tensor:
        kwargs = dict(sequence or {})
        if "latent_hw" in kwargs:
            kwargs["latent_hw"] = tuple(kwargs["latent_hw"])
        return self.rope_angles(model, **kwargs)

    def attention_tokens(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """(batch, query tokens, key tokens) of one call of an attention module (for FLOPs)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        n_q = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]
        return hidden.shape[0], n_q, n_q if enc is None else enc.shape[1]

    # -- LoRA --------------------------------------------------------------------------------
    def convert_lora(
        self,
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        *,
        original_shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> Mapping[str, torch.Tensor]:
        """A LoRA state dict written for this family's ORIGINAL code base (community formats that
        name the reference implementation's layers) with its keys rewritten into a form
        ``slimdiff.formats.lora`` parses (diffusers/PEFT ``<prefix>.<module>.lora_A.weight`` / ``lora_B``
        / ``alpha``). Keys already in such a form pass through unchanged; unknown keys of the
        family's own format raise ``slimdiff.formats.lora.LoraError`` naming them. ``original_shapes``:
        (out, in) of layers ``model`` holds narrowed (a compressed model: its LoRA maps' original
        shapes); the others are read off ``model``. Default: ``state_dict`` itself, unchanged."""
        return state_dict


def randn(shape, device, dtype, generator) -> torch.Tensor:
    """Random tensor (CPU generator, then moved) or an empty meta tensor."""
    if str(device) == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
_ADAPTERS: list[ModelAdapter] = []

#: transformer blocks of families that are not supported, by class name: refused with the family named
UNSUPPORTED_BLOCKS = {
    "SanaTransformerBlock": "Sana (linear attention)",
    "HunyuanDiTBlock": "Hunyuan-DiT",
    "LuminaNextDiTBlock": "Lumina-Next",
    "CogVideoXBlock": "CogVideoX",
    "AuraFlowJointTransformerBlock": "AuraFlow",
    "AuraFlowSingleTransformerBlock": "AuraFlow",
}


def require_processor(path: str, attn: nn.Module, stock: type) -> None:
    """Raise UnsupportedModelError unless the attention at ``path`` runs diffusers' ``stock``
    processor or a slimdiff one (class attribute ``slimdiff_supported``): the statistics hooks see
    the activations those processors compute, and no others."""
    proc = type(attn.processor)
    if proc is not stock and getattr(proc, "slimdiff_supported", False) is not True:
        raise UnsupportedModelError(
            f"{path}: unknown attention processor {proc.__name__}; SlimDiff statistics support "
            f"diffusers' {stock.__name__} and processors with `slimdiff_supported = True`"
        )


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: add a family to the registry (adapters are tried in registration order,
    those recognising models by their parts, ``by_parts``, after all the others)."""
    _ADAPTERS.append(cls())
    return cls


def registered_adapters() -> list[ModelAdapter]:
    import slimdiff.families  # noqa: F401  (importing the package registers the built-in families)

    return sorted(_ADAPTERS, key=lambda a: a.by_parts)  # stable: registration order otherwise


def supported_families() -> list[str]:
    return [a.family for a in registered_adapters()]


def _block_types(model: nn.Module) -> list[str]:
    names = []
    for m in model.modules():
        n = type(m).__name__
        if (n.endswith(("Block", "Block2D", "BlockFlux")) or "TransformerBlock" in n) and n not in names:
            names.append(n)
    return names


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family; raises UnsupportedModelError naming the block type and
    the supported families when there is none."""
    unsupported = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__name__ in UNSUPPORTED_BLOCKS}
    )
    if unsupported:
        names = ", ".join(f"{b} ({UNSUPPORTED_BLOCKS[b]})" for b in unsupported)
        raise UnsupportedModelError(
            f"{type(model).__name__} has transformer blocks slimdiff does not support: {names}. "
            f"Supported families: {'; '.join(supported_families())}"
        )
    for adapter in registered_adapters():
        if adapter.matches(model):
            return adapter.bound(model)
    blocks = _block_types(model)
    reasons = [r for r in (a.near_miss(model) for a in registered_adapters()) if r]
    why = f": {reasons[0]}" if reasons else ""
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a supported denoiser (its block types: {', '.join(blocks) or 'none'})"
        f"{why}. Supported families: {'; '.join(supported_families())}"
    )


def stock_class(model_or_class: nn.Module | type) -> type:
    """The diffusers class a model is an instance of: the first class of its MRO defined in diffusers
    (a ``Slim*`` class of slimdiff.formats.loading, or a user's subclass, resolve to the stock one)."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for c in cls.__mro__:
        if c.__module__.startswith("diffusers."):
            return c
    return cls


_BY_CLASS: dict[str, ModelAdapter | None] = {}  # class name -> adapter by parts (None: none)


def adapter_for_class(class_name: str) -> ModelAdapter:
    """The adapter whose denoiser class is named ``class_name`` (for loading saved folders). A class
    no family adapter names is looked up in diffusers and, if its default-config skeleton (built on
    the meta device) is recognised by its parts (``ModelAdapter.bound``), that bound adapter."""
    for adapter in registered_adapters():
        try:
            if adapter.denoiser_class().__name__ == class_name:
                return adapter
        except NotImplementedError:
            continue
    if class_name not in _BY_CLASS:
        skeleton = _default_skeleton(class_name)
        found = [a for a in registered_adapters() if skeleton is not None and a.matches(skeleton)]
        _BY_CLASS[class_name] = found[0].bound(skeleton) if found else None
    if _BY_CLASS[class_name] is not None:
        return _BY_CLASS[class_name]
    raise UnsupportedModelError(
        f"no slimdiff adapter for denoiser class {class_name!r}; supported families: "
        f"{'; '.join(supported_families())}"
    )


def _default_skeleton(class_name: str) -> nn.Module | None:
    """diffusers' ``class_name`` built from its default config on the meta device, or None."""
    import diffusers

    try:
        cls = getattr(diffusers, class_name, None) if class_name.isidentifier() else None
    except Exception:  # noqa: BLE001  (diffusers' lazy import of an optional dependency failed)
        return None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return None
    try:
        with torch.device("meta"):
            return cls()
    except Exception:  # noqa: BLE001  (no default config: not recognisable by name alone)
        return None


def skeleton_from_config(folder) -> nn.Module | None:
    """The denoiser whose ``config.json`` is in ``folder``, built on the meta device (no weights read,
    nothing allocated), or None when no adapter knows its class. For checks that need only shapes."""
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "config.json").read_text())
    try:
        cls = adapter_for_class(str(config.get("_class_name"))).denoiser_class()
    except UnsupportedModelError:
        return None
    with torch.device("meta"):
        return cls.from_config(cls.load_config(folder))


def denoiser_of(pipe) -> nn.Module:
    """The denoiser of a diffusers pipeline (``pipe.unet`` or ``pipe.transformer``)."""
    for attr in dict.fromkeys(a.pipeline_attr for a in registered_adapters()):
        model = getattr(pipe, attr, None)
        if isinstance(model, nn.Module):
            return model
    raise UnsupportedModelError(
        f"{type(pipe).__name__} has no denoiser slimdiff knows (looked for "
        f"{sorted({a.pipeline_attr for a in registered_adapters()})})"
    )


def denoiser_attr(pipe) -> str:
    model = denoiser_of(pipe)
    return next(a for a in ("unet", "transformer") if getattr(pipe, a, None) is model)


class LoraError(ValueError):
    """A LoRA cannot be projected onto this model (bad file, unknown layer, other base model)."""
