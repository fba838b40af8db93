"""benchmarks/family_coverage.py: the coverage table of every diffusers denoiser class (issue 26).

The supported families' unit counts are derived here from each class's default constructor
arguments and the adapters' unit rules (slimdiff/families/{basic,unet,pixart,mmdit,flux}.py), not
read off the script:

* a ``BasicTransformerBlock`` (UNet, PixArt) is one ``ff`` unit plus qk and vo units for ``attn1``
  and, with a ``cross_attention_dim``, ``attn2`` (``basic.block_units``);
* an SD3 ``JointTransformerBlock`` is ``ff`` plus ``ff_context`` except in the last block
  (``context_pre_only``: no text FFN), and qk / vo for ``attn`` plus ``attn2`` in the
  ``dual_attention_layers`` (``MMDiTAdapter.units``);
* a FLUX double block is ``ff``, ``ff_context``, qk and vo; a single block is qk, vo and its MLP
  (``FluxAdapter.units``); the same for blocks made of FLUX.1's parts under other class names
  (Chroma, and Bria with verified copies of FluxAttention and its processor:
  ``structural.FluxBlocksAdapter``, no family file); FLUX.2 likewise (its single block's qk, vo and
  MLP are parts of the fused ``to_qkv_mlp_proj``: ``Flux2Adapter.units``).

Everything runs on the meta device: no weights, no downloads.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coverage() -> ModuleType:
    """benchmarks/family_coverage.py, loaded under a private module name."""
    spec = importlib.util.spec_from_file_location(
        "_slimdiff_bench_coverage", ROOT / "benchmarks" / "family_coverage.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def defaults(cls: type) -> dict:
    """The default constructor arguments of a diffusers model class (its default config)."""
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def basic_block_units(blocks: int, cross_attention: bool) -> dict[str, int]:
    attentions = 2 if cross_attention else 1
    return {"ffn": blocks, "qk": attentions * blocks, "vo": attentions * blocks}


def expected_unet() -> dict[str, int]:
    from diffusers import UNet2DConditionModel

    d = defaults(UNet2DConditionModel)
    per_block, layers = d["transformer_layers_per_block"], d["layers_per_block"]
    assert (
        isinstance(per_block, int)
        and isinstance(layers, int)
        and d["reverse_transformer_layers_per_block"] is None
    )
    assert d["only_cross_attention"] is False and d["cross_attention_dim"] is not None
    down = sum("CrossAttn" in b for b in d["down_block_types"]) * layers * per_block
    mid = per_block if d["mid_block_type"] == "UNetMidBlock2DCrossAttn" else 0
    up = sum("CrossAttn" in b for b in d["up_block_types"]) * (layers + 1) * per_block  # up: one more
    return basic_block_units(down + mid + up, cross_attention=True)  # default: 6 + 1 + 9 = 16 blocks


def expected_pixart() -> dict[str, int]:
    from diffusers import PixArtTransformer2DModel

    d = defaults(PixArtTransformer2DModel)
    return basic_block_units(d["num_layers"], cross_attention=d["cross_attention_dim"] is not None)


def expected_sd3() -> dict[str, int]:
    from diffusers import SD3Transformer2DModel

    d = defaults(SD3Transformer2DModel)
    n, attentions = d["num_layers"], d["num_layers"] + len(d["dual_attention_layers"])
    return {"ffn": n + (n - 1), "qk": attentions, "vo": attentions}  # ff everywhere, ff_context but last


def expected_flux() -> dict[str, int]:
    from diffusers import FluxTransformer2DModel

    d = defaults(FluxTransformer2DModel)
    double, single = d["num_layers"], d["num_single_layers"]
    return {"ffn": 2 * double + single, "qk": double + single, "vo": double + single}


def expected_chroma() -> dict[str, int]:
    from diffusers import ChromaTransformer2DModel

    d = defaults(ChromaTransformer2DModel)
    double, single = d["num_layers"], d["num_single_layers"]  # FLUX.1's blocks, recognised by parts
    return {"ffn": 2 * double + single, "qk": double + single, "vo": double + single}


def expected_bria() -> dict[str, int]:
    from diffusers import BriaTransformer2DModel

    d = defaults(BriaTransformer2DModel)
    double, single = d["num_layers"], d["num_single_layers"]  # FLUX.1's blocks, verified copies
    return {"ffn": 2 * double + single, "qk": double + single, "vo": double + single}


def expected_qwenimage() -> dict[str, int]:
    from diffusers import QwenImageTransformer2DModel

    n = defaults(QwenImageTransformer2DModel)["num_layers"]
    return {"ffn": 2 * n, "qk": n, "vo": n}  # img_mlp and txt_mlp, one joint attention per block


def expected_flux2() -> dict[str, int]:
    from diffusers import Flux2Transformer2DModel

    d = defaults(Flux2Transformer2DModel)
    double, single = d["num_layers"], d["num_single_layers"]
    # a double block: ff, ff_context, qk, vo; a single block: qk, vo and its MLP (the fused
    # to_qkv_mlp_proj's parts)
    return {"ffn": 2 * double + single, "qk": double + single, "vo": double + single}


def expected_zimage() -> dict[str, int]:
    from diffusers import ZImageTransformer2DModel

    d = defaults(ZImageTransformer2DModel)
    n = d["n_layers"] + 2 * d["n_refiner_layers"]  # main layers, noise and context refiners
    return {"ffn": n, "qk": n, "vo": n}


def expected_wan() -> dict[str, int]:
    from diffusers import WanTransformer3DModel

    n = defaults(WanTransformer3DModel)["num_layers"]
    return {"ffn": n, "qk": 2 * n, "vo": 2 * n}  # self- and cross-attention per block


def expected_ltx() -> dict[str, int]:
    from diffusers import LTXVideoTransformer3DModel

    n = defaults(LTXVideoTransformer3DModel)["num_layers"]
    return {"ffn": n, "qk": 2 * n, "vo": 2 * n}  # self- and cross-attention per block


def expected_flux3() -> dict[str, int]:
    from diffusers import Flux3Transformer2DModel

    d = defaults(Flux3Transformer2DModel)
    n = 2 * d["num_layers"] + d["num_single_layers"]  # image and text per-mode blocks, joint blocks
    return {"ffn": n, "qk": n, "vo": n}  # the reference-image mode blocks stay whole


@pytest.mark.parametrize(
    "name, family, expected",
    [
        ("UNet2DConditionModel", "SD 1.x / 2.x / XL UNet", expected_unet),
        ("PixArtTransformer2DModel", "PixArt-alpha / PixArt-Sigma", expected_pixart),
        ("SD3Transformer2DModel", "SD3 / SD3.5 MMDiT", expected_sd3),
        ("FluxTransformer2DModel", "FLUX.1", expected_flux),
        ("ChromaTransformer2DModel", "FLUX.1-style blocks by structure", expected_chroma),
        ("BriaTransformer2DModel", "FLUX.1-style blocks by structure", expected_bria),
        ("QwenImageTransformer2DModel", "Qwen-Image", expected_qwenimage),
        ("Flux2Transformer2DModel", "FLUX.2", expected_flux2),
        ("ZImageTransformer2DModel", "Z-Image", expected_zimage),
        ("WanTransformer3DModel", "Wan 2.1", expected_wan),
        ("LTXVideoTransformer3DModel", "LTX-Video", expected_ltx),
        ("Flux3Transformer2DModel", "FLUX.3", expected_flux3),
    ],
)
def test_supported_families_and_their_unit_counts(coverage, name, family, expected):
    import diffusers

    from slimdiff.families import adapter_for_class

    row = coverage.row(getattr(diffusers, name))
    assert row["status"] == "supported", row
    assert row["detail"] == adapter_for_class(name).family and row["detail"].startswith(family)
    assert row["units"] == expected()


def test_a_row_never_raises(coverage, monkeypatch):
    """A default config that cannot be built, and a slimdiff bug, are rows, not exceptions."""
    from diffusers import UNet2DConditionModel

    import slimdiff.families

    class Broken(UNet2DConditionModel):
        def __init__(self):
            raise TypeError("no default for in_channels\nsecond line")

    row = coverage.row(Broken)
    assert row["status"] == "not buildable"
    assert row["detail"] == "cannot build from its default config: TypeError: no default for in_channels"

    def crash(model):
        raise KeyError("boom")

    monkeypatch.setattr(slimdiff.families, "adapter_for", crash)
    row = coverage.row(UNet2DConditionModel)
    assert (row["status"], row["stage"], row["detail"]) == ("error", "adapter_for", "KeyError: 'boom'")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers deprecation notices of some classes
def test_committed_coverage_is_up_to_date(coverage):
    """docs/coverage.md is what the code generates now
    (all classes on meta: ~15 s on 2 loaded cores); the date is the only thing allowed to differ."""
    result = coverage.collect()

    def undated(text: str) -> str:
        return re.sub(r" on \d{4}-\d{2}-\d{2}, ", " on <date>, ", text)

    hint = "stale: run `python benchmarks/family_coverage.py --write` and commit docs/coverage.md"
    assert undated(coverage.DOC.read_text()) == undated(coverage.render(result)), hint
    assert result["summary"]["error"] == 0, [r for r in result["rows"] if r["status"] == "error"]
