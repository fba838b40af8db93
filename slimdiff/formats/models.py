"""Loading source models and naming their releases.

A model source is one of:

* ``"toy"``: the committed toy world pipeline (``data/toy/pipeline``), the embedded default;
* ``"toy-mmdit"``: the committed toy MMDiT world pipeline (``data/toy-mmdit/pipeline``, SD3 family);
* ``"toy-flux"``: the committed toy FLUX world pipeline (``data/toy-flux/pipeline``, FLUX family);
* a local folder holding a diffusers text-to-image pipeline (a compressed slimdiff folder too);
* a Hugging Face repo id, loaded from the local HF cache only (``local_files_only``): nothing is
  downloaded at run time; a missing snapshot is an error that says how to provide it.

A *release* is what the pipeline's lineage records: the source, its revision (hub commit hash, or
the content digest of a local folder) and a digest that changes whenever the weights change.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slimdiff.families.base import denoiser_attr
from slimdiff.formats.io import load_compressed
from slimdiff.formats.sidecar import null_components

log = logging.getLogger(__name__)

TOY_SOURCE = "toy"
TOY_MMDIT_SOURCE = "toy-mmdit"
TOY_FLUX_SOURCE = "toy-flux"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The source model cannot be found or read; the message says how to provide it."""


@dataclass(frozen=True)
class ModelRelease:
    source: str  # "toy", "toy-mmdit", "toy-flux", a folder path, or a hub repo id
    revision: str  # hub commit hash, or the content digest of a local folder
    digest: str  # content digest of the weights (equals revision for local folders)
    kind: str  # "toy" | "folder" | "hub"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def short_name(self) -> str:
        """A registry-friendly name of the source: "toy", "toy-mmdit", "stable-diffusion-v1-5", ..."""
        if self.kind == "toy":
            return self.source
        return Path(self.source.rstrip("/")).name.replace("_", "-").lower()


def toy_pipeline_dir() -> Path:
    """The committed toy pipeline folder (``data/toy/pipeline``, or under ``$SLIMDIFF_TOY_DIR``)."""
    from slimdiff.toy import toy_pipeline_dir as _toy_pipeline_dir

    return _toy_pipeline_dir()


def toy_mmdit_pipeline_dir() -> Path:
    """The committed toy MMDiT pipeline folder (``data/toy-mmdit/pipeline``, or under
    ``$SLIMDIFF_TOY_MMDIT_DIR``)."""
    from slimdiff.toy import toy_mmdit_pipeline_dir as _toy_mmdit_pipeline_dir

    return _toy_mmdit_pipeline_dir()


def toy_flux_pipeline_dir() -> Path:
    """The committed toy FLUX pipeline folder (``data/toy-flux/pipeline``, or under
    ``$SLIMDIFF_TOY_FLUX_DIR``)."""
    from slimdiff.toy import toy_flux_pipeline_dir as _toy_flux_pipeline_dir

    return _toy_flux_pipeline_dir()


# committed toy sources -> (their pipeline folder, the command that retrains them)
_TOY_SOURCES = {
    TOY_SOURCE: (toy_pipeline_dir, "make train-toy"),
    TOY_MMDIT_SOURCE: (toy_mmdit_pipeline_dir, "make train-toy-mmdit"),
    TOY_FLUX_SOURCE: (toy_flux_pipeline_dir, "make train-toy-flux"),
}


def toy_source_dir(source: str) -> Path | None:
    """The committed pipeline folder of a toy source name ("toy", "toy-mmdit", "toy-flux"), or None."""
    entry = _TOY_SOURCES.get(source)
    return entry[0]() if entry else None


def folder_digest(
    folder: Path, suffixes: tuple[str, ...] = (".json", ".safetensors", ".bin", ".txt", ".model")
) -> str:
    """sha256 over (relative path, file sha256) of the model files in ``folder``."""
    h = hashlib.sha256()
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes and ".cache" not in p.parts
    )
    if not files:
        raise ModelLoadError(f"{folder}: no model files (*.json, *.safetensors, ...) found")
    for p in files:
        fh = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                fh.update(chunk)
        h.update(json.dumps([str(p.relative_to(folder)), fh.hexdigest()]).encode())
    return h.hexdigest()


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def resolve_release(source: str, revision: str | None = None) -> ModelRelease:
    """Identify a source model without loading it."""
    if source in _TOY_SOURCES:
        pipeline_dir, retrain = _TOY_SOURCES[source]
        folder = pipeline_dir()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"the {source} pipeline is missing at {folder}; it is committed with the repository "
                f"(retrain it with `{retrain}`)"
            )
        d = folder_digest(folder)
        return ModelRelease(source, d, d, "toy")
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json or config.json)")
        d = folder_digest(path)
        return ModelRelease(str(path), d, d, "folder")
    if _looks_like_hub_id(source):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snap = Path(snapshot_download(source, revision=revision, local_files_only=True))
        except LocalEntryNotFoundError as err:
            raise ModelLoadError(
                f"{source}@{revision or 'main'} is not in the local Hugging Face cache and nothing is "
                "downloaded at run time: run `huggingface-cli download "
                f"{source}` on a machine with access (or point model.source at a local folder)"
            ) from err
        commit = snap.name
        return ModelRelease(source, commit, folder_digest(snap), "hub")
    raise ModelLoadError(
        f"model source {source!r} is neither {' nor '.join(map(repr, _TOY_SOURCES))}, an existing folder, nor "
        "a Hugging Face repo id (owner/name)"
    )


def load_pipeline(source: str, revision: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """A diffusers text-to-image pipeline for ``source`` (see module docstring); compressed slimdiff
    folders (with a ``slimdiff.json`` sidecar) are rebuilt with their compressed shapes."""
    from diffusers import DiffusionPipeline

    _quiet_loading()
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    if source in _TOY_SOURCES:
        folder = _TOY_SOURCES[source][0]()
        resolve_release(source)  # clear error when missing
    else:
        folder = Path(source).expanduser()
    if folder.exists():
        if (folder / "slimdiff.json").is_file():
            pipe = load_compressed(folder, device=device, torch_dtype=torch_dtype)
            pipe.set_progress_bar_config(disable=True)
            return pipe
        pipe = DiffusionPipeline.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True, **null_components(folder)
        )
    else:
        resolve_release(source, revision)  # raises a helpful error when not cached
        pipe = DiffusionPipeline.from_pretrained(
            source, revision=revision, dtype=torch_dtype, local_files_only=True
        )
    if getattr(pipe, "safety_checker", None) is not None:
        log.info("disabling the safety checker for calibration/evaluation forward passes")
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _quiet_loading() -> None:
    """Per-component loading bars are noise in pipeline logs; stage progress bars stay."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def with_unet(pipe, unet):
    """A pipeline sharing every component of ``pipe`` but the denoiser (UNet or transformer)."""
    components = {**pipe.components, denoiser_attr(pipe): unet}
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        components["requires_safety_checker"] = False
    new = type(pipe)(**components)
    new.set_progress_bar_config(disable=True)
    return new
