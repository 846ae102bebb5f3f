"""Per-channel and elementwise ops: BatchNorm, activations, arithmetic with constants, joins."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..channels.context import Analysis
from ..channels.edits import SelectChannels, SliceParam
from ..channels.layout import channels
from ..channels.reasons import Reason
from ..ir.values import constant_values
from ..ir.weights import LAYER_OPS
from .base import Rule, attr, block_inputs, carrying, register, used


@register
class BatchNormRule(Rule):
    """BatchNormalization (opset 7 on): passes the space on, slices its four parameters, and
    gives the space its importance, |gamma|. A removed channel outputs beta.

    A BN that is the only reader of its input scores the producer's channels, and so do BNs that
    are several readers of one tensor (DenseNet). Where another reader sees the raw tensor
    (pre-activation ResNets: the shortcut, a downsample conv), :func:`analysis.analyze` makes
    such a BN score only its own branch: it selects its channels with a Gather, as Network
    Slimming's channel-selection layer does."""

    ops = ("BatchNormalization",)

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        params = [constant_values(t) for t in node.inputs[1:5]]
        if any(p is None for p in params):
            ctx.block(layout, Reason.at("computed-parameter", node, "has computed parameters"))
        elif attr(node, "spatial", 1) == 0 or any(p.ndim != 1 for p in params):
            ctx.block(layout, Reason.at("batchnorm-unsupported", node, "has per-position parameters (spatial=0)"))
        elif any(used(t, ctx) for t in node.outputs[1:]):
            ctx.block(layout, Reason.at("batchnorm-unsupported", node, "is in training mode (its statistics are used)"))
        elif any(s.repeat != 1 for s in layout):
            ctx.block(layout, Reason.at("batchnorm-unsupported", node, "normalizes flattened features"))
        else:
            if not _sole_reader(node, ctx):
                ctx.readers.append((node, layout))
            if node in ctx.selecting:
                # one reader among several, beside raw readers: its gamma says nothing of what they read
                own = ctx.select(layout, node)
                ctx.edit(SelectChannels(node, layout, own, ctx.graph))
                layout = own
            for index in range(1, 5):
                ctx.edit(SliceParam(node, index, 0, layout))
            ctx.add_scores(layout, params[0], "bn", node)
            ctx.set_layout(node.outputs[0], layout)
            return
        ctx.set_layout(node.outputs[0], layout)

    def channel_scale(self, node):
        gamma, var = constant_values(node.inputs[1]), constant_values(node.inputs[4])
        if gamma is None or var is None or gamma.shape != var.shape or gamma.ndim != 1:
            return None
        return gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + attr(node, "epsilon", 1e-5))

    def dead_values(self, node, ctx, inputs):
        """beta, the output with gamma taken as 0; where the input is itself a known constant
        (a channel dead upstream too), the BN of that constant, which is exact."""
        gamma, beta, mean, var = (constant_values(t).astype(np.float64) for t in node.inputs[1:5])
        out = beta.copy()
        if inputs[0] is not None:
            known = np.isfinite(inputs[0])
            exact = gamma * (inputs[0] - mean) / np.sqrt(var + attr(node, "epsilon", 1e-5)) + beta
            out[known] = exact[known]
        return [out] + [None] * (len(node.outputs) - 1)


def _sole_reader(node: gs.Node, ctx: Analysis) -> bool:
    """Whether the BN sees everything its input carries: back through single-input ops that
    pass the channels on (Identity, an activation, pooling ...), no tensor has another reader
    or is a graph output. A BN that is one reader among several scores its branch only."""
    tensor = node.inputs[0]
    while True:
        if len(tensor.outputs) > 1 or any(tensor is o for o in ctx.graph.outputs):
            return False
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None or producer.op in LAYER_OPS:
            return True
        carrying = [t for t in producer.inputs if ctx.layout(t) is not None]
        if len(carrying) != 1 or len(producer.outputs) != 1 or ctx.layout(producer.outputs[0]) != ctx.layout(carrying[0]):
            return True  # a join, a concatenation, a split: where the channels come together
        tensor = carrying[0]


def _hard_sigmoid(node: gs.Node) -> Callable[[np.ndarray], np.ndarray]:
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    return lambda x: np.clip(alpha * x + beta, 0.0, 1.0)


def _clip(node: gs.Node) -> Callable[[np.ndarray], np.ndarray]:
    low, high = attr(node, "min", -np.inf), attr(node, "max", np.inf)
    if len(node.inputs) > 1 and node.inputs[1].name:
        low = float(constant_values(node.inputs[1]).reshape(-1)[0])  # a scalar, or shape [1] in some exports
    if len(node.inputs) > 2 and node.inputs[2].name:
        high = float(constant_values(node.inputs[2]).reshape(-1)[0])
    return lambda x: np.clip(x, low, high)


def _elu(node: gs.Node) -> Callable[[np.ndarray], np.ndarray]:
    alpha = attr(node, "alpha", 1.0)
    return lambda x: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


