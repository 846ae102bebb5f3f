"""The greedy walk over the ranking: channels go in ranked order while every constraint holds."""

from __future__ import annotations

import numpy as np

from .branches import derive
from .costs import Costs
from .plan import Plan
from .ranking import Ranking
from .rounding import Rounding, even_groups


class Walk:
    """The greedy walk over a ranking, with every constraint of :func:`onnxslim_bn.passes.select.select`:
    the walk itself, then groups evened out, widths rounded to ``block`` (:class:`Rounding`) and
    reader BNs' branches settled (:func:`derive`). A budget walks once per candidate length, so
    a walk keeps no state between calls."""

    def __init__(self, ranking: Ranking, block: int | None = None, fine_everywhere: bool = False,
                 costs: Costs | None = None, which: int = 0):
        self.ranking = ranking
        self.block = ranking.options.block() if block is None else block
        self.rounding = Rounding(ranking, self.block, fine_everywhere, costs, which)

    def removed(self, order: np.ndarray, target: int) -> tuple[dict[int, np.ndarray], dict]:
        """The first ``target`` channels of ``order`` the constraints let go, finished (groups,
        rounding, branches): removed flags per root space, and the counts of every channel
        the walk passed over or rounding moved, under its reason."""
        ranking = self.ranking
        options, spaces = ranking.options, ranking.spaces
        removed = {s.id: np.zeros(s.size, bool) for s in spaces}
        left = {s.id: s.size - min(s.size, options.min_channels) for s in spaces}
        live_left = {s.id: ranking.live_cap(ranking.scores[s.id] > ranking.level) for s in spaces}
        part_left = {s.id: [[o, n, n - min(n, options.min_channels)] for o, n in set(s.parts)] for s in spaces}
        stats = {"chosen": 0, "unsafe": 0, "capped": 0, "min_kept": 0}
        for i in order:
            if stats["chosen"] == target:
                break
            space, c = spaces[ranking.owner[i]], int(ranking.channel[i])
            if ranking.unsafe_flat[i]:  # it cannot go: its value is not a known constant at some consumer
                stats["unsafe"] += 1
                continue
            parts = [p for p in part_left[space.id] if p[0] <= c < p[0] + p[1]]
            if left[space.id] == 0 or any(p[2] == 0 for p in parts):
                stats["min_kept"] += 1  # --min-channels, or a Split / Slice part down to one channel
                continue
            live = ranking.flat[i] > ranking.level
            if live and live_left[space.id] == 0:
                stats["capped"] += 1
                continue
            left[space.id] -= 1
            live_left[space.id] -= live
            for p in parts:
                p[2] -= 1
            removed[space.id][c] = True
            stats["chosen"] += 1
        for s in spaces:
            removed[s.id] = even_groups(s, removed[s.id], ranking.scores[s.id])
        rounded = self.rounding.apply(removed)
        stats["derived"], stats["branch_kept"] = derive(ranking, removed, self.block)
        stats.update(rounded_back=rounded.back, rounded_back_dead=rounded.back_dead, rounded_down=rounded.down,
                     notes=rounded.notes, put_back=rounded.put_back)
        return removed, stats

    def plan(self, order: np.ndarray, target: int) -> Plan:
        """The plan of :meth:`removed`, with what the selection did for the report."""
        ranking = self.ranking
        removed, stats = self.removed(order, target)
        kept = {root: np.flatnonzero(~gone) for root, gone in removed.items()}
        gone_scores = np.concatenate([ranking.scores[s.id][removed[s.id]] for s in ranking.spaces]) \
            if ranking.spaces else np.zeros(0)
        gone_scores = gone_scores[np.isfinite(gone_scores)]
        return Plan(kept, ranking.analysis, chosen=stats["chosen"], dead_level=ranking.level,
                    live_removed=int((gone_scores > ranking.level).sum()),
                    max_removed_score=float(gone_scores.max()) if len(gone_scores) else None,
                    unsafe_kept=stats["unsafe"], ranked=len(ranking.flat),
                    unsafe_where=ranking.unsafe.where, capped=stats["capped"], min_kept=stats["min_kept"],
                    rounded_back=stats["rounded_back"], rounded_back_dead=stats["rounded_back_dead"],
                    rounded_down=stats["rounded_down"], derived_removed=stats["derived"],
                    branch_kept=stats["branch_kept"], notes=list(stats["notes"]), dead=ranking.dead,
                    put_back={root: np.array(c, dtype=np.int64) for root, c in stats["put_back"].items()})
