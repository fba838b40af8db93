"""Activation collector: brute-force references, buckets, shards, determinism, hook hygiene, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_unet, transformer_blocks
from torch import nn

from slimdiff.calibration import collect as calibration
from slimdiff.calibration.collect import (
    ActivationCollector,
    bucket_of_step,
    collect_stats,
    gram_upper_fp32_cpu,
    per_head_gram_fp32,
    stat_shapes,
    symmetrise_upper,
    unique_in_order,
)
from slimdiff.core.stats import ATTN_OUT, KEY, QUERY, attn_key, ffn_key, merge
from slimdiff.families.units import UnsupportedModelError

WORDS = [
    *("a", "an", "the", "photo", "of", "cat", "dog", "on", "red", "blue", "green", "table"),
    *("bench", "street", "car", "tree", "man", "woman", "with", "and", "in"),
]
PROMPTS = [
    "a photo of a cat",
    "red car on the street",
    "a dog on a bench",
    "man with a tree",
    "blue table",
    "woman",
]


def make_tiny_pipeline(tmp: Path, seed: int = 0, scheduler: str = "ddim"):
    """A tiny StableDiffusionPipeline built from config: tiny UNet (conftest), one-level VAE (scale
    factor 1, 8x8 latents), one-layer CLIPTextModel and a word-level tokenizer saved to ``tmp``."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=12,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    ).save_pretrained(tmp / "tokenizer")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=12,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    ).eval()
    sched_kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if scheduler == "ddim":
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **sched_kwargs)
    else:
        sched = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **sched_kwargs)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=make_tiny_unet(seed=seed),  # cross_attention_dim 24 = text hidden size
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipe"))


