"""Choosing channels: one global ranking by importance over every prunable space."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from .analysis import Analysis, Layout, Segment
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
    exact_borders: bool = False  # padded convs: add the border correction as a constant map

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
    chosen: int = 0  # channels the ranking chose, before rounding widths (and evening out groups) kept some

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


def select(analysis: Analysis, options: PruneOptions) -> Plan:
    """Rank every prunable channel by importance and choose which go.

    One global ranking over all prunable spaces (``ratio``: the lowest ``ratio`` of them go;
    ``threshold``: all below it go), walked greedily so that every space keeps
    ``min_channels`` and every part a Split takes keeps at least one channel. Kept widths are
    then rounded up to a multiple of ``round_to`` by putting back the best removed channels.
    """
    spaces = analysis.prunable()
    scores = {s.id: s.scores() for s in spaces}
    flat = np.concatenate([scores[s.id] for s in spaces]) if spaces else np.zeros(0)
    owner = np.concatenate([np.full(s.size, i) for i, s in enumerate(spaces)]) if spaces else np.zeros(0, int)
    channel = np.concatenate([np.arange(s.size) for s in spaces]) if spaces else np.zeros(0, int)
    order = np.argsort(flat, kind="stable")  # global ranking; ties keep graph order
    if options.threshold is not None:
        order = order[flat[order] < options.threshold]
        target = len(order)
    else:
        target = int(math.floor(options.ratio * len(flat) + 1e-9))
    removed = {s.id: np.zeros(s.size, bool) for s in spaces}
    left = {s.id: s.size - min(s.size, options.min_channels) for s in spaces}
    part_left = {s.id: [[o, n, n - min(n, options.min_channels)] for o, n in set(s.parts)] for s in spaces}
    chosen = 0
    for i in order:
        if chosen == target:
            break
        space, c = spaces[owner[i]], int(channel[i])
        parts = [p for p in part_left[space.id] if p[0] <= c < p[0] + p[1]]
        if left[space.id] == 0 or any(p[2] == 0 for p in parts):
            continue
        left[space.id] -= 1
        for p in parts:
            p[2] -= 1
        removed[space.id][c] = True
        chosen += 1
    kept = {}
    for s in spaces:
        gone = removed[s.id]
        if s.groups > 1:  # the same number from every group: the lowest-scored of what was chosen
            blocks = gone.reshape(s.groups, -1)
            per_block = int(blocks.sum(1).min())
            block_scores = np.where(blocks, scores[s.id].reshape(s.groups, -1), np.inf)
            picks = np.argsort(block_scores, axis=1, kind="stable")[:, :per_block]
            gone = np.zeros_like(blocks)
            np.put_along_axis(gone, picks, True, axis=1)
            gone = gone.reshape(-1)
        elif s.size >= 4 * options.round_to and not s.parts:
            keep_n = s.size - int(gone.sum())
            extra = min(s.size, math.ceil(keep_n / options.round_to) * options.round_to) - keep_n
            back = np.flatnonzero(gone)[np.argsort(-scores[s.id][gone], kind="stable")[:extra]]
            gone[back] = False
        kept[s.id] = np.flatnonzero(~gone)
    return Plan(kept, analysis, chosen=chosen)
