"""Run-time settings shared by the long-running commands."""

from __future__ import annotations

import os


def choose_threads(requested: int | None) -> int:
    """torch CPU threads for a run: ``requested`` when > 0, else torch's default, or 1 when the
    machine is already busy (load average above the core count). OpenMP threads that spin-wait
    on oversubscribed cores made small-model evaluation 8-12x slower than one thread here."""
    import torch

    if requested and requested > 0:
        return int(requested)
    default = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5
    except OSError:
        busy = False
    return 1 if busy else default
