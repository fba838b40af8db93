"""Latency budgets: a measured latency table per compression unit and rank (HALP-style), the
latency counterpart of ``slimdiff.planning.flops.FlopCosts``.

What is measured, once per (model, serving shape, device, dtype, torch version, threads), at the
serving shape (``slimdiff.planning.flops.ServingShape``: batch, latents, text tokens), in seconds per
denoiser forward:

* every FFN unit at every point of its rank grid (``allocation.rank_grid(R, r_min, multiple)``):
  its own layers standalone, ``proj_in -> activation -> proj_out`` at width r, on the rows (batch x
  tokens) the unit runs on in the model;
* every attention: the q/k projections (every query and key linear, discarded queries included)
  at each grid width r_qk; the v and out projections at each grid width r_vo; and the attention
  kernel (``slimdiff.families.attention.padded_sdpa``) at each *class* of width pair the grid reaches:
  (common width w, q/k padded?, v padded?), timed once at one representative pair of the class.
  The uncompressed attention (d_h, d_h) runs unpadded, like the stock processor;
* the whole model's forward; the rest of the model (convolutions, norms, embeddings, residuals...)
  is the constant ``forward - sum of the units at full rank``, so a plan's predicted latency is
  comparable with a measured forward.

Token counts and batch come from one meta-device trace (``slimdiff.planning.flops.forward_flops``: its
Linear rows carry (rows, in, out), its attention rows (B, H, N_q, N_k, ...)). Units of identical
shape share one measurement: each distinct operation (kind, layer shapes, tokens) is timed once,
so the many repeated blocks of a real model cost one timing each.

Between grid points (a plan on another grid, a hand-written plan) a table is interpolated
linearly; below its lowest point it is extrapolated linearly from the lowest two (clamped at 0).
Rank 0 is such an extrapolation: the compressible latency, as the compressible FLOPs, is the total
minus the latency of the model with every planned unit at rank 0, i.e. the rank-dependent part
(a fixed per-call overhead is not compressible by any rank).

The solver works in exact integers: latencies are quantised to ``QUANTUM_S`` (1 ps) per measured
operation, so a timer proportional to FLOPs at 1 ps per FLOP gives the FLOP costs exactly.

The timer is a parameter (``timer(op) -> seconds``): ``MeasuredTimer`` times ``op.make(device,
dtype)`` (threads pinned, warm-up, median of repeats, as ``benchmarks/bench_speed.py``); tests pass
a function of the operation's widths. Tables are cached as JSON under a cache directory
(default ``$XDG_CACHE_HOME/slimdiff/latency`` or ``~/.cache/slimdiff/latency``), keyed by a digest
of everything above; a cached table is reused, never re-measured.

Not measured: ``compression.qk_norm: project`` (post-norm projections; raises), attention masks
(PixArt's T5 padding mask: the kernel is timed unmasked), the per-head norms of normed q/k (they
run at r_qk but are counted in the constant rest at d_h).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from slimdiff.families.attention import common_head_width, padded_sdpa
from slimdiff.families.base import FFNLayout, adapter_for, linear, split_path
from slimdiff.planning.flops import ServingShape, forward_flops
from slimdiff.planning.plan import rank_grid

logger = logging.getLogger(__name__)

#: seconds per integer cost unit of the solver (1 ps)
QUANTUM_S = 1e-12
#: the cache file format (a new one is a new key)
CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------
# The cost-model protocol the allocator reads (FlopCosts and LatencyCosts implement it)
# --------------------------------------------------------------------------------------------
@runtime_checkable
class CostModel(Protocol):
    """What ``slimdiff.planning.allocation.plan_ranks`` reads of a cost model. Costs are exact integers in
    the model's own unit (FLOPs; latency quanta of ``QUANTUM_S``), per denoiser forward at ``shape``.

    * ``kind``: "flops" | "latency"; ``total``: the uncompressed model;
    * ``has_unit(name)``; ``unit_attention``: qk / vo unit -> (attention module, kind);
    * ``unit_cost(name, rank)``: a non-attention (FFN) unit at ``rank``;
    * ``attention_cost(module, r_qk, r_vo)``: an attention's rank-dependent cost at a width pair
      (its q/k/v/out projections and its matmuls, padding included); ``head_dim(module)``;
    * ``plan_cost(ranks)``: the whole model with these ranks (units not named stay whole);
    * ``to_dict()``: what a plan records of the model."""

    kind: ClassVar[str]
    shape: ServingShape
    total: int
    unit_attention: dict[str, tuple[str, str]]

    def has_unit(self, name: str) -> bool: ...

    def unit_cost(self, name: str, rank: int) -> int: ...

    def attention_cost(self, module: str, r_qk: int, r_vo: int) -> int: ...

    def head_dim(self, module: str) -> int: ...

    def plan_cost(self, ranks: Mapping[str, int]) -> int: ...

    def to_dict(self) -> dict: ...


# --------------------------------------------------------------------------------------------
# Operations to time
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyOp:
    """One standalone operation to time. ``kind``: "ffn" (pairs of linears proj_in, proj_out with
    the activation between), "qk" / "vo" (independent linears), "sdpa" (``padded_sdpa`` calls),
    "forward" (the whole model). ``linears``: (rows, in, out, bias) per linear call; ``sdpa``:
    (B, H, N_q, N_k, r_qk, r_vo, w) per kernel call, w the common width it runs at.

    ``flops`` (counted as ``forward_flops`` does) and ``calls`` (kernel launches: linears, the
    activation, the attention kernel and each padding) let a test timer be a known function of the
    widths. Two ops that compare equal are measured once; ``make`` is not part of their identity."""

    kind: str
    linears: tuple[tuple[int, int, int, bool], ...] = ()
    sdpa: tuple[tuple[int, int, int, int, int, int, int], ...] = ()
    gated: bool = False
    forward_flops: int = 0  # "forward" only: the whole model's FLOPs
    forward_calls: int = 0
    make: Callable[[torch.device, torch.dtype], Callable[[], object]] | None = field(
        default=None, compare=False, hash=False, repr=False
    )

    @property
    def flops(self) -> int:
        if self.kind == "forward":
            return self.forward_flops
        f = sum(2 * rows * i * o for rows, i, o, _ in self.linears)
        return f + sum(2 * b * h * nq * nk * 2 * w for b, h, nq, nk, _, _, w in self.sdpa)

    @property
    def calls(self) -> int:
        if self.kind == "forward":
            return self.forward_calls
        pads = sum((a < w) + (c < w) for _, _, _, _, a, c, w in self.sdpa)
        act = len(self.linears) // 2 if self.kind == "ffn" else 0
        return len(self.linears) + act + len(self.sdpa) + pads

    def signature(self) -> str:
        """The op's identity as a string (the cache's key for its measurement)."""
        return json.dumps(
            [
                self.kind,
                [list(x) for x in self.linears],
                [list(x) for x in self.sdpa],
                self.gated,
                self.forward_flops,
            ],
            separators=(",", ":"),
        )


def _linear_make(op: LatencyOp) -> Callable[[torch.device, torch.dtype], Callable[[], object]]:
    def make(device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
        gen = torch.Generator().manual_seed(0)

        def lin(rows: int, i: int, o: int, bias: bool) -> tuple[nn.Linear, torch.Tensor]:
            layer = nn.Linear(i, o, bias=bias).to(device=device, dtype=dtype)
            x = torch.randn(rows, i, generator=gen).to(device=device, dtype=dtype)
            return layer, x

        layers = [lin(*spec) for spec in op.linears]
        if op.kind == "ffn":
            pairs = [(layers[k][0], layers[k][1], layers[k + 1][0]) for k in range(0, len(layers), 2)]

            def run_ffn() -> None:
                for proj_in, x, proj_out in pairs:
                    h = proj_in(x)
                    if op.gated:
                        a, g = h.chunk(2, dim=-1)
                        h = a * torch.nn.functional.gelu(g)
                    else:
                        h = torch.nn.functional.gelu(h)
                    proj_out(h)

            return run_ffn

        def run() -> None:
            for layer, x in layers:
                layer(x)

        return run

    return make


def _sdpa_make(op: LatencyOp) -> Callable[[torch.device, torch.dtype], Callable[[], object]]:
    def make(device: torch.device, dtype: torch.dtype) -> Callable[[], object]:

        gen = torch.Generator().manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        calls = [
            (randn(b, h, nq, a), randn(b, h, nk, a), randn(b, h, nk, c), w**-0.5)
            for b, h, nq, nk, a, c, w in op.sdpa
        ]

        def run() -> None:
            for q, k, v, scale in calls:
                padded_sdpa(q, k, v, scale=scale)

        return run

    return make


# --------------------------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------------------------
class MeasuredTimer:
    """Wall-clock seconds of one run of ``op.make(device, dtype)()``: torch threads pinned to
    ``threads`` (default: as set), ``warmup`` untimed runs, then the median of ``repeats`` samples,
    each the mean of enough back-to-back runs to last ``min_sample_s`` (timer resolution, launch
    jitter); CUDA is synchronised around every sample. As ``benchmarks/bench_speed.py`` times
    forwards."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        warmup: int = 3,
        repeats: int = 15,
        threads: int | None = None,
        min_sample_s: float = 2e-3,
    ):
        if warmup < 0 or repeats < 1 or min_sample_s < 0:
            raise ValueError(f"MeasuredTimer needs warmup >= 0, repeats >= 1; got {warmup}, {repeats}")
        self.device, self.dtype = torch.device(device), dtype
        self.warmup, self.repeats, self.threads, self.min_sample_s = warmup, repeats, threads, min_sample_s
        self.spread: dict[str, tuple[float, float]] = {}  # op signature -> (min, max) sample seconds

    @property
    def cache_tag(self) -> str:
        return f"measured:w{self.warmup}:r{self.repeats}:s{self.min_sample_s:g}"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, op: LatencyOp) -> float:
        if op.make is None:
            raise ValueError(f"{op.kind} operation has nothing to run (make is None)")
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                fn = op.make(self.device, self.dtype)
                self._sync()
                t0 = time.perf_counter()
                for _ in range(max(1, self.warmup)):
                    fn()
                self._sync()
                once = (time.perf_counter() - t0) / max(1, self.warmup)
                inner = max(1, math.ceil(self.min_sample_s / max(once, 1e-9)))
                samples = []
                for _ in range(self.repeats):
                    self._sync()
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        fn()
                    self._sync()
                    samples.append((time.perf_counter() - t0) / inner)
        finally:
            torch.set_num_threads(before)
        self.spread[op.signature()] = (min(samples), max(samples))
        return statistics.median(samples)


