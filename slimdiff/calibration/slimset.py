"""SlimSet: a small calibration prompt set covering common and rare prompts (METHOD.md stage 1).

Pipeline: normalise whitespace -> drop exact duplicates, case/punctuation-only variants and every
prompt of the evaluation sets -> embed (``slimdiff.calibration.embedders``) and L2-normalise -> geometric median
(Weiszfeld) -> seed at the prompt nearest to the median (the most canonical one), optionally reserve
a share of nearest-to-median prompts for the dense canonical region -> farthest-point sampling
(greedy k-center on cosine distance) to n.

Near duplicates in embedding space (cosine similarity >= ``near_dup_threshold``) are never both
selected: the running min-distance vector of FPS already holds every candidate's distance to the
selected set, so the rule costs nothing and keeps memory O(N) (an N x N similarity pass over a
30k-600k pool would not). Everything is deterministic for a given pool, embedder and seed; the seed
only breaks exact ties (e.g. distinct texts with identical embeddings).

The output is a small, human-readable JSON file with a ``format_version`` and the provenance needed
to reproduce it (embedder id, pool digest, seed, parameters).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimdiff.calibration.embedders import PromptEmbedder

logger = logging.getLogger(__name__)

SLIMSET_FORMAT_VERSION = 1
DEFAULT_NEAR_DUP_THRESHOLD = 0.98  # cosine similarity at/above which two prompts are near duplicates
_CHUNK = 65536  # rows per chunk in the O(N d) passes (bounds temporary memory)


# --------------------------------------------------------------------------------------------
# Text normalisation
# --------------------------------------------------------------------------------------------
def normalise_prompt(prompt: str) -> str:
    """Unicode NFC, whitespace runs collapsed to one space, stripped. The text that is embedded."""
    return " ".join(unicodedata.normalize("NFC", prompt).split())


_PUNCT = re.compile(r"[^\w\s]", flags=re.UNICODE)


def dedup_key(prompt: str) -> str:
    """Case- and punctuation-insensitive key: 'A cat.' and 'a cat' are one prompt (near duplicate)."""
    return " ".join(_PUNCT.sub(" ", normalise_prompt(prompt).casefold()).split())


def sha256_lines(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class PreparedPool:
    candidates: list[str]  # normalised, deduplicated, evaluation prompts removed, input order
    n_pool: int
    n_empty: int
    n_exact_dups: int
    n_near_dups: int  # case/punctuation variants
    n_excluded: int
    pool_digest: str  # sha256 of the normalised input pool (one prompt per line, input order)
    exclude_digest: str  # sha256 of the sorted exclusion keys


def prepare_pool(pool: Iterable[str], exclude: Iterable[str] = ()) -> PreparedPool:
    """Normalise, deduplicate and remove evaluation prompts (compared by ``dedup_key``, which is
    stricter than whitespace normalisation: an evaluation prompt never leaks in with other casing)."""
    normalised = [normalise_prompt(p) for p in pool]
    excluded_keys = {dedup_key(p) for p in exclude}
    excluded_keys.discard("")
    seen_exact: set[str] = set()
    seen_key: set[str] = set()
    candidates: list[str] = []
    n_empty = n_exact = n_near = n_excl = 0
    for p in normalised:
        if not p:
            n_empty += 1
            continue
        if p in seen_exact:
            n_exact += 1
            continue
        seen_exact.add(p)
        key = dedup_key(p)
        if key in excluded_keys:
            n_excl += 1
            continue
        if key in seen_key:
            n_near += 1
            continue
        seen_key.add(key)
        candidates.append(p)
    return PreparedPool(
        candidates=candidates,
        n_pool=len(normalised),
        n_empty=n_empty,
        n_exact_dups=n_exact,
        n_near_dups=n_near,
        n_excluded=n_excl,
        pool_digest=sha256_lines(normalised),
        exclude_digest=sha256_lines(sorted(excluded_keys)),
    )


# --------------------------------------------------------------------------------------------
# Geometry (pure, O(N d) memory)
# --------------------------------------------------------------------------------------------
def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """(N, d) -> float32 rows of unit norm; raises on a zero row (an embedder bug)."""
    x = x.to(torch.float32)
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"{int((norms == 0).sum())} embeddings are exactly zero; cannot normalise")
    return x / norms


def geometric_median(
    x: torch.Tensor, *, max_iter: int = 500, tol: float = 1e-9, eps: float = 1e-12
) -> torch.Tensor:
    """Weiszfeld iterations for argmin_y sum_i ||x_i - y||. x: (N, d) -> (d,) float64.

    Starts at the coordinate mean; distances are floored at ``eps`` so an iterate on a data point
    does not divide by zero. Chunked over rows: temporary memory is O(chunk * d)."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty (N, d) matrix, got {tuple(x.shape)}")
    y = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, x.shape[0], _CHUNK):
        y += x[i : i + _CHUNK].to(torch.float64).sum(0)
    y /= x.shape[0]
    for _ in range(max_iter):
        num = torch.zeros_like(y)
        den = torch.zeros((), dtype=torch.float64)
        for i in range(0, x.shape[0], _CHUNK):
            chunk = x[i : i + _CHUNK].to(torch.float64)  # (c, d)
            inv = 1.0 / (chunk - y).norm(dim=1).clamp_min(eps)  # (c,)
            num += inv @ chunk
            den += inv.sum()
        y_new = num / den
        step = float((y_new - y).norm())
        y = y_new
        if step <= tol * max(1.0, float(y.norm())):
            break
    return y


