"""The classifier-feature Frechet distance (``fd_cls``): the toy attribute classifier's penultimate
features, the FD on them against closed forms, its real-vs-real noise floor, and its keys in the
evaluation result, the ablation table and the report."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from eval_helpers import eval_params, random_toy_judges, tiny_toy_pipeline

from slimdiff.evaluation import metrics as M
from slimdiff.evaluation.evaluate import Measured, PairEvaluator
from slimdiff.toy.classifier import load_toy_classifier
from slimdiff.toy.data import heldout_captions, render, to_tensor_range, train_captions

F64 = torch.float64
EPS = torch.finfo(F64).eps
PROMPTS = heldout_captions("single")[:3] + heldout_captions("two")[:3]


def _renders(captions: list[str], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render(c, rng) for c in captions])


@pytest.fixture(scope="module")
def classifier():
    return load_toy_classifier()  # the committed one (data/toy/classifier), ~0.7 M parameters


# -- features -------------------------------------------------------------------------------------
def test_penultimate_features_are_the_input_of_the_last_linear(classifier):
    images = _renders(heldout_captions(), 0)  # 88 images
    captured = {}
    hook = classifier.head[-1].register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    try:
        with torch.no_grad():
            logits = classifier(to_tensor_range(images))
    finally:
        hook.remove()
    feats = classifier.penultimate_features(images)
    assert feats.dtype == torch.float32 and feats.shape == (88, classifier.config.hidden)
    # the same modules in the same order on the same batch: bit-identical on CPU
    assert torch.equal(feats, captured["x"])
    # and the classifier's predictions are unchanged: the last Linear of these features
    assert np.array_equal(classifier.predict(images), logits.argmax(-1).numpy())
    head = classifier.head[-1](feats).view(-1, classifier.config.num_slots, classifier.config.num_classes)
    assert torch.equal(head, logits)


def test_penultimate_features_do_not_depend_on_the_batch_size(classifier):
    images = _renders(heldout_captions()[:20], 1)
    full = classifier.penultimate_features(images)
    small = classifier.penultimate_features(images, batch_size=7)
    # float32 convolutions blocked differently: round-off ~1e-7 relative per op, values up to ~150
    assert torch.allclose(small, full, rtol=1e-5, atol=1e-4 * full.abs().max().item())
    assert classifier.penultimate_features(images[:0]).shape == (0, classifier.config.hidden)


# -- the distance ---------------------------------------------------------------------------------
def test_fd_of_a_classifier_feature_set_with_itself_is_zero(classifier):
    feats = classifier.penultimate_features(_renders(heldout_captions(), 2)).double()  # N 88 < d 256
    cov = M.feature_moments(feats).cov
    # tr C + tr C - 2 tr (C^1/2 C C^1/2)^1/2: the >= 168 zero eigenvalues of the middle matrix come
    # out of eigh as +-eps * lmax^2, each adding at most sqrt(eps) * lmax to the trace term, so
    # |FD| <= 2 d sqrt(eps) lmax, about 3e-6 of 2 tr C here (the clamp at 0 makes a negative
    # round-off exactly 0)
    lmax, trace = torch.linalg.eigvalsh(cov)[-1].item(), torch.trace(cov).item()
    bound = 2 * feats.shape[1] * EPS**0.5 * lmax
    assert bound < 1e-5 * 2 * trace
    assert 0.0 <= M.frechet_distance(feats, feats) <= bound


def _with_moments(mean: torch.Tensor, var: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """(n, d) float64 features whose sample mean is ``mean`` and unbiased sample covariance is
    ``diag(var)`` exactly (up to round-off): random data, centred and whitened, then scaled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, mean.numel(), generator=g, dtype=F64)
    x = x - x.mean(0)
    cov = x.T @ x / (n - 1)
    evals, evecs = torch.linalg.eigh(cov)
    white = x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # sample covariance exactly I
    return white * var.sqrt() + mean


