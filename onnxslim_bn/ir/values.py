"""Values of a graph: constants read without caching, unique names, constant replacement."""

from __future__ import annotations

import hashlib

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
