"""PNG plots of the scaling pipeline (:mod:`tokenbounds.eval.pipeline`): bounds and their
components against model size. matplotlib is imported lazily with the Agg backend (no display)."""

from __future__ import annotations

from typing import Any

__all__ = ["plot_scaling"]



def plot_scaling(result: dict[str, Any], path: str) -> str:
    """Two panels against the parameter count N (log axis):

    * left: the token-level bound, the empirical Freedman bound, the best bound (each of K
      candidates at delta / K), the quantized model's empirical smoothed loss at the token
      bound's alpha, the unquantized model's loss and the uniform predictor log2 V;
    * right: stacked components (empirical + complexity + sampling for the token-level bound;
      empirical + sampling + gap for Freedman, whose gap = complexity + variance term).

    Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    n = [m["parameters"] for m in models]
    names = [m["name"] for m in models]
    from .pipeline import _bound_of

    tok = [_bound_of(m, "token") for m in models]
    fre = [_bound_of(m, "freedman") for m in models]
    best = [m["bounds"]["best"]["bound_bits"] for m in models]
    k_best = len(models[0]["bounds"]["best"]["among"])
    emp = [b["empirical_bits"] for b in tok]
    fp = [m["losses"]["unquantized_nll_bits"] for m in models]
    qn = [m["losses"]["quantized_nll_bits"] for m in models]
    uniform = result["uniform_baseline_bits"]

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 6))
    ax.plot(n, [b["bound_bits"] for b in tok], "o-", label="token-level bound (union over alpha)")
    ax.plot(n, [b["bound_bits"] for b in fre], "s-", label="empirical Freedman bound (union over alpha)")
    ax.plot(n, best, "k*--", label=f"best of {k_best} (paid: delta/{k_best})")
    ax.plot(n, emp, "^:", label="empirical smoothed loss, quantized (token bound's alpha)")
    ax.plot(n, qn, "v:", label="empirical loss, quantized (unsmoothed)")
    ax.plot(n, fp, "d:", label="empirical loss, unquantized (unsmoothed)")
    ax.axhline(uniform, color="r", ls="--", label=f"uniform predictor log2 V = {uniform:.2f}")
    ax.set_xscale("log")
    tpp = result["config"]["tokens_per_parameter"]
    ax.set_xlabel(f"parameters N (each trained on D = {tpp:g} N tokens)")
    ax.set_ylabel("bits per token")
    ax.set_title("bounds vs model size")
    for x, name in zip(n, names, strict=True):
        ax.annotate(name, (x, uniform), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax.grid(alpha=0.3)

    import numpy as np

    x = np.arange(len(models))
    w = 0.38
    parts_t = [("empirical", [b["empirical_bits"] for b in tok], "C0"),
               ("complexity", [b["complexity_bits"] for b in tok], "C1"),
               ("sampling", [b["sampling_bits"] for b in tok], "C2")]
    parts_f = [("empirical", [b["empirical_bits"] for b in fre], "C0"),
               ("sampling", [b["sampling_bits"] for b in fre], "C2"),
               ("gap (complexity + variance)", [b["gap_bits"] for b in fre], "C3")]
    for offset, parts, hatch, tag in ((-w / 2, parts_t, "", "token"), (w / 2, parts_f, "//", "Freedman")):
        bottom = np.zeros(len(models))
        for label, vals, color in parts:
            bx.bar(x + offset, vals, w, bottom=bottom, color=color, hatch=hatch, edgecolor="k", lw=0.5,
                   label=f"{tag}: {label}")
            bottom += np.asarray(vals)
    bx.axhline(uniform, color="r", ls="--")
    bx.set_xticks(x, [f"{nm}\nN={p:,}" for nm, p in zip(names, n, strict=True)])
    bx.set_ylabel("bits per token")
    bx.set_title("components (left bar: token-level; right, hatched: Freedman)")
    bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
