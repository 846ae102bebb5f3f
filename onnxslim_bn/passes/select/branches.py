"""Reader BNs' branches (:class:`onnxslim_bn.channels.context.Selector`): a tensor they share
keeps every channel one of them still reads, and loses the ones all of them dropped."""

from __future__ import annotations

import numpy as np

from ...channels.context import Analysis
from ...channels.layout import Layout, Segment
from .ranking import Ranking
from .rounding import even_groups, respect


def derive(ranking: Ranking, removed: dict[int, np.ndarray], block: int) -> tuple[int, int]:
    """A tensor read by reader BNs keeps every channel one of their branches keeps; a shared
    space without a score of its own loses the channels all of them dropped (when nothing
    else reads them with an unknown value). Updates the walk's ``removed`` (per root space) and
    returns (channels that removed, chosen channels a branch still reads).

    A branch may read a tensor whose space a branch joined (an Add of its output with an
    older tensor), so no order of the spaces settles them all at once: the passes repeat
    until nothing changes (each only puts channels back, so they end)."""
    analysis, scores = ranking.analysis, ranking.scores
    readers: dict[int, list] = {}
    for sel in analysis.selectors:
        for root in {analysis.find(seg.space) for seg in sel.source}:
            readers.setdefault(root, []).append(sel)
    roots = [r for r in readers if not analysis.spaces[r].blocked and analysis.spaces[r].producers]
    chosen = {r: removed[r].copy() for r in roots if r in scores}
    derived: dict[int, np.ndarray] = {}
    keeps: dict[int, np.ndarray] = {}
    for _ in range(len(roots) + 2):
        changed = False
        for root in roots:
            space = analysis.spaces[root]
            keep = np.zeros(space.size, bool)
            for sel in readers[root]:
                own = (Segment(sel.space, analysis.spaces[sel.space].size),)
                dropped = _flags(analysis, own, removed)
                ids, index = analysis.channel_ids(sel.source)
                keep[index[(ids == root) & ~dropped]] = True
            keeps[root] = keep
            if root in scores:  # scored too: what a branch still reads stays (groups evened out again)
                gone = even_groups(space, removed[root] & ~keep, scores[root])
            else:
                gone = ~keep & ~ranking.unsafe_mask(space)
                gone = respect(space, gone, ranking.options.min_channels, block)
                if root in derived:
                    gone &= derived[root]
                derived[root] = gone
            if root not in removed or not np.array_equal(gone, removed[root]):
                removed[root] = gone
                changed = True
        if not changed:
            break
    branch_kept = sum(int((chosen[r] & keeps[r]).sum()) for r in chosen)
    return sum(int(g.sum()) for g in derived.values()), branch_kept


def _flags(analysis: Analysis, layout: Layout, removed: dict[int, np.ndarray]) -> np.ndarray:
    """Per channel of ``layout``: whether ``removed`` (per root space) flags it."""
    roots, index = analysis.channel_ids(layout)
    return np.array([bool(removed[r][i]) if r in removed else False for r, i in zip(roots, index)], bool)
