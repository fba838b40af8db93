"""Predicted vs measured logit error of QK coordinate selection under per-head RMSNorms (toy MMDiT).

The ``select`` rewrite (docs/METHOD.md, MMDiT) keeps r coordinates of each head and renormalises
them with a mean correction, so a token's kept normalised coordinates are n_S(x) s(x) with
s = sqrt(rho_bar / rho(x)), and the compressed logit is s(q) s(k) l_S for an original
l = l_S + l_D. The error e = (s_q s_k - 1) l_S - l_D has mean square

    E[e^2] = E[l_D^2] + E[(s_q s_k - 1)^2 l_S^2] - 2 E[(s_q s_k - 1) l_S l_D]
           =  dropped  +        renorm             +          cross

The old profile predicted only ``dropped`` (1_D^T M 1_D); the new one adds K(S) V(S)
(``linalg.renormalisation_term``: K = 1_S^T M 1_S, V from the kept-share-weighted moments of s
under a zero-mean Gaussian with the raw second moment; under RoPE the Gaussian also has the raw
tokens' mean, a first-moment statistic calibration records there). This script runs the committed toy MMDiT
(4 training captions, 10 steps, guidance 4.0), records the raw q and k tokens of every normed
attention (both streams; the last block's unused text queries are skipped), pools each QK unit's
tokens over its streams (each normalised by its own stream's norm), subsamples 2000 queries and
2000 keys, computes the raw and normalised per-head second moments from exactly those tokens, and
for r in {d/4, d/2, 3d/4} builds the selection and the corrected norms as ``compress._rms_select``
does. Measured: the mean square logit error over all 2000 x 2000 (query, key) pairs (independent
draws, the prediction's expectation), summed over heads, over the logit energy; with its three
terms. Columns besides old and new prediction (diagnostics, not used by the library):

* ``new-mean``: the new model under a Gaussian with the tokens' mean (what the library does under
  RoPE; measured here to decide it does not without);
* ``kv-unweighted``: K(S) times V from the *unweighted* moments of s (E[s], E[s^2]), Gaussian;
* ``new-emp``: the new model with the kept-share moments taken from the tokens themselves instead of
  the Gaussian (separates the Gaussian assumption from the other neglected parts).

    python benchmarks/qk_select_error.py [--write]   (CPU, ~3 min, < 2 GiB)

``--world toy-flux`` measures the same on the committed toy FLUX, where the QKs are cut by
RoPE-aware pair selection (``linalg.rope_pair_selection``: whole rotary pairs, the rotation after
the norms). Every recorded token keeps its position, the measured logits rotate queries and keys
by their own angles (the kept pairs by theirs), and the error is the mean over all (query, key)
pairs of the subsample, as the prediction's expectation over token pairs is. Predictions: ``new``
is the library's profile (the rotary phase moments of the sequence the statistics came from,
``rope_sequence``, and a Gaussian with the raw tokens' mean); ``old`` its dropped energy alone;
``new-emp`` its renormalisation term with the tokens' own kept shares; ``old-default`` /
``zero-mean-default`` what the library predicted before it read the sequence and the means (the
model's default serving shape, 512 text tokens, and a zero-mean Gaussian), each compared with the
error of its own selection. Writes ``qk_select_error_flux.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from slimdiff.core import linalg

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64
#: the norm each q/k linear's output goes through (diffusers JointAttnProcessor2_0)
NORM_OF = {"to_q": "norm_q", "add_q_proj": "norm_added_q", "to_k": "norm_k", "add_k_proj": "norm_added_k"}
RANK_FRACTIONS = (0.25, 0.5, 0.75)
TERMS = ("dropped", "renorm", "cross")
PREDICTIONS = ("old", "new", "new-mean", "kv-unweighted", "new-emp")


def pixel_size(pipe, model) -> dict:
    """height / width of the model's sample size, as calibration runs it (FluxPipeline's own
    default is 1024 px whatever the model)."""
    from slimdiff.families import adapter_for

    h, w = adapter_for(model).sample_size(model)
    scale = getattr(pipe, "vae_scale_factor", 8)
    return {"height": h * scale, "width": w * scale}


def capture(pipe, model, units, captions, steps: int, guidance: float, seed: int):
    """{(unit, 'q' | 'k', linear path): (tokens, d_model) float32}: raw outputs of every q / k
    linear the unit's layout names (``lay.query`` excludes the unused text queries), and
    {same key: (tokens,) int64}: each token's index in its stream (for the rotary angles)."""
    from slimdiff.families.units import pipeline_call_kwargs

    rec: dict[tuple[str, str, str], list[torch.Tensor]] = {}
    pos: dict[tuple[str, str, str], list[torch.Tensor]] = {}
    hooks = []
    for name, unit in units.items():
        lay = unit.layout
        for role, paths in (("q", lay.query), ("k", lay.key)):
            for path in paths:

                def hook(mod, args, out, key=(name, role, path)):
                    rec.setdefault(key, []).append(out.detach().reshape(-1, out.shape[-1]).float().clone())
                    pos.setdefault(key, []).append(torch.arange(out.shape[-2]).repeat(out.shape[0]))

                hooks.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            pipe(
                captions,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed),
                **pixel_size(pipe, model),
                **pipeline_call_kwargs(pipe, guidance, len(captions)),
            )
    finally:
        for h in hooks:
            h.remove()
    return {key: torch.cat(v) for key, v in rec.items()}, {key: torch.cat(v) for key, v in pos.items()}


