"""Spectral-density plot (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations


def plot_density(density, path: str, *, title: str | None = None) -> str:
    """Density on a log scale with a +-2 standard-error band and the Ritz values as a rug."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    grid = density.grid.numpy()
    value = density.value.numpy()
    err = torch.nan_to_num(density.stderr, posinf=0.0).numpy()
    floor = max(float(value.max()) * 1e-8, 1e-300)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(grid, value.clip(floor), lw=1.2, label="density")
    ax.fill_between(grid, (value - 2 * err).clip(floor), (value + 2 * err).clip(floor), alpha=0.3, label="+-2 s.e.")
    ritz = density.ritz_values[~torch.isnan(density.ritz_values)].numpy()
    ax.plot(ritz, [floor] * len(ritz), "|", color="k", alpha=0.4, label="Ritz values")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or f"Hessian spectral density (n={density.n}, {density.num_matvecs} matvecs)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
