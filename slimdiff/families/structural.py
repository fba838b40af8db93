"""Families made of standard parts: denoisers recognised by the parts of their blocks, not by their
class names, so a family built from diffusers' stock modules needs no file of its own.

``FluxBlocksAdapter`` is the FLUX.1 adapter (``flux.FluxAdapter``) with one thing changed: which
modules are blocks. FLUX.1's adapter takes ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``
by class; this one takes any module made of the same parts, whatever the block's class is called:

* **double block**: ``attn`` is a verified attention (``verified_attention``: diffusers'
  ``FluxAttention`` run by ``FluxAttnProcessor``, or a copy of that pair checked line by line to
  compute the same function) with two token streams (``added_kv_proj_dim``, not ``pre_only``:
  ``to_q/to_k/to_v``, ``add_q/k/v_proj``, ``to_out.0``, ``to_add_out``, per-head
  ``norm_q/norm_k/norm_added_q/norm_added_k``), run by its verified processor (or a processor
  declaring ``slimdiff_supported``: a compressed model's), and ``ff`` / ``ff_context`` are diffusers
  ``FeedForward``s with an elementwise activation (GELU, GELU-tanh, ``ApproximateGELU``,
  ``LinearActivation``) or a gated one (GEGLU, SwiGLU: ``proj`` rows [hidden | gate]);
* **single block**: ``attn`` is a ``pre_only`` verified attention with its processor, next to an
  MLP ``proj_mlp`` -> ``nn.GELU`` ``act_mlp`` and one ``proj_out`` over [attention | MLP].

The processor fixes what the attention computes (the [text; image] order, the per-head norms,
RoPE on adjacent pairs after the norms, the split into two output projections), so the FLUX
adapter's units, QK pair selection, ``SlimFluxAttnProcessor`` and loading apply unchanged. The
model around the blocks must be FLUX.1's too, read from the model itself: rotary tables from its
``pos_embed`` (diffusers' ``FluxPosEmbed`` or a verified copy of it, with FLUX's position ids:
text at 0, latent patches at (0, row, column)), a forward taking ``hidden_states,
encoder_hidden_states, timestep, img_ids, txt_ids`` (``pooled_projections`` and ``guidance`` where
the model has them, nothing else without a default), every attention module inside a recognised
block. The pipeline is read from the pipeline: classifier-free guidance from its ``__call__`` (an
embedded guidance scale, ``true_cfg_scale`` as FluxPipeline, or ``guidance_scale`` with the
branch count its own ``do_classifier_free_guidance`` gives) and the text length from its one
tokenizer and its ``max_sequence_length`` default. The transformer is assumed to get ``t / 1000``
as FLUX's pipelines pass it, except for the models in ``SAMPLER_TIMESTEP`` (their pipelines pass
the sampler's ``t`` and the model does not rescale it); the statistics collector checks every call
against the sampler's schedule and raises if the convention does not hold.

**Verified copies** (``verified_attention``, ``verified_rotary``; each pair has a test running
the stock blocks against FluxAttnProcessor and the FLUX path, tests/test_structural.py):
``BriaAttention`` / ``BriaAttnProcessor`` split heads as ``(heads, -1)`` instead of ``(-1,
head_dim)`` (the same split: ``inner_dim == heads * head_dim`` in every FLUX-shaped attention,
checked in ``flux_block``) and project the attention outputs without ``.contiguous()`` (the same
values); the projections, per-head RMSNorms, [text; image] concatenation, ``apply_rotary_emb`` on
adjacent pairs, the mask and the output projections are FluxAttnProcessor's. ``BriaEmbedND`` is
FluxPosEmbed's code over its own copy of ``get_1d_rotary_pos_embed`` (the same
``repeat_interleave_real`` branch): the same tables.

Checked and refused (``CHECKED_REFUSED``: the attention pair computes FluxAttnProcessor's
function, but something else differs, named in the refusal): Bria-Fibo, LongCat-Image and
Ovis-Image. Also refused, naming the block type and the part that differs (``near_miss``): any
other attention class of a family's own, a fused ``to_qkv``, an unknown processor, another rotary
embedding, other inputs. Community LoRAs in FLUX.1's reference naming are FLUX.1's, not converted
here (diffusers / PEFT keys load).

Supported this way in diffusers 0.42: ``ChromaTransformer2DModel`` (Chroma: FLUX.1's blocks
without their modulation linears, a distilled modulation network outside the blocks, T5 text
only) and ``BriaTransformer2DModel`` (Bria 3.x: FLUX.1's blocks with verified copies of its
attention and rotary embedding, no pooled text vector, T5 text, true classifier-free guidance
batched by BriaPipeline, the sampler's ``t`` unscaled). Chroma's pipeline passes a float 0/1
padding mask that diffusers' processor adds to the logits, so padded T5 tokens stay in every
softmax (down-weighted): they are real inputs of every attention and are counted in the
statistics, as in FLUX.1, which passes no mask.
"""