def cosine_distance_to(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unit rows x (N, d), any v (d,) -> (N,) float64 cosine distances 1 - cos(x_i, v)."""
    v = v.to(torch.float64)
    v = (v / v.norm()).to(x.dtype)
    return 1.0 - (x @ v).to(torch.float64)


def farthest_point_sampling(
    x: torch.Tensor,
    n: int,
    initial: Sequence[int],
    *,
    min_distance: float = 0.0,
) -> tuple[list[int], torch.Tensor]:
    """Greedy k-center on cosine distance over unit rows x (N, d).

    Starts from ``initial`` (in order), then repeatedly adds argmax_i min_{s in selected} d(x_i, x_s)
    (first index on ties) until ``n`` points are selected or the farthest candidate is closer than
    ``min_distance`` (everything left is a near duplicate of the set). Memory: one (N,) running
    min-distance vector, never an N x N matrix. Returns (selected indices in order, min-distances of
    all points to the selected set; selected points hold -1)."""
    num = x.shape[0]
    if not 0 < n <= num:
        raise ValueError(f"n must be in [1, {num}], got {n}")
    mindist = torch.full((num,), math.inf, dtype=torch.float64)
    selected: list[int] = []

    def add(i: int) -> None:
        selected.append(i)
        torch.minimum(mindist, 1.0 - (x @ x[i]).to(torch.float64), out=mindist)
        mindist[i] = -1.0  # never re-selected

    for i in initial:
        if mindist[i] < 0:
            raise ValueError(f"initial index {i} given twice")
        add(int(i))
    while len(selected) < n:
        j = int(torch.argmax(mindist))
        if mindist[j] < min_distance or mindist[j] < 0:
            break
        add(j)
    return selected, mindist


@dataclass(frozen=True)
class Selection:
    selected: list[int]  # indices into the rows, selection order (canonical picks first)
    median: torch.Tensor  # (d,) float64 geometric median
    median_distance: torch.Tensor  # (N,) float64 cosine distance of every row to the median
    n_canonical: int


def select_indices(
    x: torch.Tensor,
    n: int,
    *,
    seed: int = 0,
    canonical_share: float = 0.0,
    near_dup_threshold: float = DEFAULT_NEAR_DUP_THRESHOLD,
) -> Selection:
    """SlimSet selection on unit-norm rows x (N, d): median seed, canonical share, then FPS.

    The first pick is the row nearest to the geometric median. ``canonical_share`` of ``n`` (at
    least that first pick) are the next nearest-to-median rows that are not near duplicates of
    earlier picks; FPS fills the rest. ``seed`` permutes the row order, which decides exact ties only."""
    if not 0.0 <= canonical_share <= 1.0:
        raise ValueError(f"canonical_share must be in [0, 1], got {canonical_share}")
    if not 0.0 < near_dup_threshold <= 1.0:
        raise ValueError(
            f"near_dup_threshold must be in (0, 1] (cosine similarity), got {near_dup_threshold}"
        )
    num = x.shape[0]
    if not 0 < n <= num:
        raise ValueError(f"n must be in [1, number of candidates = {num}], got {n}")
    median = geometric_median(x)
    dist = cosine_distance_to(x, median)  # (N,)
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    xp, dp = x[perm], dist[perm]  # tie-breaking order = seeded permutation
    min_distance = 1.0 - near_dup_threshold

    n_canonical = max(1, round(canonical_share * n))
    order = torch.argsort(dp, stable=True).tolist()  # nearest-to-median first
    canonical: list[int] = [order[0]]
    mindist = 1.0 - (xp @ xp[order[0]]).to(torch.float64)  # (N,) distance to the canonical picks
    for i in order[1:]:
        if len(canonical) >= n_canonical:
            break
        if mindist[i] >= min_distance:
            canonical.append(i)
            torch.minimum(mindist, 1.0 - (xp @ xp[i]).to(torch.float64), out=mindist)
    picked, _ = farthest_point_sampling(xp, n, canonical, min_distance=min_distance)
    if len(picked) < n:
        logger.warning(
            "SlimSet: only %d of %d prompts selected: every other candidate is a near duplicate "
            "(cosine similarity >= %.3f) of a selected one",
            len(picked),
            n,
            near_dup_threshold,
        )
    selected = perm[torch.tensor(picked, dtype=torch.long)].tolist()
    return Selection(selected=selected, median=median, median_distance=dist, n_canonical=len(canonical))


# --------------------------------------------------------------------------------------------
# The SlimSet artifact
# --------------------------------------------------------------------------------------------
@dataclass
class SlimSet:
    """Calibration prompts in selection order, with provenance. Saved as small readable JSON."""

    prompts: list[str]
    median_distance: list[float]  # cosine distance of each prompt to the pool's geometric median
    embedder_id: str
    pool_digest: str  # sha256 of the normalised pool
    seed: int
    n: int  # number of prompts (params["n_requested"] is what was asked for)
    params: dict = field(default_factory=dict)
    format_version: int = SLIMSET_FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.median_distance):
            raise ValueError(
                f"prompts ({len(self.prompts)}) and median_distance ({len(self.median_distance)}) differ in length"
            )
        if self.n != len(self.prompts):
            raise ValueError(f"n={self.n} but there are {len(self.prompts)} prompts")
        if len(set(self.prompts)) != len(self.prompts):
            raise ValueError("SlimSet prompts must be unique")
        if self.format_version != SLIMSET_FORMAT_VERSION:
            raise ValueError(
                f"unsupported SlimSet format_version {self.format_version} (reads {SLIMSET_FORMAT_VERSION})"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "kind": "slimdiff.calibration.slimset",
            "n": self.n,
            "seed": self.seed,
            "embedder_id": self.embedder_id,
            "pool_digest": self.pool_digest,
            "params": self.params,
            "prompts": [
                {"prompt": p, "median_distance": d}
                for p, d in zip(self.prompts, self.median_distance, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SlimSet:
        if d.get("kind") != "slimdiff.calibration.slimset":
            raise ValueError(f"not a SlimSet file (kind={d.get('kind')!r})")
        return cls(
            prompts=[e["prompt"] for e in d["prompts"]],
            median_distance=[float(e["median_distance"]) for e in d["prompts"]],
            embedder_id=d["embedder_id"],
            pool_digest=d["pool_digest"],
            seed=int(d["seed"]),
            n=int(d["n"]),
            params=dict(d.get("params", {})),
            format_version=int(d["format_version"]),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SlimSet:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON content (identical before and after save/load)."""
        return hashlib.sha256(
            json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False).encode()
        ).hexdigest()


