"""Pure metric math for the evaluation: image fidelity, Frechet distance, CLIP score, the quality gate.

Tensors in, tensors (or plain numbers) out, float64 inside, no models and no I/O, so each function
has a known-answer test (``tests/test_eval_metrics.py``). The stateful parts (sampling pipelines,
running feature models, timing) live in :mod:`slimdiff.evaluation.evaluate`.

Conventions:

* images are float tensors ``(N, C, H, W)`` in ``[0, data_range]``; :func:`uint8_to_float` converts
  the ``(N, H, W, 3)`` uint8 arrays the samplers return;
* features are ``(N, d)``; covariances are the unbiased sample covariance (``n - 1``), as in
  torchmetrics' ``FrechetInceptionDistance``, so numbers are comparable with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

F64 = torch.float64

#: SSIM constants of Wang et al. (2004), also torchmetrics' and scikit-image's defaults
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

CLIP_SCORE_KINDS = ("100*max(cos,0)", "cos")


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> float64 ``(N, C, H, W)`` in [0, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).to(F64) / 255.0  # (N, H, W, C) -> (N, C, H, W)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"image batches must both be (N, C, H, W) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a.to(F64), b.to(F64)


# --------------------------------------------------------------------------------------------
# Fidelity to the original (same seeds)
# --------------------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, float64 ``(N,)``: 10 log10(range^2 / MSE). Identical images give +inf."""
    a, b = _check_pair(a, b)
    mse = (a - b).square().flatten(1).mean(1)  # (N,)
    return 10.0 * torch.log10(torch.as_tensor(data_range, dtype=F64) ** 2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian window, float64 ``(size,)``."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd integer, got {size}")
    x = torch.arange(size, dtype=F64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    *,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> torch.Tensor:
    """Per-image SSIM, float64 ``(N,)`` (Wang et al. 2004): Gaussian-weighted local statistics over
    the *valid* window positions (no padding), averaged over positions and channels: scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
    torchmetrics 1.x also averages the reflect-padded border positions, so it differs slightly
    (about 1e-3 on 32x32 images): the protocol records which one was used."""
    a, b = _check_pair(a, b)
    n, c, h, w = a.shape
    if h < window_size or w < window_size:
        raise ValueError(f"images of {h}x{w} are smaller than the SSIM window ({window_size})")
    g = gaussian_window(window_size, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window_size, window_size)  # (C, 1, k, k) depthwise

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=c)  # (N, C, H-k+1, W-k+1)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(1)


def capped_mean_psnr(values: torch.Tensor, cap_db: float) -> float:
    """Mean of per-image PSNR with each value capped at ``cap_db`` (identical images are +inf; a cap
    keeps the mean finite and JSON-able). The cap is part of the recorded protocol."""
    if values.numel() == 0:
        return float("nan")
    return float(values.clamp(max=cap_db).mean())


# --------------------------------------------------------------------------------------------
# Frechet distance (FID with any feature model)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureMoments:
    """Mean and unbiased covariance of one feature set: all FID needs, so a reference set (the
    original model's images, real renders) is featurised once and compared with many others."""

    mean: torch.Tensor  # (d,) float64
    cov: torch.Tensor  # (d, d) float64, divided by n - 1
    n: int
    meta: dict = field(default_factory=dict, compare=False)


def feature_moments(features: torch.Tensor) -> FeatureMoments:
    f = torch.as_tensor(features).to(F64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, d) with N >= 2 for a covariance, got {tuple(f.shape)}")
    mean = f.mean(0)
    centred = f - mean  # (N, d)
    return FeatureMoments(mean=mean, cov=centred.T @ centred / (f.shape[0] - 1), n=int(f.shape[0]))


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return (evecs * evals.clamp_min(0.0).sqrt()) @ evecs.T


