"""Channel spaces: sets of channels that live or die together, joined by a union-find with offsets.

Rules open spaces (Conv, Gemm), merge them (residual Add), take parts of them (Split) and block
them with a reason; every channel of a tensor is a channel of one root space (:meth:`Spaces.locate`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .layout import Layout, Segment
from .layout import sizes as _sizes
from .reasons import Reason

log = logging.getLogger(__name__)


@dataclass
class ScoreSource:
    """Per-channel importance read from one node (a BN scale, a Mul scale, folded weights), or
    measured at the consumers of the channels (``node`` None, kind "data")."""

    node: gs.Node | None
    kind: str  # "bn" | "mul" | "folded" | "data"
    values: np.ndarray
    offset: int = 0  # the first channel of the space it scores (a BN after a Split sees a part)

    @property
    def label(self) -> str:
        """What the report names as the source: the node's name, or "consumers"."""
        return "consumers" if self.node is None else self.node.name


@dataclass
class Space:
    id: int
    size: int
    # the nodes that open the space: layers (Conv, Gemm), a reader BN that selects its branch
    writers: list[gs.Node] = field(default_factory=list)
    # depthwise convs write the space too (a folded BN after them scales it)
    coupled: list[gs.Node] = field(default_factory=list)
    sources: list[ScoreSource] = field(default_factory=list)
    blocked: list[Reason] = field(default_factory=list)
    # (offset, size) parts that Split / Slice take: each must keep at least one channel
    parts: list[tuple[int, int]] = field(default_factory=list)
    # a grouped Conv reads or writes the space in `groups` equal blocks: each block loses
    # the same number of channels, so that every group keeps the same width
    groups: int = 1

    def scores(self) -> np.ndarray | None:
        """Channel importance: the largest |scale| over every source in the space.

        A channel of a residual group (several BNs write into it) is removed only when every
        BN that writes it has a small scale: the max is the reduction that keeps this safe.
        A channel no source scores (a BN saw only part of a split space) is never removed.
        """
        if not self.sources:
            return None
        full = np.full(self.size, np.nan)
        for s in self.sources:
            window = slice(s.offset, s.offset + len(s.values))
            full[window] = np.fmax(full[window], np.abs(s.values.astype(np.float64)))
        return np.where(np.isnan(full), np.inf, full)

    @property
    def source_kinds(self) -> list[str]:
        return sorted({s.kind for s in self.sources})

    @property
    def producers(self) -> list[str]:
        """The writers' names: the user's words (reports, --keep patterns, notes)."""
        return [node.name for node in self.writers]


