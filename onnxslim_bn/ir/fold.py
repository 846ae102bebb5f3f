"""Constant folding of the small computations exporters leave around weights.

The dynamo exporter (``optimize=False``) writes a bias-less Conv's zero bias as
``Expand(CastLike(0, input), Expand(Shape(weight), [1]))``; TorchScript writes
``Unsqueeze(Constant(-1))`` for reshape targets; TF exports spell constants as Constant nodes.
The channel rules need plain constants, so these are evaluated once with ONNX's reference
implementation (no onnxruntime session, no change to any op that reads an activation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from .ops import CAST, CAST_LIKE, CONSTANT, IDENTITY, SEQUENCE_AT, SHAPE, SPLIT_TO_SEQUENCE
from .values import constant_values

# Cheap ops worth folding when every input is constant.
FOLDABLE = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "CastLike", "Slice", "Add", "Sub",
            "Mul", "Div", "Identity", "Reshape", "ConstantOfShape", "Range", "Expand", "ReduceProd", "Equal",
            "Where", "Transpose", "Neg", "Sqrt", "Reciprocal"}
MAX_FOLDED = 1 << 22  # elements; a folded tensor larger than this stays computed


@dataclass(frozen=True)
class Storage:
    """A weight stored narrower than it is computed (an fp16 initializer behind ``Cast(to=float)``):
    folded for the analysis, written back in its storage type by :func:`restore_storage`."""

    source: str  # the stored initializer's name
    dtype: np.dtype  # its type
    output: str  # the Cast's output name
    cast: str  # the Cast node's name
    to: int  # the Cast's target type


def evaluate(op: str, inputs: list[np.ndarray | None], attrs: dict, opset: int) -> np.ndarray | None:
    """Run one ONNX op on numpy inputs with onnx.reference; None when it cannot be evaluated."""
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if a is not None else "" for k, a in enumerate(inputs)]
    node = helper.make_node(op, names, ["out"], **attrs)
    graph = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in zip(names, inputs) if a is not None],
        [helper.make_tensor_value_info("out", onnx.TensorProto.UNDEFINED, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, {n: a for n, a in zip(names, inputs) if a is not None})[0])
    except Exception:  # noqa: BLE001 - the op stays computed; the channel rules then block what it touches
        return None


CONSTANT_ATTRS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def fold_constants(graph: gs.Graph) -> int:
    """Replace Constant nodes, and foldable nodes whose inputs are constants, by constants."""
    folded = 0
    graph_outputs = {t.name for t in graph.outputs}
    for node in list(graph.toposort().nodes):
        if len(node.outputs) != 1 or node.outputs[0].name in graph_outputs:
            continue
        out = node.outputs[0]
        if node.op == IDENTITY and isinstance(node.inputs[0], gs.Constant):
            const = node.inputs[0]  # shared parameters (torch writes Identity for them) stay one tensor
        else:
            if node.op == CONSTANT:
                value = _constant_node_value(node)
            elif node.op in FOLDABLE:
                call = _as_constant_call(node)
                value = None if call is None else evaluate(*call, graph.opset)
            else:
                continue
            if value is None or value.size > MAX_FOLDED:
                continue
            const = gs.Constant(out.name + "_folded", value)
            source = node.inputs[0] if node.op == CAST else None
            if isinstance(source, gs.Constant) and not source.inputs and _widens(source, value):
                const._bnslim_storage = Storage(source.name, np.dtype(source.dtype), out.name, node.name,
                                                int(node.attrs["to"]))
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        folded += 1
    graph.cleanup()
    return folded


def _widens(source: gs.Constant, value: np.ndarray) -> bool:
    """A float initializer cast to a wider float type: a storage type, not a computation."""
    have = np.dtype(source.dtype) if source.dtype is not None else None
    return (have is not None and np.issubdtype(have, np.floating) and np.issubdtype(value.dtype, np.floating)
            and value.dtype.itemsize > have.itemsize)


def stored_narrower(tensor: gs.Tensor) -> bool:
    """Whether a constant is a folded ``Cast`` of a narrower stored tensor (float16 weights): new
    values it cannot represent would be written widened (see :func:`restore_storage`)."""
    return getattr(tensor, "_bnslim_storage", None) is not None


def restore_storage(graph: gs.Graph) -> dict[str, int]:
    """Write folded storage casts back (see :class:`Storage`): every constant that came from
    ``Cast(stored)`` and still holds values the storage type represents exactly (sliced, not
    recomputed) becomes the stored tensor again, in its type, behind the same ``Cast``. A value
    the compensation changed (a bias that absorbed removed channels) stays in the computed type
    under the Cast's output name: rounding it would lose the compensation's exactness.
    Readers inside If / Loop bodies are restored too: they read the same outer ``Cast`` (a body
    left with the folded constant would carry it as a wide initializer of its own).
    Returns those widened tensors: name -> their bytes in the storage type."""
    done: dict[int, gs.Tensor] = {}
    narrow, widened = 0, {}
    readers = list(graph.nodes)
    readers += [n for node in graph.nodes for sub in node.subgraphs(recursive=True) for n in sub.nodes]
    for node in readers:
        for i, tensor in enumerate(node.inputs):
            storage = getattr(tensor, "_bnslim_storage", None)
            if storage is None:
                continue
            if id(tensor) not in done:
                values = constant_values(tensor)
                stored = values.astype(storage.dtype)
                copy = "_slim" if getattr(tensor, "_bnslim_from", None) else ""
                if np.array_equal(stored.astype(values.dtype), values, equal_nan=True):
                    source = gs.Constant(storage.source + copy, stored)
                    if copy:
                        source._bnslim_from = storage.source
                    out = gs.Variable(storage.output + copy, dtype=values.dtype, shape=list(values.shape))
                    graph.nodes.append(gs.Node(CAST, storage.cast + copy, {"to": storage.to},
                                               inputs=[source], outputs=[out]))
                    done[id(tensor)] = out
                    narrow += 1
                else:
                    tensor.name = storage.output + copy
                    widened[tensor.name] = int(values.size) * storage.dtype.itemsize
                    done[id(tensor)] = tensor
            node.inputs[i] = done[id(tensor)]
    if narrow:
        graph.toposort()
    return widened


def split_sequences(graph: gs.Graph) -> int:
    """``SplitToSequence`` read only by ``SequenceAt`` with constant indices (torch.split through
    the dynamo exporter with ``optimize=False``) becomes the plain ``Split`` it stands for."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != SPLIT_TO_SEQUENCE or node.attrs.get("keepdims", 1) != 1 or len(node.inputs) < 2:
            continue
        sizes = constant_values(node.inputs[1])
        readers = list(node.outputs[0].outputs)
        picks = [constant_values(r.inputs[1]) if r.op == SEQUENCE_AT else None for r in readers]
        if sizes is None or sizes.ndim != 1 or any(p is None for p in picks) or \
                any(node.outputs[0] is o for o in graph.outputs):
            continue
        parts: list[gs.Variable | None] = [None] * len(sizes)
        for reader, pick in zip(readers, picks):  # the first reader's tensor becomes the part ...
            tensor, index = reader.outputs[0], int(pick) % len(sizes)
            reader.outputs.clear()
            if parts[index] is None:
                parts[index] = tensor
                continue
            for consumer in list(tensor.outputs):  # ... and later readers of the same part use it
                for i, t in enumerate(consumer.inputs):
                    if t is tensor:
                        consumer.inputs[i] = parts[index]
        parts = [p if p is not None else gs.Variable(f"{node.name}_unused_{i}", dtype=node.inputs[0].dtype)
                 for i, p in enumerate(parts)]
        graph.nodes.append(gs.Node("Split", f"{node.name}_split", {"axis": node.attrs.get("axis", 0)},
                                   inputs=[node.inputs[0], gs.Constant(f"{node.name}_sizes", sizes.astype(np.int64))],
                                   outputs=parts))
        node.outputs.clear()
        rewritten += 1
    graph.cleanup().toposort()
    return rewritten


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    if isinstance(node.attrs.get("value"), gs.Constant):
        return np.asarray(node.attrs["value"].values)
    for name, dtype in CONSTANT_ATTRS.items():
        if name in node.attrs:
            return np.asarray(node.attrs[name], dtype)
    return None


def _as_constant_call(node: gs.Node) -> tuple[str, list[np.ndarray | None], dict] | None:
    """(op, input arrays, attributes) that compute the node from constants, or None.

    Shape reads only the shape of its input and CastLike only the type of its second input.
    """
    attrs = {k: (numpy_helper.from_array(v.values) if isinstance(v, gs.Constant) else v) for k, v in node.attrs.items()}
    if node.op == SHAPE:
        source = node.inputs[0]
        if not isinstance(source, gs.Constant):
            return None
        start, end = attrs.get("start", 0), attrs.get("end")
        return IDENTITY, [np.array(source.shape[start:end], np.int64)], {}
    if node.op == CAST_LIKE:
        value, like = node.inputs
        if not isinstance(value, gs.Constant) or like.dtype is None:
            return None
        return CAST, [constant_values(value)], {"to": helper.np_dtype_to_tensor_dtype(np.dtype(like.dtype))}
    args = []
    for t in node.inputs:
        value = constant_values(t) if t.name else None
        if t.name and value is None:
            return None
        args.append(value)
    return node.op, args, attrs
