"""Attribute classifier of the toy world: per slot, empty or which color x shape.

It grades generated images against their captions (GenEval-style object / color / shape / position /
exact-match accuracy), so it must itself be near perfect on real data-set images (>= 99% exact).
Output: logits (N, 5 slots, 13 classes); class 0 = empty, else 1 + color_index * 3 + shape_index.

Its penultimate activations (``penultimate_features``: the ``hidden``-d GELU output that the last
Linear reads) are the feature space of the evaluation's classifier-feature Frechet distance
(``fd_cls``): a feature model trained on this world, as FD-DINOv2 uses a model trained on real images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimdiff.toy.data import NUM_SLOT_CLASSES, SLOT_NAMES

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class ClassifierConfig:
    channels: tuple[int, ...] = (32, 64, 128)  # conv widths at 32x32 (stem), 16x16, 8x8 -> 4x4
    hidden: int = 256
    num_slots: int = len(SLOT_NAMES)
    num_classes: int = NUM_SLOT_CLASSES

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 3:
            raise ValueError(f"channels={self.channels}: give exactly 3 conv widths (32x32, 16x16, 8x8)")


class ToyAttributeClassifier(nn.Module):
    """A small CNN: uint8-range images in [-1, 1] (N, 3, 32, 32) -> logits (N, slots, classes)."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        c1, c2, c3 = self.config.channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),  # 16x16
            nn.GELU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1),  # 8x8
            nn.GELU(),
            nn.Conv2d(c3, c3, 3, stride=2, padding=1),  # 4x4
            nn.GELU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * 16, self.config.hidden),
            nn.GELU(),
            nn.Linear(self.config.hidden, self.config.num_slots * self.config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))  # (N, slots * classes)
        return logits.view(-1, self.config.num_slots, self.config.num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Activations before the last Linear, float (N, hidden), of images in [-1, 1] (N, 3, 32, 32):
        exactly the input ``forward`` feeds ``head[-1]`` (same modules, same order)."""
        return self.head[:-1](self.features(x))

    @torch.no_grad()
    def penultimate_features(self, images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
        """Penultimate features float32 (N, hidden) of uint8 (N, 32, 32, 3) images, taken as
        ``predict`` takes them (``to_tensor_range``, eval mode). The feature space of ``fd_cls``.
        (Not named ``features``: that is the conv trunk, whose name the saved weights carry.)"""
        from slimdiff.toy.data import to_tensor_range

        self.eval()
        out = [
            self.penultimate(to_tensor_range(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.config.hidden)

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Per-slot labels int64 (N, 5) of uint8 (N, 32, 32, 3) images."""
        from slimdiff.toy.data import to_tensor_range

        self.eval()
        out = [
            self(to_tensor_range(images[i : i + batch_size])).argmax(-1).numpy()
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.config.num_slots), np.int64)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_NAME))
        (out_dir / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return out_dir

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ToyAttributeClassifier:
        """Load fp16 weights from ``path`` into an fp32 model in eval mode."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"no {WEIGHTS_NAME} in {path}: train it with `python -m slimdiff.toy.train --out <dir>`"
            )
        config = ClassifierConfig(**json.loads((path / CONFIG_NAME).read_text()))
        model = cls(config)
        state = {k: v.float() for k, v in load_file(str(path / WEIGHTS_NAME)).items()}
        model.load_state_dict(state)
        return model.eval()


def load_toy_classifier(dir: str | Path | None = None) -> ToyAttributeClassifier:
    """The committed classifier (``data/toy/classifier``) or one saved in ``dir``."""
    from slimdiff.toy import toy_data_dir

    return ToyAttributeClassifier.from_pretrained(dir if dir is not None else toy_data_dir() / "classifier")
