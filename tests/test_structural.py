"""Families made of standard parts (``slimdiff.families.structural``): Chroma
(``ChromaTransformer2DModel``: FLUX.1's blocks under other class names, built from diffusers'
``FluxAttention`` + ``FluxAttnProcessor`` and ``FeedForward``) and Bria (``BriaTransformer2DModel``:
the same blocks with verified copies of FluxAttention, its processor and FluxPosEmbed) are
recognised by their parts, with no family file, and go through units, statistics, planning,
surgery and loading as FLUX.1 does. Every verified attention copy is run against
FluxAttnProcessor and the FLUX path. Tiny transformers and tiny ``ChromaPipeline`` /
``BriaPipeline``s built from config (random weights, fixed seeds, nothing downloaded).

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
)
#: each family's denoiser class and its own config entries (Chroma's modulation network)
FAMILIES = {
    "chroma": (
        "ChromaTransformer2DModel",
        dict(approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1),
    ),
    "bria": ("BriaTransformer2DModel", {}),
}


def tiny(family: str, seed: int = 0, **config) -> nn.Module:
    import diffusers

    name, own = FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(diffusers, name)(**{**CONFIG, **own, **config}).eval()


def tiny_chroma(seed: int = 0, **config) -> nn.Module:
    return tiny("chroma", seed, **config)


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


@pytest.fixture(scope="module", params=list(FAMILIES))
def calibrated(request):
    model = tiny(request.param)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_units_follow_the_config_with_flux_costs(family):
    model = tiny(family)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_selection_known_answer(family):
    """q/k rows of pairs {1, 4, 6} (head 0) and {0, 2, 7} (head 1) zeroed: a QK rank of 10 (5 of 8
    pairs) must keep exactly the other pairs, and the compressed model equals the original."""
    model = zero_pairs(tiny(family, seed=3), {0: [1, 4, 6], 1: [0, 2, 7]})
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
    sidecar); ``SlimChromaTransformer2DModel.from_pretrained`` / ``SlimBriaTransformer2DModel``
    (slimdiff.formats.loading) rebuilds the narrowed skeleton from config.json and loads it: the
    same outputs, bit for bit."""
    from slimdiff.formats import loading
    from slimdiff.formats.io import save_compressed

    model, cov = calibrated
    slim_cls = getattr(loading, f"Slim{type(model).__name__}")
    plan = planned(model, cov)
    slim = copy.deepcopy(model)
    compress_(slim, plan, cov)
    save_compressed(slim, tmp_path / "slim")
    assert type(slim) is slim_cls  # save_compressed made it the Slim class
    loaded = slim_cls.from_pretrained(tmp_path / "slim")
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