def _selu(node: gs.Node) -> Callable[[np.ndarray], np.ndarray]:
    alpha, gamma = attr(node, "alpha", 1.67326319217681884765625), attr(node, "gamma", 1.05070102214813232421875)
    return lambda x: gamma * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


def _leaky(node: gs.Node) -> Callable[[np.ndarray], np.ndarray]:
    alpha = attr(node, "alpha", 0.01)
    return lambda x: np.where(x >= 0, x, alpha * x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_erf = np.vectorize(math.erf, otypes=[np.float64])

# op -> builder(node) -> f(per-channel constant) ; the rule needs no other op knowledge
UNARY: dict[str, Callable[[gs.Node], Callable[[np.ndarray], np.ndarray]]] = {
    "Relu": lambda n: lambda x: np.maximum(x, 0.0),
    "LeakyRelu": _leaky,
    "Sigmoid": lambda n: _sigmoid,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda n: lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda n: np.tanh,
    "Elu": _elu,
    "Selu": _selu,
    "Softplus": lambda n: lambda x: np.logaddexp(0.0, x),
    "Softsign": lambda n: lambda x: x / (1.0 + np.abs(x)),
    "Mish": lambda n: lambda x: x * np.tanh(np.logaddexp(0.0, x)),
    "Gelu": lambda n: lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "Erf": lambda n: _erf,
    "Abs": lambda n: np.abs,
    "Neg": lambda n: np.negative,
    "Exp": lambda n: np.exp,
    "Clip": _clip,
    "Identity": lambda n: lambda x: x,
    "Dropout": lambda n: lambda x: x,
    "Cast": lambda n: lambda x: x,
}


@register
class UnaryRule(Rule):
    """Activations and other channel-wise functions: the space passes through unchanged."""

    ops = tuple(UNARY)

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        others = [t for t in node.inputs[1:] if t.name and not isinstance(t, gs.Constant)]
        why = None
        if others:
            why = Reason.at("computed-parameter", node, "takes a computed parameter")
        elif any(used(t, ctx) for t in node.outputs[1:]):
            why = Reason.at("second-output", node, "has a second output in use")
        elif node.op == "Cast" and not _is_float(attr(node, "to")):
            why = Reason.at("cast-non-float", node, "casts the channels to a non-float type")
        if why is not None:  # a blocked op passes no layout on
            ctx.block(layout, why)
            return
        ctx.set_layout(node.outputs[0], layout)

    def dead_values(self, node, ctx, inputs):
        if inputs[0] is None:
            return [None] * len(node.outputs)
        with np.errstate(all="ignore"):
            return [UNARY[node.op](node)(inputs[0])] + [None] * (len(node.outputs) - 1)


def _is_float(to: int | None) -> bool:
    from onnx import TensorProto

    return to in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


@register
class PReluRule(Rule):
    """PRelu: per-channel slopes are sliced with the channels."""

    ops = ("PRelu",)

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        if _per_channel_axis(node.inputs[1], ctx.rank(node.inputs[0]), layout, node, ctx):
            ctx.set_layout(node.outputs[0], layout)

    def dead_values(self, node, ctx, inputs):
        slope = _channel_vector(node.inputs[1], ctx.rank(node.inputs[0]), channels(ctx.layout(node.inputs[0])))
        return [np.where(inputs[0] >= 0, inputs[0], slope * inputs[0])]


BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Max": np.maximum, "Min": np.minimum, "Pow": np.power,
}


@register
class ElementwiseRule(Rule):
    """Binary arithmetic. With a constant: a scalar passes, a per-channel constant is sliced.
    Between two channel-carrying tensors (residual Add, squeeze-excitation Mul, x*sigmoid(x)):
    their spaces are joined, so they are pruned as one."""

    ops = tuple(BINARY)

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        flowing = carrying(node, ctx)
        if not flowing:
            return
        rank = ctx.rank(node.outputs[0])
        computed = [t for t in node.inputs if ctx.layout(t) is None and not isinstance(t, gs.Constant)]
        if computed:
            block_inputs(node, ctx, "computed-operand", f"combines the channels with '{computed[0].name}', which onnx-bnslim cannot follow")
            return
        if node.op == "Pow" and flowing[0][0] != 0:
            block_inputs(node, ctx, "power-of-channels", "raises a constant to the power of the channels")
            return
        layout = flowing[0][1]
        if rank is None or any(ctx.rank(node.inputs[i]) != rank for i, _ in flowing):
            code, why = (("broadcast-channel-axis", "broadcasts the channel axis") if rank is not None else
                         ("unknown-shape", "has an output of unknown rank"))
            block_inputs(node, ctx, code, why)
            return
        joined = all([ctx.merge(layout, other, node) for _, other in flowing[1:]])
        kept = all([_per_channel_axis(t, rank, layout, node, ctx, i)
                    for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)])
        if joined and kept:
            ctx.set_layout(node.outputs[0], layout)

    def dead_values(self, node, ctx, inputs):
        size = channels(ctx.layout(node.outputs[0]))
        values = []
        for tensor, dead in zip(node.inputs, inputs):
            if dead is None:
                dead = _channel_vector(tensor, ctx.rank(node.outputs[0]), size)
            values.append(dead)
        with np.errstate(all="ignore"):  # Max / Min are variadic (1 input or more); the others binary
            out = functools.reduce(BINARY[node.op], values)
            if node.op == "Mul":  # 0 * (anything finite or not) is 0: a gated dead channel stays dead
                out = np.where(np.any([v == 0 for v in values], axis=0), 0.0, out)
        if node in ctx.scale_nodes:  # a split BN's scale: the channel's mean output
            out = np.where(np.isfinite(out), out, ctx.scale_nodes[node])
        return [out]