@dataclass
class SlimSetSelection:
    """A SlimSet plus what made it (for the card): candidates, their embeddings, selected rows."""

    slimset: SlimSet
    candidates: list[str]
    embeddings: torch.Tensor  # (N, d) float32, unit rows
    selected_idx: torch.Tensor  # (n,) int64 rows of `candidates`, selection order
    median_distance: torch.Tensor  # (N,) float64


def select_slimset(
    pool: Iterable[str],
    embedder: PromptEmbedder,
    n: int = 500,
    *,
    exclude: Iterable[str] = (),
    seed: int = 0,
    canonical_share: float = 0.0,
    near_dup_threshold: float = DEFAULT_NEAR_DUP_THRESHOLD,
    batch_size: int = 64,
) -> SlimSetSelection:
    """``build_slimset`` that also returns the candidate embeddings and indices (for the card)."""
    prepared = prepare_pool(pool, exclude)
    cands = prepared.candidates
    if not cands:
        raise ValueError("the prompt pool is empty after normalisation, deduplication and exclusion")
    if n > len(cands):
        raise ValueError(
            f"n={n} exceeds the {len(cands)} candidate prompts left after deduplication and exclusion"
        )
    emb = embedder.embed(cands, batch_size)
    if emb.dim() != 2 or emb.shape[0] != len(cands):
        raise ValueError(f"embedder {embedder.id} returned shape {tuple(emb.shape)} for {len(cands)} prompts")
    x = l2_normalise(emb)
    sel = select_indices(
        x, n, seed=seed, canonical_share=canonical_share, near_dup_threshold=near_dup_threshold
    )
    idx = torch.tensor(sel.selected, dtype=torch.long)
    params = {
        "n_requested": n,
        "canonical_share": canonical_share,
        "n_canonical": sel.n_canonical,
        "near_dup_threshold": near_dup_threshold,
        "distance": "cosine",
        "median": "weiszfeld",
        "n_pool": prepared.n_pool,
        "n_candidates": len(cands),
        "n_empty": prepared.n_empty,
        "n_exact_duplicates": prepared.n_exact_dups,
        "n_near_duplicates": prepared.n_near_dups,
        "n_excluded": prepared.n_excluded,
        "exclude_digest": prepared.exclude_digest,
        "embedding_dim": int(x.shape[1]),
    }
    slimset = SlimSet(
        prompts=[cands[i] for i in sel.selected],
        median_distance=sel.median_distance[idx].tolist(),
        embedder_id=embedder.id,
        pool_digest=prepared.pool_digest,
        seed=seed,
        n=len(sel.selected),
        params=params,
    )
    logger.info(
        "SlimSet: %d of %d candidates (%d pool prompts, %d excluded), embedder %s",
        len(slimset),
        len(cands),
        prepared.n_pool,
        prepared.n_excluded,
        embedder.id,
    )
    return SlimSetSelection(slimset, cands, x, idx, sel.median_distance)


