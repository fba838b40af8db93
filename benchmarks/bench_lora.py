"""A LoRA trained on the ORIGINAL toy UNet, projected onto compressed models (issue 18).

    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py --write   # ~10 min on a shared 2-core CPU
    python benchmarks/bench_lora.py --quick          # a smoke run: short training, one budget, few captions
    python benchmarks/bench_lora.py --lora data/toy/lora/orange.safetensors   # skip training

1. Teach the toy model a color it does not have. "orange" (``slimdiff.toy.newcolor``: RGB
   (240, 145, 35), rendered by the toy world's own renderer with an extended palette) is not in
   the four-color data set; the tokenizer reads it as ``<unk>``. A rank-``--rank`` LoRA on every
   transformer block's attn1 / attn2 to_q, to_k, to_v, to_out.0 and ff.net.0.proj, ff.net.2 (every
   kind of layer the projection maps) is trained with the UNet and the text encoder frozen, on a mix
   of new-color captions (training split) and ordinary training captions (to keep old behaviour):
   epsilon prediction with Min-SNR-5 weights, 10% caption dropout, as the base model was trained.
   A hand-written low-rank hook trains it (no peft); it is written in diffusers/PEFT format
   (``unet.<module>.lora_A.weight`` / ``lora_B``, scale 1), fp16 (``--write``: into
   ``data/toy/lora/``, with a card).
2. Measure the attribute on held-out new-color captions: the pixel rule of
   ``slimdiff.toy.newcolor`` (the classifier knows four colors) for the color, the classifier with
   the color marginalised out for the shape. The rule's accuracy on rendered orange images of the
   same captions (must be 100%) and on red renders (must be 0%) is reported as its validity check.
3. Compress the original at each budget exactly as the pipeline does (params.yaml: SlimSet,
   calibration, influence, error profiles, ``plan_ranks`` at ``removed_fraction``, ``compress_``,
   which records the LoRA maps) and load the LoRA with ``slimdiff.formats.lora.load_lora_into`` (projected,
   fused; peft is not needed). Every model samples the same captions with the same seeds.

Reported per model: new-color accuracy (color / color+shape / exact), kept = that accuracy over
original+LoRA's, exact match on the toy held-out captions (the old behaviour, the committed
classifier) with and without the LoRA, PSNR of the images to original+LoRA's. ``--write`` writes
``benchmarks/results/lora_toy.md``, ``lora_toy_grid.png`` and ``lora_toy.json`` (gitignored).

``--source toy-mmdit``: the same measurement for the toy MMDiT (``data/toy-mmdit``, SD3 family).
The LoRA goes on every joint block's joint attention (``attn.to_q/to_k/to_v/to_out.0`` and the text
stream's ``add_q_proj/add_k_proj/add_v_proj/to_add_out``), the dual attention ``attn2`` where a
block has one, and both FFNs (``ff`` and ``ff_context`` ``net.0.proj`` / ``net.2``): every linear of
the blocks the compression rewrites. It is trained with the transformer and both text encoders
frozen by the objective of ``slimdiff.toy.train_mmdit`` (rectified flow, velocity target,
logit-normal noise levels, its helpers; the 256 zero T5 tokens as one weighted token, as there),
same data mix, caption split, new color and rule; written as ``transformer.<module>.lora_A.weight``
into ``data/toy-mmdit/lora/`` and the results into ``lora_toy_mmdit.md`` / ``_grid.png`` /
``.json``. Sampling the MMDiT costs more than the UNet (272 text tokens: the 256 zero T5 tokens),
so to stay near 10 minutes its defaults (``SOURCES``) grade 40 of the 88 toy held-out captions;
the new-color captions (40 x 2 images) and the training (800 steps) are the UNet's.

``--source toy-flux``: the same measurement for the toy FLUX (``data/toy-flux``, FLUX.1
architecture: ``FluxTransformer2DModel``, issue 24), ``OMP_NUM_THREADS=1 python
benchmarks/bench_lora.py --source toy-flux --threads 1 --write``: about 10 minutes on 2 idle cores (the
``--quick`` smoke run: under a minute). Its defaults (``FLUX_DEFAULTS``) use that the toy FLUX samples
fast (16 image + 16 text tokens): 1600 training steps (twice the UNet's), all 82 held-out new-color
captions x 2 images and all 88 toy held-out captions. The LoRA goes on
every double block's joint attention (``attn.to_q/to_k/to_v/to_out.0`` and the text stream's
``add_q_proj/add_k_proj/add_v_proj/to_add_out``) and both FFNs (``ff`` and ``ff_context``
``net.0.proj`` / ``net.2``), and on every single block's ``attn.to_q/to_k/to_v``, ``proj_mlp`` and
``proj_out`` (the output projection of the packed [attention | MLP] input, which the projection maps
block by block: ``slimdiff.formats.lora.PackedMap``): every linear of the blocks the compression rewrites. It
is trained with the transformer and both text encoders frozen (their states computed once) by the
objective of ``slimdiff.toy.train_flux`` with the committed toy's settings (``data/toy-flux/
metrics.json``): rectified flow on 2x2-packed latents with RoPE position ids, velocity target, the
transformer gets ``t = s`` in [0, 1] (FLUX's convention), logit-normal ``s`` shifted as the sampler
shifts it at 16 image tokens, caption dropout to ``""`` for both encoders (true CFG); same data mix,
caption split, new color and rule. The toy FLUX is sampled as everywhere in slimdiff
(``slimdiff.families.units.pipeline_call_kwargs``: FluxPipeline's true classifier-free guidance with
``negative_prompt=""`` and ``max_sequence_length=16``). Written as ``transformer.<module>.lora_A.weight``
into ``data/toy-flux/lora/``, the results into ``lora_toy_flux.md`` / ``_grid.png`` / ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_lora")

#: the layers of every transformer block the LoRA trains (every kind the projection maps)
TARGET_SUFFIXES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)
#: the MMDiT's: every linear of a joint block that compression rewrites (what lora.py maps)
MMDIT_TARGET_SUFFIXES = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
#: the FLUX's: every linear of a double block (both streams' attention and FFNs) ...
FLUX_DOUBLE_SUFFIXES = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
#: ... and of a single block (q, k, v, the MLP's input and the shared, packed output projection)
FLUX_SINGLE_SUFFIXES = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
#: as ``lora_targets`` matches them (``.proj_out`` names only the single blocks' layer, not the
#: transformer's final ``proj_out``; ``attn.to_q/to_k/to_v`` match in both kinds of block)
FLUX_TARGET_SUFFIXES = FLUX_DOUBLE_SUFFIXES + tuple(
    s for s in FLUX_SINGLE_SUFFIXES if s not in FLUX_DOUBLE_SUFFIXES
)
LORA_FILE = "orange.safetensors"
#: the toy FLUX samples fast (32 tokens: 16 image + 16 text, ~0.1 s per image with true CFG on one
#: thread), so within ~10 minutes it grades all 82 held-out new-color captions (4 single + 78
#: two-object, 2 images each) and all 88 toy held-out captions, and trains twice the UNet's steps
#: (1600, ~0.2 s each: ~5 of the ~10 minutes)
FLUX_DEFAULTS = {"steps": 1600, "new_prompts": 82, "images_per_prompt": 2, "old_prompts": None}

#: per --source: LoRA prefix and targets, output names, and the defaults of the arguments left
#: unset (the MMDiT samples slower than the UNet: fewer held-out images to stay near 10 minutes)
SOURCES = {
    "toy": {
        "prefix": "unet",
        "targets": TARGET_SUFFIXES,
        "stem": "lora_toy",
        "lora_dir": ROOT / "data" / "toy" / "lora",
        "defaults": {"steps": 800, "new_prompts": 40, "images_per_prompt": 2, "old_prompts": None},
    },
    "toy-mmdit": {
        "prefix": "transformer",
        "targets": MMDIT_TARGET_SUFFIXES,
        "stem": "lora_toy_mmdit",
        "lora_dir": ROOT / "data" / "toy-mmdit" / "lora",
        "defaults": {"steps": 800, "new_prompts": 40, "images_per_prompt": 2, "old_prompts": 40},
    },
    "toy-flux": {
        "prefix": "transformer",
        "targets": FLUX_TARGET_SUFFIXES,
        "stem": "lora_toy_flux",
        "lora_dir": ROOT / "data" / "toy-flux" / "lora",
        "defaults": FLUX_DEFAULTS,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--source",
        default="toy",
        choices=sorted(SOURCES),
        help="toy world: the UNet (default), the MMDiT (SD3 family) or the FLUX (FLUX.1 family)",
    )
    ap.add_argument("--write", action="store_true", help="write the results (and the LoRA) into --out")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help="default: data/toy/lora, data/toy-mmdit/lora (MMDiT), data/toy-flux/lora (FLUX)",
    )
    ap.add_argument("--lora", type=Path, default=None, help="use this LoRA file instead of training one")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    # training
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="default: 800 (FLUX: 1600)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dataset", type=int, default=4096, help="rendered training images (half new-color)")
    ap.add_argument("--new-share", type=float, default=0.5, help="share of new-color images in training")
    # evaluation
    ap.add_argument(
        "--new-prompts", type=int, default=None, help="held-out new-color captions (default 40; FLUX: all 82)"
    )
    ap.add_argument("--images-per-prompt", type=int, default=None, help="images per new-color caption (2)")
    ap.add_argument(
        "--old-prompts",
        type=int,
        default=None,
        help="toy held-out captions (default: all 88; MMDiT: 40)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 60 steps, one budget, 8 + 16 captions")
    ap.add_argument(
        "--calibrate-with-lora",
        action="store_true",
        help="LoRA-aware calibration: the compressed models' statistics also cover the SlimSet sampled "
        "with the LoRA fused (slimdiff.formats.lora.collect_stats_with_loras); results go to "
        "<stem>_aware.md / _grid.png / .json",
    )
    ap.add_argument(
        "--lora-calibration-prompts",
        choices=("slimset", "orange-train"),
        default="slimset",
        help="with --calibrate-with-lora: the LoRA run samples the SlimSet (default) or as many "
        "new-color captions of the TRAINING split (never the graded held-out ones); results "
        "<stem>_aware_orange.*",
    )
    ap.add_argument(
        "--rerender",
        action="store_true",
        help="only rewrite lora_toy[_mmdit|_flux].md (and the LoRA card) from --out/lora_toy[_mmdit|_flux].json; "
        "no model runs",
    )
    args = ap.parse_args(argv)
    src = SOURCES[args.source]
    if args.lora_dir is None:
        args.lora_dir = src["lora_dir"]
    for name, value in src["defaults"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and args.write and (args.out, args.lora_dir) == (ap.get_default("out"), src["lora_dir"]):
        ap.error("--quick --write would replace the committed results and LoRA: give --out and --lora-dir")
    if args.calibrate_with_lora and args.write and args.lora is None and args.lora_dir == src["lora_dir"]:
        ap.error("--calibrate-with-lora --write would retrain and replace the committed LoRA: give --lora")
    if args.quick:
        args.steps, args.dataset, args.budgets = 60, 512, [0.4]
        args.new_prompts, args.images_per_prompt, args.old_prompts = 8, 1, 16
    return args


# --------------------------------------------------------------------------------------------
# Training the LoRA (a forward hook per target linear: W x + B (A x))
# --------------------------------------------------------------------------------------------
def lora_targets(unet: nn.Module, suffixes: tuple[str, ...] = TARGET_SUFFIXES) -> list[str]:
    ends = tuple(f".{s}" for s in suffixes)
    return [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(ends)]


class LoraHooks:
    """Rank-``rank`` deltas on ``targets`` as forward hooks (scale 1). A: uniform in
    +-1/sqrt(in) (PEFT's kaiming-uniform), B: zero, so training starts at the base model."""

    def __init__(self, unet: nn.Module, targets: list[str], rank: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.a: dict[str, nn.Parameter] = {}
        self.b: dict[str, nn.Parameter] = {}
        self.handles = []
        for path in targets:
            lin = unet.get_submodule(path)
            bound = 1.0 / math.sqrt(lin.in_features)
            a = nn.Parameter((torch.rand(rank, lin.in_features, generator=g) * 2 - 1) * bound)
            b = nn.Parameter(torch.zeros(lin.out_features, rank))
            self.a[path], self.b[path] = a, b
            self.handles.append(lin.register_forward_hook(self._hook(a, b)))

    @staticmethod
    def _hook(a, b):
        def hook(_module, inputs, output):
            return output + F.linear(F.linear(inputs[0], a), b)

        return hook

    def parameters(self) -> list[nn.Parameter]:
        return [*self.a.values(), *self.b.values()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def state_dict(self, dtype=torch.float16, prefix: str = "unet") -> dict[str, torch.Tensor]:
        out = {}
        for path in self.a:
            out[f"{prefix}.{path}.lora_A.weight"] = self.a[path].detach().to(dtype).contiguous()
            out[f"{prefix}.{path}.lora_B.weight"] = self.b[path].detach().to(dtype).contiguous()
        return out


def training_data(pipe, n: int, new_share: float, seed: int):
    """Rendered images (new-color captions of the training split and ordinary training captions,
    75% two-object as the base model's data), their VAE posteriors and caption indices."""
    from slimdiff.toy import newcolor
    from slimdiff.toy.data import to_tensor_range, train_captions

    rng = np.random.default_rng(seed)
    n_new = int(round(new_share * n))
    new_single, new_two = newcolor.train_new_captions("single"), newcolor.train_new_captions("two")
    old_single, old_two = train_captions("single"), train_captions("two")

    def draw(single, two, k):
        two_mask = rng.random(k) < 0.75
        return [two[rng.integers(len(two))] if t else single[rng.integers(len(single))] for t in two_mask]

    captions = draw(new_single, new_two, n_new) + draw(old_single, old_two, n - n_new)
    images = np.stack([newcolor.render_new(c, rng) for c in captions])
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, n, 256):
            dist = pipe.vae.encode(to_tensor_range(images[i : i + 256])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    return torch.cat(means), torch.cat(stds), torch.tensor([index[c] for c in captions]), unique, images


@torch.no_grad()
def text_states(pipe, captions: list[str]) -> torch.Tensor:
    """The frozen text encoder's token states (N, L, d) as the pipeline computes them."""
    tok = pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return pipe.text_encoder(tok.input_ids)[0]


def optimise(hooks: LoraHooks, args, batch_loss) -> tuple[list[float], float]:
    """AdamW on the LoRA factors, linear warmup (5%) then cosine to 10%, gradient clipping 1.0;
    ``batch_loss(step)`` draws a batch and returns its loss. Returns (losses, seconds)."""
    opt = torch.optim.AdamW(hooks.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    losses: list[float] = []
    t1 = time.perf_counter()
    try:
        for step in range(args.steps):
            loss = batch_loss(step)
            # linear warmup, cosine to 10%
            frac = (step + 1) / warmup if step < warmup else None
            if frac is None:
                prog = (step - warmup) / max(1, args.steps - warmup)
                frac = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))
            for g in opt.param_groups:
                g["lr"] = args.lr * frac
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hooks.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if step % 50 == 0 or step == args.steps - 1:
                recent = losses[-50:]
                log.info(
                    "train step %d/%d loss %.4f (%.0f s)",
                    step + 1,
                    args.steps,
                    sum(recent) / len(recent),
                    time.perf_counter() - t1,
                )
    finally:
        hooks.remove()
    return losses, time.perf_counter() - t1


def training_info(args, targets, state, losses, t_data, t_train, suffixes) -> dict:
    return {
        "rank": args.rank,
        "targets": len(targets),
        "target_kinds": list(suffixes),
        "lora_params": sum(v.numel() for v in state.values()),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "dataset": args.dataset,
        "new_share": args.new_share,
        "seed": args.seed,
        "loss_first_50": sum(losses[:50]) / max(1, len(losses[:50])),
        "loss_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "data_seconds": t_data,
        "train_seconds": t_train,
        "threads": torch.get_num_threads(),
    }


def train_lora(pipe, args) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the LoRA on the ORIGINAL UNet (left unchanged); returns (fp16 state dict, info)."""
    from diffusers import DDPMScheduler

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    means, stds, cap_idx, unique, _ = training_data(pipe, args.dataset, args.new_share, args.seed)
    contexts = text_states(pipe, unique)  # (U, L, d)
    uncond = text_states(pipe, [""])  # (1, L, d)
    t_data = time.perf_counter() - t0
    unet = pipe.unet
    for p in unet.parameters():
        p.requires_grad_(False)
    targets = lora_targets(unet)
    hooks = LoraHooks(unet, targets, args.rank, args.seed + 1)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    ac = sched.alphas_cumprod.float()
    snr = ac / (1 - ac)
    weight = torch.clamp(snr, max=5.0) / snr  # Min-SNR-5, epsilon prediction
    rng = np.random.default_rng(args.seed + 2)
    scaling = float(pipe.vae.config.scaling_factor)

    def batch_loss(_step: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(means), args.batch))
        lat = (means[idx] + stds[idx] * torch.randn_like(means[idx])) * scaling
        ctx = contexts[cap_idx[idx]].clone()
        ctx[torch.from_numpy(rng.random(args.batch) < 0.1)] = uncond[0]
        noise = torch.randn_like(lat)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,))
        pred = unet(sched.add_noise(lat, noise, t), t, ctx).sample
        return (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight[t]).mean()

    losses, t_train = optimise(hooks, args, batch_loss)
    state = hooks.state_dict(torch.float16)
    return state, training_info(args, targets, state, losses, t_data, t_train, TARGET_SUFFIXES)


def mmdit_train_config():
    """The toy MMDiT's own training settings (``data/toy-mmdit/metrics.json``: noise-level
    sampling, caption dropout, scheduler shift, T5 token count), defaults if it is missing."""
    from slimdiff.formats.models import toy_mmdit_pipeline_dir
    from slimdiff.toy.train_mmdit import MMDiTTrainConfig

    metrics = toy_mmdit_pipeline_dir().parent / "metrics.json"
    config = json.loads(metrics.read_text()).get("config") if metrics.is_file() else None
    return MMDiTTrainConfig(**config) if config else MMDiTTrainConfig()


@torch.no_grad()
def mmdit_text_states(pipe, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both frozen CLIPs' states as the pipeline builds them (zero-padded to joint_attention_dim;
    the zero T5 tokens are not appended) and the pooled embeddings: ((N, L, D), (N, P))."""
    from slimdiff.toy.mmdit import encode_prompt_ids

    tok = pipe.tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return encode_prompt_ids(
        pipe.text_encoder, pipe.text_encoder_2, tok.input_ids, pipe.transformer.config.joint_attention_dim
    )


def train_lora_mmdit(pipe, args) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the LoRA on the ORIGINAL toy MMDiT transformer (left unchanged) with the objective of
    ``slimdiff.toy.train_mmdit`` (rectified flow, velocity target, its noise-level sampling, its
    caption dropout; the zero T5 tokens as one token of weight ``t5_tokens``, exact); the text
    encoders are frozen, so their states are computed once. Returns (fp16 state dict, info)."""
    from slimdiff.toy.mmdit import set_repeated_token_attention, with_t5_token
    from slimdiff.toy.train_mmdit import flow_matching_pair, sample_sigmas

    cfg = mmdit_train_config()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    means, stds, cap_idx, unique, _ = training_data(pipe, args.dataset, args.new_share, args.seed)
    states, pooled = mmdit_text_states(pipe, unique, cfg.model.max_length)  # (U, L, D), (U, P)
    u_states, u_pooled = mmdit_text_states(pipe, [""], cfg.model.max_length)  # the default negative
    t_data = time.perf_counter() - t0
    transformer = pipe.transformer
    for p in transformer.parameters():
        p.requires_grad_(False)
    targets = lora_targets(transformer, MMDIT_TARGET_SUFFIXES)
    hooks = LoraHooks(transformer, targets, args.rank, args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    gen = torch.Generator().manual_seed(args.seed + 3)
    shift, scale = float(pipe.vae.config.shift_factor), float(pipe.vae.config.scaling_factor)
    processors = transformer.attn_processors
    set_repeated_token_attention(transformer, cfg.model.t5_tokens)

    def batch_loss(_step: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(means), args.batch))
        mean, std = means[idx], stds[idx]
        x0 = (mean + std * torch.randn(mean.shape, generator=gen) - shift) * scale
        st, po = states[cap_idx[idx]].clone(), pooled[cap_idx[idx]].clone()
        drop = torch.from_numpy(rng.random(args.batch) < cfg.caption_dropout)
        st[drop], po[drop] = u_states[0], u_pooled[0]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(cfg, args.batch, gen)
        noisy, target = flow_matching_pair(x0, noise, sigma)
        pred = transformer(noisy, with_t5_token(st), po, sigma * 1000).sample
        return F.mse_loss(pred, target)

    try:
        losses, t_train = optimise(hooks, args, batch_loss)
    finally:
        transformer.set_attn_processor(processors)
    state = hooks.state_dict(torch.float16, prefix="transformer")
    info = training_info(args, targets, state, losses, t_data, t_train, MMDIT_TARGET_SUFFIXES)
    info["objective"] = {
        "timestep_sampling": cfg.timestep_sampling,
        "logit_mean": cfg.logit_mean,
        "logit_std": cfg.logit_std,
        "scheduler_shift": cfg.model.scheduler_shift,
        "caption_dropout": cfg.caption_dropout,
        "t5_tokens": cfg.model.t5_tokens,
    }
    return state, info


def flux_train_config():
    """The toy FLUX's own training settings (``data/toy-flux/metrics.json``: noise-level sampling,
    caption dropout, text length; the scheduler shift follows from its model config), defaults if
    it is missing."""
    from slimdiff.formats.models import toy_flux_pipeline_dir
    from slimdiff.toy.train_flux import FluxTrainConfig

    metrics = toy_flux_pipeline_dir().parent / "metrics.json"
    config = json.loads(metrics.read_text()).get("config") if metrics.is_file() else None
    return FluxTrainConfig(**config) if config else FluxTrainConfig()


@torch.no_grad()
def flux_text_states(pipe, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both frozen encoders' outputs as FluxPipeline's ``encode_prompt`` builds them (one toy
    tokenizer, ``max_sequence_length`` = ``max_length``): the token encoder's last hidden states and CLIP's pooled
    output, ((N, L, D), (N, P))."""
    from slimdiff.toy.flux import encode_prompt_ids

    tok = pipe.tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return encode_prompt_ids(pipe.text_encoder, pipe.text_encoder_2, tok.input_ids)


