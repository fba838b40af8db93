"""Activation statistics across timesteps (METHOD.md stage 2).

``ActivationCollector`` owns every hook it needs on the BasicTransformerBlocks of a diffusers UNet
and streams uncentered, token-summed second moments into float64 running sums, one slot per
timestep bucket (see ``slimdiff.core.stats`` for keys and shapes):

    {block}.ff.hidden        input of ff.net.2 (the GEGLU/GELU intermediate h)    (inner, inner)
    {block}.{attn}.query     output of to_q, per head                              (H, d_q, d_q)
    {block}.{attn}.key       output of to_k, per head                              (H, d_k, d_k)
    {block}.{attn}.attnout   input of to_out.0 (attention output a), per head      (H, d_v, d_v)

Each hooked batch is multiplied in float32 (for the FFN one BLAS syrk on the CPU, which computes
only the upper triangle at half the flops, or one GEMM on accelerators; one batched GEMM over heads
for attention) and added to the float64 sums, so memory is fixed by the model, never by the number
of prompts or steps. The collector must be created after the model is on its device. Tokens are counted, not batches: cross-attention keys see the text tokens,
everything else the image tokens, and both classifier-free-guidance branches count because both
pass through the UNet. Padded tokens are never counted: a site whose layout names a padding mask
(PixArt's masked cross-attention keys; ``arch.base.TokenMask``, e.g. Qwen-Image's padded text
tokens) keeps only the tokens the mask of the current call lets through.

The timestep bucket comes from the UNet's own ``timestep`` argument (a forward pre-hook with kwargs
on the UNet), mapped through ``scheduler.timesteps``: this works however the pipeline batches the
guidance branches and for schedulers that call the UNet twice at one timestep (PNDM's first step).

``collect_stats(pipe, prompts, ...)`` runs the pipeline's own sampler over a prompt shard with a
per-prompt generator seeded from ``seed + global prompt index``, so sharded runs merge
(``slimdiff.core.stats.merge``) into the statistics of the whole run.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from slimdiff.core.memory import StatsMemoryPlan, plan_stats_memory
from slimdiff.core.stats import ActivationStats
from slimdiff.families.base import StatSite, UnsupportedModelError, adapter_for
from slimdiff.families.basic import check_attention_processor
from slimdiff.families.units import denoisers as denoisers_of_pipe
from slimdiff.families.units import steps_served

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------
def bucket_of_step(step: int, num_steps: int, n_buckets: int) -> int:
    """Contiguous bucketing of sampler steps: step i of S goes to bucket floor(i * B / S).

    Buckets differ in size by at most one step; bucket 0 holds the first (noisiest) steps."""
    if not 0 <= step < num_steps:
        raise ValueError(f"step {step} outside [0, {num_steps})")
    if not 1 <= n_buckets <= num_steps:
        raise ValueError(f"n_buckets must be in [1, num_steps={num_steps}], got {n_buckets}")
    return step * n_buckets // num_steps


def unique_in_order(values: Sequence[float]) -> list[float]:
    """First occurrences, in order (PNDM repeats its second timestep; that is still one step)."""
    seen: set[float] = set()
    out = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def gram_fp32(x: torch.Tensor) -> torch.Tensor:
    """x: (..., n) -> (n, n) float32 sum over all leading dims of x^T x (one GEMM)."""
    x = x.detach().reshape(-1, x.shape[-1]).float()  # (M, n)
    return x.T @ x


def gram_upper_fp32_cpu(x: torch.Tensor) -> torch.Tensor:
    """x: (..., n) on the CPU -> (n, n) float32 whose upper triangle (diagonal included) is that of
    x^T x; the strict lower triangle is unspecified (read it through ``symmetrise_upper``).

    BLAS ``ssyrk`` computes only one triangle: half the flops of the GEMM. The FFN intermediate
    (4d wide) makes this product 4x the cost of ff.net.2 itself, so it dominates the hook cost.
    torch exposes no syrk; scipy does, on the CPU."""
    from scipy.linalg.blas import ssyrk

    x = x.detach().reshape(-1, x.shape[-1]).float().contiguous()  # (M, n), C order
    # a C-ordered (M, n) array is a Fortran-ordered (n, M) one: A A^T with A = x^T, no copy.
    return torch.from_numpy(ssyrk(1.0, x.numpy().T, trans=0, lower=0))


# Below this FFN width the GEMM is cheap and syrk's separate BLAS thread pool costs more than it
# saves (measured on the 2-core dev machine: tiny widths 3-10x slower under load, 1280 wide 1.2-2x faster).
SYRK_MIN_DIM = 1024


def symmetrise_upper(m: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> the symmetric matrix whose upper triangle is that of ``m``."""
    return m.triu() + m.triu(1).transpose(-1, -2)


