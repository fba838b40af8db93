"""Families made of standard parts (``slimdiff.families.structural``): Chroma
(``ChromaTransformer2DModel``: FLUX.1's blocks under other class names, built from diffusers'
``FluxAttention`` + ``FluxAttnProcessor`` and ``FeedForward``) is recognised by its parts, with no
family file naming it, and goes through units, statistics, planning, surgery and loading as FLUX.1
does. Tiny transformers and a tiny ``ChromaPipeline`` built from config (random weights, fixed
seeds, nothing downloaded).

Tolerances, from the numerics:
* compressed models against the original in float32: a full-rank rewrite (whitening and its
  inverse, a permutation of whole rotary pairs) and a pair selection that drops only pairs whose
  q/k rows are zero are exact maths, so the bound is float32 rounding through 4 blocks (1e-5
  relative, as for FLUX.1 in test_flux.py);
* a saved and reloaded model runs the same weights through the same kernels: bit-identical;
* token counts and unit counts are integers: exact;
* parameter counts after surgery: exactly the plan's (integers).
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from slimdiff.calibration.collect import ActivationCollector
from slimdiff.families import UnsupportedModelError, adapter_for, adapter_for_class
from slimdiff.families.structural import FluxBlocksAdapter
from slimdiff.families.units import compression_units, count_parameters
from slimdiff.planning.allocation import plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import compress_

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' FluxPosEmbed import notice

LIB = Path(__file__).resolve().parents[1] / "slimdiff"
HW, TEXT = (8, 8), 6  # latent 8x8 -> 16 packed image tokens, 6 text tokens
CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    approximator_num_channels=8,
    approximator_hidden_dim=32,
    approximator_layers=1,
)


def tiny_chroma(seed: int = 0, **config) -> nn.Module:
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(**{**CONFIG, **config}).eval()


def inputs(model, seed: int, batch: int = 2):
    return adapter_for(model).example_inputs(
        model, batch, HW, TEXT, device="cpu", generator=torch.Generator().manual_seed(seed)
    )


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(*x[0], **x[1]).sample


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def covariances(model, n: int = 4) -> dict[str, torch.Tensor]:
    col = ActivationCollector(model, 1)
    with col:
        for i in range(n):
            run(model, inputs(model, 100 + i))
    return col.stats().aggregate([1.0])


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_chroma()
    return model, covariances(model)


def code_names(path: Path) -> set[str]:
    """Identifiers, attribute names, imported names and non-docstring strings of a module."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.alias):
            out.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.add(node.value)
    return out


# -- recognition --------------------------------------------------------------------------------
def test_chroma_is_recognised_by_its_parts_and_no_code_names_it():
    model = tiny_chroma()
    adapter = adapter_for(model)
    assert type(adapter) is FluxBlocksAdapter and adapter.by_parts
    assert adapter.denoiser_class() is type(model)
    assert adapter.family == "FLUX.1-style blocks by structure (ChromaTransformer2DModel)"
    # the loader finds the same adapter from the class name alone (a default-config meta skeleton)
    assert adapter_for_class("ChromaTransformer2DModel").family == adapter.family
    from slimdiff.formats import loading

    assert loading.SlimChromaTransformer2DModel.__mro__[1] is type(model)
    # no module of the library names Chroma in its code (docstrings may)
    for path in LIB.rglob("*.py"):
        assert not [n for n in code_names(path) if "Chroma" in n], path


def test_units_follow_the_config_with_flux_costs():
    model = tiny_chroma()
    units = compression_units(model)
    double, single = CONFIG["num_layers"], CONFIG["num_single_layers"]
    kinds = {n: u.kind for n, u in units.items()}
    assert kinds == {
        **{f"transformer_blocks.{i}.{s}": "ffn" for i in range(double) for s in ("ff", "ff_context")},
        **{f"transformer_blocks.{i}.attn.{k}": k for i in range(double) for k in ("qk", "vo")},
        **{f"single_transformer_blocks.{i}.attn.{k}": k for i in range(single) for k in ("qk", "vo")},
        **{f"single_transformer_blocks.{i}.mlp": "ffn" for i in range(single)},
    }
    counts = {k: sum(v == k for v in kinds.values()) for k in ("ffn", "qk", "vo")}
    assert counts == {"ffn": 2 * double + single, "qk": double + single, "vo": double + single}
    dim = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]  # 32
    heads = CONFIG["num_attention_heads"]
    assert units["transformer_blocks.0.ff"].full_rank == 4 * dim  # FeedForward mult 4
    assert units["transformer_blocks.0.ff"].cost_per_rank == (dim + 1) + dim  # proj_in row + proj_out col
    assert units["single_transformer_blocks.0.attn.vo"].layout.out == (
        "single_transformer_blocks.0.proj_out[0:32]",
    )
    assert units["single_transformer_blocks.0.attn.vo"].cost_per_rank == heads * ((dim + 1) + dim)
    assert units["transformer_blocks.0.attn.qk"].cost_per_rank == heads * 4 * (dim + 1)
    assert units["transformer_blocks.0.attn.qk"].layout.rope
    adapter_for(model).check_processors(model)