from __future__ import annotations

import copy
import inspect

from torch import nn

from slimdiff.core.stats import ffn_key
from slimdiff.families.attention import HeadwiseRMSNorm
from slimdiff.families.base import (
    FFNLayout,
    ModelAdapter,
    UnitInfo,
    UnsupportedModelError,
    denoiser_of,
    ffn_unit,
    register_adapter,
    stock_class,
)
from slimdiff.families.flux import FluxAdapter

#: the forward arguments of a FLUX.1-style denoiser (``FluxAdapter.example_inputs`` builds them)
FLUX_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")
FLUX_OPTIONAL_INPUTS = ("pooled_projections", "guidance")


# -- verified copies of FLUX.1's attention -----------------------------------------------------------
def verified_attention() -> dict[type, type]:
    """attention class -> its processor class, for the pairs that compute FluxAttnProcessor's
    function of the same parts (module docstring; one test per pair in tests/test_structural.py)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    pairs = {FluxAttention: FluxAttnProcessor}
    try:
        from diffusers.models.transformers.transformer_bria import BriaAttention, BriaAttnProcessor
    except ImportError:  # a diffusers without Bria
        return pairs
    pairs[BriaAttention] = BriaAttnProcessor
    return pairs


def verified_rotary() -> tuple[type, ...]:
    """The rotary embeddings that compute FluxPosEmbed's tables (FluxPosEmbed and verified copies)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    try:
        from diffusers.models.transformers.transformer_bria import BriaEmbedND
    except ImportError:
        return (FluxPosEmbed,)
    return FluxPosEmbed, BriaEmbedND


def sampler_timestep(cls: type) -> bool:
    """Whether denoisers of ``cls`` get the sampler's ``t`` itself rather than ``t / 1000``
    (``SAMPLER_TIMESTEP``: BriaPipeline passes ``t`` unscaled, and BriaTransformer2DModel's
    forward feeds it to its timestep embedding as it is)."""
    return any(c.__name__ in SAMPLER_TIMESTEP and c.__module__.startswith("diffusers.") for c in cls.__mro__)


#: diffusers denoiser classes whose pipelines pass the sampler's timestep unscaled
SAMPLER_TIMESTEP = frozenset({"BriaTransformer2DModel"})

#: FLUX-shaped attention classes whose pair computes FluxAttnProcessor's function, checked line by
#: line, but whose family differs elsewhere -> what differs (diffusers 0.42)
CHECKED_REFUSED = {
    "BriaFiboAttention": (
        "Bria-Fibo's forward splices per-block text-encoder layers (text_encoder_layers, projected by "
        "caption_projection) into the text stream before every block, and its single blocks run "
        "diffusers' legacy Attention on tokens concatenated outside the block"
    ),
    "LongCatImageAttention": (
        "LongCat-Image's position ids are not FLUX.1's (text on a diagonal (0, i, i), latent patches "
        "at (1, 512 + row, 512 + column)), so FLUX.1's rotary statistics do not hold, and its "
        "pipeline has no max_sequence_length and rewrites prompts with its text encoder by default"
    ),
    "OvisImageAttention": (
        "Ovis-Image's single blocks have a gated MLP (SiLU over the second half of a 2x-wide "
        "proj_mlp, not FLUX.1's GELU), its text position ids are (0, i, i), not FLUX.1's zeros, and "
        "its pipeline decides guidance in a local variable (no do_classifier_free_guidance)"
    ),
}


# -- standard parts ---------------------------------------------------------------------------------
def _activation_gated(act: nn.Module) -> bool | None:
    """Whether a diffusers FeedForward activation module is gated (its ``proj`` rows are [hidden |
    gate]); None when it is not one this recognises."""
    from diffusers.models.activations import GEGLU, GELU, ApproximateGELU, LinearActivation, SwiGLU

    if type(act) in (GEGLU, SwiGLU):
        return True
    if type(act) in (GELU, ApproximateGELU, LinearActivation):
        return False
    return None


