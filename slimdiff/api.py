"""One call for the common case: ``slimdiff.slim(pipe, prompts)`` compresses a pipeline's denoiser
(every denoiser, for pipelines of several: Wan 2.2 A14B) in place with the pipeline's defaults and
returns ``(pipe, report)``.

It runs what the staged pipeline runs (``tasks/stages.py``: calibrate -> influence -> plan ->
compress), with the same library calls and the same settings, taken from :class:`slimdiff.Params`
(whose defaults are the committed ``params.yaml``; ``tests/test_foundation.py`` checks that they
are equal), so the one call and the pipeline cannot drift apart:

1. ``collect_stats(pipe, prompts, **params.calibration.sampler_options())``;
2. ``compute_influence(stats, denoiser, weighting=params.influence.weighting)`` and the timestep-
   weighted covariances ``influence.aggregate(stats)``;
3. ``error_profiles(denoiser, covariances, damping=params.compression.damping)``;
4. ``plan_ranks(scores, planned_units(...), budget, **params.allocation.solver_options())``, with
   the FLOP cost model at ``allocation.serving`` for a FLOP budget (``slimdiff.planning.flops``);
5. ``compress_(denoiser, plan, covariances, **params.compression.compress_options())``.

What it does not do: choose the prompts. The pipeline's SlimSet stage selects them from a pool
(``slimdiff.calibration.slimset.build_slimset``); here the caller passes them (keep evaluation prompts out).

Statistics stay in memory unless ``store`` names a folder: then each statistic is written there as
soon as its sampling pass ends and read back one at a time (host memory holds one pass, not all
statistics; at SDXL sizes they are 13-14 GB of float64), and a later call with the same model,
prompts and calibration settings reuses the folder instead of sampling again. The folder is this
module's own format (one safetensors file per statistic and a ``stats.json`` index), not the
pipeline's Zarr covariance store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimdiff import __version__
from slimdiff.calibration.collect import collect_stats, collect_stats_by_denoiser, served_step_counts
from slimdiff.config import ConfigError, Params
from slimdiff.core.digests import file_sha256
from slimdiff.core.stats import LazyActivationStats
from slimdiff.evaluation.evaluate import jsonable
from slimdiff.families.units import compression_units, count_parameters, denoisers, planned_units
from slimdiff.formats.lora import collect_stats_with_loras, lora_digest
from slimdiff.planning.allocation import check_feasible, plan_ranks
from slimdiff.planning.budget import Budget
from slimdiff.planning.flops import serving_shape, unit_flop_costs
from slimdiff.planning.influence import compute_influence
from slimdiff.planning.latency import unit_latency_costs
from slimdiff.planning.plan import RankPlan
from slimdiff.planning.spectra import error_profiles
from slimdiff.surgery.compress import CompressionReport, compress_, single_thread
from slimdiff.surgery.maps import PLAN_ATTRIBUTE

__all__ = ["SlimReport", "budget_of", "cost_model", "slim"]

log = logging.getLogger(__name__)

STATS_INDEX = "stats.json"
STATS_FORMAT = "slimdiff-statistics-folder"
STATS_FORMAT_VERSION = 1


class _FromParams:
    """The default of an option whose ``None`` means something else: take the value of ``params``."""

    def __repr__(self) -> str:
        return "<from params>"


FROM_PARAMS: Any = _FromParams()


@dataclass(frozen=True)
class SlimReport:
    """What :func:`slim` did. ``params`` reproduces it with the staged pipeline (``params.yaml``),
    given the same prompts as the SlimSet."""

    plan: RankPlan
    compression: CompressionReport
    params_before: int  # the whole denoiser
    params_after: int
    params: Params
    store: str | None = None
    reused_statistics: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    #: the pipeline component this report is about ("unet", "transformer", ...)
    denoiser: str = ""
    #: the reports of the pipeline's other denoisers, each compressed with its own statistics and
    #: plan under the same budget (Wan 2.2 A14B: ``transformer_2``); empty for one denoiser
    others: tuple[SlimReport, ...] = ()

    @property
    def denoisers(self) -> dict[str, SlimReport]:
        """Every denoiser's report by component name, this one first."""
        return {self.denoiser: self, **{r.denoiser: r for r in self.others}}

    @property
    def removed_fraction(self) -> float:
        """Share of the whole denoiser's parameters removed (the budget counts only the compressible
        set: attention and FFN linears)."""
        return 1.0 - self.params_after / self.params_before

    def summary(self) -> str:
        if self.others:
            return "; ".join(f"{name}: {r._summary()}" for name, r in self.denoisers.items())
        return self._summary()

    def _summary(self) -> str:
        a, p = self.params.allocation, self.plan
        flops = (
            f"; {p.flops_before:,} -> {p.flops_after:,} FLOPs per denoiser forward at {p.cost_model['serving']}"
            if p.cost_model
            else ""
        )
        return (
            f"{self.params_before:,} -> {self.params_after:,} parameters "
            f"({100 * self.removed_fraction:.1f}% of the denoiser removed; budget {p.budget}, "
            f"mode {a.mode}, {len(p.compressed_units())} of {len(p.units)} units cut{flops}); "
            f"plan {p.digest[:12]}"
        )