def test_fd_of_gaussian_feature_sets_with_known_moments_is_the_closed_form():
    d = 256  # the classifier's penultimate width
    g = torch.Generator().manual_seed(3)
    mu1, mu2 = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    s1 = torch.rand(d, generator=g, dtype=F64) * 4 + 0.1
    s2 = torch.rand(d, generator=g, dtype=F64) * 4 + 0.1
    a, b = _with_moments(mu1, s1, 600, 0), _with_moments(mu2, s2, 700, 1)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum()
    # whitening and eigh in float64 on well-conditioned 256 x 256 matrices: ~1e-12 relative
    assert M.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)


def test_noise_floor_of_two_real_sets_is_below_the_fd_to_other_captions(classifier):
    captions = heldout_captions()  # 88
    other = train_captions()[::5][: len(captions)]  # 88 different captions
    real = classifier.penultimate_features(_renders(captions, 1234)).double()
    again = classifier.penultimate_features(_renders(captions, 1235)).double()
    wrong = classifier.penultimate_features(_renders(other, 1236)).double()
    floor, far = M.frechet_distance(again, real), M.frechet_distance(wrong, real)
    # measured with these seeds: floor ~526, other captions ~4711; demand a wide margin
    assert floor > 0.0 and far > 3.0 * floor, (floor, far)


# -- the evaluation -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return tiny_toy_pipeline()


def test_evaluation_reports_fd_cls_its_floor_and_fd_to_original(pipe):
    judges = random_toy_judges()  # a random classifier (hidden 16) with penultimate_features
    cfg = eval_params()
    ev = PairEvaluator(PROMPTS, cfg, judges=judges)
    original = ev.measure(pipe)
    slim = copy.deepcopy(pipe)
    with torch.no_grad():
        slim.vae.decoder.conv_out.bias.add_(0.3)  # a visible change, same seeds
    compressed = ev.measure(slim)
    result = ev.compare(pipe, slim, original, compressed, latency=False)

    # direct recomputation: the same renders as the FID reference (default_rng(seed), seed + 1)
    feats = judges.classifier.penultimate_features
    real = feats(_renders(ev.image_prompts, cfg.seed)).double()
    again = feats(_renders(ev.image_prompts, cfg.seed + 1)).double()
    f_o, f_c = feats(original.images).double(), feats(compressed.images).double()
    p, s = result["protocol"], result["summary"]
    # the same float64 formulas on the same features: equal to round-off
    assert result["original"]["fd_cls"] == pytest.approx(M.frechet_distance(f_o, real), rel=1e-12)
    assert result["compressed"]["fd_cls"] == pytest.approx(M.frechet_distance(f_c, real), rel=1e-12)
    assert p["fd_cls_real_vs_real"] == pytest.approx(M.frechet_distance(again, real), rel=1e-12)
    assert p["fd_cls_real_vs_real"] == ev.fd_cls_real_vs_real > 0
    assert "penultimate" in p["fd_cls_feature"] and "16-d" in p["fd_cls_feature"]
    assert s["fidelity"]["fd_cls_to_original"] == pytest.approx(M.frechet_distance(f_c, f_o), rel=1e-12)
    assert s["fd_cls_increase"] == pytest.approx(
        result["compressed"]["fd_cls"] - result["original"]["fd_cls"]
    )
    assert s["deltas"]["fd_cls"] == pytest.approx(s["fd_cls_increase"])
    assert s["fidelity"]["fd_cls_to_original"] > 0
    assert [c["name"] for c in s["gate_checks"]] == ["exact_match_drop"]  # reported, never gated

    # a cached original measurement carries no classifier features: recomputed from its images
    cached = Measured(original.images, original.quality, original.fid_features, original.sample_time_s)
    again_result = ev.compare(pipe, slim, cached, compressed, latency=False)
    assert again_result["summary"]["fidelity"]["fd_cls_to_original"] == pytest.approx(
        s["fidelity"]["fd_cls_to_original"], rel=1e-12
    )


