"""The dead level: the score at or below which a channel counts as dead (the walk's
--max-layer-ratio spares those, rounding may take them)."""

from __future__ import annotations

import numpy as np


def dead_level(scores: np.ndarray) -> float:
    """The score at or below which channels count as dead, or 0 (exact zeros only) when the
    scores show no dead cluster -- as in models trained without the L1 penalty.

    Network Slimming's sparsity leaves the log-scores bimodal: live gammas around 0.1-1, dead
    ones decades below. The split is Otsu's threshold on log10 scores, accepted when the two
    classes explain at least 80% of the variance (a single normal mode explains 64%) and their
    means lie at least two decades apart (a layer whose gammas all shrank together, a decade or
    so below the rest, is alive: the next BN renormalises it); the level is the highest score
    of the lower class."""
    values = np.sort(np.asarray(scores, np.float64)[np.isfinite(scores)])
    values = values[values > 0]  # exact zeros are dead whatever the split: they would be a class of their own
    if len(values) < 4:
        return 0.0
    logs = np.log10(values)
    n = np.arange(1, len(logs))
    low_mean = np.cumsum(logs)[:-1] / n
    high_mean = (logs.sum() - np.cumsum(logs)[:-1]) / (len(logs) - n)
    between = n * (len(logs) - n) * (low_mean - high_mean) ** 2 / len(logs) ** 2
    k = int(np.argmax(between))
    total = logs.var()
    if total <= 0 or between[k] / total < 0.8 or high_mean[k] - low_mean[k] < 2.0:
        return 0.0
    return float(values[k])


# data scores (data_importance: a channel's share of its consumers' output variance) at or below
# this are dead: measured, the channels Network Slimming killed score 0 or at most 2e-8 at their
# consumers (the sparse fixtures), the live channels of the ordinary fixtures at least 7.6e-5
DATA_DEAD_SHARE = 1e-6


def data_dead_level(scores: np.ndarray) -> float:
    """The dead level of data scores: they are shares of measured variance, on one absolute
    scale, so a dead channel is one whose removal costs its consumers at most
    :data:`DATA_DEAD_SHARE` of their output variance -- not a cluster found by shape (the
    data scores of an ordinary model can be bimodal where nothing is dead: a split would
    exempt live channels from --max-layer-ratio)."""
    values = np.asarray(scores, np.float64)
    dead = values[np.isfinite(values) & (values <= DATA_DEAD_SHARE)]
    return float(dead.max()) if len(dead) else 0.0

