"""The distribution of channel scores: the picture a Network Slimming user chooses a cut from.

Scores (|gamma|, or the recovered scale of folded BN) of the prunable spaces, on a log scale,
per source kind, with the cut the given ratio or threshold makes and the *dead cluster*.

The dead cluster is :func:`onnxslim_bn.passes.select.dead_level`'s (one definition for the picture and
the prune summary): the log10 scores are split in two where the split best separates them
(Otsu's criterion), and the lower group is dead when the split explains most of the variance
and the two groups' mean log scores lie at least two decades (a factor of 100) apart. Sparsity
training drives dead gammas to 1e-8 ... 1e-4 while live ones stay near 1e-2 ... 1: on the four
trained fixtures the split falls between 9e-5 and 3e-4 and the groups lie 4.3-4.8 decades
apart; the lower group holds 43 / 83 / 207 / 373 channels where fixtures/train.py counted
47 / 89 / 230 / 391 below 1e-3. On scores without such a cliff (a plain |N(0.5, 0.2)|) the
groups lie 0.4-0.8 decades apart: no dead cluster.

(The simpler rule "the largest gap between consecutive sorted scores below the median" was
measured first and rejected: on the same fixtures its largest gap is 0.3-0.7 decades and falls
inside the dead group or its tail, e.g. between the two smallest of VGG's 304 scores; and when
more than half of the channels are dead, as in the MobileNetV2 fixture, the median lies inside
the dead group.)
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BnSlimError
from ..passes.select import dead_level
from .report import SpaceReport

MIN_SEPARATION_DECADES = 2.0  # as plan.dead_level: groups closer than a factor of 100 are one group
FLOOR = 1e-12  # scores of exactly 0 are drawn here on the log axis
PLOT_HINT = "pip install 'onnx-bnslim[plot]'"


@dataclass
class DeadCluster:
    channels: int  # how many channels lie below the gap
    below: float  # the largest score in the cluster
    above: float  # the smallest score above the gap
    decades: float  # how far apart the two groups' mean log10 scores lie

    @property
    def boundary(self) -> float:
        """The geometric middle between the cluster's largest score and the next: a threshold that separates it."""
        return math.sqrt(max(self.below, FLOOR) * self.above)

    def to_dict(self) -> dict:
        return {"channels": self.channels, "below": self.below, "above": self.above, "decades": self.decades,
                "boundary": self.boundary}


def scores_by_kind(spaces: list[SpaceReport]) -> dict[str, np.ndarray]:
    """Finite scores of the prunable spaces, grouped by where they came from (bn / folded / mul)."""
    out: dict[str, list[float]] = {}
    for s in spaces:
        if s.blocked is None and s.scores:
            out.setdefault(s.source or "?", []).extend(v for v in s.scores if math.isfinite(v))
    return {k: np.asarray(v, np.float64) for k, v in sorted(out.items()) if v}


def dead_cluster(scores: np.ndarray) -> DeadCluster | None:
    """The channels at or below :func:`onnxslim_bn.passes.select.dead_level` (the level the prune summary
    counts live channels against), with how far the two groups' mean log scores lie apart."""
    values = np.sort(np.asarray(scores, np.float64)[np.isfinite(scores)])
    level = dead_level(values)
    low, high = values[values <= level], values[values > level]
    if level <= 0 or not len(low) or not len(high):
        return None
    logs = np.log10(np.maximum(values, FLOOR))
    separation = float(logs[len(low):].mean() - logs[: len(low)].mean())
    return DeadCluster(len(low), float(low[-1]), float(high[0]), separation)


def cut_value(spaces: list[SpaceReport], threshold: float | None) -> float | None:
    """Where the cut falls: the threshold, or (for a ratio) the largest finite score of a removed channel."""
    if threshold is not None:
        return threshold if math.isfinite(threshold) else None
    removed = [s.scores[i] for s in spaces if s.blocked is None and s.scores for i in s.removed
               if math.isfinite(s.scores[i])]
    return max(removed) if removed else None


def summary(spaces: list[SpaceReport], threshold: float | None = None) -> dict:
    groups = scores_by_kind(spaces)
    everything = np.concatenate(list(groups.values())) if groups else np.zeros(0)
    cluster = dead_cluster(everything)
    return {"channels": int(len(everything)), "by_kind": {k: int(len(v)) for k, v in groups.items()},
            "cut": cut_value(spaces, threshold), "dead_cluster": None if cluster is None else cluster.to_dict()}


