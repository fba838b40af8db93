"""LoRA made for the ORIGINAL model, projected in closed form onto a compressed model.

Every SlimDiff rewrite is a linear map of the original weights (``slimdiff.surgery.compress``), so a
weight delta ``dW = B A`` of a LoRA for the original model has an exact image under the same map
(derivation and what it does not capture: docs/METHOD.md, "LoRA on compressed models"):

==================  ================================  ==========================================
layer               rewrite of the original weight    image of the delta ``B A``
==================  ================================  ==========================================
to_q / to_k         rows per head ``T_h^T W_h``       ``(blockdiag(T_h^T) B) A``
to_v                rows per head ``T_v,h^T W_h``     ``(blockdiag(T_v,h^T) B) A``
to_out.0            columns per head ``W[:, h] S_h``  ``B (A blockdiag(S_h))``
ff.net.0.proj       rows ``J`` (GEGLU: both halves)   ``B[J] A``
ff.net.2            ``W_2 M``, ``M = C~_:J C~_JJ^-1`` ``B (A M)``  (magnitude baseline: ``A[:, J]``)
anything else       unchanged                         ``B A``
==================  ================================  ==========================================

The LoRA rank is unchanged, so the result is again a LoRA (``lora_A`` / ``lora_B``) of the
compressed layers; its scale (``alpha / r``) is folded into ``lora_B``. ``compress_`` records the
maps (``LoraMaps``) on the model and ``slimdiff.formats.io.save_compressed`` writes them next to the
weights (``<denoiser>/slimdiff_lora_maps.safetensors``, sha256 in ``slimdiff.json``, verified on
load). Folders saved without them raise ``LoraMapsMissingError``.

Verbs: ``project_lora(model_or_pipe, lora, maps=None) -> (state_dict, report)`` and
``load_lora_into(pipe, lora, adapter_name=...)``, which loads the projected LoRA through diffusers'
``load_lora_weights`` when peft is installed and otherwise (or with ``method="fuse"``) fuses
``W += B' A'`` into the compressed weights, returning a handle whose ``unfuse()`` restores the
saved original tensors bit for bit.

Accepted LoRA formats: diffusers/PEFT (``<prefix>.<module>.lora_A.weight`` / ``lora_B``, with an
optional adapter name before ``weight``), the older diffusers ``<module>.lora.down/up.weight`` and
attention-processor ``<attn>.processor.to_q_lora.down.weight`` forms, and kohya-style
``lora_unet_<module_with_underscores>.lora_down/lora_up.weight`` with ``.alpha``; a family's
community formats go through its adapter's ``convert_lora`` first (FLUX.1: kohya / ai-toolkit /
ComfyUI keys with the reference code's names, ``lora_unet_double_blocks_0_img_attn_qkv``,
``diffusion_model.single_blocks.0.linear1``; fused rows split at the ORIGINAL widths, read from
the maps). Scales come from ``.alpha`` keys, ``network_alphas`` or diffusers'
``lora_adapter_metadata`` (``lora_alpha``, ``r``, ``alpha_pattern``, ``rank_pattern``,
``use_rslora``); without any, the scale is 1 (diffusers' convention). No prefect / mlflow / dvc
imports: this is a library module.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimdiff.calibration.collect import collect_stats
from slimdiff.core.digests import file_sha256
from slimdiff.core.stats import ActivationStats, merge
from slimdiff.families.base import (
    LoraError,
    UnsupportedModelError,
    adapter_for,
    column_range,
    denoiser_attr,
    denoiser_of,
    split_path,
)
from slimdiff.families.units import denoisers
from slimdiff.formats.sidecar import read_lora_maps
from slimdiff.surgery.maps import (
    FOLDER_ATTRIBUTE,
    LORA_MAPS_ATTRIBUTE,
    PLAN_ATTRIBUTE,
    LayerMap,
    LoraMaps,
    LoraMapsMissingError,
)

logger = logging.getLogger(__name__)

F64 = torch.float64


def maps_of(model: nn.Module, maps: LoraMaps | str | Path | None = None) -> LoraMaps:
    """The maps to project with: ``maps`` (a LoraMaps or a compressed folder), else those
    ``compress_`` recorded on ``model``, else those of the folder ``model`` was loaded from; an
    uncompressed model (no plan) maps every layer to itself. Checked against the model's plan."""

    plan = getattr(model, PLAN_ATTRIBUTE, None)
    if isinstance(maps, str | Path):
        maps = read_lora_maps(maps)
    if maps is None:
        maps = getattr(model, LORA_MAPS_ATTRIBUTE, None)
    if maps is None and getattr(model, FOLDER_ATTRIBUTE, None):
        maps = read_lora_maps(getattr(model, FOLDER_ATTRIBUTE))
        setattr(model, LORA_MAPS_ATTRIBUTE, maps)
    if maps is None:
        if plan is None:
            return LoraMaps()
        raise LoraMapsMissingError(
            f"this compressed {type(model).__name__} carries no LoRA maps (compressed with lora_maps=False, "
            "or built without a folder to read them from): pass maps=<compressed folder> or compress "
            "the original model again with lora_maps=True"
        )
    if plan is not None and maps.plan_digest is not None and maps.plan_digest != plan.digest:
        raise LoraError(
            f"the LoRA maps were made for plan {maps.plan_digest[:12]}, the model was compressed with plan "
            f"{plan.digest[:12]}: maps of another compressed model"
        )
    return maps


