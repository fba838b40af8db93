"""Known-answer tests of the evaluation math (slimdiff.evaluation.metrics) and the size counters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from slimdiff.evaluation import metrics as M

F64 = torch.float64


# -- PSNR -------------------------------------------------------------------------------------
def test_psnr_identical_images_is_infinite():
    a = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(M.psnr(a, a.clone())).all()


def test_psnr_known_noise_level_matches_the_analytic_value():
    # +-0.1 checkerboard around 0.5: MSE = 0.01 exactly -> PSNR = 10 log10(1 / 0.01) = 20 dB
    a = torch.full((2, 3, 6, 6), 0.5, dtype=F64)
    sign = (torch.arange(6)[:, None] + torch.arange(6)[None, :]) % 2 * 2 - 1  # (6, 6) +-1
    b = a + 0.1 * sign
    assert torch.allclose(M.psnr(a, b), torch.full((2,), 20.0, dtype=F64), atol=1e-12)
    # the same on a 0..255 scale
    assert torch.allclose(
        M.psnr(255 * a, 255 * b, data_range=255.0), torch.full((2,), 20.0, dtype=F64), atol=1e-12
    )
    # +-2^-4 (exact in binary): MSE = 2^-8 -> 10 log10(256) = 24.0824 dB
    c = a + 0.0625 * sign
    assert M.psnr(a, c)[0].item() == pytest.approx(10 * math.log10(256.0), abs=1e-12)


def test_capped_mean_psnr_keeps_identical_images_finite():
    values = torch.tensor([float("inf"), 20.0], dtype=F64)
    assert M.capped_mean_psnr(values, 100.0) == pytest.approx(60.0)


# -- SSIM -------------------------------------------------------------------------------------
def test_ssim_identical_images_is_one():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(M.ssim(a, a.clone()), torch.ones(2, dtype=F64), atol=1e-12)


def test_ssim_of_constant_images_is_the_luminance_term():
    # no variance, no covariance: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    m1, m2 = 0.3, 0.7
    a = torch.full((1, 3, 12, 12), m1, dtype=F64)
    b = torch.full((1, 3, 12, 12), m2, dtype=F64)
    c1 = (M.SSIM_K1 * 1.0) ** 2
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
    assert M.ssim(a, b).item() == pytest.approx(expected, rel=1e-12)


def test_ssim_matches_a_brute_force_window_loop():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 2, 13, 14, generator=g, dtype=F64)
    b = (a + 0.2 * torch.rand(1, 2, 13, 14, generator=g, dtype=F64)).clamp(0, 1)
    w1 = M.gaussian_window()
    w = w1[:, None] * w1[None, :]  # (11, 11)
    c1, c2 = (M.SSIM_K1) ** 2, (M.SSIM_K2) ** 2
    values = []
    for ch in range(2):
        for i in range(13 - 10):
            for j in range(14 - 10):
                pa, pb = a[0, ch, i : i + 11, j : j + 11], b[0, ch, i : i + 11, j : j + 11]
                mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
                va = (w * (pa - mu_a) ** 2).sum()
                vb = (w * (pb - mu_b) ** 2).sum()
                cov = (w * (pa - mu_a) * (pb - mu_b)).sum()
                values.append(
                    ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
                )
    assert M.ssim(a, b).item() == pytest.approx(torch.stack(values).mean().item(), rel=1e-10)


# -- Frechet distance ---------------------------------------------------------------------------
class TinyFeatures(nn.Module):
    """A tiny fixed feature model: uint8 (N, 3, H, W) -> (N, 6) (channel means and stds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def _images(seed: int, n: int = 40, shift: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 3, 8, 8), generator=g) + shift
    return x.clamp(0, 255).to(torch.uint8)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    feats = TinyFeatures()(_images(0))
    assert M.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-10)
    shifted = TinyFeatures()(_images(0, shift=30))
    far = TinyFeatures()(_images(0, shift=60))
    d1, d2 = M.frechet_distance(feats, shifted), M.frechet_distance(feats, far)
    assert 0 < d1 < d2


def test_fid_matches_torchmetrics_with_the_same_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _images(1), _images(2, shift=20)
    fid = FrechetInceptionDistance(feature=TinyFeatures())
    fid.update(real, real=True)
    fid.update(fake, real=False)
    reference = fid.compute().item()
    ours = M.frechet_distance(TinyFeatures()(real), TinyFeatures()(fake))
    assert ours == pytest.approx(reference, rel=1e-5)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=F64), torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    s1, s2 = torch.tensor([1.0, 4.0, 0.0], dtype=F64), torch.tensor([4.0, 1.0, 9.0], dtype=F64)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum()  # 5 + 1 + 1 + 9
    got = M.frechet_distance_from_moments(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected.item(), rel=1e-12)


def test_frechet_distance_is_rotation_invariant_for_rank_deficient_covariances():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 12, generator=g, dtype=F64)  # N < d: singular covariance
    b = torch.randn(5, 12, generator=g, dtype=F64) + 0.5
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=F64))
    assert M.frechet_distance(a @ q, b @ q) == pytest.approx(M.frechet_distance(a, b), rel=1e-8)


