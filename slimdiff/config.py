"""Typed, validated configuration: one group per pipeline stage, loaded from ``params.yaml``.

Nothing here reads a file at import time: call :func:`load_params` (or :meth:`Params.from_dict`).
Every group rejects unknown keys, wrong types and impossible values with a :class:`ConfigError`
whose one-line message names the key (``allocation.budget.value``) and says what is allowed.

Which params each stage reads is declared once, in :data:`STAGE_PARAMS`; the Prefect cache keys
and ``dvc.yaml`` are both checked against it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimdiff.core.memory import parse_bytes

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A params file or dict that does not validate. ``str(err)`` is one line per problem."""


class _Group(BaseModel):
    # strict: "0.4" is not a float, unknown keys are errors, values are immutable once loaded
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelParams(_Group):
    """The source model to compress."""

    # "toy" = the committed toy pipeline (data/toy/pipeline); otherwise a local diffusers folder or
    # a Hugging Face repo id (loaded from the local HF cache only, never downloaded by tests).
    source: str = "toy"
    # Revision of a hub source (commit hash or tag); ignored for local folders (their revision is
    # a content digest).
    revision: str | None = None
    # Device and dtype for calibration/evaluation forward passes ("cpu", "cuda", "cuda:1", ...).
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class EmbedderParams(_Group):
    # toy = the toy world's open_clip model; open_clip = a named model + local checkpoint or tag;
    # pipeline = the pipeline's own text encoder.
    kind: Literal["toy", "open_clip", "pipeline"] = "toy"
    model_name: str | None = None  # open_clip model name, e.g. "ViT-L-14"
    pretrained: str | None = None  # local checkpoint path or open_clip pretrained tag

    @model_validator(mode="after")
    def _open_clip_needs_model(self) -> EmbedderParams:
        if self.kind == "open_clip" and not (self.model_name and self.pretrained):
            raise ValueError(
                "kind 'open_clip' needs model_name and pretrained (a local checkpoint path or tag)"
            )
        return self


class SlimSetParams(_Group):
    # "toy" = the toy world's training captions; otherwise a path to a text/csv/tsv/json prompt pool
    pool: str = "toy"
    n: int = Field(64, ge=1, description="number of calibration prompts")
    seed: int = 0
    # share of the SlimSet reserved for the prompts nearest the geometric median (dense region)
    canonical_share: float = Field(0.0, ge=0.0, le=1.0)
    # cosine similarity above which two prompts count as near duplicates
    near_dup_threshold: float = Field(0.98, gt=0.0, le=1.0)
    # evaluation prompt sets that must never appear in a SlimSet ("toy-heldout" or file paths)
    exclude: tuple[str, ...] = ("toy-heldout",)
    embedder: EmbedderParams = EmbedderParams()


class CalibrationParams(_Group):
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.0, ge=0.0)
    n_buckets: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(32, ge=1, description="prompts per persisted shard (resume unit)")
    seed: int = 0
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    # memory limit for the statistics' accumulators (bytes, e.g. "16GiB"; auto = half of what the
    # device has available beyond the model's weights; null = no limit): the
    # sites are split into sampling passes that fit it (slimdiff.core.memory). It changes no number, so
    # it is not part of the calibrate stage's cache key or the store's identity.
    max_memory: int | str | None = "auto"
    # auto: float64 running sums on the CPU (exact), float32 sums on accelerators flushed into float64
    # host sums every flush_every products (relative error <= (flush_every - 1) * 2^-24; METHOD.md)
    accumulate: Literal["auto", "float64", "float32"] = "auto"
    flush_every: int = Field(16, ge=1)

    @field_validator("max_memory")
    @classmethod
    def _parse_memory(cls, v):

        if not (isinstance(v, str) and v.strip().lower() == "auto"):
            parse_bytes(v)  # raises naming the accepted forms
        return v

    def sampler_options(self) -> dict[str, Any]:
        """The keyword arguments of ``slimdiff.calibration.collect.collect_stats`` these settings fix."""
        keys = (
            "num_inference_steps",
            "guidance_scale",
            "n_buckets",
            "batch_size",
            "seed",
            "height",
            "width",
            "max_memory",
            "accumulate",
            "flush_every",
        )
        return {k: getattr(self, k) for k in keys}

    @model_validator(mode="after")
    def _buckets_fit_steps(self) -> CalibrationParams:
        if self.n_buckets > self.num_inference_steps:
            raise ValueError(
                f"n_buckets ({self.n_buckets}) must be <= num_inference_steps ({self.num_inference_steps})"
            )
        return self


class InfluenceParams(_Group):
    weighting: Literal["spectral", "uniform", "snr"] = "spectral"


