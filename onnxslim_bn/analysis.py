"""Channel analysis: which channels of the graph must be kept or removed together.

A *channel space* is a set of channels that live or die together. Every tensor whose axis 1
carries pruneable channels has a :data:`Layout`: the spaces laid end to end along that axis
(one segment for an ordinary activation, several after a channel concatenation). The op rules
in :mod:`onnxslim_bn.rules` open spaces (Conv, Gemm), pass them on (BN, activations, pooling),
merge them (residual Add, squeeze-excitation Mul), lay them end to end (Concat), consume them
(the next layer's weights) or block them with a reason a person can read.

The analysis never edits the graph. It records :class:`Edit` objects ("slice input 1 of node
X along axis 0 by this layout"), which :mod:`onnxslim_bn.surgery` applies once the plan has
chosen which channels to keep.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx_graphsurgeon as gs

from .shapes import known_product

if TYPE_CHECKING:
    from .rules import Rule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """``size`` consecutive channels of one space, from channel ``offset`` of the space (a
    Split or Slice on the channel axis takes part of a space); each channel spans ``repeat``
    entries (``repeat`` > 1 after a C*H*W flatten: channel c owns entries c*H*W .. (c+1)*H*W-1)."""

    space: int
    size: int
    repeat: int = 1
    offset: int = 0


def cut(layout: Layout, start: int, end: int) -> Layout:
    """The channels [start, end) of a layout, as segments (of parts) of the same spaces."""
    out, pos = [], 0
    for seg in layout:
        lo, hi = max(start, pos), min(end, pos + seg.size)
        if lo < hi:
            out.append(Segment(seg.space, hi - lo, seg.repeat, seg.offset + lo - pos))
        pos += seg.size
    return tuple(out)


Layout = tuple[Segment, ...]


def width(layout: Layout) -> int:
    """Number of entries along the channel axis (channels times their repeat)."""
    return sum(s.size * s.repeat for s in layout)


def channels(layout: Layout) -> int:
    return sum(s.size for s in layout)


@dataclass
class ScoreSource:
    """Per-channel importance read from one node (a BN scale, a Mul scale, folded weights)."""

    node: str
    kind: str  # "bn" | "mul" | "folded"
    values: np.ndarray
    offset: int = 0  # the first channel of the space it scores (a BN after a Split sees a part)


@dataclass
class Space:
    id: int
    size: int
    producers: list[str] = field(default_factory=list)
    # depthwise convs write the space too (a folded BN after them scales it)
    coupled: list[str] = field(default_factory=list)
    sources: list[ScoreSource] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
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


class KeepIndex(Protocol):
    def __call__(self, layout: Layout) -> np.ndarray: ...


class Edit(Protocol):
    """A change to the graph that depends on which channels the plan keeps."""

    node: gs.Node

    def apply(self, keep: KeepIndex) -> None: ...


@dataclass
class Selector:
    """A BatchNorm that is one reader among several of a tensor (pre-activation layouts,
    DenseNet): it scores only its own branch. Its output is a space of its own (``space``),
    fed through a ``Gather`` of the kept channels of ``source`` (the shared tensor's layout),
    which stays whole for the other readers. The shared channels it keeps stay in ``source``."""

    node: gs.Node
    source: Layout
    space: int


@dataclass
class Consumer:
    """A node whose weights read a channel-carrying input (compensation happens here)."""

    node: gs.Node
    rule: Rule


class Analysis:
    """The result of walking the graph once with the op rules; also the rules' context."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, list[int | str | None]]):
        self.graph = graph
        self.shapes = shapes
        self.layouts: dict[str, Layout] = {}
        self.spaces: list[Space] = []
        self._parent: list[int] = []
        self._offset: list[int] = []  # channel offset of a space inside its parent
        self.edits: list[Edit] = []
        self.consumers: list[Consumer] = []
        self.selectors: list[Selector] = []
        self.selecting: set[str] = set()  # reader BNs (by node name) that score their branch only
        self.readers: list[tuple[gs.Node, Layout]] = []  # every BN that is one reader among several
        # consumer input tensor -> measured channel means (data importance): the replacement there
        self.input_means: dict[str, np.ndarray] = {}
        # nodes that act as the BN scale of a space without BN (folded producers, split-BN Muls),
        # with the mean of their output: the constant a removed channel is replaced by
        self.scale_nodes: dict[str, np.ndarray] = {}
        # the model fixes every input dimension but the batch: inferred sizes hold for any run
        self.static_sizes = all(all(isinstance(d, int) for d in (t.shape or [None])[1:]) for t in graph.inputs)
        self.nodes: list[gs.Node] = []
        # layer tensors whose shapes inference left open, as one run gave them (verify.concrete_shapes):
        # for counting costs only, as they hold for that run's inputs (analysis and surgery never read them)
        self.counted_shapes: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ reading the graph
    def layout(self, tensor: gs.Tensor) -> Layout | None:
        return self.layouts.get(tensor.name)

    def shape(self, tensor: gs.Tensor) -> list[int | str | None] | None:
        if isinstance(tensor, gs.Constant):
            return list(tensor.shape)
        return self.shapes.get(tensor.name)

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def static_dims(self, tensor: gs.Tensor, axes: range | list[int]) -> int | None:
        """Product of the given dims when all are known integers, else None."""
        shape = self.shape(tensor)
        if shape is None or any(a >= len(shape) for a in axes):
            return None
        return known_product([shape[a] for a in axes])

    # ------------------------------------------------------------------ spaces
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
        return self._add(Space(len(self.spaces), size, producers=[producer.name]))

    def select(self, source: Layout, node: gs.Node) -> Layout:
        """A branch of its own for a reader BN: a new space, one channel per channel of ``source``."""
        layout = self._add(Space(len(self.spaces), channels(source), producers=[node.name]))
        self.selectors.append(Selector(node, source, layout[0].space))
        return layout

    def opaque(self, size: int, reason: str) -> Layout:
        """Channels that flow on but cannot be removed (a graph input inside a Concat, ...)."""
        return self._add(Space(len(self.spaces), size, blocked=[reason]))

    def block(self, layout: Layout | None, reason: str) -> None:
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
            reason = (f"{node.op} {node.name} joins tensors whose channel groups differ "
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
        into.producers += other.producers
        into.coupled += other.coupled
        into.parts += [(o + offset, n) for o, n in other.parts]
        if other.groups > 1:
            self._group(keep, other.groups if offset == 0 and other.size == into.size else 0)
        into.sources += [ScoreSource(s.node, s.kind, s.values, s.offset + offset) for s in other.sources]
        into.blocked += [r for r in other.blocked if r not in into.blocked]

    def group(self, layout: Layout, groups: int, node: gs.Node) -> bool:
        """Require equal removal in ``groups`` blocks of the channels of a whole-space layout."""
        if len(layout) != 1 or not self.whole(layout[0]):
            self.block(layout, f"{node.op} {node.name} is a grouped convolution over channels of several layers")
            return False
        return self._group(self.find(layout[0].space), groups, node)

    def _group(self, root: int, groups: int, node: gs.Node | None = None) -> bool:
        space = self.spaces[root]
        both = math.lcm(space.groups, groups) if groups else 0
        if not both or space.size % both:
            where = f"{node.op} {node.name}" if node is not None else "a grouped convolution"
            if f"{where} splits the channels into groups that do not fit" not in space.blocked:
                space.blocked.append(f"{where} splits the channels into groups that do not fit")
            return False
        space.groups = both
        return True

    def take_part(self, layout: Layout) -> None:
        """Record that these channels travel as a part of their spaces (Split / Slice)."""
        for seg in layout:
            if not self.whole(seg):
                root, first, size = self.where(seg)
                self.spaces[root].parts.append((first, size))

    # ------------------------------------------------------------------ recording
    def set_layout(self, tensor: gs.Tensor, layout: Layout) -> None:
        self.layouts[tensor.name] = layout

    def add_scores(self, layout: Layout, values: np.ndarray, kind: str, node: gs.Node) -> None:
        values = np.asarray(values).reshape(-1)
        offset = 0
        for seg in layout:
            root, first, size = self.where(seg)
            self.spaces[root].sources.append(ScoreSource(node.name, kind, values[offset : offset + size], first))
            offset += seg.size

    def edit(self, edit: Edit) -> None:
        index, layout = getattr(edit, "index", None), getattr(edit, "layout", None)
        if index is not None and index < len(edit.node.inputs):
            tensor = edit.node.inputs[index]
            if any(tensor is out for out in self.graph.outputs):  # slicing it would change the interface
                self.block(layout, f"{edit.node.op} {edit.node.name} reads '{tensor.name}', which is also a graph output")
                return
        self.edits.append(edit)

    def consume(self, node: gs.Node, rule: Rule) -> None:
        self.consumers.append(Consumer(node, rule))

    # ------------------------------------------------------------------ results
    def roots(self) -> list[Space]:
        return [s for s in self.spaces if self.find(s.id) == s.id]

    def prunable(self) -> list[Space]:
        """Spaces whose channels a score ranks, or that reader BNs may empty (see Selector)."""
        read = {self.find(seg.space) for sel in self.selectors for seg in sel.source}
        return [s for s in self.roots() if not s.blocked and s.producers and (s.sources or s.id in read)]

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


def _sizes(layout: Layout) -> str:
    return "+".join(str(s.size) for s in layout)


def analyze(graph: gs.Graph, shapes: dict[str, list[int | str | None]],
            protect: Callable[[str], bool] | None = None) -> Analysis:
    """Walk ``graph`` in topological order and apply the rule for every node.

    A BN that is one reader among several of a tensor first scores the tensor's space, like the
    others (a channel goes when every BN reading it lets it die: exact, and no copy is added).
    Where some other reader sees the raw channels (a shortcut, a downsample conv: the replacement
    is unknown there, see :mod:`.replacement`), that would keep them all; the walk is then done
    again with those BNs scoring only their branch (:class:`Selector`)."""
    from .replacement import dead_values, unsafe_channels

    first = _walk(graph, shapes, protect, set())
    if not first.readers:
        return first
    unsafe = unsafe_channels(first, dead_values(first))
    raw = {bn.name for bn, source in first.readers  # a raw reader, or a tensor nothing else may prune
           if any(unsafe.mask.get(first.find(seg.space), np.zeros(1, bool)).any() or first.space(seg.space).blocked
                  for seg in source)}
    return _walk(graph, shapes, protect, raw) if raw else first


def _walk(graph: gs.Graph, shapes: dict[str, list[int | str | None]], protect: Callable[[str], bool] | None,
          selecting: set[str]) -> Analysis:
    from .rules import RULES  # the registry imports this module for its types

    ctx = Analysis(graph, shapes)
    ctx.selecting = selecting
    graph.toposort()
    ctx.nodes = list(graph.nodes)
    for node in ctx.nodes:
        carrying = [t for t in node.inputs if t.name in ctx.layouts]
        for sub in node.subgraphs(recursive=True):  # If / Loop bodies read outer tensors implicitly
            for name in sub.tensors():
                if name in ctx.layouts:
                    ctx.block(ctx.layouts[name], f"{node.op} {node.name} reads '{name}' inside its subgraph")
        rule = RULES.get(node.op) if node.domain in ("", "ai.onnx", None) else None
        if rule is None:
            if carrying:
                for t in carrying:
                    ctx.block(ctx.layout(t), f"{node.op} {node.name} is not an op onnx-bnslim can follow")
            continue
        rule.analyze(node, ctx)
    for out in graph.outputs:
        ctx.block(ctx.layout(out), f"the channels reach the graph output '{out.name}'")
    if protect is not None:
        for space in ctx.roots():
            hit = [p for p in space.producers if protect(p)]
            if hit:
                ctx.block((Segment(space.id, space.size),), f"{hit[0]} is protected by --keep")
    return ctx
