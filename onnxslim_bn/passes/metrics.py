"""Model size figures: channels, parameters, multiply-accumulates (MACs), op counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.ops import DEQUANTIZE
from ..ir.quantized import quantized, weight_shape
from ..rules import RULES


@dataclass
class Metrics:
    channels: int  # output channels of every Conv / ConvTranspose / Gemm / MatMul with a weight
    parameters: int  # every constant: weights, biases, BN parameters, shape constants
    macs: int
    size_bytes: int  # the file's size (serialized), or the weights' bytes past protobuf's 2 GB
    ops: dict[str, int] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)  # node name -> {op, out_channels, macs, parameters}
    layer_parameters: int = 0  # the layers' weights (input 1): what --target-params counts

    def to_dict(self) -> dict:
        return asdict(self)


def layer_costs(nodes, shapes: dict[str, list]):
    """(node, output channels, MACs, weight parameters) of every layer among ``nodes``: the one
    count behind the report's figures and the budgets' (:class:`onnxslim_bn.passes.select.costs.Costs`).
    Channels and MACs come from the layer's rule (:meth:`Rule.layer_cost`); its parameters are
    the entries of its weight (input 1), which is what removing its channels shrinks."""
    for node in nodes:
        rule = RULES.get(node.op) if node.domain in ("", "ai.onnx", None) else None
        cost = None if rule is None else rule.layer_cost(node, shapes)
        if cost is None:
            continue
        weight = weight_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        yield node, cost[0], cost[1], int(np.prod(weight)) if weight is not None else 0


def measure(graph: gs.Graph, shapes: dict[str, list], size_bytes: int) -> Metrics:
    """Count a graph. ``shapes`` come from :func:`onnxslim_bn.ir.shapes.infer_shapes` with fixed
    inputs; the layers' figures from :func:`layer_costs`."""
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    params = sum(_entries(t) for t in constants)
    layers, channels, macs, weights = {}, 0, 0, 0
    for node, out_c, layer_macs, layer_params in layer_costs(graph.nodes, shapes):
        channels += out_c
        macs += layer_macs
        weights += layer_params
        layers[node.name] = {"op": node.op, "out_channels": out_c, "macs": layer_macs, "parameters": layer_params}
    ops = Counter(n.op for n in graph.nodes)
    ops.update(DEQUANTIZE for t in constants if quantized(t) is not None)  # a QDQ weight counts as written
    return Metrics(channels, params, macs, size_bytes, dict(ops), layers, weights)


def _entries(tensor: gs.Constant) -> int:
    """A constant's entries; a QDQ weight folded for the analysis (ir.quantized) counts as written:
    its integers, scale and zero point."""
    mark = quantized(tensor)
    if mark is None:
        return int(np.prod(tensor.shape))
    return sum(int(a.size) for a in (mark.data, mark.scale, mark.zero_point) if a is not None)
