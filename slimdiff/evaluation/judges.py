"""The models that grade images: the toy world's judges (attribute classifier, toy CLIP), a named
open_clip model for real prompts, and Inception-v3 pool features, all from local weights only."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimdiff.calibration.embedders import EmbedderWeightsNotFound, _resolve_open_clip_weights
from slimdiff.core.digests import file_sha256
from slimdiff.evaluation import metrics as M

logger = logging.getLogger(__name__)


INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)


class MissingWeightsError(FileNotFoundError):
    """A model the evaluation protocol names is not available locally; the message says which
    file is missing and how to provide it."""


# --------------------------------------------------------------------------------------------
# Judges: the models that grade images
# --------------------------------------------------------------------------------------------
@dataclass
class ToyJudges:
    """The toy world's graders: attribute classifier (``predict(uint8 (N,32,32,3)) -> (N, 5)``;
    its ``penultimate_features`` are the ``fd_cls`` feature space, and a stand-in classifier
    without that method leaves ``fd_cls`` unmeasured) and the toy CLIP (open_clip model +
    tokenizer). Tests pass randomly initialised ones."""

    classifier: Any
    clip_model: nn.Module
    clip_tokenizer: Callable
    classifier_id: str = "toy-classifier"
    clip_id: str = "open_clip:toy-clip-tiny"

    @classmethod
    def load(cls, toy_dir: str | Path | None = None) -> ToyJudges:
        """The committed judges under ``data/toy`` (or ``toy_dir``); FileNotFoundError names the
        missing file and the command that trains it."""
        from slimdiff.toy import toy_data_dir
        from slimdiff.toy.classifier import WEIGHTS_NAME, load_toy_classifier
        from slimdiff.toy.clip import CHECKPOINT_NAME, load_toy_clip

        root = Path(toy_dir) if toy_dir is not None else toy_data_dir()
        for sub, name in (("classifier", WEIGHTS_NAME), ("clip", CHECKPOINT_NAME)):
            if not (root / sub / name).is_file():
                raise MissingWeightsError(
                    f"toy evaluation needs {root / sub / name}; it is committed with the repository under "
                    "data/toy (or retrain with `python -m slimdiff.toy.train --out data/toy`, or set "
                    "SLIMDIFF_TOY_DIR to a folder that holds it)"
                )
        classifier = load_toy_classifier(root / "classifier")
        model, _, tokenizer = load_toy_clip(root / "clip")
        return cls(
            classifier=classifier,
            clip_model=model,
            clip_tokenizer=tokenizer,
            classifier_id=f"toy-classifier:sha256={file_sha256(root / 'classifier' / WEIGHTS_NAME)[:16]}",
            clip_id=f"open_clip:toy-clip-tiny:sha256={file_sha256(root / 'clip' / CHECKPOINT_NAME)[:16]}",
        )


@dataclass(frozen=True)
class RealMetricsOptions:
    """How the real-model path measures CLIP score and FID (recorded in the protocol).

    Read from ``cfg`` attributes of the same names when the evaluation params carry them
    (``evaluation.clip_model`` ...), else these defaults. ``clip_model=None`` turns CLIP score off
    (recorded as off); a named model whose weights are not local is an error, never a fallback."""

    clip_model: str | None = "ViT-L-14"
    clip_pretrained: str | None = "openai"  # open_clip tag already in the local cache, or a checkpoint path
    clip_score_kind: str = "100*max(cos,0)"
    fid_feature: Literal["clip", "inception"] = "clip"
    inception_weights: str | None = None  # local path of INCEPTION_WEIGHTS_FILE (fid_feature="inception")
    reference_images: str | None = None  # folder of real images for FID vs real (None: no such FID)

    def __post_init__(self) -> None:
        if self.clip_score_kind not in M.CLIP_SCORE_KINDS:
            raise ValueError(
                f"clip_score_kind must be one of {M.CLIP_SCORE_KINDS}, got {self.clip_score_kind!r}"
            )
        if self.fid_feature not in ("clip", "inception"):
            raise ValueError(f"fid_feature must be 'clip' or 'inception', got {self.fid_feature!r}")
        if self.fid_feature == "clip" and self.clip_model is None:
            raise ValueError(
                "fid_feature='clip' needs clip_model; set clip_model or use fid_feature='inception'"
            )
        if self.fid_feature == "inception" and not self.inception_weights:
            raise ValueError(
                f"fid_feature='inception' needs inception_weights: the local path of {INCEPTION_WEIGHTS_FILE} "
                f"(download it once from {INCEPTION_WEIGHTS_URL} on a machine with network access)"
            )

    @classmethod
    def from_cfg(cls, cfg: Any) -> RealMetricsOptions:
        defaults = cls.__dataclass_fields__
        return cls(**{k: getattr(cfg, k, f.default) for k, f in defaults.items()})


class ClipJudge:
    """An open_clip model for CLIP score / CLIP-feature FID on real images, loaded offline only."""

    def __init__(self, model_name: str, pretrained: str | None, device: torch.device) -> None:
        import open_clip

        try:
            path, tag = _resolve_open_clip_weights(model_name, pretrained)
        except EmbedderWeightsNotFound as err:
            raise MissingWeightsError(f"CLIP score model: {err}") from err
        if path is None and not model_name.startswith("local-dir:"):
            raise MissingWeightsError(
                f"CLIP score model {model_name}: no weights file resolved for {pretrained!r}"
            )
        self.model = (
            open_clip.create_model(
                model_name,
                pretrained=path,
                device=device,
                pretrained_image=False,
                pretrained_text=False,
                require_pretrained=path is not None,
            )
            .float()
            .eval()
        )
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device
        self.id = f"open_clip:{model_name}:{tag}"
        cfg = self.model.visual.preprocess_cfg
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float32 (N, 3, S, S): shortest side to S (bicubic,
        antialiased, torch), centre crop, CLIP mean/std. Batched and deterministic."""
        x = M.uint8_to_float(images).float()  # (N, 3, H, W)
        return (resize_shortest_center_crop(x, self.image_size) - self.mean) / self.std

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        out = [
            self.model.encode_image(self.preprocess(images[i : i + batch_size]).to(self.device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = [
            self.model.encode_text(self.tokenizer(list(prompts[i : i + batch_size])).to(self.device))
            .float()
            .cpu()
            for i in range(0, len(prompts), batch_size)
        ]
        return torch.cat(out)


def resize_shortest_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """float (N, C, H, W) -> (N, C, size, size): bicubic antialiased resize of the shortest side,
    then a centre crop; values clamped to [0, 1] (bicubic overshoots)."""
    _, _, h, w = x.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(
            0.0, 1.0
        )
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top : top + size, left : left + size]


class InceptionFeatures:
    """Inception-v3 2048-d pool features as torchmetrics' FID uses them, from a local weights file."""

    def __init__(self, weights: str, device: torch.device) -> None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MissingWeightsError(
                f"FID feature model: Inception weights {path} not found. Download {INCEPTION_WEIGHTS_URL} on a "
                "machine with network access, copy it here and set evaluation.inception_weights to its path "
                "(or use fid_feature='clip')"
            )
        if importlib.util.find_spec("torch_fidelity") is None:
            raise MissingWeightsError(
                "FID feature model 'inception' needs the torch-fidelity package (pip install torch-fidelity, "
                "or torchmetrics[image]); or use fid_feature='clip'"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.model = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        ).to(device)
        self.device = device
        self.id = f"inception-v3-compat:pool-2048:sha256={file_sha256(path)[:16]}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(
                0, 3, 1, 2
            )  # (B, 3, H, W) uint8
            out.append(self.model(x.to(self.device)).double().cpu())
        return torch.cat(out)
