"""The ``slimdiff`` command line: one subcommand per stage, ``run`` for the whole flow.

Exit codes scripts can trust:
  0  success
  1  unexpected error (a bug: the traceback is printed)
  2  bad params / usage (the key is named)
  3  bad input: missing or unsupported model, infeasible budget, SlimSet overlapping evaluation prompts
  4  an artifact is missing or does not match its recorded digest (integrity; the message says what
     `slimdiff repair` recomputes)
  5  the tracking server cannot be reached (nothing was run or registered)
  6  another run is writing the same stage output and did not finish within integrity.lock_timeout_s
  7  a budget search found no budget that passes the quality gate (nothing registered; best point named)
  130 / 143  stopped by SIGINT / SIGTERM (the temporary server is stopped, the MLflow run KILLED)
Known errors print one line; ``--verbose`` adds the traceback.
The stage subcommands are what ``dvc.yaml`` runs: fixed paths in, fixed paths out, no Prefect server.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from slimdiff.env import apply_env_defaults

app = typer.Typer(
    name="slimdiff",
    help="Training-free SlimDiff compression of diffusion UNets: SlimSet -> statistics -> influence -> "
    "rank plan -> compress -> evaluate -> register.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

EXIT_OK, EXIT_BUG, EXIT_CONFIG, EXIT_INPUT, EXIT_INTEGRITY = 0, 1, 2, 3, 4
EXIT_UNAVAILABLE, EXIT_BUSY, EXIT_GATE = 5, 6, 7
_VERBOSE = {"on": False}  # set by the --verbose callback

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (YAML, grouped by stage)")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a param, e.g. --set allocation.tau=0.5 (repeatable)"),
]


def _err(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)


def _exit_code(err: BaseException) -> int:
    from slimdiff.config import ConfigError
    from slimdiff.families.units import UnsupportedModelError
    from slimdiff.formats.models import ModelLoadError
    from tasks.artifacts import ArtifactError, StageBusyError
    from tasks.stages import NoBudgetPassesError, StageInputError
    from tasks.tracking import TrackingUnavailableError

    if isinstance(err, ConfigError):
        return EXIT_CONFIG
    if isinstance(err, NoBudgetPassesError):
        return EXIT_GATE
    if isinstance(err, ArtifactError):
        return EXIT_INTEGRITY
    if isinstance(err, TrackingUnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(err, StageBusyError):
        return EXIT_BUSY
    if isinstance(
        err, ModelLoadError | StageInputError | UnsupportedModelError | FileNotFoundError | LookupError
    ):
        return EXIT_INPUT
    if type(err).__module__.startswith("mlflow") and "RESOURCE_DOES_NOT_EXIST" in str(
        getattr(err, "error_code", "")
    ):
        return EXIT_INPUT  # a registered model / version / alias that does not exist
    try:
        from slimdiff.planning.budget import InfeasibleBudgetError
        from slimdiff.planning.plan import PlanValidationError

        if isinstance(err, InfeasibleBudgetError | PlanValidationError):
            return EXIT_INPUT
    except ImportError:  # allocation not importable: nothing to classify against
        pass
    return EXIT_BUG


def _repair_hint(err: BaseException, ref: str | None = None) -> str:
    """What `slimdiff repair` would recompute for an integrity error, as the end of its message."""
    what = getattr(err, "repair", None)
    if not what:
        return ""
    return f"; `slimdiff repair{' ' + ref if ref else ''}` recomputes exactly {what}"


def _guard(fn):
    """Run a command body; map known errors to one clear line and an exit code (the traceback
    only for bugs, or with --verbose)."""
    try:
        return fn()
    except typer.Exit:
        raise
    except Exception as err:  # classified below; unknown errors keep their traceback
        code = _exit_code(err)
        if code == EXIT_BUG or _VERBOSE["on"]:
            logging.getLogger("slimdiff").error(
                "%s error", "unexpected" if code == EXIT_BUG else "known", exc_info=err
            )
        msg = str(err).splitlines()[0] if code != EXIT_CONFIG else str(err)
        _err(msg + (_repair_hint(err) if code == EXIT_INTEGRITY else ""))
        raise typer.Exit(code) from None


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def load_cli_params(params_path: Path, overrides: list[str] | None):
    from slimdiff.config import ConfigError, load_params

    params = load_params(params_path)
    if overrides:
        parsed = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. allocation.tau=0.5")
            parsed[key.strip()] = _parse_value(value)
        params = params.with_overrides(parsed)
    return params


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    apply_env_defaults()
    _VERBOSE["on"] = verbose
    # MLflow's own INFO lines (database creation, ...) only with --verbose; read when mlflow is imported
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if verbose else "WARNING")
    # our own progress at INFO; third-party libraries (open_clip logs on the root logger) at WARNING
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for ours in ("slimdiff", "tasks", "flows"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)


# -- whole flow --------------------------------------------------------------------------------
DaskOpt = Annotated[
    str | None,
    typer.Option(
        help="run calibration shards on Dask: a scheduler address, or 'local:N' for N local workers"
    ),
]


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the flow result as JSON")] = False,
    dask: DaskOpt = None,
) -> None:
    """Run the whole pipeline as a Prefect flow (cached stages are skipped, after verification) and
    record it in MLflow. Runs of the committed params file (no --set) may move the alias."""

    def body():
        cfg = load_cli_params(params, set_)
        _show_result(_run_flow(cfg, run_trigger(params, set_), dask), as_json)

    _guard(body)


@app.command()
def repair(
    ref: Annotated[
        str | None,
        typer.Argument(help="a registered version (NAME/VERSION, NAME@ALIAS): repair what it was built from"),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the flow result as JSON")] = False,
) -> None:
    """Check every artifact of a run byte for byte and recompute exactly what fails (for the
    covariance store: only its damaged shards). Without REF: the artifacts of the params file
    (and --set); with REF: those of the run that registered that version (its exact params).
    Moves no alias; an existing registered version keeps its number."""

    def body():
        cfg = load_cli_params(params, set_)
        if ref is not None:
            cfg = _registered_params(ref, cfg)
        result = _run_flow(cfg.with_overrides({"integrity.verify_large": "full"}), "repair", None)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        repaired = result.get("repaired") or {}
        for stage, problem in repaired.items():
            typer.echo(f"repaired {stage}: {problem}")
        if not repaired:
            typer.echo("nothing to repair: every artifact matches its recorded digest")
        _print_flow_result(result)

    _guard(body)


def _registered_params(ref: str, cfg):
    """The exact params of the run that registered ``ref`` (its logged params.json)."""
    import mlflow
    from mlflow import MlflowClient

    from slimdiff.config import Params
    from tasks.tracking import resolve_version, setup_tracking

    setup_tracking(cfg)
    client = MlflowClient()
    version = resolve_version(client, ref)
    # Only "the run logged no params.json" (an older run) means "repair with -p/--set". That is
    # decided by listing the run's artifacts, not by catching a failed download: MLflow reports
    # every failed runs:/ download, an unreachable artifact store included, as "path not found".
    # Listing and downloading go to the run's artifact store directly, so a store that is down
    # or refuses access fails here with its own error.
    run = client.get_run(version.run_id)
    if "params.json" not in {f.path for f in client.list_artifacts(version.run_id)}:
        raise LookupError(
            f"{ref}: its run {version.run_id} has no params.json (older run); repair with -p/--set instead"
        )
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{run.info.artifact_uri.rstrip('/')}/params.json"
    )
    return Params.from_dict(json.loads(Path(local).read_text()), source=f"{ref} params.json")


def run_trigger(params_path: Path, overrides: list[str] | None) -> str:
    """ "committed" when the run uses the params file exactly as committed in git (no --set, same
    params as HEAD's version of the file), else "experiment" (tracking.alias_policy)."""
    import subprocess

    import yaml

    from slimdiff.config import ConfigError, Params, load_params

    if overrides:
        return "experiment"
    path = Path(params_path).resolve()
    out = subprocess.run(
        ["git", "-C", str(path.parent), "show", f"HEAD:./{path.name}"], capture_output=True, text=True
    )
    if out.returncode != 0:
        return "experiment"  # not in a git checkout, or not committed
    try:
        committed = Params.from_dict(yaml.safe_load(out.stdout) or {}, source="committed params")
    except (ConfigError, yaml.YAMLError):
        return "experiment"
    return "committed" if committed.digest() == load_params(path).digest() else "experiment"


def _run_flow(cfg, trigger: str, dask: str | None) -> dict:
    """The flow in a supervised process: orphans of killed runs stopped, the params that need no
    model checked, Prefect's temporary server owned (stopped on exit, on errors, SIGINT, SIGTERM)."""
    from prefect.exceptions import TerminationSignal

    from flows.runtime import Terminated, supervised
    from tasks.preflight import check_params
    from tasks.tracking import end_orphaned_runs, setup_tracking

    try:
        with supervised(cfg.tracking.artifact_root) as supervisor:  # stops orphans of killed runs first
            setup_tracking(cfg)
            end_orphaned_runs(cfg)  # MLflow runs a killed process left RUNNING: KILLED
            check_params(cfg)  # one clear line before anything starts: no server, no stage
            server_ready = supervisor.start_prefect_server()
            from flows.pipeline import slimdiff_flow, with_dask

            server_ready()
            _quiet_expected_tracebacks()
            flow_fn = slimdiff_flow
            if dask:
                local = dask.startswith("local")
                n = int(dask.partition(":")[2] or 2) if local else 0
                flow_fn = with_dask(None if local else dask, n_workers=n or 2)
            return flow_fn(params=cfg.model_dump(mode="json"), trigger=trigger)
    except (Terminated, TerminationSignal, KeyboardInterrupt) as stop:
        signum = getattr(
            stop, "signum", getattr(stop, "signal", 2 if isinstance(stop, KeyboardInterrupt) else 15)
        )
        _err(f"stopped by signal {signum}: Prefect's temporary server stopped, the MLflow run marked KILLED")
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(128 + int(signum))  # do not wait for a worker thread still finishing its task


class _OneLineKnownErrors(logging.Formatter):
    """Wraps Prefect's console formatter: a failed task or flow whose error this CLI reports in
    one line (bad input, integrity, busy, unreachable tracking) is logged without its traceback,
    unless --verbose. The record itself is left intact for every other handler."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if _VERBOSE["on"] or not isinstance(exc, Exception) or _exit_code(exc) == EXIT_BUG:
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def _quiet_expected_tracebacks() -> None:
    """Prefect logs every failed task and flow with its traceback; keep one line for known errors."""
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not isinstance(
            handler.formatter, _OneLineKnownErrors
        ):
            handler.setFormatter(_OneLineKnownErrors(handler.formatter or logging.Formatter()))


def _show_result(result: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_flow_result(result)


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


SUMMARY_KEYS = (
    "gate_passed",
    "compressible_removed_fraction",
    "unet_params_ratio",
    "flops_ratio",
    "speedup",
    "exact_match_drop",
    "fid_increase",
    "clip_score_delta",
)


def _print_flow_result(result: dict) -> None:
    typer.echo("\nstage      status  seconds")
    for stage, status in result["status"].items():
        typer.echo(f"{stage:<10} {status:<7} {result['seconds'].get(stage, 0):7.1f}")
    summary = result.get("summary", {})
    if summary:
        typer.echo(
            "\n" + "  ".join(f"{k}={_short(summary[k])}" for k in SUMMARY_KEYS if summary.get(k) is not None)
        )
        fidelity = summary.get("fidelity") or {}
        if fidelity:
            typer.echo(
                "same seeds vs original: " + "  ".join(f"{k}={_short(v)}" for k, v in fidelity.items())
            )
        for reason in summary.get("gate_reasons", []):
            typer.echo(f"  gate: {reason}")
    for stage, problem in (result.get("repaired") or {}).items():
        typer.echo(f"  repaired {stage}: {problem}")
    reg = result.get("registered", {})
    if reg:
        gate = (result.get("summary") or {}).get("gate_passed")
        why = "quality gate failed" if gate is False else "alias policy (tracking.alias_policy)"
        alias = f" (alias {reg['alias']})" if reg.get("alias") else f" (no alias: {why})"
        typer.echo(f"registered: {reg['name']} version {reg['version']}{alias}")
    if result.get("report"):
        typer.echo(f"report: {result['report']}")
    typer.echo(f"mlflow run: {result.get('mlflow_run_id')}")


# -- single stages (what dvc.yaml runs) ----------------------------------------------------------
def _output_lock(cfg, out: Path):
    """One writer at a time for a fixed output folder (dvc repro itself also holds a repo lock)."""
    from tasks.artifacts import lock_path, stage_lock

    return stage_lock(lock_path(out), timeout=cfg.integrity.lock_timeout_s, what=str(out))


def _input_manifest(stage: str, path: Path):
    from tasks.artifacts import ArtifactError, Manifest, read_manifest
    from tasks.store import CovarianceStore

    if stage == "calibrate":
        store = CovarianceStore.open(str(path))
        if not store.complete:
            raise ArtifactError(f"{path}: covariance store is incomplete; rerun `slimdiff calibrate`")
        return Manifest(stage=stage, uri=str(path), digest=store.digest)
    manifest = read_manifest(path)
    if manifest is None:
        raise ArtifactError(f"{path}: no manifest.json; run `slimdiff {stage}` first")
    return Manifest(stage=manifest.stage, uri=str(path), digest=manifest.digest, meta=manifest.meta)


@app.command()
def slimset(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("data/slimset"),
) -> None:
    """Stage 1: select the SlimSet calibration prompts (file, card and projection plot)."""
    from tasks import stages

    def body():
        cfg = load_cli_params(params, set_)
        model = stages.model_manifest(cfg) if cfg.slimset.embedder.kind == "pipeline" else None
        with _output_lock(cfg, out):
            m = stages.run_slimset(cfg, out, model=model)
        typer.echo(f"slimset: {m.meta['n']} prompts -> {out} ({m.short})")

    _guard(body)


@app.command()
def calibrate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    slimset_dir: Annotated[Path, typer.Option("--slimset", help="SlimSet folder")] = Path("data/slimset"),
    out: Annotated[str, typer.Option(help="Zarr store (path or fsspec URL)")] = "artifacts/dvc/stats.zarr",
) -> None:
    """Stage 2: activation statistics over the sampler's timesteps into a resumable Zarr store."""
    from tasks import stages

    def body():
        cfg = load_cli_params(params, set_)
        m = stages.run_calibrate(
            cfg, stages.model_manifest(cfg), _input_manifest("slimset", slimset_dir), out
        )
        typer.echo(
            f"calibrate: {m.meta['n_shards']} shards ({m.meta['resumed_shards']} resumed) -> {out} ({m.short})"
        )

    _guard(body)


@app.command("convert-store")
def convert_store(
    src: Annotated[str, typer.Argument(help="format-1 covariance store (path or fsspec URL)")],
    dst: Annotated[str, typer.Argument(help="where to write the format-2 store")],
) -> None:
    """Rewrite a covariance store of format 1 (one copy per shard) as format 2 (merged totals),
    without forward passes; the sums are the same bits."""
    from tasks.store import convert_v1

    def body():
        store = convert_v1(src, dst)
        typer.echo(f"convert-store: {store.n_shards} shards merged -> {dst} ({store.digest[:12]})")

    _guard(body)


@app.command()
def influence(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    stats: Annotated[Path, typer.Option(help="Zarr covariance store")] = Path("artifacts/dvc/stats.zarr"),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("data/influence"),
) -> None:
    """Stage 3: spectral influence per module and timestep weights (no forward passes)."""
    from tasks import stages

    def body():
        cfg = load_cli_params(params, set_)
        with _output_lock(cfg, out):
            m = stages.run_influence(
                cfg, stages.model_manifest(cfg), _input_manifest("calibrate", stats), out
            )
        typer.echo(f"influence: {cfg.influence.weighting} weighting -> {out} ({m.short})")

    _guard(body)


@app.command()
def plan(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    influence_dir: Annotated[Path, typer.Option("--influence", help="influence folder")] = Path(
        "data/influence"
    ),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("data/plan"),
) -> None:
    """Stage 4: allocate ranks under the global parameter budget (rank plan + bar chart)."""
    from tasks import stages

    def body():
        cfg = load_cli_params(params, set_)
        with _output_lock(cfg, out):
            m = stages.run_plan(
                cfg, stages.model_manifest(cfg), _input_manifest("influence", influence_dir), out
            )
        typer.echo(
            f"plan: {m.meta['params_before']:,} -> {m.meta['params_after']:,} compressible params -> {out}"
        )

    _guard(body)


@app.command()
def compress(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    stats: Annotated[Path, typer.Option(help="Zarr covariance store")] = Path("artifacts/dvc/stats.zarr"),
    influence_dir: Annotated[Path, typer.Option("--influence")] = Path("data/influence"),
    plan_dir: Annotated[Path, typer.Option("--plan")] = Path("data/plan"),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("artifacts/dvc/compressed"),
) -> None:
    """Stage 5: rebuild QK, VO and FFN weights in closed form; save a loadable compressed pipeline."""
    from tasks import stages

    def body():
        cfg = load_cli_params(params, set_)
        with _output_lock(cfg, out):
            m = stages.run_compress(
                cfg,
                stages.model_manifest(cfg),
                _input_manifest("calibrate", stats),
                _input_manifest("influence", influence_dir),
                _input_manifest("plan", plan_dir),
                out,
            )
        typer.echo(
            f"compress: UNet {m.meta['unet_params_before']:,} -> {m.meta['unet_params_after']:,} params -> {out}"
        )

    _guard(body)


@app.command()
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    compressed: Annotated[Path, typer.Option(help="compressed folder")] = Path("artifacts/dvc/compressed"),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("artifacts/dvc/eval"),
    summary: Annotated[
        Path | None,
        typer.Option(
            help="also write the headline metrics (flat JSON) and the first image grid next to it, "
            "for DVC's metrics / plots (dvc exp show)"
        ),
    ] = None,
) -> None:
    """Stage 6: quality, size and speed of the compressed model against the original."""
    from tasks import stages

    def body():
        cfg = load_cli_params(params, set_)
        with _output_lock(cfg, out):
            m = stages.run_evaluate(
                cfg, stages.model_manifest(cfg), _input_manifest("compress", compressed), out
            )
        if summary is not None:
            import shutil

            metrics = json.loads((out / stages.METRICS_FILE).read_text())
            head = stages.headline_metrics(metrics)
            head["gate_passed"] = int(head["gate_passed"])  # DVC compares numbers
            head["gate_reasons"] = "; ".join(head["gate_reasons"])
            summary.parent.mkdir(parents=True, exist_ok=True)
            summary.write_text(json.dumps(head, indent=2, sort_keys=True) + "\n")
            grids = sorted(out.glob("grid_*.png"))
            if grids:
                shutil.copy2(grids[0], summary.with_name("grid.png"))
        typer.echo(json.dumps(m.meta.get("metrics", {}), indent=2))

    _guard(body)