def device_label(device: str | torch.device) -> str:
    """The device's name: the GPU's (``torch.cuda.get_device_name``), else the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError) as err:  # no GPU here
            raise ValueError(f"cannot name device {device} ({err}): pass device_name=") from err
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimdiff" / "latency"


# --------------------------------------------------------------------------------------------
# The cost model
# --------------------------------------------------------------------------------------------
def _interp(points: Mapping[int, int], x: int) -> int:
    """Piecewise-linear through integer ``points`` {x: y}, extrapolated below the lowest point from
    the lowest two (through the origin with one point), clamped at 0, rounded to an integer."""
    if x in points:
        return points[x]
    xs = sorted(points)
    if x > xs[-1]:
        raise ValueError(f"width {x} is above the table's largest {xs[-1]}")
    if len(xs) == 1:
        return max(0, round(Fraction(points[xs[0]] * x, xs[0])))
    if x < xs[0]:
        a, b = xs[0], xs[1]
    else:
        a = max(p for p in xs if p < x)
        b = min(p for p in xs if p > x)
    y = points[a] + Fraction((x - a) * (points[b] - points[a]), b - a)
    return max(0, round(y))


def sdpa_class(r_qk: int, r_vo: int, head_dim: int, device: str) -> tuple[int, bool, bool]:
    """(common width, q/k padded, v padded) of ``padded_sdpa`` at this pair; the uncompressed pair
    (d_h, d_h) runs unpadded (the stock processor)."""

    if r_qk >= head_dim and r_vo >= head_dim:
        return head_dim, False, False
    w = common_head_width(r_qk, r_vo, torch.device(device))
    return w, r_qk < w, r_vo < w


@dataclass(frozen=True)
class AttentionLatency:
    """Measured seconds of one attention: ``qk[r]`` its q/k projections, ``vo[r]`` its v and out
    projections, ``sdpa[(w, q/k padded, v padded)]`` its attention kernel."""

    module: str
    head_dim: int
    qk: dict[int, float]
    vo: dict[int, float]
    sdpa: dict[tuple[int, bool, bool], float]


@dataclass(frozen=True)
class LatencyCosts:
    """Seconds per denoiser forward at ``shape`` on ``device`` / ``dtype`` as a function of the
    units' ranks, from a measured table (see the module docstring). Integer costs are in quanta
    of ``quantum`` seconds; ``*_seconds`` give seconds."""

    kind: ClassVar[str] = "latency"

    shape: ServingShape
    device: str  # the device's name (``device_label``)
    dtype: str
    forward_s: float  # measured forward of the uncompressed model
    ffn: dict[str, dict[int, float]]  # FFN unit -> {grid rank: seconds}
    attentions: dict[str, AttentionLatency]
    unit_attention: dict[str, tuple[str, str]]
    full_rank: dict[str, int]
    grid: tuple[int, int]  # (r_min, multiple) the table was measured on
    table_digest: str
    quantum: float = QUANTUM_S
    measured: int = field(default=0, compare=False)  # operations timed by this build (0: from the cache)
    cache_path: str | None = field(default=None, compare=False)

    # -- integers (the solver's) --------------------------------------------------------------
    def q(self, seconds: float) -> int:
        return round(seconds / self.quantum)

    def seconds(self, cost: int) -> float:
        return cost * self.quantum

    @property
    def total(self) -> int:
        return self.q(self.forward_s)

    def has_unit(self, name: str) -> bool:
        return name in self.ffn or name in self.unit_attention

    def head_dim(self, module: str) -> int:
        return self.attentions[module].head_dim

    def unit_cost(self, name: str, rank: int) -> int:
        """An FFN unit at ``rank`` (attention units are costed per attention: ``attention_cost``)."""
        if name not in self.ffn:
            raise KeyError(f"{name}: not an FFN unit of this latency table (attentions: attention_cost)")
        return _interp({r: self.q(s) for r, s in self.ffn[name].items()}, int(rank))

    def attention_cost(self, module: str, r_qk: int, r_vo: int) -> int:
        att = self.attentions[module]
        w, pq, pv = sdpa_class(int(r_qk), int(r_vo), att.head_dim, self.shape.device)
        kernel = att.sdpa.get((w, pq, pv))
        mm = self.q(kernel) if kernel is not None else self._kernel_off_grid(att, w, pq, pv)
        qk = _interp({r: self.q(s) for r, s in att.qk.items()}, int(r_qk))
        vo = _interp({r: self.q(s) for r, s in att.vo.items()}, int(r_vo))
        return qk + vo + mm

    def _kernel_off_grid(self, att: AttentionLatency, w: int, pq: bool, pv: bool) -> int:
        """A kernel class the grid does not reach (a width off the grid, rank 0): the unpadded
        kernel interpolated at ``w`` plus the padding overhead (padded minus unpadded kernel at the
        measured widths of the same padding), interpolated and held constant beyond its ends."""
        diag = {k[0]: self.q(s) for k, s in att.sdpa.items() if not k[1] and not k[2]}
        out = _interp(diag, w)

        def overhead(flags: tuple[bool, bool]) -> int:
            pts = {
                k[0]: self.q(s) - diag[k[0]] for k, s in att.sdpa.items() if k[1:] == flags and k[0] in diag
            }
            if not pts:
                return 0
            xs = sorted(pts)
            return _interp(pts, min(max(w, xs[0]), xs[-1]))

        if (pq, pv) != (False, False):
            both = overhead((pq, pv))
            if both == 0 and pq and pv:  # never measured with both padded: each side's
                both = overhead((True, False)) + overhead((False, True))
            out += both
        return max(0, out)

    def _full_units(self) -> int:
        out = sum(self.unit_cost(n, self.full_rank[n]) for n in self.ffn)
        for module, att in self.attentions.items():
            out += self.attention_cost(module, att.head_dim, att.head_dim)
        return out

    @property
    def rest(self) -> int:
        """The model outside the units: forward - every unit at full rank (quanta)."""
        return self.total - self._full_units()

    def attention_ranks(self, ranks: Mapping[str, int], module: str) -> tuple[int, int]:
        att = self.attentions[module]
        out = {"qk": att.head_dim, "vo": att.head_dim}
        for n, (m, kind) in self.unit_attention.items():
            if m == module and n in ranks:
                out[kind] = int(ranks[n])
        return out["qk"], out["vo"]

    def plan_cost(self, ranks: Mapping[str, int]) -> int:
        """Predicted forward latency (quanta) with these ranks (units not named stay whole)."""
        unknown = sorted(n for n in ranks if not self.has_unit(n))
        if unknown:
            raise ValueError(f"ranks name units the latency table does not have, e.g. {unknown[:3]}")
        out = self.total
        for n, r in ranks.items():
            if n in self.ffn:
                out += self.unit_cost(n, r) - self.unit_cost(n, self.full_rank[n])
        for module in {self.unit_attention[n][0] for n in ranks if n in self.unit_attention}:
            d = self.attentions[module].head_dim
            out += self.attention_cost(module, *self.attention_ranks(ranks, module)) - self.attention_cost(
                module, d, d
            )
        return out

    def plan_seconds(self, ranks: Mapping[str, int]) -> float:
        return self.seconds(self.plan_cost(ranks))

    @property
    def total_seconds(self) -> float:
        return self.seconds(self.total)

    def to_dict(self) -> dict:
        """What a rank plan records of its cost model."""
        return {
            "kind": "latency",
            "serving": self.shape.to_dict(),
            "device": self.device,
            "dtype": self.dtype,
            "table_digest": self.table_digest,
        }

    def rows(self) -> list[dict]:
        """The table as rows (for reports): one per measured point."""
        out = [
            {"unit": n, "kind": "ffn", "rank": r, "ms": 1e3 * s}
            for n, t in self.ffn.items()
            for r, s in t.items()
        ]
        for module, att in self.attentions.items():
            out += [{"unit": module, "kind": "qk_proj", "rank": r, "ms": 1e3 * s} for r, s in att.qk.items()]
            out += [{"unit": module, "kind": "vo_proj", "rank": r, "ms": 1e3 * s} for r, s in att.vo.items()]
            for (w, pq, pv), s in att.sdpa.items():
                pad = "+".join(p for p, on in (("pad_qk", pq), ("pad_v", pv)) if on) or "no pad"
                out.append({"unit": module, "kind": f"sdpa ({pad})", "rank": w, "ms": 1e3 * s})
        return out


# --------------------------------------------------------------------------------------------
# Building a table
# --------------------------------------------------------------------------------------------
def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _model_config(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    return {"class": type(model).__name__, "config": dict(cfg) if cfg is not None else repr(model)}


@dataclass
class _Plan:
    """The operations of a table and where each measurement goes."""

    forward: LatencyOp
    ffn: dict[str, dict[int, LatencyOp]]
    attn: dict[str, tuple[int, dict[int, LatencyOp], dict[int, LatencyOp], dict[tuple, LatencyOp]]]
    unit_attention: dict[str, tuple[str, str]]
    full_rank: dict[str, int]
    layout_digest: str

    def ops(self) -> list[LatencyOp]:
        out = [self.forward]
        for t in self.ffn.values():
            out += t.values()
        for _, qk, vo, mm in self.attn.values():
            out += [*qk.values(), *vo.values(), *mm.values()]
        return out


def _operations(
    model: nn.Module, shape: ServingShape, units, r_min: int, multiple: int, qk_norm: str
) -> _Plan:

    adapter = adapter_for(model)
    args, kwargs = adapter.example_inputs(model, shape.batch, shape.latent_hw, shape.text_len, device="meta")
    report = forward_flops(model, args, kwargs, batch=shape.batch, device=shape.device)
    lin_calls: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    mm_calls: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for row in report.rows:
        if row.category.endswith("_matmul"):
            mm_calls[row.module].append(row.dims)
        elif len(row.dims) == 3 and not row.module.endswith(".slim_qk_post"):
            lin_calls[row.module].append(row.dims)

    def calls(path: str) -> list[tuple[int, int, int]]:
        base, _ = split_path(path)
        if not lin_calls.get(base):
            raise ValueError(f"{path}: the trace at {shape.to_dict()} never runs it")
        return lin_calls[base]

    def bias(path: str) -> bool:
        base, cols = split_path(path)
        return cols is None and linear(model, base).bias is not None

    def out_rank(path: str, width: int) -> list[tuple[int, int, int, bool]]:  # rank on the output side
        return [(rows, i, width, bias(path)) for rows, i, _ in calls(path)]

    def in_rank(path: str, width: int) -> list[tuple[int, int, int, bool]]:  # rank on the input side
        return [(rows, width, o, bias(path)) for rows, _, o in calls(path)]

    forward = LatencyOp("forward", forward_flops=report.total, forward_calls=len(report.rows))
    ffn: dict[str, dict[int, LatencyOp]] = {}
    attn: dict = {}
    unit_attention: dict[str, tuple[str, str]] = {}
    full_rank: dict[str, int] = {}
    layouts = []
    for name, u in units.items():
        lay = u.layout
        full_rank[name] = u.full_rank
        layouts.append([name, u.kind, u.full_rank, repr(lay)])
        grid = rank_grid(u.full_rank, r_min, multiple)
        if isinstance(lay, FFNLayout):
            g = 2 if lay.gated else 1
            table = {}
            for r in grid:
                ins, outs = out_rank(lay.proj_in, g * r), in_rank(lay.proj_out, r)
                if lay.gate:  # a separate gate linear (SwiGLU): timed with proj_in as one linear of
                    # both row sets (the same FLOPs; one kernel launch fewer than the model's two)
                    ins = [(rows, i, o + r, b) for rows, i, o, b in ins]
                if len(ins) != len(outs):
                    raise ValueError(f"{name}: proj_in runs {len(ins)} times, proj_out {len(outs)}")
                linears = tuple(x for pair in zip(ins, outs, strict=True) for x in pair)
                gated = lay.gated or bool(lay.gate)
                op = LatencyOp("ffn", linears, gated=gated)
                table[r] = LatencyOp("ffn", linears, gated=gated, make=_linear_make(op))
            ffn[name] = table
            continue
        if qk_norm == "project" and lay.qk_norm:
            raise ValueError(
                f"{lay.module}: latency tables do not cover compression.qk_norm 'project' (post-norm "
                "projections); use 'select' or 'keep', or a FLOP budget"
            )
        unit_attention[name] = (lay.module, u.kind)
        if lay.module in attn:
            continue
        d, heads = lay.head_dim, lay.heads
        if not mm_calls.get(lay.module):
            raise ValueError(f"{lay.module}: the trace at {shape.to_dict()} never runs it")
        agrid = rank_grid(d, r_min, multiple)
        qk, vo = {}, {}
        for r in agrid:
            lins = tuple(x for p in (*lay.all_query, *lay.key) for x in out_rank(p, heads * r))
            op = LatencyOp("qk", lins)
            qk[r] = LatencyOp("qk", lins, make=_linear_make(op))
            lins = tuple(x for p in lay.value for x in out_rank(p, heads * r)) + tuple(
                x for p in lay.out for x in in_rank(p, heads * r)
            )
            op = LatencyOp("vo", lins)
            vo[r] = LatencyOp("vo", lins, make=_linear_make(op))
        reps: dict[tuple, tuple[int, int]] = {}
        for a in agrid:
            for c in agrid:
                cls = sdpa_class(a, c, d, shape.device)
                best = reps.get(cls)
                if best is None or (min(a, c), a) > (min(best), best[0]):
                    reps[cls] = (a, c)
        for _, _, _, _, r1, r2 in mm_calls[lay.module]:
            if (r1, r2) != (d, d):
                raise ValueError(
                    f"{lay.module}: runs at head widths ({r1}, {r2}), not {d}: latency tables are "
                    "measured on the uncompressed model"
                )
        mm = {}
        for cls, (a, c) in sorted(reps.items()):
            sd = tuple((b, h, nq, nk, a, c, cls[0]) for b, h, nq, nk, _, _ in mm_calls[lay.module])
            op = LatencyOp("sdpa", sdpa=sd)
            mm[cls] = LatencyOp("sdpa", sdpa=sd, make=_sdpa_make(op))
        attn[lay.module] = (d, qk, vo, mm)
    return _Plan(forward, ffn, attn, unit_attention, full_rank, _digest(layouts))


def unit_latency_costs(
    model: nn.Module,
    shape: ServingShape,
    *,
    dtype: torch.dtype | None = None,
    timer: Callable[[LatencyOp], float] | None = None,
    cache_dir: str | Path | None = None,
    units: dict | None = None,
    r_min: int = 8,
    multiple: int = 8,
    qk_norm: str = "auto",
    device_name: str | None = None,
) -> LatencyCosts:
    """The latency table of every compression unit of the UNCOMPRESSED ``model`` at ``shape``
    (``shape.device``: the device it is measured on, where ``model`` must be; ``dtype`` default
    the model's), measured by ``timer`` (default ``MeasuredTimer(shape.device, dtype)``) at the
    points of every unit's rank grid (``r_min``, ``multiple``: use the allocation's), or read from
    the cache (``cache_dir``, default ``default_cache_dir()``) where the same key was measured."""

    if r_min < 1 or multiple < 1:
        raise ValueError(f"r_min and multiple must be >= 1, got r_min={r_min}, multiple={multiple}")
    params = list(model.parameters())
    model_device = params[0].device if params else torch.device("cpu")
    dtype = dtype or (params[0].dtype if params else torch.float32)
    device = torch.device(shape.device)
    if timer is None and model_device.type != device.type:
        raise ValueError(
            f"the model is on {model_device}, the serving shape's device is {shape.device}: move the model "
            "there first (latency is measured on the device it serves on)"
        )
    timer = timer if timer is not None else MeasuredTimer(device, dtype)
    adapter = adapter_for(model)
    units = adapter.units(model) if units is None else units
    if not units:
        raise ValueError("unit_latency_costs needs at least one compression unit")
    plan = _operations(model, shape, units, r_min, multiple, qk_norm)
    device_name = device_name or device_label(device)
    key = {
        "format": CACHE_FORMAT,
        "model": _model_config(model),
        "units": plan.layout_digest,
        "serving": shape.to_dict(),
        "device": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "grid": [r_min, multiple],
        "qk_norm": qk_norm,
        "timer": getattr(timer, "cache_tag", getattr(timer, "__name__", type(timer).__name__)),
    }
    key_digest = _digest(key)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{key_digest}.json"
    seconds: dict[str, float] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("key_digest") == key_digest:
                seconds = {k: float(v) for k, v in data["seconds"].items()}
        except (OSError, ValueError, KeyError) as err:
            logger.warning("latency cache %s unreadable (%s): measuring again", path, err)
    measured = 0
    for op in plan.ops():
        sig = op.signature()
        if sig in seconds:
            continue
        if op.kind == "forward":
            op = LatencyOp(
                "forward",
                forward_flops=op.forward_flops,
                forward_calls=op.forward_calls,
                make=_forward_make(model, adapter, shape),
            )
        value = float(timer(op))
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"timer returned {value!r} seconds for a {op.kind} operation")
        seconds[sig] = value
        measured += 1
    if measured:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"key": key, "key_digest": key_digest, "seconds": seconds}, indent=1) + "\n"
        )
        tmp.replace(path)
        logger.info("latency table: %d operations timed, cached in %s", measured, path)

    def s(op: LatencyOp) -> float:
        return seconds[op.signature()]

    used = sorted({op.signature() for op in plan.ops()})
    costs = LatencyCosts(
        shape=shape,
        device=device_name,
        dtype=key["dtype"],
        forward_s=s(plan.forward),
        ffn={n: {r: s(op) for r, op in t.items()} for n, t in plan.ffn.items()},
        attentions={
            m: AttentionLatency(
                m,
                d,
                {r: s(op) for r, op in qk.items()},
                {r: s(op) for r, op in vo.items()},
                {cls: s(op) for cls, op in mm.items()},
            )
            for m, (d, qk, vo, mm) in plan.attn.items()
        },
        unit_attention=plan.unit_attention,
        full_rank=plan.full_rank,
        grid=(r_min, multiple),
        table_digest=_digest({"key": key_digest, "seconds": {k: repr(seconds[k]) for k in used}}),
        measured=measured,
        cache_path=str(path),
    )
    if costs.rest < 0:
        logger.warning(
            "latency table: the units measured standalone (%.3f ms at full rank) take longer than the whole "
            "forward (%.3f ms); predicted latencies are forward minus what the ranks remove",
            1e3 * costs.seconds(costs._full_units()),
            1e3 * costs.forward_s,
        )
    return costs


def _forward_make(model: nn.Module, adapter, shape: ServingShape):
    def make(device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
        gen = torch.Generator().manual_seed(0)
        args, kwargs = adapter.example_inputs(
            model, shape.batch, shape.latent_hw, shape.text_len, device=device, dtype=dtype, generator=gen
        )
        return lambda: model(*args, **kwargs)

    return make
