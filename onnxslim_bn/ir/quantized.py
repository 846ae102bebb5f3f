"""Quantized constants (QDQ models): a weight stored as ``DequantizeLinear(integers, scale,
zero point[, axis])``, seen by the analysis as the float constant it dequantizes to and written
back as the same integers.

A QDQ model (onnxruntime ``quantize_static(..., quant_format=QDQ)``) keeps its graph in float
with ``DequantizeLinear`` in front of every weight and bias (int8 / uint8 weights, int32 biases
with scale ``input_scale * weight_scale``) and ``QuantizeLinear -> DequantizeLinear`` pairs on
the activations. The pairs are ops like any other (a rule passes the channels through them); the
weights are constants in disguise. :func:`fold_dequantized` replaces each by its float value,
marked with a :class:`Quantized` that holds the integers, the scale and the zero point; edits
that slice the constant slice the mark alike (:func:`edit_constant`: the integers along the
edit's axis, a per-channel scale and zero point too when they lie on that axis, a per-tensor one
never), so no value goes through float and back. :func:`restore_dequantized` writes every
marked constant back as ``DequantizeLinear`` of its (sliced) integers. A constant whose float
values the surgery changed otherwise (a bias that absorbed removed channels) no longer matches
its integers: an int32 bias is quantized again at its own scale (the error at most half a step,
``input_scale * weight_scale / 2``), a weight stays float (counted and reported).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from .ops import DEQUANTIZE
from .values import constant_values, replace_constant, unique_name
from .weights import axes

INTEGERS = (np.int8, np.uint8, np.int16, np.uint16, np.int32)  # stored types a DequantizeLinear folds from
MARK = "_bnslim_quantized"  # the attribute of a folded constant that holds its :class:`Quantized`


@dataclass(frozen=True)
class Quantized:
    """A constant folded from ``DequantizeLinear``: its integers, scale and zero point as they are
    now (sliced with the constant), and the node's names to write it back under."""

    data: np.ndarray  # the stored integers
    scale: np.ndarray  # per tensor (one value) or per channel along ``axis``
    zero_point: np.ndarray | None  # None: the node had none (0)
    axis: int | None  # the per-channel axis (non-negative); None per tensor
    names: tuple[str, str, str | None]  # the integer, scale and zero point initializers
    output: str  # the DequantizeLinear's output name
    node: str  # the DequantizeLinear's name
    attrs: dict = field(default_factory=dict)  # its attributes as written
    # the input tensors themselves, reused where they are unchanged (a scale shared with other nodes stays shared)
    tensors: tuple = ()

    def values(self) -> np.ndarray:
        """The float constant: ``(data - zero_point) * scale`` in the scale's type, as onnxruntime computes it."""
        shift = self.data.astype(np.int64) - (0 if self.zero_point is None else self._spread(self.zero_point).astype(np.int64))
        return shift.astype(self.scale.dtype) * self._spread(self.scale)

    def _spread(self, per: np.ndarray) -> np.ndarray:
        if self.axis is None:
            return per.reshape(())
        return per.reshape([-1 if a == self.axis else 1 for a in range(self.data.ndim)])

    def edited(self, fn: Callable[[np.ndarray, int], np.ndarray], axis: int) -> Quantized:
        """The mark after ``fn`` (array, axis) -> array changes the constant along ``axis``:
        the integers changed alike, a per-channel scale and zero point too when on that axis."""
        axis = axis % self.data.ndim
        data = fn(self.data, axis)
        if self.axis != axis:
            return replace(self, data=data)
        if self.scale.ndim != 1:  # the edits read per-channel parameters as vectors
            raise RuntimeError(f"{self.node}: a per-channel scale of shape {list(self.scale.shape)}")
        zero_point = None if self.zero_point is None else fn(self.zero_point, 0)
        return replace(self, data=data, scale=fn(self.scale, 0), zero_point=zero_point)


def quantized(tensor: gs.Tensor) -> Quantized | None:
    """The mark of a constant folded from ``DequantizeLinear``; None for any other tensor."""
    return getattr(tensor, MARK, None)


