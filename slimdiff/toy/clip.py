"""A tiny CLIP in open_clip format, trained contrastively on the toy world.

It is the SlimSet embedder of the toy world and the feature model of toy CLIP score and toy FID, so
it goes through the real open_clip code path: a custom model config registered with open_clip
(``toy-clip-tiny.json`` next to this file), open_clip's own built-in BPE tokenizer (ships with the
package, works offline) and weights in a local checkpoint loaded by
``open_clip.create_model_and_transforms(TOY_CLIP_NAME, pretrained=<path>)``. The text width is small
because the 49408-token embedding dominates the size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

TOY_CLIP_NAME = "toy-clip-tiny"
CHECKPOINT_NAME = "open_clip_model.safetensors"
_CONFIG_PATH = Path(__file__).with_name(f"{TOY_CLIP_NAME}.json")


def toy_clip_config() -> dict:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) of the toy CLIP."""
    return json.loads(_CONFIG_PATH.read_text())


def register_toy_clip_config() -> str:
    """Make ``TOY_CLIP_NAME`` known to open_clip (idempotent); returns the name."""
    import open_clip

    if TOY_CLIP_NAME not in open_clip.list_models():
        if not _CONFIG_PATH.is_file():
            raise FileNotFoundError(
                f"open_clip config {_CONFIG_PATH} is missing: it ships with slimdiff.toy "
                "(package data); reinstall slimdiff"
            )
        open_clip.add_model_config(_CONFIG_PATH)
    return TOY_CLIP_NAME


def build_toy_clip(seed: int = 0):
    """A freshly initialised toy CLIP: (model, preprocess_val, tokenizer)."""
    import open_clip

    register_toy_clip_config()
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TOY_CLIP_NAME, pretrained=None)
    return model, preprocess, open_clip.get_tokenizer(TOY_CLIP_NAME)


def toy_clip_dir() -> Path:
    from slimdiff.toy import toy_data_dir

    return toy_data_dir() / "clip"


def load_toy_clip(dir: str | Path | None = None):
    """The trained toy CLIP in eval mode, fp32: (model, preprocess, tokenizer).

    ``dir`` defaults to the committed ``data/toy/clip``; it holds ``open_clip_model.safetensors``."""
    import open_clip

    ckpt = Path(dir if dir is not None else toy_clip_dir()) / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"toy CLIP checkpoint {ckpt} not found: train it with `python -m slimdiff.toy.train --out <dir>`"
        )
    register_toy_clip_config()
    model, _, preprocess = open_clip.create_model_and_transforms(TOY_CLIP_NAME, pretrained=str(ckpt))
    model = model.float().eval()
    return model, preprocess, open_clip.get_tokenizer(TOY_CLIP_NAME)


def save_toy_clip(model, out_dir: str | Path) -> Path:
    """Write the weights as fp16 safetensors (plus the open_clip config for reference)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / CHECKPOINT_NAME))
    cfg = {"model_name": TOY_CLIP_NAME, "model_cfg": toy_clip_config()}
    (out_dir / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir / CHECKPOINT_NAME


def images_to_clip_input(model, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) -> normalised float32 (N, 3, 32, 32) with the model's mean/std.

    Same result as ``preprocess`` on 32x32 PIL images (resize and crop are identities), batched."""
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    return (x - mean) / std


@torch.no_grad()
def encode_images(model, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings float32 (N, embed_dim) of uint8 (N, 32, 32, 3) images."""
    feats = [
        model.encode_image(images_to_clip_input(model, images[i : i + batch_size]), normalize=True)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(feats) if feats else torch.zeros(0, model.text_projection.shape[1])


@torch.no_grad()
def encode_texts(model, tokenizer, captions: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings float32 (N, embed_dim)."""
    return model.encode_text(tokenizer(captions), normalize=True)