class BudgetParams(_Group):
    # removed_fraction: share of the compressible parameters to remove (0..1)
    # removed_params / kept_params: absolute counts in the compressible set
    # total_params: target size of the whole UNet
    # removed_flops_fraction: share of the compressible FLOPs at allocation.serving to remove (0..1)
    # total_flops: FLOPs of one denoiser forward at allocation.serving after compression
    # flops_speedup: one forward at allocation.serving runs at most 1/value of its FLOPs (> 1: the
    #   speedup's FLOP bound; infeasible where the compressible layers hold too little of the FLOPs)
    # removed_latency_fraction: share of the compressible latency of one forward at
    #   allocation.serving removed, from a measured latency table (slimdiff.planning.latency) (0..1)
    kind: Literal[
        "removed_fraction",
        "removed_params",
        "kept_params",
        "total_params",
        "removed_flops_fraction",
        "total_flops",
        "flops_speedup",
        "removed_latency_fraction",
    ] = "removed_flops_fraction"
    value: float = 0.55

    @model_validator(mode="after")
    def _value_in_range(self) -> BudgetParams:
        fraction = self.kind in ("removed_fraction", "removed_flops_fraction", "removed_latency_fraction")
        if fraction and not 0.0 < self.value < 1.0:
            raise ValueError(f"value: {self.kind} must be in (0, 1), got {self.value}")
        if self.kind == "flops_speedup":
            if not (self.value > 1.0 and math.isfinite(self.value)):
                raise ValueError(f"value: flops_speedup must be a finite number > 1, got {self.value}")
        elif not fraction and self.value <= 0:
            what = "FLOP count" if self.kind == "total_flops" else "parameter count"
            raise ValueError(f"value: {self.kind} must be a positive {what}, got {self.value}")
        return self

    @property
    def in_flops(self) -> bool:
        return self.kind in ("removed_flops_fraction", "total_flops", "flops_speedup")

    @property
    def in_latency(self) -> bool:
        return self.kind == "removed_latency_fraction"


class ServingParams(_Group):
    """The shape FLOPs are counted at: what a FLOP budget (allocation.budget.kind
    removed_flops_fraction / total_flops) spends and its plan records (FLOPs before and after).
    Per denoiser forward: a generation costs sampler steps x that, a factor common to every plan,
    so there is no steps key (batch, likewise, scales every plan alike)."""

    # pixels; null = the model's configured resolution (512 for SD v1.5, 1024 for SDXL / SD3.5)
    height: int | None = Field(None, ge=8, multiple_of=8)
    width: int | None = Field(None, ge=8, multiple_of=8)
    # samples per denoiser forward: 2 = one image under classifier-free guidance
    batch: int = Field(2, ge=1)
    # text tokens; null = the family's (77 for SD 1.x / XL, 333 for SD3, the tokenizer's for PixArt)
    text_len: int | None = Field(None, ge=1)


class AllocationParams(_Group):
    # error: least parameter-weighted relative truncation error (slimdiff.planning.spectra);
    # influence: METHOD.md's softmax of the spectral influence scores; uniform: one keep ratio
    mode: Literal["error", "influence", "uniform"] = "error"
    budget: BudgetParams = BudgetParams()
    serving: ServingParams = ServingParams()
    # pull toward uniform keep ratios: large = uniform; small = greedy (error: 0 allowed, influence: > 0)
    tau: float = Field(0.0, ge=0.0, description="temperature: large = uniform, small = greedy")
    r_min: int = Field(8, ge=1)
    multiple: int = Field(8, ge=1)
    # module types to compress; the others keep full rank
    modules: tuple[Literal["ffn", "qk", "vo"], ...] = ("ffn", "qk", "vo")
    # mode error: give each attention's qk and vo units one shared rank (an allocation constraint).
    # Not needed for speed: untied widths are padded to one at run time (slimdiff.families.attention).
    tie_qk_vo: bool = False

    @model_validator(mode="after")
    def _tau_for_mode(self) -> AllocationParams:
        if self.mode == "influence" and self.tau <= 0:
            raise ValueError(f"tau: mode 'influence' needs tau > 0 (softmax temperature), got {self.tau}")
        return self

    @field_validator("modules")
    @classmethod
    def _non_empty_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct module types from ffn, qk, vo")
        return v

    def solver_options(self) -> dict[str, Any]:
        """The keyword arguments of ``slimdiff.planning.allocation.plan_ranks`` these settings fix."""
        return {
            "tau": self.tau,
            "r_min": self.r_min,
            "multiple": self.multiple,
            "mode": self.mode,
            "tie_qk_vo": self.tie_qk_vo,
        }


