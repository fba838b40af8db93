"""Quality, size and speed of a compressed pipeline against its original, under a pinned protocol.

``evaluate_pair(original_pipe, compressed_pipe, prompts, cfg, out_dir)`` samples both pipelines on
the same per-image seeds, measures everything below, writes comparison grids and returns a
JSON-able dict ``{"original", "compressed", "summary", "protocol"}``. Every number is recorded with
the protocol that produced it (prompts digest, seeds, resolution, sampler, steps, guidance, resize
method, feature and CLIP models), because FID and CLIP score are only comparable under the same one.

Two quality paths, chosen from the prompts:

* **toy** (every prompt is a toy-world caption, ``slimdiff.toy.data.parse_caption``): attribute
  accuracy (object / color / shape / position / exact, split by one- and two-object prompts) from
  the toy attribute classifier; FID on toy-CLIP image embeddings against real renders of the same
  captions; ``fd_cls``, the Frechet distance on the attribute classifier's penultimate features
  against the same renders (a feature space trained on this world, as FD-DINOv2 is for real images:
  exact match saturates on the toy world and toy-CLIP FID sits below its own noise floor, so this is
  the distribution-level number that can still tell variants apart); CLIP score with the toy CLIP.
  Both FDs come with their real-vs-real noise floor (``protocol.fid_real_vs_real``,
  ``protocol.fd_cls_real_vs_real``: two independent render sets of the evaluated captions, as many
  images as the generated set).
* **real** (anything else): CLIP score with a named open_clip model whose weights are local; FID on
  that CLIP's image embeddings (default) or on Inception-v3 pool features (only with a local
  weights file); FID against a folder of reference images when one is given. Missing weights are
  an error that names the file and how to provide it: nothing is downloaded and no other model is
  substituted.

Always: fidelity to the original on the same seeds (PSNR / SSIM per image, mean; FID between the
two image sets; on the toy path also ``fd_cls_to_original``), UNet and compressible-set parameter counts, analytic FLOPs (``slimdiff.planning.flops``),
the UNet latency ratio measured in the same run (interleaved repeats, median), peak memory of one
UNet forward, and the calibration time when given. The quality gate
(``cfg.gate.max_exact_match_drop`` / ``cfg.gate.max_fid_increase``) gives ``gate_passed`` and the
reasons it failed; ``fd_cls`` is reported only, never gated.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimdiff.evaluation import metrics as M
from slimdiff.evaluation.judges import ClipJudge, InceptionFeatures, RealMetricsOptions, ToyJudges
from slimdiff.evaluation.report import comparison_grid, tile_images
from slimdiff.evaluation.sampling import (
    FLOPS_METHOD,
    compressible_parameter_count,
    compression_units_of,
    image_seeds,
    is_toy_prompt_set,
    pipeline_resolution,
    sample_pipeline,
    unet_flops,
)
from slimdiff.evaluation.timing import (
    LATENCY_MAX_PROMPTS,
    LATENCY_TIMESTEP,
    interleaved_latency,
    parameter_bytes,
    unet_forward_peak_memory,
    unet_inputs_like,
)
from slimdiff.families.base import adapter_for, denoiser_of

logger = logging.getLogger(__name__)

#: per-image PSNR is capped here before averaging (identical images are +inf dB)
PSNR_CAP_DB = 100.0
#: at most this many images (original row + compressed row, same seeds) in the comparison grid
GRID_MAX_IMAGES = 32
GRID_COLUMNS = 8


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------
@dataclass
class Measured:
    """One pipeline's samples and per-pipeline quality numbers (features kept for FID reuse)."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    quality: dict
    fid_features: torch.Tensor | None
    sample_time_s: float
    # toy path: classifier penultimate features (None: recomputed from ``images`` when needed)
    cls_features: torch.Tensor | None = None


