"""Train the toy MMDiT world (a tiny ``StableDiffusion3Pipeline``) from scratch, deterministically, on CPU.

``python -m slimdiff.toy.train_mmdit --out data/toy-mmdit [--steps-scale 0.01]``

Same data rules, caption split, VAE and judges as the UNet toy world (``slimdiff.toy.train``): the
committed toy VAE (``data/toy/pipeline/vae``) is reused unchanged, with SD3's latent normalisation
(``shift_factor`` = latent mean, ``scaling_factor`` = 1 / latent std of the training set); the committed
attribute classifier grades the samples. Stages (one seeded process):

1. the UNet world's fixed training set (same size, seed and two-object share), encoded once by the VAE;
2. ``SD3Transformer2DModel`` and both CLIP text encoders jointly, rectified flow as SD3 trains it
   (``x_t = (1 - s) x0 + s noise``, velocity target ``noise - x0``, logit-normal ``s``), 10% caption
   dropout (both encoders get ``""``) for classifier-free guidance, warmup + cosine lr, EMA weights;
3. evaluation on held-out captions through the stock pipeline (20 flow-matching Euler steps, fixed
   guidance) and the model card.

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
from slimdiff.toy.mmdit import ToyMMDiTConfig
from slimdiff.toy.train import EMA, LossLog, encode_latents, lr_factor

logger = logging.getLogger(__name__)

# the joint blocks' attention + FFN must hold at least this share of the transformer (issue 15)
MIN_TRANSFORMER_SHARE = 0.5


@dataclass
class MMDiTTrainConfig:
    """Step counts are for ``steps_scale=1``; the training steps and data set scale with it."""

    seed: int = 0
    threads: int = 2
    steps_scale: float = 1.0
    model: ToyMMDiTConfig = field(default_factory=ToyMMDiTConfig)
    # fixed data set (the UNet toy world's: same size, seed offset and two-object share)
    dataset_size: int = 30000
    dataset_seed_offset: int = 10
    two_object_fraction: float = 0.75
    # transformer + both text encoders
    transformer_steps: int = 4000
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
    # evaluation (the UNet world's rules)
    eval_samples_per_caption: int = 4
    eval_train_captions: int = 96
    guidance_scale: float = 4.0
    num_inference_steps: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ToyMMDiTConfig(**self.model)
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


def sample_sigmas(cfg: MMDiTTrainConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Noise levels s in (0, 1) of a batch: logit-normal (SD3) or uniform, then the scheduler's shift
    ``shift * s / (1 + (shift - 1) * s)`` (the identity at shift 1), as the sampler's sigmas."""
    if cfg.timestep_sampling == "logit_normal":
        s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    else:
        s = torch.rand(n, generator=generator)
    shift = cfg.model.scheduler_shift
    return shift * s / (1 + (shift - 1) * s)


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """Rectified flow as SD3 trains it: the noisy input ``x_t = (1 - s) x0 + s noise`` and the
    velocity target ``noise - x0`` (``sigma`` (B,); the transformer's timestep is ``1000 s``, the
    loss the plain MSE of its prediction to the target)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def latent_normalisation(means: torch.Tensor) -> tuple[float, float]:
    """SD3's ``(shift_factor, scaling_factor)``: mean and 1 / std of the (unscaled) latents."""
    return float(means.float().mean()), float(1.0 / means.float().std())


def train_transformer(
    cfg: MMDiTTrainConfig, means, stds, shift: float, scale: float, captions, tokenizer, log
):
    """Joint transformer + text-encoder training on precomputed latents (mean, std: (N, 4, 8, 8))."""
    from slimdiff.toy.mmdit import (
        build_text_encoders,
        build_transformer,
        encode_prompt_ids,
        set_repeated_token_attention,
        with_t5_token,
    )
    from slimdiff.toy.models import transformer_share

    mc = cfg.model
    torch.manual_seed(cfg.seed + 4)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    rng = np.random.default_rng([cfg.seed, 24])
    text_encoder, text_encoder_2 = build_text_encoders(mc, seed=cfg.seed + 5)
    transformer = build_transformer(mc, seed=cfg.seed + 7)
    share = transformer_share(transformer)
    if share < MIN_TRANSFORMER_SHARE:
        raise ValueError(
            f"the joint blocks' attention + FFN hold {100 * share:.1f}% of the transformer's parameters; "
            f"the toy MMDiT world needs at least {100 * MIN_TRANSFORMER_SHARE:.0f}% (widen the blocks or shrink "
            "the embedders)"
        )
    # the pipeline's `max_sequence_length` zero T5 tokens as one token of weight t5_tokens (exact)
    set_repeated_token_attention(transformer, mc.t5_tokens)
    tok = {"padding": "max_length", "max_length": mc.max_length, "truncation": True, "return_tensors": "pt"}
    ids = tokenizer(list(captions), **tok).input_ids  # (N, L)
    uncond = tokenizer([""], **tok).input_ids  # (1, L): the pipeline's default negative prompt
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
    for step in tqdm(range(n_steps), desc="mmdit", mininterval=10):
        idx = torch.from_numpy(rng.integers(0, len(means), cfg.batch))
        mean, std = means[idx], stds[idx]
        x0 = (mean + std * torch.randn(mean.shape, generator=gen) - shift) * scale
        batch_ids = ids[idx].clone()
        batch_ids[torch.from_numpy(rng.random(cfg.batch) < cfg.caption_dropout)] = uncond
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(cfg, cfg.batch, gen)
        noisy, target = flow_matching_pair(x0, noise, sigma)
        clip_states, pooled = encode_prompt_ids(
            text_encoder, text_encoder_2, batch_ids, mc.joint_attention_dim
        )
        pred = transformer(noisy, with_t5_token(clip_states), pooled, sigma * 1000).sample
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
            log.log("mmdit", step, loss.item(), cfg.lr * factor)
    ema.copy_to_params()
    set_repeated_token_attention(transformer, None)
    return transformer.eval(), text_encoder.eval(), text_encoder_2.eval()