def pooled(
    model, tokens, unit: str, role: str, heads: int, d: int, cap: int, gen: torch.Generator, rope=None
):
    """(N, H, d) raw tokens of one role pooled over the streams, with each token's norm gains
    (N, d) and eps (N,); a uniform subsample of at most ``cap`` tokens. With ``rope`` =
    (positions, offset(path), table): also each token's rotary angles (N, d / 2), table[offset +
    index in its stream], else None."""
    xs, gains, epss, angles = [], [], [], []
    for (u, r, path), x in sorted(tokens.items()):
        if u != unit or r != role:
            continue
        module, lin = path.rsplit(".", 1)
        norm = model.get_submodule(f"{module}.{NORM_OF[lin]}")
        x = x.to(F64).view(-1, heads, d)
        w = norm.weight.detach().to(F64) if norm.weight is not None else torch.ones(d, dtype=F64)
        xs.append(x)
        gains.append(w.expand(x.shape[0], d))
        epss.append(torch.full((x.shape[0],), float(norm.eps), dtype=F64))
        if rope is not None:
            positions, offset, table = rope
            angles.append(table[offset(path) + positions[(u, r, path)]])
    x, g, e = torch.cat(xs), torch.cat(gains), torch.cat(epss)
    idx = torch.randperm(x.shape[0], generator=gen)[:cap]
    return x[idx], g[idx], e[idx], (torch.cat(angles)[idx] if rope is not None else None)


