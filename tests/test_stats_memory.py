"""Statistics within a memory limit (slimdiff.core.memory, issue 23): the memory model, the planner's
groups, bit-identical bounded collection, float32 accumulation within its stated bound, and the
stage-level exactness on both toy worlds (rank plan and compressed weights of a bounded run,
with grouping and shard merging, equal those of the unbounded run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from slimdiff.calibration import collect as calibration
from slimdiff.calibration.collect import collect_stats, plan_for_model
from slimdiff.config import ConfigError, Params
from slimdiff.core.memory import MemoryLimitError, parse_bytes, plan_stats_memory

sys.path.insert(0, str(Path(__file__).parent))
from test_calib_collector import PROMPTS, make_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipe_mem"))


def test_parse_bytes_known_answers_and_refusals():
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("1.5 GiB") == 3 * 2**29
    assert parse_bytes("500MB") == 500_000_000
    assert parse_bytes(1024) == 1024
    assert parse_bytes(None) is None
    for bad in ("16 parsecs", "-1GiB", "0", "lots"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


def test_memory_model_known_answer_and_first_fit_groups():
    # float64, 3 buckets: a 10x10 site = 2400 B, a (2, 4, 4) site = 768 B
    sites = [("a.ff", (10, 10)), ("a.q", (2, 4, 4)), ("b.ff", (10, 10)), ("b.q", (2, 4, 4))]
    one = plan_stats_memory(sites, 3, max_memory=None)
    assert one.passes == 1 and one.device_bytes == 2 * 2400 + 2 * 768
    assert one.statistics_bytes == 6336 and one.store_bytes() == 3 * 6336
    assert one.largest == ("a.ff", 2400)
    plan = plan_stats_memory(sites, 3, max_memory=3200)
    # largest first: a.ff | b.ff, then the small ones fill the room left (800 each): a.q -> bin 0, b.q -> bin 1
    assert plan.groups == [["a.ff", "a.q"], ["b.ff", "b.q"]]
    assert plan.group_bytes == [3168, 3168] and plan.device_bytes <= 3200
    assert plan.host_bytes == 3168 + 2400 // 3  # the CPU holds the accumulators + one bucket being written
    # float32 on an accelerator: half the device bytes, float64 sums on the host
    gpu = plan_stats_memory(sites, 3, max_memory=3200, device="cuda")
    assert gpu.accumulate == "float32" and gpu.passes == 1 and gpu.device_bytes == 3168
    assert "statistics memory plan" in plan.describe(4) and "2 groups" in plan.describe(4)


def test_a_limit_below_the_largest_statistic_says_what_it_would_take():
    sites = [("blk.ff.hidden", (5120, 5120)), ("blk.attn1.query", (8, 40, 40))]
    with pytest.raises(MemoryLimitError) as err:
        plan_stats_memory(sites, 5, max_memory="512MiB")
    msg = str(err.value)
    assert "blk.ff.hidden needs 1000.00 MiB" in msg and "5120x5120 x 5 buckets x 8 bytes" in msg
    assert "at 1 bucket: 200.00 MiB" in msg


def test_params_accept_sizes_and_auto_and_name_the_key_on_bad_input():
    p = Params().with_overrides({"calibration.max_memory": "12GiB"})
    assert p.calibration.max_memory == "12GiB"
    assert Params().calibration.max_memory == "auto"
    with pytest.raises(ConfigError, match="max_memory"):
        Params().with_overrides({"calibration.max_memory": "12 giggles"})
    # the limit changes no number: it is not part of the calibrate stage's key or the store identity
    a, b = Params(), Params().with_overrides({"calibration.max_memory": "1GiB"})
    assert a.digest(("model.dtype", "calibration")) == b.digest(("model.dtype", "calibration"))
    assert "max_memory" not in a.identity_section("calibration")
    c = Params().with_overrides({"calibration.n_buckets": 2})
    assert a.digest(("model.dtype", "calibration")) != c.digest(("model.dtype", "calibration"))


@pytest.mark.parametrize("syrk", [False, True], ids=["gemm", "syrk"])
def test_bounded_collection_is_bit_identical_to_one_pass(tiny_pipe, monkeypatch, syrk):
    if syrk:
        monkeypatch.setattr(calibration, "SYRK_MIN_DIM", 1)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, n_buckets=3, batch_size=2, seed=5, progress=False)
    whole = collect_stats(tiny_pipe, PROMPTS[:4], max_memory=None, **kw)
    limit = plan_for_model(tiny_pipe.unet, 3, max_memory=None).largest[1]  # the tightest limit there is
    plan = plan_for_model(tiny_pipe.unet, 3, max_memory=limit)
    assert plan.passes >= 3 and plan.device_bytes <= limit
    received: dict[str, tuple] = {}

    def sink(key, moments, tokens):
        assert key not in received  # each statistic handed over once
        received[key] = (moments, tokens)

    bounded = collect_stats(tiny_pipe, PROMPTS[:4], max_memory=limit, sink=sink, **kw)
    assert bounded.moments == {} and bounded.meta == whole.meta
    assert sorted(received) == sorted(whole.moments)
    for key, (m, t) in received.items():
        assert torch.equal(m, whole.moments[key]), key
        assert torch.equal(t, whole.tokens[key]), key


def test_float32_accumulation_within_its_flush_bound(tiny_pipe):
    """flush_every=1 adds each float32 product straight into float64: the same bits. A flush interval
    K sums K float32 products first: each such partial sum carries a relative error <= (K-1) 2^-24
    (summing nonnegative terms), so on the diagonals (sums of squares, all terms >= 0) the whole sum
    is within (K-1) 2^-24 of the float64 accumulation."""
    kw = dict(num_inference_steps=4, guidance_scale=5.0, n_buckets=2, batch_size=1, seed=3, progress=False)
    ref = collect_stats(tiny_pipe, PROMPTS[:4], max_memory=None, accumulate="float64", **kw)
    same = collect_stats(tiny_pipe, PROMPTS[:4], max_memory=None, accumulate="float32", flush_every=1, **kw)
    k = 8
    f32 = collect_stats(tiny_pipe, PROMPTS[:4], max_memory=None, accumulate="float32", flush_every=k, **kw)
    assert f32.meta["accumulate"] == "float32" and f32.meta["flush_every"] == k
    worst = 0.0
    for key in ref.moments:
        assert torch.equal(same.moments[key], ref.moments[key]), key
        d_ref = torch.diagonal(ref.moments[key], dim1=-2, dim2=-1)
        d_32 = torch.diagonal(f32.moments[key], dim1=-2, dim2=-1)
        rel = ((d_32 - d_ref).abs() / d_ref.clamp_min(1e-300)).max().item()
        worst = max(worst, rel)
    assert 0 < worst <= (k - 1) * 2.0**-24, worst


# -- stage level: bounded + merged == unbounded, on both toy worlds ------------------------------
def _stage_run(root: Path, source: str, **overrides):
    from tasks import stages

    params = Params().with_overrides(
        {
            "model.source": source,
            "slimset.n": 8,
            "calibration.num_inference_steps": 4,
            "calibration.n_buckets": 2,
            "calibration.batch_size": 4,
            "calibration.shard_size": 4,  # two shards: the second is merged into the first's totals
            "tracking.artifact_root": str(root / "artifacts"),
            **overrides,
        }
    )
    model = stages.model_manifest(params)
    slimset = stages.run_slimset(params, root / "slimset", model=model)
    stats = stages.run_calibrate(params, model, slimset, str(root / "stats.zarr"), progress=False)
    influence = stages.run_influence(params, model, stats, root / "influence")
    plan = stages.run_plan(params, model, influence, root / "plan")
    compressed = stages.run_compress(params, model, stats, influence, plan, root / "compress")
    return params, model, stats, plan, compressed


def _weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(folder, "pipeline").glob("*/diffusion_pytorch_model.safetensors"))
    files = [f for f in files if f.parent.name in ("unet", "transformer")]
    assert len(files) == 1, files
    return load_file(files[0])


@pytest.mark.slow
@pytest.mark.parametrize("source", ["toy", "toy-mmdit"])
def test_bounded_run_gives_the_unbounded_plan_and_weights(tmp_path, source):
    from tasks.store import CovarianceStore

    _, _, stats_a, plan_a, comp_a = _stage_run(
        tmp_path / "unbounded", source, **{"calibration.max_memory": None}
    )
    store_a = CovarianceStore.open(stats_a.uri)
    limit = store_a.attrs["memory_plan"]["largest_statistic"]["bytes"]  # the tightest limit there is
    _, _, stats_b, plan_b, comp_b = _stage_run(
        tmp_path / "bounded", source, **{"calibration.max_memory": limit}
    )
    store_b = CovarianceStore.open(stats_b.uri)
    assert store_a.attrs["memory_plan"]["passes"] == 1 and store_b.attrs["memory_plan"]["passes"] >= 3
    assert store_b.n_shards == 2 and store_b.generation()[0] >= 1  # merged, one generation kept
    assert stats_a.digest == stats_b.digest  # the same shard digests: the same bits
    assert plan_a.meta["plan_digest"] == plan_b.meta["plan_digest"]
    wa, wb = _weights(comp_a.uri), _weights(comp_b.uri)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_float32_accumulated_run_gives_the_same_plan_and_the_same_model(tmp_path):
    """float32 accumulation (flush every 16 products): the statistics move by <= 15 * 2^-24 ~ 9e-7
    relative, which leaves the rank plan of the toy UNet unchanged. Single weights are not a fair
    comparison: where two singular values nearly tie, the SVD may return rotated (or sign-flipped)
    singular vectors for a 1e-7 perturbation, changing to_v / to_out rows without changing their
    product (measured: one to_v differs by 1.9x its largest entry). So the compressed denoisers are
    compared by what they compute: outputs within 1e-5 relative (measured 1.8e-7)."""
    from slimdiff.formats.models import load_pipeline
    from slimdiff.planning.plan import RankPlan

    _, _, _, plan_a, comp_a = _stage_run(tmp_path / "f64", "toy", **{"calibration.accumulate": "float64"})
    _, _, _, plan_b, comp_b = _stage_run(
        tmp_path / "f32", "toy", **{"calibration.accumulate": "float32", "calibration.flush_every": 16}
    )
    ranks_a = RankPlan.load(Path(plan_a.uri) / "rank_plan.json").ranks()
    ranks_b = RankPlan.load(Path(plan_b.uri) / "rank_plan.json").ranks()
    assert ranks_a == ranks_b
    unet_a = load_pipeline(str(Path(comp_a.uri) / "pipeline")).unet
    unet_b = load_pipeline(str(Path(comp_b.uri) / "pipeline")).unet
    g = torch.Generator().manual_seed(0)
    cfg = unet_a.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    text = torch.randn(2, 8, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        out_a = unet_a(x, 500, text).sample
        out_b = unet_b(x, 500, text).sample
    assert ((out_a - out_b).norm() / out_a.norm()).item() <= 1e-5


def test_auto_limit_leaves_the_weights_out_of_what_is_available(monkeypatch):
    """Weights loaded from safetensors are memory-mapped: "available" still counts them until the
    sampler touches them, so auto takes half of (available - weights)."""
    from slimdiff.core import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 20 * 2**30)
    plan = plan_stats_memory([("a", (64, 64))], 5, max_memory="auto", reserved_bytes=14 * 2**30)
    assert plan.max_memory == 3 * 2**30  # 0.5 * (20 - 14) GiB
    assert memory.resolve_limit("auto", "cpu", reserved_bytes=30 * 2**30) == 1  # never zero or negative
    assert memory.resolve_limit("2GiB", "cpu", reserved_bytes=30 * 2**30) == 2 * 2**30  # explicit: as given


def test_pipeline_bytes_counts_every_component(tiny_pipe):
    from slimdiff.calibration.collect import module_bytes, pipeline_bytes

    want = sum(module_bytes(m) for m in (tiny_pipe.unet, tiny_pipe.text_encoder, tiny_pipe.vae))
    assert pipeline_bytes(tiny_pipe) == want > module_bytes(tiny_pipe.unet)
