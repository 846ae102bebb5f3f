"""Values of a graph: constants read without caching, unique names, constant replacement, and
a checkpoint that puts a graph back as it was."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx_graphsurgeon as gs

from .ops import BIAS_ADD


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
    graph.nodes.append(gs.Node(BIAS_ADD, add_name, inputs=[pre, const], outputs=[out]))


class Checkpoint:
    """Every node, tensor and (sub)graph of ``graph`` as it is now, to :meth:`restore` later.

    Surgery edits the analysed graph (inputs rewired, attributes set, constants replaced, nodes
    added, cleanup and toposort, renames before export); restoring puts back each object's fields
    and the contents of its lists and dicts, so the objects the analysis holds (nodes in edits
    and consumers, tensors by name) stay valid and one analysis serves every attempt. It keeps
    references, not copies: edits replace a constant's array, never write into it, and the
    arrays it finds are read-only until :meth:`restore` so that a write into one fails loudly.
    Objects created after the checkpoint are simply dropped by the restore."""

    def __init__(self, graph: gs.Graph):
        self._saved: list[tuple[object, dict, dict]] = []
        self._frozen: list[np.ndarray] = []
        for obj in _objects(graph):
            fields = dict(vars(obj))
            contents = {k: (list(v) if isinstance(v, list) else dict(v))
                        for k, v in fields.items() if isinstance(v, (list, dict))}
            self._saved.append((obj, fields, contents))
            values = fields.get("_values")
            if isinstance(values, np.ndarray) and values.flags.writeable:
                values.flags.writeable = False
                self._frozen.append(values)

    def restore(self) -> None:
        for obj, fields, contents in self._saved:
            vars(obj).clear()
            vars(obj).update(fields)
            for key, items in contents.items():
                container = fields[key]
                if isinstance(container, list):  # list's own methods: gs's synchronized lists must not re-sync
                    list.__setitem__(container, slice(None), items)
                else:
                    dict.clear(container)
                    dict.update(container, items)
        for values in self._frozen:
            values.flags.writeable = True


def _objects(graph: gs.Graph) -> list:
    """``graph``, its subgraphs and functions, their nodes and every tensor they touch, each once."""
    seen: dict[int, object] = {}
    stack = [graph]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen[id(current)] = current
        tensors = list(current.inputs) + list(current.outputs)
        for node in current.nodes:
            seen.setdefault(id(node), node)
            tensors.extend(node.inputs)
            tensors.extend(node.outputs)
            stack.extend(node.subgraphs())
        stack.extend(getattr(current, "functions", []))
        for tensor in tensors:
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())


@contextmanager
def restored(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` to edit inside the block; as it was again after it, also when the block raises."""
    checkpoint = Checkpoint(graph)
    try:
        yield graph
    finally:
        checkpoint.restore()


def known_product(dims: list | None) -> int | None:
    """Product of the dims when every one is a known integer, else None."""
    if dims is None:
        return None
    total = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        total *= d
    return total
