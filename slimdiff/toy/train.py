"""Train every toy-world model from scratch, deterministically, on CPU.

``python -m slimdiff.toy.train --out data/toy [--steps-scale 0.01]``

Stages (one seeded process, ``torch.set_num_threads(threads)``):

1. attribute classifier on fresh renders of all captions (an evaluation tool, so held-out captions
   are allowed here: it never feeds the generator);
2. toy CLIP (open_clip format) contrastively on training captions;
3. VAE (32x32x3 -> 8x8x4) on a fixed data set; latents of that data set are precomputed once;
4. UNet and CLIP text encoder jointly (epsilon prediction, Min-SNR weighting, 10% caption dropout for
   classifier-free guidance, warmup + cosine lr, EMA weights);
5. evaluation on held-out captions (20 DDIM steps, fixed guidance) and the model card.

Writes ``pipeline/`` (fp16 safetensors), ``clip/``, ``classifier/``, ``train_log.csv``,
``metrics.json``, ``grid.png`` and ``MODEL_CARD.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
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
from slimdiff.toy.models import ToyModelConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Step counts are for ``steps_scale=1``; every count is scaled (the test suite uses 0.01)."""

    seed: int = 0
    threads: int = 2
    steps_scale: float = 1.0
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    # attribute classifier
    classifier_steps: int = 800
    classifier_batch: int = 128
    classifier_lr: float = 2e-3
    # toy CLIP
    clip_steps: int = 600
    clip_batch: int = 128
    clip_lr: float = 1e-3
    # VAE
    vae_steps: int = 600
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # fixed data set of the diffusion model (rendered once, encoded once)
    dataset_size: int = 30000
    two_object_fraction: float = 0.75
    # UNet + text encoder
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    # evaluation
    eval_samples_per_caption: int = 4
    eval_train_captions: int = 96
    guidance_scale: float = 4.0
    num_inference_steps: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ToyModelConfig(**self.model)
        if not 0 < self.steps_scale <= 10:
            raise ValueError(f"steps_scale={self.steps_scale}: use a value in (0, 10] (1 = full training)")
        if not 0 <= self.two_object_fraction <= 1:
            raise ValueError(f"two_object_fraction={self.two_object_fraction} must be in [0, 1]")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1")

    def steps(self, n: int) -> int:
        return max(2, round(n * self.steps_scale))