def feedforward_problem(ff: nn.Module | None) -> str | None:
    """Why ``ff`` is not a diffusers ``FeedForward`` this recognises (None: it is)."""
    from diffusers.models.attention import FeedForward

    if type(ff) is not FeedForward:
        return f"is {type(ff).__name__}, not diffusers' FeedForward"
    act = ff.net[0]
    if _activation_gated(act) is None or not isinstance(getattr(act, "proj", None), nn.Linear):
        return f"has activation {type(act).__name__} (GELU, ApproximateGELU, LinearActivation, GEGLU, SwiGLU known)"
    rest = [m for m in list(ff.net)[1:] if not isinstance(m, nn.Dropout | nn.Identity)]
    if len(rest) != 1 or not isinstance(rest[0], nn.Linear):
        return f"has {[type(m).__name__ for m in rest]} after its activation (one nn.Linear expected)"
    return None


def feedforward_unit(model: nn.Module, block: str, name: str) -> UnitInfo:
    """The FFN unit of the diffusers ``FeedForward`` at ``{block}.{name}`` (``ff``: image stream,
    statistic ``ffn_key(block)``; ``ff_context``: text stream, ``{block}.ff_context.hidden``)."""
    path = f"{block}.{name}"
    ff = model.get_submodule(path)
    problem = feedforward_problem(ff)
    if problem:
        raise UnsupportedModelError(f"{path} {problem}")
    out = next(i for i in range(len(ff.net) - 1, 0, -1) if isinstance(ff.net[i], nn.Linear))
    key = ffn_key(block) if name == "ff" else f"{path}.hidden"
    layout = FFNLayout(
        f"{path}.net.0.proj",
        f"{path}.net.{out}",
        bool(_activation_gated(ff.net[0])),
        key,
        "image" if name == "ff" else "text",
    )
    return ffn_unit(model, path, block, layout)


def _norm_ok(norm: nn.Module | None) -> bool:
    # stock per-head RMSNorm, or what RMSNorm-aware selection made of it in a compressed model
    return type(norm).__name__ == "RMSNorm" or isinstance(norm, HeadwiseRMSNorm)


def _linears(mod: nn.Module, names: tuple[str, ...]) -> list[str]:
    """The names among ``names`` that are not an ``nn.Linear`` child of ``mod``."""
    return [n for n in names if not isinstance(getattr(mod, n, None), nn.Linear)]


def flux_shaped(module: nn.Module) -> str | None:
    """The kind, "double" / "single", when ``module`` is laid out like a FLUX.1 block (an ``attn`` with q/k/v
    projections and ``ff`` + ``ff_context``, or with ``proj_mlp`` + ``proj_out``), else None.
    Only the layout: ``flux_block`` checks the parts."""
    attn = getattr(module, "attn", None)
    if not isinstance(attn, nn.Module) or not (hasattr(attn, "to_q") or hasattr(attn, "to_qkv")):
        return None
    if hasattr(module, "ff") and hasattr(module, "ff_context"):
        return "double"
    if hasattr(module, "proj_mlp") and hasattr(module, "proj_out"):
        return "single"
    return None


