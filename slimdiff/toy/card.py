"""The toy model card: how the committed models were trained, the data rules, and measured metrics."""

from __future__ import annotations

from pathlib import Path

from slimdiff.toy import data as toy_data

_METRIC_ORDER = ("object", "color", "shape", "position", "exact")


def _table(acc: dict) -> str:
    rows = ["| split | n | " + " | ".join(_METRIC_ORDER) + " |", "|---|---|" + "---|" * len(_METRIC_ORDER)]
    for split in ("single", "two", "all"):
        r = acc[split]
        rows.append(
            f"| {split} | {r['n']} | " + " | ".join(f"{100 * r[m]:.1f}%" for m in _METRIC_ORDER) + " |"
        )
    return "\n".join(rows)


def write_model_card(out: Path, metrics: dict, grid_captions: list[str]) -> Path:
    cfg = metrics["config"]
    gen = metrics["generation"]
    t = metrics["timings"]
    model = cfg["model"]
    held_single, held_two = toy_data.heldout_captions("single"), toy_data.heldout_captions("two")
    colors = ", ".join(f"{k} {v}" for k, v in toy_data.COLORS.items())
    slots = ", ".join(f"{k} {tuple(int(c) for c in v)}" for k, v in toy_data.SLOTS.items())
    reused = metrics.get("reused_stages", [])
    reused_note = (
        f" Reused from an interrupted earlier run into the same folder (`--resume`; every stage seeds its "
        f"own generators): {', '.join(reused)}; not included in these timings."
        if reused
        else ""
    )
    if metrics.get("timing_note"):
        reused_note += "\n" + metrics["timing_note"]
    grid_list = "\n".join(f"{i:2d}. {c}" for i, c in enumerate(grid_captions))
    text = f"""# Toy SD-architecture model (slimdiff toy world)

A tiny text-to-image model with the exact Stable Diffusion v1.5 code path (diffusers
`StableDiffusionPipeline`: `AutoencoderKL`, `CLIPTextModel` + word-level tokenizer,
`UNet2DConditionModel` with cross-attention transformer blocks, `DDIMScheduler`), trained from scratch
on CPU on a procedural data set. It is the project's default model for the pipeline, end-to-end tests
and quality benchmarks. Weights are stored fp16 (safetensors) and run fp32.

Retrain everything (deterministic, seed {cfg["seed"]}, {cfg["threads"]} CPU threads):

    python -m slimdiff.toy.train --out data/toy --threads {cfg["threads"]}

This run took {t["total_s"] / 60:.1f} min (classifier {t["classifier_s"]:.0f} s, CLIP {t["clip_s"]:.0f} s,
VAE + latents {t["vae_s"]:.0f} s, UNet + text encoder {t["unet_s"]:.0f} s, evaluation {t["eval_s"]:.0f} s).
Step scale: {cfg["steps_scale"]}.{reused_note}

## Data rules (`slimdiff/toy/data.py`)

- 32x32 RGB, background RGB {toy_data.BACKGROUND}; shapes {", ".join(toy_data.SHAPES)}, {toy_data.SIZE_RANGE[0]:.0f}-{toy_data.SIZE_RANGE[1]:.0f} px across.
- Colors (RGB, per-channel jitter +-{toy_data.COLOR_JITTER}): {colors}.
- Slots (center x, y; position jitter +-{toy_data.POSITION_JITTER:.0f} px): {slots}.
- Single object: "a {{color}} {{shape}} {{on the left | on the right | at the top | at the bottom | in the center}}" (60 captions).
- Two different objects: "a {{color}} {{shape}} {{above | below | to the left of | to the right of}} a {{color}} {{shape}}",
  first object at top/bottom/left/right, second at the opposite slot (528 captions).
- Held out from all generator/CLIP training (seed {toy_data.SPLIT_SEED}): {len(held_single)} single and
  {len(held_two)} two-object captions (15%).

## Models

| component | what | parameters |
|---|---|---|
| VAE | AutoencoderKL, blocks {model["vae_channels"]}, 32x32x3 -> 8x8x{model["latent_channels"]}, scaling factor {metrics["latent_scaling_factor"]:.4f} | {metrics["vae_parameters"]:,} |
| text encoder | CLIPTextModel, hidden {model["text_hidden"]}, {model["text_layers"]} layers, {model["text_heads"]} heads, max length {model["max_length"]} | {metrics["text_encoder_parameters"]:,} |
| UNet | UNet2DConditionModel, blocks {model["unet_channels"]}, {model["unet_heads"]} heads, {model["unet_transformer_layers"]} transformer layers per block, GEGLU, cross_attention_dim {model["text_hidden"]} | {metrics["unet_parameters"]:,} |
| toy CLIP | open_clip `toy-clip-tiny` (ViT 32px/patch 4, text width 64, open_clip BPE tokenizer) | {metrics["clip_parameters"]:,} |
| classifier | CNN, per slot: empty or color x shape (5 x 13 classes) | - |

Transformer blocks (attn1, attn2, ff) hold {100 * metrics["unet_transformer_share"]:.1f}% of the UNet's parameters.

## Training

- Classifier: {cfg["classifier_steps"]} steps x {cfg["classifier_batch"]} fresh renders of all captions (an evaluation tool; it never feeds the generator).
- Toy CLIP: {cfg["clip_steps"]} steps x {cfg["clip_batch"]} distinct training captions, open_clip `ClipLoss`.
- VAE: {cfg["vae_steps"]} steps x {cfg["vae_batch"]}, MSE + {cfg["vae_kl_weight"]:g} KL, on a fixed set of
  {cfg["dataset_size"]} training images ({100 * cfg["two_object_fraction"]:.0f}% two-object); latents precomputed once.
- UNet + text encoder jointly: {cfg["unet_steps"]} steps x {cfg["unet_batch"]}, AdamW lr {cfg["unet_lr"]:g} (text {cfg["text_lr"]:g}),
  {cfg["warmup_steps"]} warmup steps then cosine, epsilon prediction with Min-SNR-{cfg["min_snr_gamma"]:g} weighting,
  {100 * cfg["caption_dropout"]:.0f}% caption dropout (classifier-free guidance), EMA {cfg["ema_decay"]}; the EMA weights are shipped.
- Loss log: `train_log.csv` (stage, step, loss, lr, elapsed_s).

## Metrics

Sampler: DDIM, {gen["num_inference_steps"]} steps, guidance scale **{gen["guidance_scale"]}** (fixed). Graded by the
attribute classifier (GenEval-style, `slimdiff.toy.evaluate.attribute_accuracy`).

Held-out captions (never trained on), {gen["samples_per_heldout_caption"]} samples each:

{_table(gen["heldout"])}

A sample of training captions, one image each:

{_table(gen["train_sample"])}

- Attribute classifier, exact match on fresh real images: {100 * metrics["classifier_real_exact"]:.2f}%.
- Toy CLIP top-1 caption retrieval on real images: held-out captions {100 * metrics["clip_heldout_retrieval_top1"]:.1f}%
  (among {len(held_single) + len(held_two)}), a fifth of the training captions {100 * metrics["clip_train_retrieval_top1"]:.1f}%.
- Test reference (`tests/test_toy_model.py`: 9 single + 24 two-object held-out captions, seed 1234):
  single exact {100 * metrics["test_subset"]["single"]["exact"]:.1f}%, two-object exact {100 * metrics["test_subset"]["two"]["exact"]:.1f}%.
- Sampling the 64-image grid took {t["grid_64_s"]:.1f} s.

## Grid

![grid](grid.png)

Held-out captions, row-major, 8 per row:

```
{grid_list}
```
"""
    path = out / "MODEL_CARD.md"
    path.write_text(text)
    return path