def test_an_unverified_flux_copy_and_class_conditioned_dits_are_refused():
    """A copy of FluxAttention under a class slimdiff has not verified is refused, naming the block
    type and its attention; so is the verified pair with a processor of another class. DiT's
    BasicTransformerBlocks are standard parts, but it is class-conditioned: calibration drives
    prompts, so it is refused with that reason."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.transformers.transformer_bria import BriaAttention, BriaAttnProcessor
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class MyAttention(BriaAttention):  # same code, but not a class slimdiff has checked
        pass

    model = tiny("bria")
    old = model.transformer_blocks[1].attn
    model.transformer_blocks[1].attn = MyAttention(32, heads=2, dim_head=16, added_kv_proj_dim=32, bias=True)
    with pytest.raises(
        UnsupportedModelError, match=r"BriaTransformerBlock is FLUX.1-shaped.*MyAttention / BriaAttnProcessor"
    ):
        adapter_for(model)
    model.transformer_blocks[1].attn = old
    old.processor = FluxAttnProcessor()  # same maths, but not the pair that was verified
    with pytest.raises(UnsupportedModelError, match=r"processor is FluxAttnProcessor, not BriaAttnProcessor"):
        adapter_for(model)
    old.processor = BriaAttnProcessor()
    assert adapter_for(model).by_parts
    with torch.device("meta"):
        dit = DiTTransformer2DModel()
    with pytest.raises(UnsupportedModelError, match=r"BasicTransformerBlock.*no text states"):
        adapter_for(dit)


# -- through ChromaPipeline / BriaPipeline: own sampler, guidance, text length, save and load ----
PIPE_TEXT_LEN = 16  # the T5 tokenizer's model_max_length (defaults: ChromaPipeline 512, BriaPipeline 128)
PIPE_HW = 16  # px; one-level VAE: 16x16 latents, 8x8 = 64 packed image tokens


def tiny_pipeline(family: str, tmp: Path, seed: int = 0):
    """A tiny ChromaPipeline / BriaPipeline: T5 text (a word tokenizer of 16 tokens), a one-level
    VAE with FLUX's 16 latent channels, the flow-matching Euler sampler."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from family_pipelines import WORDS, tiny_vae, word_tokenizer
    from transformers import T5Config, T5EncoderModel

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
    tokenizer = word_tokenizer(
        tmp / "tokenizer", PIPE_TEXT_LEN, specials, bos=None, eos="</s>", pad="<pad>", unk="<unk>"
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
    return getattr(diffusers, f"{FAMILIES[family][0][: -len('Transformer2DModel')]}Pipeline")(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny(family, seed, in_channels=64),  # 16 latent channels in 2x2 patches
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_statistics_compression_and_loading(family, tmp_path):
    """Statistics come from ChromaPipeline's / BriaPipeline's own sampler: the guidance rule is read
    from the pipeline (``guidance_scale`` > 1: two branches, by its own
    ``do_classifier_free_guidance``), the text length from its one tokenizer (16, below the
    defaults 512 / 128, passed as ``max_sequence_length``), buckets from the flow-matching schedule
    (Chroma's transformer gets t / 1000, Bria's t itself: a wrong convention would raise in the
    collector). The compressed pipeline saves and loads with ``DiffusionPipeline.from_pretrained``
    to identical latents."""
    from diffusers import DiffusionPipeline
    from family_pipelines import PROMPTS

    from slimdiff.calibration.collect import collect_stats
    from slimdiff.formats.io import save_compressed
    from slimdiff.planning.influence import compute_influence

    pipe = tiny_pipeline(family, tmp_path / "build")
    adapter = adapter_for(pipe.transformer)
    assert adapter.text_len(pipe) == PIPE_TEXT_LEN
    assert adapter.pipeline_kwargs(pipe, 4.0, 2) == (
        {"guidance_scale": 4.0, "max_sequence_length": PIPE_TEXT_LEN},
        2,
    )
    assert adapter.pipeline_kwargs(pipe, 1.0, 2)[1] == 1
    steps, prompts = 4, PROMPTS[:2]
    stats = collect_stats(
        pipe, prompts, num_inference_steps=steps, guidance_scale=4.0, n_buckets=2, batch_size=2,
        height=PIPE_HW, width=PIPE_HW, progress=False,
    )  # fmt: skip
    assert stats.meta["cfg_branches"] == 2 and stats.meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    n_img, n_text, calls = (PIPE_HW // 2) ** 2, PIPE_TEXT_LEN, len(prompts) * 2
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
    assert type(loaded).__name__ == type(pipe).__name__
    assert type(loaded.transformer).__name__ == f"Slim{FAMILIES[family][0]}"
    assert loaded.transformer.slimdiff_plan == plan
    for tensor in loaded.transformer.state_dict().values():  # fresh allocations, as the original's
        tensor.data = tensor.data.clone()
    kw = dict(
        num_inference_steps=2, height=PIPE_HW, width=PIPE_HW, output_type="latent",
        max_sequence_length=PIPE_TEXT_LEN, guidance_scale=4.0,
    )  # fmt: skip
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
    a = pipe(PROMPTS[2], generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded(PROMPTS[2], generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)


# -- verified copies of FluxAttention -------------------------------------------------------------
def _attention_copies():
    from diffusers.models.transformers import (
        transformer_bria,
        transformer_bria_fibo,
        transformer_flux,
        transformer_longcat_image,
        transformer_ovis_image,
    )

    return {
        "Flux": (transformer_flux.FluxAttention, transformer_flux.FluxAttnProcessor),
        "Bria": (transformer_bria.BriaAttention, transformer_bria.BriaAttnProcessor),
        "BriaFibo": (transformer_bria_fibo.BriaFiboAttention, transformer_bria_fibo.BriaFiboAttnProcessor),
        "LongCatImage": (
            transformer_longcat_image.LongCatImageAttention,
            transformer_longcat_image.LongCatImageAttnProcessor,
        ),
        "OvisImage": (
            transformer_ovis_image.OvisImageAttention,
            transformer_ovis_image.OvisImageAttnProcessor,
        ),
    }


@pytest.mark.parametrize("single", [False, True], ids=["double", "single"])
@pytest.mark.parametrize("name", ["Flux", "Bria", "BriaFibo", "LongCatImage", "OvisImage"])
def test_attention_copies_compute_flux_attention(name, single):
    """Each copy of FluxAttention + its processor (random weights, norm gains and biases; FLUX's
    rotary tables; with and without a padding mask) gives the same outputs as diffusers'
    FluxAttnProcessor and slimdiff's SlimFluxAttnProcessor on the same module: fp32 rounding only
    (1e-5 relative). Bria's pair is in the allow-list on this evidence; the others are refused for
    what differs outside the attention (structural.CHECKED_REFUSED)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxPosEmbed

    from slimdiff.families.attention import SlimFluxAttnProcessor
    from slimdiff.families.structural import CHECKED_REFUSED, verified_attention

    attn_cls, proc_cls = _attention_copies()[name]
    assert (verified_attention().get(attn_cls) is proc_cls) == (name in ("Flux", "Bria"))
    assert (attn_cls.__name__ in CHECKED_REFUSED) == (name not in ("Flux", "Bria"))
    torch.manual_seed(7)
    kw = dict(pre_only=True) if single else dict(added_kv_proj_dim=32)
    attn = attn_cls(
        32, heads=2, dim_head=16, out_dim=32, bias=True, eps=1e-6, processor=proc_cls(), **kw
    ).eval()
    with torch.no_grad():
        for mod in attn.modules():
            if isinstance(mod, nn.RMSNorm) and mod.weight is not None:
                mod.weight.uniform_(0.5, 1.5)
    img = torch.randn(2, 16, 32)
    text = torch.randn(2, TEXT, 32)
    img_ids, txt_ids = FluxBlocksAdapter().position_ids(HW, TEXT)
    rope = FluxPosEmbed(10000, [4, 6, 6])(torch.cat([txt_ids, img_ids]))
    args = (torch.cat([text, img], 1), None) if single else (img, text)
    keep = torch.ones(2, TEXT + 16, dtype=torch.bool)
    keep[0, 3:TEXT] = False  # padded text tokens of sample 0
    mask = torch.zeros(2, 1, 1, TEXT + 16).masked_fill(~keep[:, None, None], float("-inf"))
    for m in (None, mask):
        outs = []
        for proc in (proc_cls(), FluxAttnProcessor(), SlimFluxAttnProcessor(scale=16**-0.5)):
            attn.processor = proc
            with torch.no_grad():
                out = attn(*args, attention_mask=m, image_rotary_emb=rope)
            outs.append(torch.cat(out, 1) if isinstance(out, tuple) else out)
        assert rel(outs[1], outs[0]) <= 1e-5 and rel(outs[2], outs[0]) <= 1e-5, name


def test_bria_rotary_embedding_is_fluxs():
    """BriaEmbedND (its own copy of FluxPosEmbed and get_1d_rotary_pos_embed) gives FluxPosEmbed's
    tables on FLUX's position ids: the same arithmetic, bit for bit."""
    from diffusers.models.transformers.transformer_bria import BriaEmbedND
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    img_ids, txt_ids = FluxBlocksAdapter().position_ids((32, 48), 20)
    ids = torch.cat([txt_ids, img_ids])
    for a, b in zip(
        BriaEmbedND(10000, [16, 56, 56])(ids), FluxPosEmbed(10000, [16, 56, 56])(ids), strict=True
    ):
        assert torch.equal(a, b)


def test_bria_blocks_run_as_the_flux_path():
    """The stock BriaTransformer2DModel against the same model with every attention run by the FLUX
    path (SlimFluxAttnProcessor at full rank, weights untouched): fp32 rounding (1e-5 relative)."""
    from slimdiff.families.attention import SlimFluxAttnProcessor

    model = tiny("bria", seed=2)
    flux_path = copy.deepcopy(model)
    for name, mod in flux_path.named_modules():
        if name.endswith(".attn"):
            mod.processor = SlimFluxAttnProcessor(scale=mod.head_dim**-0.5)
    x = inputs(model, 8)
    assert rel(run(flux_path, x), run(model, x)) <= 1e-5


def test_bria_is_recognised_by_its_parts_and_gets_the_samplers_timestep():
    model = tiny("bria")
    adapter = adapter_for(model)
    assert type(adapter) is FluxBlocksAdapter and adapter.by_parts
    assert adapter.family == "FLUX.1-style blocks by structure (BriaTransformer2DModel)"
    assert adapter_for_class("BriaTransformer2DModel").family == adapter.family
    from slimdiff.formats import loading

    assert loading.SlimBriaTransformer2DModel.__mro__[1] is type(model)
    t = torch.full((2,), 750.0)  # BriaPipeline passes the sampler's t; Chroma's passes t / 1000
    assert torch.equal(adapter.timestep(model, (), {"timestep": t}), t)
    chroma = tiny_chroma()
    assert torch.equal(adapter_for(chroma).timestep(chroma, (), {"timestep": t / 1000}), t)
    assert "pooled_projections" not in inputs(model, 0)[1]  # Bria's config has no pooled width


@pytest.mark.parametrize(
    "name, differs",
    [
        (
            "BriaFiboTransformer2DModel",
            r"BriaFiboTransformerBlock is FLUX.1-shaped, but .*text_encoder_layers",
        ),
        (
            "LongCatImageTransformer2DModel",
            r"LongCatImageTransformerBlock is FLUX.1-shaped, but .*position ids",
        ),
        ("OvisImageTransformer2DModel", r"OvisImageTransformerBlock is FLUX.1-shaped, but .*gated MLP"),
        (
            "HunyuanImageTransformer2DModel",
            r"HunyuanImage\w*Block is FLUX.1-shaped, but its attention is Attention",
        ),
    ],
)
def test_checked_flux_copies_that_differ_elsewhere_are_refused(name, differs):
    """Their attention pairs compute FluxAttnProcessor's function (above), but the families differ
    elsewhere: one message names the block type and what differs."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, name)(num_layers=1, num_single_layers=1)
    with pytest.raises(UnsupportedModelError, match=differs):
        adapter_for(model)
    with pytest.raises(UnsupportedModelError, match=name):
        adapter_for_class(name)