# -- CLIP score ---------------------------------------------------------------------------------
def test_clip_score_known_answers():
    x = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, -5.0], [1.0, 1.0], [0.0, 1.0]])
    score = M.clip_score(x, y)
    assert torch.allclose(score, torch.tensor([100.0, 0.0, 100 / math.sqrt(2), 0.0], dtype=F64), atol=1e-9)
    cos = M.clip_score(x, y, kind="cos")
    assert torch.allclose(cos, torch.tensor([1.0, -1.0, 1 / math.sqrt(2), 0.0], dtype=F64), atol=1e-12)
    with pytest.raises(ValueError, match="kind"):
        M.clip_score(x, y, kind="logit")


def test_clip_score_with_a_tiny_open_clip_model(tmp_path):
    """ClipJudge (offline, registered config + local checkpoint) gives open_clip's own embeddings."""
    import open_clip
    from eval_helpers import register_tiny_clip
    from PIL import Image

    from slimdiff.evaluation.judges import ClipJudge

    name, ckpt = register_tiny_clip(tmp_path)
    judge = ClipJudge(name, str(ckpt), torch.device("cpu"))
    assert judge.id.startswith(f"open_clip:{name}:file:")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "two dogs", "a house"]
    # reference: open_clip's own preprocessing (PIL, image already at the model size) and encoders
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(ckpt))
    model.eval()
    tok = open_clip.get_tokenizer(name)
    with torch.no_grad():
        ref_img = model.encode_image(torch.stack([preprocess(Image.fromarray(im)) for im in images]))
        ref_txt = model.encode_text(tok(prompts))
    ref = 100 * torch.nn.functional.cosine_similarity(ref_img.double(), ref_txt.double()).clamp_min(0)
    ours = M.clip_score(judge.image_embeds(images), judge.text_embeds(prompts))
    assert torch.allclose(ours, ref, atol=1e-3)


def test_missing_clip_weights_name_the_file_and_the_fix(tmp_path):
    from eval_helpers import register_tiny_clip

    from slimdiff.evaluation.judges import ClipJudge, MissingWeightsError

    name, _ = register_tiny_clip(tmp_path)
    missing = tmp_path / "nope" / "clip.safetensors"
    with pytest.raises(MissingWeightsError, match="does not exist"):
        ClipJudge(name, str(missing), torch.device("cpu"))
    with pytest.raises(MissingWeightsError, match="not in the local cache"):
        ClipJudge("ViT-B-32", "openai", torch.device("cpu"))


def test_inception_option_requires_a_local_weights_file(tmp_path):
    from slimdiff.evaluation.judges import (
        INCEPTION_WEIGHTS_FILE,
        InceptionFeatures,
        MissingWeightsError,
        RealMetricsOptions,
    )

    with pytest.raises(ValueError, match=INCEPTION_WEIGHTS_FILE):
        RealMetricsOptions(fid_feature="inception")
    with pytest.raises(MissingWeightsError, match="not found"):
        InceptionFeatures(str(tmp_path / INCEPTION_WEIGHTS_FILE), torch.device("cpu"))


# -- gate ---------------------------------------------------------------------------------------
def test_quality_gate_passes_within_limits():
    passed, reasons, checks = M.quality_gate(1.0, 0.5, max_exact_match_drop=3.0, max_fid_increase=1.0)
    assert passed and reasons == [] and [c.name for c in checks] == ["exact_match_drop", "fid_increase"]


def test_quality_gate_fails_with_a_reason_per_violation():
    passed, reasons, _ = M.quality_gate(5.0, 2.0, max_exact_match_drop=3.0, max_fid_increase=1.0)
    assert not passed and len(reasons) == 2
    assert "exact_match_drop 5 points exceeds the limit 3 points" in reasons[0]
    assert "fid_increase 2 exceeds the limit 1" in reasons[1]


def test_quality_gate_limit_none_disables_and_unmeasured_fails():
    assert M.quality_gate(50.0, None, max_exact_match_drop=None, max_fid_increase=None)[0]
    passed, reasons, _ = M.quality_gate(None, None, max_exact_match_drop=None, max_fid_increase=1.0)
    assert not passed and "not measured" in reasons[0]
    assert not M.quality_gate(float("nan"), None, max_exact_match_drop=3.0, max_fid_increase=None)[0]
    # an improvement (negative drop) passes, the boundary value passes
    assert M.quality_gate(-4.0, 1.0, max_exact_match_drop=3.0, max_fid_increase=1.0)[0]


def test_median():
    assert M.median([3.0, 1.0, 2.0]) == 2.0
    assert M.median([4.0, 1.0, 2.0, 3.0]) == 2.5


# -- sizes --------------------------------------------------------------------------------------
def test_compressible_count_matches_the_adapter_and_the_plan(tiny_unet):
    from slimdiff.evaluation.sampling import compressible_parameter_count
    from slimdiff.families.units import compression_units
    from slimdiff.planning.allocation import plan_ranks
    from slimdiff.planning.budget import Budget
    from slimdiff.surgery.compress import compress_

    units = compression_units(tiny_unet)
    assert compressible_parameter_count(tiny_unet) == sum(u.full_params for u in units.values())
    plan = plan_ranks(None, units, Budget(removed_fraction=0.3), mode="uniform", r_min=8, multiple=8)
    before = sum(p.numel() for p in tiny_unet.parameters())
    compress_(tiny_unet, plan, None, method={"ffn": "magnitude", "qk": "weight_svd", "vo": "weight_svd"})
    assert compressible_parameter_count(tiny_unet) == plan.params_after
    assert before - sum(p.numel() for p in tiny_unet.parameters()) == plan.removed_params
