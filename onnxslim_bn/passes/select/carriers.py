"""Carriers: a kept dead channel that takes over the removed channels' constants at a padded Conv.

A removed channel with constant c (a dead BN channel with beta > 0 behind a ReLU, say) feeds its
consumer c inside the image and 0 in the zero padding: folding c into the bias is exact inside
only. A kept channel of the same tensor that is constant too, c_k, meets the padding exactly as
the removed ones did, so ``W[:, k] += sum_j (c_j / c_k) W[:, j]`` reproduces them at every
position and every image size, with no op added (the rule's ``carry``). Rounding widths up often
keeps such a channel; where it did not, a --ratio / --threshold run that removes dead channels
only holds the best one back (and rounds that width up to the block with more dead ones).
"""

from __future__ import annotations

import numpy as np

from ...channels.context import Analysis
from .plan import Plan

# A kept dead channel carries the removed channels' constants when its own variation (its score,
# the BN scale) is at most this share of its constant: the carried sum then varies by at most 1%
# everywhere, where the bias alone would miss all of it at the borders.
CARRIER_NOISE = 0.01


def carriers(plan: Plan, analysis: Analysis, name: str, values: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Channels of tensor ``name`` not in ``removed`` that are dead with a known non-zero constant
    and vary by at most CARRIER_NOISE of it: each can carry the removed channels' constants."""
    scores = plan.scores(analysis.layouts[name])
    with np.errstate(invalid="ignore"):
        return ~removed & np.isfinite(values) & (np.abs(values) > 0) & (scores <= plan.dead_level) \
            & (scores <= CARRIER_NOISE * np.abs(values))


def hold_carriers(plan: Plan, dead: dict[str, np.ndarray], block: int) -> int:
    """Keep one removed channel where a padded Conv would otherwise fold constants into its bias
    inexactly at the borders and no kept channel can carry them, and as many more of the space's
    removed channels (the highest-scored) as put its width back on the ``block``; the number held."""
    analysis, held = plan.analysis, 0
    # measured means are not constants (the refit handles borders); a cut that removes live
    # channels is approximate anyway, and a block of channels would buy little there
    if analysis.input_means or plan.live_removed:
        return 0
    for consumer in analysis.consumers:
        node = consumer.node
        layout = analysis.layout(node.inputs[0])
        removed = plan.removed_mask(layout)
        values = dead.get(node.inputs[0].name)
        if values is None or not removed.any():
            continue
        comp = consumer.rule.compensate(node, analysis, values, removed)
        if comp.exact or comp.missing or carriers(plan, analysis, node.inputs[0].name, values, removed).any():
            continue
        candidates = carriers(plan, analysis, node.inputs[0].name, values, np.zeros_like(removed)) & removed
        if not candidates.any() or consumer.rule.carry(node, values, removed & ~candidates, candidates) is None:
            continue  # nothing can carry them: the approximation stays, named by the surgery
        k = int(np.flatnonzero(candidates)[np.argmax(np.abs(values[candidates]))])
        root = plan.keep_channel(layout, k)
        if root is not None:
            held += 1 + _round_up(plan, root, block)
    return held


def _round_up(plan: Plan, root: int, block: int) -> int:
    """Put back the highest-scored removed channels of space ``root`` until its width is a
    multiple of ``block`` (or whole); how many."""
    kept, size = plan.kept[root], plan.analysis.spaces[root].size
    need = min((-len(kept)) % block, size - len(kept))
    if need == 0:
        return 0
    gone = np.setdiff1d(np.arange(size), kept)
    scores = np.nan_to_num(plan.analysis.spaces[root].scores()[gone], nan=np.inf)
    back = gone[np.argsort(-scores, kind="stable")[:need]]
    plan.kept[root] = np.union1d(kept, back).astype(kept.dtype)
    return need
