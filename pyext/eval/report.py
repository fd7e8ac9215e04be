"""Outputs of ``tokenbounds evaluate``: stats.json, bounds.json, report.md and PNG plots.

``stats.json`` is a LossStats state dict (so ``tokenbounds bound --stats RUN_DIR/stats.json``
reads it directly) with one extra key, ``evaluation``, holding everything else needed to
recompute the bounds: m, s, V, delta, the sample seed and positions hash, model and data
hashes, the coded size C and how it was obtained, the loss histogram and the statistics by
context length. ``bounds.json`` / ``report.md`` hold every bound of
:func:`tokenbounds.bounds.from_stats` with its components.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from .checkpoint import atomic_write_text


def compute_bounds(loss_state: dict[str, Any], evaluation: dict[str, Any]):
    from ..bounds import from_stats

    return from_stats(loss_state, evaluation["coded"]["coded_bits"], evaluation["m"],
                      delta=evaluation["delta"], extra_bits=evaluation.get("extra_bits", 0.0),
                      vocab_size=evaluation["vocab_size"], topk=(1, 10))


def _position_bounds(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Token bound per context-length bucket, as if every token had that bucket's mean losses
    (illustrative: s = the bucket's count)."""
    from ..bounds import token_bound

    bp = evaluation["by_position"]
    out = []
    for lo, hi, n, means in zip(bp["context_tokens_from"], bp["context_tokens_to"], bp["count"], bp["mean_bits"],
                                strict=True):
        if n < 2 or any(v is None for v in means):
            continue
        b = token_bound(dict(zip(evaluation["alphas"], means, strict=True)),
                        coded_bits=evaluation["coded"]["coded_bits"], train_tokens=evaluation["m"],
                        sample_tokens=min(n, evaluation["m"]), vocab_size=evaluation["vocab_size"],
                        delta=evaluation["delta"], extra_bits=evaluation.get("extra_bits", 0.0))
        out.append({"context_from": lo, "context_to": hi, "count": n, "bound_bits": b.bound_bits,
                    "empirical_bits": b.empirical_bits, "alpha": b.alpha})
    return out