# --------------------------------------------------------------------------------------------
# Reading LoRA files
# --------------------------------------------------------------------------------------------
@dataclass
class _Target:
    path: str  # module path in the denoiser
    down: torch.Tensor | None = None  # A (r, in[, kh, kw])
    up: torch.Tensor | None = None  # B (out, r[, 1, 1])
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # keys that cannot be projected (DoRA, biases)


_PEFT = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.(?P<what>weight|bias)$")
_DOWNUP = re.compile(r"^(?P<mod>.+?)\.(?:lora\.|lora_)(?P<du>down|up)\.weight$")
_PROC = re.compile(r"^(?P<mod>.+)\.processor\.(?P<lin>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$")
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")
_DORA = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.[^.]+)*$")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.")
_KOHYA_TEXT = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_KOHYA_DENOISER = ("lora_unet_", "lora_transformer_")


def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, safetensors metadata) of a LoRA file, or of the
    ``pytorch_lora_weights.safetensors`` in a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise LoraError(f"{path}: not a LoRA state dict")
    return dict(state), {}


def _adapter_config(metadata: Mapping[str, str] | None, prefix: str) -> dict:
    """diffusers' ``lora_adapter_metadata`` (keys ``<prefix>.r``, ``<prefix>.lora_alpha``, ...)."""
    if not metadata or "lora_adapter_metadata" not in metadata:
        return {}
    raw = metadata["lora_adapter_metadata"]
    data = json.loads(raw) if isinstance(raw, str) else dict(raw)
    out = {k[len(prefix) + 1 :]: v for k, v in data.items() if k.startswith(prefix + ".")}
    return out or {k: v for k, v in data.items() if "." not in k}


def _pattern_value(patterns: Mapping[str, Any], path: str) -> Any:
    for key, value in (patterns or {}).items():
        if path == key or path.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return None


def _unwrap(mod: nn.Module) -> nn.Module:
    """The layer itself under a peft adapter wrapper (a layer that already carries a LoRA loaded
    through diffusers / peft keeps its weight in ``base_layer``), else ``mod``."""
    base = getattr(mod, "base_layer", None)
    return base if isinstance(base, nn.Module) else mod


def _module_shape(mod: nn.Module) -> tuple[int, ...] | None:
    mod = _unwrap(mod)
    if isinstance(mod, nn.Linear):
        return (mod.out_features, mod.in_features)
    if isinstance(mod, nn.Conv2d):
        return (mod.out_channels, mod.in_channels // mod.groups, *mod.kernel_size)
    return None


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------
@dataclass
class LoraProjection:
    """What ``project_lora`` did: per projected layer its map kind ("identity" or a LayerMap
    kind), rank and scale; targets dropped (with the reason, also warned); keys passed through
    unchanged (text encoders, which compression does not touch)."""

    prefix: str
    layers: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    passthrough: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "prefix": self.prefix,
            "layers": dict(self.layers),
            "ranks": dict(self.ranks),
            "scales": dict(self.scales),
            "dropped": dict(self.dropped),
            "passthrough": list(self.passthrough),
        }


