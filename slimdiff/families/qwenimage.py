"""Qwen-Image: ``QwenImageTransformer2DModel`` built from double-stream ``QwenImageTransformerBlock``s
(diffusers ``transformer_qwenimage.py``), sampled by ``QwenImagePipeline``.

Every block is FLUX's double block under other names (see docs/METHOD.md, "FLUX and RoPE"):

* **Joint attention** (``attn``, a diffusers ``Attention`` run by ``QwenDoubleStreamAttnProcessor2_0``):
  image tokens are projected by ``to_q/to_k/to_v`` and leave through ``to_out.0``, text tokens by
  ``add_q_proj/add_k_proj/add_v_proj`` and ``to_add_out``; the two streams are attended together
  as [text; image]. One QK and one VO unit per block cover both streams' linears (a head's width
  is shared), as in MMDiT and FLUX.
* **Per-head RMSNorms** ``norm_q/norm_k`` (image) and ``norm_added_q/norm_added_k`` (text), called
  on (B, N, heads, d_h) by the stock processor, then **RoPE** on q and k: adjacent coordinate pairs
  (2i, 2i+1) read as complex numbers and multiplied by unit complex tables
  (``apply_rotary_emb_qwen(use_real=False)``), the pair layout of FLUX. A QK unit is therefore
  compressed by keeping whole pairs, the same in q and k (``linalg.rope_pair_selection``), and
  ``attention.SlimQwenAttnProcessor`` gathers the tables at the kept pairs of every head.
* **Text tokens have rotary positions too** (``QwenEmbedRope``): image token (row, column) of the
  packed h x w latent grid gets positions (0, row - ceil(h/2), column - ceil(w/2))
  (``scale_rope``), text token j gets (m + j, m + j, m + j) on all three axes with
  m = max(floor(h/2), floor(w/2)). FLUX puts every text token at 0. The pair selection's error form averages the rotation over all token pairs, so
  ``QwenImageAdapter.rope_angles`` reads every image AND text token's angles off the model's own
  ``pos_embed`` at the serving shape.
* **Padded text tokens**: the pipeline pads a batch's prompts to the longest and passes
  ``encoder_hidden_states_mask``; the transformer hands a boolean mask to every block, whose
  attention masks the padded text keys. The padded tokens still flow through the text stream's
  linears and ``txt_mlp``, so every text-stream statistic (text q / k and their norms, the text
  attention output, the ``txt_mlp`` hidden) keeps only the real tokens: the layouts name the
  block's ``encoder_hidden_states_mask`` as the text stream's ``TokenMask``.
* **FFNs** ``img_mlp`` (image) and ``txt_mlp`` (text): GELU(tanh) ``FeedForward``s.
* The transformer is called with ``timestep = t / 1000`` (the flow-matching schedule is in
  [0, 1000]) and ``img_shapes`` (the packed latent grid per sample); guidance is true
  classifier-free guidance (``true_cfg_scale`` with a negative prompt: two transformer calls per
  step); the guidance embedding (``guidance_embeds``) is unused by the released models.

Refused: fused projections (``fuse_qkv_projections()``: unfuse first), processors other than
``QwenDoubleStreamAttnProcessor2_0``, q/k norms other than RMSNorm.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from slimdiff.families.attention import SlimQwenAttnProcessor
from slimdiff.families.base import (
    AttentionLayout,
    FFNLayout,
    ModelAdapter,
    TokenMask,
    UnitInfo,
    UnsupportedModelError,
    attention_stat_keys,
    attention_units,
    ffn_unit,
    randn,
    register_adapter,
    require_processor,
)

#: the most text tokens QwenImagePipeline hands the transformer by default: it pads a batch's
#: prompts to the longest one and truncates at ``max_sequence_length`` (default 512)
QWEN_TEXT_LEN = 512
#: QwenImagePipeline's ``default_sample_size``: 128 x 128 latents (1024 px with its 8x VAE)
QWEN_SAMPLE_SIZE = 128
#: the argument of a block's calls that marks its real text tokens
TEXT_MASK_ARG = "encoder_hidden_states_mask"


def _text_mask(block: str) -> TokenMask:
    return TokenMask(block, TEXT_MASK_ARG)


def _ffn(model: nn.Module, block: str, name: str) -> UnitInfo:
    from diffusers.models.activations import GELU

    ff = model.get_submodule(f"{block}.{name}")
    if not isinstance(ff.net[0], GELU):
        raise UnsupportedModelError(
            f"{block}.{name}: expected a GELU feed-forward, got {type(ff.net[0]).__name__}"
        )
    text = name == "txt_mlp"
    layout = FFNLayout(
        f"{block}.{name}.net.0.proj",
        f"{block}.{name}.net.{len(ff.net) - 1}",
        False,
        f"{block}.{name}.hidden",
        "text" if text else "image",
        _text_mask(block) if text else None,
    )
    return ffn_unit(model, f"{block}.{name}", block, layout)


def _attention(model: nn.Module, block: str) -> list[UnitInfo]:
    path = f"{block}.attn"
    attn = model.get_submodule(path)
    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv"):
        raise UnsupportedModelError(
            f"{path}: fused projections are not supported; call unfuse_qkv_projections() first"
        )
    heads = int(attn.heads)
    head_dim = attn.to_q.out_features // heads
    norms_q, norms_k = [f"{path}.norm_q", f"{path}.norm_added_q"], [f"{path}.norm_k", f"{path}.norm_added_k"]
    for norm in (*norms_q, *norms_k):
        mod = model.get_submodule(norm)
        if type(mod).__name__ != "RMSNorm":
            raise UnsupportedModelError(
                f"{norm}: qk norm {type(mod).__name__} is not supported (RMSNorm only)"
            )
    text = [f"{path}.add_q_proj", f"{path}.add_k_proj", f"{path}.add_v_proj", f"{path}.to_add_out"]
    layout = AttentionLayout(
        module=path,
        heads=heads,
        head_dim=head_dim,
        query=(f"{path}.to_q", f"{path}.add_q_proj"),
        key=(f"{path}.to_k", f"{path}.add_k_proj"),
        value=(f"{path}.to_v", f"{path}.add_v_proj"),
        out=(f"{path}.to_out.0", f"{path}.to_add_out"),
        **attention_stat_keys(block, "attn"),
        norms_q=tuple(norms_q),
        norms_k=tuple(norms_k),
        norms_head_major=False,  # the stock processor normalises (B, N, heads, d_h)
        text_linears=tuple(text),
        rope=True,
        text_mask=_text_mask(block),
    )
    return attention_units(model, block, "attn", layout)


@register_adapter
class QwenImageAdapter(ModelAdapter):
    family = "Qwen-Image (QwenImageTransformer2DModel)"
    pipeline_attr = "transformer"
    denoiser_name = "QwenImageTransformer2DModel"
    block_type = "diffusers.models.transformers.transformer_qwenimage:QwenImageTransformerBlock"

    def units(self, model: nn.Module) -> dict[str, UnitInfo]:
        units: list[UnitInfo] = []
        for name, _ in self.blocks(model):
            units.append(_ffn(model, name, "img_mlp"))
            units.append(_ffn(model, name, "txt_mlp"))
            units += _attention(model, name)
        return {u.name: u for u in units}

    def check_processors(self, model: nn.Module) -> None:
        from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

        for name, block in self.blocks(model):
            require_processor(f"{name}.attn", block.attn, QwenDoubleStreamAttnProcessor2_0)

    def processor(self, attn: nn.Module, layout: AttentionLayout):

        return SlimQwenAttnProcessor(scale=layout.head_dim**-0.5)

    def guidance_kwargs(self, model: nn.Module, guidance_scale: float, batch: int) -> tuple[dict, int]:
        """QwenImagePipeline's true classifier-free guidance: ``true_cfg_scale`` with a negative
        prompt per sample (" ", the pipeline's documented empty negative prompt) when the scale is
        above 1, two transformer calls per step; ``true_cfg_scale`` 1 (one call) otherwise. Its
        ``guidance_scale`` argument is for guidance-distilled models only and is not passed."""
        if guidance_scale > 1.0:
            return {"true_cfg_scale": guidance_scale, "negative_prompt": [" "] * batch}, 2
        return {"true_cfg_scale": 1.0}, 1

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict):
        t = super().timestep(model, args, kwargs)
        return None if t is None else t * 1000  # the pipeline passes t / 1000

    def attention_tokens(self, module, args, kwargs) -> tuple[int, int, int]:
        hidden = args[0] if args else kwargs["hidden_states"]
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        n = hidden.shape[1] + (0 if enc is None else enc.shape[1])
        return hidden.shape[0], n, n

    def sample_size(self, model: nn.Module) -> tuple[int, int]:
        size = getattr(model.config, "sample_size", None) or QWEN_SAMPLE_SIZE
        return (size, size) if isinstance(size, int) else tuple(size)

    def text_len(self, pipe) -> int:
        """The pipeline's default ``max_sequence_length`` (QWEN_TEXT_LEN for QwenImagePipeline): an
        upper bound, since the pipeline pads a batch only to its longest prompt (the tokenizer's
        own length plays no part: the pipeline passes ``max_length``); FLOPs at this length count
        the longest prompts."""
        param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
        default = None if param is None else param.default
        return int(default) if isinstance(default, int) and default > 0 else QWEN_TEXT_LEN

    @staticmethod
    def img_shapes(latent_hw: tuple[int, int], batch: int) -> list[list[tuple[int, int, int]]]:
        """The transformer's ``img_shapes`` as QwenImagePipeline builds them: one (frame, rows,
        columns) grid of packed 2x2 latent patches per sample."""
        return [[(1, latent_hw[0] // 2, latent_hw[1] // 2)]] * batch

    def rotary_tables(
        self, model: nn.Module, latent_hw: tuple[int, int], text_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) complex rotary tables (N, d_h / 2) from the model's own ``pos_embed``, as
        the transformer computes them for one sample of ``latent_hw`` latents and ``text_len``
        text tokens."""
        device = next(model.parameters()).device
        with torch.no_grad():
            return model.pos_embed(self.img_shapes(latent_hw, 1), max_txt_seq_len=text_len, device=device)

    def rope_angles(
        self, model: nn.Module, latent_hw: tuple[int, int] | None = None, text_len: int | None = None
    ) -> torch.Tensor:
        """(N, d_h / 2) rotary angle of every token and coordinate pair at a serving shape (default:
        the model's sample size and QWEN_TEXT_LEN text tokens), text tokens and image tokens
        alike, from the model's own ``pos_embed`` (float64)."""
        img, txt = self.rotary_tables(model, latent_hw or self.sample_size(model), text_len or QWEN_TEXT_LEN)
        return torch.angle(torch.cat([txt, img]).cpu().to(torch.complex128))

    def example_inputs(
        self, model, batch, latent_hw, text_len, *, device="meta", dtype=torch.float32, generator=None
    ):
        """One forward as QwenImagePipeline makes it, with every text token real (the pipeline then
        passes no ``encoder_hidden_states_mask``)."""
        cfg = model.config
        h, w = latent_hw
        hidden = randn((batch, (h // 2) * (w // 2), cfg.in_channels), device, dtype, generator)
        text = randn((batch, text_len, cfg.joint_attention_dim), device, dtype, generator)
        kwargs = {
            "encoder_hidden_states": text,
            "timestep": torch.full((batch,), 0.5, dtype=dtype, device=device),
            "img_shapes": self.img_shapes((h, w), batch),
        }
        if cfg.use_additional_t_cond:  # the layered model: a (batch,) index into its extra embedding
            kwargs["additional_t_cond"] = torch.zeros((batch,), dtype=torch.long, device=device)
        return (hidden,), kwargs