def _plots(out: str, table, evaluation: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in table.rows() if not r["bound"].startswith("top-") and r["kind"] == "high-probability"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.8))
    labels = [r["bound"] for r in rows]
    y = np.arange(len(rows))
    emp = np.array([r["empirical"] for r in rows])
    comp = np.array([r["complexity"] for r in rows])
    samp = np.array([r["sampling"] for r in rows])
    ax.barh(y, emp, color="#4c72b0", label="empirical")
    ax.barh(y, comp, left=emp, color="#dd8452", label="complexity (or Freedman gap)")
    ax.barh(y, samp, left=emp + comp, color="#55a868", label="sampling")
    uniform = math.log2(evaluation["vocab_size"])
    ax.axvline(uniform, color="k", ls="--", lw=1, label=f"uniform predictor log2 V = {uniform:.2f}")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bits per token")
    ax.set_title("Bound decomposition")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    path = os.path.join(out, "bound_decomposition.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    hist = evaluation["histogram"]
    counts = np.array(hist["counts"])
    width = hist["bin_width_bits"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(counts.size) * width, counts, width=width, align="edge", color="#4c72b0")
    ax.set_xlabel("-log2 p(y) (bits)")
    ax.set_ylabel("tokens")
    ax.set_title(f"Loss histogram (s = {evaluation['s']:,}; overflow >= {hist['range_bits'][1]:g} bits: "
                 f"{hist['overflow']})")
    nz = np.flatnonzero(counts)
    if nz.size:
        ax.set_xlim(0, (nz[-1] + 2) * width)
    fig.tight_layout()
    path = os.path.join(out, "loss_histogram.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    bp = evaluation["by_position"]
    pb = evaluation.get("bound_by_position", [])
    x = [(a + b) / 2 for a, b, n in zip(bp["context_tokens_from"], bp["context_tokens_to"], bp["count"], strict=True) if n]
    nll = [v for v, n in zip(bp["mean_nll_bits"], bp["count"], strict=True) if n]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, nll, "o-", label="mean loss -log2 p(y)")
    if pb:
        ax.plot([(r["context_from"] + r["context_to"]) / 2 for r in pb], [r["empirical_bits"] for r in pb], "s-",
                label="smoothed empirical (chosen alpha)")
        ax.plot([(r["context_from"] + r["context_to"]) / 2 for r in pb], [r["bound_bits"] for r in pb], "^-",
                label="token bound if every token had this context length")
    ax.axhline(uniform, color="k", ls="--", lw=1, label="log2 V")
    if len(x) > 1 and max(x) / max(min(x), 1) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("context tokens before the target")
    ax.set_ylabel("bits per token")
    ax.set_title("Loss and bound by position in the context")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "loss_by_position.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def render_report(table, evaluation: dict[str, Any], plots: list[str]) -> str:
    ev = evaluation
    model, coded, sample = ev["model"], ev["coded"], ev["sample"]
    q = model.get("quantization", {})
    lines = ["# tokenbounds evaluate report", ""]
    lines.append(f"* model: `{model['path']}` ({model['kind']}, {model['class']}, {model['num_parameters']:,} "
                 f"parameters, evaluated in {model['dtype']}); fingerprint `{model['fingerprint']['sha256'][:16]}`")
    if q.get("already_quantized"):
        lines.append(f"* **already quantized checkpoint**: {q.get('note')}")
        if q.get("format") == "GGUF":
            lines.append(f"  (GGUF `{q.get('gguf_file')}`, type {q.get('gguf_type')}: "
                         f"{q.get('weight_bits')}-bit GGUF weights)")
    elif q.get("format"):
        lines.append(f"* checkpoint format: {q.get('note', q.get('format'))}")
    for d in ev["data"]:
        lines.append(f"* data: `{d['path']}` ({d['format']}, {d['n_tokens']:,} tokens, sha256 `{d['sha256'][:16]}`)")
    lines.append(f"* m = {ev['m']:,.0f} training tokens ({ev['m_source']}); s = {ev['s']:,} sampled uniformly with "
                 f"replacement, seed {sample['seed']}, positions sha256 `{sample['positions_sha256'][:16]}`")
    lines.append(f"* context: up to {sample['context_length']} preceding tokens, "
                 + ("crossing document boundaries" if sample["cross_documents"]
                    else f"never crossing an end-of-text token (id {sample['eot_id']})")
                 + f"; mean {sample['mean_context_tokens']:.1f} tokens")
    lines.append(f"* V = {ev['vocab_size']:,}; delta = {ev['delta']}; extra bits = {ev.get('extra_bits', 0.0):g}")
    lines.append(f"* **coded size assumption** ({coded['method']}): {coded['description']}")
    st = ev["loss_stats_summary"]
    lines.append(f"* mean unsmoothed loss {st['mean_nll_bits']:.4f} bits/token ({st['mean_nll_bits'] * math.log(2):.4f} "
                 f"nats); top-1 error {st['top1_error']:.4f}")
    lines += ["", "## Bounds (bits per token unless the row is an error rate)", "", "```", table.format_table(), "```", ""]
    lines.append("| bound | value | empirical | complexity / gap | sampling | alpha | vacuous |")
    lines.append("|---|---:|---:|---:|---:|---:|---|")
    for r in table.rows():
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(f"| {r['bound']} | {r['value']:.5f} | {r['empirical']:.5f} | {r['complexity']:.5f} | "
                     f"{r['sampling']:.5f} | {alpha} | {r['vacuous']} |")
    lines += ["", "Recompute: `" + ev["recompute"] + "`", ""]
    if plots:
        lines.append("## Plots")
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    run = ev["run"]
    lines += ["", f"Run: {run['world_size']} process(es) on {run['device']}, batch {run['batch_size']}, "
              f"{run['blocks']} blocks of {run['checkpoint_every']} batches, {run['seconds_total']:.1f} s total; "
              "log in evaluate.log.", ""]
    return "\n".join(lines)


def write_outputs(out: str, total, evaluation: dict[str, Any], *, plots: bool = True) -> dict[str, Any]:
    """Write stats.json, bounds.json, report.md and the plots; returns the stats.json content."""
    loss_state = total.stats.state_dict()
    st = total.stats
    evaluation["loss_stats_summary"] = {"count": st.count, "mean_nll_bits": st.mean_nll_bits,
                                        "top1_error": st.topk_error(1), "mean_bits": st.mean_bits}
    evaluation["recompute"] = (f"tokenbounds bound --stats {os.path.join(out, 'stats.json')} "
                               f"--coded-bits {evaluation['coded']['coded_bits']!r} --train-tokens {evaluation['m']!r} "
                               f"--delta {evaluation['delta']} --extra-bits {evaluation.get('extra_bits', 0.0)!r} "
                               "--topk 1 10")
    table = compute_bounds(loss_state, evaluation)
    evaluation["bound_by_position"] = _position_bounds(evaluation)
    doc = {**loss_state, "evaluation": evaluation}
    atomic_write_text(os.path.join(out, "stats.json"), json.dumps(doc, indent=1, allow_nan=True))
    bounds_doc = {"format": "tokenbounds.bounds/1", **table.to_dict(), "coded": evaluation["coded"],
                  "quantization": evaluation["model"].get("quantization")}
    atomic_write_text(os.path.join(out, "bounds.json"), json.dumps(bounds_doc, indent=1, allow_nan=True, default=str))
    written = _plots(out, table, evaluation) if plots else []
    atomic_write_text(os.path.join(out, "report.md"), render_report(table, evaluation, written))
    import logging

    logging.getLogger("tokenbounds.evaluate").info(
        "wrote %s/{stats.json,bounds.json,report.md}; best bound %.4f bits/token (%s)", out,
        table.best["bound_bits"], table.best["label"])
    return doc