def write_mmdit_model_card(out: Path, metrics: dict, grid_captions: list[str]) -> Path:
    """The toy MMDiT card (``data/toy-mmdit/MODEL_CARD.md``): same data rules and evaluation as the
    UNet card, the MMDiT architecture and its flow-matching training."""
    cfg = metrics["config"]
    gen = metrics["generation"]
    t = metrics["timings"]
    model = cfg["model"]
    held_single, held_two = toy_data.heldout_captions("single"), toy_data.heldout_captions("two")
    grid_list = "\n".join(f"{i:2d}. {c}" for i, c in enumerate(grid_captions))
    inner = model["num_heads"] * model["head_dim"]
    n_layers = model["num_layers"]
    note = "\n" + metrics["timing_note"] if metrics.get("timing_note") else ""
    trained = metrics["trained"]
    text = f"""# Toy MMDiT model (slimdiff toy world, SD3 / SD3.5 architecture)

A tiny text-to-image model with the exact Stable Diffusion 3 code path (diffusers
`StableDiffusion3Pipeline`: `SD3Transformer2DModel`, two `CLIPTextModelWithProjection` text encoders,
no T5 (`text_encoder_3=None`), the UNet toy world's `AutoencoderKL` and word-level tokenizer,
`FlowMatchEulerDiscreteScheduler`), trained from scratch on CPU on the toy world's procedural data
set, with the UNet toy world's caption split and judged by its classifier (see `data/toy/MODEL_CARD.md`
for the data rules). Weights are stored fp16 (safetensors) and run fp32.

Retrain it (deterministic, seed {cfg["seed"]}, {cfg["threads"]} CPU threads; needs the committed `data/toy`):

    python -m slimdiff.toy.train_mmdit --out data/toy-mmdit --threads {cfg["threads"]}

This run took {t["total_s"] / 60:.1f} min (data set + latents {t["data_s"]:.0f} s, transformer + text encoders
{t["transformer_s"]:.0f} s, evaluation {t["eval_s"]:.0f} s). Step scale: {cfg["steps_scale"]}.{note}

## Models

| component | what | parameters |
|---|---|---|
| transformer | SD3Transformer2DModel: {n_layers} joint blocks, width {inner} ({model["num_heads"]} heads x {model["head_dim"]}), patch {model["patch_size"]} on 8x8x4 latents, `qk_norm: rms_norm`, dual attention (SD3.5 `attn2`) in blocks {metrics["dual_attention_blocks"]}, block {metrics["context_pre_only_blocks"]} `context_pre_only`, GELU(tanh) FFNs (`ff`, `ff_context`), joint_attention_dim {model["joint_attention_dim"]}, pooled_projection_dim {sum(model["text_hidden"])} | {metrics["transformer_parameters"]:,} |
| text_encoder | CLIPTextModelWithProjection, hidden {model["text_hidden"][0]}, {model["text_layers"]} layers, {model["text_heads"][0]} heads, max length {model["max_length"]} | {metrics["text_encoder_parameters"]:,} |
| text_encoder_2 | CLIPTextModelWithProjection, hidden {model["text_hidden"][1]}, {model["text_layers"]} layers, {model["text_heads"][1]} heads, max length {model["max_length"]} | {metrics["text_encoder_2_parameters"]:,} |
| tokenizer, tokenizer_2 | the UNet toy world's word-level tokenizer (both) | - |
| VAE | the committed UNet toy world VAE, weights unchanged; `shift_factor` {metrics["latent_shift_factor"]:.4f} (latent mean), `scaling_factor` {metrics["latent_scaling_factor"]:.4f} (1 / latent std) | {metrics["vae_parameters"]:,} |
| scheduler | FlowMatchEulerDiscreteScheduler, shift {model["scheduler_shift"]} | - |

The joint blocks' attention and FFNs (`attn`, `attn2`, `ff`, `ff_context`) hold
{100 * metrics["transformer_share"]:.1f}% of the transformer's parameters (the rest: adaLN modulations,
embedders, output layer).

Text input, as the pipeline builds it without T5: both CLIPs' penultimate hidden states ({model["max_length"]} tokens)
concatenated ({sum(model["text_hidden"])} wide), zero-padded to {model["joint_attention_dim"]}, then {model["t5_tokens"]} all-zero "T5" tokens
(the pipeline's default `max_sequence_length`); pooled: the two projected EOS states concatenated.

## Training

- Data: the UNet toy world's fixed training set ({trained["dataset_images"]} images, {100 * cfg["two_object_fraction"]:.0f}% two-object,
  held-out captions excluded), encoded once by the VAE (latents sampled from the posterior each step).
- Transformer + both text encoders jointly: {trained["transformer_steps"]} steps x {cfg["batch"]}, AdamW lr {cfg["lr"]:g}
  (text {cfg["text_lr"]:g}, weight decay {cfg["weight_decay"]:g}), {cfg["warmup_steps"]} warmup steps then cosine to {cfg["min_lr_ratio"]:g}x,
  rectified flow (`x_t = (1 - s) x0 + s noise`, velocity target `noise - x0`, timestep `1000 s`),
  {cfg["timestep_sampling"].replace("_", "-")} `s` (mean {cfg["logit_mean"]:g}, std {cfg["logit_std"]:g}), {100 * cfg["caption_dropout"]:.0f}% caption dropout (`""` for both encoders:
  classifier-free guidance), adaLN-Zero initialisation, gradient clipping 1.0, EMA {cfg["ema_decay"]}; the EMA weights are shipped.
- The {model["t5_tokens"]} zero T5 tokens are identical at every layer, so training uses one zero token with attention
  logit `+log({model["t5_tokens"]})` (`slimdiff.toy.mmdit.RepeatedTokenJointAttnProcessor`: the same function, checked in
  `tests/test_toy_mmdit.py`); sampling uses the stock pipeline.
- Loss log: `train_log.csv` (stage, step, loss, lr, elapsed_s).

## Metrics

Sampler: flow-matching Euler, {gen["num_inference_steps"]} steps, guidance scale **{gen["guidance_scale"]}** (fixed). Graded by the
UNet toy world's attribute classifier (`data/toy/classifier`, GenEval-style, `slimdiff.toy.evaluate.attribute_accuracy`).

Held-out captions (never trained on: {len(held_single)} single, {len(held_two)} two-object), {gen["samples_per_heldout_caption"]} samples each:

{_table(gen["heldout"])}

A sample of training captions, one image each:

{_table(gen["train_sample"])}

- Test reference (`tests/test_toy_mmdit.py`: 9 single + 24 two-object held-out captions, seed 1234; the fast
  test re-samples the first 12 and compares each image's exact match, `test_subset_exact` in `metrics.json`):
  single exact {100 * metrics["test_subset"]["single"]["exact"]:.1f}%, two-object exact {100 * metrics["test_subset"]["two"]["exact"]:.1f}%.
- Sampling the 64-image grid took {t["grid_64_s"]:.1f} s.

## Grid

![grid](grid.png)

Held-out captions, row-major, 8 per row:

```
{grid_list}
```
"""
    path = out / "MODEL_CARD.md"
    path.write_text(text)
    return path


