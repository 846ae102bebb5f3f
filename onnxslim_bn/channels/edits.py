"""Index-mapping edits: the graph changes that follow from a keep-index per layout.

The analysis records them; the surgery applies them once the plan is known. Each edit reads
the node's *current* constant, so two edits on one weight (a Conv sliced as producer along
axis 0 and as consumer along axis 1) compose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.quantized import edit_constant
from ..ir.values import constant_values, replace_constant, unique_name
from .context import KeepIndex
from .layout import Layout, width


@dataclass
class SliceParam:
    """Keep, along ``axis`` of constant input ``index``, the entries of the kept channels."""

    node: gs.Node
    index: int
    axis: int
    layout: Layout

    def apply(self, keep: KeepIndex) -> None:
        if self.index >= len(self.node.inputs):
            return
        values = constant_values(self.node.inputs[self.index])
        if values is None or values.ndim == 0 or values.shape[self.axis] == 1 != width(self.layout):
            return  # absent, or broadcast (size 1) along the axis: nothing to slice
        if values.shape[self.axis] != width(self.layout):  # the rules check this: a bug if hit
            raise RuntimeError(f"{self.node.name}: input {self.index} has {values.shape[self.axis]} "
                               f"entries on axis {self.axis}, the layout {width(self.layout)}")
        kept = keep(self.layout)
        edit_constant(self.node, self.index, lambda a, axis: np.take(a, kept, axis=axis), self.axis)


@dataclass
class SetGroup:
    """Depthwise Conv: the group count follows the number of kept channels."""

    node: gs.Node
    layout: Layout

    def apply(self, keep: KeepIndex) -> None:
        self.node.attrs["group"] = int(len(keep(self.layout)))


@dataclass
class SetShapeEntry:
    """A constant Reshape target or Resize ``sizes`` that spells the channel width out."""

    node: gs.Node
    index: int
    entry: int
    layout: Layout

    def apply(self, keep: KeepIndex) -> None:
        values = constant_values(self.node.inputs[self.index]).copy()
        values[self.entry] = len(keep(self.layout))
        replace_constant(self.node, self.index, values)


@dataclass
class SetSplitSizes:
    """Split on the channel axis: the output widths follow the kept channels of each part.

    Written as the ``split`` attribute before opset 13 and as input 1 from 13 (an equal split
    or ``num_outputs`` becomes explicit, since pruning may make the parts unequal)."""

    node: gs.Node
    parts: list[Layout]
    opset: int

    def apply(self, keep: KeepIndex) -> None:
        sizes = np.array([len(keep(p)) for p in self.parts], np.int64)
        if self.opset < 13:
            self.node.attrs["split"] = [int(v) for v in sizes]
            return
        self.node.attrs.pop("num_outputs", None)
        if len(self.node.inputs) > 1:
            replace_constant(self.node, 1, sizes)
        else:
            self.node.inputs.append(gs.Constant(f"{self.node.name}_split_slim", sizes))


@dataclass
class SetSliceRange:
    """Slice on the channel axis: start and end move to the kept channels before and inside."""

    node: gs.Node
    entry: int  # position of the channel axis in starts / ends
    before: Layout  # channels before the slice's start
    inside: Layout
    opset: int

    def apply(self, keep: KeepIndex) -> None:
        start = len(keep(self.before))
        end = start + len(keep(self.inside))
        if self.opset < 10:
            starts, ends = list(self.node.attrs["starts"]), list(self.node.attrs["ends"])
            starts[self.entry], ends[self.entry] = start, end
            self.node.attrs["starts"], self.node.attrs["ends"] = starts, ends
            return
        for index, value in ((1, start), (2, end)):
            values = constant_values(self.node.inputs[index]).copy()
            values[self.entry] = value
            replace_constant(self.node, index, values)


@dataclass
class SliceGroupedInput:
    """A grouped Conv's weight [C_out, C_in/g, k...]: each group's rows keep the kept input
    channels of that group (the same count in every group; the plan sees to it)."""

    node: gs.Node
    layout: Layout
    groups: int

    def apply(self, keep: KeepIndex) -> None:
        per_group = width(self.layout) // self.groups
        kept = keep(self.layout)

        def take(values: np.ndarray, axis: int) -> np.ndarray:
            if axis != 1:  # a quantized weight's per-channel scale on axis 1 (never written so)
                raise RuntimeError(f"{self.node.name}: a grouped weight with per-input-channel parameters")
            rows = values.shape[0] // self.groups
            parts = []
            for j in range(self.groups):
                local = kept[(kept >= j * per_group) & (kept < (j + 1) * per_group)] - j * per_group
                parts.append(values[j * rows:(j + 1) * rows][:, local])
            return np.concatenate(parts, axis=0)

        edit_constant(self.node, 1, take, 1)


@dataclass
class SelectChannels:
    """A reader BN's branch (:class:`onnxslim_bn.channels.context.Selector`): ``Gather`` on axis 1 of the
    shared tensor picks the channels the branch keeps (inserted only when it drops some)."""

    node: gs.Node
    source: Layout
    branch: Layout
    graph: gs.Graph

    def apply(self, keep: KeepIndex) -> None:
        have, want = keep(self.source), keep(self.branch)
        if len(have) == len(want):
            return
        index = np.searchsorted(have, want)
        if np.any(index >= len(have)) or not np.array_equal(have[index], want):
            raise RuntimeError(f"{self.node.name}: the branch keeps channels the shared tensor lost")
        shared = self.node.inputs[0]
        name = unique_name(self.graph, f"{shared.name}_select")
        index_name = unique_name(self.graph, name + "_index", {name})
        picked = gs.Variable(name, dtype=shared.dtype)
        self.graph.nodes.append(gs.Node("Gather", name, attrs={"axis": 1}, outputs=[picked],
                                        inputs=[shared, gs.Constant(index_name, index.astype(np.int64))]))
        self.node.inputs[0] = picked
