"""Per-sequence vs pooled QK logit error: does the error profile's independence model hold?

The QK error profile (``spectra.qk_error_curve``) evaluates the rewrite's logit error
E[(q M k^T)^2], M = I - T_q T_k^T, as tr(C_q M C_k M^T) / tr(C_q C_k) with C_q, C_k the query and
key second moments pooled over every calibration token: a query and a key are independent draws
from the pooled tokens. Attention pairs a query only with the keys of its own sequence (one sample
of the batch at one denoiser call), so what the rewrite really loses is

    e_seq = sum_s tr(C_q^s M C_k^s M^T) / sum_s tr(C_q^s C_k^s)      (C^s: sequence s's moments)

and the pooled value differs from it by the covariation of q and k moments across sequences:
with S sequences of equal token counts, numerator_seq - numerator_pooled =
(1/S) sum_s tr(M (C_k^s - C_k) M^T (C_q^s - C_q)) (and the same with M = I for the energy).
Within one sequence the pair mean is exact: the mean of (q_i M k_j^T)^2 over all (i, j) pairs
is tr(C_q^s M C_k^s M^T) (``linalg.qk_logit_error``), which the script also checks against
explicit logits.

Protocol: the committed toy UNet (28 QK units: self-attention attn1, image queries and keys;
cross-attention attn2, image queries and the text keys of the same sample) runs its own sampler
over training captions spread evenly over the set (``--first``: the first ones) with guidance
(both branches in one batch: every sample of every denoiser call is a sequence); hooks on to_q / to_k record the raw tokens, reduced per sequence to
float64 per-head second moments. The pooled moments are the token-weighted mean over all sequences
(what the collector's buckets hold, aggregated with uniform timestep weights). For r in
{d/4, d/2, 3d/4} the rewrite is ``linalg.qk_whitened_svd`` of the pooled moments (damping from
params.yaml), as ``compress_`` builds it. Reported per unit and rank:

* ``predicted``: ``spectra.qk_error_curve`` of the pooled moments (the profile the allocation uses);
* ``pooled``: tr(C_q M C_k M^T) / tr(C_q C_k) from the rewrite's T's (the mean over all query-key
  pairs across sequences; a self-check: equals ``predicted`` to rounding);
* ``sequence``: e_seq above, the truth;
* corrected predictors (same formula, moments pooled within groups, groups weighted by their
  sequence counts): ``bucket`` (the collector's ``calibration.n_buckets`` timestep buckets,
  statistics the library already keeps), ``step`` (one bucket per sampler step, the finest the
  collector can hold), ``step+branch`` (per step and guidance branch: needs the collector to keep
  the two classifier-free-guidance halves apart) and ``sample`` (per prompt and branch over all
  steps: exact for cross-attention, whose keys are the same text tokens at every step).

The toy MMDiT's QK units are all under per-head q/k RMSNorms: their rewrite is coordinate selection
with a per-token renormalisation, not the whitening-SVD, and the profile
(``spectra.qk_select_error_curve``) has Gaussian approximations of its own
(``benchmarks/qk_select_error.py``). With ``--mmdit`` they are measured too: the selection of the
pooled normalised moments (``linalg.rms_coordinate_selection``, norms rebuilt as
``compress._rms_select`` does) and the error logit written as a bilinear form of augmented tokens
[compressed normalised, normalised] for queries and [compressed normalised, -normalised] for keys,
so the same per-sequence / pooled moment algebra applies exactly; ``pooled`` then is the measured
all-pairs error (not equal to ``predicted``), and the sequence effect is ``sequence / pooled``.

    python benchmarks/qk_sequence_error.py [--mmdit] [--write]   (CPU, ~1 min, < 2.5 GiB)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from slimdiff.core import linalg
from slimdiff.planning.spectra import qk_error_curve, qk_select_error_curve

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64
RANK_FRACTIONS = (0.25, 0.5, 0.75)
PREDICTORS = ("predicted", "bucket", "step", "step+branch", "sample")
#: the norm each q/k linear's output goes through (diffusers JointAttnProcessor2_0)
NORM_OF = {"to_q": "norm_q", "add_q_proj": "norm_added_q", "to_k": "norm_k", "add_k_proj": "norm_added_k"}


# --------------------------------------------------------------------------------------------
# Measurement functions (known-answer tests: tests/test_qk_sequence_error.py)
# --------------------------------------------------------------------------------------------
def sequence_moments(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(S, N, H*d) tokens of S sequences -> (S, H, d, d) float64 per-head second moments, each the
    mean over its sequence's N tokens."""
    s, n, width = x.shape
    x = x.to(F64).reshape(s, n, heads, width // heads)
    return torch.einsum("snhd,snhe->shde", x, x) / n


def bilinear_energy(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """sum_h tr(A_h B_h) of (..., H, d, d) moments: the mean square of a . b over independent
    (a, b) pairs with second moments A, B, summed over heads; shape (...)."""
    return (ca * cb.transpose(-1, -2)).sum((-3, -2, -1))


def logit_error(cq: torch.Tensor, ck: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_h tr(C_q,h M_h C_k,h M_h^T), sum_h tr(C_q,h C_k,h)) for (..., H, d, d) query and key
    moments and the (H, d, d) logit-error maps M_h = I - T_q,h T_k,h^T: the mean square logit error
    of the rewrite and the logit energy over independent (query, key) pairs."""
    return bilinear_energy(cq, m @ ck @ m.transpose(-1, -2)), bilinear_energy(cq, ck)


def pooled_moments(c: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(S, H, d, d) per-sequence means with (S,) token counts -> the token-weighted pooled mean."""
    w = tokens.to(F64)
    return torch.einsum("s,shde->hde", w, c) / w.sum()


def pair_errors(ca: torch.Tensor, cb: torch.Tensor, na: torch.Tensor, nb: torch.Tensor) -> dict[str, float]:
    """The mean square of a . b for per-sequence moments (S, H, d, d) of the two sides ``ca``,
    ``cb`` with (S,) token counts: ``sequence`` = the mean over sequences of the within-sequence
    pair mean, summed over heads (sum_s tr(A^s B^s) / S); ``pooled`` = the mean over all pairs
    across sequences, tr(A B) of the token-weighted pooled moments."""
    return {
        "sequence": float(bilinear_energy(ca, cb).mean()),
        "pooled": float(bilinear_energy(pooled_moments(ca, na), pooled_moments(cb, nb))),
    }


def relative_errors(
    cq: torch.Tensor, ck: torch.Tensor, m: torch.Tensor, nq: torch.Tensor, nk: torch.Tensor
) -> dict[str, float]:
    """Relative logit errors of the maps ``m`` (H, d, d) for per-sequence moments ``cq``, ``ck``
    (S, H, d, d) with (S,) token counts: ``sequence`` = sum_s err_s / sum_s energy_s (every
    sequence weighs the same: the mean over sequences of the within-sequence mean square error
    over the mean within-sequence logit energy), ``pooled`` = err / energy of the pooled moments
    (all query-key pairs across sequences)."""
    err_s, en_s = logit_error(cq, ck, m)
    err_p, en_p = logit_error(pooled_moments(cq, nq), pooled_moments(ck, nk), m)
    return {"sequence": float(err_s.sum() / en_s.sum()), "pooled": float(err_p / en_p)}


def grouped_pair_error(
    ca: torch.Tensor,
    cb: torch.Tensor,
    ea: torch.Tensor,
    eb: torch.Tensor,
    groups: Sequence,
    na: torch.Tensor,
    nb: torch.Tensor,
) -> float:
    """A predictor from moments pooled within groups of sequences (e.g. timestep buckets):
    sum_g S_g tr(A^g B^g) / sum_g S_g tr(E_a^g E_b^g), with S_g the group's sequence count, A^g,
    B^g the group's pooled moments of the error sides ``ca``, ``cb`` and E_a^g, E_b^g those of the
    energy sides ``ea``, ``eb`` (all (S, H, d, d) per sequence; (S,) token counts ``na``, ``nb``).
    One group: the pooled relative error; one group per sequence: the per-sequence one."""
    err = en = 0.0
    for g in dict.fromkeys(groups):
        idx = torch.tensor([i for i, x in enumerate(groups) if x == g])
        err += len(idx) * float(
            bilinear_energy(pooled_moments(ca[idx], na[idx]), pooled_moments(cb[idx], nb[idx]))
        )
        en += len(idx) * float(
            bilinear_energy(pooled_moments(ea[idx], na[idx]), pooled_moments(eb[idx], nb[idx]))
        )
    return err / en


def grouped_error(
    cq: torch.Tensor,
    ck: torch.Tensor,
    m: torch.Tensor,
    groups: Sequence,
    nq: torch.Tensor,
    nk: torch.Tensor,
) -> float:
    """``grouped_pair_error`` of the logit error of the maps ``m`` (H, d, d): tr(C_q M C_k M^T) is
    tr(A B) with A = C_q, B = M C_k M^T (linear in C_k, so pooling commutes with it)."""
    return grouped_pair_error(cq, m @ ck @ m.transpose(-1, -2), cq, ck, groups, nq, nk)


def direct_error(q: torch.Tensor, k: torch.Tensor, m: torch.Tensor) -> tuple[float, float]:
    """Explicit logits: (mean over all (query, key) pairs of sum_h (q_h M_h k_h^T)^2, the same of
    (q_h k_h^T)^2) for tokens q (Nq, H, d), k (Nk, H, d) and maps m (H, d, d)."""
    q, k, m = q.to(F64), k.to(F64), m.to(F64)
    err = en = 0.0
    for h in range(q.shape[1]):
        logits = q[:, h] @ k[:, h].T
        err += float((q[:, h] @ m[h] @ k[:, h].T).square().mean())
        en += float(logits.square().mean())
    return err, en


def rewrite_maps(cq: torch.Tensor, ck: torch.Tensor, rank: int, damping: float) -> torch.Tensor:
    """(H, d, d) logit-error maps I - T_q T_k^T of the whitening-SVD rewrite that ``compress_``
    builds at ``rank`` from the pooled (H, d, d) moments."""
    maps = []
    for h in range(cq.shape[0]):
        res = linalg.qk_whitened_svd(cq[h], ck[h], rank, damping)
        maps.append(torch.eye(cq.shape[-1], dtype=F64) - res.t_q @ res.t_k.T)
    return torch.stack(maps)


def rms(x: torch.Tensor, g: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim with gains ``g`` and ``eps`` (a float or per token, broadcast)."""
    return g * x / (x.square().mean(-1, keepdim=True) + eps).sqrt()


def selected(x: torch.Tensor, g: torch.Tensor, eps, keep: torch.Tensor, c: float) -> torch.Tensor:
    """The compressed normalised tokens of coordinate selection (one head): the kept coordinates
    ``keep`` of the raw tokens ``x`` (..., d) through the rebuilt norm, gains g_S / sqrt(c) and
    eps / c, as ``compress._rms_select`` builds it (c = ``linalg.rms_norm_correction``)."""
    return rms(x[..., keep], g[..., keep] / math.sqrt(c), eps / c)


def augmented(slim: torch.Tensor, normed: torch.Tensor, sign: float) -> torch.Tensor:
    """[slim, sign * normed] along the last dim: with sign +1 for queries and -1 for keys, the dot
    product of a query's and a key's augmented tokens is the error logit slim_q . slim_k - n_q . n_k,
    so the selection's logit error is a bilinear form and ``pair_errors`` applies exactly."""
    return torch.cat([slim, sign * normed], dim=-1)


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------
def capture(pipe, model, units, captions, steps: int, guidance: float, seed: int):
    """{(unit, 'q' | 'k', linear path): [(B, N, width) float32 per denoiser call]}: raw outputs of
    every q / k linear the unit's layout names, in call order; and the number of denoiser calls."""
    rec: dict[tuple[str, str, str], list[tuple[int, torch.Tensor]]] = {}
    calls = [0]
    hooks = [model.register_forward_pre_hook(lambda mod, args: calls.__setitem__(0, calls[0] + 1))]
    for name, unit in units.items():
        lay = unit.layout
        for role, paths in (("q", lay.query), ("k", lay.key)):
            for path in paths:

                def hook(mod, args, out, key=(name, role, path)):
                    rec.setdefault(key, []).append((calls[0] - 1, out.detach().float().clone()))

                hooks.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            pipe(
                captions,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            )
    finally:
        for h in hooks:
            h.remove()
    for key, items in rec.items():
        if [c for c, _ in items] != list(range(calls[0])):
            raise RuntimeError(f"{key}: expected one call of the linear per denoiser call")
    return {key: [x for _, x in items] for key, items in rec.items()}, calls[0]


def sequence_labels(calls: int, batch: int, steps: int, n_buckets: int) -> list[dict]:
    """One label per sequence, in (call, sample) order: step, bucket, guidance branch (the first
    half of every batch is the unconditional one), prompt."""
    from slimdiff.calibration.collect import bucket_of_step

    if calls != steps:
        raise RuntimeError(f"{calls} denoiser calls for {steps} steps: expected one call per step")
    half = batch // 2
    return [
        {"step": c, "bucket": bucket_of_step(c, steps, n_buckets), "branch": b // half, "prompt": b % half}
        for c in range(calls)
        for b in range(batch)
    ]


def stacked(tokens, unit: str, role: str, paths) -> torch.Tensor:
    """(S, N, width): every call's (B, N_p, width) outputs of ``paths`` joined along the tokens
    (a joint attention's streams form one sequence), calls after each other."""
    per_call = zip(*(tokens[(unit, role, p)] for p in paths), strict=True)
    return torch.cat([torch.cat(parts, dim=1) for parts in per_call])


def groupings(labels: list[dict]) -> dict[str, list]:
    """The corrected predictors' groups of sequences: the collector's timestep buckets, sampler
    steps, steps and guidance branches, samples (prompt and branch, over all steps)."""
    return {
        "bucket": [lab["bucket"] for lab in labels],
        "step": [lab["step"] for lab in labels],
        "step+branch": [(lab["step"], lab["branch"]) for lab in labels],
        "sample": [(lab["prompt"], lab["branch"]) for lab in labels],
    }


# --------------------------------------------------------------------------------------------
# Analyses
# --------------------------------------------------------------------------------------------
def analyse_whitened(tokens, unit, labels, damping: float) -> dict:
    """Predicted / pooled / per-sequence / corrected errors of one non-normed QK unit."""
    lay = unit.layout
    heads, d = lay.heads, lay.head_dim
    xq, xk = stacked(tokens, unit.name, "q", lay.query), stacked(tokens, unit.name, "k", lay.key)
    cq_s, ck_s = sequence_moments(xq, heads), sequence_moments(xk, heads)
    s = cq_s.shape[0]
    nq, nk = torch.full((s,), xq.shape[1]), torch.full((s,), xk.shape[1])
    cq, ck = pooled_moments(cq_s, nq), pooled_moments(ck_s, nk)
    curve = qk_error_curve(cq, ck, damping)
    groups = groupings(labels)
    # the direct-logit check: the first and the last sequence (first step's unconditional sample,
    # last step's conditional one), each alone and pooled together
    pick = [0, s - 1]
    ranks, check = {}, 0.0
    for f in RANK_FRACTIONS:
        r = int(f * d)
        m = rewrite_maps(cq, ck, r, damping)
        row = {"predicted": curve[r], **relative_errors(cq_s, ck_s, m, nq, nk)}
        for g, lab in groups.items():
            row[g] = grouped_error(cq_s, ck_s, m, lab, nq, nk)
        for i in pick:
            q, k = xq[i].view(-1, heads, d), xk[i].view(-1, heads, d)
            e, n = direct_error(q, k, m)
            e2, n2 = logit_error(cq_s[i], ck_s[i], m)
            check = max(check, abs(e - float(e2)) / float(e2), abs(n - float(n2)) / float(n2))
        q2 = torch.cat([xq[i] for i in pick]).view(-1, heads, d)
        k2 = torch.cat([xk[i] for i in pick]).view(-1, heads, d)
        e, n = direct_error(q2, k2, m)
        e2, n2 = logit_error(pooled_moments(cq_s[pick], nq[pick]), pooled_moments(ck_s[pick], nk[pick]), m)
        check = max(check, abs(e - float(e2)) / float(e2), abs(n - float(n2)) / float(n2))
        ranks[str(r)] = row
    energy = pair_errors(cq_s, ck_s, nq, nk)  # logit energy per sequence vs pooled
    return {
        # BasicTransformerBlock: attn1 is self-attention, attn2 attends to the text tokens
        "kind": "cross" if unit.attn == "attn2" else "self",
        "tokens": [int(xq.shape[1]), int(xk.shape[1])],
        "sequences": s,
        "energy_sequence_over_pooled": energy["sequence"] / energy["pooled"],
        "direct_check": check,
        "ranks": ranks,
    }


def normed_streams(model, tokens, unit, role: str, paths, heads: int, d: int):
    """(S, N, H, d) raw tokens of one role, streams joined, with per-token gains (N, d) and eps
    (N, 1) of each stream's own norm."""
    xs, gains, epss = [], [], []
    for path in paths:
        module, lin = path.rsplit(".", 1)
        norm = model.get_submodule(f"{module}.{NORM_OF[lin]}")
        x = torch.cat(tokens[(unit, role, path)]).to(F64)
        x = x.view(x.shape[0], x.shape[1], heads, d)
        w = norm.weight.detach().to(F64) if norm.weight is not None else torch.ones(d, dtype=F64)
        xs.append(x)
        gains.append(w.expand(x.shape[1], d))
        epss.append(torch.full((x.shape[1], 1), float(norm.eps), dtype=F64))
    return torch.cat(xs, dim=1), torch.cat(gains), torch.cat(epss)


def analyse_selection(model, tokens, unit, labels) -> dict:
    """Predicted (the library's profile) / pooled-measured / per-sequence errors of one QK unit
    under per-head RMSNorms (coordinate selection)."""
    lay = unit.layout
    heads, d = lay.heads, lay.head_dim
    if lay.rope or lay.norms_across_heads:
        raise NotImplementedError(f"{unit.name}: RoPE or norms across heads are not handled here")
    xq, gq, eq = normed_streams(model, tokens, unit.name, "q", lay.query, heads, d)
    xk, gk, ek = normed_streams(model, tokens, unit.name, "k", lay.key, heads, d)
    s = xq.shape[0]
    nq, nk = torch.full((s,), xq.shape[1]), torch.full((s,), xk.shape[1])
    g_q, g_k = gq[:, None, :], gk[:, None, :]  # (N, 1, d) against (S, N, H, d)
    e_q, e_k = eq[:, None, :], ek[:, None, :]
    nrm_q, nrm_k = rms(xq, g_q, e_q), rms(xk, g_k, e_k)
    flat = lambda x: x.reshape(s, x.shape[1], -1)  # noqa: E731
    cq_s, ck_s = sequence_moments(flat(xq), heads), sequence_moments(flat(xk), heads)
    cqn_s, ckn_s = sequence_moments(flat(nrm_q), heads), sequence_moments(flat(nrm_k), heads)
    cq, ck = pooled_moments(cq_s, nq), pooled_moments(ck_s, nk)
    cqn, ckn = pooled_moments(cqn_s, nq), pooled_moments(ckn_s, nk)
    curve = qk_select_error_curve(cqn, ckn, None, cq, ck)
    energy = pair_errors(cqn_s, ckn_s, nq, nk)
    groups = groupings(labels)
    ranks = {}
    for f in RANK_FRACTIONS:
        r = int(f * d)
        aug_q, aug_k = [], []
        for h in range(heads):  # as compress._rms_select: selection and norm corrections per head
            sel = linalg.rms_coordinate_selection(cqn[h], ckn[h], r, cq[h], ck[h])
            keep = sel.keep
            c_q, c_k = linalg.rms_norm_correction(cq[h], keep), linalg.rms_norm_correction(ck[h], keep)
            aug_q.append(augmented(selected(xq[:, :, h], gq, eq, keep, c_q), nrm_q[:, :, h], 1.0))
            aug_k.append(augmented(selected(xk[:, :, h], gk, ek, keep, c_k), nrm_k[:, :, h], -1.0))
        ca_s = sequence_moments(flat(torch.stack(aug_q, 2)), heads)
        cb_s = sequence_moments(flat(torch.stack(aug_k, 2)), heads)
        err = pair_errors(ca_s, cb_s, nq, nk)
        row = {
            "predicted": curve[r],
            "sequence": err["sequence"] / energy["sequence"],
            "pooled": err["pooled"] / energy["pooled"],
        }
        for g, lab in groups.items():
            row[g] = grouped_pair_error(ca_s, cb_s, cqn_s, ckn_s, lab, nq, nk)
        ranks[str(r)] = row
    return {
        "kind": "joint" if len(lay.key) > 1 else "self",
        "tokens": [int(xq.shape[1]), int(xk.shape[1])],
        "sequences": s,
        "energy_sequence_over_pooled": energy["sequence"] / energy["pooled"],
        "ranks": ranks,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def ratios(results: dict, key: str, ref: str = "sequence", kind: str | None = None, rank=None) -> list[float]:
    """``ref`` / ``key`` over the (unit, rank) points (of one unit kind, one rank fraction)."""
    out = []
    for res in results.values():
        if kind is not None and res["kind"] != kind:
            continue
        items = list(res["ranks"].values())
        if rank is not None:
            items = [items[rank]]
        out += [p[ref] / p[key] for p in items]
    return out


def spread(xs: list[float]) -> dict:
    """min / median / max, the geometric mean (the typical factor, with its direction) and the
    point farthest from 1 (the worst factor)."""
    logs = [math.log(x) for x in xs]
    worst = max(xs, key=lambda x: abs(math.log(x)))
    return {
        "min": min(xs),
        "median": statistics.median(xs),
        "max": max(xs),
        "geomean": math.exp(statistics.fmean(logs)),
        "typical_abs_factor": math.exp(statistics.fmean(abs(x) for x in logs)),
        "worst": worst,
        "within_10pct": sum(abs(x) <= math.log(1.1) for x in logs),
        "points": len(xs),
    }


def model_summary(results: dict, keys: Sequence[str]) -> dict:
    kinds = sorted({r["kind"] for r in results.values()})
    out = {}
    for key in keys:
        out[key] = {"all": spread(ratios(results, key))}
        for kind in kinds:
            out[key][kind] = spread(ratios(results, key, kind=kind))
            for i, f in enumerate(RANK_FRACTIONS):
                out[key][f"{kind}@{f:g}d"] = spread(ratios(results, key, kind=kind, rank=i))
    return out


def worst_point(results: dict, key: str) -> tuple[str, str, float]:
    """(unit, rank, sequence / key) of the point farthest from 1."""
    pts = [(n, r, p["sequence"] / p[key]) for n, res in results.items() for r, p in res["ranks"].items()]
    return max(pts, key=lambda t: abs(math.log(t[2])))


def fmt(sp: dict) -> str:
    return f"{sp['min']:.2f} / {sp['median']:.2f} / {sp['max']:.2f}"


def report(models: dict, meta: dict) -> str:
    lines = [
        "# QK logit error per sequence vs the pooled prediction (toy UNet"
        + (", toy MMDiT)" if "toy-mmdit" in models else ")"),
        "",
        f"`{meta['command'].strip()}`: {meta['captions']} training captions ("
        + (
            "the first ones"
            if meta["caption_choice"] == "first"
            else "evenly spread over the 500: one and two objects, all colours and shapes"
        )
        + f"), {meta['steps']} steps, "
        f"guidance {meta['guidance']}, seed {meta['seed']}; every sample of every denoiser call is one "
        f"sequence ({meta['steps']} calls x {2 * meta['captions']} samples = "
        f"{meta['steps'] * 2 * meta['captions']} sequences: both guidance branches). It took "
        f"{meta['seconds']:.0f} s on this machine (2 shared cores, one thread, niced).",
        "",
        "Protocol: hooks on every QK unit's q / k linears record the raw tokens; per sequence they give "
        "float64 per-head second moments C_q^s, C_k^s, and the pooled C_q, C_k are their token-weighted "
        "mean (the collector's statistics under uniform timestep weights). At r = d/4, d/2, 3d/4 the "
        f"rewrite is built from the pooled moments as `compress_` builds it (damping {meta['damping']}). "
        "Errors are relative logit errors summed over heads:",
        "",
        "* predicted: the library's error profile of the pooled moments (`qk_error_curve`; for the "
        "MMDiT's normed QKs `qk_select_error_curve`);",
        "* pooled: the measured mean over all query-key pairs across sequences, tr(C_q M C_k M^T) / "
        "tr(C_q C_k) (whitening-SVD: equals predicted to rounding, a self-check);",
        "* sequence: the truth, attention's own pairs only: sum_s tr(C_q^s M C_k^s M^T) / "
        "sum_s tr(C_q^s C_k^s);",
        f"* bucket / step / step+branch / sample: corrected predictors, the same formula with moments "
        f"pooled within groups of sequences, groups weighted by their sequence counts: the collector's "
        f"{meta['n_buckets']} timestep buckets (statistics the library already keeps), each sampler step "
        "(the collector at n_buckets = steps), each step and guidance branch (needs the collector to "
        "keep the guidance halves apart), each sample over all steps (prompt and branch: per-prompt "
        "statistics; exact for cross-attention, whose keys are the prompt's text tokens at every step).",
        "",
    ]
    for model_name, block in models.items():
        results, summ = block["units"], block["summary"]
        kinds = sorted({r["kind"] for r in results.values()})
        lines += [f"## {model_name}", ""]
        if model_name == "toy-mmdit":
            lines += [
                "All QK units of the toy MMDiT are under per-head q/k RMSNorms: coordinate selection, "
                "not the whitening-SVD. Here predicted (the library's profile, with its Gaussian "
                "renormalisation model) and pooled (measured over all pairs) differ by that model's own "
                "error (`qk_select_error.md`); the sequence effect is sequence / pooled.",
                "",
            ]
        lines += [
            "Sequence (truth) over each predictor, over the (unit, rank) points: min / median / max, the "
            "geometric mean (direction: < 1 means the predictor overstates the error) and the worst "
            "point:",
            "",
            "| units | points | sequence / predicted | geo mean | worst | sequence / pooled | "
            + " | ".join(f"sequence / {k}" for k in PREDICTORS[1:])
            + " |",
            "|---|---:|---:|---:|---:|---:|" + "---:|" * (len(PREDICTORS) - 1),
        ]
        rows = [("all", "all")] + [(k, k) for k in kinds]
        rows += [(f"{k}@{f:g}d", f"{k}, r = {f:g} d") for k in kinds for f in RANK_FRACTIONS]
        for key, label in rows:
            p = summ["predicted"][key]
            cells = [fmt(summ["pooled"][key])] + [
                f"{fmt(summ[k][key])} ({summ[k][key]['geomean']:.2f})" for k in PREDICTORS[1:]
            ]
            lines.append(
                f"| {label} | {p['points']} | {fmt(p)} | {p['geomean']:.2f} | {p['worst']:.2f} | "
                + " | ".join(cells)
                + " |"
            )
        en = [r["energy_sequence_over_pooled"] for r in results.values()]
        ref = "pooled" if model_name == "toy-mmdit" else "predicted"
        name, r, x = worst_point(results, ref)
        agg = summ[ref]["all"]
        lines += [
            "",
            f"Aggregate (sequence / {ref}): geometric mean {agg['geomean']:.3f}, typical factor "
            f"{agg['typical_abs_factor']:.3f} (exp of the mean |log|), worst {x:.2f} ({name}, r = {r}); "
            f"{agg['within_10pct']} of {agg['points']} points within 10%. With the collector's bucket "
            f"moments: worst {summ['bucket']['all']['worst']:.2f}, typical factor "
            f"{summ['bucket']['all']['typical_abs_factor']:.3f}.",
            f"Logit energy, per-sequence over pooled (sum_s tr(C_q^s C_k^s) / (S tr(C_q C_k))): "
            f"{min(en):.2f} to {max(en):.2f} over the units.",
        ]
        if "direct_check" in next(iter(results.values())):
            lines.append(
                "Self-checks: |pooled / predicted - 1| at most "
                f"{block['self_check_pooled']:.1e}; explicit logits of two sequences (each alone and "
                f"pooled together) against the moment formula: at most {block['self_check_direct']:.1e} "
                "relative."
            )
        lines += [
            "",
            "Per unit (relative errors):",
            "",
            "| unit | kind | tokens q, k | rank | predicted | pooled | sequence | bucket | step | step+branch "
            "| sample | sequence / predicted |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, res in results.items():
            for r, p in res["ranks"].items():
                cells = " | ".join(
                    f"{p[k]:.4g}" for k in ("predicted", "pooled", "sequence", *PREDICTORS[1:])
                )
                lines.append(
                    f"| {name} | {res['kind']} | {res['tokens'][0]}, {res['tokens'][1]} | {r} | {cells} | "
                    f"{p['sequence'] / p['predicted']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=8)
    ap.add_argument("--first", action="store_true", help="the first captions, not spread over the set")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mmdit", action="store_true", help="also the toy MMDiT's normed QK units")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from slimdiff.config import load_params
    from slimdiff.families.base import denoiser_of
    from slimdiff.families.units import compression_units
    from slimdiff.formats.models import load_pipeline
    from slimdiff.toy.data import train_captions

    params = load_params(ROOT / "params.yaml")
    damping, n_buckets = params.compression.damping, params.calibration.n_buckets
    t0 = time.perf_counter()
    pool = train_captions()
    # spread over the training set (it is ordered: the first captions differ only in position)
    captions = pool[: args.captions] if args.first else pool[:: len(pool) // args.captions][: args.captions]
    models = {}
    for source in ("toy", "toy-mmdit") if args.mmdit else ("toy",):
        pipe = load_pipeline(source)
        model = denoiser_of(pipe).eval()
        units = {n: u for n, u in compression_units(model).items() if u.kind == "qk"}
        tokens, calls = capture(pipe, model, units, captions, args.steps, args.guidance, args.seed)
        batch = next(iter(tokens.values()))[0].shape[0]
        labels = sequence_labels(calls, batch, args.steps, n_buckets)
        results = {}
        for name, unit in units.items():
            if unit.layout.qk_norm:
                res = analyse_selection(model, tokens, unit, labels)
            else:
                res = analyse_whitened(tokens, unit, labels, damping)
            results[name] = res
            print(
                name,
                res["kind"],
                {r: round(p["sequence"] / p["predicted"], 3) for r, p in res["ranks"].items()},
                flush=True,
            )
            for key in [k for k in tokens if k[0] == name]:
                del tokens[key]
        block = {
            "units": results,
            "summary": model_summary(results, (*PREDICTORS[:1], "pooled", *PREDICTORS[1:])),
        }
        if not any(u.layout.qk_norm for u in units.values()):
            block["self_check_pooled"] = max(
                abs(p["pooled"] / p["predicted"] - 1) for r in results.values() for p in r["ranks"].values()
            )
            block["self_check_direct"] = max(r["direct_check"] for r in results.values())
        models[source] = block
        del pipe, model, tokens
    meta = {
        "command": "python benchmarks/qk_sequence_error.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "captions": args.captions,
        "caption_choice": "first" if args.first else "spread",
        "caption_texts": captions,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "damping": damping,
        "n_buckets": n_buckets,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = report(models, meta)
    print(text)
    if args.write:
        out = ROOT / "benchmarks" / "results"
        (out / "qk_sequence_error.md").write_text(text)
        payload = {"meta": meta, "models": models}
        (out / "qk_sequence_error.json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