def load_toy_vae(path: Path | None = None):
    """The committed UNet-world VAE (fp16 on disk), fp32, eval mode."""
    from diffusers import AutoencoderKL

    from slimdiff.toy import toy_pipeline_dir

    folder = Path(path) if path is not None else toy_pipeline_dir() / "vae"
    return AutoencoderKL.from_pretrained(folder, local_files_only=True).float().eval()


def run(cfg: MMDiTTrainConfig, out: Path) -> dict:
    """Train into ``out`` and return the metrics written to ``metrics.json``."""
    from slimdiff.toy.mmdit import assemble_pipeline, build_scheduler, sd3_vae
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
        vae = sd3_vae(vae, shift, scale)
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
    from slimdiff.toy.models import transformer_share

    tr = pipe.transformer
    blocks = tr.transformer_blocks
    return {
        "transformer_parameters": sum(p.numel() for p in tr.parameters()),
        "transformer_share": transformer_share(tr),
        "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "text_encoder_2_parameters": sum(p.numel() for p in pipe.text_encoder_2.parameters()),
        "vae_parameters": sum(p.numel() for p in pipe.vae.parameters()),
        "dual_attention_blocks": [i for i, b in enumerate(blocks) if b.attn2 is not None],
        "context_pre_only_blocks": [i for i, b in enumerate(blocks) if b.context_pre_only],
        "qk_norm": tr.config.qk_norm,
        "latent_shift_factor": float(pipe.vae.config.shift_factor),
        "latent_scaling_factor": float(pipe.vae.config.scaling_factor),
    }


def evaluate_test_subset(pipe, classifier, cfg: MMDiTTrainConfig) -> dict:
    """The UNet world's test reference (:func:`slimdiff.toy.train.test_subset_captions`, seed
    ``TEST_SUBSET_SEED``) plus each image's exact match, so a test can re-sample a prefix of it (the
    pipeline draws the initial noise of a batch in caption order: a prefix gets the same noise)."""
    from slimdiff.toy.evaluate import attribute_accuracy, sample_images, score_slots
    from slimdiff.toy.train import TEST_SUBSET_SEED, test_subset_captions

    caps = test_subset_captions()
    images = sample_images(
        pipe,
        caps,
        seed=TEST_SUBSET_SEED,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
    )
    expected = np.stack([toy_data.caption_slot_labels(c) for c in caps])
    exact = score_slots(classifier.predict(images), expected)["exact"]
    return {
        "test_subset": attribute_accuracy(images, caps, classifier),
        "test_subset_exact": [int(e) for e in exact],
    }


def evaluate_and_write_card(cfg: MMDiTTrainConfig, out: Path, timings: dict[str, float], t0: float) -> dict:
    """Evaluate the pipeline saved in ``out`` (fp16-rounded, what users load) with the UNet world's
    rules; write ``metrics.json``, ``grid.png`` and the card."""
    from slimdiff.toy import load_toy_mmdit_pipeline
    from slimdiff.toy.classifier import load_toy_classifier
    from slimdiff.toy.evaluate import sample_grid
    from slimdiff.toy.train import evaluate_pipeline, grid_captions

    torch.set_num_threads(cfg.threads)
    pipe = load_toy_mmdit_pipeline(path=out / "pipeline")
    classifier = load_toy_classifier()
    t_eval = time.time()
    metrics = {
        "generation": evaluate_pipeline(pipe, classifier, cfg),
        **evaluate_test_subset(pipe, classifier, cfg),
        **model_summary(pipe),
    }
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
    from slimdiff.toy.card import write_mmdit_model_card

    write_mmdit_model_card(out, metrics, grid_captions())
    logger.info("toy MMDiT written to %s in %.0f s", out, timings["total_s"])
    return metrics


_EVAL_KEYS = ("grid_64_s", "eval_s", "total_s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/toy-mmdit"), help="output folder")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale the step counts (tests: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=None, help="override transformer steps (before scaling)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="override the evaluation guidance")
    parser.add_argument(
        "--eval-only", action="store_true", help="only re-evaluate the pipeline in --out and rewrite the card"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = MMDiTTrainConfig(seed=args.seed, threads=args.threads, steps_scale=args.steps_scale)
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
            kept = MMDiTTrainConfig(**previous["config"])
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