@dataclass
class PairEvaluator:
    """The protocol, the judges and the cached reference of one evaluation.

    ``evaluate_pair`` is one ``measure`` of each pipeline plus ``compare``; the ablation measures
    the original once and compares many compressed variants against it."""

    prompts: list[str]
    cfg: Any
    judges: ToyJudges | None = None
    real: RealMetricsOptions | None = None
    path: str = field(init=False)
    image_prompts: list[str] = field(init=False)
    seeds: list[int] = field(init=False)

    def __post_init__(self) -> None:
        prompts = [p for p in self.prompts]
        if self.cfg.max_prompts is not None:
            prompts = prompts[: self.cfg.max_prompts]
        if not prompts:
            raise ValueError("evaluation needs at least one prompt")
        self.prompts = prompts
        per = int(self.cfg.images_per_prompt)
        self.image_prompts = [p for p in prompts for _ in range(per)]  # (N,) prompt of image k
        if len(self.image_prompts) < 2:
            raise ValueError(
                "evaluation needs at least 2 images for FID (raise evaluation.max_prompts or images_per_prompt)"
            )
        self.seeds = image_seeds(int(self.cfg.seed), len(self.image_prompts))
        self.path = "toy" if is_toy_prompt_set(prompts) else "real"
        self._clip: ClipJudge | None = None
        self._inception: InceptionFeatures | None = None
        self._reference: M.FeatureMoments | None = None
        self._reference_desc: str | None = None
        self._fid_floor: float | None = None
        self._cls_reference: M.FeatureMoments | None = None
        self._fd_cls_floor: float | None = None
        self._text_embeds: torch.Tensor | None = None
        self._resolution: tuple[int, int] | None = None
        if self.path == "toy" and self.judges is None:
            self.judges = ToyJudges.load()
        if self.path == "real" and self.real is None:
            self.real = RealMetricsOptions.from_cfg(self.cfg)
        logger.info("evaluation path %s: %d prompts x %d images", self.path, len(prompts), per)

    # -- features ------------------------------------------------------------------------------
    def _real_models(self, device: torch.device) -> None:
        assert self.real is not None
        if self.real.clip_model is not None and self._clip is None:
            self._clip = ClipJudge(self.real.clip_model, self.real.clip_pretrained, device)
        if self.real.fid_feature == "inception" and self._inception is None:
            self._inception = InceptionFeatures(str(self.real.inception_weights), device)

    def fid_features(self, images: np.ndarray) -> torch.Tensor:
        if self.path == "toy":
            from slimdiff.toy.clip import encode_images

            return encode_images(self.judges.clip_model, images).double()
        if self.real.fid_feature == "inception":
            return self._inception(images)
        return self._clip.image_embeds(images).double()

    def classifier_features(self, images: np.ndarray) -> torch.Tensor | None:
        """float64 (N, hidden) penultimate features of the toy attribute classifier (the ``fd_cls``
        feature space); None off the toy path or for a classifier without ``penultimate_features``."""
        if self.path != "toy":
            return None
        features = getattr(self.judges.classifier, "penultimate_features", None)
        return None if features is None else features(images).double()

    def fd_cls_feature_name(self) -> str | None:
        if self.path != "toy" or not hasattr(self.judges.classifier, "penultimate_features"):
            return None
        hidden = getattr(getattr(self.judges.classifier, "config", None), "hidden", None)
        width = f"{hidden}-d " if hidden is not None else ""
        return (
            f"{self.judges.classifier_id} penultimate activations ({width}GELU output read by the last Linear; "
            "ToyAttributeClassifier.penultimate_features), against the FID reference renders"
        )

    @property
    def fid_real_vs_real(self) -> float | None:
        """Toy-CLIP FID between two independent render sets of the evaluated captions (after the
        first ``score``): the FID noise floor."""
        return self._fid_floor

    @property
    def fd_cls_real_vs_real(self) -> float | None:
        """``fd_cls`` between two independent render sets of the evaluated captions, as many images
        as the generated set (after the first ``score``): its noise floor."""
        return self._fd_cls_floor

    def fid_feature_name(self) -> str:
        if self.path == "toy":
            return f"{self.judges.clip_id} image embedding, L2-normalised"
        if self.real.fid_feature == "inception":
            return self._inception.id if self._inception else "inception-v3-compat pool-2048"
        return f"{self._clip.id if self._clip else self.real.clip_model} image embedding (unnormalised)"

    def reference_moments(self, height: int, width: int) -> M.FeatureMoments | None:
        """Feature moments of real images: toy renders of the evaluated captions (seeded), or the
        real path's reference folder; None when the real path has none."""
        if self._reference is not None:
            return self._reference
        if self.path == "toy":
            from slimdiff.toy.data import render

            rng = np.random.default_rng(int(self.cfg.seed))
            real = np.stack([render(p, rng) for p in self.image_prompts])
            self._reference_desc = (
                f"toy renders of the {len(self.image_prompts)} evaluated captions "
                f"(slimdiff.toy.data.render, numpy default_rng({int(self.cfg.seed)}), in image order)"
            )
        elif self.real.reference_images:
            real = load_reference_images(self.real.reference_images, height, width)
            self._reference_desc = (
                f"{len(real)} images from {self.real.reference_images}, centre-cropped square and resized to "
                f"{height}x{width} (PIL bicubic)"
            )
        else:
            self._reference_desc = "none (set evaluation.reference_images for FID against real images)"
            return None
        self._reference = M.feature_moments(self.fid_features(real))
        if self.path == "toy":
            # FID between two independent render sets of the same captions: the FID a perfect model
            # would get, so differences between models smaller than this are sampling noise
            rng = np.random.default_rng(int(self.cfg.seed) + 1)
            again = np.stack([render(p, rng) for p in self.image_prompts])
            self._fid_floor = M.frechet_distance(self.fid_features(again), self._reference)
            # the same two render sets in the classifier's feature space: fd_cls and its floor
            cls_real = self.classifier_features(real)
            if cls_real is not None:
                self._cls_reference = M.feature_moments(cls_real)
                self._fd_cls_floor = M.frechet_distance(self.classifier_features(again), self._cls_reference)
        return self._reference

    # -- per pipeline --------------------------------------------------------------------------
    def measure(self, pipe) -> Measured:
        device = next(denoiser_of(pipe).parameters()).device
        height, width = pipeline_resolution(pipe)
        if self._resolution is None:
            self._resolution = (height, width)
        elif self._resolution != (height, width):
            raise ValueError(
                f"pipelines sample at different resolutions: {self._resolution} vs {(height, width)}"
            )
        if self.path == "real":
            self._real_models(device)
        start = time.perf_counter()
        images = sample_pipeline(
            pipe,
            self.image_prompts,
            self.seeds,
            num_inference_steps=int(self.cfg.num_inference_steps),
            guidance_scale=float(self.cfg.guidance_scale),
            batch_size=int(self.cfg.batch_size),
            height=height,
            width=width,
        )
        sample_time = time.perf_counter() - start
        quality = self.score(images)
        return Measured(
            images,
            quality,
            quality.pop("_fid_features"),
            sample_time,
            cls_features=quality.pop("_cls_features"),
        )

    def score(self, images: np.ndarray) -> dict:
        """Per-pipeline quality of ``images`` (one per ``image_prompts`` entry). The feature sets
        ride along under ``_fid_features`` / ``_cls_features`` (``measure`` pops them)."""
        quality: dict = {}
        features = self.fid_features(images)
        reference = self.reference_moments(images.shape[1], images.shape[2])
        quality["fid"] = None if reference is None else M.frechet_distance(features, reference)
        cls_features = self.classifier_features(images)
        quality["fd_cls"] = (
            None
            if cls_features is None or self._cls_reference is None
            else M.frechet_distance(cls_features, self._cls_reference)
        )
        if self.path == "toy":
            from slimdiff.toy.clip import encode_images, encode_texts
            from slimdiff.toy.evaluate import attribute_accuracy

            quality["accuracy"] = attribute_accuracy(
                images, self.image_prompts, classifier=self.judges.classifier
            )
            if self._text_embeds is None:
                self._text_embeds = encode_texts(
                    self.judges.clip_model, self.judges.clip_tokenizer, self.image_prompts
                )
            img = encode_images(self.judges.clip_model, images)
            quality["clip_score"] = float(M.clip_score(img, self._text_embeds).mean())
        elif self._clip is not None:
            if self._text_embeds is None:
                self._text_embeds = self._clip.text_embeds(self.image_prompts)
            img = self._clip.image_embeds(images)
            quality["clip_score"] = float(
                M.clip_score(img, self._text_embeds, self.real.clip_score_kind).mean()
            )
        else:
            quality["clip_score"] = None
        quality["_fid_features"] = features
        quality["_cls_features"] = cls_features
        return quality

    # -- the pair ------------------------------------------------------------------------------
    def compare(
        self,
        original_pipe,
        compressed_pipe,
        original: Measured,
        compressed: Measured,
        out_dir: Path | None = None,
        *,
        calibration_time_s: float | None = None,
        latency: bool = True,
    ) -> dict:
        """Sizes, FLOPs, latency, memory, fidelity, deltas and the gate of one compressed pipeline."""
        cfg = self.cfg
        height, width = self._resolution or pipeline_resolution(original_pipe)

        text_len = adapter_for(denoiser_of(original_pipe)).text_len(original_pipe)
        sides = {"original": (original_pipe, original), "compressed": (compressed_pipe, compressed)}
        result: dict = {}
        vae_scale = int(getattr(original_pipe, "vae_scale_factor", 8))
        latent_hw = (height // vae_scale, width // vae_scale)
        units = compression_units_of(denoiser_of(original_pipe))
        for side, (pipe, measured) in sides.items():
            model = denoiser_of(pipe)
            flops = unet_flops(model, latent_hw, text_len)
            result[side] = {
                "unet_params": sum(p.numel() for p in model.parameters()),
                "compressible_params": compressible_parameter_count(model, units),
                "unet_weights_mb": parameter_bytes(model) / 2**20,
                "unet_flops": flops["total"],
                "unet_flops_by_category": flops["by_category"],
                "sample_time_s": measured.sample_time_s,
                **{k: v for k, v in measured.quality.items()},
            }
        latency_info: dict = {"measured": False}
        if latency:
            n_prompts = min(int(cfg.batch_size), LATENCY_MAX_PROMPTS)
            inputs = unet_inputs_like(original_pipe, n_prompts, float(cfg.guidance_scale))
            times = interleaved_latency(
                {"original": denoiser_of(original_pipe), "compressed": denoiser_of(compressed_pipe)},
                inputs,
                int(cfg.latency_repeats),
            )
            for side in sides:
                result[side]["unet_latency_ms"] = 1000.0 * M.median(times[side])
                result[side]["unet_latency_ms_all"] = [1000.0 * t for t in times[side]]
                mem = unet_forward_peak_memory(denoiser_of(sides[side][0]), inputs)
                result[side]["unet_forward_peak_memory_mb"] = mem["bytes"] / 2**20
            first = inputs[0][0]
            latency_info = {
                "measured": True,
                "unet_batch": int(first.shape[0]),
                "latent_shape": list(first.shape[1:]),
                "text_len": text_len,
                "timestep": LATENCY_TIMESTEP,
                "repeats": int(cfg.latency_repeats),
                "warmup": 1,
                "statistic": "median of interleaved repeats (original, compressed alternate)",
                "memory_method": mem["method"],
            }

        # fidelity to the original, same seeds
        a = M.uint8_to_float(original.images)
        b = M.uint8_to_float(compressed.images)
        psnr_values = M.psnr(a, b)
        ssim_values = M.ssim(a, b) if min(a.shape[-2:]) >= M.SSIM_WINDOW else None
        fidelity = {
            "psnr_db_mean": M.capped_mean_psnr(psnr_values, PSNR_CAP_DB),
            "ssim_mean": None if ssim_values is None else float(ssim_values.mean()),
            "identical_images": int(torch.isinf(psnr_values).sum()),
            "fid_to_original": M.frechet_distance(compressed.fid_features, original.fid_features),
            "fd_cls_to_original": self._fd_cls_to_original(original, compressed),
            "n_images": len(original.images),
        }

        summary = summarize(result["original"], result["compressed"], fidelity, cfg, self.path)
        if calibration_time_s is not None:
            summary["calibration_time_s"] = float(calibration_time_s)
        result["summary"] = summary
        result["protocol"] = self.protocol(original_pipe, latency_info, text_len)
        if out_dir is not None:
            result["grids"] = write_grids(original.images, compressed.images, Path(out_dir))
        return result

    def _fd_cls_to_original(self, original: Measured, compressed: Measured) -> float | None:
        """``fd_cls`` between the two pipelines' images (same seeds); features recomputed from the
        images when a Measured does not carry them (a cached original measurement)."""
        feats = []
        for m in (original, compressed):
            f = m.cls_features if m.cls_features is not None else self.classifier_features(m.images)
            if f is None:
                return None
            feats.append(f)
        return M.frechet_distance(feats[1], feats[0])

    def protocol(self, pipe, latency_info: dict, text_len: int) -> dict:
        cfg = self.cfg
        height, width = self._resolution or pipeline_resolution(pipe)
        scheduler = pipe.scheduler
        sched_cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        p = next(denoiser_of(pipe).parameters())
        proto: dict = {
            "path": self.path,
            "n_prompts": len(self.prompts),
            "prompts_sha256": hashlib.sha256("\n".join(self.prompts).encode()).hexdigest(),
            "first_prompts": self.prompts[:3],
            "images_per_prompt": int(cfg.images_per_prompt),
            "n_images": len(self.image_prompts),
            "seed": int(cfg.seed),
            "seed_rule": "image k uses torch.Generator('cpu').manual_seed(seed + k), k = prompt_index * images_per_prompt + copy",
            "resolution": [height, width],
            "sampler": type(scheduler).__name__,
            "sampler_config": jsonable(sched_cfg),
            "num_inference_steps": int(cfg.num_inference_steps),
            "guidance_scale": float(cfg.guidance_scale),
            "batch_size": int(cfg.batch_size),
            "text_len": text_len,
            "device": str(p.device),
            "dtype": str(p.dtype).removeprefix("torch."),
            "fid_feature": self.fid_feature_name(),
            "fid_reference": self._reference_desc,
            "fid_real_vs_real": self._fid_floor,
            "fd_cls_feature": self.fd_cls_feature_name(),
            "fd_cls_real_vs_real": self._fd_cls_floor,
            "fid_implementation": "slimdiff.evaluation.metrics.frechet_distance: float64, unbiased covariances (n-1), "
            "tr sqrt via symmetric eigh (equals torchmetrics FrechetInceptionDistance with feature=<module>)",
            "psnr": f"per image on uint8 RGB scaled to [0,1], capped at {PSNR_CAP_DB:g} dB before the mean",
            "ssim": f"Gaussian window {M.SSIM_WINDOW}, sigma {M.SSIM_SIGMA}, K1 {M.SSIM_K1}, K2 {M.SSIM_K2}, "
            "valid positions (scikit-image convention, no padded borders), mean over positions and RGB channels",
            "latency": latency_info,
            "flops": FLOPS_METHOD,
            "gate": {
                "max_exact_match_drop": cfg.gate.max_exact_match_drop if self.path == "toy" else None,
                "max_fid_increase": cfg.gate.max_fid_increase,
            },
            "versions": {
                "torch": torch.__version__,
                "diffusers": _version("diffusers"),
                "open_clip": _version("open_clip_torch"),
                "slimdiff": _version("slimdiff-pipeline"),
                "python": platform.python_version(),
            },
        }
        if self.path == "toy":
            proto["clip_score"] = (
                f"{self.judges.clip_id}, 100*max(cos,0) of image and caption embeddings, 32x32 (no resize)"
            )
            proto["accuracy"] = f"{self.judges.classifier_id}, slimdiff.toy.evaluate.attribute_accuracy"
            proto["resize"] = "none (images are the classifier's and toy CLIP's native 32x32)"
        else:
            proto["clip_score"] = (
                f"{self._clip.id}, {self.real.clip_score_kind}" if self._clip else "off (clip_model=None)"
            )
            proto["resize"] = "torch bicubic antialias (shortest side), centre crop, clamp [0,1] for CLIP"
            proto["real_options"] = asdict(self.real)
        return proto


def summarize(original: dict, compressed: dict, fidelity: dict, cfg: Any, path: str) -> dict:
    """Deltas (compressed - original), ratios and the gate verdict."""
    flat_o, flat_c = flatten_numbers(original), flatten_numbers(compressed)
    deltas = {
        k: flat_c[k] - flat_o[k] for k in flat_o if k in flat_c and not k.startswith("unet_latency_ms_all")
    }
    summary: dict = {"deltas": deltas, "fidelity": fidelity}
    summary["unet_params_ratio"] = compressed["unet_params"] / original["unet_params"]
    summary["params_removed"] = original["unet_params"] - compressed["unet_params"]
    summary["compressible_removed_fraction"] = (
        1.0 - compressed["compressible_params"] / original["compressible_params"]
    )
    if original.get("unet_flops"):
        summary["flops_ratio"] = compressed["unet_flops"] / original["unet_flops"]
    if "unet_latency_ms" in original:
        ratio = compressed["unet_latency_ms"] / original["unet_latency_ms"]
        summary["latency_ratio"] = ratio
        summary["speedup"] = 1.0 / ratio
    exact_drop = None
    if path == "toy":
        exact_drop = 100.0 * (original["accuracy"]["all"]["exact"] - compressed["accuracy"]["all"]["exact"])
        summary["exact_match_drop"] = exact_drop
    fid_increase = None
    if original.get("fid") is not None and compressed.get("fid") is not None:
        fid_increase = compressed["fid"] - original["fid"]
        summary["fid_increase"] = fid_increase
    if original.get("fd_cls") is not None and compressed.get("fd_cls") is not None:
        summary["fd_cls_increase"] = compressed["fd_cls"] - original["fd_cls"]  # reported, not gated
    if original.get("clip_score") is not None and compressed.get("clip_score") is not None:
        summary["clip_score_delta"] = compressed["clip_score"] - original["clip_score"]
    passed, reasons, checks = M.quality_gate(
        exact_drop,
        fid_increase,
        max_exact_match_drop=cfg.gate.max_exact_match_drop if path == "toy" else None,
        max_fid_increase=cfg.gate.max_fid_increase,
    )
    summary["gate_passed"] = passed
    summary["gate_reasons"] = reasons
    summary["gate_checks"] = [c.to_dict() for c in checks]
    return summary


def flatten_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as dotted keys (None, strings and lists skipped)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_numbers(v, key + "."))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int | float) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def write_grids(original: np.ndarray, compressed: np.ndarray, out_dir: Path) -> dict[str, str]:
    """PNG grids into ``out_dir``: the first ``GRID_MAX_IMAGES`` images, original row above the
    compressed row of the same seeds (``grid_compare.png``), and each side alone."""

    out_dir.mkdir(parents=True, exist_ok=True)
    n = min(GRID_MAX_IMAGES, len(original))
    files = {
        "compare": "grid_compare.png",
        "original": "grid_original.png",
        "compressed": "grid_compressed.png",
    }
    comparison_grid(original[:n], compressed[:n], columns=GRID_COLUMNS).save(out_dir / files["compare"])
    tile_images(original[:n], columns=GRID_COLUMNS).save(out_dir / files["original"])
    tile_images(compressed[:n], columns=GRID_COLUMNS).save(out_dir / files["compressed"])
    return files


