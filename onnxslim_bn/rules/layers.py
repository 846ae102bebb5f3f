"""Layers with weights: they open channel spaces (outputs) and consume them (inputs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..channels.context import Analysis
from ..channels.edits import SetGroup, SliceGroupedInput, SliceParam
from ..channels.layout import width
from ..channels.reasons import Reason
from ..ir import runtime
from ..ir.fold import stored_narrower
from ..ir.quantized import weight_shape
from ..ir.values import add_after, constant_shape, constant_values, known_product, replace_constant, unique_name
from ..ir.weights import axes
from .base import Compensation, Rule, attr, block_inputs, register


def _removed_rows(dead: np.ndarray, removed: np.ndarray, repeat: np.ndarray | int = 1):
    """Rows of a weight fed by removed channels, with the constant each carries."""
    known = removed & np.isfinite(dead)
    return np.repeat(np.where(known, dead, 0.0), repeat), int((removed & ~known).sum())


@register
class ConvRule(Rule):
    """Conv and ConvTranspose: output channels open a space; input channels are sliced off
    the weight (Conv weight [C_out, C_in/g, k...], ConvTranspose weight [C_in, C_out/g, k...]).

    Depthwise (group == C_in == C_out) couples its input and output channels instead.
    Other grouped convolutions block both sides.
    """

    ops = ("Conv", "ConvTranspose")

    @staticmethod
    def _axes(node: gs.Node) -> tuple[int, int]:
        """(input-channel axis, output-channel axis) of the weight."""
        found = axes(node)
        return found.in_axis, found.out_axis

    def _channels(self, node: gs.Node, weight: tuple[int, ...]) -> tuple[int, int]:
        found = axes(node)
        return found.in_channels(weight), found.out_channels(weight)

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        weight = constant_shape(node.inputs[1])
        if weight is None:
            block_inputs(node, ctx, "computed-parameter", "has a computed weight")
            return
        group = attr(node, "group", 1)
        (c_in, c_out), (in_axis, out_axis) = self._channels(node, weight), self._axes(node)
        bias_ok = len(node.inputs) < 3 or not node.inputs[2].name or isinstance(node.inputs[2], gs.Constant)
        layout = ctx.layout(node.inputs[0])
        if not bias_ok:
            block_inputs(node, ctx, "computed-parameter", "has a computed bias")
        if group == 1:
            if layout is not None and bias_ok:
                if width(layout) != c_in or any(s.repeat != 1 for s in layout):
                    ctx.block(layout, Reason.at("width-mismatch", node,
                                                f"reads {c_in} channels from a tensor laid out as {width(layout)}"))
                else:
                    ctx.edit(SliceParam(node, 1, in_axis, layout))
                    ctx.consume(node, self)
            out = ctx.new_space(c_out, node)
            if not bias_ok:
                ctx.block(out, Reason.at("computed-parameter", node, "has a computed bias"))
            ctx.edit(SliceParam(node, 1, out_axis, out))
            ctx.edit(SliceParam(node, 2, 0, out))
            ctx.set_layout(node.outputs[0], out)
        elif group != c_in or c_in != c_out:
            self._grouped(node, ctx, layout, group, c_in, c_out, bias_ok)
        elif layout is not None and bias_ok:  # depthwise
            ctx.edit(SliceParam(node, 1, 0, layout))  # [C, 1, k...] either way
            ctx.edit(SliceParam(node, 2, 0, layout))
            ctx.edit(SetGroup(node, layout))
            for seg in layout:
                ctx.space(seg.space).coupled.append(node)
            ctx.set_layout(node.outputs[0], layout)
        else:
            code, why = (("computed-parameter", "has a computed bias") if not bias_ok else
                         ("depthwise-unproduced", "is a depthwise convolution of channels no layer produces"))
            block_inputs(node, ctx, code, why)
            ctx.set_layout(node.outputs[0], ctx.opaque(c_out, Reason.at(code, node, why)))

    def _grouped(self, node: gs.Node, ctx: Analysis, layout, group: int, c_in: int, c_out: int, bias_ok: bool) -> None:
        """1 < group < C: both sides lose the same number of channels in every group."""
        if node.op != "Conv" or not bias_ok:
            block_inputs(node, ctx, "grouped-conv", f"is a grouped {node.op} (group={group})")
            ctx.set_layout(node.outputs[0], ctx.opaque(c_out, Reason.at("grouped-conv", node, f"is grouped (group={group})")))
            return
        if layout is not None:
            if width(layout) != c_in or any(s.repeat != 1 for s in layout):
                ctx.block(layout, Reason.at("width-mismatch", node,
                                            f"reads {c_in} channels from a tensor laid out as {width(layout)}"))
            elif ctx.group(layout, group, node):
                ctx.edit(SliceGroupedInput(node, layout, group))
                ctx.consume(node, self)
        out = ctx.new_space(c_out, node)
        ctx.group(out, group, node)
        ctx.edit(SliceParam(node, 1, 0, out))
        ctx.edit(SliceParam(node, 2, 0, out))
        ctx.set_layout(node.outputs[0], out)

    def dead_values(self, node, ctx, inputs):
        c_out = self._channels(node, constant_shape(node.inputs[1]))[1]
        bias = _bias(node, c_out)
        unknown = np.full(c_out, np.nan)
        depthwise = attr(node, "group", 1) == self._channels(node, constant_shape(node.inputs[1]))[0] == c_out
        if attr(node, "group", 1) != 1 and depthwise and inputs[0] is not None:  # constant in, constant out
            weight = constant_values(node.inputs[1])
            unknown = inputs[0] * weight.reshape(c_out, -1).sum(1) / _phases(node) + bias
            if not uniform_response(node, weight.shape[2:]):  # padding or overlap: not constant near the border
                unknown = np.where(inputs[0] == 0, bias, np.nan)
        if node in ctx.scale_nodes:  # BN folded in: the channel's mean output (~beta)
            return [np.where(np.isfinite(unknown), unknown, ctx.scale_nodes[node])]
        return [unknown]

    def bias(self, node):
        return _bias_input(node)

    def layer_cost(self, node, shapes):
        weight = weight_shape(node.inputs[1])
        if weight is None:
            return None
        per_output = int(np.prod(weight[1:]))  # (C_in / group) * kernel taps, or (C_out / group) * taps
        if node.op == "ConvTranspose":  # every input pixel scatters into C_out / group * taps outputs
            return self._channels(node, weight)[1], (known_product(shapes.get(node.inputs[0].name)) or 0) * per_output
        return weight[0], (known_product(shapes.get(node.outputs[0].name)) or 0) * per_output

    def compensate(self, node, ctx, dead, removed):
        weight = constant_values(node.inputs[1])
        in_axis, out_axis = self._axes(node)
        value, missing = _removed_rows(dead, removed)
        group = attr(node, "group", 1)
        if group > 1:  # grouped: output o of group j reads only group j's inputs
            per, rows = len(value) // group, weight.shape[0] // group
            sums = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(2, dtype=np.float64)
            delta = np.concatenate([sums[j * rows:(j + 1) * rows] @ value[j * per:(j + 1) * per] for j in range(group)])
        else:
            rows = np.flatnonzero(value)  # only the removed channels' taps are read, summed in float64
            taps = np.moveaxis(np.take(weight, rows, axis=in_axis), [out_axis, in_axis], [0, 1])
            taps = taps.reshape(taps.shape[0], len(rows), -1) if len(rows) else np.zeros((taps.shape[0], 0, 1))
            delta = taps.sum(2, dtype=np.float64) @ value[rows] / _phases(node)
        exact = uniform_response(node, weight.shape[2:])
        border = None if exact else (lambda: _border_map(node, ctx, weight, value, delta))
        return Compensation(delta, exact, missing, border)

    def carry(self, node, dead, removed, carriers):
        if node.op != "Conv" or attr(node, "group", 1) != 1 or stored_narrower(node.inputs[1]):
            return None  # (float16 storage: the merged weight would be written widened)
        return _carried_weight(constant_values(node.inputs[1]), dead, removed, carriers)

    def weight_energy(self, node, out_weight):
        return _conv_energy(node, out_weight)

    def add_bias(self, node, delta, graph):
        weight = node.inputs[1]
        c_out = self._channels(node, tuple(weight.shape))[1]
        bias = (_bias(node, c_out) + delta).astype(weight.dtype)
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            replace_constant(node, 2, bias)
        else:
            _set_input(node, 2, gs.Constant(unique_name(graph, f"{node.name}_bias_slim"), bias))


def uniform_response(node: gs.Node, kernel: tuple[int, ...]) -> bool:
    """Whether a constant input gives the same value at every output position: a Conv with
    no padding; a ConvTranspose only as a 1x1, stride-1 map (else taps overlap unevenly)."""
    unpadded = not any(attr(node, "pads", [0])) and attr(node, "auto_pad", "NOTSET") in ("NOTSET", "VALID")
    if node.op == "ConvTranspose":
        return unpadded and all(k == 1 for k in kernel) and all(s == 1 for s in attr(node, "strides", [1])) \
            and not any(attr(node, "output_padding", [0]))
    return unpadded


def _phases(node: gs.Node) -> int:
    """A strided ConvTranspose spreads each tap over stride^d output phases."""
    return int(np.prod(attr(node, "strides", [1]))) if node.op == "ConvTranspose" else 1


def _carried_weight(weight: np.ndarray | None, dead: np.ndarray, removed: np.ndarray,
                    carriers: np.ndarray) -> np.ndarray | None:
    """A Conv weight [C_out, C_in, k...] with the removed inputs' constants moved onto carrier k:
    k is c_k inside the image and 0 in the zero padding like the removed ones, so
    ``W[:, k] += sum_j (c_j / c_k) W[:, j]`` reproduces them at every position."""
    value, missing = _removed_rows(dead, removed)
    candidates = np.flatnonzero(carriers)
    if weight is None or missing or not len(candidates):
        return None
    k = candidates[np.argmax(np.abs(dead[candidates]))]
    rows = np.flatnonzero(value)
    merged = weight.astype(np.float64)
    merged[:, k] += np.tensordot(value[rows] / dead[k], merged[:, rows], axes=(0, 1))
    return merged.astype(weight.dtype)


def _conv_energy(node: gs.Node, out_weight: np.ndarray | None) -> np.ndarray | None:
    """:meth:`Rule.weight_energy` of a Conv [C_out, C_in / g, k...], whose input c feeds its
    group's outputs, or a ConvTranspose [C_in, C_out / g, k...], which has no single output axis
    (its outputs are pooled)."""
    weight = constant_values(node.inputs[1])
    if weight is None:
        return None
    w2 = weight.astype(np.float64) ** 2
    if out_weight is not None:
        if node.op == "ConvTranspose" or w2.shape[0] != len(out_weight):
            return None
        w2 = w2 * out_weight.reshape([-1] + [1] * (w2.ndim - 1))
    if node.op == "ConvTranspose":
        return w2.reshape(w2.shape[0], -1).sum(1)
    group = attr(node, "group", 1)
    per_in, per_out = w2.shape[1], w2.shape[0] // group
    taps = w2.reshape(w2.shape[0], per_in, -1).sum(2)
    return np.concatenate([taps[j * per_out:(j + 1) * per_out].sum(0) for j in range(group)])


def _border_map(node: gs.Node, ctx: Analysis, weight: np.ndarray, value: np.ndarray,
                delta: np.ndarray) -> np.ndarray | None:
    """What the removed constants contribute at each output position, minus the bias part
    ``delta``: non-zero only where padding (or a ConvTranspose's uneven overlap) meets them.

    Measured by running the layer alone in onnxruntime on the constant input (every conv
    attribute as in the model), so it holds for any kernel, stride, dilation, group and
    dimension. Needs static input and output sizes; None otherwise."""
    in_shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if not ctx.static_sizes or in_shape is None or out_shape is None or \
            not all(isinstance(d, int) for d in in_shape[1:] + out_shape[1:]):
        return None
    image = np.broadcast_to(value.reshape(1, -1, *[1] * (len(in_shape) - 2)), [1, *in_shape[1:]]).astype(np.float32)
    attrs = {k: v for k, v in node.attrs.items() if k in
             ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides", "output_padding", "output_shape")}
    single = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node(node.op, ["x", "w"], ["y"], **attrs)], "border",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, image.shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight.astype(np.float32), "w")]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    single.ir_version = 8
    sess = runtime.session(single, f"{node.op} {node.name} alone (its border map)", optimized=True)
    full = sess.run(None, {"x": image})[0][0].astype(np.float64)
    return full - delta.reshape(-1, *[1] * (full.ndim - 1))


def _bias_input(node: gs.Node) -> np.ndarray | None:
    """Input 2 of Conv / ConvTranspose / Gemm when it is a constant vector of several channels."""
    bias = constant_values(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    return bias if bias is not None and bias.ndim >= 1 and bias.size > 1 else None


def _set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) > index:
        node.inputs[index] = tensor
    else:
        node.inputs.append(tensor)


def _bias(node: gs.Node, size: int) -> np.ndarray:
    if len(node.inputs) > 2 and node.inputs[2].name:
        value = constant_values(node.inputs[2])
        if value is not None:
            return value.astype(np.float64)
    return np.zeros(size)


@register
class GemmRule(Rule):
    """Gemm / MatMul with a constant weight: columns open a space, rows consume one.

    A C*H*W flatten in front is handled: each input channel owns H*W consecutive rows.
    """

    ops = ("Gemm", "MatMul")

    def _weight_axes(self, node: gs.Node) -> tuple[int, int]:
        """(input axis, output axis) of the weight."""
        found = axes(node)
        return found.in_axis, found.out_axis

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        weight = constant_shape(node.inputs[1])
        layout = ctx.layout(node.inputs[0])
        rank_ok = ctx.rank(node.inputs[0]) == 2
        if weight is None or len(weight) != 2 or not rank_ok or attr(node, "transA", 0):
            code, why = (("computed-parameter", "has a computed weight") if weight is None or len(weight) != 2
                         else ("matmul-not-2d", "multiplies a tensor that is not [batch, features]"))
            block_inputs(node, ctx, code, why)
            if weight is not None and len(weight) == 2:
                ctx.set_layout(node.outputs[0], ctx.opaque(weight[self._weight_axes(node)[1]], Reason.at(code, node, why)))
            return
        in_axis, out_axis = self._weight_axes(node)
        if layout is not None:
            if width(layout) != weight[in_axis]:
                ctx.block(layout, Reason.at("width-mismatch", node, f"reads {weight[in_axis]} features, "
                                                                    f"the channels upstream give {width(layout)}"))
            else:
                ctx.edit(SliceParam(node, 1, in_axis, layout))
                ctx.consume(node, self)
        out = ctx.new_space(weight[out_axis], node)
        ctx.edit(SliceParam(node, 1, out_axis, out))
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            bias = constant_values(node.inputs[2])
            if bias is None:
                ctx.block(out, Reason.at("computed-parameter", node, "has a computed bias"))
                ctx.block(layout, Reason.at("computed-parameter", node, "has a computed bias"))
            elif bias.ndim >= 1:
                ctx.edit(SliceParam(node, 2, bias.ndim - 1, out))
        ctx.set_layout(node.outputs[0], out)

    def dead_values(self, node, ctx, inputs):
        if node not in ctx.scale_nodes:
            return super().dead_values(node, ctx, inputs)
        return [ctx.scale_nodes[node]]  # BN1d folded in: the column's mean output (~beta)

    def bias(self, node):
        return _bias_input(node) if node.op == "Gemm" else None  # MatMul has none

    def layer_cost(self, node, shapes):
        weight = weight_shape(node.inputs[1])
        if weight is None or len(weight) != 2:
            return None
        in_axis, out_axis = self._weight_axes(node)
        return weight[out_axis], (known_product(shapes.get(node.outputs[0].name)) or 0) * weight[in_axis]

    def compensate(self, node, ctx, dead, removed):
        weight = constant_values(node.inputs[1])
        in_axis, _ = self._weight_axes(node)
        layout = ctx.layout(node.inputs[0])
        repeat = np.concatenate([np.full(s.size, s.repeat) for s in layout])
        value, missing = _removed_rows(dead, removed, repeat)
        rows = np.flatnonzero(value)
        taps = np.take(weight, rows, axis=in_axis).astype(np.float64)
        delta = value[rows] @ (taps if in_axis == 0 else taps.T)
        if node.op == "Gemm":
            delta = delta * attr(node, "alpha", 1.0)
        return Compensation(delta, True, missing)

    def weight_energy(self, node, out_weight):
        weight = constant_values(node.inputs[1])
        if weight is None:
            return None
        w2 = weight.astype(np.float64) ** 2
        out_axis = self._weight_axes(node)[1]
        if out_weight is not None:
            if w2.ndim != 2 or w2.shape[out_axis] != len(out_weight):
                return None
            w2 = w2 * out_weight.reshape([-1 if a == out_axis else 1 for a in range(w2.ndim)])
        return w2.sum(out_axis) * (attr(node, "alpha", 1.0) ** 2 if node.op == "Gemm" else 1.0)

    def add_bias(self, node, delta, graph):
        dtype = node.inputs[1].dtype
        if node.op == "Gemm":
            beta = attr(node, "beta", 1.0)
            bias = constant_values(node.inputs[2]) if len(node.inputs) > 2 else None
            if bias is not None and beta != 0:
                replace_constant(node, 2, (bias + delta / beta).astype(dtype))
            else:  # no C (an absent C is all zeros): write one
                _set_input(node, 2, gs.Constant(unique_name(graph, f"{node.name}_bias_slim"), delta.astype(dtype)))
                node.attrs["beta"] = 1.0
            return
        add_after(graph, node, delta.astype(dtype), "bias")  # MatMul has no bias: an Add behind it