# ---------------------------------------------------------------------------------------------
# Brute-force reference: capture every hooked activation, sum x^T x in float64
# ---------------------------------------------------------------------------------------------
class Capture:
    """Independent capture of the raw activations (with the UNet timestep of each call)."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.records: list[tuple[float | None, str, int, torch.Tensor]] = []  # (t, key, heads, x)
        self.t: float | None = None
        self.handles = []

    def __enter__(self):
        def unet_hook(module, args, kwargs):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            self.t = float(torch.as_tensor(t).flatten()[0])

        self.handles.append(self.unet.register_forward_pre_hook(unet_hook, with_kwargs=True))
        for name, block in transformer_blocks(self.unet):

            def pre(key, heads):
                return lambda m, a: self.records.append((self.t, key, heads, a[0].detach().clone()))

            def post(key, heads):
                return lambda m, a, o: self.records.append((self.t, key, heads, o.detach().clone()))

            self.handles.append(block.ff.net[2].register_forward_pre_hook(pre(ffn_key(name), 0)))
            for which in ("attn1", "attn2"):
                attn = getattr(block, which)
                h = attn.heads
                self.handles.append(attn.to_q.register_forward_hook(post(attn_key(name, which, QUERY), h)))
                self.handles.append(attn.to_k.register_forward_hook(post(attn_key(name, which, KEY), h)))
                self.handles.append(
                    attn.to_out[0].register_forward_pre_hook(pre(attn_key(name, which, ATTN_OUT), h))
                )
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def reference(self, bucket_of_t, n_buckets: int) -> tuple[dict, dict]:
        moments: dict[str, torch.Tensor] = {}
        tokens: dict[str, list[int]] = {}
        for t, key, heads, x in self.records:
            x64 = x.to(torch.float64).reshape(-1, x.shape[-1])  # (M, n)
            if heads:
                xh = x64.reshape(x64.shape[0], heads, -1)  # (M, H, d)
                prod = torch.stack([xh[:, h].T @ xh[:, h] for h in range(heads)])  # (H, d, d)
            else:
                prod = x64.T @ x64
            b = bucket_of_t(t)
            if key not in moments:
                moments[key] = torch.zeros((n_buckets, *prod.shape), dtype=torch.float64)
                tokens[key] = [0] * n_buckets
            moments[key][b] += prod
            tokens[key][b] += x64.shape[0]
        return moments, tokens


def count_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def assert_matches_reference(stats, moments, tokens, rtol=2e-6):
    assert set(stats.moments) == set(moments)
    for key, ref in moments.items():
        assert stats.tokens[key].tolist() == tokens[key], key
        got = stats.moments[key]
        scale = ref.abs().amax().clamp_min(1e-30)
        err = float((got - ref).abs().amax() / scale)
        assert err < rtol, f"{key}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
def test_bucket_of_step_and_unique():
    assert [bucket_of_step(i, 10, 3) for i in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [bucket_of_step(i, 4, 4) for i in range(4)] == [0, 1, 2, 3]
    assert unique_in_order([751, 501, 501, 251, 1]) == [751, 501, 251, 1]
    with pytest.raises(ValueError, match="n_buckets"):
        bucket_of_step(0, 3, 4)


def test_per_head_gram_known_answer():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, -1.0, 2.0]])  # 2 tokens, 2 heads of dim 2
    got = per_head_gram_fp32(x, 2)
    head0 = torch.tensor([[1.0, 2.0], [2.0, 5.0]])  # [1,2]^T[1,2] + [0,1]^T[0,1]
    head1 = torch.tensor([[10.0, 10.0], [10.0, 20.0]])  # [3,4]^T[3,4] + [-1,2]^T[-1,2]
    torch.testing.assert_close(got, torch.stack([head0, head1]), rtol=0, atol=0)


def test_gram_upper_syrk_known_answer():
    torch.manual_seed(0)
    x = torch.randn(2, 37, 11)  # (batch, tokens, n): summed over both leading dims
    ref = x.reshape(-1, 11).double().T @ x.reshape(-1, 11).double()
    got = symmetrise_upper(gram_upper_fp32_cpu(x)).double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    m = torch.tensor([[1.0, 2.0], [99.0, 3.0]])  # the strict lower triangle is ignored
    assert symmetrise_upper(m).tolist() == [[1.0, 2.0], [2.0, 3.0]]


@pytest.mark.parametrize("syrk", [False, True], ids=["gemm", "syrk"])
def test_direct_unet_matches_brute_force(tiny_unet, monkeypatch, syrk):
    """Manual buckets on direct UNet calls: every statistic equals fp64 sum of x^T x, for the GEMM
    path and for the upper-triangle syrk path the CPU uses on wide FFNs (forced here)."""
    if syrk:
        monkeypatch.setattr(calibration, "SYRK_MIN_DIM", 1)
    torch.manual_seed(1)
    inputs = [
        (torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)),
        (torch.randn(3, 4, 8, 8), torch.randn(3, 7, 24)),
    ]
    col = ActivationCollector(tiny_unet, n_buckets=2)
    assert bool(col._upper_only) == syrk
    cap = Capture(tiny_unet)
    with torch.no_grad(), col, cap:
        for b, (sample, ctx) in enumerate(inputs):
            col.bucket = b
            tiny_unet(sample, 10 * b + 5, encoder_hidden_states=ctx)
    stats = col.stats()
    assert {k: tuple(v.shape[1:]) for k, v in stats.moments.items()} == stat_shapes(tiny_unet)
    moments, tokens = cap.reference(lambda t: int(t) // 10, 2)  # t = 5 -> 0, 15 -> 1
    assert_matches_reference(stats, moments, tokens)
    # token counting: self-attention sees image tokens, cross-attention keys the text tokens
    blk = transformer_blocks(tiny_unet)[0][0]
    assert stats.tokens[attn_key(blk, "attn1", KEY)].tolist() == [2 * 64, 3 * 64]
    assert stats.tokens[attn_key(blk, "attn2", KEY)].tolist() == [2 * 5, 3 * 7]
    assert stats.moments[ffn_key(blk)].shape == (2, 128, 128)


def test_muted_records_nothing(tiny_unet):
    col = ActivationCollector(tiny_unet, n_buckets=1)
    with torch.no_grad(), col, col.muted():
        tiny_unet(torch.randn(1, 4, 8, 8), 3, encoder_hidden_states=torch.randn(1, 5, 24))
    stats = col.stats()
    assert all(int(t.sum()) == 0 for t in stats.tokens.values())
    assert all(float(m.abs().sum()) == 0 for m in stats.moments.values())


@pytest.mark.parametrize("scheduler", ["ddim", "pndm"])
def test_pipeline_buckets_match_brute_force(tmp_path, scheduler):
    """The sampler path: buckets from the UNet timestep, both CFG branches, per-bucket references.
    PNDM calls the UNet twice at its second timestep; both calls count in that step's bucket."""
    pipe = make_tiny_pipeline(tmp_path, scheduler=scheduler)
    prompts = PROMPTS[:3]
    cap = Capture(pipe.unet)
    with cap:
        stats = collect_stats(
            pipe,
            prompts,
            num_inference_steps=4,
            guidance_scale=7.5,
            n_buckets=2,
            batch_size=2,
            seed=3,
            progress=False,
        )
    schedule = unique_in_order(pipe.scheduler.timesteps.tolist())
    assert len(schedule) == 4
    moments, tokens = cap.reference(lambda t: bucket_of_step(schedule.index(t), 4, 2), 2)
    assert_matches_reference(stats, moments, tokens)
    calls = [pipe.scheduler.timesteps.tolist().count(t) for t in schedule]  # UNet calls per step
    per_bucket = [calls[0] + calls[1], calls[2] + calls[3]]
    blk = transformer_blocks(pipe.unet)[0][0]
    # 3 prompts x 2 CFG branches x 64 image tokens (8x8 latents) per UNet call
    assert stats.tokens[attn_key(blk, "attn1", QUERY)].tolist() == [c * 3 * 2 * 64 for c in per_bucket]
    assert stats.tokens[attn_key(blk, "attn2", KEY)].tolist() == [c * 3 * 2 * 12 for c in per_bucket]
    assert stats.meta["bucket_timesteps"] == [schedule[:2], schedule[2:]]
    assert len(stats.meta["bucket_alphas_cumprod"][0]) == 2
    assert count_hooks(pipe.unet) == 0


