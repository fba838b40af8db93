"""Train the toy FLUX world (a tiny ``FluxPipeline``) from scratch, deterministically, on CPU.

``python -m slimdiff.toy.train_flux --out data/toy-flux [--steps-scale 0.01] [--threads 2]``

Same data rules, caption split, VAE and judges as the UNet and MMDiT toy worlds (``slimdiff.toy.train``,
``slimdiff.toy.train_mmdit``): the committed toy VAE (``data/toy/pipeline/vae``) is reused unchanged,
with FLUX's latent normalisation (``shift_factor`` = latent mean, ``scaling_factor`` = 1 / latent std of
the training set); the committed attribute classifier grades the samples. Stages (one seeded process):

1. the UNet world's fixed training set (same size, seed and two-object share), encoded once by the VAE;
2. ``FluxTransformer2DModel``, the CLIP (pooled) and the T5 (tokens) text encoders jointly, rectified
   flow on packed latents with FLUX's timestep convention (``x_t = (1 - s) x0 + s noise``, velocity
   target ``noise - x0``, the transformer gets ``t = s`` in [0, 1]; logit-normal ``s`` with the
   sampler's shift at 16 image tokens), 10% caption dropout (both encoders get ``""``) for true
   classifier-free guidance, warmup + cosine lr, EMA weights;
3. evaluation on held-out captions through the stock pipeline (20 flow-matching Euler steps, true CFG
   ``true_cfg_scale`` with ``negative_prompt=""``) and the model card.

Writes ``pipeline/`` (fp16 safetensors), ``train_log.csv``, ``metrics.json``, ``grid.png`` and
``MODEL_CARD.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimdiff.toy import data as toy_data
from slimdiff.toy.flux import ToyFluxConfig
from slimdiff.toy.train import EMA, LossLog, encode_latents, lr_factor
from slimdiff.toy.train_mmdit import (
    flow_matching_pair,
    latent_normalisation,
    load_toy_vae,
    sample_sigmas,
)

logger = logging.getLogger(__name__)

# the blocks' attention + FFN (single blocks' proj_mlp / proj_out included) must hold at least this
# share of the transformer (as the toy MMDiT's rule)
MIN_TRANSFORMER_SHARE = 0.5


@dataclass
class FluxTrainConfig:
    """Step counts are for ``steps_scale=1``; the training steps and data set scale with it."""

    seed: int = 0
    threads: int = 2
    steps_scale: float = 1.0
    model: ToyFluxConfig = field(default_factory=ToyFluxConfig)
    # fixed data set (the UNet toy world's: same size, seed offset and two-object share)
    dataset_size: int = 30000
    dataset_seed_offset: int = 10
    two_object_fraction: float = 0.75
    # transformer + both text encoders
    # the toy MMDiT's recipe with 5000 steps (~0.17 s/step on 2 idle cores); 1800 steps at lr 8e-4
    # and EMA 0.998 reached only 29% held-out two-object exact match
    transformer_steps: int = 5000
    batch: int = 32
    lr: float = 5e-4
    text_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    caption_dropout: float = 0.1
    timestep_sampling: str = "logit_normal"  # or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    ema_decay: float = 0.999
    # evaluation (the UNet world's rules); guidance_scale is FluxPipeline's true_cfg_scale
    eval_samples_per_caption: int = 4
    eval_train_captions: int = 96
    guidance_scale: float = 4.0
    num_inference_steps: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ToyFluxConfig(**self.model)
        if not 0 < self.steps_scale <= 10:
            raise ValueError(f"steps_scale={self.steps_scale}: use a value in (0, 10] (1 = full training)")
        if not 0 <= self.two_object_fraction <= 1:
            raise ValueError(f"two_object_fraction={self.two_object_fraction} must be in [0, 1]")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.timestep_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"timestep_sampling={self.timestep_sampling!r}: use 'logit_normal' or 'uniform'")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")

    def steps(self, n: int) -> int:
        return max(2, round(n * self.steps_scale))

    def dataset_images(self) -> int:
        """Size of the fixed training set at this step scale (the full set from scale 0.1 up)."""
        return max(256, round(self.dataset_size * min(1.0, self.steps_scale * 10)))


def train_transformer(
    cfg: FluxTrainConfig, means, stds, shift: float, scale: float, captions, tokenizer, log
):
    """Joint transformer + text-encoder training on precomputed latents (mean, std: (N, 4, 8, 8))."""
    from slimdiff.toy.flux import (
        build_text_encoders,
        build_transformer,
        encode_prompt_ids,
        flux_block_share,
        pack_latents,
        position_ids,
    )

    mc = cfg.model
    torch.manual_seed(cfg.seed + 4)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    rng = np.random.default_rng([cfg.seed, 34])
    text_encoder, text_encoder_2 = build_text_encoders(mc, seed=cfg.seed + 5)
    transformer = build_transformer(mc, seed=cfg.seed + 7)
    share = flux_block_share(transformer)
    if share < MIN_TRANSFORMER_SHARE:
        raise ValueError(
            f"the blocks' attention + FFN hold {100 * share:.1f}% of the transformer's parameters; "
            f"the toy FLUX world needs at least {100 * MIN_TRANSFORMER_SHARE:.0f}% (widen the blocks or shrink "
            "the embedders)"
        )
    # both tokenizers are the one toy tokenizer: CLIP pads to model_max_length, T5 to
    # max_sequence_length = max_length (the pipeline call the toy FLUX is sampled with)
    tok = {"padding": "max_length", "max_length": mc.max_length, "truncation": True, "return_tensors": "pt"}
    ids = tokenizer(list(captions), **tok).input_ids  # (N, L)
    uncond = tokenizer([""], **tok).input_ids  # (1, L): the negative prompt "" of true CFG
    img_ids, txt_ids = position_ids(mc.max_length)
    text_params = list(text_encoder.parameters()) + list(text_encoder_2.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": list(transformer.parameters()), "lr": cfg.lr, "peak": cfg.lr},
            {"params": text_params, "lr": cfg.text_lr, "peak": cfg.text_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    modules = [transformer, text_encoder, text_encoder_2]
    ema = EMA(modules, cfg.ema_decay)
    n_steps = cfg.steps(cfg.transformer_steps)
    warmup = min(cfg.warmup_steps, max(1, n_steps // 10))
    all_params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    for step in tqdm(range(n_steps), desc="flux", mininterval=10):
        idx = torch.from_numpy(rng.integers(0, len(means), cfg.batch))
        mean, std = means[idx], stds[idx]
        x0 = pack_latents((mean + std * torch.randn(mean.shape, generator=gen) - shift) * scale)
        batch_ids = ids[idx].clone()
        batch_ids[torch.from_numpy(rng.random(cfg.batch) < cfg.caption_dropout)] = uncond
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(cfg, cfg.batch, gen)
        noisy, target = flow_matching_pair(x0, noise, sigma)
        states, pooled = encode_prompt_ids(text_encoder, text_encoder_2, batch_ids)
        pred = transformer(
            hidden_states=noisy,
            encoder_hidden_states=states,
            pooled_projections=pooled,
            timestep=sigma,  # FluxPipeline passes timestep / 1000 = sigma
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None,
        ).sample
        loss = F.mse_loss(pred, target)
        factor = lr_factor(step, n_steps, warmup, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = g["peak"] * factor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        opt.step()
        ema.update()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
        if step % 20 == 0 or step == n_steps - 1:
            log.log("flux", step, loss.item(), cfg.lr * factor)
    ema.copy_to_params()
    return transformer.eval(), text_encoder.eval(), text_encoder_2.eval()


def run(cfg: FluxTrainConfig, out: Path) -> dict:
    """Train into ``out`` and return the metrics written to ``metrics.json``."""
    from slimdiff.toy.flux import assemble_pipeline, build_scheduler, flux_vae
    from slimdiff.toy.models import ToyModelConfig, build_tokenizer, save_pipeline_fp16

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    log = LossLog(out / "train_log.csv")
    timings: dict[str, float] = {}
    t0 = time.time()
    try:
        images, captions = toy_data.make_dataset(
            cfg.dataset_images(),
            seed=cfg.seed + cfg.dataset_seed_offset,
            two_object_fraction=cfg.two_object_fraction,
        )
        vae = load_toy_vae()
        means, stds = encode_latents(vae, images)
        del images
        shift, scale = latent_normalisation(means)
        vae = flux_vae(vae, shift, scale)
        timings["data_s"] = time.time() - t0

        tokenizer = build_tokenizer(ToyModelConfig(max_length=cfg.model.max_length))
        transformer, te1, te2 = train_transformer(cfg, means, stds, shift, scale, captions, tokenizer, log)
        timings["transformer_s"] = time.time() - t0 - sum(timings.values())
        pipe = assemble_pipeline(vae, te1, te2, tokenizer, transformer, build_scheduler(cfg.model))
        save_pipeline_fp16(pipe, out / "pipeline")
    finally:
        log.close()
    return evaluate_and_write_card(cfg, out, timings, t0)


def model_summary(pipe) -> dict:
    """Parameter counts and the architecture facts the card and tests check."""
    from slimdiff.toy.flux import flux_block_share

    tr = pipe.transformer
    return {
        "transformer_parameters": sum(p.numel() for p in tr.parameters()),
        "transformer_share": flux_block_share(tr),
        "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "text_encoder_2_parameters": sum(p.numel() for p in pipe.text_encoder_2.parameters()),
        "vae_parameters": sum(p.numel() for p in pipe.vae.parameters()),
        "double_blocks": len(tr.transformer_blocks),
        "single_blocks": len(tr.single_transformer_blocks),
        "axes_dims_rope": list(tr.config.axes_dims_rope),
        "guidance_embeds": bool(tr.config.guidance_embeds),
        "qk_norm": type(tr.transformer_blocks[0].attn.norm_q).__name__,
        "max_sequence_length": int(pipe.tokenizer_2.model_max_length),
        "latent_shift_factor": float(pipe.vae.config.shift_factor),
        "latent_scaling_factor": float(pipe.vae.config.scaling_factor),
    }


def evaluate_and_write_card(cfg: FluxTrainConfig, out: Path, timings: dict[str, float], t0: float) -> dict:
    """Evaluate the pipeline saved in ``out`` (fp16-rounded, what users load) with the UNet world's
    rules (true CFG at ``guidance_scale``); write ``metrics.json``, ``grid.png`` and the card."""
    from slimdiff.toy import load_toy_flux_pipeline
    from slimdiff.toy.classifier import load_toy_classifier
    from slimdiff.toy.evaluate import sample_grid
    from slimdiff.toy.train import evaluate_pipeline, grid_captions
    from slimdiff.toy.train_mmdit import evaluate_test_subset

    torch.set_num_threads(cfg.threads)
    pipe = load_toy_flux_pipeline(path=out / "pipeline")
    classifier = load_toy_classifier()
    t_eval = time.time()
    metrics = {
        "generation": evaluate_pipeline(pipe, classifier, cfg),
        **evaluate_test_subset(pipe, classifier, cfg),
        **model_summary(pipe),
    }
    metrics["generation"]["guidance"] = "true_cfg_scale with negative_prompt ''"
    t_grid = time.time()
    grid, _ = sample_grid(
        pipe,
        grid_captions(),
        seed=cfg.seed + 200,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
    )
    timings["grid_64_s"] = time.time() - t_grid
    grid.save(out / "grid.png")
    timings["eval_s"] = time.time() - t_eval
    timings["total_s"] = time.time() - t0
    metrics["timings"] = timings
    metrics["trained"] = {
        "transformer_steps": cfg.steps(cfg.transformer_steps),
        "dataset_images": cfg.dataset_images(),
    }
    metrics["config"] = asdict(cfg)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    from slimdiff.toy.card import write_flux_model_card

    write_flux_model_card(out, metrics, grid_captions())
    logger.info("toy FLUX written to %s in %.0f s", out, timings["total_s"])
    return metrics


_EVAL_KEYS = ("grid_64_s", "eval_s", "total_s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/toy-flux"), help="output folder")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale the step counts (tests: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=None, help="override transformer steps (before scaling)")
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="override the evaluation true_cfg_scale"
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="only re-evaluate the pipeline in --out and rewrite the card"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = FluxTrainConfig(seed=args.seed, threads=args.threads, steps_scale=args.steps_scale)
    if args.steps is not None:
        cfg.transformer_steps = args.steps
    if args.guidance_scale is not None:
        cfg.guidance_scale = args.guidance_scale
    if args.eval_only:
        previous = (
            json.loads((args.out / "metrics.json").read_text())
            if (args.out / "metrics.json").is_file()
            else {}
        )
        if "config" in previous:  # evaluate with the run's own settings (only the guidance may change)
            kept = FluxTrainConfig(**previous["config"])
            kept.threads = args.threads
            if args.guidance_scale is not None:
                kept.guidance_scale = args.guidance_scale
            cfg = kept
        timings = {
            k: v for k, v in previous.get("timings", {}).items() if k.endswith("_s") and k not in _EVAL_KEYS
        }
        t0 = time.time() - sum(timings.values())
        return evaluate_and_write_card(cfg, args.out, timings, t0)
    return run(cfg, args.out)


if __name__ == "__main__":
    main()
