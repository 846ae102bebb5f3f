"""The analysis of one graph: its channel spaces, tensor layouts and recorded edits; the rules' context.

The analysis never edits the graph. It records :class:`Edit` objects ("slice input 1 of node
X along axis 0 by this layout"), which the surgery applies once the plan has chosen which
channels to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.ids import ObjectMap, ObjectSet
from ..ir.values import known_product
from .layout import Layout, channels
from .reasons import Reason
from .spaces import ScoreSource, Space, Spaces

if TYPE_CHECKING:
    from ..rules.base import Rule


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


@dataclass(frozen=True)
class Scores:
    """What an importance pass found, for :meth:`Analysis.apply`: the passes (scale recovery,
    data importance) compute it from the analysis and return it; only the analysis writes it in."""

    # (layout, per-channel values, kind, node): importance read from a node (a recovered BN scale)
    added: tuple[tuple[Layout, np.ndarray, str, gs.Node], ...] = ()
    # (root space, cost per channel measured at the consumers): the space's scores from now on
    ranked: tuple[tuple[int, np.ndarray], ...] = ()
    # root spaces left alone only for want of a BN scale that the pass ranks after all: those reasons go
    reopened: tuple[int, ...] = ()
    blocks: tuple[tuple[Layout, Reason], ...] = ()
    # nodes acting as the BN scale of a space without BN, with their mean output (the replacement)
    scale_means: tuple[tuple[gs.Node, np.ndarray], ...] = ()
    # consumer input tensor -> its measured channel means (the replacement there)
    input_means: tuple[tuple[str, np.ndarray], ...] = ()


@dataclass
class Consumer:
    """A node whose weights read a channel-carrying input (compensation happens here)."""

    node: gs.Node
    rule: Rule


class Analysis(Spaces):
    """The result of walking the graph once with the op rules; also the rules' context."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, list[int | str | None]]):
        super().__init__()
        self.graph = graph
        self.shapes = shapes
        self.layouts: dict[str, Layout] = {}
        self.edits: list[Edit] = []
        self.consumers: list[Consumer] = []
        self.selectors: list[Selector] = []
        self.selecting: ObjectSet[gs.Node] = ObjectSet()  # reader BNs that score their branch only
        self.readers: list[tuple[gs.Node, Layout]] = []  # every BN that is one reader among several
        # consumer input tensor -> measured channel means (data importance): the replacement there
        self.input_means: dict[str, np.ndarray] = {}
        # nodes that act as the BN scale of a space without BN (folded producers, split-BN Muls),
        # with the mean of their output: the constant a removed channel is replaced by
        self.scale_nodes: ObjectMap[gs.Node, np.ndarray] = ObjectMap()
        # the model fixes every input dimension but the batch: inferred sizes hold for any run
        self.static_sizes = all(all(isinstance(d, int) for d in (t.shape or [None])[1:]) for t in graph.inputs)
        self.nodes: list[gs.Node] = []
        # layer tensors whose shapes inference left open, as one run gave them (verify.concrete_shapes):
        # for counting costs only, as they hold for that run's inputs (analysis and surgery never read them)
        self.counted_shapes: dict[str, list[int]] = {}

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

    def select(self, source: Layout, node: gs.Node) -> Layout:
        """A branch of its own for a reader BN: a new space, one channel per channel of ``source``."""
        layout = self._add(Space(len(self.spaces), channels(source), writers=[node]))
        self.selectors.append(Selector(node, source, layout[0].space))
        return layout

    def set_layout(self, tensor: gs.Tensor, layout: Layout) -> None:
        self.layouts[tensor.name] = layout

    def edit(self, edit: Edit) -> None:
        index, layout = getattr(edit, "index", None), getattr(edit, "layout", None)
        if index is not None and index < len(edit.node.inputs):
            tensor = edit.node.inputs[index]
            if any(tensor is out for out in self.graph.outputs):  # slicing it would change the interface
                self.block(layout, Reason.at("graph-output", edit.node, f"reads '{tensor.name}', which is also a graph output"))
                return
        self.edits.append(edit)

    def consume(self, node: gs.Node, rule: Rule) -> None:
        self.consumers.append(Consumer(node, rule))

    def apply(self, scores: Scores) -> None:
        """Write in what an importance pass found (its reasons through :meth:`block`)."""
        for root in scores.reopened:
            self.spaces[root].blocked = [r for r in self.spaces[root].blocked if r.code != "no-scale"]
        for layout, reason in scores.blocks:
            self.block(layout, reason)
        for layout, values, kind, node in scores.added:
            self.add_scores(layout, values, kind, node)
        for root, values in scores.ranked:
            self.spaces[root].sources = [ScoreSource(None, "data", values)]
        self.scale_nodes.update(scores.scale_means)
        self.input_means.update(scores.input_means)

    def prunable(self) -> list[Space]:
        """Spaces whose channels a score ranks, or that reader BNs may empty (see Selector)."""
        read = {self.find(seg.space) for sel in self.selectors for seg in sel.source}
        return [s for s in self.roots() if not s.blocked and s.writers and (s.sources or s.id in read)]
