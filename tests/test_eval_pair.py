"""evaluate_pair on tiny pipelines built from config (random weights, offline): the toy path, the
real-model path with a tiny registered open_clip model, the quality gate and the protocol."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from eval_helpers import (
    BrightnessOracle,
    eval_params,
    random_toy_judges,
    register_tiny_clip,
    tiny_toy_pipeline,
)

from slimdiff.evaluation.evaluate import PairEvaluator, evaluate_pair
from slimdiff.evaluation.judges import MissingWeightsError, RealMetricsOptions
from slimdiff.evaluation.sampling import image_seeds, is_toy_prompt_set, sample_pipeline
from slimdiff.toy.data import heldout_captions

PROMPTS = heldout_captions("single")[:3] + heldout_captions("two")[:3]


@pytest.fixture(scope="module")
def pipe():
    return tiny_toy_pipeline()


def _strict_json(obj) -> dict:
    return json.loads(json.dumps(obj, allow_nan=False))  # raises on NaN / inf / non-JSON types


def test_identical_copy_has_zero_deltas_and_passes_the_gate(pipe, tmp_path):
    result = evaluate_pair(
        pipe, copy.deepcopy(pipe), PROMPTS, eval_params(), tmp_path, judges=random_toy_judges()
    )
    assert _strict_json(result) == result
    s = result["summary"]
    for key in (
        "accuracy.all.exact",
        "accuracy.two.color",
        "fid",
        "fd_cls",
        "clip_score",
        "unet_params",
        "compressible_params",
        "unet_flops",
    ):
        assert s["deltas"][key] == 0.0, key
    assert s["fidelity"]["identical_images"] == len(PROMPTS)
    assert s["fidelity"]["psnr_db_mean"] == 100.0  # the cap: every image identical
    assert s["fidelity"]["ssim_mean"] == pytest.approx(1.0, abs=1e-12)
    assert s["fidelity"]["fid_to_original"] == pytest.approx(0.0, abs=1e-9)
    assert s["fidelity"]["fd_cls_to_original"] == pytest.approx(0.0, abs=1e-9)
    assert s["exact_match_drop"] == 0.0 and s["fid_increase"] == 0.0 and s["fd_cls_increase"] == 0.0
    assert s["unet_params_ratio"] == 1.0 and s["flops_ratio"] == 1.0
    assert s["gate_passed"] and s["gate_reasons"] == []
    assert result["original"]["unet_latency_ms"] > 0 and len(result["original"]["unet_latency_ms_all"]) == 2
    assert (
        result["original"]["accuracy"]["single"]["n"] == 3 and result["original"]["accuracy"]["two"]["n"] == 3
    )
    for name in result["grids"].values():
        assert (tmp_path / name).is_file()
    p = result["protocol"]
    assert (
        p["path"] == "toy"
        and p["n_images"] == 6
        and p["resolution"] == [32, 32]
        and p["sampler"] == "DDIMScheduler"
    )
    assert p["num_inference_steps"] == 2 and p["guidance_scale"] == 4.0 and p["seed"] == 7
    assert "toy-clip-tiny" in p["fid_feature"] and "renders" in p["fid_reference"]
    assert p["fid_real_vs_real"] > 0  # two independent render sets differ: the FID noise floor
    assert p["fd_cls_real_vs_real"] > 0 and "penultimate" in p["fd_cls_feature"]  # the fd_cls floor
    assert result["original"]["fd_cls"] >= 0.0


def test_degraded_copy_fails_the_gate_with_a_reason(pipe, tmp_path):
    degraded = copy.deepcopy(pipe)
    with torch.no_grad():  # saturate the decoder: every image comes out white
        degraded.vae.decoder.conv_out.bias.fill_(50.0)
    cfg = eval_params(images_per_prompt=1)
    judges = random_toy_judges(classifier=BrightnessOracle(PROMPTS))
    result = evaluate_pair(pipe, degraded, PROMPTS, cfg, tmp_path, judges=judges)
    s = result["summary"]
    assert result["original"]["accuracy"]["all"]["exact"] == 1.0
    assert result["compressed"]["accuracy"]["all"]["exact"] == 0.0
    assert s["exact_match_drop"] == pytest.approx(100.0)
    assert not s["gate_passed"]
    assert s["gate_reasons"] == ["exact_match_drop 100 points exceeds the limit 3 points"]
    assert s["fidelity"]["psnr_db_mean"] < 20 and s["fidelity"]["ssim_mean"] < 0.5
    assert s["fid_increase"] > 0


def test_fid_gate_uses_the_fid_increase(pipe, tmp_path):
    degraded = copy.deepcopy(pipe)
    with torch.no_grad():
        degraded.vae.decoder.conv_out.bias.fill_(50.0)
    cfg = eval_params(gate={"max_exact_match_drop": 100.0, "max_fid_increase": 0.0})
    result = evaluate_pair(pipe, degraded, PROMPTS, cfg, tmp_path, judges=random_toy_judges())
    reasons = result["summary"]["gate_reasons"]
    assert len(reasons) == 1 and reasons[0].startswith("fid_increase") and "exceeds the limit 0" in reasons[0]


def test_samples_do_not_depend_on_the_batch_size(pipe):
    seeds = image_seeds(3, 3)
    kw = {"num_inference_steps": 2, "guidance_scale": 4.0, "height": 32, "width": 32}
    a = sample_pipeline(pipe, PROMPTS[:3], seeds, batch_size=3, **kw)
    b = sample_pipeline(pipe, PROMPTS[:3], seeds, batch_size=1, **kw)
    assert a.dtype.name == "uint8" and a.shape == (3, 32, 32, 3)
    assert abs(a.astype(int) - b.astype(int)).max() <= 1  # batched vs single matmuls: rounding only


def test_max_prompts_and_images_per_prompt_shape_the_protocol():
    ev = PairEvaluator(PROMPTS, eval_params(max_prompts=2, images_per_prompt=3), judges=random_toy_judges())
    assert ev.image_prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert ev.seeds == [7, 8, 9, 10, 11, 12]


def test_path_choice():
    assert is_toy_prompt_set(PROMPTS)
    assert not is_toy_prompt_set([*PROMPTS, "a photo of a cat"])


def test_real_path_with_a_tiny_open_clip_model(pipe, tmp_path):
    name, ckpt = register_tiny_clip(tmp_path)
    prompts = ["a photo of a cat", "a red car on a street", "a bowl of fruit"]
    real = RealMetricsOptions(clip_model=name, clip_pretrained=str(ckpt), clip_score_kind="cos")
    result = evaluate_pair(pipe, copy.deepcopy(pipe), prompts, eval_params(), tmp_path / "out", real=real)
    assert _strict_json(result) == result
    p, s = result["protocol"], result["summary"]
    assert (
        p["path"] == "real"
        and p["clip_score"].startswith(f"open_clip:{name}:file:")
        and p["clip_score"].endswith("cos")
    )
    assert "image embedding" in p["fid_feature"] and p["fid_reference"].startswith("none")
    assert -1.0 <= result["original"]["clip_score"] <= 1.0 and s["clip_score_delta"] == 0.0
    assert result["original"]["fid"] is None and "fid_increase" not in s  # no reference image folder given
    assert result["original"]["fd_cls"] is None and "fd_cls_increase" not in s  # a toy-world judge only
    assert p["fd_cls_real_vs_real"] is None and s["fidelity"]["fd_cls_to_original"] is None
    assert "exact_match_drop" not in s and s["gate_passed"]  # exact match is a toy-only check
    assert s["fidelity"]["fid_to_original"] == pytest.approx(0.0, abs=1e-9)


def test_real_path_never_substitutes_missing_weights(pipe, tmp_path):
    real = RealMetricsOptions(clip_model="ViT-B-32", clip_pretrained="openai")
    with pytest.raises(MissingWeightsError, match="ViT-B-32/openai are not in the local cache"):
        evaluate_pair(pipe, pipe, ["a photo of a cat", "a dog"], eval_params(), tmp_path, real=real)


def test_missing_toy_judges_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMDIFF_TOY_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="classifier/model.safetensors.*slimdiff.toy.train"):
        PairEvaluator(PROMPTS, eval_params())


def test_peak_memory_sees_a_cpu_allocation():
    from slimdiff.evaluation.timing import peak_memory

    with peak_memory(torch.device("cpu")) as mem:
        x = torch.ones(16 * 2**20)  # 16 Mi float32 = 64 MiB, every page touched
        del x
    assert mem["bytes"] >= 48 * 2**20, mem
    assert "RSS" in mem["method"] or "ru_maxrss" in mem["method"]


def test_interleaved_latency_times_every_model_every_repeat():
    from slimdiff.evaluation.timing import interleaved_latency

    order = []

    class Probe(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            order.append(self.name)
            return x

    times = interleaved_latency(
        {"a": Probe("a"), "b": Probe("b")}, ((torch.zeros(1),), {}), repeats=3, warmup=1
    )
    assert order == ["a", "b"] * 4  # one warm-up round, then 3 alternating repeats
    assert len(times["a"]) == len(times["b"]) == 3 and min(times["a"]) >= 0
