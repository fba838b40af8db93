"""Spectral influence of compression units and timestep weights (METHOD.md stage 3).

For a unit m with operator F (d_in x d_out, acting on inputs x of dimension d_in) and the input's
normalised second moment S = C / tr(C) at timestep bucket t, the trace-normalised Rayleigh quotient

    TRQ(m, t) = d_in * tr(F^T S F) / ||F||_F^2

is 1 for isotropic inputs (S = I / d_in) and grows when the weights sit on the dominant activation
directions, i.e. when the unit's output at that timestep depends on few, strong directions. Per
unit type (names from ``slimdiff.families.units.compression_units``):

* FFN (``{block}.ff``): F = W2^T with W2 the ff.net.2 weight (d_out x inner); input h, d_in = inner.
* VO (``{block}.{attn}.vo``): per head h, F_h = (to_out.0 weight[:, h-th d_h column block])^T; input
  the head's attention output a_h; the unit's TRQ is the mean over heads.
* QK (``{block}.{attn}.qk``): the head's score is the bilinear form q^T k. We treat the key side as
  the operator acting on queries and take its Gram from the data: F F^T = C_k (the key second
  moment, i.e. the *whitened* bilinear form whose operator norm is set by the keys the query
  really meets). Then tr(F^T S_q F) / ||F||_F^2 = tr(S_q C_k) / tr(C_k), so

      TRQ_qk(h, t) = d_h * tr(S_q S_k),

  symmetric in q and k, 1 when either side is isotropic, and up to d_h when both concentrate on
  the same direction. The projection weights enter through q and k themselves (q = x W_q^T), so no
  separate weight term is needed. Unit TRQ = mean over heads.

Timestep weights w (sum 1) then give s_m = sum_t w_t TRQ(m, t) and the aggregated second moments
C_m = sum_t w_t E_t[x^T x] (``ActivationStats.aggregate``; a pure function, no forward passes):

* ``spectral`` (default): w_t proportional to the mean TRQ over all units at t.
* ``uniform``: w_t = 1 / T.
* ``snr``: w_t proportional to the bucket's mean log(1 + SNR(t)), SNR = abar / (1 - abar) from the
  scheduler's alphas_cumprod recorded during collection. Raw SNR spans ~5 orders of magnitude over a
  sampler (about 0.005 at t=999 to 600 at t=1) and would put essentially all weight on the last
  bucket; log1p keeps the same order (cleaner steps weigh more) while every bucket keeps some weight.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from slimdiff.core.stats import ActivationStats
from slimdiff.families.units import compression_units, linear, short_unit_label

logger = logging.getLogger(__name__)

Weighting = Literal["spectral", "uniform", "snr"]
WEIGHTINGS: tuple[str, ...] = ("spectral", "uniform", "snr")
INFLUENCE_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Pure math (float64 inside)
# --------------------------------------------------------------------------------------------
def _normalised(cov: torch.Tensor) -> torch.Tensor:
    """cov: (..., d, d) -> cov / tr(cov) per matrix; raises on a zero trace (no signal seen)."""
    cov = cov.to(torch.float64)
    tr = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)  # (...)
    if bool((tr <= 0).any()):
        raise ValueError(
            "second moment with non-positive trace: the activation was never non-zero in this bucket"
        )
    return cov / tr[..., None, None]


def trq(cov: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
    """Trace-normalised Rayleigh quotient d_in * tr(F^T S F) / ||F||_F^2, S = C / tr(C).

    cov: (..., d_in, d_in) second moment(s) of the input; operator F: (..., d_in, d_out).
    Returns (...) float64. Uses tr(F^T S F) = <S, F F^T> (F F^T is d_in x d_in)."""
    return _trq_from_gram(cov, *_operator_gram(operator))


def qk_trq(cov_q: torch.Tensor, cov_k: torch.Tensor) -> torch.Tensor:
    """Whitened bilinear-form TRQ per head: d_h * tr(S_q S_k) (see the module docstring).

    cov_q, cov_k: (..., d_h, d_h) -> (...) float64."""
    sq, sk = _normalised(cov_q), _normalised(cov_k)
    if sq.shape != sk.shape:
        raise ValueError(
            f"query and key second moments differ in shape: {tuple(sq.shape)} vs {tuple(sk.shape)}"
        )
    return sq.shape[-1] * (sq * sk.transpose(-1, -2)).sum((-2, -1))


def vo_operator(out_weight: torch.Tensor, heads: int) -> torch.Tensor:
    """to_out.0 weight (d_out, H * d_h) -> per-head operators F_h = W[:, block h]^T, (H, d_h, d_out)."""
    d_out, inner = out_weight.shape
    if inner % heads:
        raise ValueError(f"to_out.0 input width {inner} is not a multiple of {heads} heads")
    w = out_weight.detach().to(torch.float64).reshape(d_out, heads, inner // heads)  # (d_out, H, d_h)
    return w.permute(1, 2, 0)  # (H, d_h, d_out)


def normalise_weights(raw: torch.Tensor) -> torch.Tensor:
    raw = torch.as_tensor(raw, dtype=torch.float64)
    if raw.dim() != 1 or raw.numel() == 0:
        raise ValueError(f"timestep weights must be a non-empty vector, got shape {tuple(raw.shape)}")
    if bool((raw < 0).any()) or not bool(torch.isfinite(raw).all()) or float(raw.sum()) <= 0:
        raise ValueError(
            f"raw timestep weights must be finite, non-negative and not all zero: {raw.tolist()}"
        )
    return raw / raw.sum()


def spectral_weights(trq_matrix: torch.Tensor) -> torch.Tensor:
    """(units, T) TRQ -> w_t proportional to the mean TRQ over units at t, summing to 1."""
    return normalise_weights(trq_matrix.to(torch.float64).mean(0))


def snr_weights(bucket_alphas_cumprod: list[list[float]]) -> torch.Tensor:
    """Per-bucket lists of alphas_cumprod -> w_b proportional to mean log(1 + SNR), summing to 1."""
    raw = []
    for b, alphas in enumerate(bucket_alphas_cumprod):
        if not alphas:
            raise ValueError(f"bucket {b} has no timesteps; cannot compute its SNR weight")
        a = torch.tensor(alphas, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        raw.append(torch.log1p(a / (1 - a)).mean())
    return normalise_weights(torch.stack(raw))


def timestep_weights(trq_matrix: torch.Tensor, weighting: str, meta: Mapping | None = None) -> torch.Tensor:
    """Timestep weights (T,) summing to 1 for ``weighting`` in WEIGHTINGS."""
    n_buckets = trq_matrix.shape[-1]
    if weighting == "spectral":
        return spectral_weights(trq_matrix)
    if weighting == "uniform":
        return torch.full((n_buckets,), 1.0 / n_buckets, dtype=torch.float64)
    if weighting == "snr":
        alphas = (meta or {}).get("bucket_alphas_cumprod")
        if alphas is None:
            raise ValueError(
                "weighting='snr' needs stats.meta['bucket_alphas_cumprod'] (recorded by collect_stats when the "
                "scheduler has alphas_cumprod); use weighting='spectral' or 'uniform'"
            )
        if len(alphas) != n_buckets:
            raise ValueError(f"bucket_alphas_cumprod has {len(alphas)} buckets, statistics have {n_buckets}")
        return snr_weights(alphas)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


# --------------------------------------------------------------------------------------------
# Influence of every unit
# --------------------------------------------------------------------------------------------
@dataclass
class Influence:
    """Per-unit spectral influence: TRQ per bucket, timestep weights and scores s_m."""

    units: list[str]
    trq: torch.Tensor  # (n_units, n_buckets) float64
    weights: torch.Tensor  # (n_buckets,) float64, sums to 1
    scores: torch.Tensor  # (n_units,) float64, s_m = trq @ weights
    weighting: str
    meta: dict = field(default_factory=dict)
    format_version: int = INFLUENCE_FORMAT_VERSION

    def __post_init__(self) -> None:
        n, t = len(self.units), self.weights.numel()
        if tuple(self.trq.shape) != (n, t) or tuple(self.scores.shape) != (n,):
            raise ValueError(
                f"inconsistent shapes: {n} units, weights {tuple(self.weights.shape)}, trq {tuple(self.trq.shape)}, "
                f"scores {tuple(self.scores.shape)}"
            )
        if len(set(self.units)) != n:
            raise ValueError("unit names must be unique")

    @property
    def n_buckets(self) -> int:
        return self.weights.numel()

    def score_of(self) -> dict[str, float]:
        """Unit name -> s_m."""
        return dict(zip(self.units, self.scores.tolist(), strict=True))

    def aggregate(self, stats: ActivationStats) -> dict[str, torch.Tensor]:
        """C_m = sum_t w_t E_t[x^T x] for every statistic key, with these timestep weights."""
        return stats.aggregate(self.weights)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "weighting": self.weighting,
            "weights": self.weights.tolist(),
            "units": [
                {"name": u, "score": s, "trq": row}
                for u, s, row in zip(self.units, self.scores.tolist(), self.trq.tolist(), strict=True)
            ],
            "meta": self.meta,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text (floats round-trip exactly); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Influence:
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        d = json.loads(text)
        version = d.get("format_version")
        if version != INFLUENCE_FORMAT_VERSION:
            raise ValueError(
                f"unsupported influence format_version {version!r} (this code reads {INFLUENCE_FORMAT_VERSION})"
            )
        units = d["units"]
        return cls(
            units=[u["name"] for u in units],
            trq=torch.tensor([u["trq"] for u in units], dtype=torch.float64).reshape(
                len(units), len(d["weights"])
            ),
            weights=torch.tensor(d["weights"], dtype=torch.float64),
            scores=torch.tensor([u["score"] for u in units], dtype=torch.float64),
            weighting=d["weighting"],
            meta=d.get("meta", {}),
            format_version=version,
        )

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON content (stable across save/load)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def unit_trq(stats: ActivationStats, model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """TRQ of every compression unit of ``model`` at every bucket: (names, (n_units, n_buckets)).

    Loops over buckets so that only one bucket's second moment per key is materialised at a time
    (an SD FFN second moment is 5120 x 5120 float64 = 210 MB per bucket)."""
    units = compression_units(model)
    names, rows = [], []
    for name, u in units.items():
        keys = u.stat_keys()
        lay = u.layout
        if u.kind == "ffn":
            # F = W2^T: (inner, d_out); its Gram F F^T is computed once for all buckets.
            op = linear(model, lay.proj_out).weight.detach().T
        elif u.kind == "vo":
            # per head, the blocks of every out linear side by side: (H, d_h, sum of d_out)
            op = torch.cat([vo_operator(linear(model, p).weight, lay.heads) for p in lay.out], dim=-1)
        else:
            op = None
        for key in keys:
            if key not in stats.moments:
                raise KeyError(f"{name}: statistics have no key {key!r}; were they collected on this model?")
            _require_tokens(stats, key)
        gram = None if op is None else _operator_gram(op)
        row = []
        for t in range(stats.n_buckets):
            if u.kind == "qk":
                row.append(qk_trq(stats.second_moment(keys[0], t), stats.second_moment(keys[1], t)).mean())
            else:
                row.append(_trq_from_gram(stats.second_moment(keys[0], t), *gram).mean())
        names.append(name)
        rows.append(torch.stack(row))
    return names, torch.stack(rows)


def _operator_gram(operator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = operator.to(torch.float64)
    gram = f @ f.transpose(-1, -2)  # (..., d_in, d_in)
    fro2 = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
    if bool((fro2 <= 0).any()):
        raise ValueError("operator with zero Frobenius norm: TRQ is undefined")
    return gram, fro2


def _trq_from_gram(cov: torch.Tensor, gram: torch.Tensor, fro2: torch.Tensor) -> torch.Tensor:
    s = _normalised(cov)
    if s.shape[-1] != gram.shape[-1]:
        raise ValueError(
            f"covariance is {tuple(s.shape[-2:])} but the operator's input dim is {gram.shape[-1]}"
        )
    return gram.shape[-1] * (s * gram).sum((-2, -1)) / fro2


def _require_tokens(stats: ActivationStats, key: str) -> None:
    empty = (stats.tokens[key] == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{key}: buckets {empty} saw no tokens; collect over every bucket before computing influence"
        )


def compute_influence(stats: ActivationStats, unet: nn.Module, weighting: str = "spectral") -> Influence:
    """Per-unit spectral influence s_m = sum_t w_t TRQ(m, t) with the chosen timestep weighting."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    names, trq_matrix = unit_trq(stats, unet)
    weights = timestep_weights(trq_matrix, weighting, stats.meta)
    scores = trq_matrix @ weights
    meta = {
        k: stats.meta[k] for k in ("bucket_timesteps", "num_inference_steps", "scheduler") if k in stats.meta
    }
    logger.info("influence over %d units, weighting=%s, weights=%s", len(names), weighting, weights.tolist())
    return Influence(
        units=names, trq=trq_matrix, weights=weights, scores=scores, weighting=weighting, meta=meta
    )


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------
def plot_influence_heatmap(influence: Influence, path: str | Path) -> Path:
    """Unit x timestep-bucket heatmap of TRQ with a colorbar, the timestep weights as a line above
    and each unit's score s_m as a column on the right. Writes a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_units, n_buckets = influence.trq.shape
    labels = [short_unit_label(u) for u in influence.units]
    height = min(4 + 0.18 * n_units, 60)
    fig = plt.figure(figsize=(max(6.0, 3 + 0.6 * n_buckets), height))
    grid = fig.add_gridspec(
        2,
        3,
        height_ratios=[1.2, max(n_units * 0.18, 3)],
        width_ratios=[n_buckets, 1, 0.3],
        hspace=0.05,
        wspace=0.08,
    )
    ax_w = fig.add_subplot(grid[0, 0])
    ax = fig.add_subplot(grid[1, 0], sharex=ax_w)
    ax_s = fig.add_subplot(grid[1, 1], sharey=ax)
    cax = fig.add_subplot(grid[1, 2])

    x = list(range(n_buckets))
    ax_w.plot(x, influence.weights.tolist(), marker="o", color="tab:red")
    ax_w.set_ylabel("w_t")
    ax_w.set_title(
        f"Spectral influence (TRQ) per unit and timestep bucket; weighting = {influence.weighting}"
    )
    ax_w.tick_params(labelbottom=False)
    ax_w.grid(alpha=0.3)

    im = ax.imshow(influence.trq.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(n_units))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xticks(x)
    bucket_ts = influence.meta.get("bucket_timesteps")
    if bucket_ts and len(bucket_ts) == n_buckets:
        ax.set_xticklabels(
            [f"{b}\nt={int(ts[0])}..{int(ts[-1])}" for b, ts in enumerate(bucket_ts)], fontsize=7
        )
        ax.set_xlabel("timestep bucket (noisy -> clean)")
    else:
        ax.set_xlabel("timestep bucket")
    fig.colorbar(im, cax=cax, label="TRQ (1 = isotropic)")

    ax_s.barh(range(n_units), influence.scores.tolist(), color="tab:gray")
    ax_s.set_xlabel("score s_m")
    ax_s.tick_params(labelleft=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