@pytest.mark.parametrize("syrk", [False, True], ids=["gemm", "syrk"])
def test_shard_merge_exact_and_bit_identical_rerun(tiny_pipe, monkeypatch, syrk):
    if syrk:
        monkeypatch.setattr(calibration, "SYRK_MIN_DIM", 1)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, n_buckets=3, batch_size=2, seed=11, progress=False)
    whole = collect_stats(tiny_pipe, PROMPTS[:4], **kw)
    again = collect_stats(tiny_pipe, PROMPTS[:4], **kw)
    shard_a = collect_stats(tiny_pipe, PROMPTS[:2], index_offset=0, **kw)
    shard_b = collect_stats(tiny_pipe, PROMPTS[2:4], index_offset=2, **kw)
    merged = merge([shard_a, shard_b])
    for key in whole.moments:
        assert torch.equal(whole.moments[key], again.moments[key]), key
        assert torch.equal(whole.moments[key], merged.moments[key]), key
        assert torch.equal(whole.tokens[key], merged.tokens[key]), key
    assert {k: v for k, v in merged.meta.items() if k != "merged_shards"} == whole.meta
    # the seed rule matters: a shard that forgot its offset sees other noise
    wrong = collect_stats(tiny_pipe, PROMPTS[2:4], index_offset=0, **kw)
    key = next(iter(whole.moments))
    assert not torch.equal(wrong.moments[key], shard_b.moments[key])


def test_hooks_removed_after_exception(tiny_unet):
    base = count_hooks(tiny_unet)
    col = ActivationCollector(tiny_unet, n_buckets=1)
    with pytest.raises(RuntimeError, match="boom"), col:
        assert count_hooks(tiny_unet) > base
        raise RuntimeError("boom")
    assert count_hooks(tiny_unet) == base
    assert not col.active


def test_refuses_fused_qkv(tiny_unet):
    tiny_unet.fuse_qkv_projections()
    with pytest.raises(UnsupportedModelError, match=r"down_blocks\.0\..*attn1.*fused"):
        ActivationCollector(tiny_unet)


def test_refuses_unknown_processor_and_accepts_flagged(tiny_unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    class MysteryProcessor(AttnProcessor2_0):
        pass

    class CompressedLikeProcessor(AttnProcessor2_0):
        slimdiff_supported = True

    name, block = transformer_blocks(tiny_unet)[-1]
    block.attn2.set_processor(MysteryProcessor())
    with pytest.raises(
        UnsupportedModelError, match=rf"{name}\.attn2: unknown attention processor MysteryProcessor"
    ):
        ActivationCollector(tiny_unet)
    block.attn2.set_processor(CompressedLikeProcessor())
    ActivationCollector(tiny_unet)  # accepted


def test_refuses_processor_swapped_after_construction(tiny_unet):
    col = ActivationCollector(tiny_unet)
    tiny_unet.fuse_qkv_projections()
    with pytest.raises(UnsupportedModelError, match="fused"), col:
        pass
    assert count_hooks(tiny_unet) == 0


def test_refuses_model_without_transformer_blocks():
    from diffusers import UNet2DConditionModel

    with pytest.raises(
        UnsupportedModelError, match="Sequential is not a supported denoiser.*Supported families"
    ):
        ActivationCollector(nn.Sequential(nn.Linear(4, 4)))
    plain = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        norm_num_groups=8,
        layers_per_block=1,
    )
    with pytest.raises(
        UnsupportedModelError, match=r"no diffusers BasicTransformerBlock \(its blocks: .*DownBlock2D"
    ):
        ActivationCollector(plain)


def test_timestep_outside_schedule_is_an_error(tiny_pipe):
    tiny_pipe.scheduler.set_timesteps(4)
    col = ActivationCollector(tiny_pipe.unet, n_buckets=2, scheduler=tiny_pipe.scheduler)
    with torch.no_grad(), col, pytest.raises(RuntimeError, match="not in DDIMScheduler.timesteps"):
        tiny_pipe.unet(torch.randn(1, 4, 8, 8), 333, encoder_hidden_states=torch.randn(1, 12, 24))
    assert count_hooks(tiny_pipe.unet) == 0


def test_pipeline_text_embedder(tiny_pipe):
    from slimdiff.calibration.embedders import PipelineTextEmbedder

    emb = PipelineTextEmbedder(tiny_pipe)
    out = emb.embed(PROMPTS[:3], batch_size=2)
    assert out.shape == (3, 24)
    # pooled output = final-layer-norm hidden state at the first <eos> token
    ids = tiny_pipe.tokenizer(PROMPTS[:3], padding="max_length", max_length=12, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = tiny_pipe.text_encoder(ids).last_hidden_state
    eos = (ids == 3).int().argmax(-1)
    torch.testing.assert_close(out, hidden[torch.arange(3), eos])
    assert emb.id.startswith("pipeline-text-encoder:") and emb.id == PipelineTextEmbedder(tiny_pipe).id
