"""Choosing channels: one global ranking by importance over every prunable space."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from .analysis import Analysis, Layout
from .errors import BnSlimError


@dataclass
class PruneOptions:
    """Everything that decides what is removed and how the result is checked."""

    ratio: float | None = None  # fraction of all prunable channels to remove (netslim's meaning)
    threshold: float | None = None  # or: remove every channel whose importance is below this
    min_channels: int = 4  # a space never drops below this many channels
    # kept widths are rounded up to a multiple of this (runtimes run widths of 8k much faster),
    # except in spaces narrower than 4 * round_to, where the rounding would be most of the layer
    round_to: int = 8
    keep: list[str] = field(default_factory=list)  # fnmatch patterns of node names never pruned
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    data: str | None = None  # .npz of inputs for the check (else seeded random inputs)
    max_error: float | None = None  # fail when max |pruned - original| exceeds this
    verify: bool = True
    seed: int = 0

    def validate(self) -> None:
        if (self.ratio is None) == (self.threshold is None):
            raise BnSlimError("give exactly one of --ratio (e.g. --ratio 0.5) or --threshold (e.g. --threshold 1e-3)")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise BnSlimError(f"--ratio {self.ratio} is outside (0, 1); pass the fraction of channels to remove, e.g. --ratio 0.5")
        if self.threshold is not None and self.threshold <= 0:
            raise BnSlimError(f"--threshold {self.threshold} must be positive, e.g. --threshold 1e-3")
        if self.min_channels < 1:
            raise BnSlimError(f"--min-channels {self.min_channels} must be at least 1")
        if self.round_to < 1:
            raise BnSlimError(f"--round-to {self.round_to} must be at least 1")

    def protects(self, node_name: str) -> bool:
        return any(fnmatch.fnmatchcase(node_name, p) for p in self.keep)


@dataclass
class Plan:
    """Kept channel indices per space (root id); spaces not listed keep everything."""

    kept: dict[int, np.ndarray]
    analysis: Analysis
    chosen: int = 0  # channels the ranking chose, before --round-to kept some of them

    def _kept(self, space: int, size: int) -> np.ndarray:
        root = self.analysis.find(space)
        return self.kept.get(root, np.arange(size))

    def keep_index(self, layout: Layout) -> np.ndarray:
        """Indices along the channel axis of a tensor with this layout that survive."""
        parts, offset = [], 0
        for seg in layout:
            idx = self._kept(seg.space, seg.size)
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
            mask[self._kept(seg.space, seg.size)] = False
            parts.append(mask)
        return np.concatenate(parts) if parts else np.zeros(0, bool)


def select(analysis: Analysis, options: PruneOptions) -> Plan:
    """Rank every prunable channel by importance and choose which go."""
    spaces = analysis.prunable()
    scores = {s.id: s.scores() for s in spaces}
    limit = {s.id: max(0, s.size - min(s.size, options.min_channels)) for s in spaces}
    count = dict.fromkeys(scores, 0)
    if options.threshold is not None:
        for s in spaces:
            count[s.id] = min(limit[s.id], int((scores[s.id] < options.threshold).sum()))
    else:
        total = sum(s.size for s in spaces)
        target = int(math.floor(options.ratio * total + 1e-9))
        flat = np.concatenate([scores[s.id] for s in spaces]) if spaces else np.zeros(0)
        owner = np.concatenate([np.full(s.size, s.id) for s in spaces]) if spaces else np.zeros(0, int)
        chosen = 0
        for i in np.argsort(flat, kind="stable"):  # global ranking; ties keep graph order
            if chosen == target:
                break
            sid = int(owner[i])
            if count[sid] < limit[sid]:
                count[sid] += 1
                chosen += 1
    kept = {}
    for s in spaces:
        keep_n = s.size - count[s.id]
        if s.size >= 4 * options.round_to:
            keep_n = min(s.size, math.ceil(keep_n / options.round_to) * options.round_to)
        order = np.argsort(-scores[s.id], kind="stable")  # most important first
        kept[s.id] = np.sort(order[:keep_n])
    return Plan(kept, analysis, chosen=sum(count.values()))
