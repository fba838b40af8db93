"""The files that make a folder a slimdiff folder: the sidecar (``slimdiff.json``: the plan, the
shapes, the format version) and the keys slimdiff adds to a denoiser's ``config.json``, their
readers and checks. Both the loader (``slimdiff.formats.loading``, what diffusers' ``from_pretrained``
runs) and the saver (``slimdiff.formats.io``) build on it, so neither imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path

from slimdiff.core.digests import file_sha256
from slimdiff.families.base import LoraError
from slimdiff.surgery.maps import LORA_MAPS_NAME, SIDECAR_KEY, LoraMaps, LoraMapsMissingError

SIDECAR_NAME = "slimdiff.json"


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


SIDECAR_FORMAT_VERSION = 2  # 1: plan only in the sidecar, stock class in config.json


READABLE_SIDECAR_VERSIONS = (1, 2)


class CompressedModelError(ValueError):
    """A compressed-model folder is inconsistent (sidecar, plan, config and weights disagree)."""


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------
def read_sidecar(directory: str | Path) -> dict:
    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        raise CompressedModelError(f"{path} not found: {directory} is not a SlimDiff-compressed UNet folder")
    data = json.loads(path.read_text())
    if data.get("format_version") not in READABLE_SIDECAR_VERSIONS:
        raise CompressedModelError(
            f"{path}: format_version {data.get('format_version')!r} is not supported (this slimdiff reads "
            f"{list(READABLE_SIDECAR_VERSIONS)})"
        )
    return data


def verify_lora_maps(directory: Path, sidecar: dict) -> None:
    """When the sidecar records LoRA maps: the file is there and matches its sha256."""
    entry = sidecar.get(SIDECAR_KEY)
    if not entry:
        return
    maps = directory / str(entry.get("file", LORA_MAPS_NAME))
    if not maps.is_file():
        raise CompressedModelError(f"{maps} not found (named by {directory / SIDECAR_NAME})")
    digest = file_sha256(maps)
    if digest != entry.get("sha256"):
        raise CompressedModelError(
            f"{maps}: sha256 {digest[:12]}... does not match the sidecar's {str(entry.get('sha256'))[:12]}...: "
            "the LoRA maps were changed or truncated after saving"
        )


def compare_shapes(expected: dict, got: dict, what_expected: str, what_got: str, directory: Path) -> None:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise CompressedModelError(
            f"{directory}: {what_got} and {what_expected} disagree on tensor names: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    for k in expected:
        if expected[k] != got[k]:
            raise CompressedModelError(
                f"{directory}: tensor {k} has shape {list(got[k])} in {what_got} but {list(expected[k])} per "
                f"{what_expected} (wrong ranks?)"
            )


#: key of the slimdiff section in a compressed denoiser's config.json
CONFIG_KEY = "slimdiff"


CONFIG_FORMAT_VERSION = 2


def null_components(folder: Path) -> dict[str, None]:
    """Components a saved pipeline records as absent (``[null, null]`` in ``model_index.json``, e.g.
    SD3 without T5: ``text_encoder_3``, ``tokenizer_3``), to pass as ``None`` to ``from_pretrained``
    (diffusers only fills in its optional components by itself)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {k: None for k, v in entries.items() if not k.startswith("_") and v == [None, None]}


def read_lora_maps(folder: str | Path) -> LoraMaps:
    """The verified LoraMaps of a compressed folder (a denoiser folder, or a pipeline folder: its
    denoiser subfolder). Raises LoraMapsMissingError for folders saved without maps."""
    from slimdiff.formats.sidecar import SIDECAR_NAME, read_sidecar

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        top = read_sidecar(folder) if (folder / SIDECAR_NAME).is_file() else {}
        folder = folder / top.get("unet_subfolder", "unet")
    sidecar = read_sidecar(folder)
    entry = sidecar.get(SIDECAR_KEY)
    if not entry:
        raise LoraMapsMissingError(
            f"{folder} was saved without LoRA maps ({LORA_MAPS_NAME} and the '{SIDECAR_KEY}' entry of "
            f"{SIDECAR_NAME} are absent: a folder written by a slimdiff before LoRA support, or saved "
            "from a model compressed with lora_maps=False), so a LoRA made for the original model cannot "
            "be projected onto it. Compress the original model again with this slimdiff (compress_ "
            "records the maps) and save it with save_compressed."
        )
    maps = LoraMaps.load(folder, entry)
    if maps.plan_digest is not None and maps.plan_digest != sidecar.get("plan_digest"):
        raise LoraError(
            f"{folder}: the LoRA maps were made for plan {str(maps.plan_digest)[:12]}, the folder holds "
            f"plan {str(sidecar.get('plan_digest'))[:12]} (mixed files)"
        )
    return maps
