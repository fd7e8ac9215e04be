"""Outputs of ``tokenbounds evaluate``: the :class:`~tokenbounds.eval.evaluation.Evaluation`
(built once here from the run and its statistics), ``stats.json``, ``bounds.json``,
``report.md`` and PNG plots. Rendering only reads the Evaluation.

``stats.json`` is the per-token LossStats state (``tokenbounds bound --stats RUN/stats.json``
reads it directly) plus ``unit_stats`` (window-unit sampled mode) and ``evaluation``;
``bounds.json`` / ``report.md`` hold every bound of :func:`tokenbounds.bounds.from_stats`, which
is given the whole document.

**Bounds by context length** (full passes only). Bucket b of context lengths holds exactly
m_b of the m targets, a set fixed by the positions alone (without ``--reset-at-eot``), and a full
pass evaluates all of them: the token-level and Freedman bounds apply to the bucket's average
risk with m = m_b and no sampling term. Both are reported for every bucket at once, so each of the
2 x (number of buckets) bounds runs at delta / (2 x number of buckets) (a union bound). In sampled
modes only the losses by context length are stored (``by_context_length``), never a bound.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np

from .evaluation import STATS_FORMAT, CodedSize, Evaluation, ModelInfo, RunInfo, Scoring, thaw
from .fileio import atomic_write_json, atomic_write_text

__all__ = ["bounds_table", "build_evaluation", "compute_bounds", "context_length_bounds", "render_report", "write_outputs"]


# ----------------------------------------------------------------------------- the Evaluation
def context_length_bounds(by_ctx: dict[str, Any], *, coded_bits: float, delta: float, extra_bits: float,
                          vocab_size: int) -> list[dict[str, Any]]:
    """Token-level and Freedman bound of every non-empty bucket (>= 2 targets), each at
    delta / (2 x buckets), with the bucket's exact population m_b and no sampling term."""
    from ..bounds import freedman_bound, token_bound

    rows = [i for i, n in enumerate(by_ctx["count"]) if n >= 2 and None not in by_ctx["variance_bits"][i]]
    if not rows:
        return []
    dd = delta / (2 * len(rows))
    alphas = by_ctx["alphas"]
    out = []
    for i in rows:
        n = int(by_ctx["count"][i])
        emp = dict(zip(alphas, by_ctx["mean_bits"][i], strict=True))
        var = dict(zip(alphas, by_ctx["variance_bits"][i], strict=True))
        kw = dict(coded_bits=coded_bits, train_tokens=n, sample_tokens=None, vocab_size=vocab_size, delta=dd,
                  extra_bits=extra_bits)
        tb = token_bound(emp, **kw)
        fb = freedman_bound(emp, variance_bits=var, **kw)
        best = tb if tb.bound_bits <= fb.bound_bits else fb
        out.append({"context_from": by_ctx["context_tokens_from"][i], "context_to": by_ctx["context_tokens_to"][i],
                    "m_b": n, "delta_each": dd, "token_bound_bits": tb.bound_bits,
                    "freedman_bound_bits": fb.bound_bits, "bound_bits": best.bound_bits,
                    "empirical_bits": best.empirical_bits, "alpha": best.alpha,
                    "mean_nll_bits": by_ctx["mean_nll_bits"][i]})
    return out


