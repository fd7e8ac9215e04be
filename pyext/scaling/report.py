"""The scaling study's report: the bound vs N with every component of Finzi et al.'s
decomposition (spec/bounds.md section 6), power-law fits with confidence intervals
(:func:`tokenbounds.bounds.fit_power_law`), a monotonicity verdict that names the term that
prevents a fall, an extrapolation of the fits, a Figure-2-like PNG and the markdown table."""

from __future__ import annotations

import glob
import math
import os
from typing import Any

import numpy as np

from ..eval.fileio import read_json

__all__ = ["COMPONENTS", "extrapolate", "fit_components", "format_markdown", "load_models", "monotonicity",
           "plot_study", "readme_section"]

COMPONENTS = (
    ("unquantized_bits", "loss (unquantized)"),
    ("quantization_gap_bits", "quantization gap"),
    ("smoothing_cost_bits", "smoothing cost"),
    ("complexity_bits", "complexity"),
    ("variance_bits", "variance term"),
    ("sampling_bits", "sampling"),
)
"""The additive terms of the Freedman bound, in order: they sum to ``bound_bits``."""

FITTED = (
    ("bound_bits", "Freedman bound"),
    ("unquantized_bits", "loss (unquantized)"),
    ("sigma_bits", "Sigma (loss deviation)"),
    ("variance_bits", "variance term"),
    ("complexity_bits", "complexity term"),
    ("quantization_gap_bits", "quantization gap"),
    ("gap_bits", "bound - loss (all gap terms)"),
    ("parameters_per_token_bits", "parameters per token (bits)"),
    ("bits_per_parameter", "coded bits per parameter"),
)


def load_models(out_dir: str, cfg=None) -> list[dict[str, Any]]:
    """The finished models' records (``out_dir/models/*.json``), smallest N first; with ``cfg``,
    only the sizes of that configuration."""
    names = None if cfg is None else {s.name for s in cfg.sizes}
    recs = []
    for p in sorted(glob.glob(os.path.join(out_dir, "models", "*.json"))):
        rec = read_json(p)
        if names is None or rec["name"] in names:
            recs.append(rec)
    return sorted(recs, key=lambda r: r["parameters"])


def _series(models: list[dict[str, Any]], key: str) -> np.ndarray:
    if key == "bits_per_parameter":
        return np.array([float(m["quantization"]["bits_per_parameter"]) for m in models])
    if key == "gap_bits":
        return np.array([m["decomposition"]["bound_bits"] - m["decomposition"]["unquantized_bits"] for m in models])
    return np.array([float(m["decomposition"][key]) for m in models])