def _split(target: Any) -> tuple[nn.Module, str, Any]:
    """(denoiser, its pipeline attribute, pipeline or None)."""

    if isinstance(target, nn.Module):
        try:
            attr = adapter_for(target).pipeline_attr
        except UnsupportedModelError:  # an unknown model still has a prefix guess; other errors are bugs
            attr = "unet"
        return target, attr, None
    return denoiser_of(target), denoiser_attr(target), target


def _parse(
    state: Mapping[str, torch.Tensor], model: nn.Module, prefix: str
) -> tuple[dict[str, _Target], list[str], dict[str, str], list[str]]:
    """Group the keys by target module: (targets, passthrough keys, dropped {key: reason},
    problems). Problems are bad keys (unknown modules or formats)."""
    modules = dict(model.named_modules())
    underscored = {name.replace(".", "_"): name for name in modules if name}
    targets: dict[str, _Target] = {}
    passthrough, dropped, problems = [], {}, []

    def resolve(mod: str, key: str) -> str | None:
        for p in (f"{prefix}.", "unet.", "transformer.", "base_model.model."):
            if mod.startswith(p):
                mod = mod[len(p) :]
                break
        for p in _KOHYA_DENOISER:
            if mod.startswith(p):
                name = underscored.get(mod[len(p) :])
                if name is None:
                    problems.append(f"{key}: no layer {mod[len(p) :]!r} (kohya name) in the model")
                return name
        if mod not in modules:
            problems.append(f"{key}: the model has no layer {mod!r} (a LoRA for another model?)")
            return None
        return mod

    for key, value in state.items():
        if key.startswith(_TEXT_PREFIXES):
            passthrough.append(key)
            continue
        if key.startswith(_KOHYA_TEXT):
            dropped[key] = (
                "kohya-format text-encoder key: not supported by slimdiff.formats.lora (convert it first)"
            )
            continue
        m = _PROC.match(key)
        if m:
            lin = "to_out.0" if m["lin"] == "to_out" else m["lin"]
            mod, role = f"{m['mod']}.{lin}", m["du"]
        elif (m := _PEFT.match(key)) is not None:
            mod = m["mod"]
            if m["what"] == "bias":
                role = "bias"
            else:
                role = "down" if m["ab"] == "A" else "up"
        elif (m := _DOWNUP.match(key)) is not None:
            mod, role = m["mod"], m["du"]
        elif (m := _DORA.match(key)) is not None:
            mod, role = m["mod"], "dora"
        elif (m := _ALPHA.match(key)) is not None:
            mod, role = m["mod"], "alpha"
        else:
            problems.append(f"{key}: not a LoRA key this reader knows (lora_A/lora_B, lora.down/up, alpha)")
            continue
        path = resolve(mod, key)
        if path is None:
            continue
        t = targets.setdefault(path, _Target(path))
        t.keys.append(key)
        if role == "down":
            t.down = value
        elif role == "up":
            t.up = value
        elif role == "alpha":
            t.alpha = float(value.item() if torch.is_tensor(value) else value)
        else:
            t.extra.append(key)
    return targets, passthrough, dropped, problems


