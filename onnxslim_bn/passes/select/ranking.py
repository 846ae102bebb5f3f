"""What the walk ranks: the prunable spaces, their scores laid end to end, the dead level and the
channels that cannot go -- read once from the analysis, never written back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...channels.context import Analysis
from ...channels.spaces import Space
from ...options import PruneOptions
from ..replacement import Unsafe, dead_values, unsafe_channels
from .levels import data_dead_level, dead_level


@dataclass(frozen=True, eq=False)
class Ranking:
    """The selection's inputs. Channels are numbered along the walk: space by space in
    ``spaces`` order; ``owner`` and ``channel`` map that number back to (space, channel)."""

    analysis: Analysis
    options: PruneOptions
    spaces: list[Space]
    scores: dict[int, np.ndarray]  # root id -> score per channel
    level: float  # scores at or below it are dead (levels.dead_level / data_dead_level)
    dead: dict[str, np.ndarray]  # replacement values per tensor (replacement.dead_values)
    unsafe: Unsafe
    flat: np.ndarray  # every score, in walk numbering
    owner: np.ndarray  # index into ``spaces`` per channel
    channel: np.ndarray  # channel within its space
    unsafe_flat: np.ndarray  # per channel: its replacement is unknown at some consumer

    @classmethod
    def of(cls, analysis: Analysis, options: PruneOptions) -> Ranking:
        dead = dead_values(analysis)
        unsafe = unsafe_channels(analysis, dead)
        spaces = [s for s in analysis.prunable() if s.sources]
        scores = {s.id: s.scores() for s in spaces}
        flat = np.concatenate([scores[s.id] for s in spaces]) if spaces else np.zeros(0)
        by_data = bool(spaces) and all(s.source_kinds == ["data"] for s in spaces)
        level = data_dead_level(flat) if by_data else dead_level(flat)
        owner = np.concatenate([np.full(s.size, i) for i, s in enumerate(spaces)]) if spaces else np.zeros(0, int)
        channel = np.concatenate([np.arange(s.size) for s in spaces]) if spaces else np.zeros(0, int)
        unsafe_flat = np.concatenate([unsafe.mask.get(s.id, np.zeros(s.size, bool)) for s in spaces]) \
            if spaces else np.zeros(0, bool)
        return cls(analysis, options, spaces, scores, level, dead, unsafe, flat, owner, channel, unsafe_flat)

    def unsafe_mask(self, space: Space) -> np.ndarray:
        """Per channel of the space: its replacement is unknown at some consumer."""
        return self.unsafe.mask.get(space.id, np.zeros(space.size, bool))

    def live_cap(self, live: np.ndarray) -> int:
        """How many of these live channels ``max_layer_ratio`` lets a layer lose."""
        return int(math.floor(self.options.layer_cap() * int(live.sum()) + 1e-9))