def _per_channel_axis(tensor: gs.Tensor, rank: int | None, layout, node: gs.Node, ctx: Analysis, index: int = 1) -> bool:
    """Record the slice of a constant that broadcasts against [N, C, ...]; block if it mixes."""
    values = constant_values(tensor)
    if values is None:
        ctx.block(layout, Reason.at("computed-parameter", node, "takes a computed parameter"))
        return False
    if values.size == 1:
        return True
    if rank is None:
        ctx.block(layout, Reason.at("unknown-shape", node, "has an output of unknown rank; run shape inference on the model"))
        return False
    axis = 1 - (rank - values.ndim)
    if axis < 0 or values.shape[axis] == 1:
        return True
    size = sum(s.size * s.repeat for s in layout)
    if values.shape[axis] != size:
        ctx.block(layout, Reason.at("per-entry-constant", node,
                                    f"has a constant of shape {list(values.shape)} across {size} channels"))
        return False
    if any(s.repeat != 1 for s in layout):
        ctx.block(layout, Reason.at("per-entry-constant", node, "scales flattened features per entry"))
        return False
    ctx.edit(SliceParam(node, index, axis, layout))
    return True


def _channel_vector(tensor: gs.Tensor, rank: int | None, size: int) -> np.ndarray:
    """A constant as one value per channel; NaN where it varies along other axes."""
    values = constant_values(tensor)
    if values is None:
        return np.full(size, np.nan)
    values = values.astype(np.float64)
    if values.size == 1:
        return np.full(size, float(values.reshape(-1)[0]))
    if rank is None:
        return np.full(size, np.nan)
    axis = 1 - (rank - values.ndim)
    if axis >= 0 and values.size == values.shape[axis]:
        return np.broadcast_to(values.reshape(-1), (size,)).copy()
    return np.full(size, np.nan)



_QUANTIZED_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127),
                    np.dtype(np.uint16): (0, 65535), np.dtype(np.int16): (-32768, 32767)}


@register
class QuantizeRule(Rule):
    """QuantizeLinear / DequantizeLinear of an activation (a QDQ model's pairs; its weights are
    folded to constants before the analysis, :mod:`onnxslim_bn.ir.quantized`): the space passes
    through; a per-tensor scale and zero point stay, per-channel ones along the channel axis are
    sliced with the channels. A removed channel's constant is quantized (rounded half to even,
    saturated to the zero point's type) and dequantized as onnxruntime does."""

    ops = ("QuantizeLinear", "DequantizeLinear")

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        params = [t for t in node.inputs[1:3] if t.name]
        if any(constant_values(t) is None for t in params):
            ctx.block(layout, Reason.at("computed-parameter", node, "takes a computed scale or zero point"))
            return
        if int(attr(node, "block_size", 0) or 0):
            ctx.block(layout, Reason.at("per-entry-constant", node, "quantizes in blocks (block_size)"))
            return
        rank = ctx.rank(node.inputs[0])
        if all(constant_values(t).size == 1 for t in params):
            ctx.set_layout(node.outputs[0], layout)
            return
        axis = attr(node, "axis", 1)
        if rank is None or (axis + rank if axis < 0 else axis) != 1 or any(constant_values(t).ndim != 1 for t in params):
            ctx.block(layout, Reason.at("per-entry-constant", node, f"quantizes per channel along axis {axis}, "
                                                                    "not the channel axis"))
            return
        if any(s.repeat != 1 for s in layout) or any(constant_values(t).size != channels(layout) for t in params):
            ctx.block(layout, Reason.at("per-entry-constant", node, "quantizes flattened features per entry"))
            return
        for index in range(1, 1 + len(params)):
            ctx.edit(SliceParam(node, index, 0, layout))
        ctx.set_layout(node.outputs[0], layout)

    def dead_values(self, node, ctx, inputs):
        if inputs[0] is None:
            return [None]
        size = len(inputs[0])
        scale = _channel_vector(node.inputs[1], 2, size)  # a vector: rank 2 puts it on axis 0
        zero_point = _channel_vector(node.inputs[2], 2, size) if len(node.inputs) > 2 and node.inputs[2].name \
            else np.zeros(size)
        if node.op == "DequantizeLinear":
            return [(inputs[0] - zero_point) * scale]
        zero = constant_values(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        low, high = _QUANTIZED_RANGE.get(np.dtype(np.uint8) if zero is None else zero.dtype, (-np.inf, np.inf))
        with np.errstate(all="ignore"):
            return [np.clip(np.rint(inputs[0] / scale) + zero_point, low, high)]