class CompressionParams(_Group):
    qk_method: Literal["slimdiff", "weight_svd"] = "slimdiff"
    vo_method: Literal["slimdiff", "weight_svd"] = "slimdiff"
    ffn_method: Literal["slimdiff", "magnitude"] = "slimdiff"
    # One selection J shared by GEGLU's hidden and gate halves (METHOD.md). Separate selections are
    # not offered: pairing hidden row i with gate row j makes new neurons whose correlations the
    # statistics (E[h^T h] of the real neurons) do not contain, so the Nystrom refit is undefined.
    ffn_selection: Literal["shared"] = "shared"
    damping: float = Field(1e-2, ge=0.0, lt=1.0)
    # QK under per-head q/k RMSNorms (SD3.5 MMDiT, FLUX): select = RMSNorm-aware coordinate (under
    # RoPE: whole rotary pair) selection, planned like any QK; keep = left whole; project = left whole
    # in the plan, q/k projected to the attention's VO rank after the norms (cheaper logits, to_q/to_k
    # keep their size; not under RoPE); auto = keep where the QK also carries rotary embeddings
    # (FLUX-class), select elsewhere (SD3-class), as the toy ablations measured. docs/METHOD.md
    qk_norm: Literal["auto", "select", "keep", "project"] = "auto"

    def compress_options(self) -> dict[str, Any]:
        """The keyword arguments of ``slimdiff.surgery.compress.compress_`` these settings fix."""
        return {
            "qk_method": self.qk_method,
            "vo_method": self.vo_method,
            "ffn_method": self.ffn_method,
            "damping": self.damping,
            "ffn_selection": self.ffn_selection,
            "qk_norm": self.qk_norm,
        }


class QualityGate(_Group):
    # largest allowed drop vs the original model (points of exact-match accuracy, 0..100)
    max_exact_match_drop: float = Field(3.0, ge=0.0, le=100.0)
    max_fid_increase: float | None = Field(None, ge=0.0)


class EvaluationParams(_Group):
    # "toy-heldout" = the toy world's held-out captions; otherwise a prompt file path
    prompts: str = "toy-heldout"
    max_prompts: int | None = Field(None, ge=1)
    images_per_prompt: int = Field(1, ge=1)
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(4.0, ge=0.0)
    seed: int = 1234
    batch_size: int = Field(32, ge=1)
    latency_repeats: int = Field(5, ge=1)
    gate: QualityGate = QualityGate()
    # Real-model path only (the toy path uses the toy world's own CLIP and classifier). Weights must
    # be local: a missing file is an error naming it, never a silent substitute.
    clip_model: str | None = "ViT-L-14"  # open_clip model for CLIP score (None = off)
    clip_pretrained: str | None = "openai"  # open_clip tag in the local cache, or a checkpoint path
    clip_score_kind: Literal["100*max(cos,0)", "cos"] = "100*max(cos,0)"
    fid_feature: Literal["clip", "inception"] = "clip"
    inception_weights: str | None = None  # local path of the pt_inception weights (fid_feature=inception)
    reference_images: str | None = None  # folder of real images for FID against real data


