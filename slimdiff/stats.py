"""The activation-statistics container shared by calibration, influence and compression.

Every statistic is an *uncentered second moment summed over tokens*, kept per timestep bucket:

    moments[key]  float64, shape (n_buckets, *mat)   sum over tokens of x^T x
    tokens[key]   int64,   shape (n_buckets,)         number of tokens summed (not batches)

Keys (``block`` is the BasicTransformerBlock's module path, see ``slimdiff.adapter``):

    {block}.ff.hidden              FFN intermediate h = input of ff.net.2     mat = (inner, inner)
    {block}.{attn}.query           per-head outputs of to_q                   mat = (H, d_h, d_h)
    {block}.{attn}.key             per-head outputs of to_k                   mat = (H, d_h, d_h)
    {block}.{attn}.attnout         per-head attention output = input of to_out.0, mat = (H, d_h, d_h)
    {block}.{attn}.query_normed    per-head q after its RMSNorm (MMDiT qk_norm)   mat = (H, d_h, d_h)
    {block}.{attn}.key_normed      per-head k after its RMSNorm                   mat = (H, d_h, d_h)

with ``attn`` the attention's name in its block (``attn1``, ``attn2``; ``attn`` in MMDiT blocks). Both classifier-free-guidance branches are accumulated into
the same sums (both pass through the UNet at inference). Sums make shards mergeable exactly:
``merge([a, b])`` of two prompt shards equals the statistics of the whole run.

This module holds no torch hooks; the collector lives in ``slimdiff.calibration``.
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
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (self.n_buckets,):
            raise ValueError(f"weights must have shape ({self.n_buckets},), got {tuple(w.shape)}")
        if (w < 0).any() or not torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64)):
            raise ValueError(f"timestep weights must be non-negative and sum to 1, got {w.tolist()}")
        out = {}
        for key in self.moments:
            per_bucket = self.per_bucket_second_moments(key)
            out[key] = torch.einsum("t,t...->...", w, per_bucket)
        return out

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
