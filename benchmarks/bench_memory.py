"""Statistics within a memory limit (issue 23): peak memory of every stage at real shapes, and the
memory model against it.

``--model sd15`` / ``--model sdxl``: a random-weight pipeline at the published shapes (UNet,
VAE and CLIP text encoders from their configs; speed and memory do not depend on weight values;
word-level tokenizers, since nothing can be downloaded) saved as a diffusers folder, then the
stage commands ``slimdiff slimset -> calibrate -> influence -> plan -> compress`` with the
committed params.yaml (5 timestep buckets, ``calibration.max_memory: auto``) except 4 prompts and
5 sampler steps (SD v1.5 at 512 px, SDXL at 256 px: the statistics' sizes do not depend on the
resolution), then ``DiffusionPipeline.from_pretrained`` of the compressed folder. Each command
runs in its own process; its peak RSS comes from the kernel (``wait4``'s ru_maxrss) and a
watchdog kills it above ``--rss-cap`` so one stage fails alone instead of the machine.

``--table``: the memory model of SD v1.5, SDXL-base, SD3.5-medium and FLUX.1-dev (the adapters' own
statistics sites on meta-device models): statistics per bucket and at 5 buckets, sampling passes
and store size at a 500-prompt SlimSet, and what each needs on 24 / 48 / 80 GB GPUs.

``--slice flux`` / ``--slice sd35``: calibration peak memory of full-width slices (FLUX.1-dev: 1+1
and 2+2 double+single blocks; SD3.5-medium: 2 and 4 joint blocks), measured, and their linear
extrapolation to the whole model (FLUX.1-dev's 12 B parameters do not fit here; SD3.5-medium's
stage commands would take hours on 2 cores).

    python benchmarks/bench_memory.py --model sd15 --write
    python benchmarks/bench_memory.py --model sdxl --write
    python benchmarks/bench_memory.py --table --write
    python benchmarks/bench_memory.py --slice flux --write
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

GiB = 2**30
TARGETS = {"sd15": 16 * GiB, "sdxl": 22 * GiB}
RESOLUTION = {"sd15": 512, "sdxl": 256}

CLIP_L = dict(
    bos_token_id=2,  # the word-level tokenizer's ids: pooled output at its end-of-text token
    eos_token_id=3,
    pad_token_id=0,
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
CLIP_BIGG = dict(
    bos_token_id=2,  # the word-level tokenizer's ids: pooled output at its end-of-text token
    eos_token_id=3,
    pad_token_id=0,
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)


# -- random-weight pipelines at the published shapes -------------------------------------------
def build_pipeline(kind: str, folder: Path) -> None:
    import family_pipelines
    from denoisers import SD15_UNET_CONFIG, SDXL_UNET_CONFIG
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from family_pipelines import word_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tasks.stages import read_prompt_source

    # a word-level vocabulary over the calibration pool's words, so that prompts tokenize apart
    pool_words = sorted({w for p in read_prompt_source("toy") for w in p.lower().replace(",", " ").split()})
    family_pipelines.WORDS = list(dict.fromkeys([*family_pipelines.WORDS, *pool_words]))
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    tok = lambda name: word_tokenizer(  # noqa: E731
        tmp / name,
        77,
        ["<pad>", "<unk>", "<bos>", "<eos>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
    )
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if kind == "sd15":
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE, sample_size=512, scaling_factor=0.18215),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            tokenizer=tok("tok"),
            unet=UNet2DConditionModel(**SD15_UNET_CONFIG),
            scheduler=PNDMScheduler(**sched, skip_prk_steps=True),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
            tokenizer=tok("tok"),
            tokenizer_2=tok("tok2"),
            unet=UNet2DConditionModel(**SDXL_UNET_CONFIG),
            scheduler=EulerDiscreteScheduler(**sched),
        )
    pipe.save_pretrained(folder)
    shutil.rmtree(tmp, ignore_errors=True)


# -- one command, its peak RSS, a watchdog --------------------------------------------------
def _status(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], cap: int, env: dict, log: Path) -> dict:
    """Run ``cmd``; returns seconds, peak RSS (ru_maxrss of this child) and whether the watchdog
    killed it (RSS above ``cap``)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    killed = {"by_watchdog": False}
    # The peak is the kernel's high-water mark of the child's own address space (VmHWM, reset at
    # exec), polled until it exits. Not ru_maxrss: a forked child starts with the parent's resident
    # pages counted, which puts a floor of the parent's size under every stage.
    peak = {"hwm": 0}

    def watch():
        while proc.poll() is None:
            peak["hwm"] = max(peak["hwm"], _status(proc.pid, "VmHWM"))
            if _status(proc.pid, "VmRSS") > cap:
                killed["by_watchdog"] = True
                proc.kill()
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "cmd": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_bytes": peak["hwm"],
        "ru_maxrss_bytes": usage.ru_maxrss * 1024,  # includes the parent's pages at fork: an upper bound
        "exit_code": proc.returncode,
        "killed_by_watchdog": killed["by_watchdog"],
    }


