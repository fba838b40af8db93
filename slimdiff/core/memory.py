"""The memory model of the activation statistics, and the planner that keeps them under a limit.

What calibration holds, per statistics site (``slimdiff.families.base.StatSite``) with matrix shape
``mat`` and ``B`` timestep buckets:

    accumulators   B * prod(mat) * 8 bytes      float64 running sums (one slot per bucket)
                   B * prod(mat) * 4 bytes      float32 on an accelerator (``accumulate="float32"``),
                                                plus the float64 host sums it is flushed into

A site's buckets stay together: the influence stage needs every bucket of a statistic (timestep
weights come from the per-bucket spectra), and a sampling pass visits every timestep anyway, so
splitting buckets across passes would cost a pass without saving one.

The planner packs the sites into *groups* whose accumulators fit ``max_memory`` (first fit,
largest first); each group is one sampling pass over the prompts with hooks on that group's sites
only. Grouping changes no number: the forward passes are the same with or without the other hooks
and every site's sums are added in the same order, so the statistics are bit-identical to one pass
over all sites. The cost is one more sampling run per extra group, nothing else.

Why grouping and not the alternatives (docs/METHOD.md, "Statistics within a memory limit"):

* applying the timestep weights during accumulation keeps one sum per site instead of B, but the
  spectral weights are computed *from* the per-bucket statistics, so it needs a first pass and
  makes every new weighting a new calibration; grouping keeps reweighting free;
* float32 accumulation halves the accumulators but is not exact; it is offered on accelerators
  only (where float64 GEMMs are slow and memory is scarce), flushed into float64 host sums every
  ``flush_every`` products (relative error <= (flush_every - 1) * 2^-24 per element of the flushed
  partial sums, against the float64 sum of the same float32 products).

The limit covers the statistics, not the model or its activations: the plan reports both so a
user can add them up (``StatsMemoryPlan.describe``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


class MemoryLimitError(ValueError):
    """A memory limit that the statistics cannot be collected within (says what it would take)."""


def parse_bytes(value: int | float | str | None) -> int | None:
    """``"16GiB"``, ``"500MB"``, ``"1.5 GiB"``, ``17179869184`` -> bytes; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory size must be a number of bytes or a string like '16GiB', got {value!r}")
    if isinstance(value, int | float):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"memory size {value!r} is not understood: use bytes or a number with a unit, e.g. '16GiB', "
                "'500MB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n > 0 or not math.isfinite(n):
        raise ValueError(f"memory size must be positive, got {value!r}")
    return int(n)


#: ``max_memory: auto`` takes this share of the memory available on the statistics' device when the
#: plan is made, less the model's weights: the rest is headroom for the sampler's activations.
AUTO_SHARE = 0.5