def frechet_distance_from_moments(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^1/2), float64.

    tr((C1 C2)^1/2) is computed as tr((C1^1/2 C2 C1^1/2)^1/2): the same eigenvalues, but of a
    symmetric PSD matrix, so round-off cannot produce complex square roots (rank-deficient
    covariances are the rule when N < d)."""
    mu1, mu2, cov1, cov2 = (t.to(F64) for t in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"moment shapes do not match: mean {tuple(mu1.shape)} / {tuple(mu2.shape)}, cov {tuple(cov1.shape)} / {tuple(cov2.shape)}"
        )
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1  # (d, d) symmetric PSD
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0.0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * tr_sqrt
    return float(value.clamp_min(0.0))  # >= 0 in exact arithmetic; clamp the last-ulp negatives


def frechet_distance(a: torch.Tensor | FeatureMoments, b: torch.Tensor | FeatureMoments) -> float:
    """Frechet distance between two feature sets ``(N, d)`` (or their precomputed moments)."""
    ma = a if isinstance(a, FeatureMoments) else feature_moments(a)
    mb = b if isinstance(b, FeatureMoments) else feature_moments(b)
    return frechet_distance_from_moments(ma.mean, ma.cov, mb.mean, mb.cov)


# --------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------
def clip_score(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, kind: str = "100*max(cos,0)"
) -> torch.Tensor:
    """Per-pair CLIP score, float64 ``(N,)``, from image and text embeddings ``(N, d)`` (need not be
    normalised). ``kind``: "100*max(cos,0)" (Hessel et al. 2021 with w=100, as torchmetrics'
    CLIPScore) or "cos" (the plain cosine, as most papers' tables: SD v1.4 ~0.30)."""
    if kind not in CLIP_SCORE_KINDS:
        raise ValueError(f"kind must be one of {CLIP_SCORE_KINDS}, got {kind!r}")
    i, t = image_embeds.to(F64), text_embeds.to(F64)
    if i.shape != t.shape or i.dim() != 2:
        raise ValueError(
            f"image and text embeddings must both be (N, d), got {tuple(i.shape)} and {tuple(t.shape)}"
        )
    cos = F.cosine_similarity(i, t, dim=1, eps=1e-12)
    return 100.0 * cos.clamp_min(0.0) if kind == "100*max(cos,0)" else cos


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("median of no values")
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


# --------------------------------------------------------------------------------------------
# Quality gate
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateCheck:
    name: str
    value: float | None  # the measured quantity (None: not measured)
    limit: float
    passed: bool
    reason: str  # why it failed, or what passed

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "passed": self.passed,
            "reason": self.reason,
        }


def quality_gate(
    exact_match_drop: float | None,
    fid_increase: float | None,
    *,
    max_exact_match_drop: float | None,
    max_fid_increase: float | None,
) -> tuple[bool, list[str], list[GateCheck]]:
    """The ship / no-ship verdict: (passed, reasons it failed, every check made).

    ``exact_match_drop`` is in points (0..100) of toy exact-match accuracy, original minus
    compressed; ``fid_increase`` is compressed FID minus original FID. A limit of None disables its
    check. A check whose quantity was not measured (None) or is NaN fails: an unmeasured quality
    cannot pass a gate someone asked for."""
    checks: list[GateCheck] = []
    for name, value, limit, unit in (
        ("exact_match_drop", exact_match_drop, max_exact_match_drop, " points"),
        ("fid_increase", fid_increase, max_fid_increase, ""),
    ):
        if limit is None:
            continue
        if value is None or math.isnan(value):
            checks.append(
                GateCheck(
                    name,
                    None,
                    limit,
                    False,
                    f"{name} was not measured on this evaluation path (limit {limit:g}{unit})",
                )
            )
        elif value > limit:
            checks.append(
                GateCheck(
                    name, value, limit, False, f"{name} {value:.3g}{unit} exceeds the limit {limit:g}{unit}"
                )
            )
        else:
            checks.append(
                GateCheck(
                    name, value, limit, True, f"{name} {value:.3g}{unit} within the limit {limit:g}{unit}"
                )
            )
    reasons = [c.reason for c in checks if not c.passed]
    return not reasons, reasons, checks