def test_a_classifier_without_features_leaves_fd_cls_unmeasured(pipe):
    from eval_helpers import BrightnessOracle

    ev = PairEvaluator(PROMPTS, eval_params(), judges=random_toy_judges(classifier=BrightnessOracle(PROMPTS)))
    m = ev.measure(pipe)
    assert m.quality["fd_cls"] is None and m.cls_features is None
    result = ev.compare(pipe, pipe, m, m, latency=False)
    assert result["summary"]["fidelity"]["fd_cls_to_original"] is None
    assert result["protocol"]["fd_cls_real_vs_real"] is None and result["protocol"]["fd_cls_feature"] is None
    assert "fd_cls_increase" not in result["summary"]


# -- tables and reports ---------------------------------------------------------------------------
def _ablation_result(fd_cls: bool):
    from ablation_runner import AblationResult

    acc = {split: {m: 0.9 for m in ("exact", "object", "color", "shape", "position")} for split in ("all",)}
    original = {"unet_params": 1000, "accuracy": acc, "fid": 0.01, "clip_score": 25.0}
    row = {
        "variant": "slimdiff",
        "group": "method",
        "budget": 0.4,
        "calibration": "fps-6",
        "status": "ok",
        "removed_fraction": 0.4,
        "unet_params": 800,
        "exact_all": 0.9,
        "fid": 0.02,
        "clip_score": 25.0,
        "psnr_db": 30.0,
        "ssim": 0.9,
        "flops_ratio": 0.8,
        "latency_ratio": 0.9,
        "gate_passed": True,
    }
    protocol = {"n_images": 6, "fid_real_vs_real": 0.005}
    if fd_cls:
        original["fd_cls"], row["fd_cls"] = 500.0, 650.0
        protocol["fd_cls_real_vs_real"] = 520.0
    config = {"budgets": [0.4], "slimset_budget": 0.4, "calibration_sets": [{"name": "fps-6"}]}
    return AblationResult([row], original, {}, protocol, config, {"total": 1.0})


def test_ablation_table_gains_the_fd_cls_column_and_stays_as_before_without_it():
    from ablation_runner import TABLE_COLUMNS, ablation_table

    old = ablation_table(_ablation_result(fd_cls=False))
    assert "| " + " | ".join(TABLE_COLUMNS) + " |" in old and "FD cls" not in old
    new = ablation_table(_ablation_result(fd_cls=True))
    header = next(line for line in new.splitlines() if line.startswith("| variant"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[cols.index("FID") + 1] == "FD cls" and len(cols) == len(TABLE_COLUMNS) + 1
    assert "| **original** | 0% | 1,000 |" in new and "| 0.0100 | 500.0 | 25.00 |" in new
    assert "| 0.0200 | 650.0 | 25.00 |" in new
    assert (
        "noise floor: two independent render sets of the evaluated captions (6 images each) are 520.0" in new
    )
    assert "the original model's images are 500.0 from the renders" in new


def test_report_rows_and_headline_carry_fd_cls():
    from slimdiff.evaluation.report import headline, metrics_table

    metrics = {
        "original": {"unet_params": 1000, "fd_cls": 500.0},
        "compressed": {"unet_params": 800, "fd_cls": 650.0},
        "summary": {
            "unet_params_ratio": 0.8,
            "compressible_removed_fraction": 0.4,
            "fd_cls_increase": 150.0,
            "fidelity": {"fd_cls_to_original": 40.0},
            "gate_passed": True,
        },
        "protocol": {"fd_cls_real_vs_real": 520.0},
    }
    table = metrics_table(metrics)
    assert "| classifier-feature FD vs real (lower is better) | 500.0 | 650.0 | +150.0 |" in table
    assert "| classifier-feature FD to original (lower is better) | - | 40.0 | - |" in table
    assert (
        "Classifier-feature FD 500.0 -> 650.0 (+150.0; two real render sets differ by 520.0; "
        "reported, not gated)." in headline(metrics)
    )