class LossLog:
    """Append-only CSV of (stage, step, loss, lr, elapsed_s); flushed every row so it can be tailed."""

    def __init__(self, path: Path, append: bool = False):
        self.start = time.time()
        resume = append and path.is_file()
        self._f = open(path, "a" if resume else "w", newline="")  # noqa: SIM115 - closed in close()
        self._w = csv.writer(self._f)
        if not resume:
            self._w.writerow(["stage", "step", "loss", "lr", "elapsed_s"])

    def log(self, stage: str, step: int, loss: float, lr: float) -> None:
        self._w.writerow([stage, step, f"{loss:.6f}", f"{lr:.3g}", f"{time.time() - self.start:.1f}"])
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_ratio`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _rng(cfg: TrainConfig, stage: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, stage])


def train_classifier(cfg: TrainConfig, log: LossLog):
    from slimdiff.toy.classifier import ToyAttributeClassifier

    torch.manual_seed(cfg.seed + 1)
    rng = _rng(cfg, 1)
    model = ToyAttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.classifier_lr, weight_decay=1e-4)
    all_caps = list(toy_data.all_single_captions()) + list(toy_data.all_two_captions())
    n_steps = cfg.steps(cfg.classifier_steps)
    model.train()
    for step in tqdm(range(n_steps), desc="classifier", mininterval=5):
        # half single, half two-object scenes over every caption (held-out ones included)
        idx = np.where(
            rng.random(cfg.classifier_batch) < 0.5,
            rng.integers(0, 60, cfg.classifier_batch),
            rng.integers(60, len(all_caps), cfg.classifier_batch),
        )
        caps = [all_caps[i] for i in idx]
        images = np.stack([toy_data.render(c, rng) for c in caps])
        x = toy_data.to_tensor_range(images)
        # mild noise so that slightly imperfect generated images are graded by content, not texture
        x = x + 0.04 * torch.randn_like(x) * (torch.rand(len(x), 1, 1, 1) < 0.5)
        y = torch.from_numpy(np.stack([toy_data.caption_slot_labels(c) for c in caps]))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        lr = cfg.classifier_lr * lr_factor(step, n_steps, max(1, n_steps // 20), 0.02)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == n_steps - 1:
            log.log("classifier", step, loss.item(), lr)
    return model.eval()


def classifier_real_accuracy(model, n: int, seed: int) -> float:
    """Exact-match accuracy of the classifier on ``n`` fresh real images (half single, half two)."""
    from slimdiff.toy.evaluate import score_slots

    rng = np.random.default_rng([seed, 99])
    all_caps = list(toy_data.all_single_captions()) + list(toy_data.all_two_captions())
    caps = [
        all_caps[i] for i in np.where(rng.random(n) < 0.5, rng.integers(0, 60, n), rng.integers(60, 588, n))
    ]
    images = np.stack([toy_data.render(c, rng) for c in caps])
    expected = np.stack([toy_data.caption_slot_labels(c) for c in caps])
    return float(score_slots(model.predict(images), expected)["exact"].mean())


def train_clip(cfg: TrainConfig, log: LossLog):
    from open_clip.loss import ClipLoss

    from slimdiff.toy.clip import build_toy_clip, images_to_clip_input

    model, _, tokenizer = build_toy_clip(seed=cfg.seed + 2)
    rng = _rng(cfg, 2)
    caps_train = toy_data.train_captions()
    tokens = tokenizer(caps_train)  # (C, context_length)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    n_steps = cfg.steps(cfg.clip_steps)
    batch = min(cfg.clip_batch, len(caps_train))
    model.train()
    for step in tqdm(range(n_steps), desc="clip", mininterval=5):
        idx = rng.choice(len(caps_train), size=batch, replace=False)  # distinct captions: no false negatives
        images = np.stack([toy_data.render(caps_train[i], rng) for i in idx])
        image_features = model.encode_image(images_to_clip_input(model, images), normalize=True)
        text_features = model.encode_text(tokens[torch.from_numpy(idx)], normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        lr = cfg.clip_lr * lr_factor(step, n_steps, max(1, n_steps // 20), 0.02)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 20 == 0 or step == n_steps - 1:
            log.log("clip", step, loss.item(), lr)
    return model.eval(), tokenizer


@torch.no_grad()
def clip_retrieval_accuracy(model, tokenizer, captions: list[str], per_caption: int, seed: int) -> float:
    """Top-1 caption retrieval among ``captions`` for real images of each caption (CLIP sanity check)."""
    from slimdiff.toy.clip import encode_images, encode_texts

    rng = np.random.default_rng([seed, 98])
    caps = [c for c in captions for _ in range(per_caption)]
    images = np.stack([toy_data.render(c, rng) for c in caps])
    sims = encode_images(model, images) @ encode_texts(model, tokenizer, captions).T  # (N, C)
    target = torch.arange(len(captions)).repeat_interleave(per_caption)
    return float((sims.argmax(1) == target).float().mean())


def train_vae(cfg: TrainConfig, images: np.ndarray, log: LossLog):
    from slimdiff.toy.models import build_vae

    vae = build_vae(cfg.model, seed=cfg.seed + 3)
    rng = _rng(cfg, 3)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    n_steps = cfg.steps(cfg.vae_steps)
    vae.train()
    for step in tqdm(range(n_steps), desc="vae", mininterval=5):
        x = toy_data.to_tensor_range(images[rng.integers(0, len(images), cfg.vae_batch)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = F.mse_loss(recon, x)
        loss = rec_loss + cfg.vae_kl_weight * posterior.kl().mean()
        lr = cfg.vae_lr * lr_factor(step, n_steps, max(1, n_steps // 20), 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == n_steps - 1:
            log.log("vae", step, rec_loss.item(), lr)
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: two float32 (N, 4, 8, 8), unscaled."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="latents", mininterval=5):
        dist = vae.encode(toy_data.to_tensor_range(images[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class EMA:
    """Exponential moving average of parameters (decay warmed up: min(decay, (1+k)/(10+k)))."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


def train_unet(cfg: TrainConfig, means, stds, scaling: float, captions, tokenizer, log: LossLog):
    """Joint UNet + text-encoder training on precomputed latents (mean, std: (N, 4, 8, 8), unscaled)."""
    from slimdiff.toy.models import build_text_encoder, build_training_scheduler, build_unet

    torch.manual_seed(cfg.seed + 4)
    rng = _rng(cfg, 4)
    text_encoder = build_text_encoder(cfg.model, seed=cfg.seed + 5)
    unet = build_unet(cfg.model, seed=cfg.seed + 6)
    noise_sched = build_training_scheduler(cfg.model)
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=cfg.model.max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # (N, L)
    uncond = tokenizer(
        [""], padding="max_length", max_length=cfg.model.max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (1, L)
    alphas_cumprod = noise_sched.alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # Min-SNR-gamma for epsilon prediction
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": cfg.unet_lr, "peak": cfg.unet_lr},
            {"params": list(text_encoder.parameters()), "lr": cfg.text_lr, "peak": cfg.text_lr},
        ],
        weight_decay=0.01,
    )
    ema = EMA([unet, text_encoder], cfg.ema_decay)
    n_steps = cfg.steps(cfg.unet_steps)
    warmup = min(cfg.warmup_steps, max(1, n_steps // 10))
    unet.train()
    text_encoder.train()
    n_timesteps = noise_sched.config.num_train_timesteps
    for step in tqdm(range(n_steps), desc="unet", mininterval=10):
        idx = torch.from_numpy(rng.integers(0, len(means), cfg.unet_batch))
        latents = (means[idx] + stds[idx] * torch.randn_like(means[idx])) * scaling
        batch_ids = ids[idx].clone()
        drop = torch.from_numpy(rng.random(cfg.unet_batch) < cfg.caption_dropout)
        batch_ids[drop] = uncond
        noise = torch.randn_like(latents)
        t = torch.randint(0, n_timesteps, (cfg.unet_batch,))
        noisy = noise_sched.add_noise(latents, noise, t)
        context = text_encoder(batch_ids)[0]  # (B, L, text_hidden): all token states, as the pipeline uses
        pred = unet(noisy, t, context).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = (per_sample * loss_weight[t]).mean()
        factor = lr_factor(step, n_steps, warmup, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = g["peak"] * factor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        ema.update()
        if step % 20 == 0 or step == n_steps - 1:
            log.log("unet", step, per_sample.mean().item(), cfg.unet_lr * factor)
    ema.copy_to_params()
    return unet.eval(), text_encoder.eval()


def latent_scaling_factor(means: torch.Tensor) -> float:
    """SD's latent scaling factor: 1 / std of the (unscaled) latents of the fixed data set."""
    return float(1.0 / means.float().std())


def evaluate_pipeline(pipe, classifier, cfg: TrainConfig) -> dict:
    """Held-out (and a sample of training) caption accuracy at the card's sampler settings."""
    from slimdiff.toy.evaluate import attribute_accuracy, sample_images

    k = max(1, round(cfg.eval_samples_per_caption * min(1.0, cfg.steps_scale * 10)))
    held = toy_data.heldout_captions()
    held_caps = [c for c in held for _ in range(k)]
    kw = {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale}
    held_images = sample_images(pipe, held_caps, seed=cfg.seed + 100, **kw)
    rng = _rng(cfg, 7)
    train_all = toy_data.train_captions()
    n_train = max(4, round(cfg.eval_train_captions * min(1.0, cfg.steps_scale * 10)))
    train_caps = [
        train_all[i] for i in rng.choice(len(train_all), size=min(n_train, len(train_all)), replace=False)
    ]
    train_images = sample_images(pipe, train_caps, seed=cfg.seed + 101, **kw)
    return {
        "heldout": attribute_accuracy(held_images, held_caps, classifier),
        "train_sample": attribute_accuracy(train_images, train_caps, classifier),
        "samples_per_heldout_caption": k,
        **kw,
    }


def test_subset_captions() -> list[str]:
    """The fixed small held-out set the test suite samples (all 9 single + the first 24 two-object)."""
    return toy_data.heldout_captions("single") + toy_data.heldout_captions("two")[:24]


TEST_SUBSET_SEED = 1234


def evaluate_test_subset(pipe, classifier, cfg: TrainConfig) -> dict:
    """Accuracy on :func:`test_subset_captions` with seed ``TEST_SUBSET_SEED``: the test's reference."""
    from slimdiff.toy.evaluate import attribute_accuracy, sample_images

    caps = test_subset_captions()
    images = sample_images(
        pipe,
        caps,
        seed=TEST_SUBSET_SEED,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
    )
    return attribute_accuracy(images, caps, classifier)


def grid_captions() -> list[str]:
    """The 64 held-out captions of the card's grid: the 9 single-object ones, then 55 two-object ones."""
    return (toy_data.heldout_captions("single") + toy_data.heldout_captions("two"))[:64]


def run(cfg: TrainConfig, out: Path, resume: bool = False) -> dict:
    """Train everything into ``out`` and return the metrics written to ``metrics.json``.

    ``resume``: reuse the classifier and CLIP already saved in ``out`` (timings then exclude them)."""
    from slimdiff.toy.clip import save_toy_clip
    from slimdiff.toy.models import assemble_pipeline, build_scheduler, build_tokenizer, save_pipeline_fp16

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    log = LossLog(out / "train_log.csv", append=resume)
    timings: dict[str, float] = {}
    t0 = time.time()
    try:
        # every stage seeds its own generators, so reusing a finished stage gives the same result
        if resume and (out / "classifier" / "model.safetensors").is_file():
            logger.info("resume: reusing the classifier in %s", out / "classifier")
        else:
            train_classifier(cfg, log).save_pretrained(out / "classifier")
        timings["classifier_s"] = time.time() - t0
        if resume and (out / "clip" / "open_clip_model.safetensors").is_file():
            logger.info("resume: reusing the toy CLIP in %s", out / "clip")
        else:
            clip_model, _ = train_clip(cfg, log)
            save_toy_clip(clip_model, out / "clip")
        timings["clip_s"] = time.time() - t0 - sum(timings.values())

        n_data = max(256, round(cfg.dataset_size * min(1.0, cfg.steps_scale * 10)))
        images, captions = toy_data.make_dataset(
            n_data, seed=cfg.seed + 10, two_object_fraction=cfg.two_object_fraction
        )
        vae = train_vae(cfg, images, log)
        means, stds = encode_latents(vae, images)
        scaling = latent_scaling_factor(means)
        vae.register_to_config(scaling_factor=scaling)
        timings["vae_s"] = time.time() - t0 - sum(timings.values())

        tokenizer = build_tokenizer(cfg.model)
        unet, text_encoder = train_unet(cfg, means, stds, scaling, captions, tokenizer, log)
        timings["unet_s"] = time.time() - t0 - sum(timings.values())
        pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, build_scheduler(cfg.model))
        save_pipeline_fp16(pipe, out / "pipeline")
    finally:
        log.close()
    reused = [name for name in ("classifier", "clip") if resume and timings[f"{name}_s"] < 5.0]
    return evaluate_and_write_card(cfg, out, timings, t0, reused)


def evaluate_and_write_card(
    cfg: TrainConfig, out: Path, timings: dict[str, float], t0: float, reused: list[str]
) -> dict:
    """Evaluate the models saved in ``out``; write ``metrics.json``, ``grid.png`` and the card."""
    # evaluate the saved (fp16-rounded) weights, exactly what users load
    from slimdiff.toy import load_toy_pipeline
    from slimdiff.toy.classifier import ToyAttributeClassifier
    from slimdiff.toy.clip import load_toy_clip
    from slimdiff.toy.evaluate import sample_grid
    from slimdiff.toy.models import transformer_share

    pipe = load_toy_pipeline(path=out / "pipeline")
    classifier = ToyAttributeClassifier.from_pretrained(out / "classifier")
    clip_model, _, clip_tok = load_toy_clip(out / "clip")
    t_eval = time.time()
    metrics = {
        "classifier_real_exact": classifier_real_accuracy(
            classifier, max(200, round(2000 * min(1, cfg.steps_scale * 10))), cfg.seed
        ),
        "clip_heldout_retrieval_top1": clip_retrieval_accuracy(
            clip_model, clip_tok, toy_data.heldout_captions(), 2, cfg.seed
        ),
        "clip_train_retrieval_top1": clip_retrieval_accuracy(
            clip_model, clip_tok, toy_data.train_captions()[::5], 1, cfg.seed
        ),
        "generation": evaluate_pipeline(pipe, classifier, cfg),
        "test_subset": evaluate_test_subset(pipe, classifier, cfg),
        "latent_scaling_factor": float(pipe.vae.config.scaling_factor),
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "unet_transformer_share": transformer_share(pipe.unet),
        "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "vae_parameters": sum(p.numel() for p in pipe.vae.parameters()),
        "clip_parameters": sum(p.numel() for p in clip_model.parameters()),
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
    metrics["reused_stages"] = reused
    metrics["config"] = asdict(cfg)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    from slimdiff.toy.card import write_model_card

    write_model_card(out, metrics, grid_captions())
    logger.info("toy models written to %s in %.0f s", out, timings["total_s"])
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/toy"), help="output folder")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every step count (tests: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--unet-steps", type=int, default=None, help="override UNet steps (before scaling)")
    parser.add_argument(
        "--resume", action="store_true", help="reuse the classifier and CLIP already in --out"
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="only re-evaluate the models in --out and rewrite the card"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig(seed=args.seed, threads=args.threads, steps_scale=args.steps_scale)
    if args.unet_steps is not None:
        cfg.unet_steps = args.unet_steps
    if args.eval_only:
        previous = (
            json.loads((args.out / "metrics.json").read_text())
            if (args.out / "metrics.json").is_file()
            else {}
        )
        timings = {
            k: v for k, v in previous.get("timings", {}).items() if k.endswith("_s") and k not in _EVAL_KEYS
        }
        t0 = time.time() - sum(timings.values())
        return evaluate_and_write_card(cfg, args.out, timings, t0, previous.get("reused_stages", []))
    return run(cfg, args.out, resume=args.resume)


_EVAL_KEYS = ("grid_64_s", "eval_s", "total_s")


if __name__ == "__main__":
    main()
