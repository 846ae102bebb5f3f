"""Kept widths rounded to the machine's block, groups evened out: what the kernels run fast."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ...channels.spaces import Space
from ...hardware import group_width, round_up_width, round_width, round_widths
from .costs import Costs
from .ranking import Ranking


@dataclass
class Rounded:
    """What one rounding did beyond the chosen count."""

    back: int = 0  # chosen channels put back
    back_dead: int = 0  # of those, the ones in the dead cluster (or exact zeros)
    put_back: dict[int, list[int]] = field(default_factory=dict)  # root space -> the channels put back (ungrouped)
    down: int = 0  # channels removed beyond the chosen ones
    whole_groups: list[str] = field(default_factory=list)  # grouped spaces kept whole
    notes: list[str] = field(default_factory=list)  # one line each, for the report


class Rounding:
    """Kept widths to multiples of the block. A ``--ratio`` / ``--threshold`` run rounds *up*
    (:func:`onnxslim_bn.hardware.round_up_width`): it puts back the best of the removed
    channels (dead ones, where the model was sparsity-trained), and rounds down only through
    dead channels (:meth:`_up_or_dead_down`), so it never removes a live channel the ranking
    kept. A budget (``costs`` given) rounds up or down, whichever keeps its total nearest the
    selection (:func:`onnxslim_bn.hardware.round_widths`), and down never past the
    constraints of the walk (``min_channels``, ``max_layer_ratio``, unknown replacements).
    Grouped spaces round per group (:meth:`_round_groups`); spaces that Split / Slice take
    parts of keep their widths."""

    def __init__(self, ranking: Ranking, block: int, fine_everywhere: bool = False, costs: Costs | None = None,
                 which: int = 0):
        self.ranking, self.block = ranking, block
        self.fine_everywhere = fine_everywhere  # a finer block for every space (a budget out of reach otherwise)
        self.costs, self.which = costs, which  # a budget's costs (0 MACs, 1 params, 2 ms) weigh the channels

    def apply(self, removed: dict[int, np.ndarray]) -> Rounded:
        """Round the walk's ``removed`` flags (per root space) in place; returns what it did."""
        block, ranking, out = self.block, self.ranking, Rounded()
        if block <= 1:
            return out
        spaces = [s for s in ranking.spaces if s.groups == 1 and not s.parts and removed[s.id].any()]
        machine = max(block, ranking.options.block())
        # a finer block a budget fell back to applies to the spaces off the machine's block (a
        # 24-wide layer); those on it keep it, or their convs would leave the blocked kernels
        batches = [(block, spaces)] if block == machine or self.fine_everywhere else \
            [(machine, [s for s in spaces if s.size % machine == 0]), (block, [s for s in spaces if s.size % machine])]
        for step, members in batches:
            self._round_spaces(removed, members, step, out)
        # grouped convs: the machine's block, not a finer one a budget fell back to (off it a
        # grouped conv leaves the blocked kernels and runs slower than unpruned)
        for s in ranking.spaces:
            if s.groups > 1 and not s.parts and removed[s.id].any():
                self._round_groups(s, removed[s.id], machine, out)
        if out.whole_groups:
            out.notes.append(f"grouped channels kept whole, as fewer than {machine} per group would take the grouped "
                             "conv off onnxruntime's blocked kernels (slower than not pruning it): "
                             + ", ".join(out.whole_groups))
        return out

    def _removable(self, s: Space, gone: np.ndarray) -> np.ndarray:
        """Channels of ``s`` that rounding down may still take, in the order it takes them
        (lowest score first), within ``min_channels`` and ``max_layer_ratio``."""
        scores = self.ranking.scores[s.id]
        free = np.flatnonzero(~gone & ~self.ranking.unsafe_mask(s) & np.isfinite(scores))
        free = free[np.argsort(scores[free], kind="stable")]
        live = scores > self.ranking.level
        live_left = self.ranking.live_cap(live) - int((gone & live).sum())
        free = free[~live[free] | (np.cumsum(live[free]) <= max(live_left, 0))]
        room = s.size - min(s.size, self.ranking.options.min_channels) - int(gone.sum())
        return free[:max(room, 0)]

    def _round_spaces(self, removed: dict[int, np.ndarray], spaces: list[Space], block: int, out: Rounded) -> None:
        """Round ungrouped ``spaces`` to ``block`` (see :class:`Rounding`)."""
        if not spaces:
            return
        keeps = [int(s.size - removed[s.id].sum()) for s in spaces]
        takes = [self._removable(s, removed[s.id]) for s in spaces]
        if self.costs is None:  # --ratio / --threshold: up, or down through dead channels only
            widths = [self._up_or_dead_down(s, keep, take, block) for s, keep, take in zip(spaces, keeps, takes)]
        else:
            widths = round_widths(keeps, [s.size for s in spaces], block, self.ranking.options.min_channels,
                                  self._weights(spaces), least=[keep - len(t) for keep, t in zip(keeps, takes)])
        for s, keep, width, take in zip(spaces, keeps, widths, takes):
            gone, scores = removed[s.id], self.ranking.scores[s.id]
            if width % block and 2 * (s.size - width) <= block:  # a few channels off a whole space: not
                width = s.size  # worth a width off the block (the kernels would run it slower)
            if width > keep:
                back = np.flatnonzero(gone)[np.argsort(-scores[gone], kind="stable")[:width - keep]]
                gone[back] = False
                out.put_back.setdefault(s.id, []).extend(int(c) for c in back)
                out.back += len(back)
                out.back_dead += int((scores[back] <= self.ranking.level).sum())
            elif width < keep:
                gone[take[:keep - width]] = True
                out.down += keep - width

    def _up_or_dead_down(self, s: Space, keep: int, take: np.ndarray, block: int) -> int:
        """A --ratio / --threshold width: the multiple of the block above ``keep``
        (:func:`onnxslim_bn.hardware.round_up_width`), or the one below when it is nearer and
        every channel it takes is dead (in the dead cluster, or exactly 0) like those chosen."""
        options = self.ranking.options
        up = round_up_width(s.size, keep, block)
        down = keep // block * block
        if up == keep or down < max(block, options.min_channels) or keep - down >= up - keep:
            return up
        extra = take[:keep - down]
        dead = self.ranking.scores[s.id][extra] <= self.ranking.level
        if options.threshold is not None:
            dead &= self.ranking.scores[s.id][extra] < options.threshold
        return down if len(extra) == keep - down and dead.all() else up

    def _round_groups(self, s: Space, gone: np.ndarray, block: int, out: Rounded) -> None:
        """A grouped space: the same width in every group; a budget rounds up or down, whichever
        is nearer, a ``--ratio`` / ``--threshold`` run up only.

        Groups already on the block (``per % block == 0``) stay on it: each group keeps a multiple
        of the block, or the whole space stays when no such width is left (onnxruntime's blocked
        kernels take a grouped conv only when every group's input and output widths are multiples
        of the block; off it, the conv runs unblocked between two layout reorders, slower than the
        unpruned conv: :func:`onnxslim_bn.hardware.group_width`). Otherwise only the whole width
        goes on the block (each group a multiple of block / gcd(block, groups))."""
        level, per = self.ranking.level, s.size // s.groups
        blocks, scores = gone.reshape(s.groups, per), self.ranking.scores[s.id].reshape(s.groups, per)
        mask = self.ranking.unsafe_mask(s).reshape(s.groups, per)
        keep = per - int(blocks[0].sum())
        least = max(1, -(-self.ranking.options.min_channels // s.groups))
        step = block if per % block == 0 else block // math.gcd(block, s.groups)
        if self.costs is None:
            width = round_up_width(per, keep, step)
        elif per % block == 0:
            width = group_width(per, keep, block, least)
        else:
            width = round_width(per, keep, step, least)
        if per % block == 0 and width == per and keep < per:
            out.whole_groups.append(f"{s.producers[0] if s.producers else f'space {s.id}'} ({s.groups}x{per})")
        if width > keep:
            for row, score in zip(blocks, scores):
                back = np.flatnonzero(row)[np.argsort(-score[row], kind="stable")[:width - keep]]
                row[back] = False
                out.back += len(back)
                out.back_dead += int((score[back] <= level).sum())
        elif width < keep:
            live = self.ranking.scores[s.id] > level
            live_left = self.ranking.live_cap(live) - int((gone & live).sum())
            free = [np.flatnonzero(~row & ~m & np.isfinite(score)) for row, m, score in zip(blocks, mask, scores)]
            picks = [f[np.argsort(score[f], kind="stable")[:keep - width]] for f, score in zip(free, scores)]
            taken_live = sum(int((score[p] > level).sum()) for p, score in zip(picks, scores))
            if all(len(p) == keep - width for p in picks) and taken_live <= live_left:  # every group loses the same
                for row, p in zip(blocks, picks):
                    row[p] = True

    def _weights(self, spaces: list[Space]) -> list[float]:
        """What one channel of each space costs, for rounding towards the budget."""
        saved = self.costs.per_channel(self.which)
        return [float(saved[self.costs.offset[s.id]]) for s in spaces]


def even_groups(s: Space, gone: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Even out groups: every group of a grouped conv loses the same number of channels, the
    lowest-scored of what was chosen in each."""
    gone = gone.copy()
    if s.groups > 1:
        blocks = gone.reshape(s.groups, -1)
        per_block = int(blocks.sum(1).min())
        block_scores = np.where(blocks, scores.reshape(s.groups, -1), np.inf)
        picks = np.argsort(block_scores, axis=1, kind="stable")[:, :per_block]
        gone = np.zeros_like(blocks)
        np.put_along_axis(gone, picks, True, axis=1)
        return gone.reshape(-1)
    return gone


def respect(space: Space, gone: np.ndarray, min_channels: int, round_to: int) -> np.ndarray:
    """Put channels back so that the space keeps min_channels, every part one channel, and a
    width that is a multiple of round_to; grouped spaces lose nothing (their groups would have
    to be evened out across every reader)."""
    gone = gone.copy()
    if space.groups > 1:
        return np.zeros_like(gone)
    for offset, size in set(space.parts):
        part = gone[offset:offset + size]
        if part.all():
            part[0] = False
    short = min(space.size, min_channels) - int((~gone).sum())
    if short > 0:
        gone[np.flatnonzero(gone)[:short]] = False
    if space.size >= 4 * round_to and not space.parts:
        keep_n = int((~gone).sum())
        extra = min(space.size, math.ceil(keep_n / round_to) * round_to) - keep_n
        gone[np.flatnonzero(gone)[:extra]] = False
    return gone