# -- compression ---------------------------------------------------------------------------------
def test_full_rank_rewrite_is_exact(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    full = RankPlan.from_ranks(units, {n: u.full_rank for n, u in units.items()})
    slim = copy.deepcopy(model)
    compress_(slim, full, cov, rewrite_full_rank=True)
    x = inputs(model, 3)
    assert rel(run(slim, x), run(model, x)) < 1e-5
    assert slim.transformer_blocks[0].attn.slim_rope_index.shape == (2, 16)


def zero_pairs(model: nn.Module, dropped: dict[int, list[int]], d: int = 16) -> nn.Module:
    """Zero the q/k rows (weights and biases) of the given rotary pairs of every head in every
    attention: those pairs carry no logit, so a selection that drops exactly them is exact."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not name.endswith("attn"):
                continue
            for lin in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                layer = getattr(mod, lin, None)
                for h, pairs in dropped.items():
                    for p in pairs if layer is not None else ():
                        rows = slice(h * d + 2 * p, h * d + 2 * p + 2)
                        layer.weight[rows] = 0.0
                        layer.bias[rows] = 0.0
    return model


def test_pair_selection_known_answer():
    """q/k rows of pairs {1, 4, 6} (head 0) and {0, 2, 7} (head 1) zeroed: a QK rank of 10 (5 of 8
    pairs) must keep exactly the other pairs, and the compressed model equals the original."""
    model = zero_pairs(tiny_chroma(seed=3), {0: [1, 4, 6], 1: [0, 2, 7]})
    cov = covariances(model)
    units = compression_units(model)
    ranks = {n: (10 if u.kind == "qk" else u.full_rank) for n, u in units.items()}
    slim = copy.deepcopy(model)
    compress_(slim, RankPlan.from_ranks(units, ranks), cov)
    for path in ("transformer_blocks.0.attn", "single_transformer_blocks.1.attn"):
        idx = slim.get_submodule(path).slim_rope_index
        assert idx[0].tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 14, 15], path
        assert idx[1].tolist() == [2, 3, 6, 7, 8, 9, 10, 11, 12, 13], path
    x = inputs(model, 5)
    assert rel(run(slim, x), run(model, x)) < 1e-5


def planned(model, cov) -> RankPlan:
    units = compression_units(model)
    plan = plan_ranks(
        None, units, Budget(removed_fraction=0.4), r_min=4, multiple=2,
        profiles=error_profiles(model, cov, units),
    )  # fmt: skip
    # random weights: the error plan may leave the QKs whole; narrow them, so rotary tables narrow too
    ranks = {n: (8 if units[n].kind == "qk" else p.rank) for n, p in plan.units.items()}
    return RankPlan.from_ranks(units, ranks)


def test_parameters_after_compression_are_the_plans(calibrated):
    model, cov = calibrated
    units = compression_units(model)
    plan = planned(model, cov)
    assert {p.kind for p in plan.compressed_units().values()} == {"ffn", "qk", "vo"}
    slim = copy.deepcopy(model)
    compress_(slim, plan, cov)
    removed = sum((p.full_rank - p.rank) * units[n].cost_per_rank for n, p in plan.units.items())
    assert count_parameters(model) - count_parameters(slim) == removed > 0
    assert adapter_for(slim).family == adapter_for(model).family  # still recognised, compressed


def test_flops_of_the_compressed_model_are_the_plans(calibrated):
    """The FLOP counter rebuilds the stock skeleton from the bound adapter's class: the uncompressed
    count is the per-unit costs' total and the compressed model's is the plan's (integers: exact)."""
    from slimdiff.planning.flops import ServingShape, denoiser_flops, unit_flop_costs

    model, cov = calibrated
    costs = unit_flop_costs(model, ServingShape(HW, batch=2, text_len=TEXT))
    assert costs.total == denoiser_flops(model, 2, HW, TEXT).total
    plan = planned(model, cov)
    slim = copy.deepcopy(model)
    compress_(slim, plan, cov)
    ranks = {n: p.rank for n, p in plan.units.items()}
    assert denoiser_flops(slim, 2, HW, TEXT).total == costs.plan_flops(ranks) < costs.total


def test_slim_class_saves_and_loads_bit_identical(calibrated, tmp_path):
    """save_compressed writes the Slim class's save_pretrained folder (plus the slimdiff.json
    sidecar); ``SlimChromaTransformer2DModel.from_pretrained`` (slimdiff.formats.loading) rebuilds
    the narrowed skeleton from config.json and loads it: the same outputs, bit for bit."""
    from slimdiff.formats.io import save_compressed
    from slimdiff.formats.loading import SlimChromaTransformer2DModel

    model, cov = calibrated
    plan = planned(model, cov)
    slim = copy.deepcopy(model)
    compress_(slim, plan, cov)
    save_compressed(slim, tmp_path / "chroma")
    assert type(slim) is SlimChromaTransformer2DModel  # save_compressed made it the Slim class
    loaded = SlimChromaTransformer2DModel.from_pretrained(tmp_path / "chroma")
    assert loaded.slimdiff_plan == plan
    assert loaded.state_dict().keys() == slim.state_dict().keys()
    x = inputs(model, 4)
    assert torch.equal(run(loaded, x), run(slim, x))


def test_a_swiglu_feedforward_is_a_standard_part_too():
    """Standard parts other than FLUX.1's: a SwiGLU ``FeedForward`` (rows [hidden | gate] of one
    proj) is a gated unit; a full-rank rewrite of the model that has it is exact."""
    from diffusers.models.attention import FeedForward

    model = tiny_chroma(seed=1)
    torch.manual_seed(1)
    model.transformer_blocks[1].ff_context = FeedForward(32, dim_out=32, activation_fn="swiglu").eval()
    units = compression_units(model)
    ffn = units["transformer_blocks.1.ff_context"]
    assert ffn.layout.gated and ffn.full_rank == 128 and ffn.cost_per_rank == 2 * 33 + 32
    cov = covariances(model)
    slim = copy.deepcopy(model)
    compress_(
        slim,
        RankPlan.from_ranks(units, {n: u.full_rank for n, u in units.items()}),
        cov,
        rewrite_full_rank=True,
    )
    x = inputs(model, 6)
    assert rel(run(slim, x), run(model, x)) < 1e-5


# -- refusals --------------------------------------------------------------------------------------
def test_fused_projections_are_refused_naming_the_block_type():
    model = tiny_chroma()
    model.fuse_qkv_projections()
    with pytest.raises(UnsupportedModelError, match=r"ChromaTransformerBlock is FLUX.1-shaped.*unfuse_qkv"):
        adapter_for(model)


def test_an_unknown_processor_is_refused_naming_the_block_type():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class LoggingFluxProcessor(FluxAttnProcessor):  # same maths, but not a processor slimdiff knows
        pass

    model = tiny_chroma()
    model.single_transformer_blocks[1].attn.set_processor(LoggingFluxProcessor())
    with pytest.raises(UnsupportedModelError) as err:
        adapter_for(model)
    message = str(err.value)
    assert "ChromaSingleTransformerBlock is FLUX.1-shaped" in message
    assert "LoggingFluxProcessor" in message


def test_flux_copies_with_their_own_attention_and_class_conditioned_dits_are_refused():
    """Bria copies FluxAttention and its processor into classes of its own: refused, naming the
    block type and its attention. DiT's BasicTransformerBlocks are standard parts, but it is
    class-conditioned: calibration drives prompts, so it is refused with that reason."""
    from diffusers import BriaTransformer2DModel, DiTTransformer2DModel

    with torch.device("meta"):
        bria, dit = BriaTransformer2DModel(num_layers=1, num_single_layers=1), DiTTransformer2DModel()
    with pytest.raises(UnsupportedModelError, match=r"BriaTransformerBlock is FLUX.1-shaped.*BriaAttention"):
        adapter_for(bria)
    with pytest.raises(UnsupportedModelError, match=r"BasicTransformerBlock.*no text states"):
        adapter_for(dit)
    with pytest.raises(UnsupportedModelError, match="BriaTransformer2DModel"):
        adapter_for_class("BriaTransformer2DModel")


# -- through ChromaPipeline: its own sampler, guidance, text length, save and load ---------------
CHROMA_TEXT_LEN = 16  # the T5 tokenizer's model_max_length (ChromaPipeline's default: 512)
CHROMA_HW = 16  # px; one-level VAE: 16x16 latents, 8x8 = 64 packed image tokens


def tiny_chroma_pipeline(tmp: Path, seed: int = 0):
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
    from family_pipelines import WORDS, tiny_vae, word_tokenizer
    from transformers import T5Config, T5EncoderModel

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
    tokenizer = word_tokenizer(
        tmp / "tokenizer", CHROMA_TEXT_LEN, specials, bos=None, eos="</s>", pad="<pad>", unk="<unk>"
    )
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(specials) + len(WORDS), d_model=CONFIG["joint_attention_dim"], d_kv=8, d_ff=32,
            num_layers=1, num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    ).eval()  # fmt: skip
    vae = tiny_vae(
        1, seed, latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_chroma(seed, in_channels=64),  # 16 latent channels in 2x2 patches
    )


