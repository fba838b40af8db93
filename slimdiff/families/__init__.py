"""Model families, one module each; importing the package registers them (``base.register_adapter``).

Add a family: write ``slimdiff/families/<family>.py`` with a ``ModelAdapter`` subclass decorated with
``@register_adapter`` (see ``unet.py``: recognise the denoiser class, return its units with their
layouts, build example inputs), import it below, and add its tests. Stages, store, registry and CLI
do not change. A family made of standard parts needs no file: ``structural`` recognises it.
"""

# registration order = lookup order, except that adapters recognising models by their parts
# (``structural``, ``ModelAdapter.by_parts``) are tried after every family adapter
from slimdiff.families import (  # noqa: F401
    flux,
    flux2,
    flux3,
    ltx,
    mmdit,
    pixart,
    qwenimage,
    structural,
    unet,
    wan,
    zimage,
)
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