def fit_components(models: list[dict[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """Power-law fits ``y = a N^b`` of each quantity of :data:`FITTED` against N (95% t intervals);
    a quantity with a non-positive value gets ``{"skipped": why}`` instead (a log-log fit needs y > 0)."""
    from ..bounds import fit_power_law

    n = np.array([m["parameters"] for m in models], dtype=np.float64)
    out: dict[str, Any] = {}
    for key, _ in FITTED:
        y = _series(models, key)
        if len(models) < 3:
            out[key] = {"skipped": f"{len(models)} sizes; a fit with a confidence interval needs 3"}
        elif np.any(y <= 0):
            out[key] = {"skipped": "some values are <= 0 (no log-log fit)"}
        else:
            out[key] = fit_power_law(n, y, confidence=confidence).to_dict()
    return out


def monotonicity(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Does the Freedman bound fall at every step up in N? For each step where it does not,
    the change of every component and the ones that rose (largest first)."""
    steps = []
    for a, b in zip(models, models[1:], strict=False):
        da, db = a["decomposition"], b["decomposition"]
        change = {k: db[k] - da[k] for k, _ in COMPONENTS}
        d_bound = db["bound_bits"] - da["bound_bits"]
        rose = sorted(((k, v) for k, v in change.items() if v > 0), key=lambda kv: -kv[1])
        steps.append({"from": a["name"], "to": b["name"], "bound_change_bits": d_bound, "falls": d_bound < 0,
                      "component_change_bits": change, "rising_components": [k for k, _ in rose]})
    return {"monotone_decreasing": all(s["falls"] for s in steps), "steps": steps}


def extrapolate(fits: dict[str, Any], n_min: float, n_max: float = 1e12) -> dict[str, Any]:
    """Extrapolate ``bound = loss + (bound - loss)`` from the two power-law fits: the N at which the
    fitted bound is smallest (where its derivative changes sign) and the fitted values at a few
    scales. With ``loss = a N^b`` (b < 0) and ``gap = c N^e`` the derivative
    ``a b N^b + c e N^e`` is negative for all N exactly when both exponents are negative; when one
    is positive the bound has one minimum, at ``N* = (-a b / (c e))^(1 / (e - b))``."""
    loss, gap = fits.get("unquantized_bits", {}), fits.get("gap_bits", {})
    if "exponent" not in loss or "exponent" not in gap:
        return {"available": False, "why": "the loss or the gap could not be fitted"}
    a, b = loss["prefactor"], loss["exponent"]
    c, e = gap["prefactor"], gap["exponent"]
    grid = np.logspace(math.log10(n_min), math.log10(n_max), 400)
    total = a * grid**b + c * grid**e
    out: dict[str, Any] = {"available": True, "loss_exponent": b, "gap_exponent": e,
                           "at": {f"{x:.0e}": float(a * x**b + c * x**e) for x in (1e6, 1e7, 1e8, 1e9)}}
    if b < 0 and e < 0:
        out.update(falls_everywhere=True, minimum_at=None,
                   text="both fitted terms fall with N, so the fitted bound falls at every larger scale")
    elif b * e < 0:
        n_star = (-a * b / (c * e)) ** (1.0 / (e - b))
        falls_after = e < 0  # the loss rises, the gap falls: decreasing beyond N*
        out.update(falls_everywhere=False, minimum_at=float(n_star), falls_beyond=bool(falls_after),
                   text=(f"the fitted bound is smallest at N ~ {n_star:.2g}; it "
                         + ("falls beyond" if falls_after else "rises beyond") + " that scale"))
    else:
        out.update(falls_everywhere=False, minimum_at=None,
                   text="both fitted terms rise with N: the fits give no scale at which the bound falls")
    out["grid_min_at"] = float(grid[int(np.argmin(total))])
    return out


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def summary_table(models: list[dict[str, Any]]) -> list[str]:
    head = ("| model | N | D (D/N) | quantizer (of K) | bits/param | params/token (bits) | loss fp | quant gap | "
            "smoothing | complexity | variance term | Sigma | Freedman bound | token bound | uniform |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in models:
        d, q = m["decomposition"], m["quantization"]
        out.append(
            f"| {m['name']} | {m['parameters']:,} | {m['tokens_m']:,} ({m['tokens_m'] / m['parameters']:.1f}) | "
            f"{q['chosen']} ({q['num_candidates']}) | {q['bits_per_parameter']:.2f} | "
            f"{d['parameters_per_token_bits']:.4f} | {d['unquantized_bits']:.4f} | {d['quantization_gap_bits']:+.4f} | "
            f"{d['smoothing_cost_bits']:.4f} | {d['complexity_bits']:.4f} | {d['variance_bits']:.4f} | "
            f"{d['sigma_bits']:.3f} | **{d['bound_bits']:.4f}** | {d['token_bound_bits']:.4f} | {d['uniform_bits']:.3f} |")
    return out


def fits_table(fits: dict[str, Any]) -> list[str]:
    out = ["| quantity | exponent b (95% CI) | prefactor a | R^2 |", "|---|---|---|---|"]
    for key, label in FITTED:
        f = fits.get(key, {})
        if "exponent" in f:
            lo, hi = f["exponent_ci"]
            out.append(f"| {label} | {f['exponent']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {f['prefactor']:.4g} | "
                       f"{f['r_squared']:.3f} |")
        else:
            out.append(f"| {label} | not fitted: {f.get('skipped', 'missing')} | | |")
    return out


def verdict(models: list[dict[str, Any]], mono: dict[str, Any], ext: dict[str, Any]) -> list[str]:
    """Sentences: does the bound fall monotonically, which term prevents it, what scale is needed."""
    if len(models) < 2:
        return ["Only one size finished: no trend."]
    names = dict(COMPONENTS)
    first, last = models[0]["decomposition"], models[-1]["decomposition"]
    lines = [f"From {models[0]['name']} (N = {models[0]['parameters']:,}) to {models[-1]['name']} "
             f"(N = {models[-1]['parameters']:,}) the Freedman bound goes {first['bound_bits']:.4f} -> "
             f"{last['bound_bits']:.4f} bits/token ("
             + ", ".join(f"{names[k]} {last[k] - first[k]:+.4f}" for k, _ in COMPONENTS if k != "sampling_bits")
             + ")."]
    if mono["monotone_decreasing"]:
        lines.append("**The bound falls monotonically with N across the sweep**, as Finzi et al. predict.")
    else:
        bad = [s for s in mono["steps"] if not s["falls"]]
        for s in bad:
            worst = s["rising_components"][:2]
            lines.append(f"**Not monotone**: {s['from']} -> {s['to']} the bound rises by {s['bound_change_bits']:+.4f} "
                         "bits; rising terms: " + ", ".join(
                             f"{names[k]} {s['component_change_bits'][k]:+.4f}" for k in worst) + ".")
    lines.append(f"Parameters per token (log 1/P(h) / m) go {first['parameters_per_token_bits']:.4f} -> "
                 f"{last['parameters_per_token_bits']:.4f} bits: at a fixed D / N the code length per training token is "
                 "set by the bits per parameter, not by N.")
    lines.append(f"Sigma (the loss deviation) goes {first['sigma_bits']:.3f} -> {last['sigma_bits']:.3f} bits.")
    if ext.get("available"):
        lines.append(f"Extrapolation of the fits (loss ~ N^{ext['loss_exponent']:+.3f}, bound - loss ~ "
                     f"N^{ext['gap_exponent']:+.3f}): {ext['text']}; fitted bound at N = 1e7: {ext['at']['1e+07']:.3f}, "
                     f"1e8: {ext['at']['1e+08']:.3f}, 1e9: {ext['at']['1e+09']:.3f} bits/token (power laws without an "
                     "irreducible-loss floor: indicative only beyond the measured range).")
    return lines


def readme_section(result: dict[str, Any], out_dir: str = "runs/scaling", figure: str | None = None) -> str:
    """The README's scaling section: the summary table, the verdict, the fits, and a link to
    ``figure`` (a path relative to the README) when given."""
    models = result["models"]
    fits = fit_components(models)
    mono = monotonicity(models)
    ext = extrapolate(fits, models[0]["parameters"])
    cfg = result.get("config", {})
    corpus = result.get("corpus") or {}
    lines = []
    if corpus:
        lines.append(f"Corpus: {'+'.join(corpus['sources'])}, {corpus['n_bytes'] / 1e6:.1f} MB in "
                     f"{corpus['n_documents']:,} shuffled chunks -> {corpus['n_tokens']:,} tokens (BPE V = "
                     f"{corpus['vocab_size']}). Each model: one epoch on its own first D tokens, bounded over m = D "
                     f"(full pass, no sampling term), delta = {cfg.get('delta', 0.05)}.")
        lines.append("")
    lines += summary_table(models)
    lines.append("")
    lines.append("All columns in bits per token except N, D, bits/param. The Freedman bound = loss fp + quant "
                 "gap + smoothing + complexity + variance term (Finzi et al.'s decomposition; the variance "
                 "term is what Sigma, the loss deviation, multiplies). params/token = log2 1/P(h) / m (C with "
                 "its prefix-free code + 10 selection bits + log2 K).")
    lines.append("")
    lines += [f"* {ln}" for ln in verdict(models, mono, ext)]
    lines.append("")
    lines += fits_table(fits)
    secs = [m["compute_seconds"] for m in models]
    wall = sum(c["train"] + c["quantize_select"] + c["evaluate"] for c in secs)
    cpu = sum(c["train_cpu"] + c["quantize_select_cpu"] + c["evaluate_cpu"] for c in secs)
    lines.append("")
    lines.append(f"Compute of the {len(models)} sizes (summed over sizes, when each step ran): {wall / 60:.1f} min wall, "
                 f"{cpu / 60:.1f} min CPU; training {sum(m['training']['flops_6ND'] for m in models):.3g} FLOPs (6ND).")
    run = result.get("run")
    if run:
        lines.append("")
        lines.append(f"This run: wall {run['wall_seconds'] / 60:.1f} min, CPU {run['cpu_seconds'] / 60:.1f} min, "
                     f"{run['threads']} thread(s), load {run['load_start'][0]:.2f} at start, {run['load_end'][0]:.2f} "
                     "at the end (cached sizes are not rerun).")
    if figure:
        lines += ["", f"![Freedman bound and loss vs N; Sigma vs N; component shares]({figure})"]
    lines.append("")
    lines.append(f"(`make scaling`; figure {out_dir}/scaling.png, full report {out_dir}/report.md)")
    return "\n".join(lines) + "\n"


def format_markdown(result: dict[str, Any], figure: str | None = None) -> str:
    """The full report: the README section, then the per-model candidates and compute times."""
    models = result["models"]
    out = ["# tokenbounds scaling: the Freedman bound vs N at D = 20 N", ""]
    if figure:
        out += [f"![bound and loss vs N; Sigma vs N; component shares]({figure})", ""]
    out.append(readme_section(result))
    out.append("## Quantization candidates (selection sample; the bound predicted for a full pass)")
    out.append("")
    labels = [c["label"] for c in models[0]["quantization"]["candidates"]]
    out.append("| model | " + " | ".join(labels) + " |")
    out.append("|---|" + "---|" * len(labels))
    for m in models:
        cells = [f"{c['predicted_bound_bits']:.3f} ({c['bits_per_parameter']:.2f} b/p)"
                 + (" **chosen**" if c["label"] == m["quantization"]["chosen"] else "")
                 for c in m["quantization"]["candidates"]]
        out.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("## Compute per model (when each step ran; wall / CPU seconds)")
    out.append("")
    out.append("| model | train | quantize + select | full passes (q + fp) | 6ND FLOPs |")
    out.append("|---|---|---|---|---|")
    for m in models:
        s = m["compute_seconds"]
        out.append(f"| {m['name']} | {s['train']:.0f} / {s['train_cpu']:.0f} | {s['quantize_select']:.0f} / "
                   f"{s['quantize_select_cpu']:.0f} | {s['evaluate']:.0f} / {s['evaluate_cpu']:.0f} | "
                   f"{m['training']['flops_6ND']:.3g} |")
    tot = {k: sum(m["compute_seconds"][k] for m in models) for k in models[0]["compute_seconds"]}
    out.append(f"| all | {tot['train']:.0f} / {tot['train_cpu']:.0f} | {tot['quantize_select']:.0f} / "
               f"{tot['quantize_select_cpu']:.0f} | {tot['evaluate']:.0f} / {tot['evaluate_cpu']:.0f} | "
               f"{sum(m['training']['flops_6ND'] for m in models):.3g} |")
    out.append("")
    out.append(f"Sum over the sizes: {sum(tot[k] for k in ('train', 'quantize_select', 'evaluate')) / 60:.1f} min "
               f"wall, {sum(tot[k] for k in ('train_cpu', 'quantize_select_cpu', 'evaluate_cpu')) / 60:.1f} min CPU "
               "(sizes may have run in parallel processes; CPU well below wall means a loaded machine).")
    out.append("")
    out.append("## Recompute any size's bound")
    out.append("")
    for m in models:
        out.append(f"* {m['name']}: `tokenbounds {' '.join(m['bound_command'])}`")
    return "\n".join(out) + "\n"


def plot_study(models: list[dict[str, Any]], path: str) -> str | None:
    """Finzi et al. Figure 2, our measurement: (a) the Freedman and token-level bounds and the
    unquantized / quantized losses vs N; (b) Sigma vs N with its power-law fit; (c) each term's
    share of the Freedman bound. Returns ``path`` (None when matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..eval.fileio import atomic_path

    n = np.array([m["parameters"] for m in models], dtype=np.float64)
    dec = [m["decomposition"] for m in models]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.4))
    a = ax[0]
    a.plot(n, [d["bound_bits"] for d in dec], "o-", color="C3", label="Freedman bound")
    a.plot(n, [d["token_bound_bits"] for d in dec], "s--", color="C1", label="token-level bound")
    a.plot(n, [d["unquantized_bits"] for d in dec], "^-", color="C0", label="loss, unquantized")
    a.plot(n, [m["losses"]["quantized_nll_bits"] for m in models], "v:", color="C2", label="loss, quantized")
    a.axhline(dec[0]["uniform_bits"], color="grey", lw=0.8, ls=":", label="uniform log2 V")
    a.set_xscale("log")
    a.set_xlabel("parameters N (fixed D / N)")
    a.set_ylabel("bits per token")
    a.set_title("bound and loss vs N")
    a.legend(fontsize=8)
    b = ax[1]
    sig = np.array([d["sigma_bits"] for d in dec])
    b.plot(n, sig, "o-", color="C4", label="Sigma = Delta sqrt(S)")
    if len(models) >= 3 and np.all(sig > 0):
        from ..bounds import fit_power_law

        f = fit_power_law(n, sig)
        xs = np.logspace(np.log10(n.min()), np.log10(n.max()), 50)
        b.plot(xs, f.predict(xs), "--", color="C4", alpha=0.6,
               label=f"fit N^{f.exponent:+.3f} [{f.exponent_ci[0]:+.3f}, {f.exponent_ci[1]:+.3f}]")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("parameters N")
    b.set_ylabel("bits")
    b.set_title("loss deviation Sigma vs N")
    b.legend(fontsize=8)
    c = ax[2]
    x = np.arange(len(models))
    bottom = np.zeros(len(models))
    for i, (key, label) in enumerate(COMPONENTS[:-1]):
        share = np.array([d[key] / d["bound_bits"] for d in dec])
        c.bar(x, share, bottom=bottom, color=f"C{i}", label=label)
        bottom = bottom + share
    c.set_xticks(x, [f"{m['name']}\n{m['parameters'] / 1e3:.0f}k" for m in models])
    c.set_ylabel("share of the Freedman bound")
    c.set_title("component shares (quant gap may be < 0)")
    c.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