def rotate(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """RoPE as diffusers' FLUX applies it: coordinate pairs (2i, 2i+1) of x (N, d') rotated by the
    angles a (N, d' / 2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a.cos() * x0 - a.sin() * x1
    out[..., 1::2] = a.sin() * x0 + a.cos() * x1
    return out


def rms(x: torch.Tensor, g: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim with per-token gains (N, d) and eps (N,)."""
    return g * x / (x.square().mean(-1, keepdim=True) + eps[:, None]).sqrt()


def unweighted_v(cq, ck, kept_order, r: int) -> float:
    """V = E[s_q^2] E[s_k^2] - 2 E[s_q] E[s_k] + 1 with the unweighted moments of s (Gaussian, the
    same draws as ``linalg.kept_share_moments``)."""
    out = []
    for cov, seed in ((cq, linalg.RENORM_SEED), (ck, linalg.RENORM_SEED + 1)):
        c = 0.5 * (cov + cov.T)
        root, info = torch.linalg.cholesky_ex(c)
        if int(info) != 0:
            evals, evecs = torch.linalg.eigh(c)
            root = evecs * evals.clamp_min(0).sqrt()
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(linalg.RENORM_SAMPLES, c.shape[0], generator=gen, dtype=F64) @ root.T
        x2 = x[:, kept_order].square()
        rho = x2[:, :r].sum(1) / x2.sum(1)
        diag = torch.diagonal(c)[kept_order]
        s = (float(diag[:r].sum() / diag.sum()) / rho).sqrt()
        out.append((float(s.mean()), float(s.square().mean())))
    (q1, q2), (k1, k2) = out
    return q2 * k2 - 2 * q1 * k1 + 1


def empirical_v(xq, xk, cq, ck, kept_order, r: int) -> float:
    """The new model's V with the kept-share moments of the tokens themselves."""
    mus = []
    for x, c in ((xq, cq), (xk, ck)):
        x2 = x[:, kept_order].square()
        rho = x2[:, :r].sum(1) / x2.sum(1)
        diag = torch.diagonal(c)[kept_order]
        rho_bar = float(diag[:r].sum() / diag.sum())
        mus.append((math.sqrt(rho_bar) * float(rho.sqrt().mean() / rho.mean()), rho_bar / float(rho.mean())))
    (q1, q2), (k1, k2) = mus
    return q2 * k2 - 2 * q1 * k1 + 1


def analyse_unit(model, tokens, name: str, heads: int, d: int, cap: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    xq, gq, eq, _ = pooled(model, tokens, name, "q", heads, d, cap, gen)
    xk, gk, ek, _ = pooled(model, tokens, name, "k", heads, d, cap, gen)
    ranks = [int(f * d) for f in RANK_FRACTIONS]
    acc = {r: dict.fromkeys(("measured", *TERMS, *PREDICTIONS), 0.0) for r in ranks}
    energy = 0.0
    for h in range(heads):
        q, k = xq[:, h], xk[:, h]
        nq, nk = rms(q, gq, eq), rms(k, gk, ek)
        cq, ck = q.T @ q / len(q), k.T @ k / len(k)  # the moments of exactly these tokens
        cqn, ckn = nq.T @ nq / len(q), nk.T @ nk / len(k)
        logits = nq @ nk.T
        energy += float(logits.square().mean())
        m = cqn * ckn
        for r in ranks:
            sel = linalg.rms_coordinate_selection(cqn, ckn, r, cq, ck)  # as compress._rms_select
            keep = sel.keep
            c_q, c_k = linalg.rms_norm_correction(cq, keep), linalg.rms_norm_correction(ck, keep)
            slim = (
                rms(q[:, keep], gq[:, keep] / math.sqrt(c_q), eq / c_q)
                @ rms(k[:, keep], gk[:, keep] / math.sqrt(c_k), ek / c_k).T
            )
            kept = nq[:, keep] @ nk[:, keep].T
            dropped = logits - kept
            a = acc[r]
            a["measured"] += float((slim - logits).square().mean())
            a["dropped"] += float(dropped.square().mean())
            a["renorm"] += float((slim - kept).square().mean())
            a["cross"] += float(-2.0 * ((slim - kept) * dropped).mean())
            a["old"] += float(sel.dropped[r])
            a["new"] += float(sel.errors[r])
            with_means = linalg.rms_coordinate_selection(cqn, ckn, r, cq, ck, q.mean(0), k.mean(0))
            a["new-mean"] += float(with_means.errors[r])
            kept_order = sel.drop_order.flip(0)
            k_energy = float(linalg.kept_energy_prefix(m, kept_order)[r])
            a["kv-unweighted"] += float(sel.dropped[r]) + k_energy * unweighted_v(cq, ck, kept_order, r)
            a["new-emp"] += float(sel.dropped[r]) + k_energy * empirical_v(q, k, cq, ck, kept_order, r)
    return {
        "tokens": [int(xq.shape[0]), int(xk.shape[0])],
        "energy": energy,
        "ranks": {str(r): {key: v / energy for key, v in acc[r].items()} for r in ranks},
    }


ROPE_PREDICTIONS = ("old-default", "zero-mean-default", "old", "new", "new-emp")


def measured_key(prediction: str) -> str:
    """The measurement a prediction is compared with: the "-default" predictions with the error of
    their own selection (made with the default-shape phase moments)."""
    return "measured-default" if prediction.endswith("-default") else "measured"


def analyse_rope_unit(
    model, tokens, name: str, heads: int, d: int, cap: int, seed: int, rope, phases
) -> dict:
    """``analyse_unit`` for a QK under RoPE: pair selection, rotated logits. ``phases``:
    {"default": (c, s) of the model's default serving shape, "sequence": of the measured sequence}.
    Each selection's error is measured with its own kept pairs; the terms are those of the
    library's selection (sequence phases)."""
    gen = torch.Generator().manual_seed(seed)
    xq, gq, eq, aq = pooled(model, tokens, name, "q", heads, d, cap, gen, rope)
    xk, gk, ek, ak = pooled(model, tokens, name, "k", heads, d, cap, gen, rope)
    ranks = [int(f * d) for f in RANK_FRACTIONS]
    acc = {r: dict.fromkeys(("measured", "measured-default", *TERMS, *ROPE_PREDICTIONS), 0.0) for r in ranks}
    energy = 0.0
    for h in range(heads):
        q, k = xq[:, h], xk[:, h]
        nq, nk = rms(q, gq, eq), rms(k, gk, ek)
        cq, ck = q.T @ q / len(q), k.T @ k / len(k)
        cqn, ckn = nq.T @ nq / len(q), nk.T @ nk / len(k)  # before the rotation, as recorded
        means = (q.mean(0), k.mean(0))  # the first-moment statistics of these tokens
        logits = rotate(nq, aq) @ rotate(nk, ak).T
        energy += float(logits.square().mean())
        for r in ranks:
            a = acc[r]
            for which, (c, sn) in phases.items():
                default = which == "default"
                # before: the default shape's phases and a zero-mean Gaussian; now: the
                # sequence's phases and the raw means
                sel = linalg.rope_pair_selection(
                    cqn, ckn, r, c, sn, cq, ck, *((None, None) if default else means)
                )
                keep, pairs = sel.keep, sel.keep[0::2] // 2
                c_q, c_k = linalg.rms_norm_correction(cq, keep), linalg.rms_norm_correction(ck, keep)
                slim = (
                    rotate(rms(q[:, keep], gq[:, keep] / math.sqrt(c_q), eq / c_q), aq[:, pairs])
                    @ rotate(rms(k[:, keep], gk[:, keep] / math.sqrt(c_k), ek / c_k), ak[:, pairs]).T
                )
                if default:
                    a["measured-default"] += float((slim - logits).square().mean())
                    a["old-default"] += float(sel.dropped[r])
                    a["zero-mean-default"] += float(sel.errors[r])
                    continue
                a["measured"] += float((slim - logits).square().mean())
                a["old"] += float(sel.dropped[r])
                a["new"] += float(sel.errors[r])
                kept = rotate(nq[:, keep], aq[:, pairs]) @ rotate(nk[:, keep], ak[:, pairs]).T
                dropped = logits - kept
                a["dropped"] += float(dropped.square().mean())
                a["renorm"] += float((slim - kept).square().mean())
                a["cross"] += float(-2.0 * ((slim - kept) * dropped).mean())
                # K(S) from the pair form, V from the kept shares of the tokens themselves
                k_energy = float(
                    linalg.kept_energy_prefix(linalg.rope_pair_error_matrix(cqn, ckn, c, sn), pairs)[-1]
                )
                kept_order = sel.drop_order.flip(0)
                a["new-emp"] += float(sel.dropped[r]) + k_energy * empirical_v(q, k, cq, ck, kept_order, r)
    return {
        "tokens": [int(xq.shape[0]), int(xk.shape[0])],
        "energy": energy,
        "ranks": {str(r): {key: v / energy for key, v in acc[r].items()} for r in ranks},
    }


def summarise(results: dict, d: int, predictions=PREDICTIONS) -> list[dict]:
    rows = []
    for f in RANK_FRACTIONS:
        r = str(int(f * d))
        per = [u["ranks"][r] for u in results.values()]
        row = {"rank": int(r), "fraction": f}
        for key in ("measured", *TERMS, *predictions):
            row[key] = statistics.fmean(p[key] for p in per)
        for key in predictions:
            ratios = [p[key] / p[measured_key(key)] for p in per]
            row[f"{key}_ratio"] = [min(ratios), statistics.median(ratios), max(ratios)]
        rows.append(row)
    return rows


def agreement(results: dict, predictions=PREDICTIONS) -> dict[str, dict]:
    out = {}
    for key in predictions:
        logs = [
            abs(math.log(p[key] / p[measured_key(key)]))
            for res in results.values()
            for p in res["ranks"].values()
        ]
        out[key] = {
            "typical_factor": math.exp(statistics.fmean(logs)),
            "largest_factor": math.exp(max(logs)),
            "within_1.5x": sum(x <= math.log(1.5) for x in logs),
            "points": len(logs),
        }
    return out


INTRO = {
    "toy-mmdit": (
        "# QK selection under RMSNorms: predicted vs measured logit error (toy MMDiT)",
        "both streams",
        "Predictions: old = dropped energy 1_D^T M 1_D alone, new = old + K(S) V(S) "
        "(kept-share-weighted moments of s under a zero-mean Gaussian with the raw second moment; "
        "the library's profile without RoPE), new-mean = the same Gaussian with the raw tokens' mean "
        "(what the library does under RoPE), kv-unweighted = new with unweighted moments E[s], "
        "E[s^2], new-emp = new with the kept shares of the tokens themselves instead of the Gaussian.",
    ),
    "toy-flux": (
        "# RoPE pair selection under RMSNorms: predicted vs measured logit error (toy FLUX)",
        "the streams (double blocks: text and image; single blocks: the joint sequence), each token "
        "rotated by its own position's angles",
        "Predictions (pair form M with the rotary phase moments c, s): new = 1_D^T M 1_D + K(S) V(S), "
        "the library's profile (the phase moments of the sequence the statistics came from; V from a "
        "Gaussian with the raw tokens' mean and second moment), old = its dropped energy 1_D^T M 1_D "
        "alone, new-emp = new with the kept shares of the tokens themselves; old-default / "
        "zero-mean-default = the profile before the library read the sequence and the means (phase "
        "moments of the model's default serving shape, 512 text tokens; a zero-mean Gaussian), "
        "compared with the measured error of its own selection (measured-default).",
    ),
}


def report(results: dict, rows: list[dict], meta: dict, predictions=PREDICTIONS) -> str:
    d = meta["head_dim"]
    title, pooled_over, preds_text = INTRO[meta["world"]]
    script = "python benchmarks/qk_select_error.py" + (
        f" --world {meta['world']}" if meta["world"] != "toy-mmdit" else ""
    )
    lines = [
        title,
        "",
        f"`{script} --write`: {meta['captions']} training captions, "
        f"{meta['steps']} steps, guidance {meta['guidance']}, {len(results)} normed QK units "
        f"({meta['heads']} heads of {d}); per unit {meta['cap']} queries x {meta['cap']} keys pooled over "
        f"{pooled_over}, moments from those tokens. Errors are relative (over the logit energy), "
        "summed over heads; the first table averages them over the units.",
        "",
        "Terms of the measured error: dropped E[l_D^2] + renorm E[(s_q s_k - 1)^2 l_S^2] + "
        "cross -2 E[(s_q s_k - 1) l_S l_D]. " + preds_text,
        "",
        "| rank | measured | dropped | renorm | cross | " + " | ".join(predictions) + " |",
        "|---:|---:|---:|---:|---:|" + "---:|" * len(predictions),
    ]
    for row in rows:
        cells = [f"{row[k]:.4f}" for k in ("measured", *TERMS, *predictions)]
        lines.append(f"| {row['rank']} ({row['fraction']:g} d) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Prediction / measured over the units (min / median / max):",
        "",
        "| rank | " + " | ".join(predictions) + " |",
        "|---:|" + "---:|" * len(predictions),
    ]
    for row in rows:
        cells = ["{:.2f} / {:.2f} / {:.2f}".format(*row[f"{k}_ratio"]) for k in predictions]
        lines.append(f"| {row['rank']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Agreement over all (unit, rank) points: typical factor exp(mean |log(prediction / measured)|), "
        "the largest factor, and the points within a factor 1.5:",
        "",
        "| prediction | typical factor | largest factor | within 1.5x |",
        "|---|---:|---:|---:|",
    ]
    for key, agg in agreement(results, predictions).items():
        lines.append(
            f"| {key} | {agg['typical_factor']:.2f} | {agg['largest_factor']:.2f} | "
            f"{agg['within_1.5x']} of {agg['points']} |"
        )
    last = "new"
    lines += [
        "",
        "Per unit (relative errors):",
        "",
        f"| unit | rank | measured | cross | old | {last} | {last} / measured |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        for r, p in res["ranks"].items():
            lines.append(
                f"| {name} | {r} | {p['measured']:.4f} | {p['cross']:+.4f} | {p['old']:.4f} | "
                f"{p[last]:.4f} | {p[last] / p['measured']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def rope_sequence(pipe, model, captions, guidance: float, seed: int):
    """(angle table (N, d / 2) of the [text; image] sequence one forward of ``pipe`` uses, and the
    number of text tokens), read off the model's own ``pos_embed`` in a one-step run."""
    from slimdiff.families.units import pipeline_call_kwargs

    seen = {}

    def on_pos(mod, args, out):
        cos, sin = out
        seen["table"] = torch.atan2(sin[:, 0::2].double(), cos[:, 0::2].double())

    def on_model(mod, args, kwargs):
        seen["text"] = int(kwargs["txt_ids"].shape[-2])

    hooks = [
        model.pos_embed.register_forward_hook(on_pos),
        model.register_forward_pre_hook(on_model, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            pipe(
                captions[:1],
                num_inference_steps=1,
                generator=torch.Generator().manual_seed(seed),
                **pixel_size(pipe, model),
                **pipeline_call_kwargs(pipe, guidance, 1),
            )
    finally:
        for h in hooks:
            h.remove()
    return seen["table"], seen["text"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=sorted(INTRO), default="toy-mmdit")
    ap.add_argument("--captions", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--cap", type=int, default=2000, help="queries and keys per unit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from slimdiff.families import adapter_for
    from slimdiff.families.base import denoiser_of
    from slimdiff.families.units import compression_units
    from slimdiff.formats.models import load_pipeline
    from slimdiff.toy.data import train_captions

    t0 = time.perf_counter()
    pipe = load_pipeline(args.world)
    model = denoiser_of(pipe).eval()
    units = {n: u for n, u in compression_units(model).items() if u.kind == "qk" and u.layout.qk_norm}
    captions = train_captions()[: args.captions]
    tokens, positions = capture(pipe, model, units, captions, args.steps, args.guidance, args.seed)
    rope = phases = None
    predictions = PREDICTIONS
    if args.world == "toy-flux":
        table, n_text = rope_sequence(pipe, model, captions, args.guidance, args.seed)

        def offset(path: str) -> int:  # the image stream of a double block follows the text
            return n_text if path.startswith("transformer_blocks.") and ".attn.to_" in path else 0

        rope = (positions, offset, table)
        adapter = adapter_for(model)
        sequence = adapter.rope_sequence(pipe, adapter.sample_size(model))  # what calibration records
        phases = {"default": adapter.rope_phases(model), "sequence": adapter.rope_phases(model, sequence)}
        for ours, seen in zip(phases["sequence"], linalg.rope_phase_moments(table), strict=True):
            torch.testing.assert_close(ours, seen)  # the library's phases are the sequence's
        predictions = ROPE_PREDICTIONS
    results = {}
    for name, unit in units.items():
        lay = unit.layout
        if rope is None:
            results[name] = analyse_unit(model, tokens, name, lay.heads, lay.head_dim, args.cap, args.seed)
        else:
            results[name] = analyse_rope_unit(
                model, tokens, name, lay.heads, lay.head_dim, args.cap, args.seed, rope, phases
            )
        print(
            name,
            {r: round(p[predictions[-1]] / p["measured"], 3) for r, p in results[name]["ranks"].items()},
            flush=True,
        )
    first = next(iter(units.values())).layout
    meta = {
        "world": args.world,
        "captions": args.captions,
        "steps": args.steps,
        "guidance": args.guidance,
        "cap": args.cap,
        "seed": args.seed,
        "heads": first.heads,
        "head_dim": first.head_dim,
        "renorm_samples": linalg.RENORM_SAMPLES,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if rope is not None:
        meta["sequence"] = {"tokens": int(table.shape[0]), "text_tokens": n_text}
    rows = summarise(results, first.head_dim, predictions)
    text = report(results, rows, meta, predictions)
    print(text)
    if args.write:
        stem = "qk_select_error" + ("" if args.world == "toy-mmdit" else "_flux")
        out = ROOT / "benchmarks" / "results"
        (out / f"{stem}.md").write_text(text)
        payload = {
            "meta": meta,
            "summary": rows,
            "agreement": agreement(results, predictions),
            "units": results,
        }
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
