"""Index-mapping edits: the graph changes that follow from a keep-index per layout.

The analysis records them; the surgery applies them once the plan is known. Each edit reads
the node's *current* constant, so two edits on one weight (a Conv sliced as producer along
axis 0 and as consumer along axis 1) compose.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .analysis import KeepIndex, Layout, width


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The numpy value of a constant input, or None when the tensor is computed."""
    if not isinstance(tensor, gs.Constant):
        return None
    # Constant.values would load a lazy weight *and keep it*: every weight read once would then
    # sit in memory at full size until the end. Read lazy values without caching them.
    values = getattr(tensor, "_values", None)
    if values is None or not hasattr(values, "load"):
        return np.asarray(tensor.values)
    return np.asarray(values.load())


def constant_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The shape of a constant input without loading its values (weights can be large)."""
    return tuple(tensor.shape) if isinstance(tensor, gs.Constant) else None


def graph_names(graph: gs.Graph) -> set[str]:
    """Every tensor and node name in ``graph`` (top level)."""
    names = {n.name for n in graph.nodes}
    for node in graph.nodes:
        names.update(t.name for t in node.inputs)
        names.update(t.name for t in node.outputs)
    names.update(t.name for t in graph.inputs + graph.outputs)
    names.discard("")
    return names


def unique_name(graph: gs.Graph, base: str, taken: set[str] | None = None) -> str:
    """``base``, or ``base_2``, ``base_3``, ...: the first not used by any tensor or node of
    ``graph`` nor in ``taken``. Node names are optional and may repeat in ONNX, so a name built
    from one is never assumed to be unique."""
    names = graph_names(graph) | (taken or set())
    if base and base not in names:
        return base
    k = 2
    while f"{base}_{k}" in names:
        k += 1
    return f"{base}_{k}"


def _fingerprint(values: np.ndarray) -> tuple:
    values = np.ascontiguousarray(values)
    return values.dtype.str, values.shape, hashlib.sha256(values.tobytes()).hexdigest()


def replace_constant(node: gs.Node, index: int, values: np.ndarray) -> None:
    """Give input ``index`` of ``node`` new values without touching other users of the tensor.

    A weight shared by several nodes stays one tensor when they all get the same values: the
    readers switch to one new Constant per distinct value (remembered on the original tensor),
    and the original's last reader takes that Constant too rather than making a second one.
    Copies get provisional names; :func:`fix_tensor_names` makes them unique before export.
    """
    old = node.inputs[index]
    copies: dict[tuple, gs.Constant] | None = getattr(old, "_bnslim_copies", None)
    shared = isinstance(old, gs.Constant) and (bool(copies) or len(old.outputs) > 1)
    if shared and tuple(old.shape) == values.shape and np.array_equal(constant_values(old), values):
        return  # keeps every channel: nothing to copy
    key = _fingerprint(values) if shared else None
    if copies and key in copies:
        node.inputs[index] = copies[key]
    elif isinstance(old, gs.Constant) and len(old.outputs) == 1:
        old.values = values
    else:
        origin = getattr(old, "_bnslim_from", None) or old.name  # a copy of a copy names the first weight
        copy = gs.Constant(f"{origin or node.name + '_in' + str(index)}_slim", values)
        copy._bnslim_from = origin  # a derived copy, told apart in the size accounting
        if getattr(old, "_bnslim_storage", None) is not None:  # stored narrow: written back so (fold.restore_storage)
            copy._bnslim_storage = old._bnslim_storage
        if key is not None:
            if copies is None:
                copies = old._bnslim_copies = {}
            copies[key] = copy
        node.inputs[index] = copy


def fix_tensor_names(graph: gs.Graph) -> int:
    """Rename every tensor whose name a distinct, earlier tensor of the graph already has (the
    copies and constants the tool created); return how many were renamed."""
    seen: dict[str, gs.Tensor] = {}
    clashes: dict[int, gs.Tensor] = {}
    tensors = list(graph.inputs) + list(graph.outputs)
    for node in graph.nodes:
        tensors.extend(node.inputs)
        tensors.extend(node.outputs)
    for tensor in tensors:
        if tensor.name and seen.setdefault(tensor.name, tensor) is not tensor:
            clashes[id(tensor)] = tensor
    taken = set(seen)
    for tensor in clashes.values():
        tensor.name = unique_name(graph, tensor.name, taken)
        taken.add(tensor.name)
    return len(clashes)


def add_after(graph: gs.Graph, node: gs.Node, values: np.ndarray, name: str) -> None:
    """Insert ``output + values`` behind ``node``; its consumers keep reading the same tensor name."""
    out = node.outputs[0]
    pre = gs.Variable(unique_name(graph, f"{out.name}_{name}_in"), dtype=out.dtype)
    const = gs.Constant(unique_name(graph, f"{node.name}_{name}", {pre.name}), values)
    add_name = unique_name(graph, f"{node.name}_{name}", {pre.name, const.name})
    node.outputs[0] = pre
    graph.nodes.append(gs.Node("Add", add_name, inputs=[pre, const], outputs=[out]))


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
        replace_constant(self.node, self.index, np.take(values, keep(self.layout), axis=self.axis))


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
        values = constant_values(self.node.inputs[1])
        per_group = width(self.layout) // self.groups
        kept = keep(self.layout)
        rows = values.shape[0] // self.groups
        parts = []
        for j in range(self.groups):
            local = kept[(kept >= j * per_group) & (kept < (j + 1) * per_group)] - j * per_group
            parts.append(values[j * rows:(j + 1) * rows][:, local])
        replace_constant(self.node, 1, np.concatenate(parts, axis=0))


@dataclass
class SelectChannels:
    """A reader BN's branch (:class:`onnxslim_bn.analysis.Selector`): ``Gather`` on axis 1 of the
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
