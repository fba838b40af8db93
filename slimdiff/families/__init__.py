"""Model families, one module each; importing the package registers them (``base.register_adapter``).

Add a family: write ``slimdiff/families/<family>.py`` with a ``ModelAdapter`` subclass decorated with
``@register_adapter`` (see ``unet.py``: recognise the denoiser class, return its units with their
layouts, build example inputs), import it below, and add its tests. Stages, store, registry and CLI
do not change.
"""

from slimdiff.families import flux, flux2, mmdit, pixart, qwenimage, unet, wan, zimage  # noqa: F401  (registration order = lookup order)
from slimdiff.families.base import (
    AttentionLayout,
    FFNLayout,
    ModelAdapter,
    StatSite,
    TokenMask,
    UnitInfo,
    UnsupportedModelError,
    adapter_for,
    adapter_for_class,
    denoiser_attr,
    denoiser_of,
    register_adapter,
    supported_families,
)

__all__ = [
    "AttentionLayout",
    "FFNLayout",
    "ModelAdapter",
    "StatSite",
    "TokenMask",
    "UnitInfo",
    "UnsupportedModelError",
    "adapter_for",
    "adapter_for_class",
    "denoiser_attr",
    "denoiser_of",
    "register_adapter",
    "supported_families",
]