def _factor_dtype(b: torch.Tensor, layer: nn.Module) -> torch.dtype:
    """dtype of the projected factors: the more precise of the LoRA file's and the target layer's.
    The projection itself runs in float64 and is rounded once, here, so an fp16 LoRA on an fp32
    model gives fp32 factors (no fp16 rounding of the projected values, ~1e-3), and an fp32 LoRA
    on an fp16 model keeps its fp32 factors (fusing sums in float64 and rounds to the layer's dtype
    once; peft casts to its adapter's dtype on load)."""
    file = b.dtype if b.is_floating_point() else torch.float32
    weight = getattr(_unwrap(layer), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return torch.promote_types(file, weight.dtype)
    return file


def _convert(
    model: nn.Module, lora: Mapping[str, torch.Tensor], lmaps: LoraMaps
) -> Mapping[str, torch.Tensor]:
    """``lora`` with the keys of its family's community formats (FLUX: kohya / ai-toolkit /
    ComfyUI BFL names, fused q|k|v rows) rewritten by the model's adapter
    (``ModelAdapter.convert_lora``) at the ORIGINAL widths (the maps' original shapes for layers
    the compressed model holds narrowed). Keys in a form ``_parse`` reads pass through unchanged;
    a model no adapter recognises gets ``lora`` as is."""

    try:
        adapter = adapter_for(model)
    except UnsupportedModelError:
        return lora
    shapes = {path: lm.original for path, lm in lmaps.layers.items()}
    return adapter.convert_lora(model, lora, original_shapes=shapes)


def _packed_maps(lmaps: LoraMaps, path: str) -> list[str]:
    """The map keys that address column blocks of the linear at ``path`` (``arch.base.packed_path``)."""

    out = []
    for key in (*lmaps.layers, *lmaps.unmappable):
        base, cols = split_path(key)
        if cols is not None and base == path:
            out.append(key)
    return out


class PackedMap:
    """The map of a linear whose input columns are blocks rewritten by different units (a FLUX
    single block's ``proj_out``: [attention output | MLP hidden]). Each block's columns of ``A``
    go through that block's column map; columns no unit rewrote pass unchanged; ``B`` is kept
    (column maps never touch it)."""

    def __init__(self, path: str, layer: nn.Module, blocks: Mapping[str, LayerMap]):

        self.path, self.kind = path, "cols_packed"
        out = int(layer.weight.shape[0])
        current = int(layer.weight.shape[1])
        original_in = current + sum(m.original[1] - m.compressed[1] for m in blocks.values())
        self.original = (out, original_in)
        self.blocks = sorted(
            ((column_range(k, original_in), m) for k, m in blocks.items()), key=lambda x: x[0][0]
        )

    def map_delta(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = a.to(F64)
        parts, pos = [], 0
        for (start, stop), m in self.blocks:
            parts.append(a[:, pos:start])
            parts.append(m.map_delta(a[:, start:stop], b)[0])
            pos = stop
        parts.append(a[:, pos:])
        return torch.cat(parts, dim=1), b.to(F64)


def project_lora(
    target: Any,
    lora: Mapping[str, torch.Tensor] | str | Path,
    maps: LoraMaps | str | Path | None = None,
    *,
    network_alphas: Mapping[str, float] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], LoraProjection]:
    """Project a LoRA made for the ORIGINAL model onto the compressed ``target`` (a pipeline or
    its denoiser). Returns the LoRA of the compressed layers in diffusers/PEFT format
    (``<prefix>.<module>.lora_A.weight`` / ``lora_B.weight``, its scale folded into ``lora_B``,
    so it loads with scale 1) and a ``LoraProjection`` report.

    ``lora``: a state dict or a file / folder (``load_lora_file``; its safetensors metadata is
    read). ``maps``: see ``maps_of``. ``network_alphas``: alphas by module path (or by any key
    whose module part is one). Raises ``LoraError`` naming the layer(s) when a key names no layer
    of the model, when the shapes do not fit the ORIGINAL layer (a LoRA for another base model) or
    when lora_A / lora_B are missing or disagree on the rank; ``LoraMapsMissingError`` when the
    compressed model has no maps. Targets that cannot be projected (DoRA magnitudes, LoRA biases,
    layers without a map) are dropped with one ``warnings.warn`` listing them.

    dtype: computed in float64; the factors are returned in the more precise of the LoRA's dtype
    and the target layer's (an fp16 LoRA on an fp32 model: fp32 factors), rounded once."""
    model, prefix, _ = _split(target)
    if isinstance(lora, str | Path):
        lora, file_meta = load_lora_file(lora)
        metadata = metadata or file_meta
    lmaps = maps_of(model, maps)
    lora = _convert(model, lora, lmaps)
    config = _adapter_config(metadata, prefix)
    targets, passthrough, dropped, problems = _parse(lora, model, prefix)
    alphas: dict[str, float] = {}
    for key, value in dict(network_alphas or {}).items():
        mod = key.removesuffix(".alpha")
        for suffix in (".lora.down.weight", ".lora_A.weight", ".lora_down.weight", ".down.weight"):
            mod = mod.removesuffix(suffix)
        mod = mod.removeprefix(f"{prefix}.")
        alphas[mod] = float(value)
    modules = dict(model.named_modules())
    report = LoraProjection(prefix)
    out: dict[str, torch.Tensor] = {}

    for path, t in targets.items():
        if t.extra:
            what = "DoRA magnitude" if any("magnitude" in k for k in t.extra) else "LoRA bias"
            dropped[path] = (
                f"{what} ({', '.join(t.extra)}): not a linear delta B A, so it has no image under the "
                "compression's linear maps"
            )
            continue
        if t.down is None or t.up is None:
            if t.down is None and t.up is None:  # an alpha alone
                problems.append(f"{path}: alpha without lora_A / lora_B weights")
            else:
                problems.append(
                    f"{path}: has {'lora_A (down)' if t.up is None else 'lora_B (up)'} but not the other"
                )
            continue
        a, b = t.down, t.up
        rank = a.shape[0]
        if b.dim() < 2 or b.shape[1] != rank:
            problems.append(
                f"{path}: lora_A has rank {rank} but lora_B has shape {list(b.shape)} (expected [out, {rank}])"
            )
            continue
        lm = lmaps.layers.get(path)
        packed = _packed_maps(lmaps, path)
        if lm is None and packed:  # column blocks of one packed linear (FLUX single-block proj_out)
            reasons = [lmaps.unmappable[k] for k in packed if k in lmaps.unmappable]
            if reasons:
                dropped[path] = "; ".join(reasons)
                continue
            lm = PackedMap(path, modules[path], {k: lmaps.layers[k] for k in packed})
        if lm is not None:
            original: tuple[int, ...] | None = lm.original
        elif path in lmaps.unmappable:
            dropped[path] = lmaps.unmappable[path]
            continue
        else:
            original = _module_shape(modules[path])
            if original is None:
                problems.append(
                    f"{path}: a {type(modules[path]).__name__}, not a linear or conv layer LoRA can target"
                )
                continue
        got = (b.shape[0], a.shape[1], *a.shape[2:])
        if len(original) == 2 and (a.dim() != 2 or b.dim() != 2):
            problems.append(
                f"{path}: a linear layer {list(original)}, the LoRA has conv-shaped weights {list(a.shape)}, {list(b.shape)}"
            )
            continue
        if tuple(got) != tuple(original):
            problems.append(
                f"{path}: the LoRA's delta is {list(got)} (out, in), the original layer is {list(original)} "
                "(a LoRA for another base model?)"
            )
            continue
        # scale: .alpha key, network_alphas, adapter metadata; else 1 (diffusers' convention)
        alpha = t.alpha if t.alpha is not None else alphas.get(path)
        r_eff = rank
        if alpha is None and config:
            pat = _pattern_value(config.get("alpha_pattern") or {}, path)
            alpha = float(pat) if pat is not None else config.get("lora_alpha")
            rp = _pattern_value(config.get("rank_pattern") or {}, path)
            r_eff = int(rp) if rp is not None else rank
        if alpha is None:
            scale = 1.0
        elif config.get("use_rslora"):
            scale = float(alpha) / math.sqrt(r_eff)
        else:
            scale = float(alpha) / r_eff
        dtype = _factor_dtype(b, modules[path])
        if lm is None:
            a_new, b_new = a.to(F64), b.to(F64)
            kind = "identity"
        else:
            a_new, b_new = lm.map_delta(a, b)
            kind = lm.kind
        out[f"{prefix}.{path}.lora_A.weight"] = a_new.to(dtype).contiguous()
        out[f"{prefix}.{path}.lora_B.weight"] = (b_new * scale).to(dtype).contiguous()
        report.layers[path] = kind
        report.ranks[path] = rank
        report.scales[path] = scale

    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:4])})" if len(problems) > 1 else ""
        raise LoraError(f"cannot project this LoRA onto the compressed model: {problems[0]}{more}")
    for key in passthrough:
        out[key] = lora[key]
    report.passthrough = passthrough
    report.dropped = dropped
    if dropped:
        lines = "; ".join(f"{k}: {v}" for k, v in dropped.items())
        warnings.warn(
            f"{len(dropped)} LoRA target(s) cannot be projected onto the compressed model and are dropped: {lines}",
            stacklevel=2,
        )
    logger.info(
        "projected a LoRA onto %d layers (%d mapped, %d unchanged), %d dropped, %d passed through",
        len(report.layers),
        sum(k != "identity" for k in report.layers.values()),
        sum(k == "identity" for k in report.layers.values()),
        len(dropped),
        len(passthrough),
    )
    return out, report


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@dataclass
class LoadedLora:
    """A LoRA loaded by ``load_lora_into``: how (``method``: "diffusers" or "fuse"), the projection
    report and, for "fuse", the tensors it changed (restored by ``unfuse``)."""

    adapter_name: str
    method: str
    report: LoraProjection
    state_dict: dict[str, torch.Tensor]
    _saved: dict[int, tuple[nn.Module, torch.Tensor]] = field(default_factory=dict, repr=False)
    _owner: Any = field(default=None, repr=False)

    @property
    def fused(self) -> bool:
        return bool(self._saved)

    def unfuse(self) -> None:
        """Put back the exact weights the fuse replaced (a copy was kept; no subtraction)."""
        if self.method == "diffusers":
            self._owner.delete_adapters(self.adapter_name)
            return
        with torch.no_grad():
            for module, weight in self._saved.values():
                module.weight.copy_(weight)
        self._saved.clear()


