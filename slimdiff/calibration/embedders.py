"""Text embedders for SlimSet selection (METHOD.md stage 1).

An embedder is anything with ``.id: str`` (recorded in the SlimSet so a selection can be traced to
the exact model) and ``.embed(prompts, batch_size) -> Tensor (N, d)``. Two implementations:

* ``OpenClipEmbedder``: an open_clip text tower (the method's choice). Offline only: the weights
  must be a local checkpoint file, a ``local-dir:`` folder, or a pretrained tag whose file is
  already in the Hugging Face / open_clip cache. We check for the file *before* calling open_clip,
  because open_clip would otherwise try to download it.
* ``PipelineTextEmbedder``: the diffusion pipeline's own text encoder (pooled output), a fallback
  that needs nothing beyond the pipeline.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from slimdiff.core.digests import file_sha256, state_dict_sha256

logger = logging.getLogger(__name__)


@runtime_checkable
class PromptEmbedder(Protocol):
    id: str

    def embed(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N,) prompts -> (N, d) embeddings (not necessarily normalised)."""
        ...


class EmbedderWeightsNotFound(FileNotFoundError):
    """The embedder's weights are not available offline; the message says how to provide them."""


def _resolve_open_clip_weights(model_name: str, pretrained: str | None) -> tuple[str | None, str]:
    """Return (local path or None for schema models, provenance tag) or raise EmbedderWeightsNotFound.

    Never downloads: pretrained tags are looked up in the local caches only."""
    import open_clip

    if model_name.startswith("local-dir:"):
        folder = Path(model_name.removeprefix("local-dir:"))
        if not folder.is_dir():
            raise EmbedderWeightsNotFound(f"open_clip local-dir folder {folder} does not exist")
        return None, f"local-dir:{folder.name}"
    if model_name.startswith("hf-hub:"):
        raise EmbedderWeightsNotFound(
            f"{model_name}: hf-hub models would be downloaded; save the model to a folder and use "
            "'local-dir:/path/to/folder' (open_clip_config.json + weights) instead"
        )
    if model_name not in open_clip.list_models():
        raise EmbedderWeightsNotFound(
            f"open_clip has no model config named {model_name!r}; register a custom config with "
            "open_clip.add_model_config(path_to_json) before creating the embedder"
        )
    if not pretrained:
        raise EmbedderWeightsNotFound(
            f"{model_name}: no weights given; pass pretrained=<local checkpoint path> (or a pretrained tag "
            "whose file is already in the local cache). Random weights are never used for SlimSet selection"
        )
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), f"file:{path.name}:sha256={file_sha256(path)[:16]}"
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise EmbedderWeightsNotFound(f"open_clip checkpoint {path} does not exist")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise EmbedderWeightsNotFound(
            f"{model_name}: {pretrained!r} is neither an existing checkpoint file nor a known pretrained tag "
            f"(known tags: {open_clip.list_pretrained_tags_by_model(model_name)})"
        )
    candidates: list[Path] = []
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        # open_clip's convention: 'org/repo/' means the default file name, 'org/repo/file' a named one.
        if hf_hub.endswith("/"):
            repo_id, filename = hf_hub[:-1], ""
        else:
            repo_id, filename = os.path.split(hf_hub)
        for fname in [
            f for f in (filename, "open_clip_model.safetensors", "open_clip_pytorch_model.bin") if f
        ]:
            hit = try_to_load_from_cache(repo_id, fname)
            if isinstance(hit, str):
                candidates.append(Path(hit))
    url = cfg.get("url", "")
    if url:
        candidates.append(Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url))
    for c in candidates:
        if c.is_file():
            return str(c), f"{pretrained}:sha256={file_sha256(c)[:16]}"
    raise EmbedderWeightsNotFound(
        f"open_clip weights for {model_name}/{pretrained} are not in the local cache and will not be "
        f"downloaded. Provide them by copying the checkpoint to this machine and passing its path as "
        f"pretrained=/path/to/checkpoint (source: {hf_hub or url}), or by pre-populating the Hugging Face "
        "cache on a machine with network access (HF_HOME)."
    )


class OpenClipEmbedder:
    """open_clip text tower, offline. ``pretrained`` is a local checkpoint path or a cached tag.

    Works for any registered config (``open_clip.add_model_config``), e.g. the toy world's tiny CLIP
    with its local checkpoint. The id records model name and weight-file digest."""

    def __init__(
        self, model_name: str, pretrained: str | None, *, device: str | torch.device = "cpu"
    ) -> None:
        import open_clip

        path, tag = _resolve_open_clip_weights(model_name, pretrained)
        self.device = torch.device(device)
        model = open_clip.create_model(
            model_name,
            pretrained=path,
            device=self.device,
            pretrained_image=False,
            pretrained_text=False,
            require_pretrained=path is not None,
        )
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.id = f"open_clip:{model_name}:{tag}"

    @torch.no_grad()
    def embed(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = []
        for i in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(list(prompts[i : i + batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


class PipelineTextEmbedder:
    """The diffusion pipeline's own text encoder, pooled output (CLIPTextModel ``pooler_output``).

    A fallback when no open_clip weights are at hand: the geometry is that of the conditioning the
    UNet sees. The id includes a digest of the encoder's weights so that selections stay traceable."""

    def __init__(self, pipe, *, id: str | None = None) -> None:
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ValueError("PipelineTextEmbedder needs a pipeline with `text_encoder` and `tokenizer`")
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        if id is None:
            cfg = getattr(self.text_encoder, "config", None)
            origin = getattr(cfg, "_name_or_path", "") or type(self.text_encoder).__name__
            id = f"pipeline-text-encoder:{origin}:sha256={state_dict_sha256(self.text_encoder)[:16]}"
        self.id = id

    @torch.no_grad()
    def embed(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = next(self.text_encoder.parameters()).device
        out = []
        for i in range(0, len(prompts), batch_size):
            enc = self.tokenizer(
                list(prompts[i : i + batch_size]),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            res = self.text_encoder(enc.input_ids.to(device))
            pooled = res.pooler_output if hasattr(res, "pooler_output") else res[1]
            out.append(pooled.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)