def budget_of(params: Params) -> Budget:
    """The budget of ``params.allocation.budget`` (as the plan stage builds it)."""
    b = params.allocation.budget
    if b.kind in ("removed_fraction", "removed_flops_fraction", "removed_latency_fraction", "flops_speedup"):
        return Budget(**{b.kind: b.value})
    return Budget(**{b.kind: int(b.value)})


def slim(
    pipe,
    prompts: Sequence[str],
    *,
    budget: float | Budget | None = None,
    mode: str | None = None,
    tau: float | None = None,
    qk_norm: str | None = None,
    store: str | os.PathLike | None = None,
    max_memory: int | str | None = FROM_PARAMS,
    seed: int | None = None,
    progress: bool = True,
    params: Params | None = None,
    loras: Sequence[Any] = (),
    lora_scale: float = 1.0,
    lora_prompts: Sequence[str] | None = None,
) -> tuple[Any, SlimReport]:
    """Compress ``pipe``'s denoiser (``pipe.unet`` or ``pipe.transformer``) in place, calibrated on
    ``prompts``; returns ``(pipe, report)``. Save it with ``slimdiff.formats.io.save_compressed``.

    Every setting not given is the one of ``params`` (default :class:`slimdiff.Params`, i.e. the
    committed ``params.yaml``: 20 sampling steps at guidance 4.0, spectral timestep weighting,
    error-driven allocation removing 40% of the compressible parameters, ...):

    * ``budget``: a share of the compressible parameters to remove (``0.4``), or a
      :class:`slimdiff.Budget` (``Budget(kept_params=...)``, ``Budget(total_params=...)``, or in
      FLOPs at ``params.allocation.serving``, ``Budget(removed_flops_fraction=...)``, ...);
    * ``mode``: rank allocation, "error" | "influence" | "uniform" (``allocation.mode``); ``tau``
      its pull toward uniform ratios ("influence" needs ``tau > 0``, e.g. 1.0);
    * ``qk_norm``: QK under per-head RMSNorms (SD3.5, FLUX), "auto" (the default: left whole under
      rotary embeddings, selected elsewhere) | "select" | "keep" | "project";
    * ``store``: a folder for the statistics (see the module docstring); None keeps them in memory;
    * ``max_memory``: the statistics memory limit of ``collect_stats`` ("16GiB", "auto", None for
      none; default: ``calibration.max_memory``); it changes no result;
    * ``seed``: the calibration seed (prompt i samples with generator seed ``seed + i``);
    * ``params``: a whole :class:`slimdiff.Params` (e.g. ``slimdiff.load_params("params.yaml")``)
      for anything else: sampling steps, guidance, buckets, weighting, methods, damping, modules;
    * ``loras``: LoRAs (files, folders or state dicts made for this original model) the compressed
      model will run with: the statistics then also cover the prompts sampled with each of them
      fused at ``lora_scale`` (``slimdiff.formats.lora.collect_stats_with_loras``: one more
      calibration run per LoRA, an equal-weight mixture with the base run), so the rank selection
      keeps what they use (docs/lora.md, "LoRA-aware calibration"). The pipeline is left bit for bit
      as it was. Empty (default): today's calibration, same bits. ``lora_prompts`` (default:
      ``prompts``) are what the LoRA runs sample: the prompts the LoRAs will be used with (on the
      toy FLUX, keeping a LoRA's effect at 40% removed needed its own prompts: docs/lora.md).

    A pipeline of several denoisers (``slimdiff.families.units.denoisers``; Wan 2.2 A14B:
    ``transformer`` for the high-noise steps, ``transformer_2`` for the low-noise ones) has every
    denoiser compressed: ONE calibration run with a collector on each (the pipeline calls each only
    at its own steps, so each one's statistics and buckets cover exactly those steps; one run
    instead of one per denoiser, since each run would sample every step anyway), then per denoiser
    its own influence, error profiles, plan and compression, the budget applying to each denoiser
    on its own (``Budget(kept_params=N)``: N for each). ``report`` is the first denoiser's, with
    the others in ``report.others`` (``report.denoisers``: all by component name). With ``store``
    each denoiser's statistics go to ``store/<component>``, reused only when all are there.
    ``loras`` is refused for such pipelines.
    """

    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts, not one string")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    params = _settings(params or Params(), budget, mode, tau, qk_norm, max_memory, seed)
    loras = [loras] if isinstance(loras, str | os.PathLike | dict) else list(loras or ())
    cal, alloc, comp = params.calibration, params.allocation, params.compression
    the_budget = budget_of(params)

    # everything that can fail without a forward pass fails before the first one
    models = denoisers(pipe)  # the family's own denoiser first; Wan 2.2 A14B: transformer_2 too
    several = len(models) > 1
    if several and loras:
        raise ValueError(
            f"LoRA-aware calibration of a pipeline with several denoisers ({', '.join(models)}) is not "
            "supported: calibrate without loras"
        )
    setups = {}
    for name, denoiser in models.items():
        if getattr(denoiser, PLAN_ATTRIBUTE, None) is not None:
            what = f"this pipeline's {name}" if several else "this pipeline's denoiser"
            raise ValueError(f"{what} is already compressed: pass the original model")
        all_units = compression_units(denoiser)
        units = planned_units(all_units, alloc.modules, comp.qk_norm)
        params_before = count_parameters(denoiser)
        costs = cost_model(pipe, denoiser, params, all_units)
        check_feasible(
            units,
            the_budget,
            alloc.r_min,
            alloc.multiple,
            params_before,
            costs=costs,
            tie_qk_vo=alloc.tie_qk_vo,
        )
        setups[name] = (denoiser, units, params_before, costs)
    if several:
        counts = served_step_counts(pipe, cal.num_inference_steps) or {}
        for name, count in counts.items():
            if count < cal.n_buckets:
                raise ValueError(
                    f"{type(pipe).__name__} calls its {name} at {count} of the sampler's "
                    f"{cal.num_inference_steps} steps, fewer than calibration.n_buckets={cal.n_buckets} (each "
                    "denoiser's buckets split its own steps): raise num_inference_steps or lower n_buckets"
                )

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    lora_prompts = None if lora_prompts is None else list(lora_prompts)
    folders = None
    if store is not None:
        weights = {n: _weights_digest(m) for n, m in models.items()} if several else None
        folders = {
            name: _StatsFolder(
                Path(store) / name if several else Path(store),
                _identity(params, prompts, denoiser, loras, lora_scale, lora_prompts, name, weights),
            )
            for name, (denoiser, *_) in setups.items()
        }
    found = {n: f.read() for n, f in folders.items()} if folders is not None else {}
    reused = bool(found) and all(v is not None for v in found.values())
    if reused:
        stats = found
    else:
        options = cal.sampler_options()
        if several:  # one sampling run, a collector on each denoiser (each records its own steps)
            sinks = {n: f.writer() for n, f in folders.items()} if folders is not None else None
            collected = collect_stats_by_denoiser(pipe, prompts, **options, progress=progress, sinks=sinks)
            stats = (
                {n: folders[n].finish(sinks[n], collected[n]) for n in collected}
                if folders is not None
                else collected
            )
        else:
            name = next(iter(models))
            if loras:  # one more calibration run per LoRA, fused (formats.lora), summed with the base run
                options = {"loras": loras, "lora_scale": lora_scale, "lora_prompts": lora_prompts, **options}
                collect = collect_stats_with_loras
            else:
                collect = collect_stats
            if folders is None:
                stats = {name: collect(pipe, prompts, **options, progress=progress)}
            else:
                sink = folders[name].writer()
                collected = collect(pipe, prompts, **options, progress=progress, sink=sink)
                stats = {name: folders[name].finish(sink, collected)}
    seconds["calibration"] = time.perf_counter() - t0

    reports = []
    for name, (denoiser, units, params_before, costs) in setups.items():
        spent = dict(seconds)  # calibration: the one shared sampling run
        t0 = time.perf_counter()
        influence = compute_influence(stats[name], denoiser, weighting=params.influence.weighting)
        covariances = influence.aggregate(stats[name])
        sequence = stats[name].meta.get("rope_sequence")  # the rotary phases pair selection weighs
        profiles = (
            error_profiles(denoiser, covariances, damping=comp.damping, rope_sequence=sequence)
            if alloc.mode == "error"
            else None
        )
        spent["influence"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        plan = plan_ranks(
            influence.score_of(),
            units,
            the_budget,
            model_params=params_before,
            profiles=profiles,
            costs=costs,
            **alloc.solver_options(),
        )
        spent["plan"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with single_thread():  # as the compress stage: many small factorisations, threads add overhead
            report = compress_(denoiser, plan, covariances, rope_sequence=sequence, **comp.compress_options())
        spent["compress"] = time.perf_counter() - t0
        reports.append(
            SlimReport(
                plan=plan,
                compression=report,
                params_before=params_before,
                params_after=count_parameters(denoiser),
                params=params,
                store=None if store is None else str(folders[name].path if several else store),
                reused_statistics=reused,
                seconds=spent,
                denoiser=name,
            )
        )
        del influence, covariances, profiles
    result = dataclasses.replace(reports[0], others=tuple(reports[1:]))
    log.info("slim: %s", result.summary())
    return pipe, result


def _settings(
    params: Params,
    budget: float | Budget | None,
    mode: str | None,
    tau: float | None,
    qk_norm: str | None,
    max_memory: int | str | None,
    seed: int | None,
) -> Params:
    """``params`` with the given options applied, validated as params.yaml is."""
    overrides: dict[str, Any] = {}
    if budget is not None:
        if isinstance(budget, Budget):
            kind, value = next((k, v) for k, v in vars(budget).items() if v is not None)
        elif isinstance(budget, int | float) and not isinstance(budget, bool):
            kind, value = "removed_fraction", budget
        else:
            raise TypeError(f"budget must be a removed fraction (float) or a slimdiff.Budget, got {budget!r}")
        overrides["allocation.budget.kind"] = kind
        overrides["allocation.budget.value"] = float(value)
    for key, value in (
        ("allocation.mode", mode),
        ("allocation.tau", None if tau is None else float(tau)),
        ("compression.qk_norm", qk_norm),
        ("calibration.seed", seed),
    ):
        if value is not None:
            overrides[key] = value
    if max_memory is not FROM_PARAMS:
        overrides["calibration.max_memory"] = max_memory
    try:
        return params.with_overrides(overrides) if overrides else params
    except ConfigError as err:
        raise ConfigError(str(err).replace("overrides:", "slim():")) from None


def cost_model(pipe, denoiser, params: Params, units):
    """The cost model ``allocation.budget`` is spent in, as the plan stage and ``slim`` make it:
    None for parameter budgets; for a FLOP budget one meta-device trace of the uncompressed
    denoiser at ``allocation.serving`` (``slimdiff.planning.flops``); for a latency budget the per-unit
    latency table at that shape on ``model.device`` (``slimdiff.planning.latency``: measured once per
    device and shape, then read from its cache). ValueError names ``allocation.serving`` when the
    model cannot run at that shape."""

    budget = params.allocation.budget
    if not (budget.in_flops or budget.in_latency):
        return None
    s = params.allocation.serving
    try:
        shape = serving_shape(
            pipe,
            height=s.height,
            width=s.width,
            batch=s.batch,
            text_len=s.text_len,
            device=params.model.device,
        )
        if budget.in_flops:
            return unit_flop_costs(denoiser, shape, params.compression.qk_norm, units)

        return unit_latency_costs(
            denoiser,
            shape,
            units=units,
            r_min=params.allocation.r_min,
            multiple=params.allocation.multiple,
            qk_norm=params.compression.qk_norm,
        )
    except (ValueError, RuntimeError) as err:  # a shape this model cannot run at
        what = "count FLOPs" if budget.in_flops else "measure latency"
        raise ValueError(f"allocation.serving: cannot {what} at {s.model_dump()}: {err}") from err


# -- the statistics folder ---------------------------------------------------------------------
def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor of ``model``'s state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _identity(
    params: Params,
    prompts: list[str],
    denoiser: torch.nn.Module,
    loras: Sequence[Any] = (),
    lora_scale: float = 1.0,
    lora_prompts: list[str] | None = None,
    name: str | None = None,
    pipeline_weights: dict[str, str] | None = None,
) -> dict:
    """What makes stored statistics reusable: the same weights, prompts, calibration settings (not
    the memory limit, which changes no number), LoRAs calibrated with (their sha256 and scale; the
    key is absent without LoRAs, so older folders stay valid) and library version. In a pipeline
    of several denoisers (``pipeline_weights``: every denoiser's weights digest) each denoiser's
    folder also records its component name and the weights of all of them: the latents a
    low-noise denoiser sees come from the high-noise one."""

    extra: dict[str, Any] = {}
    if pipeline_weights is not None:
        extra["denoiser"] = name
        extra["pipeline_weights_sha256"] = dict(pipeline_weights)
    if loras:
        extra["loras"] = {"sha256": [lora_digest(lora) for lora in loras], "scale": float(lora_scale)}
        if lora_prompts is not None:
            extra["loras"]["prompts_sha256"] = _sha256_json(lora_prompts)
    return {
        **extra,
        "denoiser_class": type(denoiser).__name__,
        "weights_sha256": (pipeline_weights or {}).get(name) or _weights_digest(denoiser),
        "prompts_sha256": _sha256_json(prompts),
        "n_prompts": len(prompts),
        "calibration": params.identity_section("calibration"),
        "slimdiff_version": __version__,
    }


class _StatsWriter:
    """``collect_stats(sink=...)``: writes each statistic to its own file as its pass ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, str] = {}
        self.tokens: dict[str, list[int]] = {}
        self.digests: dict[str, str] = {}

    def __call__(self, key: str, moments: torch.Tensor, tokens: torch.Tensor) -> None:
        from safetensors.torch import save_file

        name = f"moments/{len(self.files):05d}.safetensors"
        path = self.folder / name
        save_file({"moments": moments.detach().cpu().contiguous()}, str(path))
        self.files[key], self.tokens[key] = name, [int(t) for t in tokens.tolist()]
        self.digests[key] = file_sha256(path)


class _StatsFolder:
    """A folder of statistics: ``moments/<i>.safetensors`` (float64 (n_buckets, *matrix) sums, one
    file per statistic) and ``stats.json`` (identity, token counts, file digests, sampler metadata),
    written last. An existing folder is reused only when its identity matches; a folder of other
    inputs is refused, never overwritten."""

    def __init__(self, path: Path, identity: dict) -> None:
        self.path = Path(path)
        self.identity = identity
        self.identity_digest = _sha256_json(identity)

    def _index(self) -> dict | None:
        index = self.path / STATS_INDEX
        if index.is_file():
            return json.loads(index.read_text())
        foreign = self.path.exists() and any(self.path.iterdir())
        if foreign and not (self.path / ".collecting").is_file():
            raise ValueError(
                f"{self.path}: not empty and not a slimdiff statistics folder; choose another store path"
            )
        return None

    def _check_identity(self, found: dict) -> None:
        if found.get("identity_digest") == self.identity_digest:
            return
        old = found.get("identity") or {}
        differs = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
        raise ValueError(
            f"{self.path} holds statistics of other inputs (differing: {', '.join(differs) or 'format'}); "
            "pass another store path, or remove this folder to collect again"
        )

    def read(self):
        """The stored statistics (verified) if this folder holds them, else None."""
        index = self._index()
        if index is None:
            if (self.path / ".collecting").is_file():
                self._check_identity(json.loads((self.path / ".collecting").read_text()))
            return None
        if index.get("format") != STATS_FORMAT or index.get("format_version") != STATS_FORMAT_VERSION:
            raise ValueError(f"{self.path / STATS_INDEX}: not a statistics folder of this slimdiff version")
        self._check_identity(index)
        for key, name in index["files"].items():
            path = self.path / name
            if not path.is_file() or file_sha256(path) != index["sha256"][key]:
                raise ValueError(
                    f"{path} (statistic {key}) is missing or does not match its recorded sha256: "
                    f"remove {self.path} to collect again"
                )
        log.info("reusing the statistics in %s (%d statistics)", self.path, len(index["files"]))
        return self._lazy(index)

    def _lazy(self, index: dict):
        from safetensors import safe_open

        files = {k: self.path / v for k, v in index["files"].items()}

        def read_key(key: str) -> torch.Tensor:
            with safe_open(str(files[key]), framework="pt") as f:
                return f.get_tensor("moments")

        def read_bucket(key: str, b: int) -> torch.Tensor:
            with safe_open(str(files[key]), framework="pt") as f:
                return f.get_slice("moments")[b]

        return LazyActivationStats(
            index["n_buckets"],
            {k: torch.tensor(v, dtype=torch.int64) for k, v in index["tokens"].items()},
            read_key,
            read_bucket,
            meta=index["meta"],
        )

    def writer(self) -> _StatsWriter:
        import shutil

        (self.path / "moments").mkdir(parents=True, exist_ok=True)
        marker = {"identity": self.identity, "identity_digest": self.identity_digest}
        (self.path / ".collecting").write_text(json.dumps(marker))
        (self.path / STATS_INDEX).unlink(missing_ok=True)  # (several denoisers: one folder may be complete)
        for old in (self.path / "moments").iterdir():  # an interrupted collection of the same inputs
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        return _StatsWriter(self.path)

    def finish(self, writer: _StatsWriter, collected) -> Any:

        index = {
            "format": STATS_FORMAT,
            "format_version": STATS_FORMAT_VERSION,
            "identity": self.identity,
            "identity_digest": self.identity_digest,
            "n_buckets": collected.n_buckets,
            "meta": jsonable(collected.meta),
            "files": writer.files,
            "sha256": writer.digests,
            "tokens": writer.tokens,
        }
        tmp = self.path / f".{STATS_INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, self.path / STATS_INDEX)  # the index appears last: a kill leaves no half folder
        (self.path / ".collecting").unlink(missing_ok=True)
        return self._lazy(index)