def per_head_gram_fp32(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x: (..., heads * d) -> (heads, d, d) float32 per-head x_h^T x_h summed over tokens.

    One batched GEMM over heads on strided views (no per-head Python loop, no copy)."""
    n = x.shape[-1]
    x = x.detach().reshape(-1, heads, n // heads).float()  # (M, H, d)
    return torch.einsum("mhd,mhe->hde", x, x)  # (H, d, d)


# --------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------
def check_attention_supported(name: str, attn: nn.Module) -> None:
    """Raise UnsupportedModelError (naming ``name``) if the statistics hooks would not see what
    this BasicTransformerBlock attention really uses (kept for callers of the old API)."""

    check_attention_processor(name, attn)


def stat_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every statistic key the collector fills on ``model`` and its per-bucket shape (for stores
    that preallocate, e.g. the Zarr covariance store). Validates the model like the collector."""
    return {s.key: s.shape for s in adapter_for(model).stat_sites(model)}


def _kept_tokens(mask: torch.Tensor | None, n_tokens: int) -> torch.Tensor | None:
    """Boolean (B, N) of the key tokens an attention mask lets through, or None (all of them).

    diffusers passes masks as additive biases (0 = attend, large negative = masked), shaped
    (B, N), (B, 1, N) or (B*heads, 1, N) by the time the attention module sees them; boolean
    masks (True = attend) are accepted too."""
    if mask is None:
        return None
    m = mask.detach()
    keep = m if m.dtype == torch.bool else m > -1.0  # additive: 0 kept, -10000 / -inf masked
    keep = keep.reshape(keep.shape[0], -1, keep.shape[-1])[:, 0, :]  # (B', N): one row per sample
    if keep.shape[-1] != n_tokens:
        raise RuntimeError(f"attention mask covers {keep.shape[-1]} key tokens, the keys have {n_tokens}")
    return keep


# --------------------------------------------------------------------------------------------
# The collector
# --------------------------------------------------------------------------------------------
class ActivationCollector:
    """Owns the statistics hooks on one denoiser (any family ``slimdiff.families`` supports); use as a
    context manager. Which activations are hooked comes from the family adapter's ``stat_sites``.

    ``with ActivationCollector(unet, n_buckets, scheduler=pipe.scheduler) as col: pipe(...)``
    registers the hooks on enter and removes every one of them on exit, also when the body raises.
    With a scheduler, the bucket of each UNet call follows from its timestep; without one, set
    ``col.bucket`` by hand (default 0). ``with col.muted(): ...`` runs the model without recording.
    ``col.stats()`` returns a snapshot as ``ActivationStats`` (on the CPU).

    ``serves``: for a pipeline of several denoisers, each called in its own timestep range (Wan 2.2
    A14B; ``slimdiff.families.units.steps_served``), the mask of the scheduler's timesteps at which
    the pipeline calls THIS model. Its schedule (and so its buckets: ``n_buckets`` contiguous groups)
    is then those steps only, and a call at another step of the sampler raises. None: every step.

    Statistics live in this object (never as attributes on modules); the hooks are closures over it.
    """

    def __init__(
        self,
        model: nn.Module,
        n_buckets: int = 1,
        *,
        scheduler=None,
        keys: Sequence[str] | None = None,
        accumulate: str = "float64",
        flush_every: int = 1,
        serves: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if n_buckets < 1:
            raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
        if accumulate not in ("float64", "float32"):
            raise ValueError(f"accumulate must be 'float64' or 'float32', got {accumulate!r}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.model = model
        self.n_buckets = n_buckets
        self.scheduler = scheduler
        self.serves = serves
        self.adapter = adapter_for(model)
        self._keys = None if keys is None else list(keys)
        self._sites = self._select(
            self.adapter.stat_sites(model)
        )  # validates the model (raises naming the module)
        device = next(model.parameters()).device
        # float64: the running sums live on the model's device and take every float32 batch product
        # exactly. float32 (accelerators, slimdiff.core.memory): half the device memory; the device sums
        # are added into float64 host sums every ``flush_every`` products (and before any read).
        self.accumulate = accumulate
        self.flush_every = flush_every if accumulate == "float32" else 1
        acc_dtype = torch.float64 if accumulate == "float64" else torch.float32
        self._sums = {
            s.key: torch.zeros((n_buckets, *s.shape), dtype=acc_dtype, device=device) for s in self._sites
        }
        self._host = (
            {s.key: torch.zeros((n_buckets, *s.shape), dtype=torch.float64) for s in self._sites}
            if accumulate == "float32"
            else None
        )
        self._pending = {s.key: 0 for s in self._sites}  # float32: products since the last flush
        self._tokens = {s.key: [0] * n_buckets for s in self._sites}
        # On the CPU, wide FFN grams accumulate only their upper triangle (BLAS syrk, half the flops);
        # stats() mirrors it. Narrow ones and accelerators use one GEMM and keep full sums.
        self._upper_only = {
            s.key
            for s in self._sites
            if s.heads == 0 and device.type == "cpu" and s.shape[-1] >= SYRK_MIN_DIM
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._muted = False
        self._bucket = 0
        self._schedule: list[float] | None = None  # unique timesteps of the sampler, in order
        self._schedule_src: torch.Tensor | None = None
        self._step_of_t: dict[float, int] = {}
        self._other_steps: set[float] = set()  # sampler timesteps another denoiser serves (``serves``)
        # (module path, argument) -> the mask of its current call (``StatSite.mask_module``, ``.mask_arg``)
        self._masks: dict[tuple[str, str], torch.Tensor | None] = {}
        self.meta: dict = {}

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> ActivationCollector:
        if self._handles:
            raise RuntimeError("ActivationCollector is already active (nested `with` on the same collector)")
        # Re-check: processors may have been swapped since construction.
        sites = self._select(self.adapter.stat_sites(self.model))
        if [(s.key, s.shape) for s in sites] != [(s.key, s.shape) for s in self._sites]:
            raise UnsupportedModelError(
                "the model's transformer blocks changed shape since this collector was created; "
                "create a new ActivationCollector"
            )
        self._sites = sites
        try:
            if self.scheduler is not None:
                self._handles.append(
                    self.model.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True)
                )
            for path, arg in sorted({(s.mask_module, s.mask_arg) for s in self._sites if s.mask_module}):
                self._handles.append(
                    self.model.get_submodule(path).register_forward_pre_hook(
                        self._mask_hook(path, arg), with_kwargs=True
                    )
                )
            for site in self._sites:
                hook = self._make_hook(site)
                module = self.model.get_submodule(site.module)
                if site.kind == "pre":
                    self._handles.append(module.register_forward_pre_hook(hook))
                else:
                    self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove_hooks()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def _select(self, sites: list[StatSite]) -> list[StatSite]:
        """The sites of ``keys`` (all when None), in the model's hook order."""
        if self._keys is None:
            return sites
        known = {s.key for s in sites}
        unknown = [k for k in self._keys if k not in known]
        if unknown:
            raise KeyError(f"statistics {unknown[:3]} are not sites of this model ({len(unknown)} unknown)")
        if not self._keys:
            raise ValueError("keys must name at least one statistic (None: all of them)")
        wanted = set(self._keys)
        return [s for s in sites if s.key in wanted]

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self._sites]

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def muted(self) -> Iterator[None]:
        """Run forward passes without recording (e.g. a warm-up or a reference pass)."""
        prev, self._muted = self._muted, True
        try:
            yield
        finally:
            self._muted = prev

    @property
    def bucket(self) -> int:
        return self._bucket

    @bucket.setter
    def bucket(self, value: int) -> None:
        if not 0 <= value < self.n_buckets:
            raise ValueError(f"bucket must be in [0, {self.n_buckets}), got {value}")
        self._bucket = value

    # -- hooks ------------------------------------------------------------------------------
    def _mask_hook(self, path: str, arg: str) -> Callable:
        """Record the ``arg`` argument of every call of the module at ``path`` (by keyword, or by its
        position in the module's forward signature: ``attention_mask`` is an attention's third)."""
        params = list(inspect.signature(self.model.get_submodule(path).forward).parameters)
        position = params.index(arg) if arg in params else None

        def hook(module, args, kwargs):
            if arg in kwargs:
                self._masks[(path, arg)] = kwargs[arg]
            else:
                given = position is not None and position < len(args)
                self._masks[(path, arg)] = args[position] if given else None

        return hook

    def _make_hook(self, site: StatSite) -> Callable:
        key = site.key
        sums, tokens, heads = self._sums[key], self._tokens[key], site.heads
        host = None if self._host is None else self._host[key]
        upper_only = site.key in self._upper_only
        mask_module, head_major, cols = site.mask_module, site.head_major, site.cols
        first = site.first_moment
        mask_key = (site.mask_module, site.mask_arg)

        def record(x: torch.Tensor) -> None:
            if self._muted:
                return
            with torch.no_grad():
                if head_major:  # (B, heads, N, d) -> (B, N, heads*d)
                    x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
                elif x.ndim == 4:  # (B, N, heads, d): a per-head norm's output in token-major order (FLUX)
                    x = x.flatten(2)
                if cols is not None:  # a packed linear's input: this statistic's columns only
                    x = x[..., cols[0] : cols[1]]
                if mask_module is not None:  # padded tokens never enter the statistics
                    keep = _kept_tokens(self._masks.get(mask_key), x.shape[-2])
                    if keep is not None:
                        x = x[keep.to(x.device)]  # (kept tokens, features)
                if first:  # (heads, d) per-head sum of the tokens
                    prod = x.detach().reshape(-1, heads, x.shape[-1] // heads).float().sum(0)
                elif heads:
                    prod = per_head_gram_fp32(x, heads)
                elif upper_only and x.device.type == "cpu":
                    prod = gram_upper_fp32_cpu(x)
                else:
                    prod = gram_fp32(x)
                b = self._bucket
                sums[b].add_(prod)  # fp32 batch product -> fp64 running sum (or fp32, flushed below)
                tokens[b] += x.numel() // x.shape[-1]
                if host is not None:
                    self._pending[key] += 1
                    if self._pending[key] >= self.flush_every:
                        self._flush(key)

        if site.kind == "pre":

            def pre_hook(module, args):
                record(args[0])

            return pre_hook

        def post_hook(module, args, output):
            record(output)

        return post_hook

    def _unet_pre_hook(self, module, args, kwargs) -> None:
        if self._muted:
            return
        t = self.adapter.timestep(module, args, kwargs)
        if t is None:
            raise RuntimeError(
                f"{type(module).__name__} was called without a timestep; cannot assign a bucket"
            )
        if isinstance(t, torch.Tensor):
            flat = t.detach().flatten()
            if flat.numel() > 1 and not bool((flat == flat[0]).all()):
                raise RuntimeError(
                    "the denoiser was called with different timesteps in one batch; buckets need one"
                )
            t = flat[0].item()
        self._bucket = self._bucket_of_timestep(float(t))

    def _bucket_of_timestep(self, t: float) -> int:
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is None:
            raise RuntimeError(
                f"{type(self.scheduler).__name__}.timesteps is not set: call scheduler.set_timesteps() "
                "before running the UNet under the collector"
            )
        if timesteps is not self._schedule_src:
            self._set_schedule(timesteps)
        step = self._step_of_t.get(t)
        if step is None:
            if t in self._other_steps:
                raise RuntimeError(
                    f"{type(self.model).__name__} was called at timestep {t}, a step its pipeline gives to "
                    f"another denoiser (it serves {len(self._schedule)} steps, {self._schedule[0]} to "
                    f"{self._schedule[-1]}): the pipeline does not split its steps as slimdiff expects"
                )
            sched = self._schedule
            nearest = min(range(len(sched)), key=lambda i: abs(sched[i] - t))
            span = max(abs(sched[0] - sched[-1]), 1.0)
            if abs(sched[nearest] - t) > 1e-4 * span:
                raise RuntimeError(
                    f"UNet timestep {t} is not in {type(self.scheduler).__name__}.timesteps; was the UNet "
                    "called outside the sampler? Mute the collector or use scheduler=None and set .bucket"
                )
            step = nearest
        return bucket_of_step(step, len(self._schedule), self.n_buckets)

    def _set_schedule(self, timesteps: torch.Tensor) -> None:
        values = timesteps.detach().cpu()
        everything = unique_in_order([float(v) for v in values.tolist()])
        if self.serves is None:
            schedule = everything
        else:
            mask = torch.as_tensor(self.serves(timesteps)).detach().cpu().reshape(-1)
            schedule = unique_in_order(
                [float(v) for v, m in zip(values.tolist(), mask.tolist(), strict=True) if m]
            )
            if not schedule:
                raise ValueError(
                    f"{type(self.model).__name__} serves none of the sampler's {len(everything)} timesteps "
                    "(its pipeline calls another denoiser at every step): nothing to collect"
                )
        if self._schedule is not None and schedule != self._schedule:
            raise RuntimeError(
                "the sampler's timestep schedule changed during collection "
                f"({len(self._schedule)} -> {len(schedule)} steps): buckets would mix different timesteps; "
                "use one num_inference_steps per collector"
            )
        if len(schedule) < self.n_buckets:
            served = "" if self.serves is None else f" at which this denoiser runs (of {len(everything)})"
            raise ValueError(
                f"n_buckets={self.n_buckets} exceeds the sampler's {len(schedule)} distinct timesteps{served}; "
                "lower n_buckets or raise num_inference_steps"
            )
        self._schedule_src = timesteps
        if self._schedule is None:
            self._schedule = schedule
            self._step_of_t = {t: i for i, t in enumerate(schedule)}
            self._other_steps = set(everything) - set(schedule)
            self.meta.update(self._schedule_meta(schedule))

    def _schedule_meta(self, schedule: list[float]) -> dict:
        """Per-bucket timesteps (and alphas_cumprod when the scheduler has them) for SNR weighting."""
        buckets = [bucket_of_step(i, len(schedule), self.n_buckets) for i in range(len(schedule))]
        bucket_ts: list[list[float]] = [[] for _ in range(self.n_buckets)]
        for t, b in zip(schedule, buckets, strict=True):
            bucket_ts[b].append(t)
        meta: dict = {
            "scheduler": type(self.scheduler).__name__,
            "timesteps": schedule,
            "bucket_of_step": buckets,
            "bucket_timesteps": bucket_ts,
        }
        alphas = getattr(self.scheduler, "alphas_cumprod", None)
        if isinstance(alphas, torch.Tensor):
            a = alphas.detach().cpu().to(torch.float64)
            idx = lambda t: min(max(int(round(t)), 0), a.numel() - 1)  # noqa: E731
            meta["bucket_alphas_cumprod"] = [[float(a[idx(t)]) for t in ts] for ts in bucket_ts]
        return meta

    # -- results ----------------------------------------------------------------------------
    def _flush(self, key: str) -> None:
        """float32 accumulation: add the device sums of ``key`` into its float64 host sums."""
        if self._host is None or not self._pending[key]:
            return
        self._host[key].add_(self._sums[key].to("cpu", torch.float64))
        self._sums[key].zero_()
        self._pending[key] = 0

    def moments_of(self, key: str) -> torch.Tensor:
        """float64 (n_buckets, *mat) CPU sums of one statistic (a copy; upper-triangle sums mirrored)."""
        if key not in self._sums:
            raise KeyError(f"{key!r} is not collected by this collector")
        if self._host is not None:
            self._flush(key)
            m = self._host[key]
        else:
            m = self._sums[key]
        if key in self._upper_only:
            return symmetrise_upper(m).cpu()
        return m.detach().to("cpu", copy=True)

    def take(self, key: str) -> torch.Tensor:
        """Like :meth:`moments_of`, but hands over the collector's own buffer (symmetrised in place,
        one bucket of temporaries) and forgets it: no second copy of the statistic ever exists.
        For the end of a pass; the collector no longer records ``key`` afterwards."""
        if key not in self._sums:
            raise KeyError(f"{key!r} is not collected by this collector")
        if self._host is not None:
            self._flush(key)
            m = self._host.pop(key)
        else:
            m = self._sums[key]
        if m.device.type != "cpu":
            m = m.to("cpu")
        if key in self._upper_only:
            for b in range(m.shape[0]):  # mirror the upper triangle into the lower, bucket by bucket
                upper = m[b].triu(1)
                m[b].triu_()
                m[b].add_(upper.T)
        del self._sums[key]
        return m

    def tokens_of(self, key: str) -> torch.Tensor:
        return torch.tensor(self._tokens[key], dtype=torch.int64)

    def stats(self, meta: dict | None = None) -> ActivationStats:
        """Snapshot of the running sums as ActivationStats (float64 / int64 on the CPU)."""
        return ActivationStats(
            n_buckets=self.n_buckets,
            moments={k: self.moments_of(k) for k in self._sums},
            tokens={k: self.tokens_of(k) for k in self._sums},
            meta={**self.meta, **(meta or {})},
        )

    def reset(self) -> None:
        for v in self._sums.values():
            v.zero_()
        for v in (self._host or {}).values():
            v.zero_()
        self._pending = dict.fromkeys(self._pending, 0)
        for v in self._tokens.values():
            v[:] = [0] * self.n_buckets


# --------------------------------------------------------------------------------------------
# One public verb
# --------------------------------------------------------------------------------------------
def prompt_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """CPU generators seeded ``seed + global prompt index``: a prompt's noise does not depend on
    the shard or batch it lands in (CPU so that GPU and CPU runs start from the same latents)."""
    return [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(count)]


def collect_stats(
    pipe,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    n_buckets: int = 5,
    batch_size: int = 16,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    index_offset: int = 0,
    max_memory: int | str | None = "auto",
    accumulate: str = "auto",
    flush_every: int = 16,
    keys: Sequence[str] | None = None,
    sink: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
    memory_plan: StatsMemoryPlan | None = None,
    denoiser: str | None = None,
) -> ActivationStats:
    """Second-moment statistics of the pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``)
    over one prompt shard, per timestep bucket.

    Runs the pipeline's own scheduler and classifier-free guidance (``output_type="latent"``: the
    VAE decode is skipped). ``index_offset`` is the global index of ``prompts[0]`` in the full
    calibration set; prompt i gets a generator seeded ``seed + index_offset + i``. Shards cut at
    multiples of ``batch_size`` merge exactly into the unsharded run (same batches, same sums).

    Memory (``slimdiff.core.memory``): ``max_memory`` (bytes or e.g. ``"16GiB"``) bounds the statistics'
    accumulators; the sites are split into groups, one sampling pass each, and the result is
    bit-identical to one pass. ``accumulate`` "auto" sums in float64 on the CPU and in float32
    (flushed into float64 host sums every ``flush_every`` products) on accelerators. ``keys`` restricts collection to some statistics. With ``sink``,
    every statistic is handed over as soon as its pass ends, ``sink(key, moments, tokens)`` (float64
    (n_buckets, *mat), int64 (n_buckets,)), and freed: the returned ActivationStats then holds only
    the metadata, so host memory stays at one group. Without a sink the
    returned ActivationStats holds everything (host memory = all statistics).

    ``denoiser``: which denoiser component to hook, a key of ``slimdiff.families.units.denoisers``
    (default: the family's own, ``pipe.unet`` / ``pipe.transformer``). In a pipeline of several
    denoisers (Wan 2.2 A14B) the sampler calls each only at its own steps, so the statistics, and
    their ``n_buckets`` buckets, cover those steps only (``meta["denoiser"]``, ``meta["timesteps"]``);
    ``collect_stats_by_denoiser`` collects all of them in one sampling run.
    """
    (stats,) = _collect(
        pipe,
        prompts,
        None if denoiser is None else [denoiser],
        {denoiser: sink},
        memory_plan,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        n_buckets=n_buckets,
        batch_size=batch_size,
        seed=seed,
        height=height,
        width=width,
        progress=progress,
        index_offset=index_offset,
        max_memory=max_memory,
        accumulate=accumulate,
        flush_every=flush_every,
        keys=keys,
    ).values()
    return stats


def collect_stats_by_denoiser(
    pipe,
    prompts: Sequence[str],
    *,
    denoisers: Sequence[str] | None = None,
    sinks: Mapping[str, Callable[[str, torch.Tensor, torch.Tensor], None]] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    n_buckets: int = 5,
    batch_size: int = 16,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    index_offset: int = 0,
    max_memory: int | str | None = "auto",
    accumulate: str = "auto",
    flush_every: int = 16,
    keys: Sequence[str] | None = None,
) -> dict[str, ActivationStats]:
    """``collect_stats`` for every denoiser of the pipeline (``denoisers``: some of them, by
    component name; default all, ``slimdiff.families.units.denoisers``) in ONE sampling run: a
    collector on each, each recording only the steps the pipeline calls it at, bucketed over those
    steps. Returns ``{component name: ActivationStats}``. The memory limit covers all collectors
    together (their sites are planned as one set: a pass may hold some statistics of each);
    ``sinks`` maps a component name to its ``sink``. ``keys`` restricts every denoiser to those
    statistics. A denoiser the sampler calls at fewer than ``n_buckets`` steps is refused before
    sampling. For a one-denoiser pipeline this is ``{name: collect_stats(...)}``, same bits."""
    return _collect(
        pipe,
        prompts,
        None if denoisers is None else list(denoisers),
        dict(sinks or {}),
        None,
        everything=denoisers is None,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        n_buckets=n_buckets,
        batch_size=batch_size,
        seed=seed,
        height=height,
        width=width,
        progress=progress,
        index_offset=index_offset,
        max_memory=max_memory,
        accumulate=accumulate,
        flush_every=flush_every,
        keys=keys,
    )


def served_step_counts(pipe, num_inference_steps: int) -> dict[str, int] | None:
    """How many distinct steps of a ``num_inference_steps`` sampler each denoiser of ``pipe`` runs
    at (on a copy of its scheduler), or None when the scheduler cannot set its timesteps without
    the pipeline's arguments (the collectors then check while sampling)."""
    import copy

    scheduler = copy.deepcopy(pipe.scheduler)
    try:
        scheduler.set_timesteps(num_inference_steps)
    except (TypeError, ValueError):
        return None
    timesteps = scheduler.timesteps
    counts = {}
    for name in denoisers_of_pipe(pipe):
        serves = steps_served(pipe, name)
        kept = timesteps if serves is None else timesteps[torch.as_tensor(serves(timesteps)).reshape(-1)]
        counts[name] = len(unique_in_order([float(t) for t in kept.tolist()]))
    return counts


def _collect(
    pipe,
    prompts: Sequence[str],
    names: list[str | None] | None,
    sinks: Mapping,
    memory_plan: StatsMemoryPlan | None,
    *,
    everything: bool = False,
    num_inference_steps: int,
    guidance_scale: float,
    n_buckets: int,
    batch_size: int,
    seed: int,
    height: int | None,
    width: int | None,
    progress: bool,
    index_offset: int,
    max_memory: int | str | None,
    accumulate: str,
    flush_every: int,
    keys: Sequence[str] | None,
) -> dict[str, ActivationStats]:
    """One sampling run with a collector on each denoiser of ``names`` (None: the family's own;
    ``everything``: all of them); see ``collect_stats``."""
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts:
        raise ValueError("collect_stats needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= n_buckets <= num_inference_steps:
        raise ValueError(
            f"n_buckets must be in [1, num_inference_steps={num_inference_steps}], got {n_buckets}"
        )
    if index_offset < 0:
        raise ValueError(f"index_offset must be >= 0, got {index_offset}")

    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    models = denoisers_of_pipe(pipe)
    if everything:
        names = list(models)
    elif names is None or names == [None]:
        names = [next(iter(models))]
    unknown = [n for n in names if n not in models]
    if unknown or not names:
        raise ValueError(
            f"{unknown or names}: not a denoiser of {type(pipe).__name__} (it has {list(models)})"
        )
    chosen = {n: models[n] for n in dict.fromkeys(names)}
    several = len(models) > 1  # each denoiser is called at its own steps: record which
    serves = {n: steps_served(pipe, n) if several else None for n in chosen}
    sinks = {n: sinks.get(n, sinks.get(None)) for n in chosen}
    first = next(iter(chosen.values()))
    if len(chosen) == 1:
        plan = memory_plan or plan_for_model(
            first,
            n_buckets,
            reserved_bytes=pipeline_bytes(pipe),
            max_memory=max_memory,
            keys=keys,
            accumulate=None if accumulate == "auto" else accumulate,
            flush_every=flush_every,
        )
        only = next(iter(chosen))
        groups = [[(only, k) for k in group] for group in plan.groups]
    else:
        if memory_plan is not None:
            raise ValueError("memory_plan plans one denoiser's statistics; collect several without it")
        plan = _plan_for_denoisers(
            chosen,
            n_buckets,
            reserved_bytes=pipeline_bytes(pipe),
            max_memory=max_memory,
            keys=keys,
            accumulate=None if accumulate == "auto" else accumulate,
            flush_every=flush_every,
        )
        groups = [[tuple(k.split(_NAME_SEP, 1)) for k in group] for group in plan.groups]
    if plan.n_buckets != n_buckets:
        raise ValueError(f"memory_plan is for {plan.n_buckets} buckets, collection uses {n_buckets}")
    if several:
        counts = served_step_counts(pipe, num_inference_steps) or {}
        for n in chosen:
            if n in counts and counts[n] < n_buckets:
                raise ValueError(
                    f"{type(pipe).__name__} calls its {n} at {counts[n]} of the sampler's "
                    f"{num_inference_steps} steps, fewer than n_buckets={n_buckets} (each denoiser's buckets "
                    "split its own steps): raise num_inference_steps or lower n_buckets"
                )
    adapter = adapter_for(first)
    sample_h, sample_w = adapter.sample_size(first)
    height = height or sample_h * vae_scale
    width = width or sample_w * vae_scale
    meta = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": float(guidance_scale),
        "cfg_branches": adapter.pipeline_kwargs(pipe, guidance_scale, 1)[1],
        "n_buckets": n_buckets,
        "height": int(height),
        "width": int(width),
        # the token sequence RoPE rotates (None without RoPE): pair selection's phase moments
        "rope_sequence": adapter.rope_sequence(pipe, (int(height) // vae_scale, int(width) // vae_scale)),
        "seed": seed,
        "seed_rule": "torch.Generator('cpu').manual_seed(seed + global prompt index)",
        "batch_size": batch_size,
        "accumulate": plan.accumulate,
        "flush_every": plan.flush_every,
    }

    saved_pbar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)
    n_batches = math.ceil(len(prompts) / batch_size)
    moments: dict[str, dict[str, torch.Tensor]] = {n: {} for n in chosen}
    tokens: dict[str, dict[str, torch.Tensor]] = {n: {} for n in chosen}
    schedule_meta: dict[str, dict] = {n: {} for n in chosen}
    try:
        for g, group in enumerate(groups):
            wanted: dict[str, list[str]] = {}
            for n, key in group:
                wanted.setdefault(n, []).append(key)
            collectors = {
                n: ActivationCollector(
                    chosen[n],
                    n_buckets,
                    scheduler=pipe.scheduler,
                    keys=group_keys,
                    accumulate=plan.accumulate,
                    flush_every=plan.flush_every,
                    serves=serves[n],
                )
                for n, group_keys in wanted.items()
            }
            desc = "calibration" if plan.passes == 1 else f"calibration pass {g + 1}/{plan.passes}"
            with ExitStack() as hooks:
                for collector in collectors.values():
                    hooks.enter_context(collector)
                for start in tqdm(
                    range(0, len(prompts), batch_size), total=n_batches, disable=not progress, desc=desc
                ):
                    batch = prompts[start : start + batch_size]
                    guidance, _ = adapter.pipeline_kwargs(pipe, guidance_scale, len(batch))
                    pipe(
                        prompt=batch,
                        num_inference_steps=num_inference_steps,
                        **guidance,
                        height=height,
                        width=width,
                        generator=prompt_generators(seed, index_offset + start, len(batch)),
                        output_type="latent",
                    )
            for n, collector in collectors.items():
                if several and not collector.meta:
                    raise RuntimeError(f"{type(pipe).__name__} never called its {n} while sampling")
                schedule_meta[n] = collector.meta
                for key in dict.fromkeys(collector.keys):
                    count = collector.tokens_of(key)
                    if sinks[n] is not None:
                        sinks[n](key, collector.take(key), count)  # then freed: one statistic at a time
                    else:
                        moments[n][key], tokens[n][key] = collector.take(key), count
            del collectors, collector  # free this group's accumulators before the next pass
    finally:
        pipe.set_progress_bar_config(**saved_pbar)
    # the plan is logged, not kept: "auto" limits vary between runs
    out = {}
    for n in chosen:
        extra = {"denoiser": n} if several else {}
        out[n] = ActivationStats(
            n_buckets=n_buckets,
            moments=moments[n],
            tokens=tokens[n],
            meta={**schedule_meta[n], **meta, **extra},
        )
    logger.info(
        "collected %d statistics of %s over %d prompts x %d steps (%d buckets, %d pass(es))",
        sum(len(g) for g in plan.groups),
        ", ".join(chosen),
        len(prompts),
        num_inference_steps,
        n_buckets,
        plan.passes,
    )
    return out


_NAME_SEP = "/"  # "<component>/<statistic key>": the sites of several denoisers, planned as one set


def _plan_for_denoisers(
    models: Mapping[str, nn.Module],
    n_buckets: int,
    *,
    max_memory: int | str | None,
    keys: Sequence[str] | None,
    accumulate: str | None,
    flush_every: int,
    reserved_bytes: int,
) -> StatsMemoryPlan:
    """``plan_for_model`` over the sites of several denoisers at once (keys "<component>/<key>")."""
    sites = []
    for name, model in models.items():
        own = [(s.key, s.shape) for s in adapter_for(model).stat_sites(model)]
        if keys is not None:
            unknown = set(keys) - {k for k, _ in own}
            if unknown:
                raise KeyError(f"statistics {sorted(unknown)[:3]} are not sites of {name}")
            own = [site for site in own if site[0] in set(keys)]
        sites += [(f"{name}{_NAME_SEP}{k}", shape) for k, shape in own]
    device = next(next(iter(models.values())).parameters()).device.type
    return plan_stats_memory(
        sites,
        n_buckets,
        max_memory=max_memory,
        device=device,
        accumulate=accumulate,
        flush_every=flush_every,
        reserved_bytes=reserved_bytes,
    )


def plan_for_model(
    denoiser: nn.Module,
    n_buckets: int,
    *,
    max_memory: int | str | None = "auto",
    keys: Sequence[str] | None = None,
    accumulate: str | None = None,
    flush_every: int = 16,
    reserved_bytes: int | None = None,
) -> StatsMemoryPlan:
    """The statistics memory plan (``slimdiff.core.memory``) for ``denoiser``'s sites on its device.
    ``reserved_bytes`` (for ``max_memory="auto"``): memory the limit must leave to the model; None
    counts the denoiser's own weights (pass ``pipeline_bytes(pipe)`` to count every component)."""
    sites = [(s.key, s.shape) for s in adapter_for(denoiser).stat_sites(denoiser)]
    if keys is not None:
        wanted = set(keys)
        unknown = wanted - {k for k, _ in sites}
        if unknown:
            raise KeyError(f"statistics {sorted(unknown)[:3]} are not sites of this model")
        sites = [s for s in sites if s[0] in wanted]
    device = next(denoiser.parameters()).device.type
    return plan_stats_memory(
        sites,
        n_buckets,
        max_memory=max_memory,
        device=device,
        accumulate=accumulate,
        flush_every=flush_every,
        reserved_bytes=module_bytes(denoiser) if reserved_bytes is None else reserved_bytes,
    )


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def pipeline_bytes(pipe) -> int:
    """Bytes of the weights of every torch component of a diffusers pipeline (denoiser, text
    encoders, VAE): what calibration's memory limit must leave to the model."""
    comps = getattr(pipe, "components", {}) or {}
    return sum(module_bytes(c) for c in comps.values() if isinstance(c, nn.Module))