@app.command()
def lineage(
    ref: Annotated[str, typer.Argument(help="registered model: NAME, NAME@ALIAS or NAME/VERSION")],
    params: ParamsOpt = Path("params.yaml"),
    verify: Annotated[bool, typer.Option("--verify", help="recompute every reachable digest")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Audit a registered model: source -> SlimSet -> covariance store -> influence -> rank plan ->
    compressed weights -> evaluation, with digests, MLflow run, DVC path and git commit.
    With --verify, exits 4 naming the first link whose artifact changed or disappeared."""

    def body():
        cfg = load_cli_params(params, None)
        from tasks.lineage import format_lineage, get_lineage, verify_lineage
        from tasks.tracking import setup_tracking

        setup_tracking(cfg)
        chain = get_lineage(ref)
        if verify:
            verify_lineage(chain)
        typer.echo(json.dumps(chain.to_dict(), indent=2) if as_json else format_lineage(chain))
        broken = chain.first_broken
        if broken is not None:
            hint = ""
            if broken.repair:
                ref_v = f"{chain.model}/{chain.version}"
                hint = f"; `slimdiff repair {ref_v}` recomputes exactly {broken.repair}"
            _err(f"lineage broken at {broken.name}: {broken.problem}{hint}")
            raise typer.Exit(EXIT_INTEGRITY)

    _guard(body)


@app.command()
def compare(
    ref_a: Annotated[str, typer.Argument(help="registered model A: NAME@ALIAS or NAME/VERSION")],
    ref_b: Annotated[str, typer.Argument(help="registered model B")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Print the metrics of two registered models side by side (same protocol required)."""

    def body():
        cfg = load_cli_params(params, None)
        from slimdiff.evaluation.report import compare_table
        from tasks.tracking import registered_metrics, setup_tracking

        setup_tracking(cfg)
        typer.echo(compare_table(registered_metrics(ref_a), registered_metrics(ref_b), names=(ref_a, ref_b)))

    _guard(body)


ReleasesArg = Annotated[
    str, typer.Argument(help="a folder of releases (local or fsspec URL), or a hub repo id with --kind hub")
]
KindOpt = Annotated[str, typer.Option("--kind", help="folder | hub")]


@app.command()
def push(
    ref: Annotated[str, typer.Argument(help="registered model: NAME@ALIAS or NAME/VERSION")],
    repo: Annotated[
        str | None, typer.Option("--repo", help="Hub model repo id (owner/name) to upload to")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="create the repo private")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Assemble the publishable folder of a registered model (pipeline, model card README.md with
    the Hub's front matter, grid, metrics, the run's params) and, with --repo, upload it to the Hub.
    Without --repo it prints the folder (nothing leaves the machine)."""

    def body():
        cfg = load_cli_params(params, None)
        from tasks.publish import publish_folder
        from tasks.publish import push as push_folder
        from tasks.tracking import setup_tracking

        setup_tracking(cfg)
        try:
            run_params = _registered_params(ref, cfg)
        except LookupError:
            run_params = None
        folder = publish_folder(ref, cfg, run_params)
        typer.echo(f"publishable folder: {folder}")
        if repo:
            typer.echo(f"uploaded: {push_folder(folder, repo, private=private)}")

    _guard(body)


@app.command("check-releases")
def check_releases_cmd(
    releases: ReleasesArg,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    kind: KindOpt = "folder",
) -> None:
    """Run the pipeline once on every release not yet in the registry (what `serve` runs on schedule)."""

    def body():
        cfg = load_cli_params(params, set_)
        from flows.deployments import check_releases
        from tasks.tracking import setup_tracking

        setup_tracking(cfg)  # an unreachable tracking server stops the check here (exit 5)
        report = check_releases(releases, params=cfg.model_dump(mode="json"), kind=kind)
        typer.echo(json.dumps(report, indent=2))

    _guard(body)


@app.command()
def serve(
    releases: ReleasesArg,
    cron: Annotated[str, typer.Option(help="cron schedule, e.g. '0 3 * * *'")] = "0 3 * * *",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    kind: KindOpt = "folder",
) -> None:
    """Serve a Prefect deployment that checks for new releases on a cron schedule (blocks)."""

    def body():
        cfg = load_cli_params(params, set_)
        from flows.deployments import serve as serve_deployment

        serve_deployment(releases, cron, cfg, kind=kind)

    _guard(body)


@app.command()
def params_check(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate a params file (and overrides) and print the flattened result."""

    def body():
        cfg = load_cli_params(params, set_)
        for k, v in cfg.flat().items():
            typer.echo(f"{k} = {v}")

    _guard(body)


def main() -> None:
    app(prog_name="slimdiff")


if __name__ == "__main__":
    sys.exit(main())
