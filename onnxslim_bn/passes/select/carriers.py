"""Carriers: a kept constant channel that takes over the removed channels' constants at a padded Conv.

A removed channel with constant c (a dead BN channel with beta > 0 behind a ReLU, say) feeds its
consumer c inside the image and 0 in the zero padding: folding c into the bias is exact inside
only. A kept channel of the same tensor that is constant too, c_k, meets the padding exactly as
the removed ones did, so ``W[:, k] += sum_j (c_j / c_k) W[:, j]`` reproduces them at every
position and every image size, with no op added (the rule's ``carry``). Rounding widths up often
keeps such a channel; where it did not, a --ratio / --threshold run holds the best one back
wherever the border error outweighs the removed channels' own variation: in place of a channel
rounding had put back in that space (when removing that one stays exact at every consumer), or
else rounding that width up to the block.
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
    """Channels of tensor ``name`` not in ``removed`` with a known non-zero constant that vary by at
    most CARRIER_NOISE of it: each can carry the removed channels' constants. That bound is the
    test, not the dead cluster: a model whose scores show no cluster still has such channels."""
    scores = plan.scores(analysis.layouts[name])
    with np.errstate(invalid="ignore"):
        return ~removed & np.isfinite(values) & (np.abs(values) > 0) & (scores <= CARRIER_NOISE * np.abs(values))


def hold_carriers(plan: Plan, dead: dict[str, np.ndarray], block: int, cut: float | None = None,
                  unsafe: dict[int, np.ndarray] | None = None) -> int:
    """Keep one removed channel where a padded Conv would otherwise fold constants into its bias
    inexactly at the borders and no kept channel can carry them. Its width stays as it was where
    rounding had put back a channel the ranking chose (scored at most ``cut``, its replacement
    known: not in ``unsafe``, per root space) whose removal every consumer takes exactly
    (:func:`_swap_out`): that one goes in its place. Otherwise as many more of
    the space's removed channels (the highest-scored) are kept as put its width back on the
    ``block``. The number held."""
    analysis, held = plan.analysis, 0
    # measured means are not constants (the refit handles borders)
    if analysis.input_means:
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
        if not _border_dominates(consumer.rule.weight_energy(node, None), values, plan.scores(layout), removed):
            continue  # the removed channels' own variation is the larger error: a carrier buys little
        k = int(np.flatnonzero(candidates)[np.argmax(np.abs(values[candidates]))])
        root = plan.keep_channel(layout, k)
        if root is None:
            continue
        if cut is not None and _swap_out(plan, dead, root, cut, (unsafe or {}).get(root)):
            held += 1
            continue
        held += 1 + _round_up(plan, root, block)
    return held


def _swap_out(plan: Plan, dead: dict[str, np.ndarray], root: int, cut: float, unsafe: np.ndarray | None) -> bool:
    """Remove again, in place of the carrier just kept, the lowest-scored channel of space ``root``
    that rounding had put back (the ranking chose it: scored at most ``cut``), whose replacement is
    known and whose removal leaves every consumer as exact as it was (:func:`_harmless`): the width
    stays on its block. Whether there was one; the rounding counts follow."""
    scores = plan.analysis.spaces[root].scores()
    back = plan.put_back.get(root)
    if scores is None or back is None or not len(back):
        return False
    back = back[np.isin(back, plan.kept[root])]
    back = back[np.isfinite(scores[back]) & (scores[back] <= cut)]
    if unsafe is not None:
        back = back[~unsafe[back]]
    for channel in back[np.argsort(scores[back], kind="stable")]:
        plan.kept[root] = np.setdiff1d(plan.kept[root], [channel]).astype(plan.kept[root].dtype)
        if _harmless(plan, dead, root, int(channel)):
            plan.put_back[root] = plan.put_back[root][plan.put_back[root] != channel]
            plan.rounded_back -= 1
            plan.rounded_back_dead -= int(scores[channel] <= plan.dead_level)
            return True
        plan.kept[root] = np.union1d(plan.kept[root], [channel]).astype(plan.kept[root].dtype)
    return False


def _harmless(plan: Plan, dead: dict[str, np.ndarray], root: int, channel: int) -> bool:
    """Whether channel ``channel`` of space ``root``, removed now, is compensated exactly at every
    consumer that reads it: its constant there is 0, or the layer takes constants exactly (no
    padding meets them), or a kept constant channel of that tensor carries it."""
    analysis = plan.analysis
    for consumer in analysis.consumers:
        node = consumer.node
        layout = analysis.layout(node.inputs[0])
        if layout is None:
            continue
        offset, index = 0, None
        for seg in layout:
            where, first, size = analysis.where(seg)
            if where == root and first <= channel < first + size:
                index = offset + channel - first
            offset += seg.size
        if index is None:
            continue
        values = dead.get(node.inputs[0].name)
        if values is None or not np.isfinite(values[index]):
            return False
        if values[index] == 0:
            continue
        removed = plan.removed_mask(layout)
        alone = np.zeros_like(removed)
        alone[index] = True
        if consumer.rule.compensate(node, analysis, values, alone).exact:
            continue
        if not carriers(plan, analysis, node.inputs[0].name, values, removed).any():
            return False
    return True


def _border_dominates(energy: np.ndarray | None, values: np.ndarray, scores: np.ndarray, removed: np.ndarray) -> bool:
    """Whether bias folding's error at the borders (the removed constants c_j, missing where the
    padding meets them) outweighs the error the removed channels cause everywhere by varying
    (their scores s_j, a spread): ``sum c_j^2 |W_j|^2 > sum s_j^2 |W_j|^2`` over the removed
    channels. Only then is a carrier worth a kept channel, and a block. On a sparse ResNet whose
    removed channels reach score 2e-4 above its dead cluster (constants ~0.5) it held one:
    held-out agreement 99.0% -> 100%; a --ratio 0.5 cut of live channels holds none."""
    if energy is None or len(energy) != len(removed):
        return True
    e = energy[removed]
    c, s = np.nan_to_num(values[removed]), np.nan_to_num(scores[removed])
    return float((c ** 2 * e).sum()) > float((s ** 2 * e).sum())


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
