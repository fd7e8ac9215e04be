"""Outputs of a prequential run: the JSON document, a text table and the PNG figure.

The figure has three panels: (1) MDL(n) and N_tok(n) L_test(n) against the training rows n
(their gap is EDL), (2) EDL per sample against n with standard errors over seeds (the
elicitation / teaching signature), (3) each batch's prequential loss (bits per token, seed
``seeds[0]``) with the final model's held-out loss.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["format_table", "plot_prequential", "plot_toys", "write_outputs"]


def _fmt(v: float | None, se: float | None = None, digits: int = 4) -> str:
    if v is None:
        return "-"
    s = f"{v:.{digits}g}"
    return s if se is None else f"{s} +- {se:.2g}"


def format_table(summary: dict[str, Any]) -> str:
    """One line per prefix: rows, tokens, MDL, L_test, EDL and its normalisations (mean +- SE)."""
    head = ("| rows n | tokens | MDL bits | L_test bits/token | EDL bits | EDL / sample | EDL / token | "
            "EDL / trained param |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in summary["prefixes"]:
        out.append(
            f"| {p['rows']:,} | {p['tokens']:,} | {_fmt(p['mdl_bits'], p['mdl_bits_se'])} | "
            f"{_fmt(p['test_loss_bits'], p['test_loss_bits_se'])} | {_fmt(p['edl_bits'], p['edl_bits_se'])} | "
            f"{_fmt(p['edl_per_sample'], p['edl_per_sample_se'])} | {_fmt(p['edl_per_token'], p['edl_per_token_se'])} | "
            f"{_fmt(p['edl_per_parameter'], p['edl_per_parameter_se'])} |")
    return "\n".join(out)


def plot_prequential(summary: dict[str, Any], path: str, title: str = "") -> str:
    """Write the three-panel PNG (see the module docstring); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pre = summary["prefixes"]
    n = np.array([p["rows"] for p in pre], float)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    mdl = np.array([p["mdl_bits"] for p in pre])
    nl = np.array([p["tokens"] * p["test_loss_bits"] for p in pre])
    ax[0].plot(n, mdl, "o-", label="MDL(n): prequential code")
    ax[0].plot(n, nl, "s--", label="N_tok(n) L_test(theta_n)")
    ax[0].fill_between(n, nl, mdl, alpha=0.15, label="EDL(n)")
    ax[0].set(xscale="log", yscale="log", xlabel="training rows n", ylabel="bits", title="code lengths")
    ax[0].legend(fontsize=8)
    e = np.array([p["edl_per_sample"] for p in pre])
    se = np.array([p["edl_per_sample_se"] or 0.0 for p in pre])
    ax[1].errorbar(n, e, yerr=se, fmt="o-", capsize=3)
    ax[1].axhline(0.0, color="grey", lw=0.8)
    ax[1].set(xscale="log", xlabel="training rows n", ylabel="EDL(n) / n  [bits per sample]",
              title=f"EDL per sample ({summary['num_seeds']} seed(s), +- SE)")
    seed0 = summary["per_seed"][0]
    steps = np.asarray(seed0["step_loss_bits"]) / max(1, seed0["train_tokens_per_step"])
    k = max(1, steps.size // 200)
    smooth = np.convolve(steps, np.ones(k) / k, mode="valid") if steps.size >= k else steps
    x = np.arange(smooth.size) + k
    ax[2].plot(x * seed0["rows_per_step"], smooth, lw=1, label=f"batch loss before its update (mean of {k})")
    ax[2].axhline(seed0["final"]["test_loss_bits"], color="C3", ls="--", label="final model, held out")
    ax[2].set(xscale="log", xlabel="training rows seen", ylabel="bits per token",
              title=f"prequential losses (seed {seed0['seed']})")
    ax[2].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    """tight_layout, write ``path`` atomically (tmp + rename), close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_outputs(out_dir: str, summary: dict[str, Any], *, plots: bool = True, title: str = "") -> dict[str, str]:
    """``prequential.json`` (atomic) and ``prequential.png``; returns their paths."""
    from ..eval.fileio import atomic_write_text

    paths = {"json": os.path.join(out_dir, "prequential.json")}
    if plots:
        paths["png"] = plot_prequential(summary, os.path.join(out_dir, "prequential.png"), title)
    atomic_write_text(paths["json"], json.dumps({**summary, "outputs": paths}, indent=1, allow_nan=True,
                                                default=float))
    return paths


def plot_toys(results: dict[str, dict[str, Any]], path: str) -> str:
    """The benchmark figure of the toy tasks: random labels, the coupon collector against its
    theory, and elicitation vs teaching (EDL per sample; EDL per trained parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def curve(res, key="edl_per_sample"):
        pre = res["prefixes"]
        return (np.array([p["rows"] for p in pre], float), np.array([p[key] for p in pre]),
                np.array([p.get(key + "_se") or 0.0 for p in pre]))

    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    r = results["random_labels"]
    for key, lab in (("edl", "EDL (right)"), ("edl_after_update", "scored after update"),
                     ("edl_train_loss", "train loss as L_test"), ("edl_final_code", "final model as code")):
        x, y, s = curve(r, key + "_per_sample")
        ax[0].errorbar(x, y, yerr=s, fmt="o-" if key == "edl" else ".--", capsize=2, label=lab)
    ax[0].set(xscale="log", xlabel="rows n", ylabel="bits per sample", title="random labels: EDL ~ 0")
    ax[0].legend(fontsize=7)
    c = results["coupon_collector"]
    u = np.array([p["u"] for p in c["prefixes"]])
    uu = np.linspace(0, u.max(), 200)
    ax[1].plot(uu, 1 - (1 + uu) * np.exp(-uu), "k-", label="theory 1 - (1+u) e^-u")
    for key, lab, fmt in (("fraction", "measured", "o"), ("fraction_after_update", "scored after update", "x"),
                          ("fraction_train_loss", "train loss as L_test", "+")):
        ax[1].errorbar(u, [p[key] for p in c["prefixes"]], yerr=[p.get(key + "_se") or 0 for p in c["prefixes"]],
                       fmt=fmt, capsize=2, label=lab)
    ax[1].set(xlabel="u = n / K", ylabel="EDL / (K Delta)", title=f"coupon collector (K = {c['toy']['K']})")
    ax[1].legend(fontsize=7)
    for name, res in (("elicitation", results["elicitation"]), ("teaching", results["teaching"])):
        x, y, s = curve(res)
        ax[2].errorbar(x, y, yerr=s, fmt="o-", capsize=2, label=name)
    ax[2].set(xscale="log", xlabel="rows n", ylabel="EDL(n) / n  [bits per sample]",
              title="elicitation falls, teaching rises then falls")
    ax[2].legend(fontsize=8)
    names = [k for k in ("elicitation", "teaching", "elicitation_lora", "teaching_lora") if k in results]
    vals = [results[k]["final"]["edl_per_parameter"] for k in names]
    errs = [results[k]["final"]["edl_per_parameter_se"] or 0 for k in names]
    ax[3].bar(range(len(names)), vals, yerr=errs, capsize=3, color=["C0", "C1", "C0", "C1"][: len(names)])
    for i, k in enumerate(names):  # did the run learn the task at all?
        ax[3].annotate(f"L_test {results[k]['final']['test_loss_bits']:.2f}", (i, vals[i]), ha="center",
                       textcoords="offset points", xytext=(0, 4), fontsize=7)
    ax[3].set_xticks(range(len(names)), [k.replace("_", "\n") for k in names], fontsize=8)
    ax[3].set(yscale="log", ylabel="EDL / trained parameter  [bits]", title="EDL per trained parameter (final n)")
    return _save(fig, path)