def build_evaluation(total, *, opts, lm, files, rule, prefix_source: str, plan, coded: CodedSize, run: RunInfo,
                     configuration: dict[str, Any]) -> Evaluation:
    """The frozen record of one evaluation (see :mod:`tokenbounds.eval.evaluation`)."""
    st = total.stats
    m = int(plan.m)
    by_ctx = total.by_context_length()
    n = np.asarray(by_ctx["count"], dtype=np.float64)
    mids = (np.asarray(by_ctx["context_tokens_from"]) + np.asarray(by_ctx["context_tokens_to"])) / 2
    scoring = Scoring(
        mode=rule.mode, window=rule.window, stride=rule.stride, units=plan.num_units, draws=plan.draws,
        full_pass=plan.full_pass, prefix_token=rule.prefix_token, prefix_token_source=prefix_source,
        reset_at_eot=rule.reset_at_eot, eot_id=rule.eot_id, units_scored=int(plan.units.size),
        scored_tokens=plan.scored_tokens, tokens_with_multiplicity=int(st.count), seed=plan.seed,
        draws_sha256=plan.draws_sha256, units_sha256=plan.digest(),
        mean_context_tokens=float((n * mids).sum() / n.sum()) if n.sum() else 0.0)
    if plan.full_pass and not rule.reset_at_eot:
        ctx_bounds = context_length_bounds(by_ctx, coded_bits=coded.coded_bits, delta=opts.delta,
                                           extra_bits=opts.extra_bits, vocab_size=st.vocab_size)
        note = (f"bounds per bucket of context length: each bucket's exact population m_b (full pass), the union over "
                f"{2 * len(ctx_bounds)} bounds paid (each at delta / {2 * len(ctx_bounds)})")
    else:
        ctx_bounds = None
        note = ("losses by context length only, no bound: "
                + ("a sample does not hold each bucket's population" if not plan.full_pass else
                   "with --reset-at-eot the bucket of a position depends on the data"))
    model = ModelInfo(path=os.path.abspath(opts.model), kind=lm.kind, model_class=type(lm.model).__name__,
                      num_parameters=lm.num_parameters, fingerprint=lm.quantization["fingerprint"], dtype=opts.dtype,
                      quantization={k: v for k, v in lm.quantization.items() if k != "fingerprint"},
                      quantized_here_bits=opts.bits, max_context=lm.context_length)
    out = opts.out
    recompute = (f"tokenbounds bound --stats {os.path.join(out, 'stats.json')} --coded-bits {coded.coded_bits!r} "
                 f"--train-tokens {m} --delta {opts.delta} --extra-bits {opts.extra_bits!r} --topk 1 10"
                 + (" --full-pass" if plan.full_pass else ""))
    return Evaluation(
        format=STATS_FORMAT, m=m, m_source="positions with a preceding token in the data files: sum_f (n_f - 1)",
        scoring=scoring, coded=coded, delta=float(opts.delta), extra_bits=float(opts.extra_bits),
        vocab_size=int(st.vocab_size), alphas=tuple(st.alphas), model=model, data=tuple(f.info for f in files),
        summary={"count": int(st.count), "mean_nll_bits": st.mean_nll_bits, "top1_error": st.topk_error(1),
                 "mean_bits": {str(a): v for a, v in st.mean_bits.items()}},
        histogram=total.histogram_dict(), by_context_length=by_ctx, context_length_bounds=ctx_bounds,
        context_length_bounds_note=note, configuration=configuration, run=run, recompute=recompute)


# ----------------------------------------------------------------------------- bounds
def compute_bounds(doc: dict[str, Any], ev: Evaluation):
    """:func:`tokenbounds.bounds.from_stats` of the whole stats.json document."""
    from ..bounds import from_stats

    return from_stats(doc, ev.coded.coded_bits, ev.m, delta=ev.delta, extra_bits=ev.extra_bits,
                      vocab_size=ev.vocab_size, full_pass=ev.scoring.full_pass, topk=(1, 10))


def bounds_table(doc: dict[str, Any], ev: Evaluation):
    """The bound table of a stats.json document. ``from_stats`` reads the sampling design from the
    document itself: a full pass (no sampling term), the s i.i.d. window-unit draws of
    ``unit_stats`` (never the s x S tokens of the drawn units as if independent; spec section 3b),
    or a per-token sample."""
    table = compute_bounds(doc, ev)
    units = doc.get("unit_stats")
    if units is not None and table.inputs.get("s") != units["draws"]:
        raise RuntimeError(f"from_stats used s = {table.inputs.get('s')} but the sample is {units['draws']} "
                           "window-unit draws")
    return table


# ----------------------------------------------------------------------------- plots
def _plots(out: str, table, ev: Evaluation) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    uniform = math.log2(ev.vocab_size)
    written.append(_decomposition_plot(plt, out, table, uniform))
    written += _loss_plots(plt, out, ev, uniform)
    return written