def test_pipeline_statistics_compression_and_loading(tmp_path):
    """Statistics come from ChromaPipeline's own sampler: the guidance rule is read from the
    pipeline (``guidance_scale`` > 1: two branches, by its own ``do_classifier_free_guidance``), the
    text length from its one tokenizer (16, below the default 512, passed as ``max_sequence_length``),
    buckets from the flow-matching schedule (the transformer gets t / 1000). The compressed pipeline
    saves and loads with ``DiffusionPipeline.from_pretrained`` to identical latents."""
    from diffusers import DiffusionPipeline
    from family_pipelines import PROMPTS

    from slimdiff.calibration.collect import collect_stats
    from slimdiff.formats.io import save_compressed
    from slimdiff.planning.influence import compute_influence

    pipe = tiny_chroma_pipeline(tmp_path / "build")
    adapter = adapter_for(pipe.transformer)
    assert adapter.text_len(pipe) == CHROMA_TEXT_LEN
    assert adapter.pipeline_kwargs(pipe, 4.0, 2) == (
        {"guidance_scale": 4.0, "max_sequence_length": CHROMA_TEXT_LEN},
        2,
    )
    assert adapter.pipeline_kwargs(pipe, 1.0, 2)[1] == 1
    steps, prompts = 4, PROMPTS[:2]
    stats = collect_stats(
        pipe, prompts, num_inference_steps=steps, guidance_scale=4.0, n_buckets=2, batch_size=2,
        height=CHROMA_HW, width=CHROMA_HW, progress=False,
    )  # fmt: skip
    assert stats.meta["cfg_branches"] == 2 and stats.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    n_img, n_text, calls = (CHROMA_HW // 2) ** 2, CHROMA_TEXT_LEN, len(prompts) * 2
    assert (
        stats.tokens["transformer_blocks.0.attn.query"].tolist()
        == [steps // 2 * calls * (n_img + n_text)] * 2
    )
    assert int(stats.tokens["transformer_blocks.0.ff.hidden"].sum()) == steps * calls * n_img
    assert int(stats.tokens["transformer_blocks.0.ff_context.hidden"].sum()) == steps * calls * n_text
    model = pipe.transformer
    influence = compute_influence(stats, model)
    cov = influence.aggregate(stats)
    plan = planned(model, cov)
    compress_(model, plan, cov)
    save_compressed(pipe, tmp_path / "slim")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert type(loaded).__name__ == "ChromaPipeline"
    assert type(loaded.transformer).__name__ == "SlimChromaTransformer2DModel"
    assert loaded.transformer.slimdiff_plan == plan
    for tensor in loaded.transformer.state_dict().values():  # fresh allocations, as the original's
        tensor.data = tensor.data.clone()
    kw = dict(
        num_inference_steps=2, height=CHROMA_HW, width=CHROMA_HW, output_type="latent",
        max_sequence_length=CHROMA_TEXT_LEN, guidance_scale=4.0,
    )  # fmt: skip
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
    a = pipe(PROMPTS[2], generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded(PROMPTS[2], generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)
