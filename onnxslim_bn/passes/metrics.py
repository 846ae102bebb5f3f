"""Model size figures: channels, parameters, multiply-accumulates (MACs), op counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from ..rules import RULES


@dataclass
class Metrics:
    channels: int  # output channels of every Conv / ConvTranspose / Gemm / MatMul with a weight
    parameters: int
    macs: int
    size_bytes: int  # the file's size when known, else the weights' bytes
    ops: dict[str, int] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)  # node name -> {op, out, macs}

    def to_dict(self) -> dict:
        return asdict(self)


def measure(graph: gs.Graph, shapes: dict[str, list], size_bytes: int) -> Metrics:
    """Count a graph. ``shapes`` come from :func:`onnxslim_bn.ir.shapes.infer_shapes` with fixed
    inputs; each op's output channels and MACs come from its rule (:meth:`Rule.layer_cost`)."""

    params = sum(int(np.prod(t.shape)) for t in graph.tensors().values() if isinstance(t, gs.Constant))
    layers, channels, macs = {}, 0, 0
    for node in graph.nodes:
        rule = RULES.get(node.op)
        cost = None if rule is None else rule.layer_cost(node, shapes)
        if cost is None:
            continue
        out_c, layer_macs = cost
        channels += out_c
        macs += layer_macs
        layers[node.name] = {"op": node.op, "out_channels": out_c, "macs": layer_macs}
    return Metrics(channels, params, macs, size_bytes, dict(Counter(n.op for n in graph.nodes)), layers)