def ascii_histogram(spaces: list[SpaceReport], threshold: float | None = None, bins: int = 16, width: int = 40) -> str:
    """One row per log10 bin: a bar per source kind (first letter), the cut and the dead cluster marked."""
    groups = scores_by_kind(spaces)
    if not groups:
        return "No prunable channel has a score: nothing to draw."
    everything = np.maximum(np.concatenate(list(groups.values())), FLOOR)
    edges = np.linspace(math.floor(np.log10(everything.min())), math.ceil(np.log10(everything.max()) + 1e-9), bins + 1)
    counts = {k: np.histogram(np.log10(np.maximum(v, FLOOR)), edges)[0] for k, v in groups.items()}
    total = sum(counts.values())
    scale = width / max(int(total.max()), 1)
    cut, cluster = cut_value(spaces, threshold), dead_cluster(everything)
    marks = {k: k[0] for k in groups} if len(groups) > 1 else {k: "#" for k in groups}
    lines = [f"Channel scores (log10 |scale|), {len(everything)} channels"
             + ("; " + ", ".join(f"{c} = {k}" for k, c in marks.items()) if len(groups) > 1 else f" ({next(iter(groups))})")]
    for b in range(bins):
        lo, hi = 10 ** edges[b], 10 ** edges[b + 1]
        bar = "".join(marks[k] * int(round(counts[k][b] * scale)) for k in groups)
        if total[b] and not bar:
            bar = "."
        notes = []
        if cut is not None and lo <= cut < hi:
            notes.append("<- cut")
        if cluster is not None and lo <= cluster.below < hi:
            notes.append(f"<- dead cluster ends ({cluster.channels} channels)")
        lines.append(f"{lo:8.1e} .. {hi:8.1e} | {bar:<{width}} {int(total[b]):>5} {' '.join(notes)}".rstrip())
    lines.append(_legend(cut, cluster))
    return "\n".join(lines)


def _legend(cut: float | None, cluster: DeadCluster | None) -> str:
    parts = [f"cut at {cut:.3g}" if cut is not None else "no cut (give --ratio or --threshold)"]
    if cluster is None:
        parts.append(f"no dead cluster (no group of scores {MIN_SEPARATION_DECADES:g}+ decades below the rest)")
    else:
        parts.append(f"dead cluster: {cluster.channels} channels up to {cluster.below:.2g}, the rest from "
                     f"{cluster.above:.2g}, {cluster.decades:.1f} decades apart (e.g. --threshold {cluster.boundary:.2g})")
    return "; ".join(parts)


def require_matplotlib(flag: str = "--plot") -> None:
    """Fail in one line, before any work, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BnSlimError(f"{flag} needs matplotlib, which is not installed: {PLOT_HINT}") from None


def plot_histogram(spaces: list[SpaceReport], path: str, threshold: float | None = None, title: str = "") -> None:
    """The histogram as a PNG: one series per source kind, log-scale bins, the cut and the dead cluster."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = scores_by_kind(spaces)
    if not groups:
        raise BnSlimError(f"{title or 'the model'}: no prunable channel has a score; nothing to plot")
    everything = np.maximum(np.concatenate(list(groups.values())), FLOOR)
    bins = np.logspace(math.floor(np.log10(everything.min())), math.ceil(np.log10(everything.max()) + 1e-9), 41)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.hist([np.maximum(v, FLOOR) for v in groups.values()], bins=bins, stacked=True, label=list(groups))
    ax.set_xscale("log")
    ax.set_xlabel("channel score |scale| (log)")
    ax.set_ylabel("channels")
    cut, cluster = cut_value(spaces, threshold), dead_cluster(everything)
    if cluster is not None:
        ax.axvspan(bins[0], cluster.below * 1.05, color="grey", alpha=0.2, label=f"dead cluster ({cluster.channels})")
    if cut is not None:
        ax.axvline(cut, color="red", linestyle="--", label=f"cut {cut:.2g}")
    ax.legend()
    ax.set_title(title or "channel scores")
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig, path: str | os.PathLike) -> None:
    """Render a matplotlib figure and put the PNG at ``path`` in one rename (nothing half-written)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
