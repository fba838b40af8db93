"""Test helpers for the evaluation tests: tiny toy-world pipelines and judges built from config
(random weights, never downloaded), and a tiny open_clip config registered on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slimdiff.config import EvaluationParams

TINY_CLIP_NAME = "slimdiff-test-clip-tiny"
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def tiny_toy_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of the toy world's architecture, much smaller, random weights."""
    from slimdiff.toy.models import (
        ToyModelConfig,
        assemble_pipeline,
        build_scheduler,
        build_text_encoder,
        build_tokenizer,
        build_unet,
        build_vae,
    )

    cfg = ToyModelConfig(
        text_hidden=32,
        text_layers=1,
        text_heads=2,
        text_intermediate=32,
        vae_channels=(8, 16, 16),
        unet_channels=(16, 24),
        unet_heads=2,
        unet_transformer_layers=1,
        norm_num_groups=8,
    )
    pipe = assemble_pipeline(
        build_vae(cfg, seed),
        build_text_encoder(cfg, seed),
        build_tokenizer(cfg),
        build_unet(cfg, seed),
        build_scheduler(cfg),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class BrightnessOracle:
    """A stand-in attribute classifier: an image counts as correct (the caption's slots) unless it
    is nearly white, then it reads as empty. It makes a degradation visible deterministically."""

    def __init__(self, captions_by_index: list[str]):
        self.captions = captions_by_index

    def predict(self, images: np.ndarray) -> np.ndarray:
        from slimdiff.toy.data import caption_slot_labels

        out = np.stack([caption_slot_labels(c) for c in self.captions])
        white = images.reshape(len(images), -1).mean(1) > 240
        out[white] = 0
        return out


def random_toy_judges(classifier=None):
    from slimdiff.evaluation.judges import ToyJudges
    from slimdiff.toy.classifier import ClassifierConfig, ToyAttributeClassifier
    from slimdiff.toy.clip import build_toy_clip

    torch.manual_seed(0)
    if classifier is None:
        classifier = ToyAttributeClassifier(ClassifierConfig(channels=(8, 8, 8), hidden=16)).eval()
    model, _, tokenizer = build_toy_clip(seed=0)
    return ToyJudges(classifier=classifier, clip_model=model.eval(), clip_tokenizer=tokenizer)


def eval_params(**overrides) -> EvaluationParams:
    base = {
        "max_prompts": None,
        "images_per_prompt": 1,
        "num_inference_steps": 2,
        "guidance_scale": 4.0,
        "seed": 7,
        "batch_size": 4,
        "latency_repeats": 2,
    }
    base.update(overrides)
    return EvaluationParams(**base)


def register_tiny_clip(folder: Path) -> tuple[str, Path]:
    """Register a tiny open_clip config and save a random checkpoint: (model name, checkpoint)."""
    import open_clip
    from safetensors.torch import save_file

    if TINY_CLIP_NAME not in open_clip.list_models():
        cfg_path = folder / f"{TINY_CLIP_NAME}.json"
        cfg_path.write_text(json.dumps(TINY_CLIP_CFG))
        open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    ckpt = folder / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return TINY_CLIP_NAME, ckpt