def _foldable(node: gs.Node) -> Quantized | None:
    """The :class:`Quantized` a ``DequantizeLinear`` of constants stands for; None for one that
    reads an activation, a blocked or sub-byte format, or parameters of an unexpected shape."""
    if node.op != DEQUANTIZE or len(node.outputs) != 1 or int(node.attrs.get("block_size", 0) or 0):
        return None
    inputs = [t for t in node.inputs if t.name]
    if len(inputs) < 2 or not all(isinstance(t, gs.Constant) for t in inputs):
        return None
    data, scale = constant_values(inputs[0]), constant_values(inputs[1])
    zero_point = constant_values(inputs[2]) if len(inputs) > 2 else None
    if data.dtype.type not in INTEGERS or not np.issubdtype(scale.dtype, np.floating):
        return None
    if zero_point is not None and zero_point.size != scale.size:  # per tensor: a scalar or shape [1], either
        return None
    axis = None  # one scale: per tensor
    if scale.size != 1:
        if scale.ndim != 1 or zero_point is not None and zero_point.ndim != 1 or data.ndim == 0:
            return None
        axis = int(node.attrs.get("axis", 1)) % data.ndim
        if data.shape[axis] != scale.size:
            return None
    names = (inputs[0].name, inputs[1].name, inputs[2].name if len(inputs) > 2 else None)
    return Quantized(data, scale, zero_point, axis, names, node.outputs[0].name, node.name, dict(node.attrs),
                     tuple(inputs))


def fold_dequantized(graph: gs.Graph) -> int:
    """Replace every ``DequantizeLinear`` of constants by the float constant it computes, marked
    with its :class:`Quantized` (see the module's doc); returns how many were folded. A
    ``DequantizeLinear`` whose output is a graph output stays."""
    outputs = {t.name for t in graph.outputs}
    folded = 0
    for node in list(graph.nodes):
        mark = _foldable(node)
        if mark is None or node.outputs[0].name in outputs:
            continue
        out = node.outputs[0]
        const = gs.Constant(out.name, mark.values())
        setattr(const, MARK, mark)
        for reader in list(out.outputs):
            for i, t in enumerate(reader.inputs):
                if t is out:
                    reader.inputs[i] = const
        node.outputs.clear()
        folded += 1
    if folded:
        graph.cleanup()
    return folded


def edit_constant(node: gs.Node, index: int, fn: Callable[[np.ndarray, int], np.ndarray], axis: int) -> None:
    """Input ``index`` of ``node`` (a constant) changed by ``fn`` (array, axis) -> array along
    ``axis`` (a slice of channels): through :func:`onnxslim_bn.ir.values.replace_constant`, and
    a quantized constant's integers, scale and zero point with it."""
    old = node.inputs[index]
    mark, values = quantized(old), constant_values(old)
    replace_constant(node, index, fn(values, axis))
    if mark is not None:
        setattr(node.inputs[index], MARK, mark.edited(fn, axis))


@dataclass(frozen=True)
class Restored:
    """What :func:`restore_dequantized` wrote: the constants back as integers, the int32 biases
    quantized again after a compensation changed them, the weights left in float."""

    integers: int = 0
    requantized: tuple[str, ...] = ()
    left_float: tuple[str, ...] = ()


def restore_dequantized(graph: gs.Graph) -> Restored:
    """Write every marked constant back as ``DequantizeLinear`` of its integers (see the module's doc)."""
    done: dict[int, gs.Tensor] = {}
    requantized, left_float = [], []
    for node in list(graph.nodes):
        for i, tensor in enumerate(node.inputs):
            mark = quantized(tensor)
            if mark is None:
                continue
            if id(tensor) not in done:
                values = constant_values(tensor)
                if values.shape == mark.data.shape and np.array_equal(values, mark.values(), equal_nan=True):
                    done[id(tensor)] = _write(graph, mark)
                elif values.shape == mark.data.shape and mark.data.dtype == np.int32:
                    done[id(tensor)] = _write(graph, replace(mark, data=_requantize(values, mark)))
                    requantized.append(tensor.name)
                else:
                    left_float.append(tensor.name)
                    done[id(tensor)] = tensor
            node.inputs[i] = done[id(tensor)]
    added = _quantize_added_biases(graph, done)
    if done or added:
        graph.toposort()
    return Restored(len(done) - len(left_float), tuple(requantized) + added, tuple(left_float))