class TrackingParams(_Group):
    # None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    tracking_uri: str | None = None
    experiment: str = "slimdiff"
    # None = derived from the source model ("slimdiff-toy", "slimdiff-<repo-name>")
    registered_model: str | None = None
    # the alias production reads; which runs may move it is alias_policy
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    # committed: scheduled runs and runs of the committed params file (no --set) move `alias`;
    # scheduled: only scheduled release checks; any: every run that passes the gate; never: manual only.
    # Any other run that passes the gate moves `candidate_alias` instead (repairs move neither).
    alias_policy: Literal["committed", "scheduled", "any", "never"] = "committed"
    candidate_alias: str | None = Field("candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    # where stage outputs (SlimSet, plans, compressed models, reports) are written: a local folder
    artifact_root: str = "artifacts"
    # where covariance stores are written: any fsspec URL (s3://bucket/stores, ...); None = artifact_root
    store_root: str | None = None

    @model_validator(mode="after")
    def _distinct_aliases(self) -> TrackingParams:
        if self.candidate_alias == self.alias:
            raise ValueError(f"candidate_alias must differ from alias ({self.alias!r}), or be null")
        return self


class IntegrityParams(_Group):
    """How cached stage results are checked before use and how concurrent runs share a workspace."""

    # Small artifacts (SlimSet, influence, rank plan, metrics) are always checked by content digest
    # on every cache hit. The large ones (covariance store, compressed weights): size = the recorded
    # file list and sizes (catches missing and truncated files, not flipped bits); full = every
    # byte against its digest; auto = full below 256 MiB, size above.
    verify_large: Literal["auto", "size", "full"] = "auto"
    # Seconds to wait for another run writing the same stage key before refusing (0 = refuse at
    # once, null = wait as long as it takes).
    lock_timeout_s: float | None = Field(3600.0, ge=0.0)


class SearchParams(_Group):
    """A budget sweep in one run: calibrate and compute influence once, then plan, compress and
    evaluate every budget in the same process (each point a cached stage result of its own) and
    register the point the pick rule chooses among those that pass the quality gate."""

    # budget values in allocation.budget.kind's units (e.g. removed fractions 0.2 .. 0.8); empty =
    # no sweep, one run at allocation.budget.value
    values: tuple[float, ...] = ()
    # among gate-passing points: most parameters removed, fewest FLOPs, or lowest measured latency
    pick: Literal["removed", "flops", "latency"] = "removed"

    @field_validator("values")
    @classmethod
    def _distinct(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(set(v)) != len(v):
            raise ValueError("must not repeat a budget value")
        return tuple(sorted(v))


class Params(_Group):
    version: int = CONFIG_VERSION
    model: ModelParams = ModelParams()
    slimset: SlimSetParams = SlimSetParams()
    calibration: CalibrationParams = CalibrationParams()
    influence: InfluenceParams = InfluenceParams()
    allocation: AllocationParams = AllocationParams()
    compression: CompressionParams = CompressionParams()
    evaluation: EvaluationParams = EvaluationParams()
    tracking: TrackingParams = TrackingParams()
    integrity: IntegrityParams = IntegrityParams()
    search: SearchParams = SearchParams()

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != CONFIG_VERSION:
            raise ValueError(
                f"params version {v} is not supported; this slimdiff reads version {CONFIG_VERSION}"
            )
        return v

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "params") -> Params:
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source}: top level must be a mapping of stage groups, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(_lists_to_tuples(data))
        except ValidationError as err:
            raise ConfigError(_format_errors(err, source)) from None

    def with_overrides(self, overrides: Mapping[str, Any]) -> Params:
        """A copy with dotted-key overrides applied, e.g. {"allocation.tau": 0.5}; validated again."""
        data = self.model_dump(mode="python")
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"override {dotted}: {p!r} is not a params group")
                node = node[p]
            if leaf not in node:
                raise ConfigError(f"override {dotted}: unknown key {leaf!r}")
            node[leaf] = value
        return Params.from_dict(data, source="overrides")

    # -- views ---------------------------------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        """Flattened dotted keys (for MLflow params)."""
        return _flatten(self.model_dump(mode="json"))

    def section(self, dotted: str) -> Any:
        node: Any = self.model_dump(mode="json")
        for part in dotted.split("."):
            node = node[part]
        return node

    def digest(self, keys: tuple[str, ...] | None = None) -> str:
        """sha256 over the selected dotted sections (all params when None), order independent.
        Settings that steer resources but change no result (:data:`RESOURCE_ONLY`) are left out."""
        payload = self.model_dump(mode="json") if keys is None else {k: self.section(k) for k in sorted(keys)}
        return hashlib.sha256(
            json.dumps(_without_resources(payload, keys), sort_keys=True).encode()
        ).hexdigest()

    def identity_section(self, dotted: str) -> Any:
        """``section(dotted)`` without the resource-only settings (what identifies a result)."""
        return _without_resources({dotted: self.section(dotted)}, (dotted,))[dotted]


# Settings that change how a stage uses memory, never what it computes: they stay out of cache keys
# and store identities, so changing them reuses every result.
RESOURCE_ONLY = ("calibration.max_memory",)


def _without_resources(payload: dict, keys: tuple[str, ...] | None) -> dict:
    import copy

    out = copy.deepcopy(payload)
    for dotted in RESOURCE_ONLY:
        for top in [None] if keys is None else [k for k in keys if dotted.startswith(k + ".")]:
            node = out if top is None else out.get(top)
            rest = dotted if top is None else dotted[len(top) + 1 :]
            parts = rest.split(".")
            for part in parts[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(parts[-1], None)
    return out


# Which params each stage reads: the single source of truth for Prefect cache keys and dvc.yaml.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "slimset": ("model.source", "slimset", "evaluation.prompts"),
    "calibrate": ("model.dtype", "calibration"),
    "influence": ("influence", "compression.damping"),
    "plan": ("allocation", "compression.qk_norm"),
    "compress": ("compression",),
    "evaluate": ("evaluation",),
    "register": ("tracking",),
}


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return Params.from_dict(data, source=str(path))


def _lists_to_tuples(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _lists_to_tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_lists_to_tuples(v) for v in obj)
    return obj


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_FRIENDLY = {
    "extra_forbidden": "unknown key (check the spelling; see params.yaml in the repository for the allowed keys)",
    "float_type": "must be a number",
    "int_type": "must be an integer",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "tuple_type": "must be a list",
    "model_type": "must be a mapping of keys",
}


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "<root>"
        msg = _FRIENDLY.get(e["type"], e["msg"])
        if e["type"] == "literal_error":
            msg = e["msg"].replace("Input should be", "must be one of")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        got = e.get("input")
        got_s = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {loc}: {msg}{got_s}")
    return "\n".join(lines)