def flux_block(module: nn.Module) -> tuple[str | None, str | None]:
    """(kind, problem) of a module: kind "double" / "single" when it is made of FLUX.1's parts
    (module docstring), problem None; for a FLUX-shaped module that is not, (None, what differs);
    (None, None) for any other module."""
    shape = flux_shaped(module)
    if shape is None:
        return None, None
    attn = module.attn
    proc = type(getattr(attn, "processor", None))
    pairs = verified_attention()
    if type(attn).__name__ in CHECKED_REFUSED:
        return None, (
            f"{CHECKED_REFUSED[type(attn).__name__]} (its attention {type(attn).__name__} / "
            f"{proc.__name__} is checked: it computes FluxAttnProcessor's function)"
        )
    if type(attn) not in pairs:
        return None, (
            f"its attention is {type(attn).__name__} / {proc.__name__}, not diffusers' "
            "FluxAttention / FluxAttnProcessor or a verified copy of them"
        )
    stock = pairs[type(attn)]
    if getattr(attn, "fused_projections", False) or getattr(attn, "to_qkv", None) is not None:
        return None, "its attention has fused to_qkv projections: call unfuse_qkv_projections() first"
    if proc is not stock and getattr(proc, "slimdiff_supported", False) is not True:
        return None, (
            f"its attention processor is {proc.__name__}, not {stock.__name__} "
            f"(set_attn_processor({stock.__name__}()) first)"
        )
    if proc is stock and int(attn.heads) * int(attn.head_dim) != getattr(attn.to_q, "out_features", None):
        # copies split heads as (heads, -1), FluxAttnProcessor as (-1, head_dim): the same split
        # only when the stock width is heads * head_dim (a compressed model runs slimdiff's processor)
        return None, "its attention's to_q is not heads * head_dim wide"
    missing = _linears(attn, ("to_q", "to_k", "to_v"))
    norms = ["norm_q", "norm_k"]
    if shape == "double":
        if attn.pre_only or attn.added_kv_proj_dim is None:
            return None, "its attention has no text-stream projections (added_kv_proj_dim) next to ff_context"
        missing += _linears(attn, ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
        out = getattr(attn, "to_out", None)
        if not (isinstance(out, nn.ModuleList) and out and isinstance(out[0], nn.Linear)):
            missing.append("to_out.0")
        norms += ["norm_added_q", "norm_added_k"]
        for name in ("ff", "ff_context"):
            problem = feedforward_problem(getattr(module, name))
            if problem:
                return None, f"its {name} {problem}"
    else:
        if not attn.pre_only or attn.added_kv_proj_dim is not None:
            return None, "its attention next to proj_mlp is not pre_only (no packed proj_out)"
        missing += _linears(module, ("proj_mlp", "proj_out"))
        if not isinstance(getattr(module, "act_mlp", None), nn.GELU):
            return None, f"its act_mlp is {type(getattr(module, 'act_mlp', None)).__name__}, not nn.GELU"
    if missing:
        return None, f"it has no nn.Linear {', '.join(missing)}"
    bad = [n for n in norms if not _norm_ok(getattr(attn, n, None))]
    if bad:
        return None, f"its q/k norms {', '.join(bad)} are not per-head RMSNorms"
    return shape, None


# -- the adapter ------------------------------------------------------------------------------------
@register_adapter
class FluxBlocksAdapter(FluxAdapter):
    """Any denoiser made of FLUX.1's blocks (module docstring), whatever its class; ``adapter_for``
    returns a copy bound to the model's class (``bound``)."""

    family = "FLUX.1-style blocks, recognised by their parts"
    by_parts = True
    _cls: type | None = None
    _timestep_scale = 1000  # the sampler's t per unit of the transformer's timestep argument

    # -- recognition -----------------------------------------------------------------------------
    def block_kind(self, module: nn.Module) -> str | None:
        return flux_block(module)[0]

    def problem(self, model: nn.Module) -> str | None:
        """Why ``model`` is not a FLUX.1-style denoiser made of standard parts (None: it is)."""
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        blocks: list[str] = []
        for name, mod in model.named_modules():
            kind, problem = flux_block(mod)
            if problem:
                return f"{type(mod).__name__} is FLUX.1-shaped, but {problem}"
            if kind:
                blocks.append(name)
        if not blocks:
            return "it has no FLUX.1-style blocks"
        for name, mod in model.named_modules():
            inside = any(name == b or name.startswith(f"{b}.") for b in blocks)
            if isinstance(mod, AttentionModuleMixin | Attention) and not inside:
                return f"attention {name} ({type(mod).__name__}) is outside its FLUX.1-style blocks"
        if type(getattr(model, "pos_embed", None)) not in verified_rotary():
            kind = type(getattr(model, "pos_embed", None)).__name__
            return f"its rotary embedding pos_embed is {kind}, not diffusers' FluxPosEmbed or a verified copy"
        params = inspect.signature(type(model).forward).parameters
        missing = [p for p in FLUX_INPUTS if p not in params]
        if missing:
            return f"its forward takes no {', '.join(missing)} (FLUX.1's inputs)"
        unknown = [
            n
            for n, p in list(params.items())[1:]
            if p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and n not in (*FLUX_INPUTS, *FLUX_OPTIONAL_INPUTS)
        ]
        if unknown:
            return f"its forward needs {', '.join(unknown)}, which FLUX.1 has no counterpart of"
        config = model.config
        needed = ["in_channels", "joint_attention_dim"]
        needed += ["pooled_projection_dim"] if "pooled_projections" in params else []
        needed += ["guidance_embeds"] if "guidance" in params else []
        absent = [k for k in needed if not hasattr(config, k)]
        if absent:
            return f"its config has no {', '.join(absent)} (the widths of its inputs)"
        return None

    def matches(self, model: nn.Module) -> bool:
        return self.problem(model) is None

    def near_miss(self, model: nn.Module) -> str | None:
        """The problem of a model with at least one FLUX.1-shaped block (None for the others)."""
        if not any(flux_shaped(m) for m in model.modules()):
            return None
        return self.problem(model)

    def bound(self, model: nn.Module) -> ModelAdapter:
        adapter = copy.copy(self)
        adapter._cls = stock_class(model)
        adapter._timestep_scale = 1 if sampler_timestep(adapter._cls) else 1000
        adapter.family = f"FLUX.1-style blocks by structure ({adapter._cls.__name__})"
        return adapter

    def denoiser_class(self) -> type:
        if self._cls is None:  # the registered instance: any class made of the parts
            raise NotImplementedError("bound to a model's class by adapter_for / adapter_for_class")
        return self._cls

    def feedforward(self, model: nn.Module, block: str, name: str) -> UnitInfo:
        return feedforward_unit(model, block, name)

    def check_processors(self, model: nn.Module) -> None:
        """Every block's attention runs the processor verified for its class (``verified_attention``)
        or a slimdiff processor (``slimdiff_supported``)."""
        pairs = verified_attention()
        for name, block, _ in self.blocks(model):
            proc = type(block.attn.processor)
            if (
                proc is not pairs.get(type(block.attn))
                and getattr(proc, "slimdiff_supported", False) is not True
            ):
                raise UnsupportedModelError(
                    f"{name}.attn: unknown attention processor {proc.__name__} for {type(block.attn).__name__}; "
                    "SlimDiff statistics support its verified processor and processors with "
                    "`slimdiff_supported = True`"
                )

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict):
        """The sampler's timestep: ``t / 1000`` rescaled as FLUX.1's, or ``t`` itself for the
        classes in ``SAMPLER_TIMESTEP``."""
        t = ModelAdapter.timestep(self, model, args, kwargs)
        return None if t is None else t * self._timestep_scale

    # -- the pipeline, read from the pipeline -----------------------------------------------------
    def pipeline_kwargs(self, pipe, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """Guidance as the pipeline's ``__call__`` takes it: an embedded scale (``guidance_embeds``:
        one branch), ``true_cfg_scale`` with empty negative prompts (FluxPipeline), or
        ``guidance_scale`` with as many branches as the pipeline's own ``do_classifier_free_guidance``
        gives for it; plus ``max_sequence_length`` = ``text_len`` where that is below the default."""
        params = inspect.signature(type(pipe).__call__).parameters
        model = denoiser_of(pipe)
        cfg_rule = getattr(type(pipe), "do_classifier_free_guidance", None)
        if getattr(model.config, "guidance_embeds", False) and "guidance_scale" in params:
            kwargs, branches = {"guidance_scale": guidance_scale}, 1
        elif "true_cfg_scale" in params:
            kwargs, branches = self.guidance_kwargs(model, guidance_scale, batch)
        elif "guidance_scale" in params and isinstance(cfg_rule, property):
            try:
                two = bool(cfg_rule.fget(_Scale(guidance_scale)))
            except AttributeError as err:
                raise UnsupportedModelError(
                    f"{type(pipe).__name__}.do_classifier_free_guidance reads more than the guidance scale "
                    f"({err}): write a family file that says how its guidance runs"
                ) from err
            kwargs, branches = {"guidance_scale": guidance_scale}, 2 if two else 1
        else:
            raise UnsupportedModelError(
                f"{type(pipe).__name__}: cannot tell how it applies guidance (no guidance_scale with "
                "do_classifier_free_guidance, no true_cfg_scale): write a family file"
            )
        length, default = self.text_len(pipe), params["max_sequence_length"].default
        if length < default:
            kwargs["max_sequence_length"] = length
        return kwargs, branches

    def text_len(self, pipe) -> int:
        """The text tokens the denoiser gets: the pipeline's ``max_sequence_length`` default, or its
        one tokenizer's ``model_max_length`` where that is shorter."""
        params = inspect.signature(type(pipe).__call__).parameters
        default = getattr(params.get("max_sequence_length"), "default", None)
        tokenizers = [getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")]
        tokenizers = [t for t in tokenizers if t is not None]
        if not isinstance(default, int) or len(tokenizers) != 1:
            raise UnsupportedModelError(
                f"{type(pipe).__name__}: the text length is not readable (needs one tokenizer and a "
                f"max_sequence_length default; has {len(tokenizers)} tokenizers): write a family file"
            )
        length = int(getattr(tokenizers[0], "model_max_length", default) or default)
        return min(length, default)

    def convert_lora(self, model, state_dict, *, original_shapes=None):
        """diffusers / PEFT keys only: FLUX.1's reference names (``FluxAdapter.convert_lora``) are
        FLUX.1's, not this family's."""
        return ModelAdapter.convert_lora(self, model, state_dict, original_shapes=original_shapes)


class _Scale:
    """What a pipeline's ``do_classifier_free_guidance`` property reads: the guidance scale."""

    def __init__(self, scale: float):
        self._guidance_scale = scale