def _quantize_added_biases(graph: gs.Graph, written: dict[int, gs.Tensor]) -> tuple[str, ...]:
    """A float bias the compensation gave a layer whose input and weight are dequantized (a
    bias-less Conv, a Gemm without C): written as onnxruntime writes one, int32 at scale
    ``input_scale * weight_scale`` (per output channel with the weight's) and zero point 0."""
    quantized_outputs = {id(t) for t in written.values() if isinstance(t, gs.Variable)}
    added = []
    for node in list(graph.nodes):
        found = axes(node)
        if found is None or found.bias is None or len(node.inputs) <= found.bias or id(node.inputs[1]) not in quantized_outputs:
            continue
        bias, weight_dq = node.inputs[found.bias], node.inputs[1].inputs[0]
        source = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
        if not isinstance(bias, gs.Constant) or quantized(bias) is not None or source is None or source.op != DEQUANTIZE:
            continue
        in_scale = constant_values(source.inputs[1]) if isinstance(source.inputs[1], gs.Constant) else None
        w_scale = constant_values(weight_dq.inputs[1])
        values = constant_values(bias)
        if in_scale is None or in_scale.size != 1 or values.ndim != 1 or not np.issubdtype(values.dtype, np.floating):
            continue
        axis = int(weight_dq.attrs.get("axis", 1)) % len(weight_dq.inputs[0].shape) if w_scale.size > 1 else None
        if axis is not None and (axis != found.out_axis or w_scale.size != values.size):
            continue
        scale = (np.broadcast_to(w_scale.reshape(-1), values.shape) * in_scale.reshape(())).astype(w_scale.dtype)
        mark = Quantized(np.zeros(values.shape, np.int32), scale, np.zeros(values.shape, np.int32), 0,
                         (bias.name + "_quantized", bias.name + "_quantized_scale", bias.name + "_quantized_zero_point"),
                         bias.name, bias.name + "_DequantizeLinear", {"axis": 0})
        node.inputs[found.bias] = _write(graph, replace(mark, data=_requantize(values, mark)))
        added.append(bias.name)
    return tuple(added)


def _requantize(values: np.ndarray, mark: Quantized) -> np.ndarray:
    """An int32 bias's new float values at its own scale and zero point, rounded half to even."""
    zero = 0 if mark.zero_point is None else mark._spread(mark.zero_point).astype(np.float64)
    q = np.rint(values.astype(np.float64) / mark._spread(mark.scale).astype(np.float64)) + zero
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32)


def _write(graph: gs.Graph, mark: Quantized) -> gs.Variable:
    """``DequantizeLinear`` of the mark's integers: the original tensors where they are unchanged."""
    originals = list(mark.tensors) + [None] * (3 - len(mark.tensors))
    arrays = [mark.data, mark.scale] + ([] if mark.zero_point is None else [mark.zero_point])
    inputs = []
    for name, original, values in zip(mark.names, originals, arrays):
        same = original is not None and tuple(original.shape) == values.shape and \
            np.array_equal(constant_values(original), values)
        inputs.append(original if same else gs.Constant(name, values))
    out = gs.Variable(mark.output, dtype=mark.scale.dtype, shape=list(mark.data.shape))
    graph.nodes.append(gs.Node(DEQUANTIZE, unique_name(graph, mark.node), dict(mark.attrs), inputs=inputs, outputs=[out]))
    return out


def weight_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The shape of a constant, or of the integers behind a ``DequantizeLinear`` of constants (a
    QDQ weight as written, after :func:`restore_dequantized`): for counting, never for slicing."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is not None and producer.op == DEQUANTIZE and isinstance(producer.inputs[0], gs.Constant):
        return tuple(producer.inputs[0].shape)
    return None
