"""The result of the selection: the kept channels of every space, and why the others stayed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...channels.context import Analysis
from ...channels.layout import Layout, Segment


@dataclass
class Plan:
    """Kept channel indices per space (root id); spaces not listed keep everything."""

    kept: dict[int, np.ndarray]
    analysis: Analysis
    chosen: int = 0  # channels the ranking chose, before rounding widths (and evening out groups) kept some
    dead_level: float = 0.0  # scores at or below this are the dead cluster (see dead_level())
    live_removed: int = 0  # removed channels scored above the dead level
    max_removed_score: float | None = None
    cut: dict = field(default_factory=dict)  # --ratio: the cut's score and how many scored channels lie below it
    unsafe_kept: int = 0  # channels below the cut kept: their replacement is not a known constant
    ranked: int = 0  # channels the ranking scores (those with an unknown replacement included): --ratio's base
    unsafe_where: dict[str, int] = field(default_factory=dict)  # consumer -> channels it made unsafe
    capped: int = 0  # channels the per-layer cap (max_layer_ratio) kept
    min_kept: int = 0  # channels --min-channels (or a Split / Slice part's last channel) kept
    rounded_back: int = 0  # chosen channels rounding widths to the block put back
    rounded_back_dead: int = 0  # of those, the ones in the dead cluster (or exact zeros)
    rounded_down: int = 0  # channels rounding down removed beyond the chosen ones
    carriers_held: int = 0  # constant channels kept to carry the removed constants at padded convs (carriers.py)
    derived_removed: int = 0  # shared channels removed because every reader BN's branch dropped them
    branch_kept: int = 0  # chosen channels a reader BN's branch still reads (so the shared tensor keeps them)
    budget: dict = field(default_factory=dict)  # for --target-macs / --target-params: target and reached
    notes: list[str] = field(default_factory=list)  # what width rounding did beyond the count, one line each
    dead: dict = field(default_factory=dict, repr=False)  # replacement values per tensor (replacement.dead_values)
    put_back: dict = field(default_factory=dict, repr=False)  # root space -> channels rounding put back

    def summary(self) -> dict:
        """What the selection did, for the report: every channel the ranking chose is removed,
        or kept for one of the reasons counted here."""
        return {"ranked": self.ranked, "chosen": self.chosen, "dead_level": self.dead_level, "live_removed": self.live_removed,
                "max_removed_score": self.max_removed_score, "cut": dict(self.cut), "kept_unknown_replacement": self.unsafe_kept,
                "unknown_replacement_at": dict(self.unsafe_where), "kept_by_layer_cap": self.capped,
                "kept_by_branches": self.branch_kept, "removed_by_branches": self.derived_removed,
                "kept_by_min_channels": self.min_kept, "kept_by_rounding": self.rounded_back,
                "dead_kept_by_rounding": self.rounded_back_dead, "removed_by_rounding": self.rounded_down, "kept_as_carriers": self.carriers_held,
                "budget": dict(self.budget)}

    def recount(self) -> None:
        """Restate ``live_removed`` and ``max_removed_score`` from what the plan removes now (after
        channels were kept back, as carriers)."""
        parts = []
        for root, kept in self.kept.items():
            scores = self.analysis.spaces[root].scores()
            if scores is not None:
                parts.append(np.delete(scores, kept))
        gone = np.concatenate(parts) if parts else np.zeros(0)
        gone = gone[np.isfinite(gone)]
        self.live_removed = int((gone > self.dead_level).sum())
        self.max_removed_score = float(gone.max()) if len(gone) else None

    def _kept(self, seg: Segment) -> np.ndarray:
        """Kept channels of the segment, numbered from its own first channel."""
        root, first, size = self.analysis.where(seg)
        idx = self.kept.get(root)
        if idx is None:
            return np.arange(size)
        return idx[(idx >= first) & (idx < first + size)] - first

    def scores(self, layout: Layout) -> np.ndarray:
        """One score per channel of a tensor with this layout (NaN where no score ranks it)."""
        parts = []
        for seg in layout:
            root, first, size = self.analysis.where(seg)
            scores = self.analysis.spaces[root].scores()
            parts.append(np.full(size, np.nan) if scores is None else scores[first:first + size])
        return np.concatenate(parts) if parts else np.zeros(0)

    def keep_channel(self, layout: Layout, index: int) -> int | None:
        """Keep channel ``index`` of a tensor with this layout (removed so far): its root space,
        or None where that space is grouped (its groups must stay even) or a reader BN's branch or
        the tensor it reads (the branches settled what those keep)."""
        branched = {self.analysis.find(seg.space) for sel in self.analysis.selectors for seg in sel.source} \
            | {self.analysis.find(sel.space) for sel in self.analysis.selectors}
        offset = 0
        for seg in layout:
            if index < offset + seg.size:
                root, first, _ = self.analysis.where(seg)
                if self.analysis.spaces[root].groups > 1 or root not in self.kept or root in branched:
                    return None
                self.kept[root] = np.union1d(self.kept[root], [first + index - offset]).astype(self.kept[root].dtype)
                return root
            offset += seg.size
        return None

    def keep_index(self, layout: Layout) -> np.ndarray:
        """Indices along the channel axis of a tensor with this layout that survive."""
        parts, offset = [], 0
        for seg in layout:
            idx = self._kept(seg)
            if seg.repeat == 1:
                parts.append(offset + idx)
            else:
                parts.append((offset + idx[:, None] * seg.repeat + np.arange(seg.repeat)[None, :]).reshape(-1))
            offset += seg.size * seg.repeat
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def removed_mask(self, layout: Layout) -> np.ndarray:
        """One flag per channel (not per flattened entry): True where the channel goes."""
        parts = []
        for seg in layout:
            mask = np.ones(seg.size, bool)
            mask[self._kept(seg)] = False
            parts.append(mask)
        return np.concatenate(parts) if parts else np.zeros(0, bool)