def available_bytes(device: str = "cpu") -> int:
    """Memory available now on ``device`` ("cpu": the host's MemAvailable; "cuda[:i]": free memory)."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def resolve_limit(
    max_memory: int | float | str | None, device: str = "cpu", reserved_bytes: int = 0
) -> int | None:
    """Bytes of ``max_memory``; ``"auto"`` is :data:`AUTO_SHARE` of what ``device`` has available
    minus ``reserved_bytes`` (the model's weights: loaded from safetensors they are memory-mapped
    and become resident only as the sampler touches them, so "available" right after loading
    still counts them as free; measured on SDXL: 21.9 of 23.5 GiB "available" with 14 GB loaded)."""
    if isinstance(max_memory, str) and max_memory.strip().lower() == "auto":
        return max(int(AUTO_SHARE * (available_bytes(device) - reserved_bytes)), 1)
    return parse_bytes(max_memory)


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class SiteNeed:
    key: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class StatsMemoryPlan:
    """How calibration keeps its statistics within ``max_memory`` (see the module docstring)."""

    groups: list[list[str]]  # statistic keys per sampling pass, in pass order
    n_buckets: int
    device: str  # "cpu", "cuda", ...
    accumulate: str  # "float64" | "float32"
    flush_every: int  # float32 accumulation: products summed on the device before a float64 flush
    max_memory: int | None
    group_bytes: list[int]  # accumulators of each pass (bytes, on the device)
    statistics_bytes: int  # all statistics, float64, all buckets: what the store holds at rest
    largest: tuple[str, int] = ("", 0)  # the largest single statistic and its accumulator bytes
    notes: list[str] = field(default_factory=list)

    @property
    def passes(self) -> int:
        """Sampling passes over each prompt shard (1 when everything fits at once)."""
        return len(self.groups)

    @property
    def device_bytes(self) -> int:
        """Peak accumulator memory on the device (the largest group)."""
        return max(self.group_bytes, default=0)

    @property
    def host_bytes(self) -> int:
        """Peak statistics memory on the host: float64 sums of the largest group (on the CPU the
        device *is* the host: the accumulators themselves), plus one bucket of the largest
        statistic while it is written out."""
        per_pass = self.device_bytes if self.accumulate == "float64" else 2 * self.device_bytes
        if self.device == "cpu":
            return per_pass + self.largest[1] // max(self.n_buckets, 1)
        return (0 if self.accumulate == "float64" else per_pass) + self.largest[1] // max(self.n_buckets, 1)

    def store_bytes(self, shards_in_flight: int = 1) -> int:
        """Peak size of the covariance store on disk, uncompressed: the running totals twice
        (during a merge the new generation is written beside the old one) plus the per-shard
        deltas waiting to be merged. It grows with the statistics, never with the shard count."""
        return (2 + shards_in_flight) * self.statistics_bytes

    def to_dict(self) -> dict:
        return {
            "passes": self.passes,
            "groups": [len(g) for g in self.groups],
            "device": self.device,
            "accumulate": self.accumulate,
            "flush_every": self.flush_every,
            "max_memory": self.max_memory,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "statistics_bytes": self.statistics_bytes,
            "store_bytes": self.store_bytes(),
            "largest_statistic": {"key": self.largest[0], "bytes": self.largest[1]},
        }

    def describe(self, n_shards: int = 1) -> str:
        """The lines the calibrate stage prints before any forward pass."""
        limit = "none" if self.max_memory is None else format_bytes(self.max_memory)
        dev = "host memory" if self.device == "cpu" else f"{self.device} memory"
        acc = (
            "float64"
            if self.accumulate == "float64"
            else f"float32, flushed to float64 every {self.flush_every}"
        )
        lines = [
            f"statistics memory plan (limit {limit}, {self.n_buckets} timestep buckets, {acc} accumulation):",
            f"  {dev} for the accumulators: {format_bytes(self.device_bytes)} per pass"
            + ("" if self.device == "cpu" else f"; host: {format_bytes(self.host_bytes)}"),
            f"  sampling passes per prompt shard: {self.passes}"
            + (f" (sites split into {self.passes} groups)" if self.passes > 1 else " (every site at once)")
            + f"; {n_shards} shard(s) -> {self.passes * n_shards} sampler runs",
            f"  statistics at rest: {format_bytes(self.statistics_bytes)} (float64, uncompressed); "
            f"store peak on disk <= {format_bytes(self.store_bytes())} (totals twice during a merge + "
            "one shard's delta; zstd makes it smaller)",
            f"  largest statistic: {self.largest[0]} ({format_bytes(self.largest[1])})",
            "  not included: the model's weights and its activations",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def plan_stats_memory(
    sites: Sequence[tuple[str, Sequence[int]]],
    n_buckets: int,
    *,
    max_memory: int | str | None = None,
    device: str = "cpu",
    accumulate: str | None = None,
    flush_every: int = 16,
    reserved_bytes: int = 0,
) -> StatsMemoryPlan:
    """Group ``sites`` ((key, matrix shape) pairs, in hook order) into sampling passes whose
    accumulators fit ``max_memory`` bytes (None: one pass, no limit; "auto": half of what the device
    has available now beyond ``reserved_bytes``, the model's weights).

    ``accumulate`` None picks float64 on the CPU (exact; the device is the host) and float32 with
    float64 host flushes on accelerators. Raises :class:`MemoryLimitError` naming the largest
    statistic and what it needs when the limit is below it."""
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    if not sites:
        raise ValueError("no statistics sites to plan")
    if flush_every < 1:
        raise ValueError(f"flush_every must be >= 1, got {flush_every}")
    limit = resolve_limit(max_memory, device, reserved_bytes)
    dev = str(device).split(":")[0]
    acc = accumulate or ("float64" if dev == "cpu" else "float32")
    if acc not in ("float64", "float32"):
        raise ValueError(f"accumulate must be 'float64' or 'float32', got {acc!r}")
    width = 8 if acc == "float64" else 4
    # several hooks may feed one statistic (MMDiT: both token streams' projections): plan per key
    seen: dict[str, tuple[int, ...]] = {}
    for k, shape in sites:
        shape = tuple(int(s) for s in shape)
        if seen.setdefault(k, shape) != shape:
            raise ValueError(f"statistic {k!r} has sites of different shapes {seen[k]} and {shape}")
    needs = [SiteNeed(k, shape) for k, shape in seen.items()]
    keys = [n.key for n in needs]
    cost = {n.key: n.elements * n_buckets * width for n in needs}
    total64 = sum(n.elements for n in needs) * n_buckets * 8
    big = max(needs, key=lambda n: cost[n.key])
    largest = (big.key, cost[big.key])
    if limit is None:
        groups = [keys]
    else:
        if cost[big.key] > limit:
            raise MemoryLimitError(
                f"calibration.max_memory={format_bytes(limit)} is below the largest single statistic: "
                f"{big.key} needs {format_bytes(cost[big.key])} ({'x'.join(map(str, big.shape))} x "
                f"{n_buckets} buckets x {width} bytes, {acc}); set max_memory >= {format_bytes(cost[big.key])} "
                f"or lower calibration.n_buckets (at 1 bucket: {format_bytes(cost[big.key] // n_buckets)})"
            )
        # first fit, largest first; then each group keeps the model's hook order
        order = {k: i for i, k in enumerate(keys)}
        bins: list[list[str]] = []
        room: list[int] = []
        for n in sorted(needs, key=lambda n: (-cost[n.key], order[n.key])):
            for j, free in enumerate(room):
                if cost[n.key] <= free:
                    bins[j].append(n.key)
                    room[j] -= cost[n.key]
                    break
            else:
                bins.append([n.key])
                room.append(limit - cost[n.key])
        groups = [sorted(b, key=order.__getitem__) for b in bins]
        groups.sort(key=lambda g: order[g[0]])
    notes = []
    if acc == "float32":
        notes.append(
            f"float32 accumulation: relative error <= {(flush_every - 1) * 2.0**-24:.1e} per flushed partial sum "
            "against float64 accumulation of the same products (the store identity records it)"
        )
    return StatsMemoryPlan(
        groups=groups,
        n_buckets=n_buckets,
        device=dev,
        accumulate=acc,
        flush_every=flush_every if acc == "float32" else 1,
        max_memory=limit,
        group_bytes=[sum(cost[k] for k in g) for g in groups],
        statistics_bytes=total64,
        largest=largest,
        notes=notes,
    )