def build_slimset(
    pool: Iterable[str],
    embedder: PromptEmbedder,
    n: int = 500,
    *,
    exclude: Iterable[str] = (),
    seed: int = 0,
    canonical_share: float = 0.0,
    near_dup_threshold: float = DEFAULT_NEAR_DUP_THRESHOLD,
    batch_size: int = 64,
) -> SlimSet:
    """Select n calibration prompts from ``pool`` (minus ``exclude``) with ``embedder``."""
    return select_slimset(
        pool,
        embedder,
        n,
        exclude=exclude,
        seed=seed,
        canonical_share=canonical_share,
        near_dup_threshold=near_dup_threshold,
        batch_size=batch_size,
    ).slimset


# --------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------
def coverage_radius(x: torch.Tensor, selected_idx: torch.Tensor) -> torch.Tensor:
    """(N,) cosine distance of every row to its nearest selected row (chunked, O(N + n d) memory)."""
    s = x[selected_idx]  # (n, d)
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for i in range(0, x.shape[0], _CHUNK):
        sims = x[i : i + _CHUNK] @ s.T  # (c, n)
        out[i : i + _CHUNK] = 1.0 - sims.max(dim=1).values.to(torch.float64)
    return out


def _pca2(x: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N, 2) projection on the two leading principal axes (d x d eigh, float64)."""
    x64 = x.to(torch.float64)
    centred = x64 - x64.mean(0)
    cov = centred.T @ centred / max(1, x.shape[0] - 1)  # (d, d)
    _, vecs = torch.linalg.eigh(cov)
    return centred @ vecs[:, -2:].flip(1)


def slimset_card(
    slimset: SlimSet, pool_embeddings: torch.Tensor, selected_idx: torch.Tensor, out_dir: str | Path
) -> Path:
    """Write ``slimset_card.md`` and ``slimset_card.png`` (PCA of pool vs selected, distance-to-median
    histograms) to ``out_dir``; return the markdown path.

    Canonical = pool prompts in the lowest distance-to-median quartile, rare = the highest quartile.
    Coverage reports, per region, the selected share and the distance of pool prompts to their
    nearest selected prompt (low = well covered)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = l2_normalise(pool_embeddings)
    idx = torch.as_tensor(selected_idx, dtype=torch.long)
    dist = cosine_distance_to(x, geometric_median(x))  # (N,)
    sel_dist = dist[idx]
    q = torch.quantile(dist, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    canonical, rare = dist <= q[0], dist >= q[2]
    radius = coverage_radius(x, idx)
    deciles = torch.quantile(dist, torch.linspace(0, 1, 11, dtype=torch.float64))
    sel_bins = torch.bucketize(sel_dist, deciles[1:-1], right=True)  # decile index of each selected prompt
    per_decile = torch.bincount(sel_bins, minlength=10).tolist()

    xy = _pca2(x)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    shown = torch.arange(x.shape[0])
    if x.shape[0] > 20000:  # plotting every point of a huge pool only blurs the picture
        shown = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:20000]
    ax1.scatter(xy[shown, 0], xy[shown, 1], s=3, c="lightgray", label=f"pool ({x.shape[0]})", rasterized=True)
    ax1.scatter(
        xy[idx, 0], xy[idx, 1], s=12, c=sel_dist.numpy(), cmap="coolwarm", label=f"SlimSet ({len(idx)})"
    )
    ax1.scatter(
        xy[idx[:1], 0], xy[idx[:1], 1], s=120, marker="*", c="black", label="seed (nearest to median)"
    )
    ax1.set_title("PCA of L2-normalised prompt embeddings")
    ax1.legend(loc="best", fontsize=8)
    bins = torch.linspace(float(dist.min()), float(dist.max()), 31).numpy()
    ax2.hist(dist.numpy(), bins=bins, density=True, alpha=0.5, color="gray", label="pool")
    ax2.hist(sel_dist.numpy(), bins=bins, density=True, alpha=0.6, color="tab:red", label="SlimSet")
    for i, v in enumerate(q):
        ax2.axvline(v, color="k", ls=":", lw=0.8, label="pool quartiles" if i == 0 else None)
    ax2.set_xlabel("cosine distance to the geometric median (low = canonical, high = rare)")
    ax2.set_ylabel("density")
    ax2.legend()
    png = out_dir / "slimset_card.png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)

    def region(mask: torch.Tensor) -> str:
        n_sel = int(mask[idx].sum())
        r = radius[mask]
        return f"{int(mask.sum())} | {n_sel} ({n_sel / max(1, len(idx)):.1%}) | {float(r.mean()):.4f} | {float(r.max()):.4f}"

    lines = [
        "# SlimSet card",
        "",
        f"- prompts: {len(slimset)} (requested {slimset.params.get('n_requested', slimset.n)})",
        f"- embedder: `{slimset.embedder_id}`",
        f"- pool digest: `{slimset.pool_digest}`",
        f"- SlimSet digest: `{slimset.digest}`",
        f"- seed: {slimset.seed}",
        f"- params: `{json.dumps(slimset.params, sort_keys=True)}`",
        "",
        "## Coverage",
        "",
        "Distance = cosine distance to the pool's geometric median. Canonical = lowest quartile of the "
        "pool, rare = highest quartile. Radius = distance of a pool prompt to its nearest SlimSet prompt.",
        "",
        "| region | pool prompts | selected (share) | mean radius | max radius |",
        "|---|---|---|---|---|",
        f"| canonical (d <= {q[0]:.4f}) | {region(canonical)} |",
        f"| rare (d >= {q[2]:.4f}) | {region(rare)} |",
        f"| all | {region(torch.ones_like(canonical))} |",
        "",
        "Selected prompts per pool distance decile (uniform sampling would give "
        f"{len(idx) / 10:.1f} each): {per_decile}",
        "",
        f"![pool vs SlimSet]({png.name})",
        "",
        "## First prompts (selection order)",
        "",
    ]
    lines += [
        f"{i + 1}. {p} (d={d:.4f})"
        for i, (p, d) in enumerate(zip(slimset.prompts[:20], slimset.median_distance[:20], strict=False))
    ]
    md = out_dir / "slimset_card.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md