def _decomposition_plot(plt, out: str, table, uniform: float) -> str:
    rows = [r for r in table.rows() if not r["bound"].startswith("top-") and r["kind"] == "high-probability"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.8))
    y = np.arange(len(rows))
    emp = np.array([r["empirical"] for r in rows])
    comp = np.array([r["complexity"] for r in rows])
    samp = np.array([r["sampling"] for r in rows])
    ax.barh(y, emp, color="#4c72b0", label="empirical")
    ax.barh(y, comp, left=emp, color="#dd8452", label="complexity (or Freedman gap)")
    ax.barh(y, samp, left=emp + comp, color="#55a868", label="sampling")
    ax.axvline(uniform, color="k", ls="--", lw=1, label=f"uniform predictor log2 V = {uniform:.2f}")
    ax.set_yticks(y, [r["bound"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bits per token")
    ax.set_title("Bound decomposition")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    path = os.path.join(out, "bound_decomposition.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss_plots(plt, out: str, ev: Evaluation, uniform: float) -> list[str]:
    written = []
    hist = ev.histogram
    counts = np.array(hist["counts"])
    width = hist["bin_width_bits"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(counts.size) * width, counts, width=width, align="edge", color="#4c72b0")
    ax.set_xlabel("-log2 p(y) (bits)")
    ax.set_ylabel("tokens (with multiplicity)")
    ax.set_title(f"Loss histogram ({ev.summary['count']:,} tokens; overflow >= {hist['range_bits'][1]:g} bits: "
                 f"{hist['overflow']})")
    nz = np.flatnonzero(counts)
    if nz.size:
        ax.set_xlim(0, (nz[-1] + 2) * width)
    fig.tight_layout()
    path = os.path.join(out, "loss_histogram.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    bc = ev.by_context_length
    keep = [i for i, n in enumerate(bc["count"]) if n]
    x = [(bc["context_tokens_from"][i] + bc["context_tokens_to"][i]) / 2 for i in keep]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, [bc["mean_nll_bits"][i] for i in keep], "o-", label="mean loss -log2 p(y)")
    if ev.context_length_bounds:
        cb = ev.context_length_bounds
        xb = [(r["context_from"] + r["context_to"]) / 2 for r in cb]
        ax.plot(xb, [r["empirical_bits"] for r in cb], "s-", label="smoothed empirical (chosen alpha)")
        ax.plot(xb, [r["bound_bits"] for r in cb], "^-", label="bound on the bucket (full pass, union paid)")
    ax.axhline(uniform, color="k", ls="--", lw=1, label="log2 V")
    if len(x) > 1 and max(x) / max(min(x), 1) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("context tokens before the target")
    ax.set_ylabel("bits per token")
    ax.set_title("Loss by context length")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "loss_by_position.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# ----------------------------------------------------------------------------- report.md
def _scoring_lines(ev: Evaluation) -> list[str]:
    sc = ev.scoring
    prefix = (f"prefix token {sc.prefix_token} ({sc.prefix_token_source})" if sc.prefix_token is not None
              else f"no prefix token ({sc.prefix_token_source})")
    eot = (f"each context starts at the last end-of-text token (id {sc.eot_id}) before its target" if sc.reset_at_eot
           else "contexts may cross end-of-text tokens")
    if sc.mode == "windows":
        rule = (f"windows of T = {sc.window} tokens scoring their last S = {sc.stride} targets (every target sees "
                f">= {sc.window - sc.stride + 1} tokens except near a file start); {prefix}; {eot}")
    else:
        rule = f"per-token contexts: each target read from the up-to-{sc.window} tokens before it; {prefix}; {eot}"
    if sc.full_pass:
        sample = (f"**full pass**: all {sc.units:,} units once, every one of the m = {ev.m:,} data points scored "
                  "exactly once (no sampling term)")
    elif sc.mode == "windows":
        sample = (f"**window-unit sample** (cluster sampling): s = {sc.draws:,} data points drawn uniformly with "
                  f"replacement (seed {sc.seed}, sha256 `{(sc.draws_sha256 or '')[:16]}`), each standing for its "
                  f"unit's mean loss; {sc.units_scored:,} distinct units of {sc.units:,} scored ({sc.scored_tokens:,} "
                  "tokens; a unit drawn twice is scored once and counted twice)")
    else:
        sample = (f"**per-token sample**: s = {sc.draws:,} tokens drawn uniformly with replacement (seed {sc.seed}, "
                  f"sha256 `{(sc.draws_sha256 or '')[:16]}`), {sc.units_scored:,} distinct")
    return [f"* context rule: {rule}; mean context {sc.mean_context_tokens:.1f} tokens", f"* sample: {sample}"]


def render_report(table, ev: Evaluation, plots: list[str]) -> str:
    """report.md from the Evaluation and the bound table (reads them only)."""
    model, coded = ev.model, ev.coded
    q = model.quantization
    lines = ["# tokenbounds evaluate report", ""]
    lines.append(f"* model: `{model.path}` ({model.kind}, {model.model_class}, {model.num_parameters:,} parameters, "
                 f"evaluated in {model.dtype}); fingerprint `{model.fingerprint['sha256'][:16]}`")
    if q.get("already_quantized"):
        lines.append(f"* **already quantized checkpoint**: {q.get('note')}")
        if q.get("format") == "GGUF":
            lines.append(f"  (GGUF `{q.get('gguf_file')}`, type {q.get('gguf_type')}: {q.get('weight_bits')}-bit "
                         "GGUF weights)")
    elif q.get("format"):
        lines.append(f"* checkpoint format: {q.get('note', q.get('format'))}")
    for d in ev.data:
        lines.append(f"* data: `{d['path']}` ({d['format']}, {d['n_tokens']:,} tokens, sha256 `{d['sha256'][:16]}`)")
    lines.append(f"* m = {ev.m:,} data points ({ev.m_source})")
    lines += _scoring_lines(ev)
    lines.append(f"* V = {ev.vocab_size:,}; delta = {ev.delta}; extra bits = {ev.extra_bits:g}")
    lines.append(f"* **coded size** ({coded.method}): {coded.description}")
    st = ev.summary
    lines.append(f"* mean unsmoothed loss {st['mean_nll_bits']:.4f} bits/token ({st['mean_nll_bits'] * math.log(2):.4f} "
                 f"nats); top-1 error {st['top1_error']:.4f} (over {st['count']:,} tokens with multiplicity)")
    lines += ["", "## Bounds (bits per token unless the row is an error rate)", ""]
    lines += ["```", table.format_table(), "```", ""]
    lines.append("| bound | value | empirical | complexity / gap | sampling | alpha | vacuous | a bound at delta |")
    lines.append("|---|---:|---:|---:|---:|---:|---|---|")
    for r in table.rows():
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(f"| {r['bound']} | {r['value']:.5f} | {r['empirical']:.5f} | {r['complexity']:.5f} | "
                     f"{r['sampling']:.5f} | {alpha} | {r['vacuous']} | {'yes' if r['valid'] else '**no** (' + r['kind'] + ')'} |")
    cfg = ev.configuration
    k = int(cfg["configurations_recorded"])
    lines += ["", "## What the bound assumes", "",
              "Each bound holds with probability >= 1 - delta for a configuration (model, C, data, context rule, "
              "sample, delta, extra bits) **fixed before seeing the sample**. Every run's configuration is recorded "
              f"in `{os.path.basename(cfg['configurations_file'])}`: this directory holds {k} distinct one(s). If this "
              "configuration was chosen among K tried after looking at their results, pay for the choice with "
              f"`--extra-bits log2(K)` (here K = {k}: {math.log2(max(k, 1)):.3f} bits) on top of any other post-hoc "
              f"choice. Configuration sha256 `{cfg['config_sha256'][:16]}`.", ""]
    lines += ["## Loss by context length", "", ev.context_length_bounds_note, ""]
    if ev.context_length_bounds:
        lines.append("| context tokens | m_b | mean loss | token bound | Freedman bound | best | alpha |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in ev.context_length_bounds:
            lines.append(f"| {r['context_from']}-{r['context_to']} | {r['m_b']:,} | {r['mean_nll_bits']:.4f} | "
                         f"{r['token_bound_bits']:.4f} | {r['freedman_bound_bits']:.4f} | {r['bound_bits']:.4f} | "
                         f"{r['alpha']:g} |")
    else:
        bc = ev.by_context_length
        lines.append("| context tokens | tokens | mean loss (bits) |")
        lines.append("|---|---:|---:|")
        for lo, hi, n, v in zip(bc["context_tokens_from"], bc["context_tokens_to"], bc["count"], bc["mean_nll_bits"],
                                strict=True):
            if n:
                lines.append(f"| {lo}-{hi} | {n:,} | {v:.4f} |")
    lines += ["", "Recompute: `" + ev.recompute + "`", ""]
    if plots:
        lines.append("## Plots")
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    run = ev.run
    rate = run.tokens_this_run_rank0 / run.seconds_eval_this_run if run.seconds_eval_this_run > 0 else float("nan")
    lines += ["", f"Run: {run.world_size} process(es) on {run.device} ({run.threads} thread(s), load "
              f"{run.load_average}), batches of {run.batch_size} units, {run.blocks} blocks of {run.checkpoint_every} "
              f"batches; scored {run.tokens_this_run_rank0:,} tokens on rank 0 in {run.seconds_eval_this_run:.1f} s "
              f"({rate:,.0f} tokens/s), {run.seconds_total:.1f} s total; log in evaluate.log.", ""]
    return "\n".join(lines)


def write_outputs(out: str, total, ev: Evaluation, *, plots: bool = True) -> dict[str, Any]:
    """Write stats.json, bounds.json, report.md and the plots; returns the stats.json content."""
    doc: dict[str, Any] = dict(total.stats.state_dict())
    if total.units is not None:
        doc["unit_stats"] = total.units.state_dict()
    doc["evaluation"] = ev.to_dict()
    atomic_write_json(os.path.join(out, "stats.json"), doc)
    table = bounds_table(doc, ev)
    bounds_doc = {"format": "tokenbounds.bounds/1", **table.to_dict(),
                  "coded": thaw(ev.coded), "quantization": thaw(ev.model.quantization)}
    atomic_write_json(os.path.join(out, "bounds.json"), bounds_doc)
    written = _plots(out, table, ev) if plots else []
    atomic_write_text(os.path.join(out, "report.md"), render_report(table, ev, written))
    logging.getLogger("tokenbounds.evaluate").info(
        "wrote %s/{stats.json,bounds.json,report.md}; best bound %.4f bits/token (%s)", out,
        table.best["bound_bits"], table.best["label"])
    return doc