def load_reference_images(folder: str | Path, height: int, width: int) -> np.ndarray:
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise FileNotFoundError(
            f"reference image folder {folder} holds {len(files)} images (*.png/jpg/webp); FID needs >= 2"
        )
    out = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((width, height), Image.BICUBIC)
            out.append(np.asarray(im, dtype=np.uint8))
    return np.stack(out)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def jsonable(obj: Any) -> Any:
    """Plain JSON types only: tensors/arrays to lists, NaN/inf to None (strict JSON), others to str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray | torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN/inf: an empty split's accuracy is "not measured"
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)


# --------------------------------------------------------------------------------------------
# The public verb
# --------------------------------------------------------------------------------------------
def evaluate_pair(
    original_pipe,
    compressed_pipe,
    prompts: list[str],
    cfg,
    out_dir: Path,
    *,
    judges: ToyJudges | None = None,
    real: RealMetricsOptions | None = None,
    calibration_time_s: float | None = None,
) -> dict:
    """Evaluate ``compressed_pipe`` against ``original_pipe`` on the same prompts and seeds.

    ``cfg`` is a ``slimdiff.config.EvaluationParams`` (max_prompts, images_per_prompt,
    num_inference_steps, guidance_scale, seed, batch_size, latency_repeats, gate). The toy path is
    taken when every prompt is a toy caption (``judges`` default to the committed toy models),
    the real path otherwise (``real`` defaults to ``RealMetricsOptions.from_cfg(cfg)``). Writes
    comparison grids into ``out_dir``; returns ``{"original", "compressed", "summary", "protocol",
    "grids"}`` (JSON-able; see the module docstring for what each holds)."""
    evaluator = PairEvaluator(list(prompts), cfg, judges=judges, real=real)
    original = evaluator.measure(original_pipe)
    compressed = evaluator.measure(compressed_pipe)
    result = evaluator.compare(
        original_pipe,
        compressed_pipe,
        original,
        compressed,
        Path(out_dir),
        calibration_time_s=calibration_time_s,
    )
    s = result["summary"]
    logger.info(
        "evaluation (%s): params ratio %.3f, latency ratio %s, gate %s%s",
        evaluator.path,
        s["unet_params_ratio"],
        f"{s['latency_ratio']:.3f}" if "latency_ratio" in s else "n/a",
        "passed" if s["gate_passed"] else "FAILED",
        "" if s["gate_passed"] else f" ({'; '.join(s['gate_reasons'])})",
    )
    return jsonable(result)
