"""FLUX.1: ``FluxTransformer2DModel`` built from double-stream ``FluxTransformerBlock``s and
single-stream ``FluxSingleTransformerBlock``s (diffusers ``transformer_flux.py``).

What differs from the SD3 MMDiT (see docs/METHOD.md, "FLUX and RoPE"):

* **Rotary position embeddings on q and k**, after the per-head RMSNorms, on the concatenated
  [text; image] tokens (text first, the reverse of SD3). RoPE rotates coordinate pairs (2i, 2i+1)
  of every head by position-dependent angles, so a QK unit is compressed by keeping whole pairs,
  the same pairs in q and k (``linalg.rope_pair_selection``); the rotary tables are narrowed per
  head to the kept pairs at run time (``attention.SlimFluxAttnProcessor``).
* **Double blocks**: joint attention with two streams' projections (``to_q/k/v`` image,
  ``add_q/k/v_proj`` text, ``to_out.0`` / ``to_add_out``), FFNs ``ff`` and ``ff_context``
  (GELU-tanh), as in MMDiT.
* **Single blocks**: one stream; the attention has no output projection (``pre_only``) and runs in
  parallel with an MLP (``proj_mlp``, GELU-tanh); ``proj_out`` consumes ``cat([attention output,
  MLP hidden])``. The VO unit is ``to_v``'s rows with the first ``dim`` columns of ``proj_out``,
  the FFN unit is ``proj_mlp``'s rows with the remaining columns (``base.packed_path``): a
  compressed block still runs one ``proj_out`` matmul over the two narrowed parts.
* The transformer is called with ``timestep = t / 1000``; the sampler's schedule is in [0, 1000].

Community LoRAs (kohya sd-scripts, ai-toolkit, ComfyUI) name the reference implementation's
layers ("BFL" names: ``double_blocks.{i}.img_attn.qkv``, ``single_blocks.{i}.linear1``, ...) with
fused q|k|v (and q|k|v|MLP) rows; ``FluxAdapter.convert_lora`` renames and splits them into the
diffusers layers at the widths of the model at hand (``BFL_DOUBLE`` / ``BFL_SINGLE`` /
``BFL_GLOBAL``), so ``slimdiff.formats.lora.project_lora`` accepts them directly.

Refused: fused ``to_qkv`` projections (``fuse_qkv_projections()``: unfuse first), processors other
than ``FluxAttnProcessor`` (IP-Adapter), FLUX.2 blocks.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping

import torch
from torch import nn

from slimdiff.families.attention import SlimFluxAttnProcessor
from slimdiff.families.base import (
    AttentionLayout,
    FFNLayout,
    LoraError,
    ModelAdapter,
    UnitInfo,
    UnsupportedModelError,
    attention_stat_keys,
    attention_units,
    ffn_unit,
    packed_path,
    randn,
    register_adapter,
    require_processor,
)
from slimdiff.families.mmdit import CONTEXT_FFN, _ffn

#: text tokens the FLUX pipelines give the transformer by default (``max_sequence_length``)
FLUX_TEXT_LEN = 512


def _check_norms(model: nn.Module, paths: list[str]) -> None:
    for path in paths:
        mod = model.get_submodule(path)
        if type(mod).__name__ != "RMSNorm":
            raise UnsupportedModelError(
                f"{path}: qk norm {type(mod).__name__} is not supported (RMSNorm only)"
            )


def _attention(model: nn.Module, block: str, single: bool) -> list[UnitInfo]:
    path = f"{block}.attn"
    attn = model.get_submodule(path)
    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv"):
        raise UnsupportedModelError(
            f"{path}: fused to_qkv projections are not supported; call unfuse_qkv_projections() first"
        )
    heads, head_dim = int(attn.heads), int(attn.head_dim)
    query, key, value = [f"{path}.to_q"], [f"{path}.to_k"], [f"{path}.to_v"]
    norms_q, norms_k = [f"{path}.norm_q"], [f"{path}.norm_k"]
    text: list[str] = []
    if single:
        # the attention output is the first heads * head_dim inputs of the block's proj_out
        out = [packed_path(f"{block}.proj_out", 0, heads * head_dim)]
    else:
        out = [f"{path}.to_out.0", f"{path}.to_add_out"]
        query.append(f"{path}.add_q_proj")
        key.append(f"{path}.add_k_proj")
        value.append(f"{path}.add_v_proj")
        norms_q.append(f"{path}.norm_added_q")
        norms_k.append(f"{path}.norm_added_k")
        text = [f"{path}.add_q_proj", f"{path}.add_k_proj", f"{path}.add_v_proj", f"{path}.to_add_out"]
    _check_norms(model, norms_q + norms_k)
    layout = AttentionLayout(
        module=path,
        heads=heads,
        head_dim=head_dim,
        query=tuple(query),
        key=tuple(key),
        value=tuple(value),
        out=tuple(out),
        **attention_stat_keys(block, "attn"),
        norms_q=tuple(norms_q),
        norms_k=tuple(norms_k),
        text_linears=tuple(text),
        norms_head_major=False,
        rope=True,
    )
    return attention_units(model, block, "attn", layout)


def _single_ffn(model: nn.Module, block: str) -> UnitInfo:
    mod = model.get_submodule(block)
    inner = mod.proj_mlp.out_features
    if not (
        isinstance(mod.act_mlp, nn.GELU) and mod.proj_out.in_features == mod.attn.to_v.out_features + inner
    ):
        raise UnsupportedModelError(
            f"{block}: expected proj_out over [attention output | GELU(proj_mlp)], got proj_out with "
            f"{mod.proj_out.in_features} inputs and {type(mod.act_mlp).__name__}"
        )
    # the MLP hidden is the LAST `inner` inputs of proj_out (counted from the end, so the address
    # holds after the attention part is narrowed)
    layout = FFNLayout(
        f"{block}.proj_mlp", packed_path(f"{block}.proj_out", -inner), False, f"{block}.mlp.hidden", "image"
    )
    return ffn_unit(model, f"{block}.mlp", block, layout)


# -- community LoRA formats ------------------------------------------------------------------------
#: BFL block linears (kohya's underscored module names, without ``lora_unet_`` and the block index)
#: -> the diffusers linears they are, relative to the block. A fused linear lists its parts in the
#: order of its output rows (``qkv``: q | k | v; ``linear1``: q | k | v | MLP hidden): diffusers'
#: own checkpoint converter (``convert_flux_transformer_checkpoint_to_diffusers``) splits the base
#: weights in this order. ``mod.lin`` / ``modulation.lin`` are copied there unchanged: BFL's
#: Modulation chunks (shift, scale, gate)[x2] and AdaLayerNormZero / AdaLayerNormZeroSingle chunk
#: the same way, so their rows need no reordering.
BFL_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
BFL_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
#: BFL linears outside the blocks -> diffusers paths
BFL_GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
#: BFL's final layer emits (shift, scale), diffusers' AdaLayerNormContinuous reads (scale, shift):
#: the two halves of the output rows (of B) swap, as in diffusers' ``swap_scale_shift``
BFL_SWAPPED = frozenset({"final_layer_adaLN_modulation_1"})
_BFL_ROOTS = (
    "double_blocks_",
    "single_blocks_",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "final_layer",
)
_BFL_KEY = re.compile(
    r"^(?P<mod>.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$"
)
_BFL_ROLE = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "alpha": "alpha",
}


def _bfl_key(key: str) -> tuple[str, str | None] | None:
    """(underscored BFL module name, role "down" / "up" / "alpha" or None when unknown) of a key in
    a BFL-named format: ``lora_unet_<bfl_name>.<role>`` (kohya, ai-toolkit) or
    ``[model.]diffusion_model.<bfl.dotted.name>.<role>`` (ComfyUI); None for any other key."""
    if key.startswith("lora_unet_"):
        rest, dotted = key[len("lora_unet_") :], False
    elif key.startswith(("diffusion_model.", "model.diffusion_model.")):
        rest, dotted = key.split("diffusion_model.", 1)[1], True
    else:
        return None
    m = _BFL_KEY.match(rest)
    mod = (m["mod"] if m else rest.split(".", 1)[0]).replace(".", "_")
    if not dotted and not mod.startswith(_BFL_ROOTS):
        return None  # a kohya name of a diffusers module (lora_unet_transformer_blocks_0_...)
    return mod, (_BFL_ROLE[m["role"]] if m else None)


def _bfl_targets(mod: str) -> tuple[list[str], bool] | None:
    """(diffusers paths of the BFL linear ``mod``, its output rows split in this order; whether
    the rows swap halves), or None for a name that is not a FLUX.1 linear."""
    m = re.fullmatch(r"double_blocks_(\d+)_(.+)", mod)
    if m and m[2] in BFL_DOUBLE:
        return [f"transformer_blocks.{int(m[1])}.{p}" for p in BFL_DOUBLE[m[2]]], False
    m = re.fullmatch(r"single_blocks_(\d+)_(.+)", mod)
    if m and m[2] in BFL_SINGLE:
        return [f"single_transformer_blocks.{int(m[1])}.{p}" for p in BFL_SINGLE[m[2]]], False
    if mod in BFL_GLOBAL:
        return [BFL_GLOBAL[mod]], mod in BFL_SWAPPED
    return None


def convert_bfl_lora(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    prefix: str = "transformer",
    original_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> Mapping[str, torch.Tensor]:
    """``FluxAdapter.convert_lora``: BFL-named keys -> ``<prefix>.<diffusers path>.lora_A.weight`` /
    ``lora_B.weight`` / ``alpha``; every other key unchanged (the same dict when there are none).

    A fused linear's delta ``B A`` is split by the rows of ``B`` at the widths of the diffusers
    layers (``original_shapes`` for layers the model holds narrowed, else the layer's own
    ``out_features``): part p gets ``B[rows_p]`` and the whole ``A`` (``(B A)[rows_p] = B[rows_p]
    A``, exact; rank and ``alpha`` unchanged, so the scale alpha / rank is the same for every part).
    diffusers' converter instead folds the scale into the factors and, for a B that is block-sparse
    by part, chunks A; the deltas are the same. Raises LoraError naming the keys that are not
    FLUX.1 linears, miss a factor, name a block the model does not have, do not fit the widths,
    or collide with another key for the same layer."""

    shapes = dict(original_shapes or {})
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    found = False
    for key, value in state_dict.items():
        parsed = _bfl_key(key)
        if parsed is None:
            out[key] = value
            continue
        found = True
        mod, role = parsed
        if role is None:
            unknown.append(key)
        else:
            groups.setdefault(mod, {})[role] = (key, value)
    if not found:
        return state_dict

    modules = dict(model.named_modules())

    def out_features(path: str) -> int:
        if path in shapes:
            return int(shapes[path][0])
        layer = modules[path]
        layer = getattr(layer, "base_layer", layer)  # under a peft wrapper
        return int(layer.weight.shape[0])

    problems: list[str] = []
    for mod, parts in groups.items():
        keys = sorted(k for k, _ in parts.values())
        resolved = _bfl_targets(mod)
        if resolved is None:
            unknown += keys
            continue
        paths, swap = resolved
        if "down" not in parts or "up" not in parts:
            what = {"down": "lora_down (A)", "up": "lora_up (B)", "alpha": "alpha"}
            have = " and ".join(what[r] for r in ("down", "up", "alpha") if r in parts)
            problems.append(f"{', '.join(keys)}: {have} without lora_down / lora_up both present")
            continue
        missing = [p for p in paths if p not in modules]
        if missing:
            problems.append(
                f"{parts['down'][0]}: names {missing[0]!r}, which this {type(model).__name__} does not have "
                f"({len(getattr(model, 'transformer_blocks', []))} double and "
                f"{len(getattr(model, 'single_transformer_blocks', []))} single blocks)"
            )
            continue
        down, up = parts["down"][1], parts["up"][1]
        widths = [out_features(p) for p in paths]
        if up.dim() < 2 or up.shape[0] != sum(widths):
            names = " | ".join(f"{p} ({w})" for p, w in zip(paths, widths, strict=True))
            problems.append(
                f"{parts['up'][0]}: {up.shape[0] if up.dim() else 0} output rows, but {names} "
                f"{'have' if len(paths) > 1 else 'has'} {sum(widths)} (a LoRA for another FLUX width?)"
            )
            continue
        if swap:
            if up.shape[0] % 2:
                problems.append(
                    f"{parts['up'][0]}: odd number of rows {up.shape[0]} for (shift, scale) halves"
                )
                continue
            shift, scale = up.chunk(2, dim=0)
            up = torch.cat([scale, shift], dim=0)
        ups = torch.split(up, widths, dim=0) if len(paths) > 1 else (up,)
        for path, b in zip(paths, ups, strict=True):
            new = {
                f"{prefix}.{path}.lora_A.weight": down.clone() if len(paths) > 1 else down,
                f"{prefix}.{path}.lora_B.weight": b.clone() if len(paths) > 1 else b,
            }
            if "alpha" in parts:
                new[f"{prefix}.{path}.alpha"] = parts["alpha"][1]
            clash = [k for k in new if k in out]
            if clash:
                problems.append(
                    f"{parts['down'][0]}: {clash[0]} is also in the LoRA (two formats for one layer)"
                )
                continue
            out.update(new)
    if unknown:
        problems.insert(
            0,
            f"{', '.join(sorted(unknown)[:6])}{' ...' if len(unknown) > 6 else ''}: not a FLUX.1 "
            "linear this converter knows (BFL names: double_blocks.N.{img,txt}_{attn_qkv,attn_proj,"
            "mlp_0,mlp_2,mod_lin}, single_blocks.N.{linear1,linear2,modulation_lin}, img_in, txt_in, "
            "time_in, vector_in, guidance_in, final_layer; roles lora_down/lora_up/lora_A/lora_B/alpha)",
        )
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:4])})" if len(problems) > 1 else ""
        raise LoraError(f"cannot convert this FLUX LoRA: {problems[0]}{more}")
    return out


@register_adapter
class FluxAdapter(ModelAdapter):
    family = "FLUX.1 (FluxTransformer2DModel)"
    pipeline_attr = "transformer"
    denoiser_name = "FluxTransformer2DModel"

    def block_kind(self, module: nn.Module) -> str | None:
        """The kind of a block: "double" (``FluxTransformerBlock``), "single" (``FluxSingleTransformerBlock``)
        or None.
        Everything else this adapter does goes through ``blocks``, so an adapter that recognises
        the same blocks by their parts (``structural.FluxBlocksAdapter``) overrides only this."""
        from diffusers.models.transformers.transformer_flux import (
            FluxSingleTransformerBlock,
            FluxTransformerBlock,
        )

        if isinstance(module, FluxTransformerBlock):
            return "double"
        if isinstance(module, FluxSingleTransformerBlock):
            return "single"
        return None

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
        out = []
        for name, mod in model.named_modules():
            kind = self.block_kind(mod)
            if kind is not None:
                out.append((name, mod, kind == "single"))
        if not out:
            raise UnsupportedModelError(f"{type(model).__name__} has no FLUX transformer blocks")
        return out

    def feedforward(self, model: nn.Module, block: str, name: str) -> UnitInfo:
        """The unit of a double block's ``ff`` / ``ff_context`` (FLUX.1's: GELU-tanh FeedForwards)."""
        return _ffn(model, block, name)

    def units(self, model: nn.Module) -> dict[str, UnitInfo]:
        units: list[UnitInfo] = []
        for name, _, single in self.blocks(model):
            if single:
                units += _attention(model, name, True)
                units.append(_single_ffn(model, name))
            else:
                units.append(self.feedforward(model, name, "ff"))
                units.append(self.feedforward(model, name, CONTEXT_FFN))
                units += _attention(model, name, False)
        return {u.name: u for u in units}

    def check_processors(self, model: nn.Module) -> None:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        for name, block, _ in self.blocks(model):
            require_processor(f"{name}.attn", block.attn, FluxAttnProcessor)

    def processor(self, attn: nn.Module, layout: AttentionLayout):

        return SlimFluxAttnProcessor(scale=layout.head_dim**-0.5)

    def guidance_kwargs(self, model: nn.Module, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """FLUX.1-dev-style models (``guidance_embeds``) take the scale as an input embedding: one
        branch. Others (schnell, the toy FLUX) get FluxPipeline's true classifier-free guidance,
        ``true_cfg_scale`` with an empty negative prompt per sample, when the scale is above 1."""
        if getattr(model.config, "guidance_embeds", False):
            return {"guidance_scale": guidance_scale}, 1
        if guidance_scale > 1.0:
            return {"true_cfg_scale": guidance_scale, "negative_prompt": [""] * batch}, 2
        return {}, 1

    def pipeline_kwargs(self, pipe, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """``guidance_kwargs`` plus ``max_sequence_length`` = the T5 tokenizer's length where it is
        below FluxPipeline's default 512 (a model trained on shorter captions, like the toy FLUX):
        calibration, evaluation and FLOP counts then see the text length the model runs at."""
        kwargs, branches = super().pipeline_kwargs(pipe, guidance_scale, batch)
        length = self.text_len(pipe)
        if length < FLUX_TEXT_LEN:
            kwargs["max_sequence_length"] = length
        return kwargs, branches

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict):
        t = super().timestep(model, args, kwargs)
        return None if t is None else t * 1000  # the pipelines pass t / 1000

    def attention_tokens(self, module, args, kwargs) -> tuple[int, int, int]:
        hidden = args[0] if args else kwargs["hidden_states"]
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        n = hidden.shape[1] + (0 if enc is None else enc.shape[1])
        return hidden.shape[0], n, n

    def sample_size(self, model: nn.Module) -> tuple[int, int]:
        # FluxPipeline: default_sample_size 128 latents (1024 px with the 8x VAE)
        size = getattr(model.config, "sample_size", None) or 128
        return (size, size) if isinstance(size, int) else tuple(size)

    def text_len(self, pipe) -> int:
        tokenizer = getattr(pipe, "tokenizer_2", None)
        length = int(getattr(tokenizer, "model_max_length", FLUX_TEXT_LEN) or FLUX_TEXT_LEN)
        return min(length, FLUX_TEXT_LEN)

    def position_ids(
        self, latent_hw: tuple[int, int], text_len: int, device="cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_ids, txt_ids) as FluxPipeline builds them: text at (0, 0, 0), the packed 2x2 latent
        patches at (0, row, column)."""
        h, w = latent_hw[0] // 2, latent_hw[1] // 2
        img = torch.zeros(h, w, 3)
        img[..., 1] += torch.arange(h)[:, None]
        img[..., 2] += torch.arange(w)[None, :]
        return img.reshape(h * w, 3).to(device), torch.zeros(text_len, 3, device=device)

    def rope_angles(
        self, model: nn.Module, latent_hw: tuple[int, int] | None = None, text_len: int | None = None
    ):
        """(N, d_h / 2) rotary angle of every token and coordinate pair at a serving shape (default:
        the model's sample size and FLUX_TEXT_LEN text tokens), from the model's own ``pos_embed``."""
        img_ids, txt_ids = self.position_ids(latent_hw or self.sample_size(model), text_len or FLUX_TEXT_LEN)
        with torch.no_grad():
            cos, sin = model.pos_embed(torch.cat([txt_ids, img_ids]).to(next(model.parameters()).device))
        return torch.atan2(sin[:, 0::2].double().cpu(), cos[:, 0::2].double().cpu())

    def convert_lora(
        self,
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        *,
        original_shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> Mapping[str, torch.Tensor]:
        """kohya / ai-toolkit / ComfyUI LoRAs with BFL names -> diffusers keys at this model's
        widths (``convert_bfl_lora``); other keys pass through unchanged."""
        return convert_bfl_lora(model, state_dict, self.pipeline_attr, original_shapes)

    def example_inputs(
        self, model, batch, latent_hw, text_len, *, device="meta", dtype=torch.float32, generator=None
    ):
        cfg = model.config
        h, w = latent_hw
        n_img = (h // 2) * (w // 2)
        hidden = randn((batch, n_img, cfg.in_channels), device, dtype, generator)
        text = randn((batch, text_len, cfg.joint_attention_dim), device, dtype, generator)
        t = torch.full((batch,), 0.5, dtype=dtype, device=device)
        img_ids, txt_ids = self.position_ids((h, w), text_len)
        kwargs = {
            "encoder_hidden_states": text,
            "timestep": t,
            "img_ids": img_ids.to(device=device, dtype=dtype),
            "txt_ids": txt_ids.to(device=device, dtype=dtype),
        }
        # the pooled text vector and the guidance embedding where the model has them (FLUX.1 does;
        # FLUX-derived models without them, e.g. Chroma, take neither; Bria's forward takes
        # pooled_projections but its config has no pooled_projection_dim: it is not used)
        if "pooled_projections" in inspect.signature(type(model).forward).parameters and getattr(
            cfg, "pooled_projection_dim", None
        ):
            kwargs["pooled_projections"] = randn((batch, cfg.pooled_projection_dim), device, dtype, generator)
        if getattr(cfg, "guidance_embeds", False):
            kwargs["guidance"] = torch.full((batch,), 3.5, dtype=dtype, device=device)
        return (hidden,), kwargs