def train_lora_flux(pipe, args) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the LoRA on the ORIGINAL toy FLUX transformer (left unchanged) with the objective of
    ``slimdiff.toy.train_flux`` and the committed toy's settings: rectified flow on 2x2-packed
    latents (FLUX's latent normalisation) with the pipeline's RoPE position ids, velocity target,
    the transformer gets ``t = s`` in [0, 1] (FLUX's convention), logit-normal ``s`` with the
    sampler's shift, caption dropout to the ``""`` states of both encoders (true CFG). The text
    encoders are frozen, so their states are computed once. Returns (fp16 state dict, info)."""
    from slimdiff.toy.flux import pack_latents, position_ids
    from slimdiff.toy.train_mmdit import flow_matching_pair, sample_sigmas

    cfg = flux_train_config()
    max_length = cfg.model.max_length
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    means, stds, cap_idx, unique, _ = training_data(pipe, args.dataset, args.new_share, args.seed)
    states, pooled = flux_text_states(pipe, unique, max_length)  # (U, L, D), (U, P)
    u_states, u_pooled = flux_text_states(pipe, [""], max_length)  # the negative prompt of true CFG
    t_data = time.perf_counter() - t0
    transformer = pipe.transformer
    for p in transformer.parameters():
        p.requires_grad_(False)
    targets = lora_targets(transformer, FLUX_TARGET_SUFFIXES)
    hooks = LoraHooks(transformer, targets, args.rank, args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    gen = torch.Generator().manual_seed(args.seed + 3)
    shift, scale = float(pipe.vae.config.shift_factor), float(pipe.vae.config.scaling_factor)
    img_ids, txt_ids = position_ids(max_length)

    def batch_loss(_step: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(means), args.batch))
        mean, std = means[idx], stds[idx]
        x0 = pack_latents((mean + std * torch.randn(mean.shape, generator=gen) - shift) * scale)
        st, po = states[cap_idx[idx]].clone(), pooled[cap_idx[idx]].clone()
        drop = torch.from_numpy(rng.random(args.batch) < cfg.caption_dropout)
        st[drop], po[drop] = u_states[0], u_pooled[0]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(cfg, args.batch, gen)
        noisy, target = flow_matching_pair(x0, noise, sigma)
        pred = transformer(
            hidden_states=noisy,
            encoder_hidden_states=st,
            pooled_projections=po,
            timestep=sigma,  # FluxPipeline passes timestep / 1000 = sigma
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None,
        ).sample
        return F.mse_loss(pred, target)

    losses, t_train = optimise(hooks, args, batch_loss)
    state = hooks.state_dict(torch.float16, prefix="transformer")
    info = training_info(args, targets, state, losses, t_data, t_train, FLUX_TARGET_SUFFIXES)
    info["objective"] = {
        "timestep_sampling": cfg.timestep_sampling,
        "logit_mean": cfg.logit_mean,
        "logit_std": cfg.logit_std,
        "scheduler_shift": cfg.model.scheduler_shift,
        "caption_dropout": cfg.caption_dropout,
        "max_sequence_length": max_length,
    }
    return state, info


def save_lora(state: dict[str, torch.Tensor], info: dict, folder: Path, source: str = "toy") -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_FILE
    src = SOURCES[source]
    prefix = src["prefix"]
    # scale 1 (alpha = r): diffusers' convention without alphas; the metadata says so explicitly
    # PEFT matches target_modules by name suffix: FLUX's "proj_out" would also name the
    # transformer's final layer, so the FLUX LoRA lists its module paths
    targets = list(src["targets"])
    if source == "toy-flux":
        targets = sorted(
            k[len(prefix) + 1 : -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")
        )
    meta = {
        f"{prefix}.r": info["rank"],
        f"{prefix}.lora_alpha": info["rank"],
        f"{prefix}.target_modules": targets,
    }
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    write_card(info, folder, source)
    return path


def write_card(info: dict, folder: Path, source: str = "toy") -> Path:
    """The LoRA's card (``README.md`` next to it) from the training info."""
    if source == "toy-mmdit":
        return write_card_mmdit(info, folder)
    if source == "toy-flux":
        return write_card_flux(info, folder)
    kinds = ", ".join(f"`{k}`" for k in TARGET_SUFFIXES)
    card = f"""# orange: a LoRA teaching the toy UNet a fifth color

A diffusers/PEFT-format LoRA (`unet.<module>.lora_A.weight` / `lora_B.weight`, fp16, scale 1) for
the committed toy UNet (`data/toy/pipeline`). It teaches the model to draw "orange" (RGB
(240, 145, 35), `slimdiff.toy.newcolor`), a color the toy data set does not have; the toy tokenizer
reads the word as `<unk>`, so the LoRA draws orange for `<unk>` in a color position. It is the LoRA
of `benchmarks/bench_lora.py` (results: `benchmarks/results/lora_toy.md`) and of the known-answer
tests in `tests/test_lora_toy.py`.

- Targets: {info["targets"]} linears, every transformer block's {kinds}; rank {info["rank"]},
  {info["lora_params"]:,} parameters.
- Training: UNet and text encoder frozen; {info["dataset"]} rendered images (a share of
  {info["new_share"]:g} new-color captions of the training split of `slimdiff.toy.newcolor`, the rest
  ordinary toy training captions, 75% two-object), VAE posterior samples; {info["steps"]} steps x
  {info["batch"]}, AdamW lr {info["lr"]:g} (5% warmup, cosine to 10%), epsilon prediction with
  Min-SNR-5 weights, 10% caption dropout, seed {info["seed"]}, {info["threads"]} CPU thread(s),
  {info["train_seconds"]:.0f} s. Loss {info["loss_first_50"]:.4f} (first 50 steps) ->
  {info["loss_last_50"]:.4f} (last 50).
- Reproduce: `python benchmarks/bench_lora.py --threads {info["threads"]} --write` (trains it again;
  the thread count changes the order of floating-point reductions, so the weights are reproducible
  only with the same thread count).
"""
    (folder / "README.md").write_text(card)
    return folder / "README.md"


def write_card_mmdit(info: dict, folder: Path) -> Path:
    """The MMDiT LoRA's card."""
    kinds = ", ".join(f"`{k}`" for k in MMDIT_TARGET_SUFFIXES)
    obj = info.get("objective", {})
    card = f"""# orange: a LoRA teaching the toy MMDiT a fifth color

A diffusers/PEFT-format LoRA (`transformer.<module>.lora_A.weight` / `lora_B.weight`, fp16, scale 1)
for the committed toy MMDiT (`data/toy-mmdit/pipeline`, SD3 family: `SD3Transformer2DModel` with
q/k RMSNorms, dual attention in the first blocks, a `context_pre_only` last block). It teaches the
model to draw "orange" (RGB (240, 145, 35), `slimdiff.toy.newcolor`), a color the toy data set does
not have; the toy tokenizer reads the word as `<unk>`, so the LoRA draws orange for `<unk>` in a
color position. It is the LoRA of `benchmarks/bench_lora.py --source toy-mmdit` (results:
`benchmarks/results/lora_toy_mmdit.md`) and of the known-answer tests in `tests/test_lora_toy.py`.

- Targets: {info["targets"]} linears of the joint blocks, each block's {kinds} where the block has
  them (`attn2` in the dual-attention blocks; no `to_add_out` / `ff_context` in the last,
  `context_pre_only` block); rank {info["rank"]}, {info["lora_params"]:,} parameters.
- Training: transformer and both text encoders frozen; {info["dataset"]} rendered images (a share of
  {info["new_share"]:g} new-color captions of the training split of `slimdiff.toy.newcolor`, the rest
  ordinary toy training captions, 75% two-object), VAE posterior samples with SD3's latent
  normalisation; {info["steps"]} steps x {info["batch"]}, AdamW lr {info["lr"]:g} (5% warmup, cosine
  to 10%), the base model's objective (`slimdiff.toy.train_mmdit`: rectified flow
  `x_t = (1 - s) x0 + s noise`, velocity target `noise - x0`, {obj.get("timestep_sampling", "?")}
  `s` (mean {obj.get("logit_mean", "?")}, std {obj.get("logit_std", "?")}), shift
  {obj.get("scheduler_shift", "?")}, {100 * obj.get("caption_dropout", 0):g}% caption dropout, the
  {obj.get("t5_tokens", "?")} zero T5 tokens as one token of that weight), seed {info["seed"]},
  {info["threads"]} CPU thread(s), {info["train_seconds"]:.0f} s. Loss {info["loss_first_50"]:.4f}
  (first 50 steps) -> {info["loss_last_50"]:.4f} (last 50).
- Reproduce: `python benchmarks/bench_lora.py --source toy-mmdit --threads {info["threads"]} --write`
  (trains it again; the thread count changes the order of floating-point reductions, so the
  weights are reproducible only with the same thread count).
"""
    (folder / "README.md").write_text(card)
    return folder / "README.md"


def write_card_flux(info: dict, folder: Path) -> Path:
    """The FLUX LoRA's card."""
    obj = info.get("objective", {})
    card = f"""# orange: a LoRA teaching the toy FLUX a fifth color

A diffusers/PEFT-format LoRA (`transformer.<module>.lora_A.weight` / `lora_B.weight`, fp16, scale 1)
for the committed toy FLUX (`data/toy-flux/pipeline`, FLUX.1 architecture: `FluxTransformer2DModel`
with double- and single-stream blocks, per-head q/k RMSNorms, rotary position embeddings, no
guidance embedding). It teaches the model to draw "orange" (RGB (240, 145, 35),
`slimdiff.toy.newcolor`), a color the toy data set does not have; the toy tokenizer (both encoders')
reads the word as `<unk>`, so the LoRA draws orange for `<unk>` in a color position. It is the LoRA
of `benchmarks/bench_lora.py --source toy-flux` (results: `benchmarks/results/lora_toy_flux.md`).

- Targets: {info["targets"]} linears: {flux_target_text()}; rank {info["rank"]},
  {info["lora_params"]:,} parameters. The single blocks' `proj_out` reads the packed
  [attention output | MLP hidden] input; a compressed model gets each column block through its own
  unit's map (`slimdiff.formats.lora.PackedMap`).
- Training: transformer and both text encoders frozen (their states computed once); {info["dataset"]}
  rendered images (a share of {info["new_share"]:g} new-color captions of the training split of
  `slimdiff.toy.newcolor`, the rest ordinary toy training captions, 75% two-object), VAE posterior
  samples with FLUX's latent normalisation; {info["steps"]} steps x {info["batch"]}, AdamW lr
  {info["lr"]:g} (5% warmup, cosine to 10%), the base model's objective (`slimdiff.toy.train_flux`,
  its settings from `data/toy-flux/metrics.json`: rectified flow on 2x2-packed latents with the
  pipeline's RoPE position ids, `x_t = (1 - s) x0 + s noise`, velocity target `noise - x0`, the
  transformer gets `t = s` in [0, 1] as FluxPipeline passes it, {obj.get("timestep_sampling", "?")}
  `s` (mean {obj.get("logit_mean", "?")}, std {obj.get("logit_std", "?")}) shifted by
  {obj.get("scheduler_shift", float("nan")):.3f} (the sampler's dynamic shift at 16 image tokens),
  {100 * obj.get("caption_dropout", 0):g}% caption dropout to the `""` states of both encoders, the
  {obj.get("max_sequence_length", "?")} text tokens the toy is sampled with), seed {info["seed"]},
  {info["threads"]} CPU thread(s), {info["train_seconds"]:.0f} s. Loss {info["loss_first_50"]:.4f}
  (first 50 steps) -> {info["loss_last_50"]:.4f} (last 50).
- Use: FluxPipeline with true classifier-free guidance (`true_cfg_scale`, `negative_prompt=""`,
  `max_sequence_length=16`, 32 x 32 px), as `slimdiff.families.units.pipeline_call_kwargs` sets it.
- Reproduce: `python benchmarks/bench_lora.py --source toy-flux --threads {info["threads"]} --write`
  (trains it again; the thread count changes the order of floating-point reductions, so the
  weights are reproducible only with the same thread count).
"""
    (folder / "README.md").write_text(card)
    return folder / "README.md"


def flux_target_text() -> str:
    """Which layers of the toy FLUX the LoRA targets, in words."""
    double = ", ".join(f"`{k}`" for k in FLUX_DOUBLE_SUFFIXES)
    single = ", ".join(f"`{k}`" for k in FLUX_SINGLE_SUFFIXES)
    return f"every double block's {double} and every single block's {single}"


# --------------------------------------------------------------------------------------------
# Compression, as the pipeline does it
# --------------------------------------------------------------------------------------------
def calibrate(pipe, params, lora=None, lora_prompts: str = "slimset", seed: int = 0):
    """SlimSet (toy CLIP, evaluation prompts excluded), statistics, influence, covariances and
    error profiles: the pipeline's slimset, calibrate and influence stages. With ``lora`` (LoRA-aware
    calibration) the statistics add a run with the LoRA fused (``collect_stats_with_loras``) on the
    SlimSet or, ``lora_prompts="orange-train"``, on as many new-color captions of the training split."""
    from slimdiff.calibration.embedders import OpenClipEmbedder
    from slimdiff.calibration.slimset import build_slimset
    from slimdiff.families.base import denoiser_of
    from slimdiff.formats.lora import collect_stats_with_loras
    from slimdiff.planning.influence import compute_influence
    from slimdiff.planning.spectra import error_profiles
    from slimdiff.toy.clip import CHECKPOINT_NAME, register_toy_clip_config, toy_clip_dir
    from slimdiff.toy.data import heldout_captions, train_captions

    sl, cal = params.slimset, params.calibration
    if sl.pool != "toy" or params.evaluation.prompts != "toy-heldout" or sl.embedder.kind != "toy":
        raise SystemExit(
            "bench_lora.py runs the toy world: params.yaml must use the toy pool, embedder and prompts"
        )
    embedder = OpenClipEmbedder(register_toy_clip_config(), str(toy_clip_dir() / CHECKPOINT_NAME))
    slimset = build_slimset(
        train_captions(),
        embedder,
        n=sl.n,
        exclude=heldout_captions(),
        seed=sl.seed,
        canonical_share=sl.canonical_share,
        near_dup_threshold=sl.near_dup_threshold,
    )
    extra = {}
    if lora is not None and lora_prompts == "orange-train":
        from slimdiff.toy.newcolor import train_new_captions

        pool = train_new_captions()
        rng = np.random.default_rng(seed + 200)
        picked = rng.choice(len(pool), size=min(len(slimset.prompts), len(pool)), replace=False)
        extra["lora_prompts"] = [pool[i] for i in sorted(picked)]
    stats = collect_stats_with_loras(  # without a LoRA: collect_stats itself
        pipe,
        slimset.prompts,
        [] if lora is None else [lora],
        **extra,
        **cal.sampler_options(),
        progress=False,
    )
    denoiser = denoiser_of(pipe)
    influence = compute_influence(stats, denoiser, weighting=params.influence.weighting)
    covariances = influence.aggregate(stats)
    profiles = error_profiles(denoiser, covariances, damping=params.compression.damping)
    return len(slimset.prompts), influence, covariances, profiles


def compressed_unet(unet, params, influence, covariances, profiles, fraction: float):
    """The plan and compression stages at ``removed_fraction`` (the committed allocation)."""
    from slimdiff.families.units import compression_units, planned_units
    from slimdiff.planning.allocation import plan_ranks
    from slimdiff.planning.budget import Budget
    from slimdiff.surgery.compress import compress_

    alloc, comp = params.allocation, params.compression
    units = planned_units(compression_units(unet), alloc.modules, comp.qk_norm)
    plan = plan_ranks(
        influence.score_of(),
        units,
        Budget(removed_fraction=fraction),
        model_params=sum(p.numel() for p in unet.parameters()),
        profiles=profiles if alloc.mode == "error" else None,
        **alloc.solver_options(),
    )
    slim = copy.deepcopy(unet)
    # lora_maps=True (the default): the maps load_lora_into projects with
    compress_(slim, plan, covariances, **comp.compress_options())
    return slim.eval(), plan


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
class Sampler:
    """Samples every model on the same caption lists with the same seeds (sample_images: one
    generator per list, fixed batches) and grades them."""

    def __init__(self, new_captions: list[str], old_captions: list[str], ev, classifier):
        self.new, self.old, self.ev, self.classifier = new_captions, old_captions, ev, classifier

    def sample(self, pipe, captions: list[str]) -> np.ndarray:
        from slimdiff.toy.evaluate import sample_images

        return sample_images(
            pipe,
            captions,
            seed=self.ev.seed,
            num_inference_steps=self.ev.num_inference_steps,
            guidance_scale=self.ev.guidance_scale,
            batch_size=self.ev.batch_size,
        )

    def new_color(self, pipe) -> tuple[dict, np.ndarray]:
        from slimdiff.toy.newcolor import new_color_accuracy

        images = self.sample(pipe, self.new)
        return new_color_accuracy(images, self.new, self.classifier), images

    def held_out(self, pipe) -> tuple[dict, np.ndarray]:
        from slimdiff.toy.evaluate import attribute_accuracy

        images = self.sample(pipe, self.old)
        return attribute_accuracy(images, self.old, self.classifier), images


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    from slimdiff.evaluation.evaluate import PSNR_CAP_DB
    from slimdiff.evaluation.metrics import capped_mean_psnr, psnr, uint8_to_float

    return capped_mean_psnr(psnr(uint8_to_float(a), uint8_to_float(b)), PSNR_CAP_DB)


def labelled_grid(rows: list[tuple[str, np.ndarray]], captions: list[str], scale: int = 3, pad: int = 3):
    """One row of tiles per (label, images), ``scale``x nearest; captions are listed in the md."""
    from PIL import Image, ImageDraw

    label_w = 190
    n = len(rows[0][1])
    h = rows[0][1].shape[1] * scale
    grid = Image.new("RGB", (label_w + n * (h + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 5), label, fill=(0, 0, 0))
        for c, im in enumerate(images):
            tile = Image.fromarray(im).resize((h, h), Image.NEAREST)
            grid.paste(tile, (label_w + pad + c * (h + pad), y))
    return grid


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _db(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _texts(source: str) -> dict[str, str]:
    """The words of the report that differ between the toy UNet, MMDiT and FLUX."""
    if source == "toy-flux":
        return {
            "title": "# LoRA on the compressed toy FLUX",
            "command": "python benchmarks/bench_lora.py --source toy-flux",
            "model": "toy FLUX (`data/toy-flux`, FLUX.1 architecture: `FluxTransformer2DModel`, double-stream "
            "blocks with joint attention and single-stream blocks with parallel attention + MLP, per-head "
            "q/k RMSNorms, rotary position embeddings, no guidance embedding)",
            "params": "transformer params",
            "denoiser": "FLUX transformer",
            "blocks": None,  # two kinds of block: flux_target_text
            "frozen": "transformer and both text encoders frozen (their states computed once)",
            "objective": "the base model's objective and settings (`slimdiff.toy.train_flux`, "
            "`data/toy-flux/metrics.json`: rectified flow on 2x2-packed latents with the pipeline's RoPE "
            "position ids, velocity target, `t = s` in [0, 1] as FluxPipeline passes it, logit-normal noise "
            "levels with the sampler's shift at 16 image tokens)",
            "dropout_to": ' (both encoders get the `""` states: true CFG)',
            "unk_state": "token-encoder state (and its effect on CLIP's pooled output)",
            "sampler": "flow-matching Euler (FLUX's dynamic shift) with FluxPipeline's true classifier-free "
            'guidance (`true_cfg_scale`, `negative_prompt=""`, `max_sequence_length=16`: '
            "`slimdiff.families.units.pipeline_call_kwargs`),",
            "stem": "lora_toy_flux",
        }
    if source == "toy-mmdit":
        return {
            "title": "# LoRA on the compressed toy MMDiT",
            "command": "python benchmarks/bench_lora.py --source toy-mmdit",
            "model": "toy MMDiT (`data/toy-mmdit`, SD3 family: `SD3Transformer2DModel`, joint attention "
            "with q/k RMSNorms, dual attention, a `context_pre_only` last block)",
            "params": "transformer params",
            "denoiser": "MMDiT transformer",
            "blocks": "joint block's",
            "frozen": "transformer and both text encoders frozen",
            "objective": "the base model's objective (`slimdiff.toy.train_mmdit`: rectified flow, velocity "
            "target, logit-normal noise levels, the 256 zero T5 tokens as one weighted token)",
            "sampler": "flow-matching Euler",
            "stem": "lora_toy_mmdit",
        }
    return {
        "title": "# LoRA on compressed toy models",
        "command": "python benchmarks/bench_lora.py",
        "model": "toy UNet",
        "params": "UNet params",
        "denoiser": "UNet",
        "blocks": "transformer block's",
        "frozen": "UNet and text encoder frozen",
        "objective": "Min-SNR-5",
        "sampler": "DDIM",
        "stem": "lora_toy",
    }


def coverage_lines(cov: dict | None) -> list[str]:
    """The report's sentence on which layers of the denoiser the projection maps and how."""
    if not cov:
        return []
    kinds = "; ".join(
        f"{kind}: " + ", ".join(f"`{name}` x{n}" for name, n in sorted(names.items()))
        for kind, names in cov["linears"].items()
    )
    unmappable = "; ".join(f"`{k}`: {r}" for k, r in cov["unmappable"].items()) or "none"
    single = any(n.startswith("single.") for names in cov["linears"].values() for n in names)
    packed = (
        " Names `single.*` are the single blocks' layers, the other block names the double blocks'; "
        "`cols_packed`: a single block's `proj_out`, whose input columns are [attention output | MLP "
        "hidden], each column block through its own unit's map (`slimdiff.formats.lora.PackedMap`)."
        if single
        else ""
    )
    return [
        f"- What the projection can map, per linear layer of the transformer (the maps of the "
        f"{cov['removed']} model): {kinds}. Unmappable (no map recorded): {unmappable}. A LoRA on an "
        "`identity` layer carries over as it is: layers of units this plan keeps whole (here the "
        "attention linears listed under identity) and those compression never touches (adaLN "
        "modulations, embedders, the output layer). Not LoRA targets at all: the per-head q/k RMSNorm gains "
        f"({cov['norms']} norms; the QK coordinate selection rewrites them), which are not linear layers."
        + packed,
    ]


def layer_coverage(model: nn.Module, label: str) -> dict:
    """Per linear layer of a compressed ``model``: the kind of its recorded LoRA map (or
    "identity"; "cols_packed" for a linear whose column blocks have maps of their own, a FLUX single
    block's ``proj_out``), grouped by the layer's name inside its block (a FLUX single block's:
    ``single.<name>``); unmappable layers with the reason."""
    from slimdiff.families.base import split_path
    from slimdiff.formats.lora import maps_of

    maps = maps_of(model)
    packed: dict[str, list[str]] = {}
    for key in (*maps.layers, *maps.unmappable):
        base, cols = split_path(key)
        if cols is not None:
            packed.setdefault(base, []).append(key)
    linears: dict[str, dict[str, int]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name in maps.unmappable:
            continue
        if any(k in maps.unmappable for k in packed.get(name, ())):
            continue
        if name in maps.layers:
            kind = maps.layers[name].kind
        else:
            kind = "cols_packed" if name in packed else "identity"
        if name.startswith("transformer_blocks."):
            short = name.split(".", 2)[2]
        elif name.startswith("single_transformer_blocks."):
            short = "single." + name.split(".", 2)[2]
        else:
            short = name
        linears.setdefault(kind, {})
        linears[kind][short] = linears[kind].get(short, 0) + 1
    norms = sum(
        1
        for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k") and mod is not None
    )
    return {"removed": label, "linears": linears, "unmappable": dict(maps.unmappable), "norms": norms}


def render_md(res: dict) -> str:
    p, tr, v = res["protocol"], res["training"], res["validity"]
    rows = res["rows"]
    source = p.get("source", "toy")
    w = _texts(source)
    aware = p.get("calibrate_with_lora")
    command = w["command"] + (f" --lora {p['lora_arg']}" if p.get("lora_arg") else "")
    if aware:
        command += " --calibrate-with-lora" + (
            " --lora-calibration-prompts orange-train" if aware == "orange-train" else ""
        )
    lines = [
        w["title"] + (", LoRA-aware calibration" if aware else ""),
        "",
        f"Generated by `{command} --threads {p['threads']} --write`; do not edit by hand.",
        "",
        f"A LoRA trained on the ORIGINAL {w['model']} to draw a color the toy world does not have "
        '("orange", RGB (240, 145, 35)), loaded into models compressed by the default pipeline '
        "with `slimdiff.formats.lora.load_lora_into` (the closed-form projection, fused).",
        "",
        f"| model | removed | {w['params']} | orange % | orange + shape % | orange exact % | kept (orange) "
        "| held-out exact %, no LoRA | held-out exact %, with LoRA | PSNR to orig+LoRA, orange dB "
        "| PSNR to orig+LoRA, held-out dB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['removed']} | {r['unet_params']:,} | {_pct(r['new']['color'])} | "
            f"{_pct(r['new']['color_shape'])} | {_pct(r['new']['exact'])} | "
            f"{_pct(r.get('kept'))} | {_pct(r.get('old_exact_no_lora'))} | {_pct(r.get('old_exact_lora'))} | "
            f"{_db(r.get('psnr_new'))} | {_db(r.get('psnr_old'))} |"
        )
    at40 = next((r for r in rows if r.get("fraction") == 0.4), None)
    verdict = (
        f"At 40% removed the compressed model keeps **{_pct(at40['kept'])}%** of original+LoRA's orange "
        f"accuracy (target >= 90%: {'met' if at40['kept'] >= 0.9 else 'missed'})."
        if at40 and at40.get("kept") is not None
        else ""
    )
    lines += [
        "",
        verdict,
        "",
        "- **orange %**: share of images whose orange object(s) read orange in their slot by the pixel "
        "rule of `slimdiff.toy.newcolor` (the core of the object pixels in the slot's window; the "
        "palette color or orange nearest to their mean RGB, if within 45 of it, else another color); "
        "**+ shape**: and the attribute classifier, with the color marginalised out, reads the "
        "object's shape there; **exact**: every object of the caption has its color (rule) and shape "
        "(classifier) in its slot and the other slots are empty. **kept** = orange % / "
        f"original+LoRA's orange %. {v['n']} images per row: one image is "
        f"{100 / v['n']:.2f} points.",
        f"- **Validity of the rule** on rendered ground truth, {v['n']} renders of the same captions: "
        f"orange renders read {_pct(v['new_color_renders']['color'])}% orange, "
        f"{_pct(v['new_color_renders']['color_shape'])}% orange + shape, "
        f"{_pct(v['new_color_renders']['exact'])}% exact; the same renders in red and in yellow (the two "
        f"nearest palette colors) read {_pct(v['red_renders']['color'])}% and "
        f"{_pct(v['yellow_renders']['color'])}% orange. **Ceiling** of any {w['denoiser']} through the committed "
        f"VAE: the orange renders encoded and decoded read {_pct(v['vae_round_trip']['color'])}% orange, "
        f"{_pct(v['vae_round_trip']['exact'])}% exact (the decoder was trained on four colors; a color "
        "farther from them, such as purple, comes back as red or red-orange: 0% with the same rule, "
        "`slimdiff.toy.newcolor`).",
        f"- **held-out exact**: `slimdiff.toy.evaluate.attribute_accuracy` (committed classifier) on "
        f"the {p['old_prompts']} toy held-out captions, {p['old_images_per_prompt']} image each: the old "
        "behaviour, without and with the LoRA.",
        f"- **PSNR**: per image to original+LoRA's image of the same caption and seed (uint8 in [0, 1], "
        f"capped at {p['psnr_cap_db']:g} dB before the mean).",
        "",
        "## Protocol",
        "",
        f"- LoRA: rank {tr['rank']} on {tr['targets']} linears ("
        + (
            flux_target_text().replace("`", "")
            if source == "toy-flux"
            else f"every {w['blocks']} {', '.join(tr['target_kinds'])}"
        )
        + f"), {tr['lora_params']:,} parameters, stored fp16 "
        f"(`{p['lora_file']}`) and used upcast to fp32. "
        + (
            f"Trained here: {w['frozen']}, {tr['dataset']} renders ({tr['new_share']:g} "
            f"orange captions of the training split, the rest ordinary training captions, 75% two-object), "
            f"{tr['steps']} steps x {tr['batch']}, AdamW lr {tr['lr']:g}, {w['objective']}, "
            f"{100 * (tr.get('objective') or {}).get('caption_dropout', 0.1):g}% caption dropout"
            f"{w.get('dropout_to', '')}, "
            f"seed {tr['seed']}; loss {tr['loss_first_50']:.4f} (first 50 steps) -> {tr['loss_last_50']:.4f} "
            "(last 50)."
            if tr.get("steps")
            else "Loaded from the file (not retrained in this run)."
        ),
        '- "orange" is not a word of the toy tokenizer: it is read as `<unk>`, whose frozen '
        f"{w.get('unk_state', 'text-encoder state')} the LoRA learns to draw as orange.",
        f"- New-color captions: {p['new_prompts']} held-out captions ({p['new_single']} single, "
        f"{p['new_two']} two-object; the split of `slimdiff.toy.newcolor`, never trained on) x "
        f"{p['new_images_per_prompt']} images.",
        f"- Sampling: {w['sampler']} {p['num_inference_steps']} steps, guidance {p['guidance_scale']}, seed {p['seed']} "
        f"(one generator per caption list, batches of {p['batch_size']}): every model gets the same "
        "initial noise for the same caption.",
        f"- Compression: the pipeline's stages with params.yaml: SlimSet of {p['slimset_n']} toy training "
        f"captions (held-out excluded), calibration {p['calibration']}"
        + (
            " plus one more calibration run with the LoRA fused (LoRA-aware calibration, "
            "`slimdiff.formats.lora.collect_stats_with_loras`: the two runs' sums added, an equal-weight "
            "mixture) on "
            + (
                f"{p['slimset_n']} new-color captions of the LoRA's training split (never the graded held-out ones)"
                if aware == "orange-train"
                else "the same SlimSet prompts and seeds"
            )
            if aware
            else ""
        )
        + ", influence "
        f"{p['influence_weighting']}, allocation {p['allocation']}, `Budget(removed_fraction=...)`, "
        f"`compress_` ({p['compression']}), which records the LoRA maps; the LoRA is projected by those "
        "maps and fused into the compressed weights (`load_lora_into`, method fuse: peft is not installed). "
        "The projection maps "
        + ", ".join(f"{k}: {n}" for k, n in res["projection_kinds"].items())
        + " layers (at 40%); dropped: "
        + (", ".join(res["projection_dropped"]) or "none")
        + ".",
        *coverage_lines(res.get("layer_coverage")),
        f"- Run: {res['seconds']['total'] / 60:.1f} min on {p['threads']} CPU thread(s) of {p['machine']} "
        + (f"(nice {p['nice']}): " if "nice" in p else "(nice 19, next to other jobs): ")
        + ", ".join(f"{k} {v:.0f} s" for k, v in res["seconds"].items() if k != "total")
        + ".",
        "",
        "Rows: original, original + LoRA, then compressed + projected LoRA at "
        + ", ".join(f"{100 * b:.0f}%" for b in p["budgets"])
        + " removed; the first "
        f"{res['grid_columns']} orange captions, first image each, same seeds:",
        "",
        f"![grid]({p.get('stem', w['stem'])}_grid.png)",
        "",
        "Captions (left to right): "
        + "; ".join(f"{i + 1}. {c}" for i, c in enumerate(res["grid_captions"]))
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    src = SOURCES[args.source]
    stem, mmdit = src["stem"], args.source != "toy"  # mmdit: a transformer toy (MMDiT or FLUX)
    if args.calibrate_with_lora:
        stem += "_aware_orange" if args.lora_calibration_prompts == "orange-train" else "_aware"
    if args.rerender:
        result = json.loads((args.out / f"{stem}.json").read_text())
        (args.out / f"{stem}.md").write_text(render_md(result))
        if result["training"].get("steps") and (ROOT / result["protocol"]["lora_file"]).is_file():
            write_card(result["training"], (ROOT / result["protocol"]["lora_file"]).parent, args.source)
        log.info("rewrote %s from %s.json", args.out / f"{stem}.md", stem)
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    from slimdiff.config import load_params
    from slimdiff.evaluation.evaluate import PSNR_CAP_DB
    from slimdiff.formats.lora import load_lora_file, load_lora_into
    from slimdiff.toy import load_toy_pipeline, newcolor
    from slimdiff.toy.classifier import load_toy_classifier
    from slimdiff.toy.data import caption_kind, heldout_captions

    params = load_params(args.params)
    ev = params.evaluation
    if mmdit:
        from slimdiff.formats.models import load_pipeline

        pipe = load_pipeline(args.source)
    else:
        pipe = load_toy_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = load_toy_classifier()
    from slimdiff.families.base import denoiser_of

    unet = denoiser_of(pipe)  # the UNet, or the MMDiT's transformer

    # captions: held-out new-color captions (all single ones, then seeded two-object ones)
    rng = np.random.default_rng(args.seed + 100)
    held_single, held_two = newcolor.heldout_new_captions("single"), newcolor.heldout_new_captions("two")
    n_two = max(0, args.new_prompts - len(held_single))
    picked = [
        held_two[i] for i in sorted(rng.choice(len(held_two), size=min(n_two, len(held_two)), replace=False))
    ]
    new_prompts = (held_single + picked)[: args.new_prompts]
    new_captions = [c for c in new_prompts for _ in range(args.images_per_prompt)]
    old_captions = heldout_captions()[: args.old_prompts] if args.old_prompts else heldout_captions()
    sampler = Sampler(new_captions, old_captions, ev, classifier)
    validity = newcolor.measurement_validity(new_captions, seed=args.seed + 7, classifier=classifier)
    validity["vae_round_trip"] = newcolor.new_color_accuracy(
        newcolor.vae_round_trip(pipe.vae, newcolor.render_many(new_captions, args.seed + 7)),
        new_captions,
        classifier,
    )
    validity["n"] = len(new_captions)
    log.info(
        "rule on renders: orange %.3f (exact %.3f), red / yellow renders read orange %.3f / %.3f, "
        "VAE round trip %.3f",
        validity["new_color_renders"]["color"],
        validity["new_color_renders"]["exact"],
        validity["red_renders"]["color"],
        validity["yellow_renders"]["color"],
        validity["vae_round_trip"]["color"],
    )

    # 1. the LoRA
    t0 = time.perf_counter()
    if args.lora is not None:
        state, _meta = load_lora_file(args.lora)
        info = {"rank": int(next(v for k, v in state.items() if k.endswith("lora_A.weight")).shape[0])}
        info.update(targets=len(state) // 2, target_kinds=list(src["targets"]))
        info["lora_params"] = sum(v.numel() for v in state.values())
        lora_file = args.lora
    else:
        trainer = {"toy": train_lora, "toy-mmdit": train_lora_mmdit, "toy-flux": train_lora_flux}
        state, info = trainer[args.source](pipe, args)
        lora_file = args.lora_dir / LORA_FILE
        if args.write:
            lora_file = save_lora(state, info, args.lora_dir, args.source)
            log.info("wrote %s (%d bytes)", lora_file, lora_file.stat().st_size)
    lora = {k: v.float() for k, v in state.items()}  # the fp16 values, computed in fp32
    seconds["lora_training"] = time.perf_counter() - t0

    # 2. the original, without and with the LoRA
    rows: list[dict] = []
    images: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    n_params = sum(p.numel() for p in unet.parameters())
    new0, images["original"] = sampler.new_color(pipe)
    old0, _ = sampler.held_out(pipe)
    handle = load_lora_into(pipe, lora, method="fuse")
    new1, images["original+lora"] = sampler.new_color(pipe)
    old1, old_ref = sampler.held_out(pipe)
    handle.unfuse()
    ref_new = images["original+lora"]
    rows.append(
        {
            "name": "original",
            "removed": "0%",
            "unet_params": n_params,
            "new": new0,
            "old_exact_no_lora": old0["all"]["exact"],
            "old_exact_lora": None,
            "old_no_lora": old0,
        }
    )
    rows.append(
        {
            "name": "original + LoRA",
            "removed": "0%",
            "unet_params": n_params,
            "new": new1,
            "kept": 1.0 if new1["color"] > 0 else None,
            "old_exact_no_lora": old0["all"]["exact"],
            "old_exact_lora": old1["all"]["exact"],
            "old_lora": old1,
        }
    )
    log.info(
        "original: orange %.3f, +LoRA orange %.3f (exact %.3f)", new0["color"], new1["color"], new1["exact"]
    )
    seconds["original_sampling"] = time.perf_counter() - t0

    # 3. compressed models
    t0 = time.perf_counter()
    slimset_n, influence, covariances, profiles = calibrate(
        pipe,
        params,
        lora if args.calibrate_with_lora else None,
        args.lora_calibration_prompts,
        args.seed,
    )
    seconds["calibration"] = time.perf_counter() - t0
    from slimdiff.formats.models import with_unet

    projection_kinds: dict[str, int] = {}
    dropped: list[str] = []
    coverage = None
    t0 = time.perf_counter()
    for fraction in args.budgets:
        slim, plan = compressed_unet(unet, params, influence, covariances, profiles, fraction)
        slim_pipe = with_unet(pipe, slim)
        old_c, _ = sampler.held_out(slim_pipe)
        handle = load_lora_into(slim_pipe, lora, method="fuse")
        new_c, images[f"{fraction:g}"] = sampler.new_color(slim_pipe)
        old_cl, old_cl_images = sampler.held_out(slim_pipe)
        if abs(fraction - 0.4) < 1e-9 or not projection_kinds:
            projection_kinds = {}
            for kind in handle.report.layers.values():
                projection_kinds[kind] = projection_kinds.get(kind, 0) + 1
            dropped = sorted(handle.report.dropped)
            if mmdit:
                coverage = layer_coverage(slim, f"{100 * fraction:.0f}%-removed")
        row = {
            "name": f"compressed {100 * fraction:.0f}% + projected LoRA",
            "fraction": fraction,
            "removed": f"{100 * (1 - plan.params_after / plan.params_before):.1f}% of compressible",
            "unet_params": sum(p.numel() for p in slim.parameters()),
            "new": new_c,
            "kept": new_c["color"] / new1["color"] if new1["color"] > 0 else None,
            "old_exact_no_lora": old_c["all"]["exact"],
            "old_exact_lora": old_cl["all"]["exact"],
            "old_no_lora": old_c,
            "old_lora": old_cl,
            "psnr_new": psnr_db(images[f"{fraction:g}"], ref_new),
            "psnr_old": psnr_db(old_cl_images, old_ref),
        }
        rows.append(row)
        log.info(
            "%.0f%% removed: orange %.3f (kept %.3f), exact %.3f, held-out exact %.3f / %.3f, PSNR %.1f dB",
            100 * fraction,
            new_c["color"],
            row["kept"] or float("nan"),
            new_c["exact"],
            row["old_exact_no_lora"],
            row["old_exact_lora"],
            row["psnr_new"],
        )
        del slim_pipe, slim
    seconds["compressed_models"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    columns = min(12, len(new_prompts))
    first = [new_prompts.index(c) * args.images_per_prompt for c in new_prompts[:columns]]
    grid_rows = [("original", images["original"][first]), ("original + LoRA", images["original+lora"][first])]
    grid_rows += [(f"{100 * b:.0f}% removed + proj. LoRA", images[f"{b:g}"][first]) for b in args.budgets]
    result = {
        "rows": rows,
        "validity": validity,
        "training": info,
        "projection_kinds": projection_kinds,
        "projection_dropped": dropped,
        **({"layer_coverage": coverage} if coverage else {}),
        "seconds": seconds,
        "grid_columns": columns,
        "grid_captions": new_prompts[:columns],
        "protocol": {
            "lora_file": str(lora_file.relative_to(ROOT))
            if lora_file.is_relative_to(ROOT)
            else str(lora_file),
            "new_prompts": len(new_prompts),
            "new_single": sum(caption_kind_new(c) == "single" for c in new_prompts),
            "new_two": sum(caption_kind_new(c) == "two" for c in new_prompts),
            "new_images_per_prompt": args.images_per_prompt,
            "new_captions": new_prompts,
            "old_prompts": len(old_captions),
            "old_single": sum(caption_kind(c) == "single" for c in old_captions),
            "old_images_per_prompt": 1,
            "num_inference_steps": ev.num_inference_steps,
            "guidance_scale": ev.guidance_scale,
            "seed": ev.seed,
            "batch_size": ev.batch_size,
            "psnr_cap_db": PSNR_CAP_DB,
            "budgets": list(args.budgets),
            "slimset_n": slimset_n,
            "calibration": f"{params.calibration.num_inference_steps} steps, guidance "
            f"{params.calibration.guidance_scale}, {params.calibration.n_buckets} buckets",
            "influence_weighting": params.influence.weighting,
            "allocation": f"{params.allocation.mode}, r_min {params.allocation.r_min}, multiple "
            f"{params.allocation.multiple}, modules {list(params.allocation.modules)}",
            "compression": f"qk {params.compression.qk_method}, vo {params.compression.vo_method}, ffn "
            f"{params.compression.ffn_method}, damping {params.compression.damping}"
            + (f", qk_norm {params.compression.qk_norm}" if mmdit else ""),
            "threads": args.threads,
            "machine": f"{platform.machine()} {os.cpu_count()}-core",
            "nice": os.nice(0),
            "quick": args.quick,
            **({"source": args.source} if mmdit else {}),
            **({"lora_arg": str(args.lora)} if args.lora is not None else {}),
            **(
                {"calibrate_with_lora": args.lora_calibration_prompts, "stem": stem}
                if args.calibrate_with_lora
                else {}
            ),
        },
    }
    text = render_md(result)
    print(text)
    if not args.write:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text)
    labelled_grid(grid_rows, new_prompts[:columns]).save(args.out / f"{stem}_grid.png")
    from slimdiff.evaluation.evaluate import jsonable

    (args.out / f"{stem}.json").write_text(json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n")
    log.info(
        "wrote %s",
        ", ".join(str(args.out / f"{stem}{n}") for n in (".md", "_grid.png", ".json")),
    )
    return 0


def caption_kind_new(caption: str) -> str:
    from slimdiff.toy.newcolor import parse_new_caption

    return "single" if len(parse_new_caption(caption)) == 1 else "two"


if __name__ == "__main__":
    sys.exit(main())
