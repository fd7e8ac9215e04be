"""The compute-optimal scaling study (issue 16): ``tokenbounds scaling`` / ``make scaling``.

:mod:`~tokenbounds.scaling.corpus` builds the shuffled-chunk corpus mix,
:mod:`~tokenbounds.scaling.sweep` trains / quantizes / bounds each size on its own first D = 20 N
tokens, :mod:`~tokenbounds.scaling.report` fits power laws and writes the table and the figure.
"""

from __future__ import annotations

from .sweep import (
    SCALING_CONFIG,
    SCALING_GRID,
    TINY_SCALING_CONFIG,
    ScalingConfig,
    run_sweep,
    sweep_plan,
)

__all__ = ["SCALING_CONFIG", "SCALING_GRID", "TINY_SCALING_CONFIG", "ScalingConfig", "run_sweep", "sweep_plan"]
