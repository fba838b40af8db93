"""What a rewrite did, in the form its consumers need: the rewrites of one unit (``FFNRewrite``,
``QKRewrite``, ``VORewrite``, computed by ``slimdiff.surgery.compress``), the attributes a compressed
model carries, and the per-layer linear maps (``LoraMaps``) that carry a weight delta of the
original model onto the compressed one (read by ``slimdiff.formats.lora``).

It sits below both the surgery and the LoRA projection, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimdiff.core import linalg
from slimdiff.core.digests import file_sha256
from slimdiff.families.base import LoraError, linear, split_row_part

F64 = torch.float64

#: attribute set on a compressed UNet: the RankPlan it was compressed with (read by slimdiff.formats.io)
PLAN_ATTRIBUTE = "slimdiff_plan"


#: ... and the options that change its layer layout beyond the plan's ranks (``{"qk_norm": mode}``)
COMPRESSION_ATTRIBUTE = "slimdiff_compression"


# --------------------------------------------------------------------------------------------
# Rewrites (what a method returns) and the method registry
# --------------------------------------------------------------------------------------------
@dataclass
class FFNRewrite:
    keep_value: torch.Tensor  # (k,) kept rows of the hidden half of proj (GELU: of proj)
    keep_gate: torch.Tensor  # (k,) kept rows of the gate half (GEGLU); == keep_value when shared
    out_weight: torch.Tensor  # (d, k) new ff.net.2 weight, float64
    error: float | None = None
    energy: float | None = None
    diagnostics: list[linalg.FactorDiagnostics] = field(default_factory=list)
    # out_weight = W_2 M with M (inner, k): rows keep_value of M are the identity, these are the
    # others (ascending neuron order), (inner - k, k). None: no refit (out_weight = W_2[:, keep]).
    # Recorded for slimdiff.formats.lora (a delta of ff.net.2 maps to delta @ M).
    refit_rest: torch.Tensor | None = None


@dataclass
class QKRewrite:
    t_q: torch.Tensor  # (H, d_h, r): new query head h = q_h @ t_q[h]
    t_k: torch.Tensor  # (H, d_h, r)
    error: float | None = None
    energy: float | None = None
    diagnostics: list[linalg.FactorDiagnostics] = field(default_factory=list)
    # q/k RMSNorm modules replaced after coordinate selection: path -> (weight (H, r), eps (H,))
    norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # RoPE: (H, r) original coordinate of every kept coordinate, for narrowing the rotary tables
    rope_index: torch.Tensor | None = None


@dataclass
class VORewrite:
    t_v: torch.Tensor  # (H, d_h, r): new value head h = v_h @ t_v[h]
    out_blocks: torch.Tensor  # (H, r, sum d_out): head h's new rows of the out linear(s), side by side
    error: float | None = None
    energy: float | None = None
    diagnostics: list[linalg.FactorDiagnostics] = field(default_factory=list)
    # (H, d_h, r): out_blocks[h] = s_out[h]^T W_o,h, i.e. the out linears' new column block h is
    # W_o[:, head h] @ s_out[h]. None when a method does not provide it: LoRA deltas of the out
    # linears then cannot be mapped (slimdiff.formats.lora warns).
    s_out: torch.Tensor | None = None


#: file of the maps inside a compressed denoiser folder, and its sidecar key
LORA_MAPS_NAME = "slimdiff_lora_maps.safetensors"


SIDECAR_KEY = "lora_maps"


LORA_MAPS_FORMAT_VERSION = 1


#: attribute of a compressed model holding its LoraMaps (set by compress_ / cached on first use)
LORA_MAPS_ATTRIBUTE = "slimdiff_lora_maps"


#: attribute of a model loaded from a slimdiff folder: the verified folder (maps are read lazily)
FOLDER_ATTRIBUTE = "slimdiff_folder"


#: how a layer's weight was rewritten: rows per head (T), rows selected (index), columns per
#: head (S), columns selected (index), columns through the Nystrom refit map (index J + rest)
KINDS = ("rows_heads", "rows_index", "cols_heads", "cols_index", "cols_nystrom")


_TENSORS = {
    "rows_heads": ("t",),
    "rows_index": ("index",),
    "cols_heads": ("t",),
    "cols_index": ("index",),
    "cols_nystrom": ("index", "rest"),
}


class LoraMapsMissingError(LoraError):
    """The compressed model (or folder) carries no LoRA maps."""


# --------------------------------------------------------------------------------------------
# The maps
# --------------------------------------------------------------------------------------------
@dataclass
class LayerMap:
    """The linear map one rewrite applied to one ``nn.Linear`` of the original model.

    ``original`` / ``compressed``: (out_features, in_features) before / after. Tensors by kind:
    ``rows_heads`` / ``cols_heads``: ``t`` (H, d_h, r) (new rows of head h: ``t[h]^T W_h``; new
    column block h: ``W[:, h] t[h]``); ``rows_index`` / ``cols_index``: ``index`` (kept rows /
    columns, int64); ``cols_nystrom``: ``index`` J (k,) and ``rest`` (n - k, k), the rows of
    ``M`` for the other columns in ascending order (rows J of ``M`` are the identity)."""

    path: str
    unit: str
    kind: str
    original: tuple[int, int]
    compressed: tuple[int, int]
    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LoraError(f"{self.path}: unknown map kind {self.kind!r} (expected one of {KINDS})")
        missing = [k for k in _TENSORS[self.kind] if k not in self.tensors]
        if missing:
            raise LoraError(f"{self.path}: map {self.kind} lacks tensors {missing}")
        self.original = tuple(int(x) for x in self.original)
        self.compressed = tuple(int(x) for x in self.compressed)
        self._check_shapes()

    def _check_shapes(self) -> None:
        (o_out, o_in), (c_out, c_in) = self.original, self.compressed
        t = self.tensors
        if self.kind in ("rows_heads", "cols_heads"):
            h, d, r = t["t"].shape
            full, new = (o_out, c_out) if self.kind == "rows_heads" else (o_in, c_in)
            ok = h * d == full and h * r == new
            ok = ok and ((o_in == c_in) if self.kind == "rows_heads" else (o_out == c_out))
        elif self.kind == "rows_index":
            ok = t["index"].shape == (c_out,) and o_in == c_in and int(t["index"].max()) < o_out
        elif self.kind == "cols_index":
            ok = t["index"].shape == (c_in,) and o_out == c_out and int(t["index"].max()) < o_in
        else:
            k = t["index"].numel()
            ok = k == c_in and o_out == c_out and tuple(t["rest"].shape) == (o_in - k, k)
        if not ok:
            raise LoraError(
                f"{self.path}: LoRA map {self.kind} with tensors "
                f"{ {k: list(v.shape) for k, v in t.items()} } does not fit the layer's shapes "
                f"{list(self.original)} -> {list(self.compressed)} (edited or mixed maps file?)"
            )

    def nystrom_matrix(self) -> torch.Tensor:
        """``M`` (n, k) of a ``cols_nystrom`` map, float64."""
        idx, rest = self.tensors["index"], self.tensors["rest"].to(F64)
        n, k = self.original[1], idx.numel()
        m = torch.zeros(n, k, dtype=F64)
        m[idx, torch.arange(k)] = 1.0
        mask = torch.ones(n, dtype=torch.bool)
        mask[idx] = False
        m[mask] = rest
        return m

    def map_delta(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with ``B' A'`` the image of ``B A`` (A (r, in), B (out, r), float64)."""
        a, b = a.to(F64), b.to(F64)
        t = self.tensors
        if self.kind == "rows_heads":
            heads, d, r = t["t"].shape
            bh = b.reshape(heads, d, b.shape[1])
            return a, torch.einsum("hdr,hdl->hrl", t["t"].to(F64), bh).reshape(heads * r, b.shape[1])
        if self.kind == "rows_index":
            return a, b[t["index"]]
        if self.kind == "cols_heads":
            heads, d, r = t["t"].shape
            ah = a.reshape(a.shape[0], heads, d)
            return torch.einsum("lhd,hdr->lhr", ah, t["t"].to(F64)).reshape(a.shape[0], heads * r), b
        if self.kind == "cols_index":
            return a[:, t["index"]], b
        return a @ self.nystrom_matrix(), b

    def map_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The image of a full weight (out, in) (float64): what compression does to it."""
        eye = torch.eye(w.shape[1], dtype=F64) if self.kind.startswith("rows") else None
        if eye is not None:
            _, out = self.map_delta(eye, w.to(F64))
            return out
        a, _ = self.map_delta(w.to(F64), torch.eye(w.shape[0], dtype=F64))
        return a


@dataclass
class LoraMaps:
    """Per rewritten layer, the map of its weight (``layers``); layers whose rewrite gives no map
    (a custom method without one) are in ``unmappable`` with the reason."""

    layers: dict[str, LayerMap] = field(default_factory=dict)
    unmappable: dict[str, str] = field(default_factory=dict)
    plan_digest: str | None = None

    # -- file ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> dict:
        """Write the maps file into ``directory``; returns the sidecar entry (index + sha256)."""
        from safetensors.torch import save_file

        tensors, index = {}, {}
        for path, lm in self.layers.items():
            for name, t in lm.tensors.items():
                # a copy each: an ungated FFN's row and column maps share one index tensor, and
                # safetensors refuses tensors that share memory
                tensors[f"{path}::{name}"] = t.detach().to("cpu").contiguous().clone()
            index[path] = {
                "unit": lm.unit,
                "kind": lm.kind,
                "original": list(lm.original),
                "compressed": list(lm.compressed),
            }
        file = Path(directory) / LORA_MAPS_NAME
        if tensors:
            # one metadata entry only (safetensors writes its metadata map in a random order)
            save_file(tensors, str(file), metadata={"format": "pt"})
        else:  # nothing compressed: an empty but valid file
            save_file({"__empty__": torch.zeros(0)}, str(file), metadata={"format": "pt"})
        return {
            "format_version": LORA_MAPS_FORMAT_VERSION,
            "file": LORA_MAPS_NAME,
            "sha256": file_sha256(file),
            "plan_digest": self.plan_digest,
            "layers": index,
            "unmappable": dict(self.unmappable),
        }

    @classmethod
    def load(cls, directory: str | Path, entry: Mapping) -> LoraMaps:
        from safetensors import safe_open

        directory = Path(directory)
        if entry.get("format_version") != LORA_MAPS_FORMAT_VERSION:
            raise LoraError(
                f"{directory}: LoRA maps format_version {entry.get('format_version')!r} is not supported "
                f"(this slimdiff reads {LORA_MAPS_FORMAT_VERSION})"
            )
        file = directory / str(entry.get("file", LORA_MAPS_NAME))
        if not file.is_file():
            raise LoraError(f"{file} not found (named by {directory}/slimdiff.json)")
        digest = file_sha256(file)
        if digest != entry.get("sha256"):
            raise LoraError(
                f"{file}: sha256 {digest[:12]}... does not match the sidecar's {str(entry.get('sha256'))[:12]}...: "
                "the LoRA maps were changed after saving"
            )
        layers = {}
        with safe_open(str(file), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            for path, info in dict(entry.get("layers") or {}).items():
                names = _TENSORS.get(info.get("kind"), ())
                missing = [f"{path}::{n}" for n in names if f"{path}::{n}" not in stored]
                if missing or not names:
                    raise LoraError(f"{file}: tensors {missing or [path]} of layer {path} are missing")
                layers[path] = LayerMap(
                    path,
                    info["unit"],
                    info["kind"],
                    tuple(info["original"]),
                    tuple(info["compressed"]),
                    {n: f.get_tensor(f"{path}::{n}") for n in names},
                )
        return cls(layers, dict(entry.get("unmappable") or {}), entry.get("plan_digest"))


def maps_from_rewrites(
    model: nn.Module, units: Mapping, rewrites: Mapping, plan_digest: str | None
) -> LoraMaps:
    """The LoraMaps of ``compress_``'s rewrites, read off the ORIGINAL layers of ``model`` (call
    before any layer is swapped). Stored in float32 (index tensors int64)."""

    maps = LoraMaps(plan_digest=plan_digest)

    def shape(path: str) -> tuple[int, int]:
        lin = linear(model, path)
        return lin.out_features, lin.in_features

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).contiguous()

    for name, rw in rewrites.items():
        lay = units[name].layout
        if isinstance(rw, FFNRewrite):
            inner = units[name].full_rank
            rows = torch.cat([rw.keep_value, inner + rw.keep_gate]) if lay.gated else rw.keep_value
            o_out, o_in = shape(lay.proj_in)
            maps.layers[lay.proj_in] = LayerMap(
                lay.proj_in,
                name,
                "rows_index",
                (o_out, o_in),
                (rows.numel(), o_in),
                {"index": rows.to(torch.int64).clone()},
            )
            if lay.gate:  # a separate gate linear (SwiGLU): the kept neurons' rows
                o_out, o_in = shape(lay.gate)
                maps.layers[lay.gate] = LayerMap(
                    lay.gate,
                    name,
                    "rows_index",
                    (o_out, o_in),
                    (rw.keep_gate.numel(), o_in),
                    {"index": rw.keep_gate.to(torch.int64).clone()},
                )
            o_out, o_in = shape(lay.proj_out)
            k = rw.keep_value.numel()
            if rw.refit_rest is not None:
                maps.layers[lay.proj_out] = LayerMap(
                    lay.proj_out,
                    name,
                    "cols_nystrom",
                    (o_out, o_in),
                    (o_out, k),
                    {"index": rw.keep_value.to(torch.int64).clone(), "rest": f32(rw.refit_rest)},
                )
            elif torch.equal(
                rw.out_weight.to(F64),
                linear(model, lay.proj_out).weight.detach().to("cpu", F64)[:, rw.keep_value],
            ):
                maps.layers[lay.proj_out] = LayerMap(
                    lay.proj_out,
                    name,
                    "cols_index",
                    (o_out, o_in),
                    (o_out, k),
                    {"index": rw.keep_value.to(torch.int64).clone()},
                )
            else:
                maps.unmappable[lay.proj_out] = (
                    f"{name}: the FFN method rebuilt {lay.proj_out} without a refit map"
                )
        elif isinstance(rw, QKRewrite):
            for paths, t in ((lay.all_query, rw.t_q), (lay.key, rw.t_k)):
                for path in paths:
                    o_out, o_in = shape(path)
                    heads, _, r = t.shape
                    maps.layers[path] = LayerMap(
                        path, name, "rows_heads", (o_out, o_in), (heads * r, o_in), {"t": f32(t)}
                    )
        elif isinstance(rw, VORewrite):
            heads, _, r = rw.t_v.shape
            for path in lay.value:
                o_out, o_in = shape(path)
                maps.layers[path] = LayerMap(
                    path, name, "rows_heads", (o_out, o_in), (heads * r, o_in), {"t": f32(rw.t_v)}
                )
            for path in lay.out:
                o_out, o_in = shape(path)
                if rw.s_out is None:
                    maps.unmappable[path] = f"{name}: the VO method gave no input map S for {path}"
                    continue
                maps.layers[path] = LayerMap(
                    path, name, "cols_heads", (o_out, o_in), (o_out, heads * r), {"t": f32(rw.s_out)}
                )
    # row parts of one packed linear (FLUX.2's single-block to_qkv_mlp_proj: q | k | v | MLP, rows
    # rewritten by several units): slimdiff.formats.lora projects column-packed linears only, so a
    # delta of such a layer is dropped with this reason instead of being mapped part by part
    packed: dict[str, list[str]] = {}
    for path in [p for p in maps.layers if split_row_part(p)[1] is not None]:
        packed.setdefault(split_row_part(path)[0], []).append(maps.layers.pop(path).unit)
    for base, names in packed.items():
        maps.unmappable[base] = (
            f"{', '.join(dict.fromkeys(names))}: {base} is packed by rows (parts rewritten by "
            "different units); LoRA deltas of a row-packed linear are not projected"
        )
    return maps