LOAD_SCRIPT = """
import sys
import slimdiff  # registers the Slim denoiser classes the folder's model_index.json names
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
unet = pipe.unet
print(type(unet).__name__, sum(p.numel() for p in unet.parameters()))
"""


def bench_stages(kind: str, work: Path, cap: int, stages: list[str] | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    pipe_dir = work / "pipeline"
    if not (pipe_dir / "model_index.json").exists():
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--build", kind, "--work", str(pipe_dir)], check=True, cwd=ROOT
        )
        print(f"built {kind} pipeline in {time.perf_counter() - t0:.0f} s -> {pipe_dir}", flush=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    res = RESOLUTION[kind]
    params["model"]["source"] = str(pipe_dir)
    params["slimset"].update(
        # random text encoders map different captions to nearly parallel embeddings: keep all but exact duplicates
        {
            "n": 4,
            "near_dup_threshold": 0.999999,
            "embedder": {"kind": "pipeline", "model_name": None, "pretrained": None},
        }
    )
    params["calibration"].update({"num_inference_steps": 5, "height": res, "width": res})
    params["tracking"]["artifact_root"] = str(work / "artifacts")
    pfile = work / "params.yaml"
    pfile.write_text(yaml.safe_dump(params, sort_keys=False))
    cli = str(Path(sys.executable).parent / "slimdiff")
    env = {**os.environ}
    d = {k: str(work / k) for k in ("slimset", "stats.zarr", "influence", "plan", "compressed")}
    steps = [
        ("slimset", [cli, "slimset", "-p", str(pfile), "--out", d["slimset"]]),
        (
            "calibrate",
            [cli, "calibrate", "-p", str(pfile), "--slimset", d["slimset"], "--out", d["stats.zarr"]],
        ),
        (
            "influence",
            [cli, "influence", "-p", str(pfile), "--stats", d["stats.zarr"], "--out", d["influence"]],
        ),
        ("plan", [cli, "plan", "-p", str(pfile), "--influence", d["influence"], "--out", d["plan"]]),
        (
            "compress",
            [
                cli,
                "compress",
                "-p",
                str(pfile),
                "--stats",
                d["stats.zarr"],
                "--influence",
                d["influence"],
                "--plan",
                d["plan"],
                "--out",
                d["compressed"],
            ],
        ),
        ("load", [sys.executable, "-c", LOAD_SCRIPT, str(Path(d["compressed"]) / "pipeline")]),
    ]
    rows = {}
    for name, cmd in steps:
        if stages is not None and name not in stages:
            continue
        print(f"[{kind}] {name} ...", flush=True)
        r = run_measured(cmd, cap, env, work / f"{name}.log")
        r["log_tail"] = (work / f"{name}.log").read_text()[-1500:]
        rows[name] = r
        print(
            f"[{kind}] {name}: exit {r['exit_code']}, {r['seconds']} s, peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB",
            flush=True,
        )
        if r["exit_code"] != 0:
            print(r["log_tail"], flush=True)
            break
    store = {}
    try:
        from tasks.store import CovarianceStore

        s = CovarianceStore.open(d["stats.zarr"])
        store = {
            "memory_plan": s.attrs.get("memory_plan"),
            "bytes_on_disk": sum(f.stat().st_size for f in Path(d["stats.zarr"]).rglob("*") if f.is_file()),
            "n_shards": s.n_shards,
        }
    except Exception as err:  # noqa: BLE001 - report what is there
        store = {"error": str(err)}
    return {
        "model": kind,
        "resolution": res,
        "prompts": 4,
        "steps": 5,
        "n_buckets": params["calibration"]["n_buckets"],
        "max_memory": params["calibration"]["max_memory"],
        "target_bytes": TARGETS[kind],
        "rss_cap_bytes": cap,
        "stages": rows,
        "stages_not_run": [n for n, _ in steps if n not in rows],
        "store": store,
        "host_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def render_stages(r: dict) -> str:
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    lines = [
        f"# Peak memory of every stage: {r['model']} shape, random weights, {r['resolution']} px (CPU)",
        "",
        f"Written by `python benchmarks/bench_memory.py --model {r['model']} --write` on {r['date']} "
        f"(torch {r['torch']}, host memory {g(r['host_memory_bytes'])} GiB). Committed params.yaml except "
        f"{r['prompts']} prompts and {r['steps']} sampler steps; {r['n_buckets']} timestep buckets, "
        f"`calibration.max_memory: {r['max_memory']}`. Each command in its own process; peak RSS = the "
        f"kernel's high-water mark of that process's memory (VmHWM, polled every 50 ms). Target: every stage <= {g(r['target_bytes'])} GiB.",
        "",
        "| stage | exit | seconds | peak RSS (GiB) | within target |",
        "|---|---|---|---|---|",
    ]
    for name, s in r["stages"].items():
        ok = "yes" if s["exit_code"] == 0 and s["peak_rss_bytes"] <= r["target_bytes"] else "**no**"
        lines.append(f"| {name} | {s['exit_code']} | {s['seconds']} | {g(s['peak_rss_bytes'])} | {ok} |")
    plan = (r.get("store") or {}).get("memory_plan") or {}
    if plan:
        lines += [
            "",
            f"Statistics plan (from the store): {plan['passes']} sampling pass(es) per shard, accumulators "
            f"{g(plan['device_bytes'])} GiB per pass ({plan['accumulate']}), all statistics "
            f"{g(plan['statistics_bytes'])} GiB (float64, {r['n_buckets']} buckets), largest single statistic "
            f"{plan['largest_statistic']['key']} {g(plan['largest_statistic']['bytes'])} GiB; limit "
            f"{g(plan['max_memory']) if plan['max_memory'] else 'none'} GiB (`calibration.max_memory: auto`, resolved when the stage "
            "planned). Store on disk: "
            f"{g(r['store']['bytes_on_disk'])} GiB (zstd; {r['store']['n_shards']} shard).",
        ]
    if r.get("stages_not_run"):
        lines += ["", f"Not run: {', '.join(r['stages_not_run'])}. {r.get('note', '')}".rstrip()]
    elif r.get("note"):
        lines += ["", r["note"]]
    load = r["stages"].get("load", {})
    if load.get("exit_code") == 0:
        last = [ln for ln in load["log_tail"].replace("\r", "\n").splitlines() if ln.strip()][-1]
        lines += [
            "",
            f"`DiffusionPipeline.from_pretrained` of the compressed folder: `{last.strip()}` (class, parameters).",
        ]
    return "\n".join(lines) + "\n"


# -- the memory model --------------------------------------------------------------------------
def model_sites(kind: str) -> list[tuple[str, tuple[int, ...]]]:
    """Statistics sites of a real-shaped denoiser, from the adapter, on the meta device."""
    from denoisers import SPECS

    from slimdiff.families.units import adapter_for

    spec = SPECS[kind]
    with torch.device("meta"):
        model = spec.build()
    return [(s.key, s.shape) for s in adapter_for(model).stat_sites(model)]


def flux_dev_sites() -> list[tuple[str, tuple[int, ...]]]:
    """FLUX.1-dev's statistics sites from the FLUX adapter on a meta-device model of the published
    config (19 double and 38 single blocks at width 3072: FFNs of 12288, 24 heads of 128)."""
    from denoisers import FLUX_DEV_BLOCKS, FLUX_DEV_SLICE_CONFIG
    from diffusers import FluxTransformer2DModel

    from slimdiff.families.units import adapter_for

    cfg = dict(
        FLUX_DEV_SLICE_CONFIG,
        num_layers=FLUX_DEV_BLOCKS["double"],
        num_single_layers=FLUX_DEV_BLOCKS["single"],
    )
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    return [(s.key, s.shape) for s in adapter_for(model).stat_sites(model)]


# -- full-width slices of models that do not fit (or do not finish) here, measured ----------------
SLICE_LIMIT = 4 * GiB  # statistics limit of the measured slices: several passes each
SLICE_BUCKETS = 2
#: kind -> (slices measured as (double, single) blocks, text tokens, whole model's blocks, name)
SLICES = {
    "flux": (((1, 1), (2, 2)), 512, (19, 38), "FLUX.1-dev"),
    "sd35": (((2, 0), (4, 0)), 333, (24, 0), "SD3.5-medium"),
}


def build_slice(kind: str, double: int, single: int):
    from denoisers import FLUX_DEV_SLICE_CONFIG, SD35_MEDIUM_CONFIG
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if kind == "flux":
        return FluxTransformer2DModel(
            **dict(FLUX_DEV_SLICE_CONFIG, num_layers=double, num_single_layers=single)
        )
    # SD3.5-medium's first blocks (all with the dual image-only attention, the last context_pre_only)
    return SD3Transformer2DModel(
        **dict(SD35_MEDIUM_CONFIG, num_layers=double, dual_attention_layers=tuple(range(double)))
    )


def slice_child(kind: str, double: int, single: int, out: Path) -> None:
    """In its own process (the parent reads its VmHWM): a full-width slice of ``double`` + ``single``
    blocks, random weights, statistics at 512 px (1024 image tokens) and the family's text length,
    batch 1, within SLICE_LIMIT, one forward per bucket and pass."""
    from denoisers import adapter_inputs

    from slimdiff.calibration.collect import ActivationCollector, module_bytes
    from slimdiff.core.memory import plan_stats_memory
    from slimdiff.families.units import adapter_for

    model = build_slice(kind, double, single).eval()
    sites = [(s.key, s.shape) for s in adapter_for(model).stat_sites(model)]
    plan = plan_stats_memory(sites, SLICE_BUCKETS, max_memory=SLICE_LIMIT)
    print(plan.describe(), flush=True)
    x = adapter_inputs(model, 1, 512, 0, SLICES[kind][1])
    t0 = time.perf_counter()
    for group in plan.groups:
        col = ActivationCollector(model, SLICE_BUCKETS, keys=group)
        with col, torch.inference_mode():
            for b in range(SLICE_BUCKETS):
                col.bucket = b
                model(*x.args, **x.kwargs)
        for key in group:
            col.take(key)
        del col
    out.write_text(
        json.dumps(
            {
                "double": double,
                "single": single,
                "weights_bytes": module_bytes(model),
                "passes": plan.passes,
                "device_bytes": plan.device_bytes,
                "statistics_bytes": plan.statistics_bytes,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )


def measure_slices(kind: str, cap: int) -> dict:
    rows = []
    for double, single in SLICES[kind][0]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            cmd = [sys.executable, __file__, "--slice-child", f"{kind},{double},{single}", "--work", str(out)]
            r = run_measured(cmd, cap, {**os.environ}, Path(tmp) / "log")
            if r["exit_code"] != 0:
                raise RuntimeError(
                    f"{kind} slice {double}+{single} failed: {(Path(tmp) / 'log').read_text()[-2000:]}"
                )
            rows.append({**json.loads(out.read_text()), "peak_rss_bytes": r["peak_rss_bytes"]})
        print(f"{kind} slice {double}+{single}: peak {rows[-1]['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    return {
        "kind": kind,
        "limit_bytes": SLICE_LIMIT,
        "n_buckets": SLICE_BUCKETS,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }


def render_slices(r: dict) -> str:
    kind = r["kind"]
    _, text_len, (whole_double, whole_single), name = SLICES[kind]
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    blocks = "double + single" if kind == "flux" else "joint"
    lines = [
        f"# Calibration memory of {name}-width slices (CPU)",
        "",
        f"Written by `python benchmarks/bench_memory.py --slice {kind} --write` on {r['date']}. The "
        f"{name} transformer at full width with few blocks, random weights, 512 px (1024 image tokens, "
        f"{text_len} text tokens, batch 1), statistics limit {g(r['limit_bytes'])} GiB, {r['n_buckets']} "
        "buckets, one forward per bucket and pass. Peak = VmHWM of the process. Predicted = fp32 weights + "
        "the planned accumulators of one pass (activations not counted).",
        "",
        f"| slice ({blocks} blocks) | weights (GiB) | statistics (GiB) | passes | accumulators / pass (GiB) | "
        "predicted (GiB) | measured peak (GiB) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        pred = row["weights_bytes"] + row["device_bytes"]
        label = f"{row['double']} + {row['single']}" if kind == "flux" else f"{row['double']}"
        lines.append(
            f"| {label} | {g(row['weights_bytes'])} | {g(row['statistics_bytes'])} | {row['passes']} | "
            f"{g(row['device_bytes'])} | {g(pred)} | {g(row['peak_rss_bytes'])} | {row['seconds']} |"
        )
    with torch.device("meta"):  # the whole model's weights, counted without allocating them
        whole = build_slice(kind, whole_double, whole_single)
    whole_bytes = sum(p.numel() * 4 for p in whole.parameters())
    overhead = [row["peak_rss_bytes"] - row["weights_bytes"] - row["device_bytes"] for row in r["rows"]]
    lines += [
        "",
        f"Not in the prediction: {', '.join(g(o) for o in overhead)} GiB per slice (activations, "
        "the float32 product of a batch before it is added to the float64 sums, the interpreter and libraries); "
        "it does not grow with the number of blocks.",
        "",
        f"Extrapolation to the whole model (stated as such, linear in the blocks): {whole_double} + {whole_single} "
        f"blocks hold {g(whole_bytes)} GiB of fp32 weights (counted on a meta-device build), so calibrating it on "
        f"one CPU host in fp32 with the same limit would peak at about {g(whole_bytes + r['limit_bytes'] + max(overhead))} "
        "GiB (weights + one pass of accumulators + the overhead above); its statistics and the passes they take "
        "are in `memory_model.md` (from the adapter's own sites, exact).",
    ]
    return "\n".join(lines) + "\n"


WEIGHTS = {"sd15": 0.86e9, "sdxl": 2.57e9, "sd35-medium": 2.47e9, "flux-dev": 11.9e9}  # denoiser parameters
NAMES = {
    "sd15": "SD v1.5",
    "sdxl": "SDXL-base",
    "sd35-medium": "SD3.5-medium",
    "flux-dev": "FLUX.1-dev",
}


def memory_table() -> dict:
    from slimdiff.core.memory import plan_stats_memory

    rows = {}
    for kind in ("sd15", "sdxl", "sd35-medium", "flux-dev"):
        sites = flux_dev_sites() if kind == "flux-dev" else model_sites(kind)
        one = plan_stats_memory(sites, 1, max_memory=None)
        five = plan_stats_memory(sites, 5, max_memory=None)
        row = {
            "per_bucket_bytes": one.statistics_bytes,
            "five_bucket_bytes": five.statistics_bytes,
            "largest_bytes_5": five.largest[1],
            "weights_fp16_bytes": int(WEIGHTS[kind] * 2),
            "gpus": {},
        }
        for gpu in (24, 48, 80):
            # the accumulators get what the fp16 weights and ~25% activation headroom leave
            room = int(gpu * 1e9 * 0.75) - row["weights_fp16_bytes"]
            entry = {"limit_bytes": max(room, 0)}
            try:
                p = plan_stats_memory(sites, 5, max_memory=max(room, 1), device="cuda")
                entry.update(passes=p.passes, device_bytes=p.device_bytes, host_bytes=p.host_bytes)
            except Exception as err:  # noqa: BLE001 - a limit below the largest statistic: say so
                entry["error"] = str(err).split(";")[0]
            row["gpus"][str(gpu)] = entry
        cpu = plan_stats_memory(sites, 5, max_memory=8 * GiB)
        row["cpu_8gib_passes"] = cpu.passes
        rows[kind] = row
    return rows


def render_table(rows: dict, measured: dict) -> str:
    g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    lines = [
        "# The statistics memory model at real shapes",
        "",
        "Written by `python benchmarks/bench_memory.py --table --write`. Statistics: float64 sums, from the "
        "adapters' own sites on meta-device models. A 500-prompt "
        "SlimSet in 16 shards of 32: the store holds one copy of the statistics at rest (per-shard deltas are "
        "merged and deleted) and at most two generations plus one delta while merging; no store size grows with "
        "the shard count. GPU columns: float32 accumulation on the device (half the bytes), limit = 75% of the "
        "card minus the fp16 weights (the rest: activations); the float64 host sums of one pass sit on the host.",
        "",
        "| model | stats / bucket (GiB) | at 5 buckets (GiB) | largest statistic, 5 buckets (GiB) | store at rest / peak (GiB) | "
        "CPU passes at 8 GiB | 24 GB GPU: passes | 48 GB GPU: passes | 80 GB GPU: passes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in rows.items():
        gpus = []
        for gpu in ("24", "48", "80"):
            e = r["gpus"][gpu]
            gpus.append(
                f"{e['passes']} ({g(e['device_bytes'])} GiB dev, {g(e['host_bytes'])} GiB host)"
                if "passes" in e
                else "does not fit"
            )
        lines.append(
            f"| {NAMES[kind]} | {g(r['per_bucket_bytes'])} | {g(r['five_bucket_bytes'])} | {g(r['largest_bytes_5'])} | "
            f"{g(r['five_bucket_bytes'])} / {g(3 * r['five_bucket_bytes'])} | {r['cpu_8gib_passes']} | "
            + " | ".join(gpus)
            + " |"
        )
    lines += [
        "",
        "Each extra pass is one more run of the sampler over the shard's prompts (the forward passes repeat; "
        "each site is still hooked once), so a plan of P passes costs about P x the sampling time plus the hook "
        "cost once. The measured stage peaks at these shapes are in `memory_sd15_cpu.md` and `memory_sdxl_cpu.md`.",
    ]
    if measured:
        lines += [
            "",
            "| model (measured here) | calibrate passes | accumulators per pass (GiB) | calibrate peak RSS (GiB) |",
            "|---|---|---|---|",
        ]
        for kind, r in measured.items():
            plan = (r.get("store") or {}).get("memory_plan") or {}
            cal = r["stages"].get("calibrate", {})
            if plan and cal:
                lines.append(
                    f"| {NAMES[kind]} ({r['resolution']} px) | {plan['passes']} | {g(plan['device_bytes'])} | "
                    f"{g(cal['peak_rss_bytes'])} |"
                )
    return "\n".join(lines) + "\n"


# -- calibration time: bounded against unbounded, on the toy ------------------------------------
def toy_overhead(repeats: int) -> dict:
    """``run_calibrate`` on the toy world with the committed params (64 prompts, 20 steps, 5 buckets,
    2 shards: the merge runs), unbounded vs a limit that one pass fits vs limits that force about 2
    and 4 passes; interleaved rounds after a warm-up, fresh store each run, wall clock."""
    from slimdiff.calibration.collect import plan_for_model
    from slimdiff.config import load_params
    from tasks import stages

    base = load_params(ROOT / "params.yaml")
    work = Path(tempfile.mkdtemp(prefix="bench_memory_toy_"))
    base = base.with_overrides({"tracking.artifact_root": str(work / "artifacts")})
    model = stages.model_manifest(base)
    slimset = stages.run_slimset(base, work / "slimset", model=model)
    from slimdiff.families.units import denoiser_of

    denoiser = denoiser_of(stages._cached_pipe(base, model))
    n_buckets = base.calibration.n_buckets
    total = plan_for_model(denoiser, n_buckets, max_memory=None).statistics_bytes
    largest = plan_for_model(denoiser, n_buckets, max_memory=None).largest[1]
    variants = {
        "unbounded": None,
        "bounded, one pass fits": total,
        "bounded, ~2 passes": max(largest, total // 2 + 1),
        "bounded, ~4 passes": max(largest, total // 4 + 1),
    }
    passes = {k: plan_for_model(denoiser, n_buckets, max_memory=v).passes for k, v in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}

    def once(name: str, limit, i: int) -> float:
        params = base.with_overrides({"calibration.max_memory": limit})
        uri = str(work / f"s-{len(times[name])}-{i}-{abs(hash(name))}.zarr")
        t0 = time.perf_counter()
        stages.run_calibrate(params, model, slimset, uri, progress=False)
        dt = time.perf_counter() - t0
        shutil.rmtree(uri, ignore_errors=True)
        return dt

    once("unbounded", None, -1)  # warm-up (model load, first-call costs)
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(once(name, variants[name], r))
    base_t = times["unbounded"]
    rows = {}
    for name in variants:
        ratios = [t / b for t, b in zip(times[name], base_t, strict=True)]
        rows[name] = {
            "limit_bytes": variants[name],
            "passes": passes[name],
            "seconds": times[name],
            "ratio_median": sorted(ratios)[len(ratios) // 2],
            "ratio_range": [min(ratios), max(ratios)],
        }
    shutil.rmtree(work, ignore_errors=True)
    return {"repeats": repeats, "statistics_bytes": total, "rows": rows, "date": time.strftime("%Y-%m-%d")}


def render_overhead(r: dict) -> str:
    lines = [
        "# Calibration time within a memory limit (toy UNet, CPU)",
        "",
        f"Written by `python benchmarks/bench_memory.py --toy-overhead --write` on {r['date']}. The calibrate "
        "stage (`run_calibrate`) with the committed params: 64 prompts, 20 steps, 5 buckets, 2 shards (so the "
        f"merge runs), statistics {r['statistics_bytes'] / 2**20:.1f} MiB. {r['repeats']} interleaved rounds "
        "after a warm-up, fresh store each run; ratio = seconds / the unbounded run of the same round "
        "(median, [range]).",
        "",
        "| mode | limit | sampling passes per shard | seconds | ratio to unbounded |",
        "|---|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        lim = "none" if row["limit_bytes"] is None else f"{row['limit_bytes'] / 2**20:.2f} MiB"
        secs = ", ".join(f"{t:.1f}" for t in row["seconds"])
        lo, hi = row["ratio_range"]
        lines.append(
            f"| {name} | {lim} | {row['passes']} | {secs} | {row['ratio_median']:.2f}x [{lo:.2f}, {hi:.2f}] |"
        )
    lines += [
        "",
        "Target: <= 1.3x when one pass fits. Each extra pass reruns the sampler over the shard (the hooks "
        "still run once per site), so P passes cost up to about P x on a model whose forward dominates; "
        "on the toy the hooks are a large share of the time, so the extra passes cost less than that.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["sd15", "sdxl"])
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--render", action="store_true", help="rewrite the .md of --model from its results JSON")
    ap.add_argument("--build", choices=["sd15", "sdxl"], help=argparse.SUPPRESS)
    ap.add_argument("--slice-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--slice",
        choices=sorted(SLICES),
        default=None,
        help="calibration memory of full-width slices of a model",
    )
    ap.add_argument(
        "--note", default="", help="a sentence for the results file (e.g. why stages were left out)"
    )
    ap.add_argument(
        "--stages", default=None, help="comma-separated subset, e.g. slimset,calibrate (default: all)"
    )
    ap.add_argument(
        "--toy-overhead", action="store_true", help="calibration time, bounded vs unbounded, toy UNet"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--rss-cap", type=float, default=22.5, help="GiB: the watchdog kills a stage above it")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/memory_*.{md,json}")
    args = ap.parse_args()
    if args.build:  # internal: build the random-weight pipeline in a child process
        build_pipeline(args.build, args.work)
        return
    if args.slice_child:  # internal: one measured slice
        kind, double, single = args.slice_child.split(",")
        slice_child(kind, int(double), int(single), args.work)
        return
    if args.slice and args.render:
        r = json.loads((RESULTS / f"memory_{args.slice}_slice_cpu.json").read_text())
        (RESULTS / f"memory_{args.slice}_slice_cpu.md").write_text(render_slices(r))
        return
    if args.slice:
        r = measure_slices(args.slice, int(args.rss_cap * GiB))
        text = render_slices(r)
        print(text)
        if args.write:
            (RESULTS / f"memory_{args.slice}_slice_cpu.json").write_text(json.dumps(r, indent=2))
            (RESULTS / f"memory_{args.slice}_slice_cpu.md").write_text(text)
    if args.model and args.render:
        r = json.loads((RESULTS / f"memory_{args.model}_cpu.json").read_text())
        if args.note:  # a sentence about the run, recorded with its numbers
            r["note"] = args.note
            (RESULTS / f"memory_{args.model}_cpu.json").write_text(json.dumps(r, indent=2))
        (RESULTS / f"memory_{args.model}_cpu.md").write_text(render_stages(r))
        return
    if args.model:
        work = args.work or Path(tempfile.mkdtemp(prefix=f"bench_memory_{args.model}_"))
        r = bench_stages(
            args.model, work, int(args.rss_cap * GiB), args.stages.split(",") if args.stages else None
        )
        r["note"] = args.note
        out_json = RESULTS / f"memory_{args.model}_cpu.json"
        if args.stages and args.write and out_json.exists():  # a rerun of some stages: keep the others
            old = json.loads(out_json.read_text())
            old["stages"].update(r["stages"])
            old["stages_not_run"] = [n for n in old.get("stages_not_run", []) if n not in r["stages"]]
            old["rerun"] = {"stages": list(r["stages"]), "date": r["date"]}
            if r["store"].get("memory_plan"):
                old["store"] = r["store"]
            r = old
        text = render_stages(r)
        print(text)
        if args.write:
            (RESULTS / f"memory_{args.model}_cpu.json").write_text(json.dumps(r, indent=2))
            (RESULTS / f"memory_{args.model}_cpu.md").write_text(text)
    if args.toy_overhead:
        r = toy_overhead(args.repeats)
        text = render_overhead(r)
        print(text)
        if args.write:
            (RESULTS / "memory_toy_overhead.json").write_text(json.dumps(r, indent=2))
            (RESULTS / "memory_toy_overhead.md").write_text(text)
    if args.table:
        measured = {}
        for kind in ("sd15", "sdxl"):
            f = RESULTS / f"memory_{kind}_cpu.json"
            if f.exists():
                measured[kind] = json.loads(f.read_text())
        rows = memory_table()
        text = render_table(rows, measured)
        print(text)
        if args.write:
            (RESULTS / "memory_model.json").write_text(json.dumps(rows, indent=2))
            (RESULTS / "memory_model.md").write_text(text)


if __name__ == "__main__":
    main()