def _peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _submodule(owner: nn.Module, path: str) -> nn.Module | None:
    """``owner``'s layer at ``path`` (under a peft wrapper, its base layer); CLIP text-encoder keys
    name ``text_model.`` where newer transformers have no such level, so that prefix may be left
    out."""
    for p in (path, path.removeprefix("text_model.")):
        try:
            return _unwrap(owner.get_submodule(p))
        except AttributeError:
            continue
    return None


def _fuse(owner_modules: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor], scale: float) -> dict:
    """``W += scale * B A`` for every lora_A / lora_B pair of ``state`` (keys ``<component>.<path>
    .lora_A.weight``); returns {id: (module, original weight copy)}."""
    saved: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    pairs = {}
    for key in state:
        m = _PEFT.match(key)
        if m and m["what"] == "weight":
            pairs.setdefault(m["mod"], {})[m["ab"]] = state[key]
    with torch.no_grad():
        for mod, ab in pairs.items():
            comp, _, path = mod.partition(".")
            if comp not in owner_modules:
                raise LoraError(f"{mod}: no component {comp!r} to fuse into")
            layer = _submodule(owner_modules[comp], path)
            if layer is None or not isinstance(layer, nn.Linear | nn.Conv2d):
                raise LoraError(f"{mod}: no linear or conv layer {path!r} in {comp} to fuse into")
            a, b = ab["A"].to(F64), ab["B"].to(F64)
            delta = b.flatten(1) @ a.flatten(1)
            delta = delta.view(layer.weight.shape) if layer.weight.dim() == 4 else delta
            if delta.shape != layer.weight.shape:
                raise LoraError(
                    f"{path}: delta {list(delta.shape)} does not fit weight {list(layer.weight.shape)}"
                )
            saved[id(layer)] = (layer, layer.weight.detach().clone())
            new = layer.weight.detach().to(F64) + scale * delta.to(layer.weight.device)
            layer.weight.copy_(new.to(layer.weight.dtype))
    return saved


