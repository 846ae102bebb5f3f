"""When is a pruned model really slower? Against the A/A noise band.

Two sessions of the *same* model, timed side by side, differ: a busy neighbour, where each
session's buffers landed, which thread the scheduler woke. On the report set's small models,
pruned models that kept every MAC (nothing to gain, nothing to lose) timed 0.57-1.55x their
original. A single ratio cannot tell that from a real slow-down, so every timing of original
against pruned also times the original against a second session of itself, interleaved with
them, the same number of runs (A A' B in every order, :func:`onnxslim_bn.app.bench._alternate`).

The band around 1.0 is ``exp(±half)`` with ``half = |ln(A'/A)| + margin`` (never under
:data:`FLOOR`, 3%): the distance the two
copies of the original ended apart (medians), plus the 95th percentile of how far the
pruned / original ratio moves when the interleaved passes are resampled (a paired bootstrap,
seeded). The first term is the session-to-session offset this run happened to show, the second
the run-to-run scatter of the ratio itself. A ratio above the band is ``slower``, below it
``faster``, inside it ``same``: no difference this timing can see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

VERDICTS = ("faster", "same", "slower")  # best first
# the band is never narrower than 3% either side: on the fixtures under load, two sessions of one
# model ended a median 2-4% apart, and a copy that happened to agree within 1% (the first term
# near 0) with a steady ratio (the second near 0) called an identical model 1.01x slower
FLOOR = math.log(1.03)
BOOTSTRAP = 200  # resamples of the passes
QUANTILE = 95  # percentile of the resampled ratios' distance from the measured one


@dataclass(frozen=True)
class NoiseBand:
    """The A/A noise band of one timing of original (A), its copy (A') and pruned (B)."""

    aa: float  # median(A') / median(A): what two sessions of the same model differed by
    margin: float  # the pruned / original ratio's own bootstrap margin, in log units
    floor: float = 0.0  # the narrowest half-width (log units): :data:`FLOOR` from a timing

    @property
    def half(self) -> float:
        """Half the band's width in log units."""
        return max(abs(math.log(self.aa)) + self.margin, self.floor)

    @property
    def low(self) -> float:
        return math.exp(-self.half)

    @property
    def high(self) -> float:
        return math.exp(self.half)

    def verdict(self, ratio: float) -> str:
        """``ratio`` = pruned ms / original ms: 'slower' above the band, 'faster' below, else 'same'."""
        if ratio > self.high:
            return "slower"
        if ratio < self.low:
            return "faster"
        return "same"

    def describe(self) -> str:
        return f"A/A band {self.low:.2f}-{self.high:.2f}x"

    def to_dict(self) -> dict:
        return {**asdict(self), "low": self.low, "high": self.high}


ZERO = NoiseBand(1.0, 0.0)  # no copy timed: any difference counts (how the tool judged before)


def noise_band(original: Sequence[float], copy: Sequence[float], pruned: Sequence[float], seed: int = 0) -> NoiseBand:
    """The band from per-run times (any unit) of the original, its copy and the pruned model.

    The three lists are the interleaved passes, pass ``i`` being ``original[i]``, ``copy[i]``,
    ``pruned[i]``; they must be equally long (the same number of repeats)."""
    a, a2, b = (np.asarray(x, dtype=np.float64) for x in (original, copy, pruned))
    if not (len(a) == len(a2) == len(b)) or not len(a):
        raise ValueError(f"the A/A band needs as many runs of each model, got {len(a)}, {len(a2)}, {len(b)}")
    aa = float(np.median(a2) / np.median(a))
    measured = math.log(float(np.median(b) / np.median(a)))
    picks = np.random.default_rng(seed).integers(0, len(a), size=(BOOTSTRAP, len(a)))
    resampled = np.log(np.median(b[picks], axis=1) / np.median(a[picks], axis=1))
    margin = float(np.percentile(np.abs(resampled - measured), QUANTILE))
    return NoiseBand(aa, margin, FLOOR)


def rank(verdict: str) -> int:
    """0 for 'faster', 1 for 'same', 2 for 'slower'."""
    return VERDICTS.index(verdict)


__all__ = ["FLOOR", "NoiseBand", "VERDICTS", "ZERO", "noise_band", "rank"]
