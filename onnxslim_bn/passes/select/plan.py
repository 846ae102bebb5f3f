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
    unsafe_kept: int = 0  # channels below the cut kept: their replacement is not a known constant
    ranked: int = 0  # channels the ranking may remove (scored, with a known replacement everywhere)
    unsafe_where: dict[str, int] = field(default_factory=dict)  # consumer -> channels it made unsafe
    capped: int = 0  # channels the per-layer cap (max_layer_ratio) kept
    min_kept: int = 0  # channels --min-channels (or a Split / Slice part's last channel) kept
    rounded_back: int = 0  # chosen channels rounding widths to the block put back
    rounded_back_dead: int = 0  # of those, the ones in the dead cluster (or exact zeros)
    rounded_down: int = 0  # channels rounding down removed beyond the chosen ones
    derived_removed: int = 0  # shared channels removed because every reader BN's branch dropped them
    branch_kept: int = 0  # chosen channels a reader BN's branch still reads (so the shared tensor keeps them)
    budget: dict = field(default_factory=dict)  # for --target-macs / --target-params: target and reached
    notes: list[str] = field(default_factory=list)  # what width rounding did beyond the count, one line each
    dead: dict = field(default_factory=dict, repr=False)  # replacement values per tensor (replacement.dead_values)

    def summary(self) -> dict:
        """What the selection did, for the report: every channel the ranking chose is removed,
        or kept for one of the reasons counted here."""
        return {"ranked": self.ranked, "chosen": self.chosen, "dead_level": self.dead_level, "live_removed": self.live_removed,
                "max_removed_score": self.max_removed_score, "kept_unknown_replacement": self.unsafe_kept,
                "unknown_replacement_at": dict(self.unsafe_where), "kept_by_layer_cap": self.capped,
                "kept_by_branches": self.branch_kept, "removed_by_branches": self.derived_removed,
                "kept_by_min_channels": self.min_kept, "kept_by_rounding": self.rounded_back,
                "dead_kept_by_rounding": self.rounded_back_dead, "removed_by_rounding": self.rounded_down,
                "budget": dict(self.budget)}

    def _kept(self, seg: Segment) -> np.ndarray:
        """Kept channels of the segment, numbered from its own first channel."""
        root, first, size = self.analysis.where(seg)
        idx = self.kept.get(root)
        if idx is None:
            return np.arange(size)
        return idx[(idx >= first) & (idx < first + size)] - first

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