def load_lora_into(
    pipe: Any,
    lora: Mapping[str, torch.Tensor] | str | Path,
    adapter_name: str = "default",
    *,
    maps: LoraMaps | str | Path | None = None,
    method: str = "auto",
    scale: float = 1.0,
    network_alphas: Mapping[str, float] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> LoadedLora:
    """Project ``lora`` (made for the original model) onto the compressed ``pipe`` (a pipeline or
    its denoiser) and load it.

    ``method``: "diffusers" loads the projected LoRA with ``pipe.load_lora_weights(state,
    adapter_name=...)`` (needs peft; adapters can then be switched and weighted as usual);
    "fuse" adds ``scale * B' A'`` to the compressed weights in place (float64 sum, cast back),
    and the returned handle's ``unfuse()`` restores the saved original tensors exactly; "auto"
    (default) is "diffusers" when peft is importable and the pipeline has ``load_lora_weights``,
    else "fuse" (the documented fallback for environments without peft)."""
    if method not in ("auto", "diffusers", "fuse"):
        raise ValueError(f"method must be 'auto', 'diffusers' or 'fuse', got {method!r}")
    model, prefix, pipeline = _split(pipe)
    state, report = project_lora(pipe, lora, maps, network_alphas=network_alphas, metadata=metadata)
    loader = pipeline if pipeline is not None else model
    can_diffusers = _peft_available() and hasattr(
        loader, "load_lora_weights" if pipeline is not None else "load_lora_adapter"
    )
    if method == "auto":
        method = "diffusers" if can_diffusers else "fuse"
        if method == "fuse":
            logger.info("peft is not installed: fusing the projected LoRA into the compressed weights")
    if method == "diffusers":
        if not can_diffusers:
            raise LoraError(
                "method='diffusers' needs peft (pip install peft) and a pipeline with load_lora_weights; "
                "use method='fuse' without them"
            )
        if pipeline is not None:
            pipeline.load_lora_weights(state, adapter_name=adapter_name)
            if scale != 1.0:
                pipeline.set_adapters([adapter_name], adapter_weights=[scale])
        else:
            model.load_lora_adapter(state, prefix=prefix, adapter_name=adapter_name)
            if scale != 1.0:
                model.set_adapters([adapter_name], weights=[scale])
        return LoadedLora(adapter_name, "diffusers", report, state, _owner=loader)
    owners: dict[str, nn.Module] = {prefix: model}
    if pipeline is not None:
        for key in report.passthrough:
            comp = key.split(".", 1)[0]
            mod = getattr(pipeline, comp, None)
            if isinstance(mod, nn.Module):
                owners[comp] = mod
    missing = sorted({k.split(".", 1)[0] for k in report.passthrough} - set(owners))
    if missing:
        raise LoraError(
            f"the LoRA has keys for {missing}, which the target does not have (pass the pipeline)"
        )
    saved = _fuse(owners, state, scale)
    return LoadedLora(adapter_name, "fuse", report, state, saved)


# --------------------------------------------------------------------------------------------
# LoRA-aware calibration
# --------------------------------------------------------------------------------------------
def lora_digest(lora: Mapping[str, torch.Tensor] | str | Path) -> str:
    """sha256 of a LoRA: of the file's bytes for a file or folder (``load_lora_file``'s file), else
    over its tensors in name order (name, dtype, shape, bytes). What identifies the LoRA in cache
    keys and statistics metadata."""
    import hashlib

    if isinstance(lora, str | Path):
        path = Path(lora)
        if path.is_dir():
            path = path / "pytorch_lora_weights.safetensors"
        if not path.is_file():
            raise LoraError(f"{path}: no such LoRA file")
        return file_sha256(path)
    h = hashlib.sha256()
    for name in sorted(lora):
        t = lora[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def collect_stats_with_loras(
    pipe: Any,
    prompts: Any,
    loras: Any = (),
    *,
    lora_scale: float = 1.0,
    lora_prompts: Any = None,
    **collect_options: Any,
):
    """Calibration statistics that also cover what some LoRAs activate (docs/lora.md, "LoRA-aware
    calibration").

    Runs ``slimdiff.calibration.collect.collect_stats(pipe, prompts, **collect_options)`` on the
    pipeline as it is, then once more per LoRA of ``loras`` (files, folders or state dicts made for
    this, the ORIGINAL, model) with that LoRA fused at ``lora_scale`` (``load_lora_into(...,
    method="fuse")``: ``W += lora_scale * B A`` in float64), each run with the same prompts and seeds,
    and returns the exact sum of all runs (``slimdiff.core.stats.merge``: second-moment sums and token
    counts added). Every run sees the same tokens, so the per-bucket second moment the compression
    reads is the equal-weight mixture ``(C_base + C_lora1 + ...) / (1 + len(loras))``: neurons and
    directions a LoRA uses enter the selection even when the base prompts leave them idle, at the
    price of a share of the statistics' weight on the base model (one LoRA: half). There is no
    per-run weight: token counts are integers and an equal mixture is the natural choice; list a
    LoRA twice to weigh it twice. ``lora_prompts`` (default: ``prompts``) samples the LoRA runs on
    other prompts, e.g. of the LoRA's own domain (then each run weighs by its token count).

    After each LoRA run the fused weights are put back from saved copies and checked bit for bit
    against them (also when sampling raises); the pipeline is left as it was. Without LoRAs this is
    ``collect_stats`` itself (same object, same bits). ``sink`` (``collect_stats``' streaming
    hand-over) is accepted: with LoRAs the runs are summed in memory first (about twice the
    statistics' host memory) and each merged statistic is then handed to ``sink`` and freed; the
    returned statistics hold the metadata only, as with ``collect_stats(sink=...)``. The metadata
    record the LoRAs (``meta["loras"]``: sha256 and scale of each, in run order)."""

    loras = [loras] if isinstance(loras, str | Path | Mapping) else list(loras or ())
    if not loras:
        return collect_stats(pipe, prompts, **collect_options)
    lora_prompts = list(prompts if lora_prompts is None else lora_prompts)
    if isinstance(pipe, nn.Module):
        raise TypeError("collect_stats_with_loras needs the pipeline (it samples), not its denoiser")
    several = list(denoisers(pipe))
    if len(several) > 1:
        raise ValueError(
            f"LoRA-aware calibration of a pipeline with several denoisers ({', '.join(several)}) is not "
            "supported: a LoRA is fused into one denoiser only"
        )
    sink = collect_options.pop("sink", None)
    digests = [lora_digest(lora) for lora in loras]  # unreadable files fail before any sampling
    for lora in loras:  # so does a LoRA that does not fit the model (LoraError naming the layer)
        project_lora(pipe, lora)
    total = collect_stats(pipe, prompts, **collect_options)
    for i, lora in enumerate(loras):
        handle = load_lora_into(pipe, lora, f"calibration_{i}", method="fuse", scale=lora_scale)
        saved = list(handle._saved.values())  # (layer, exact copy of its weight before the fuse)
        try:
            run = collect_stats(pipe, lora_prompts, **collect_options)
        finally:
            handle.unfuse()
            changed = [layer for layer, weight in saved if not torch.equal(layer.weight, weight)]
            if changed:
                raise RuntimeError(
                    f"{len(changed)} layer(s) did not get their exact weights back after LoRA {i}'s "
                    "calibration run; the pipeline is changed"
                )
        total = merge([total, run])
        del run
        logger.info(
            "LoRA-aware calibration: run %d of %d (LoRA %s) merged", i + 2, len(loras) + 1, digests[i][:12]
        )
    meta = dict(total.meta)
    meta.pop("merged_shards", None)
    meta["loras"] = [{"sha256": d, "scale": float(lora_scale)} for d in digests]
    meta["lora_runs"] = len(loras)
    if lora_prompts != list(prompts):
        meta["lora_prompts"] = len(lora_prompts)
    if sink is None:
        return ActivationStats(total.n_buckets, total.moments, total.tokens, meta)
    for key in list(total.moments):
        sink(key, total.moments.pop(key), total.tokens.pop(key))
    return ActivationStats(total.n_buckets, {}, {}, meta)