def write_flux_model_card(out: Path, metrics: dict, grid_captions: list[str]) -> Path:
    """The toy FLUX card (``data/toy-flux/MODEL_CARD.md``): same data rules and evaluation as the
    UNet and MMDiT cards, the FLUX architecture, its flow-matching training and true CFG."""
    cfg = metrics["config"]
    gen = metrics["generation"]
    t = metrics["timings"]
    model = cfg["model"]
    held_single, held_two = toy_data.heldout_captions("single"), toy_data.heldout_captions("two")
    grid_list = "\n".join(f"{i:2d}. {c}" for i, c in enumerate(grid_captions))
    inner = model["num_heads"] * model["head_dim"]
    note = "\n" + metrics["timing_note"] if metrics.get("timing_note") else ""
    trained = metrics["trained"]
    seq = metrics["max_sequence_length"]
    encoder = model.get("token_encoder", "t5")
    if encoder == "clip":
        token_class = "a second `CLIPTextModel` (last hidden states)"
        token_row = (
            f"CLIPTextModel (last hidden states, causal, absolute positions), hidden {model['token_dim']}, "
            f"{model['text_layers']} layers, {model['token_heads']} heads, MLP {model['token_ff']}, "
            f"max length {model['max_length']}"
        )
        token_note = """
The text tokens come from a CLIP-class encoder, not a T5 (FLUX.1's class). FluxPipeline calls
`text_encoder_2(ids)[0]` and takes any encoder with that output; diffusers logs on loading that it
expected a `T5EncoderModel`. Why: FLUX gives every text token the rotary position (0, 0, 0), so word
order reaches the transformer only through this encoder. With a 2-layer T5 (relative positions
only, same recipe) the toy placed both objects right but swapped their attributes: 38.9% held-out
two-object exact match with 8 relative-position buckets over 32 tokens, 40.2% with T5's default 32
over 128, 29.1% in an earlier 1800-step run. With this 2-layer CLIP token encoder (same recipe
otherwise, as the toy MMDiT's) it reaches the held-out numbers below. `ToyFluxConfig(token_encoder="t5")`
still builds the T5 variant. Real FLUX.1 checkpoints ship their T5-XXL, which slimdiff leaves as is.
"""
    else:
        token_class = "a `T5EncoderModel`"
        token_row = (
            f"T5EncoderModel (last hidden states), d_model {model.get('token_dim', model.get('t5_dim'))}, "
            f"{model['text_layers']} layers, {model.get('token_heads', model.get('t5_heads'))} heads x "
            f"{model['t5_d_kv']}, gated-GELU FFN {model.get('token_ff', model.get('t5_ff'))}, "
            f"{model.get('t5_buckets', 8)} relative-position buckets over {model.get('t5_max_distance', 32)} tokens"
        )
        token_note = ""
    text = f"""# Toy FLUX model (slimdiff toy world, FLUX.1 architecture)

A tiny text-to-image model with the exact FLUX.1 code path (diffusers `FluxPipeline`:
`FluxTransformer2DModel` with double- and single-stream blocks and rotary position embeddings, a
`CLIPTextModel` for the pooled conditioning, {token_class} for the text tokens, the UNet toy
world's `AutoencoderKL` and word-level tokenizer, `FlowMatchEulerDiscreteScheduler` with FLUX's dynamic
shift), trained from scratch on CPU on the toy world's procedural data set, with the UNet toy world's
caption split and judged by its classifier (see `data/toy/MODEL_CARD.md` for the data rules). Weights
are stored fp16 (safetensors) and run fp32.

Retrain it (deterministic, seed {cfg["seed"]}, {cfg["threads"]} CPU threads; needs the committed `data/toy`):

    python -m slimdiff.toy.train_flux --out data/toy-flux --threads {cfg["threads"]}

This run took {t["total_s"] / 60:.1f} min (data set + latents {t["data_s"]:.0f} s, transformer + text encoders
{t["transformer_s"]:.0f} s, evaluation {t["eval_s"]:.0f} s). Step scale: {cfg["steps_scale"]}.{note}
{token_note}
## Sampling it

No guidance embedding (`guidance_embeds: false`, as FLUX.1-schnell): FLUX.1-dev's embedded guidance is
distilled from a teacher sampled with classifier-free guidance, and there is no such teacher here. The
model is trained with caption dropout instead and sampled with FluxPipeline's true classifier-free
guidance; its token encoder is trained on the tokenizer's {seq} tokens, so pass `max_sequence_length={seq}` (the
pipeline's default is 512), and the size: FluxPipeline's default is 128 latents (512 px with this VAE):

```python
from slimdiff.toy import load_toy_flux_pipeline

pipe = load_toy_flux_pipeline()
image = pipe(
    "a red circle above a blue square",
    negative_prompt="",
    true_cfg_scale={gen["guidance_scale"]},
    max_sequence_length={seq},
    height=32,
    width=32,
    num_inference_steps={gen["num_inference_steps"]},
).images[0]
```

`slimdiff.families.units.pipeline_call_kwargs` builds the guidance and text-length arguments for every FLUX
pipeline without a guidance embedding (the evaluation and the toy world's samplers use it); the toy's
samplers pass the 32 px size, and the transformer's config records `sample_size: 8` (latents), which
slimdiff's FLUX adapter reads (diffusers warns on loading that the key is unused by the class).

## Models

| component | what | parameters |
|---|---|---|
| transformer | FluxTransformer2DModel: {metrics["double_blocks"]} double-stream + {metrics["single_blocks"]} single-stream blocks, width {inner} ({model["num_heads"]} heads x {model["head_dim"]}), per-head {metrics["qk_norm"]} on q and k, RoPE axes {tuple(metrics["axes_dims_rope"])}, GELU(tanh) FFNs and single-block MLPs (ratio 4), 2x2-packed 8x8x4 latents (16 tokens of 16 channels), joint_attention_dim {model.get("token_dim", model.get("t5_dim"))}, pooled_projection_dim {model["clip_hidden"]}, `guidance_embeds: false` | {metrics["transformer_parameters"]:,} |
| text_encoder | CLIPTextModel (pooled output), hidden {model["clip_hidden"]}, {model["text_layers"]} layers, {model["clip_heads"]} heads, max length {model["max_length"]} | {metrics["text_encoder_parameters"]:,} |
| text_encoder_2 | {token_row} | {metrics["text_encoder_2_parameters"]:,} |
| tokenizer, tokenizer_2 | the UNet toy world's word-level tokenizer (both), max length {seq} | - |
| VAE | the committed UNet toy world VAE, weights unchanged; `shift_factor` {metrics["latent_shift_factor"]:.4f} (latent mean), `scaling_factor` {metrics["latent_scaling_factor"]:.4f} (1 / latent std) | {metrics["vae_parameters"]:,} |
| scheduler | FlowMatchEulerDiscreteScheduler, `use_dynamic_shifting` (FLUX.1's base/max shift 0.5/1.15 at 256/4096 tokens: shift {_flux_shift(model):.3f} at 16 tokens) | - |

The blocks' attention and FFNs (double blocks: `attn`, `ff`, `ff_context`; single blocks: `attn`,
`proj_mlp`, `proj_out`) hold {100 * metrics["transformer_share"]:.1f}% of the transformer's parameters (the rest:
adaLN modulations, embedders, output layer).

## Training

- Data: the UNet toy world's fixed training set ({trained["dataset_images"]} images, {100 * cfg["two_object_fraction"]:.0f}% two-object,
  held-out captions excluded), encoded once by the VAE (latents sampled from the posterior each step).
- Transformer + both text encoders jointly: {trained["transformer_steps"]} steps x {cfg["batch"]}, AdamW lr {cfg["lr"]:g}
  (text {cfg["text_lr"]:g}, weight decay {cfg["weight_decay"]:g}), {cfg["warmup_steps"]} warmup steps then cosine to {cfg["min_lr_ratio"]:g}x,
  rectified flow on packed latents (`x_t = (1 - s) x0 + s noise`, velocity target `noise - x0`; the
  transformer gets `t = s` in [0, 1], as FluxPipeline passes `timestep / 1000`),
  {cfg["timestep_sampling"].replace("_", "-")} `s` (mean {cfg["logit_mean"]:g}, std {cfg["logit_std"]:g}) shifted as the sampler shifts it, {100 * cfg["caption_dropout"]:.0f}% caption dropout (`""` for
  both encoders: true classifier-free guidance), adaLN-Zero initialisation, gradient clipping 1.0,
  EMA {cfg["ema_decay"]}; the EMA weights are shipped.
- Loss log: `train_log.csv` (stage, step, loss, lr, elapsed_s).

## Metrics

Sampler: flow-matching Euler, {gen["num_inference_steps"]} steps, true CFG scale **{gen["guidance_scale"]}** (`true_cfg_scale`,
`negative_prompt=""`, fixed), `max_sequence_length={seq}`. Graded by the UNet toy world's attribute classifier
(`data/toy/classifier`, GenEval-style, `slimdiff.toy.evaluate.attribute_accuracy`).

Held-out captions (never trained on: {len(held_single)} single, {len(held_two)} two-object), {gen["samples_per_heldout_caption"]} samples each:

{_table(gen["heldout"])}

A sample of training captions, one image each:

{_table(gen["train_sample"])}

- Test reference (`tests/test_toy_flux.py`: 9 single + 24 two-object held-out captions, seed 1234; the fast
  test re-samples the first 12 and compares each image's exact match, `test_subset_exact` in `metrics.json`):
  single exact {100 * metrics["test_subset"]["single"]["exact"]:.1f}%, two-object exact {100 * metrics["test_subset"]["two"]["exact"]:.1f}%.
- Sampling the 64-image grid took {t["grid_64_s"]:.1f} s.

## Grid

![grid](grid.png)

Held-out captions, row-major, 8 per row:

```
{grid_list}
```
"""
    path = out / "MODEL_CARD.md"
    path.write_text(text)
    return path


def _flux_shift(model: dict) -> float:
    from slimdiff.toy.flux import ToyFluxConfig

    return ToyFluxConfig(**model).scheduler_shift
