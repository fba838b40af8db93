"""LoRA-aware calibration (issue 24): ``slimdiff.formats.lora.collect_stats_with_loras`` and
``slimdiff.slim(..., loras=[...])`` on a tiny SD-shaped pipeline built from config.

(a) without LoRAs the statistics are ``collect_stats``' bit for bit; (b) with LoRAs they are the
base run plus a run on a copy of the pipeline whose weights were fused by hand (float64 sum of the
same products: asserted to 1e-12 relative, they come out bit-equal); (c) the pipeline's weights
are bit-identical afterwards, also when a LoRA run fails; (d) known answer: a LoRA that only feeds
FFN neurons the base prompts leave at exactly zero gets those neurons kept by the compressed FFN,
so its projected effect survives, while base-only calibration drops every one of them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import transformer_blocks
from test_calib_collector import PROMPTS, make_tiny_pipeline

from slimdiff.calibration.collect import collect_stats
from slimdiff.config import Params
from slimdiff.formats.lora import collect_stats_with_loras, lora_digest

OPTIONS = {"num_inference_steps": 4, "n_buckets": 2, "batch_size": 6, "seed": 0, "progress": False}
SCALE = 0.7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe = make_tiny_pipeline(tmp_path_factory.mktemp("tiny_lora_cal"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def all_weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.detach().clone()
        for name in ("unet", "text_encoder", "vae")
        for k, v in getattr(pipe, name).state_dict().items()
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, changed[:5]


def random_lora(pipe, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rank-2 LoRA (diffusers/PEFT keys) on attention, FFN and one text-encoder linear."""
    g = torch.Generator().manual_seed(seed)
    block = transformer_blocks(pipe.unet)[0][0]
    targets = {
        "unet": [f"{block}.{s}" for s in ("attn1.to_q", "attn2.to_k", "ff.net.0.proj", "ff.net.2")],
        "text_encoder": [  # with or without a text_model level, as this transformers names it
            next(n for n, _ in pipe.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
        ],
    }
    out = {}
    for comp, paths in targets.items():
        for path in paths:
            lin = getattr(pipe, comp).get_submodule(path)
            out[f"{comp}.{path}.lora_A.weight"] = 0.3 * torch.randn(2, lin.in_features, generator=g)
            out[f"{comp}.{path}.lora_B.weight"] = 0.3 * torch.randn(lin.out_features, 2, generator=g)
    return out


def fused_by_hand(pipe, lora: dict[str, torch.Tensor], scale: float):
    """A copy of ``pipe`` (own UNet and text encoder) with ``W += scale * B A`` (float64, rounded once)."""
    other = copy.copy(pipe)
    other.unet, other.text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        for key, a in lora.items():
            if not key.endswith("lora_A.weight"):
                continue
            comp, path = key.removesuffix(".lora_A.weight").split(".", 1)
            b = lora[key.replace("lora_A", "lora_B")]
            layer = getattr(other, comp).get_submodule(path)
            new = layer.weight.double() + scale * (b.double() @ a.double())
            layer.weight.copy_(new.to(layer.weight.dtype))
    return other


def test_no_loras_is_collect_stats_bit_for_bit(tiny):
    ref = collect_stats(tiny, PROMPTS, **OPTIONS)
    got = collect_stats_with_loras(tiny, PROMPTS, [], **OPTIONS)
    assert got.keys() == ref.keys() and got.n_buckets == ref.n_buckets
    for k in ref.moments:
        assert torch.equal(got.moments[k], ref.moments[k]), k
        assert torch.equal(got.tokens[k], ref.tokens[k]), k
    assert got.meta == ref.meta


def test_lora_runs_add_the_statistics_of_the_fused_pipeline_and_leave_it_unchanged(tiny):
    lora = random_lora(tiny)
    before = all_weights(tiny)
    base = collect_stats(tiny, PROMPTS, **OPTIONS)
    by_hand = collect_stats(fused_by_hand(tiny, lora, SCALE), PROMPTS, **OPTIONS)
    got = collect_stats_with_loras(tiny, PROMPTS, [lora], lora_scale=SCALE, **OPTIONS)
    assert_same(all_weights(tiny), before)  # (c): every component bit for bit
    assert got.keys() == base.keys()
    moved = 0
    for k in base.moments:
        # float64 sums of identical float32 products: one addition apart, 1e-12 relative bounds it
        torch.testing.assert_close(got.moments[k], base.moments[k] + by_hand.moments[k], rtol=1e-12, atol=0)
        assert torch.equal(got.tokens[k], base.tokens[k] + by_hand.tokens[k]), k
        moved += not torch.equal(by_hand.moments[k], base.moments[k])
    assert moved > len(base.keys()) // 2  # the LoRA really changed what the runs saw
    assert got.meta["loras"] == [{"sha256": lora_digest(lora), "scale": SCALE}]
    assert got.meta["lora_runs"] == 1 and got.meta["timesteps"] == base.meta["timesteps"]


def test_a_failing_lora_run_still_restores_the_weights(tiny, monkeypatch, tmp_path):
    from safetensors.torch import save_file

    import slimdiff.formats.lora as lora_module  # the module whose collect_stats the LoRA runs call

    path = tmp_path / "lora.safetensors"
    save_file(random_lora(tiny, seed=1), str(path))
    before = all_weights(tiny)
    block = transformer_blocks(tiny.unet)[0][0]
    key = f"unet.{block}.ff.net.0.proj.weight"
    real, fused = lora_module.collect_stats, []

    def flaky(*args, **kwargs):
        fused.append(not torch.equal(tiny.unet.get_submodule(key[5:-7]).weight, before[key]))
        if len(fused) == 2:  # the LoRA run
            raise RuntimeError("sampling failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_module, "collect_stats", flaky)
    with pytest.raises(RuntimeError, match="sampling failed"):
        collect_stats_with_loras(tiny, PROMPTS, [path], **OPTIONS)
    assert fused == [False, True]  # the base run, then the run with the LoRA fused
    assert_same(all_weights(tiny), before)


def test_a_lora_for_another_model_fails_before_sampling(tiny, monkeypatch):
    import slimdiff.formats.lora as lora_module  # the module whose collect_stats the LoRA runs call
    from slimdiff.families.base import LoraError

    monkeypatch.setattr(lora_module, "collect_stats", lambda *a, **k: pytest.fail("sampled"))
    block = transformer_blocks(tiny.unet)[0][0]
    bad = {
        f"unet.{block}.attn1.to_q.lora_A.weight": torch.zeros(2, 7),
        f"unet.{block}.attn1.to_q.lora_B.weight": torch.zeros(32, 2),
    }
    with pytest.raises(LoraError, match="attn1.to_q"):
        collect_stats_with_loras(tiny, PROMPTS, [bad], **OPTIONS)


# -- (d) known answer ---------------------------------------------------------------------------
DEAD = torch.tensor([3, 17, 40, 41, 77, 90, 101, 127])  # FFN neurons the base model never uses


@pytest.fixture(scope="module")
def dead_neurons(tmp_path_factory):
    """A tiny pipeline whose first FFN has neurons ``DEAD`` at exactly zero for every input (their
    GEGLU rows, both halves, and biases zeroed), and a LoRA that writes only into those rows."""
    pipe = make_tiny_pipeline(tmp_path_factory.mktemp("tiny_dead"), seed=3)
    pipe.set_progress_bar_config(disable=True)
    block = transformer_blocks(pipe.unet)[0][0]
    proj = pipe.unet.get_submodule(f"{block}.ff.net.0.proj")
    inner = proj.out_features // 2
    rows = torch.cat([DEAD, DEAD + inner])
    with torch.no_grad():
        proj.weight[rows] = 0.0
        proj.bias[rows] = 0.0
    g = torch.Generator().manual_seed(5)
    b = torch.zeros(proj.out_features, 2)
    b[rows] = torch.randn(len(rows), 2, generator=g)
    lora = {
        f"unet.{block}.ff.net.0.proj.lora_A.weight": torch.randn(2, proj.in_features, generator=g),
        f"unet.{block}.ff.net.0.proj.lora_B.weight": b,
    }
    return pipe, {k: v.clone() for k, v in pipe.unet.state_dict().items()}, block, lora


def test_lora_aware_calibration_keeps_the_neurons_only_the_lora_uses(dead_neurons):
    from slimdiff.api import slim
    from slimdiff.formats.lora import load_lora_into, maps_of

    pipe, original, block, lora = dead_neurons
    params = Params().with_overrides(
        {
            "calibration.num_inference_steps": 4,
            "calibration.n_buckets": 2,
            "calibration.batch_size": 6,
            "allocation.modules": ["ffn"],
            "allocation.mode": "uniform",
        }
    )

    def fresh():
        p = copy.copy(pipe)
        p.unet = copy.deepcopy(pipe.unet)
        p.unet.load_state_dict(original)
        return p

    # the neurons are idle without the LoRA: their hidden second moment is exactly zero
    stats = collect_stats(fresh(), PROMPTS, **OPTIONS)
    hidden = stats.moments[f"{block}.ff.hidden"].sum(0)
    assert float(hidden[DEAD][:, DEAD].abs().max()) == 0.0 and float(hidden.diagonal().max()) > 0

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    text = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(10))
    t = torch.tensor([500, 500])

    def effect(p) -> torch.Tensor:
        """What the LoRA adds to the UNet's output (projected when ``p`` is compressed)."""
        with torch.no_grad():
            plain = p.unet(latents, t, text).sample
            handle = load_lora_into(p, lora, method="fuse")
            with_lora = p.unet(latents, t, text).sample
            handle.unfuse()
        return with_lora - plain

    reference = effect(fresh())
    with torch.no_grad():
        plain = fresh().unet(latents, t, text).sample
    assert float(reference.norm()) > 0.1 * float(plain.norm())  # a visible effect
    results = {}
    for name, loras in (("base", []), ("aware", [lora])):
        p = fresh()
        before = {k: v.clone() for k, v in p.text_encoder.state_dict().items()}
        slim_pipe, report = slim(p, PROMPTS, params=params, budget=0.5, progress=False, loras=loras)
        assert_same(before, p.text_encoder.state_dict())
        index = maps_of(slim_pipe.unet).layers[f"{block}.ff.net.0.proj"].tensors["index"]
        kept = set(index.tolist())
        inner = slim_pipe.unet.get_submodule(f"{block}.ff.net.2").in_features
        err = float((effect(slim_pipe) - reference).norm() / reference.norm())
        results[name] = (kept, inner, err)
    dead = set(DEAD.tolist())
    base_kept, base_inner, base_err = results["base"]
    aware_kept, aware_inner, aware_err = results["aware"]
    assert base_inner == aware_inner < 128 - len(dead)  # the same budget, DEAD cannot all be kept by size
    assert not (dead & base_kept)  # base-only calibration drops every neuron the LoRA uses ...
    assert base_err == pytest.approx(1.0, abs=1e-6)  # ... so the projected LoRA does nothing
    assert dead <= aware_kept  # LoRA-aware calibration keeps all of them ...
    assert aware_err < 0.25, results  # ... and the projected LoRA's effect survives
    print(f"inner {aware_inner} of 128; effect error base {base_err:.3f}, aware {aware_err:.3f}")


def test_slim_store_identity_names_the_loras(dead_neurons, tmp_path):
    """A statistics folder records the LoRAs (sha256, scale): the same call reuses it, a call
    without them (or with another scale) is refused instead of reusing LoRA-aware statistics."""
    from slimdiff.api import slim

    pipe, original, _block, lora = dead_neurons
    params = Params().with_overrides(
        {"calibration.num_inference_steps": 4, "calibration.n_buckets": 2, "calibration.batch_size": 6}
    )

    def fresh():
        p = copy.copy(pipe)
        p.unet = copy.deepcopy(pipe.unet)
        p.unet.load_state_dict(original)
        return p

    store = tmp_path / "stats"
    kw = {"params": params, "budget": 0.3, "store": store, "progress": False}
    first = slim(fresh(), PROMPTS, loras=[lora], **kw)[1]
    assert not first.reused_statistics
    again = slim(fresh(), PROMPTS, loras=[lora], **kw)[1]
    assert again.reused_statistics and again.plan.digest == first.plan.digest
    with pytest.raises(ValueError, match="differing: loras"):
        slim(fresh(), PROMPTS, **kw)
    with pytest.raises(ValueError, match="differing: loras"):
        slim(fresh(), PROMPTS, loras=[lora], lora_scale=0.5, **kw)
    with pytest.raises(ValueError, match="differing: loras"):  # the LoRA run's prompts are part of it
        slim(fresh(), PROMPTS, loras=[lora], lora_prompts=PROMPTS[:2], **kw)
