"""The activation-statistics container shared by calibration, influence and compression.

Every statistic is an *uncentered second moment summed over tokens*, kept per timestep bucket:

    moments[key]  float64, shape (n_buckets, *mat)   sum over tokens of x^T x
    tokens[key]   int64,   shape (n_buckets,)         number of tokens summed (not batches)

Keys (``block`` is the BasicTransformerBlock's module path, see ``slimdiff.families.units``):

    {block}.ff.hidden              FFN intermediate h = input of ff.net.2     mat = (inner, inner)
    {block}.{attn}.query           per-head outputs of to_q                   mat = (H, d_h, d_h)
    {block}.{attn}.key             per-head outputs of to_k                   mat = (H, d_h, d_h)
    {block}.{attn}.attnout         per-head attention output = input of to_out.0, mat = (H, d_h, d_h)
    {block}.{attn}.query_normed    per-head q after its RMSNorm (MMDiT qk_norm)   mat = (H, d_h, d_h)
    {block}.{attn}.key_normed      per-head k after its RMSNorm                   mat = (H, d_h, d_h)

with ``attn`` the attention's name in its block (``attn1``, ``attn2``; ``attn`` in MMDiT blocks). Both classifier-free-guidance branches are accumulated into
the same sums (both pass through the UNet at inference). Sums make shards mergeable exactly:
``merge([a, b])`` of two prompt shards equals the statistics of the whole run.

This module holds no torch hooks; the collector lives in ``slimdiff.calibration.collect``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

StatKind = Literal["ffn_hidden", "query", "key", "attnout"]

FFN_HIDDEN = "ff.hidden"
QUERY = "query"
KEY = "key"
ATTN_OUT = "attnout"
# after a per-head q/k RMSNorm (MMDiT qk_norm): what the softmax really sees
QUERY_NORMED = "query_normed"
KEY_NORMED = "key_normed"
#: suffix of a first-moment statistic: the per-head SUM of the raw q / k tokens (heads, d), next to
#: their second moment (``ActivationStats`` divides by the token count like any other key, so its
#: aggregate is the token mean). Only under q/k RMSNorms with RoPE, where the kept-share model reads
#: it (``AttentionLayout.first_moments``).
MEAN = "_mean"


def mean_key(key: str) -> str:
    """The first-moment statistic of second-moment statistic ``key`` (``{block}.{attn}.query_mean``)."""
    return f"{key}{MEAN}"


def ffn_key(block: str) -> str:
    return f"{block}.{FFN_HIDDEN}"


def attn_key(block: str, attn: str, which: str) -> str:
    if not attn or not attn.replace("_", "").isalnum():
        raise ValueError(f"attn must be the attention's name inside its block (e.g. 'attn1'), got {attn!r}")
    if which not in (QUERY, KEY, ATTN_OUT, QUERY_NORMED, KEY_NORMED):
        raise ValueError(
            f"which must be one of {QUERY!r}, {KEY!r}, {ATTN_OUT!r}, {QUERY_NORMED!r}, {KEY_NORMED!r}, got {which!r}"
        )
    return f"{block}.{attn}.{which}"


@dataclass
class ActivationStats:
    """Per-bucket token-summed second moments; see the module docstring for keys and shapes."""

    n_buckets: int
    moments: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    # Free-form provenance (sampler, steps, guidance, bucket -> timesteps, SlimSet digest, ...).
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_buckets < 1:
            raise ValueError(f"n_buckets must be >= 1, got {self.n_buckets}")
        if set(self.moments) != set(self.tokens):
            missing = set(self.moments) ^ set(self.tokens)
            raise ValueError(f"moments and tokens must have the same keys; mismatched: {sorted(missing)}")
        for key, m in self.moments.items():
            if m.dtype != torch.float64 or m.shape[0] != self.n_buckets:
                raise ValueError(
                    f"{key}: moments must be float64 with leading dim n_buckets={self.n_buckets}, "
                    f"got {m.dtype} {tuple(m.shape)}"
                )
            t = self.tokens[key]
            if t.dtype != torch.int64 or tuple(t.shape) != (self.n_buckets,):
                raise ValueError(
                    f"{key}: tokens must be int64 of shape ({self.n_buckets},), got {t.dtype} {tuple(t.shape)}"
                )

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def empty(
        cls, n_buckets: int, shapes: Mapping[str, Sequence[int]], meta: dict | None = None
    ) -> ActivationStats:
        return cls(
            n_buckets=n_buckets,
            moments={k: torch.zeros((n_buckets, *s), dtype=torch.float64) for k, s in shapes.items()},
            tokens={k: torch.zeros(n_buckets, dtype=torch.int64) for k in shapes},
            meta=dict(meta or {}),
        )

    def keys(self) -> list[str]:
        return list(self.moments)

    # -- queries ----------------------------------------------------------------------------
    def second_moment(self, key: str, bucket: int) -> torch.Tensor:
        """E[x^T x] at one bucket (token-averaged), float64. Raises if the bucket saw no tokens."""
        n = int(self.tokens[key][bucket])
        if n == 0:
            raise ValueError(f"{key}: bucket {bucket} has no tokens; was calibration run over all timesteps?")
        return self.moments[key][bucket] / n

    def per_bucket_second_moments(self, key: str) -> torch.Tensor:
        """(n_buckets, *mat) token-averaged second moments; empty buckets are zero."""
        n = self.tokens[key].clamp_min(1).to(torch.float64)
        return self.moments[key] / n.view(-1, *([1] * (self.moments[key].dim() - 1)))

    def aggregate(self, weights: torch.Tensor | Sequence[float]) -> dict[str, torch.Tensor]:
        """C_m = sum_t w_t E_t[x^T x] for every key: a pure function of the stored sums and the
        timestep weights (METHOD.md stage 3), so a new weighting needs no forward passes."""
        w = _check_weights(weights, self.n_buckets)
        return {key: weighted_second_moment(self.moments[key], self.tokens[key], w) for key in self.moments}

    # -- algebra ----------------------------------------------------------------------------
    def merged_with(self, other: ActivationStats) -> ActivationStats:
        return merge([self, other])


def merge(shards: Iterable[ActivationStats]) -> ActivationStats:
    """Exact sum of shard statistics (same keys, shapes and bucket layout required)."""
    shards = list(shards)
    if not shards:
        raise ValueError("merge needs at least one ActivationStats shard")
    first = shards[0]
    for i, s in enumerate(shards[1:], start=1):
        if s.n_buckets != first.n_buckets or set(s.moments) != set(first.moments):
            raise ValueError(
                f"shard {i} does not match shard 0 (n_buckets {s.n_buckets} vs {first.n_buckets}, "
                f"{len(set(s.moments) ^ set(first.moments))} differing keys)"
            )
        for k in first.moments:
            if s.moments[k].shape != first.moments[k].shape:
                raise ValueError(
                    f"shard {i}: {k} has shape {tuple(s.moments[k].shape)}, shard 0 has {tuple(first.moments[k].shape)}"
                )
    moments = {k: sum((s.moments[k] for s in shards[1:]), first.moments[k].clone()) for k in first.moments}
    tokens = {k: sum((s.tokens[k] for s in shards[1:]), first.tokens[k].clone()) for k in first.tokens}
    meta = dict(first.meta)
    meta["merged_shards"] = len(shards)
    return ActivationStats(first.n_buckets, moments, tokens, meta)


# --------------------------------------------------------------------------------------------
# Statistics read on demand (a covariance store at real sizes does not fit in memory at once)
# --------------------------------------------------------------------------------------------
class _LazyMapping(Mapping[str, torch.Tensor]):
    """Read-only mapping that computes each value on access; keeps the most recently used values
    up to ``cache_bytes`` (at least one), so a caller looping over heads of one statistic reads it
    once, while a pass over all statistics holds about one at a time."""

    def __init__(self, keys: Sequence[str], load, cache_bytes: int) -> None:
        self._keys = list(keys)
        self._known = set(self._keys)
        self._load = load
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_bytes = cache_bytes

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        hit = self._cache.pop(key, None)
        if hit is None:
            hit = self._load(key)
        self._cache[key] = hit  # most recent last
        while (
            len(self._cache) > 1
            and sum(v.numel() * v.element_size() for v in self._cache.values()) > self._cache_bytes
        ):
            self._cache.pop(next(iter(self._cache)))
        return hit

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._known


class LazyActivationStats:
    """The reading side of :class:`ActivationStats` for statistics that live in a store:
    ``moments[key]`` reads one statistic (all buckets) when asked, ``second_moment`` one bucket of
    it, and ``aggregate`` returns a mapping that builds each C_m = sum_t w_t E_t[x^T x] on access.
    No stage then holds more than about one unit's statistics (``cache_bytes`` bounds what is kept
    between accesses)."""

    def __init__(
        self,
        n_buckets: int,
        tokens: Mapping[str, torch.Tensor],
        read_key,
        read_bucket=None,
        meta: dict | None = None,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.n_buckets = n_buckets
        self.tokens = dict(tokens)
        self.meta = dict(meta or {})
        self._read_key = read_key
        self._read_bucket = read_bucket or (lambda key, b: read_key(key)[b])
        self._cache_bytes = cache_bytes
        self.moments = _LazyMapping(list(self.tokens), read_key, cache_bytes)

    def keys(self) -> list[str]:
        return list(self.tokens)

    def second_moment(self, key: str, bucket: int) -> torch.Tensor:
        n = int(self.tokens[key][bucket])
        if n == 0:
            raise ValueError(f"{key}: bucket {bucket} has no tokens; was calibration run over all timesteps?")
        return self._read_bucket(key, bucket) / n

    def per_bucket_second_moments(self, key: str) -> torch.Tensor:
        return ActivationStats.per_bucket_second_moments(self, key)  # type: ignore[arg-type]

    def aggregate(self, weights: torch.Tensor | Sequence[float]) -> Mapping[str, torch.Tensor]:
        w = _check_weights(weights, self.n_buckets)

        def load(key: str) -> torch.Tensor:
            return weighted_second_moment(lambda t: self._read_bucket(key, t), self.tokens[key], w)

        return _LazyMapping(list(self.tokens), load, self._cache_bytes)

    def materialize(self) -> ActivationStats:
        """Everything in memory as ActivationStats (only for statistics that fit)."""
        return ActivationStats(
            self.n_buckets,
            {k: self._read_key(k) for k in self.tokens},
            {k: v.clone() for k, v in self.tokens.items()},
            dict(self.meta),
        )


def weighted_second_moment(sums, tokens: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_t w_t sums_t / tokens_t in bucket order (``sums``: (n_buckets, *mat) or a bucket -> matrix
    callable, so a store is read one bucket at a time). One formula for the in-memory and the
    stored statistics, so both give the same bits. Empty buckets count as zero."""
    get = sums if callable(sums) else sums.__getitem__
    out = None
    for t in range(w.shape[0]):
        term = w[t] * (get(t) / tokens[t].clamp_min(1).to(torch.float64))
        out = term if out is None else out + term
    return out


def _check_weights(weights, n_buckets: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (n_buckets,):
        raise ValueError(f"weights must have shape ({n_buckets},), got {tuple(w.shape)}")
    if (w < 0).any() or not torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64)):
        raise ValueError(f"timestep weights must be non-negative and sum to 1, got {w.tolist()}")
    return w
