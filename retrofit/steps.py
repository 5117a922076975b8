"""Runs counted in optimizer steps, not epochs: where Lightning's epoch-minded defaults do not fit them.

``retrofit fit`` and :func:`retrofit.retrofit` train for ``max_steps`` over as many epochs as that takes;
a small image folder is a few batches per epoch.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.utilities.warnings import PossibleUserWarning

LOG_EVERY_N_STEPS = 50  # Lightning's own default, kept for long runs
LOG_POINTS = 10  # the fewest logged steps a shorter run gets


def log_interval(max_steps: int) -> int:
    """Lightning's 50 steps, or often enough that a shorter run still logs about ten times (at 50, a 40-step run
    logged nothing and wrote no metrics.csv)."""
    if max_steps <= 0:  # bounded by epochs
        return LOG_EVERY_N_STEPS
    return max(1, min(LOG_EVERY_N_STEPS, max_steps // LOG_POINTS))


def ignore_epoch_warnings() -> None:
    """Lightning warns when an epoch has fewer batches than the logging interval; a run counted in steps logs
    across epochs, so the warning is about nothing here."""
    warnings.filterwarnings("ignore", r"The number of training batches \(\d+\) is smaller than the logging interval",
                            PossibleUserWarning)