class Spaces:
    """The channel spaces of one graph: a union-find whose links carry channel offsets."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self._parent: list[int] = []
        self._offset: list[int] = []  # channel offset of a space inside its parent

    def locate(self, space: int) -> tuple[int, int]:
        """(root, offset): the space's channels are channels offset.. of the root space.

        A union-find whose links carry offsets: a whole space joined to a part of another
        (a residual Add on one half of a Split) lives inside it from that offset on."""
        path, node, offset = [], space, 0
        while self._parent[node] != node:
            path.append(node)
            offset += self._offset[node]
            node = self._parent[node]
        for visited in path:  # path compression, keeping each node's total offset
            step = self._offset[visited]
            self._parent[visited], self._offset[visited] = node, offset
            offset -= step
        return node, self._offset[space] if path else 0

    def find(self, space: int) -> int:
        return self.locate(space)[0]

    def space(self, space: int) -> Space:
        return self.spaces[self.find(space)]

    def where(self, seg: Segment) -> tuple[int, int, int]:
        """(root, first channel in the root, size) of a segment."""
        root, offset = self.locate(seg.space)
        return root, offset + seg.offset, seg.size

    def _add(self, space: Space) -> Layout:
        self.spaces.append(space)
        self._parent.append(space.id)
        self._offset.append(0)
        return (Segment(space.id, space.size),)

    def new_space(self, size: int, producer: gs.Node) -> Layout:
        return self._add(Space(len(self.spaces), size, writers=[producer]))

    def opaque(self, size: int, reason: Reason) -> Layout:
        """Channels that flow on but cannot be removed (a graph input inside a Concat, ...)."""
        return self._add(Space(len(self.spaces), size, blocked=[reason]))

    def block(self, layout: Layout | None, reason: Reason) -> None:
        if not layout:
            return
        for seg in layout:
            space = self.space(seg.space)
            if reason not in space.blocked:
                space.blocked.append(reason)
        log.debug("blocked: %s", reason)

    def whole(self, seg: Segment) -> bool:
        root, first, size = self.where(seg)
        return first == 0 and size == self.spaces[root].size

    def merge(self, a: Layout, b: Layout, node: gs.Node) -> bool:
        """Join two layouts channel by channel; blocks both when their segments differ.

        Whole spaces join whole spaces; a whole space may join a part of another (it then
        lives inside it); two different parts cannot join."""
        pairs = list(zip(a, b))
        fits = len(a) == len(b) and all(sa.size == sb.size and sa.repeat == sb.repeat == 1 for sa, sb in pairs)
        if fits:
            for sa, sb in pairs:
                wa, wb = self.where(sa), self.where(sb)
                if wa != wb and wa[0] == wb[0] or not (self.whole(sa) or self.whole(sb)) and wa != wb:
                    fits = False
        if not fits:
            reason = Reason.at("join-mismatch", node, f"joins tensors whose channel groups differ "
                                                      f"({_sizes(a)} vs {_sizes(b)})")
            self.block(a, reason)
            self.block(b, reason)
            return False
        for sa, sb in pairs:
            (ra, fa, _), (rb, fb, _) = self.where(sa), self.where(sb)
            if ra == rb:
                continue
            if self.whole(sb) and (not self.whole(sa) or ra < rb):
                self._attach(rb, ra, fa)  # b's space lives inside a's root from channel fa
            else:
                self._attach(ra, rb, fb)
        return True

    def _attach(self, gone: int, keep: int, offset: int) -> None:
        self._parent[gone], self._offset[gone] = keep, offset
        into, other = self.spaces[keep], self.spaces[gone]
        into.writers += other.writers
        into.coupled += other.coupled
        into.parts += [(o + offset, n) for o, n in other.parts]
        if other.groups > 1:
            self._group(keep, other.groups if offset == 0 and other.size == into.size else 0)
        into.sources += [ScoreSource(s.node, s.kind, s.values, s.offset + offset) for s in other.sources]
        into.blocked += [r for r in other.blocked if r not in into.blocked]

    def group(self, layout: Layout, groups: int, node: gs.Node) -> bool:
        """Require equal removal in ``groups`` blocks of the channels of a whole-space layout."""
        if len(layout) != 1 or not self.whole(layout[0]):
            self.block(layout, Reason.at("grouped-conv", node, "is a grouped convolution over channels of several layers"))
            return False
        return self._group(self.find(layout[0].space), groups, node)

    def _group(self, root: int, groups: int, node: gs.Node | None = None) -> bool:
        space = self.spaces[root]
        both = math.lcm(space.groups, groups) if groups else 0
        if not both or space.size % both:
            detail = "splits the channels into groups that do not fit"
            reason = (Reason("grouped-conv", None, f"a grouped convolution {detail}") if node is None
                      else Reason.at("grouped-conv", node, detail))
            if reason not in space.blocked:
                space.blocked.append(reason)
            return False
        space.groups = both
        return True

    def take_part(self, layout: Layout) -> None:
        """Record that these channels travel as a part of their spaces (Split / Slice)."""
        for seg in layout:
            if not self.whole(seg):
                root, first, size = self.where(seg)
                self.spaces[root].parts.append((first, size))

    def add_scores(self, layout: Layout, values: np.ndarray, kind: str, node: gs.Node) -> None:
        values = np.asarray(values).reshape(-1)
        offset = 0
        for seg in layout:
            root, first, size = self.where(seg)
            self.spaces[root].sources.append(ScoreSource(node, kind, values[offset : offset + size], first))
            offset += seg.size

    def roots(self) -> list[Space]:
        return [s for s in self.spaces if self.find(s.id) == s.id]

    def channel_ids(self, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
        """(root space, channel in the root) of every channel of a layout, in layout order."""
        roots, index = [], []
        for seg in layout:
            root, first, size = self.where(seg)
            roots.append(np.full(size, root))
            index.append(np.arange(first, first + size))
        if not roots:
            return np.zeros(0, int), np.zeros(0, int)
        return np.concatenate(roots), np.concatenate(index)
